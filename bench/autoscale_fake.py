"""GPU nodes on demand: the tests' tiny run on Ray's fake autoscaling cluster, timed (issue #27 item 7).

Why this file exists: issue #27 asks how soon a run whose cluster starts with no GPU node gets one, and
how much of each stage runs on GPU-typed nodes. This script runs tests/test_autoscale.py's end-to-end
test (a CPU head, a GPU worker type of 1 CPU + 1 logical GPU with ``min_workers: 0``, max 1 node; the
run has ``run.accelerator: auto``) as a subprocess, repeats it, and writes to bench/RESULTS.md: the time
from the driver's start to the first GPU node joining and to the first GPU task starting, each stage's
seconds, and where each stage ran (the test asserts the node of every expert, phase and evaluation task).

    .venv/bin/python bench/autoscale_fake.py
    .venv/bin/python bench/autoscale_fake.py --repeats 2
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, replace_section  # noqa: E402

SECTION = "## GPU nodes on demand: the fake autoscaling cluster (issue #27)"
ON_GPU_NODES = {"embed", "experts", "phases", "eval"}
"""Stages whose Ray work asks for a GPU (the test asserts every such task ran on a GPU-typed node); data
and aggregate run in the driver, on the head."""


def one_run() -> dict:
    with tempfile.TemporaryDirectory() as d:
        out = Path(d) / "summary.json"
        env = {**os.environ, "PTMST_BENCH_OUT": str(out)}
        done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-s",
                               "tests/test_autoscale.py", "-k", "heavy_stages"], cwd=REPO, env=env,
                              capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"the test failed:\n{done.stdout[-4000:]}\n{done.stderr[-2000:]}")
        return json.loads(out.read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=1)
    args = parser.parse_args()
    runs = [one_run() for _ in range(args.repeats)]
    rows = ["| run | first GPU node joined s | first GPU task started s | "
            + " | ".join(f"{s['stage']} s" for s in runs[0]["stages"]) + " | driver wall s | GPU-node share of stage time |",
            "|---:|---:|---:|" + "---:|" * len(runs[0]["stages"]) + "---:|---:|"]
    for k, r in enumerate(runs, 1):
        total = sum(s["seconds"] for s in r["stages"])
        on_gpu = sum(s["seconds"] for s in r["stages"] if s["stage"] in ON_GPU_NODES)
        first = r["first_gpu_s"][0] if r["first_gpu_s"] else float("nan")
        task = r["first_gpu_task_s"] if r["first_gpu_task_s"] is not None else float("nan")
        rows.append(f"| {k} | {first:.1f} | {task:.1f} | " + " | ".join(f"{s['seconds']:.1f}" for s in r["stages"])
                    + f" | {r['wall_s']:.1f} | {on_gpu / total:.0%} |")
    body = "\n".join([
        f"Command: `{command_line()}`. Machine: {machine(load=True)}.",
        "Setup: tests/test_autoscale.py's end-to-end test: `ray start --head` with the fake multi-node provider "
        "(RAY_FAKE_CLUSTER=1, a CPU head of 2 CPUs, GPU worker type 1 CPU + 1 logical GPU, min_workers 0, max 1), "
        "the tests' tiny config without pretraining (2 experts, 1 phase, random baseline, 1 seed), "
        "`run.accelerator: auto`, autoscaler config given by PTMST_AUTOSCALER_CONFIG. Times from the driver's start "
        "(before `ray.init`); the GPU node's boot includes its raylet and worker start-up on the same 2 cores.",
        "",
        *rows,
        "",
        "* The caption embedding task, every expert attempt, phase attempt and evaluation task ran on the GPU-typed "
        "node (asserted by the test); the head (no GPU) ran only the driver's own stages: data preparation (its "
        "decoding tasks when data.workers > 1 ask for no GPU) and aggregation. The share above is the time of the "
        "GPU-asking stages over all stages' time; the first GPU task's start counts the embedding task and the "
        "expert and phase attempts (evaluation tasks record no start).",
    ])
    replace_section(SECTION, body)
    print(body)


if __name__ == "__main__":
    main()
