"""Scaling benchmark (issue #23 item 2): what Ray costs and what running the phases side by side gains.

The same pipeline (a recipe, from a fresh run root each time) four ways:

* ``plain``: the stage functions one after another in one process, no Ray (bench_quality_probe.run_in_process),
  torch on every core; ``plain-1``: the same on one torch thread, what each Ray worker gets (the unit costs
  of bench/model_scaling.py);
* ``laptop``: ``ptmst-ray run`` in laptop mode (a local Ray on this machine);
* ``serial``: the same with ``distill.max_concurrent=1`` (the phases, and the single-phase baseline, in turn);
* ``two-node``: ``ptmst-ray run`` as a driver of a local two-node cluster (two `ray start` nodes of one CPU
  each on this machine, ptmst_ray.cluster.local), started before the driver and not counted in its time.

Reports each stage's wall time per variant (the pipeline's own stage table for the Ray variants; "start-up"
is the rest of the driver's wall time: imports, Ray start and stop), the totals, Ray's overhead over
``plain``, the phases' concurrency gain (laptop against serial), each Ray variant's distillation attempts (the
phase workers' attempt records) and the part of its phases stage outside them (Train's start-up and teardown), and
each variant's r_mean, so that a faster variant that computes something else shows.

    .venv/bin/python bench/bench_scaling.py [--config configs/toy.yaml] [--set key=value ...]
        [--variants plain laptop serial two-node] [--rounds N] [--work /tmp/ptmst-bench-scaling] [--no-write]

``--rounds N`` runs the variants N times, every other round in reverse order, so that a machine whose speed drifts
over the run (this project's 2-core VMs: the same work by up to 2x within hours) weighs on every variant alike; the
table then holds each variant's median per stage, and a line per round gives that round's ratios (the overhead
against the same round's ``plain``), so one round's luck cannot pass or fail a target alone.

Without ``--no-write`` the section "Scaling: plain functions, laptop Ray, phases in turn, two nodes" of
bench/RESULTS.md is replaced with this run's figures.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import command_line, machine, replace_section  # noqa: E402

VARIANTS = ("plain", "plain-1", "laptop", "serial", "two-node")
HEADING = "## Scaling: plain functions, laptop Ray, phases in turn, two nodes (issue #23 item 2)"
PLAIN_STAGES = {"prepare": "data"}
"""bench_quality_probe's stage names that differ from the pipeline's (and ``eval <method>`` -> eval; the others,
e.g. ``expert_lr``, are the pipeline's own)."""
ORDER = ("data", "pretrain", "embed", "features", "expert_lr", "experts", "phases", "aggregate", "eval")
"""The stage table's rows in the pipeline's order; a stage not listed here comes after them."""
BIN = Path(sys.executable).parent


def plain_child(config: str, overrides: list[str], root: str, out: str, threads: int) -> None:
    """Variant ``plain`` (in a child process of its own): every stage in this process, then the scores."""
    import torch

    from bench_quality_probe import run_in_process
    from ptmst_ray import storage
    from ptmst_ray.config import load_config
    from ptmst_ray.orchestration.pipeline import evaluation_methods
    from ptmst_ray.stages import score as scoring

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    cfg = load_config(config, [f"run.root={root}", *overrides])
    storage.write_text(storage.join(cfg.run.root, "config.yaml"), cfg.to_yaml())
    times: dict[str, float] = {}
    calls: list[tuple[str, float]] = []

    def timed(name, fn, *a, **k):
        t = time.perf_counter()
        result = fn(*a, **k)
        stage = "eval" if name.startswith("eval ") else PLAIN_STAGES.get(name, name)
        times[stage] = times.get(stage, 0.0) + time.perf_counter() - t
        calls.append((name, time.perf_counter() - t))
        print(f"  plain: {name} +{calls[-1][1]:.1f}s", flush=True)
        return result

    _, _, runs = run_in_process(cfg, evaluation_methods(cfg), timed)
    results = scoring.summarise(runs, cfg)
    Path(out).write_text(json.dumps({"stages": times, "calls": calls, "in_process_s": time.perf_counter() - t0,
                                     "methods": results["methods"]}))


def run_plain(config: str, overrides: list[str], root: Path, log: Path, threads: int) -> dict:
    out = root.parent / f"{root.name}.plain.json"
    cmd = [sys.executable, __file__, "--plain-child", str(root), str(out), str(threads), "--config", config,
           *[a for o in overrides for a in ("--set", o)]]
    wall = _timed_process(cmd, log, os.environ)
    data = json.loads(out.read_text())
    stages = dict(data["stages"])
    stages["start-up"] = wall - sum(stages.values())
    return {"wall": wall, "stages": stages, "methods": data["methods"], "calls": data["calls"], "threads": threads}


def run_cli(config: str, overrides: list[str], root: Path, log: Path, env: dict) -> dict:
    """``ptmst-ray run`` as a child process; its stage table from results.json, the rest of its wall time as
    start-up (imports, Ray start and stop, the final plot)."""
    cmd = [str(BIN / "ptmst-ray"), "run", "--config", config, "--set", f"run.root={root}",
           *[a for o in overrides for a in ("--set", o)]]
    wall = _timed_process(cmd, log, env)
    results = json.loads((root / "eval" / "results.json").read_text())
    stages = {row["stage"]: row["seconds"] for row in results["stages"]}
    stages["start-up"] = wall - sum(stages.values())
    spans = attempt_spans(root)
    return {"wall": wall, "stages": stages, "methods": results["methods"],
            "attempts": {name: end - start for name, (start, end) in spans.items()},
            "attempts_union": union_seconds(list(spans.values()))}


def attempt_spans(root: Path) -> dict[str, tuple[float, float]]:
    """Each distillation run's last finished attempt (start, end), from the attempt records its phase worker
    writes (``phases/<run>/attempts/*.json``): the worker's own time, from after its process and Train's start-up to
    the end of its distillation."""
    spans = {}
    for folder in sorted((root / "phases").glob("*/attempts")):
        done = [a for a in (json.loads(f.read_text()) for f in folder.glob("*.json")) if "end" in a]
        if done:
            last = max(done, key=lambda a: a["start"])
            spans[folder.parent.name] = (last["start"], last["end"])
    return spans


def union_seconds(spans: list[tuple[float, float]]) -> float:
    """The seconds covered by at least one of the intervals: the part of the phases stage in which some run
    computed (the rest is Train's start-up and teardown and the stage's own work)."""
    total, end = 0.0, float("-inf")
    for a, b in sorted(spans):
        if b > end:
            total += b - max(a, end)
            end = b
    return total


def run_two_node(config: str, overrides: list[str], root: Path, log: Path) -> dict:
    from ptmst_ray.cluster import jobs
    from ptmst_ray.cluster.local import start_local_cluster

    t0 = time.perf_counter()
    cluster = start_local_cluster(num_cpus=1, num_gpus=0, token=secrets.token_hex(16), single_machine=False,
                                  prefix="pbs")
    try:
        cluster.add_worker(num_cpus=1, num_gpus=0, joined=lambda: jobs.cluster_status(
            jobs.job_client(cluster.dashboard_url, token=cluster.token)).count("node_") >= 2)
        started = time.perf_counter() - t0
        print(f"  two-node: cluster of 2 nodes up in {started:.1f}s", flush=True)
        out = run_cli(config, overrides, root, log, cluster.env)  # RAY_ADDRESS and the token: the cluster's
        out["cluster_start"] = started
        return out
    finally:
        cluster.stop()


def _timed_process(cmd: list[str], log: Path, env) -> float:
    t0 = time.perf_counter()
    with open(log, "w") as f:
        code = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    wall = time.perf_counter() - t0
    if code != 0:
        raise SystemExit(f"{' '.join(cmd[:3])} ... exited with {code}; its output: {log}")
    return wall


def report(runs: dict[str, dict], load: dict[str, str]) -> str:
    seen = {s for r in runs.values() for s in r["stages"]} - {"start-up"}
    stages = ["start-up", *(s for s in ORDER if s in seen), *sorted(seen - set(ORDER))]
    names = list(runs)
    lines = ["| stage | " + " | ".join(f"{n} s" for n in names) + " |", "|---|" + "---:|" * len(names)]
    for s in stages:
        lines.append(f"| {s} | " + " | ".join(f"{runs[n]['stages'].get(s, 0.0):.1f}" for n in names) + " |")
    lines.append("| **total (wall)** | " + " | ".join(f"**{runs[n]['wall']:.1f}**" for n in names) + " |")
    methods = sorted({m for r in runs.values() for m in r["methods"]})
    for m in methods:
        lines.append(f"| r_mean {m} | " + " | ".join(
            f"{runs[n]['methods'][m]['r_mean']['mean']:.1f} ± {runs[n]['methods'][m]['r_mean']['std']:.1f}"
            if m in runs[n]["methods"] else "" for n in names) + " |")
    lines.append("| load average at the end | " + " | ".join(load[n] for n in names) + " |")
    notes = []
    for n, ratio in ratios(runs).items():
        if n == "phases":
            notes.append(f"* phases side by side against in turn (laptop / serial, phases stage): {ratio:.2f}x "
                         "(target at most 0.6x)")
        else:
            notes.append(f"* {n} against plain, total: {ratio:.2f}x "
                         f"(Ray's overhead {100 * (ratio - 1):+.0f}%; target at most +15% for laptop)")
    for n, r in runs.items():
        if r.get("attempts"):
            notes.append(f"* {n}: distillation attempts " + " / ".join(f"{k} {v:.1f}" for k, v in r["attempts"].items())
                         + f" s; the phases stage outside them {r['stages']['phases'] - r['attempts_union']:.1f} s")
    if "two-node" in runs:
        notes.append(f"* two-node: the cluster's two nodes took {runs['two-node']['cluster_start']:.1f} s to start "
                     "(not in its column)")
    return "\n".join(lines + [""] + notes)


def ratios(runs: dict[str, dict]) -> dict[str, float]:
    """One round's ratios: each Ray variant's wall over ``plain``'s, and the laptop's phases stage over serial's."""
    out = {}
    if "plain" in runs:
        out.update({n: r["wall"] / runs["plain"]["wall"] for n, r in runs.items() if not n.startswith("plain")})
    if "laptop" in runs and "serial" in runs:
        out["phases"] = runs["laptop"]["stages"]["phases"] / runs["serial"]["stages"]["phases"]
    return out


def median_runs(rounds: list[dict[str, dict]]) -> dict[str, dict]:
    """Each variant's median wall and median per stage over the rounds (scores from its first round)."""
    out = {}
    for name in rounds[0]:
        runs = [r[name] for r in rounds]
        stages = {s for r in runs for s in r["stages"]}
        out[name] = {**runs[0], "wall": statistics.median(r["wall"] for r in runs),
                     "stages": {s: statistics.median(r["stages"].get(s, 0.0) for r in runs) for s in stages}}
        if "cluster_start" in runs[0]:
            out[name]["cluster_start"] = statistics.median(r["cluster_start"] for r in runs)
        if runs[0].get("attempts"):
            out[name]["attempts"] = {k: statistics.median(r["attempts"][k] for r in runs) for k in runs[0]["attempts"]}
            out[name]["attempts_union"] = statistics.median(r["attempts_union"] for r in runs)
    return out


def round_notes(rounds: list[dict[str, dict]]) -> list[str]:
    """A line per round with its ratios, and their medians."""
    per = [ratios(r) for r in rounds]
    fmt = lambda k, v: f"phases {v:.2f}x" if k == "phases" else f"{k} {100 * (v - 1):+.0f}%"  # noqa: E731
    lines = [f"* round {i + 1}: " + ", ".join(fmt(k, v) for k, v in r.items()) for i, r in enumerate(per)]
    med = {k: statistics.median(r[k] for r in per) for k in per[0]}
    lines.append("* median over the rounds: " + ", ".join(fmt(k, v) for k, v in med.items()))
    return lines


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default="configs/toy.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=VARIANTS)
    ap.add_argument("--rounds", type=int, default=1, help="run the variants N times, every other round reversed")
    ap.add_argument("--work", default="/tmp/ptmst-bench-scaling", help="run roots and logs (emptied first)")
    ap.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    ap.add_argument("--plain-child", nargs=3, metavar=("ROOT", "OUT", "THREADS"), help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.plain_child:
        root, out, threads = args.plain_child
        plain_child(args.config, args.overrides, root, out, int(threads))
        return

    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # so that a started cluster is stopped (finally)
    work = Path(args.work)
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    rounds: list[dict[str, dict]] = []
    load: dict[str, str] = {}
    t0 = time.perf_counter()
    for r in range(args.rounds):
        runs: dict[str, dict] = {}
        for name in (args.variants if r % 2 == 0 else args.variants[::-1]):
            tag = name if args.rounds == 1 else f"{name}-r{r + 1}"
            root, log = work / tag, work / f"{tag}.log"
            print(f"[{time.perf_counter() - t0:.0f}s] {tag}: running (log {log})", flush=True)
            if name.startswith("plain"):
                threads = 1 if name == "plain-1" else os.cpu_count() or 1
                runs[name] = run_plain(args.config, args.overrides, root, log, threads)
            elif name == "two-node":
                runs[name] = run_two_node(args.config, args.overrides, root, log)
            else:
                extra = ["distill.max_concurrent=1"] if name == "serial" else []
                runs[name] = run_cli(args.config, [*args.overrides, *extra], root, log, os.environ)
            load[name] = f"{os.getloadavg()[0]:.1f}"
            print(f"[{time.perf_counter() - t0:.0f}s] {tag}: {runs[name]['wall']:.1f}s", flush=True)
        rounds.append({n: runs[n] for n in args.variants})
    runs = rounds[0] if args.rounds == 1 else median_runs(rounds)
    table = report(runs, load)
    if args.rounds > 1:
        table = f"Medians over {args.rounds} rounds:\n\n{table}\n" + "\n".join(round_notes(rounds))
        (work / "rounds.json").write_text(json.dumps(rounds, indent=1))
    print(table)
    # runs.json: one run per variant (the medians over rounds), as model_scaling.py reads it
    (work / "runs.json").write_text(json.dumps(runs, indent=1))
    if not args.no_write:
        replace_section(HEADING, f"Command: `{command_line()}`; machine: {machine(load=True)}.\n\n{table}\n")


if __name__ == "__main__":
    main()
