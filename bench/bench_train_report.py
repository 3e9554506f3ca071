"""What one `ray.train.report` call costs a Train worker, with and without a checkpoint.

Why this file exists: a phase worker reports its matching loss and step sizes as it distils. In Ray
Train 2.60 each worker hands its reports to the controller through a queue of one, and the controller
takes one per poll (RAY_TRAIN_HEALTH_CHECK_INTERVAL_S, 2 s by default), so a worker that reports faster
than that waits for the poll. This script runs one-worker TorchTrainers that only call `report` n times
and writes to bench/RESULTS.md the seconds each call blocked (the first, and the median of the rest)
and each run's wall time, for reports without and with a checkpoint. The phase loop reports to Train
only with its checkpoints for this reason (ptmst_ray/orchestration/phases.py).

    .venv/bin/python bench/bench_train_report.py
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, replace_section  # noqa: E402


def reporting_loop(config: dict) -> None:
    """n reports, every other one with a tiny checkpoint when asked; returns the blocked seconds through a file."""
    import json
    import os
    import tempfile
    import time

    import ray.train

    blocked = []
    for i in range(config["n"]):
        t = time.perf_counter()
        if config["checkpoint"]:
            d = tempfile.mkdtemp()
            with open(os.path.join(d, "state.json"), "w") as f:
                f.write("{}")
            ray.train.report({"i": i}, checkpoint=ray.train.Checkpoint.from_directory(d))
        else:
            ray.train.report({"i": i})
        blocked.append(time.perf_counter() - t)
    with open(config["out"], "w") as f:
        json.dump(blocked, f)


def run(n: int, checkpoint: bool) -> dict:
    import json

    from ray.train import CheckpointConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    out = tempfile.mktemp(suffix=".json")
    t0 = time.perf_counter()
    TorchTrainer(reporting_loop, train_loop_config={"n": n, "checkpoint": checkpoint, "out": out},
                 scaling_config=ScalingConfig(num_workers=1), torch_config=TorchConfig(backend="gloo"),
                 run_config=RunConfig(name=f"report-{checkpoint}", storage_path=tempfile.mkdtemp(),
                                      checkpoint_config=CheckpointConfig(num_to_keep=2))).fit()
    wall = time.perf_counter() - t0
    blocked = json.loads(Path(out).read_text())
    return {"first": blocked[0], "median_rest": statistics.median(blocked[1:]), "sum": sum(blocked), "wall": wall}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reports", type=int, default=8)
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = parser.parse_args()
    import ray

    ray.init(num_cpus=2, log_to_driver=False)
    rows = {kind: run(args.reports, kind == "with a checkpoint") for kind in ("metrics only", "with a checkpoint")}
    ray.shutdown()
    lines = ["| report | first call (s) | later calls, median (s) | all calls (s) | fit() wall (s) |",
             "|---|---:|---:|---:|---:|"]
    for kind, r in rows.items():
        lines.append(f"| {kind} | {r['first']:.3f} | {r['median_rest']:.3f} | {r['sum']:.1f} | {r['wall']:.1f} |")
    body = "\n".join([
        f"Command: `{command_line()}`; machine: {machine(load=True)}.",
        "",
        f"One-worker TorchTrainer (Ray {ray.__version__}) whose loop only calls `ray.train.report` "
        f"{args.reports} times back to back:",
        "",
        *lines,
        "",
        "Every call after the first waits for the controller's next poll (2 s): a worker cannot report more "
        "often than that without being paced by it. The phase loop therefore passes only its checkpoints "
        "to Train (every `distill.checkpoint_every` iterations); its per-iteration metrics go to the progress "
        "board, Prometheus and metrics.json directly. Before, the tiny test config (report_every 1) ran its "
        "phases at ~2 s an iteration instead of ~0.13 s.",
    ])
    print(body)
    if not args.no_write:
        replace_section("## Ray Train's report: what a call costs", body)


if __name__ == "__main__":
    main()
