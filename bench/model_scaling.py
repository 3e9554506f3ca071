"""A model of a run's wall time on G workers (issue #23 item 3), checked against measured runs.

Part 1, the check: from bench_scaling.py's runs.json, the unit costs measured in ONE process on one thread
(variant ``plain-1``: each expert, each distillation run, each evaluation task, the serial stages) are scheduled
as the pipeline schedules them (experts on min(E, slots) actors, distillation runs ``distill.max_concurrent``
or slots at a time, evaluation tasks on the slots, the two pretraining runs side by side, the rest in turn),
each unit that runs beside another slowed by the side-by-side factor measured in the runs (laptop's
distillation attempts, the phase workers' own time, against plain-1's phases in its one warm process: a fresh
worker's cold start and the cores shared with Ray's and Train's processes), and the predicted stage times are
set beside the measured ones of the Ray variants. The difference is what the model leaves out: Ray's own costs
(process and Train start-up, scheduling).

Part 2, the paper's Flickr30k 500-pair recipe on G GPUs against the paper's scripts on one GPU, from
per-step costs: an expert step (batch 128) takes 128 / R seconds for a GPU that trains NFNet-L0 at 224 px at R
images/s (``--gpu-rate``, a published figure: say which in RESULTS), or longer when the worker's CPUs cannot
decode that fast (``--decode-rate`` caption rows/s per decoding CPU x ``--cpus-per-gpu``; the paper's scripts
hold pre-processed tensors and never wait on decoding); a matching iteration (N = 8, minibatch 40,
first_order) takes ``--iter-ratio`` expert steps (measured on this CPU at the paper's architecture: RESULTS
"Paper scale"); an evaluation student on 500 pairs for 100 epochs sees 50,000 images; ptmst-ray adds per-wave
overheads (the mean excess per wave that part 1 measured) and its start-up (``--start-up``).

    .venv/bin/python bench/model_scaling.py --runs /tmp/ptmst-bench-scaling/runs.json --gpu-rate R
        [--iter-ratio 13.7] [--decode-rate 150] [--cpus-per-gpu 8] [--sweep 1 4] [--gpus 1 2 4 8 20 40]
"""

from __future__ import annotations

import argparse
import heapq
import json
import math
from pathlib import Path


def makespan(durations: list[float], slots: int) -> float:
    """Wall time of ``durations`` started in order, each on the first free of ``slots`` workers."""
    free = [0.0] * max(1, min(slots, len(durations) or 1))
    for d in durations:
        heapq.heappush(free, heapq.heappop(free) + d)
    return max(free)


def unit_costs(calls: list[tuple[str, float]]) -> dict[str, list[float]]:
    """bench_scaling's plain calls grouped as the pipeline schedules them: one entry per expert (training and
    its shortcut), per distillation run, per evaluation task; the serial stages' sums."""
    out: dict[str, list[float]] = {"experts": [], "phases": [], "eval": [], "data": [], "pretrain": [], "embed": [],
                                   "features": [], "expert_lr": [], "aggregate": []}
    pending_expert = None
    for name, seconds in calls:
        if name == "experts":  # train_and_store_expert, then compress_expert, per expert
            if pending_expert is None:
                pending_expert = seconds
            else:
                out["experts"].append(pending_expert + seconds)
                pending_expert = None
        elif name.startswith("eval "):
            out["eval"].append(seconds)
        else:
            out[{"prepare": "data"}.get(name, name)].append(seconds)
    return out


def predict(units: dict[str, list[float]], slots: int, phase_slots: int, experts: int,
            side_by_side: float = 1.0) -> dict[str, float]:
    """Each stage's wall time: the units scheduled on the slots; a unit that runs beside another on the slots
    takes ``side_by_side`` times its time alone (workers sharing the machine's cores; 1 where each has its own
    device)."""
    at_once = lambda n, k=slots: side_by_side if min(k, n) > 1 else 1.0  # noqa: E731 - n units on k workers
    return {
        "data": sum(units["data"]),
        # two equal CLIP runs (separate towers; plain-1 may record them as one call), side by side
        "pretrain": max(sum(units["pretrain"]) / 2, 0.0) * at_once(2),
        "embed": sum(units["embed"]),
        "features": sum(units["features"]),
        # the learning-rate rule's probe experts, in one call in plain-1: taken as serial (an upper bound)
        "expert_lr": sum(units["expert_lr"]),
        "experts": makespan(units["experts"], min(slots, experts)) * at_once(experts),
        "phases": makespan(units["phases"], phase_slots) * at_once(len(units["phases"]), phase_slots),
        "aggregate": sum(units["aggregate"]),
        "eval": makespan(units["eval"], slots) * at_once(len(units["eval"])),
    }


def side_by_side_factor(runs: dict, alone: list[float]) -> float:
    """How much longer a distillation run takes in a Ray worker beside another than in plain-1's one warm process:
    laptop's attempts (the phase workers' own time, after their process and Train's start-up: a cold process, the
    cores shared with Ray's and Train's processes) against plain-1's phases ``alone``; 1.0 without attempt records."""
    attempts = list(runs.get("laptop", {}).get("attempts", {}).values())
    if len(attempts) < 2 or not alone:
        return 1.0
    return (sum(attempts) / len(attempts)) / (sum(alone) / len(alone))


def check(runs: dict, slots: int) -> tuple[str, float, float]:
    """Markdown table: predicted against measured stage times of each Ray variant (units beside each other
    slowed by the measured side-by-side factor); the mean per-wave excess of laptop over the model (Ray's start-up
    of the wave's processes); the factor."""
    units = unit_costs(runs["plain-1"]["calls"])
    experts = len(units["experts"])
    factor = side_by_side_factor(runs, units["phases"])
    lines = ["| stage | model, 2 slots s | " + " | ".join(f"{n} measured s" for n in runs if not n.startswith("plain"))
             + " |", "|---|---:|" + "---:|" * sum(not n.startswith("plain") for n in runs)]
    predicted = {n: predict(units, slots, 1 if n == "serial" else slots, experts, factor) for n in runs
                 if not n.startswith("plain")}
    base = predict(units, slots, slots, experts, factor)
    excess, waves = 0.0, 0
    for stage in base:
        cells = []
        for n in predicted:
            measured = runs[n]["stages"].get(stage, 0.0)
            cells.append(f"{measured:.1f} (model {predicted[n][stage]:.1f})" if n == "serial" else f"{measured:.1f}")
            if stage in ("experts", "phases", "eval") and n == "laptop":
                n_waves = math.ceil(len(units[stage]) / slots)
                excess += measured - predicted[n][stage]
                waves += n_waves
        lines.append(f"| {stage} | {base[stage]:.1f} | " + " | ".join(cells) + " |")
    start = {n: runs[n]["stages"].get("start-up", 0.0) for n in predicted}
    lines.append("| start-up (not modelled) | 0 | " + " | ".join(f"{start[n]:.1f}" for n in predicted) + " |")
    total_model = sum(base.values())
    lines.append(f"| **total** | **{total_model:.1f}** | " + " | ".join(f"**{runs[n]['wall']:.1f}**" for n in predicted)
                 + " |")
    return "\n".join(lines), (excess / waves if waves else 0.0), factor


def paper(args, wave_overhead: float) -> str:
    step = 128 / args.gpu_rate
    data_bound = 128 / (args.decode_rate * args.cpus_per_gpu)
    step_ray = max(step, data_bound)
    steps_per_epoch = math.ceil(args.captions / 128)
    expert_s = args.epochs * steps_per_epoch * step
    expert_ray = args.epochs * steps_per_epoch * step_ray
    iteration = args.iter_ratio * step
    phase_s = args.iterations * iteration
    eval_s = args.eval_images / args.gpu_rate
    lines = [f"Per unit: expert step {step * 1e3:.0f} ms on the GPU ({step_ray * 1e3:.0f} ms when its "
             f"{args.cpus_per_gpu} CPUs decode at {args.decode_rate:.0f} rows/s each), one expert "
             f"{expert_s / 3600:.2f} h ({expert_ray / 3600:.2f} h), one phase ({args.iterations} iterations) "
             f"{phase_s / 3600:.2f} h, one evaluation student {eval_s / 60:.1f} min.", "",
             "| sweep settings S | GPUs G | paper's scripts, 1 GPU h | ptmst-ray h | speed-up |",
             "|---:|---:|---:|---:|---:|"]
    tasks = args.seeds
    for s in args.sweep:
        runs = s * args.phases
        single = args.experts * expert_s + runs * phase_s + s * tasks * eval_s
        for g in args.gpus:
            ray_h = (args.start_up + math.ceil(args.experts / g) * (expert_ray + wave_overhead)
                     + math.ceil(runs / g) * (phase_s + wave_overhead)
                     + math.ceil(s * tasks / g) * (eval_s + wave_overhead))
            lines.append(f"| {s} | {g} | {single / 3600:.1f} | {ray_h / 3600:.2f} | {single / ray_h:.1f}x |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", required=True, help="bench_scaling.py's runs.json (with a plain-1 variant)")
    ap.add_argument("--slots", type=int, default=2, help="workers of the measured Ray runs (CPUs)")
    ap.add_argument("--gpu-rate", type=float, required=True, help="NFNet-L0 training images/s at 224 px on one GPU")
    ap.add_argument("--iter-ratio", type=float, default=13.7, help="matching iteration / expert step (batch 128)")
    ap.add_argument("--decode-rate", type=float, default=150.0, help="caption rows/s one CPU decodes at 224 px")
    ap.add_argument("--cpus-per-gpu", type=int, default=8)
    ap.add_argument("--experts", type=int, default=20)
    ap.add_argument("--epochs", type=int, default=10)
    ap.add_argument("--captions", type=int, default=145_000, help="Flickr30k's Karpathy train split")
    ap.add_argument("--phases", type=int, default=2)
    ap.add_argument("--iterations", type=int, default=2000)
    ap.add_argument("--seeds", type=int, default=5, help="evaluation students per setting")
    ap.add_argument("--eval-images", type=int, default=500 * 100, help="pairs x evaluation epochs")
    ap.add_argument("--start-up", type=float, default=60.0, help="ptmst-ray's fixed start-up at paper scale, s")
    ap.add_argument("--sweep", type=int, nargs="+", default=[1, 4])
    ap.add_argument("--gpus", type=int, nargs="+", default=[1, 2, 4, 8, 20, 40])
    args = ap.parse_args(argv)
    runs = json.loads(Path(args.runs).read_text())
    table, wave, factor = check(runs, args.slots)
    print("Check against the measured runs (model: plain-1's unit costs scheduled on the slots, units side by side "
          f"x {factor:.2f}: laptop's distillation attempts against plain-1's phases alone):\n")
    print(table)
    print(f"\nRay's excess per wave of experts/phases/evaluation tasks (laptop): {wave:.1f} s (each GPU worker has its "
          "own device in the paper model: no side-by-side factor there)\n")
    print(paper(args, max(0.0, wave)))  # a negative excess is noise of the measured runs, not a gain to extrapolate


if __name__ == "__main__":
    main()
