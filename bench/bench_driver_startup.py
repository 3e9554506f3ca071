"""A driver's start: importing the model stack and starting a local Ray, one after the other or side by side.

Why this file exists: a `ptmst-ray` command that trains or scores models imports torch, open_clip and transformers
(seconds) and starts a local Ray (seconds, mostly waiting for the processes it starts). ``connect_ray``
(cli/common.py) runs the import on a thread while Ray starts. This script times, in fresh processes with the two
variants alternating over ``--rounds``, from the process's first line to both done: the import and then
``ray.init`` (as before), and the import in the background while ``ray.init`` runs (as now).

    .venv/bin/python bench/bench_driver_startup.py
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, replace_section  # noqa: E402

CHILD = """
import sys, time
t0 = time.perf_counter()
import ray
from ptmst_ray_cli.common import MODEL_STACK, import_in_background
if sys.argv[1] == "background":
    thread = import_in_background(MODEL_STACK)
else:
    __import__(MODEL_STACK)
ray.init(num_cpus=2, log_to_driver=False)
if sys.argv[1] == "background":
    thread.join()
print(time.perf_counter() - t0)
ray.shutdown()
"""


def one(variant: str) -> float:
    out = subprocess.run([sys.executable, "-c", CHILD, variant], capture_output=True, text=True, check=True)
    return float(out.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    times = {"in turn": [], "background": []}
    for r in range(args.rounds):
        for variant in ("in turn", "background") if r % 2 == 0 else ("background", "in turn"):
            times[variant].append(one("turn" if variant == "in turn" else "background"))
            print(f"round {r} {variant}: {times[variant][-1]:.2f} s", flush=True)
    lines = ["| model stack import | to Ray up and the import done: median s | each round s |", "|---|---:|---|"]
    for variant, ts in times.items():
        lines.append(f"| {variant} | {statistics.median(ts):.2f} | {' '.join(f'{t:.2f}' for t in ts)} |")
    body = "\n".join([
        f"Command: `{command_line()}`; machine: {machine(load=True)}; fresh processes, the two variants "
        "alternating; a local Ray of 2 CPUs with its dashboard, `ray.shutdown()` after each.",
        "",
        *lines,
    ])
    print(body)
    if not args.no_write:
        replace_section("## Driver start-up: the model stack imported while Ray starts", body)


if __name__ == "__main__":
    main()
