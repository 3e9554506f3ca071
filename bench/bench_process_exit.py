"""What a process that imported the model stack pays to end, with and without ptmst_ray's exit handler.

Why this file exists: CPython runs a last full garbage collection as it exits, over every object still alive; a
process that has imported torch, open_clip and transformers (every Ray worker that builds a student, every
``ptmst-ray`` command) tracks millions. ptmst_ray/__init__.py freezes them in an exit handler so that collection
skips them. This script measures, each variant alternating over ``--rounds``:

* a Python process that imports ``ptmst_ray.models.towers`` and exits: wall and CPU (user + system) of the process;
* a Ray task given a (logical) GPU, which Ray runs in a worker process of its own that ends with the task: the
  seconds from its result reaching the driver to the end of its process.

"without" unregisters the handler (``atexit.unregister(gc.freeze)``) in the measured process.

    .venv/bin/python bench/bench_process_exit.py
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, replace_section  # noqa: E402

IMPORT = "import ptmst_ray.models.towers"
WITHOUT = "; import atexit, gc; atexit.unregister(gc.freeze)"


def python_process(without: bool) -> tuple[float, float]:
    """(wall s, CPU s) of ``python -c <import the towers>``."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN)
    t = time.perf_counter()
    subprocess.run([sys.executable, "-c", IMPORT + (WITHOUT if without else "")], check=True)
    wall = time.perf_counter() - t
    after = resource.getrusage(resource.RUSAGE_CHILDREN)
    return wall, (after.ru_utime - before.ru_utime) + (after.ru_stime - before.ru_stime)


def _gone(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(") ", 1)[1][0] == "Z"
    except FileNotFoundError:
        return True


def worker_exit(task, without: bool) -> float:
    """Seconds from a GPU task's result to the end of its worker process."""
    import ray

    pid = ray.get(task.remote(without))
    t = time.perf_counter()
    while not _gone(pid):
        time.sleep(0.005)
    return time.perf_counter() - t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    if not os.path.isdir("/proc"):
        sys.exit("bench_process_exit: needs /proc (Linux) to see a worker process end")
    import ray

    ray.init(num_cpus=2, num_gpus=1, include_dashboard=False, log_to_driver=False)

    @ray.remote(num_gpus=1)  # Ray ends a GPU function's worker after one call
    def task(without: bool) -> int:
        import atexit
        import gc

        import ptmst_ray.models.towers  # noqa: F401
        if without:
            atexit.unregister(gc.freeze)
        return os.getpid()

    procs = {"with": [], "without": []}
    exits = {"with": [], "without": []}
    for r in range(args.rounds):
        for kind in ("with", "without") if r % 2 == 0 else ("without", "with"):
            procs[kind].append(python_process(kind == "without"))
            exits[kind].append(worker_exit(task, kind == "without"))
            print(f"round {r} {kind}: import+exit {procs[kind][-1][0]:.2f} s wall {procs[kind][-1][1]:.2f} CPU-s; "
                  f"worker exit {exits[kind][-1]:.2f} s", flush=True)
    ray.shutdown()
    med = statistics.median
    lines = ["| exit handler | import + exit: wall s | CPU s | GPU task's worker: result to process end s |",
             "|---|---:|---:|---:|"]
    for kind in ("without", "with"):
        lines.append(f"| {kind} | {med(p[0] for p in procs[kind]):.2f} | {med(p[1] for p in procs[kind]):.2f} | "
                     f"{med(exits[kind]):.2f} |")
    body = "\n".join([
        f"Command: `{command_line()}`; machine: {machine(load=True)}; medians of {args.rounds} rounds, the two "
        "variants alternating.",
        "",
        *lines,
        "",
        "Without the handler, a process that imported the model stack spends its last ~second of CPU walking "
        "objects it is about to free. Ray ends a worker process on its own after every task given a GPU (the "
        "pipeline's caption-embedding, feature and pretraining tasks where the run targets GPUs); a `ptmst-ray` "
        "command pays it once as it ends. Train's workers and the pipeline's "
        "actors are ended by `ray.kill` and never ran that collection.",
    ])
    print(body)
    if not args.no_write:
        replace_section("## Process exit: the interpreter's last garbage collection", body)


if __name__ == "__main__":
    main()
