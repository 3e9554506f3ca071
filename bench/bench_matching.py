"""Peak memory and time of one matching iteration vs the number of unrolled steps N.

Why this file exists: the point of the ``first_order`` and ``exact`` gradient rules
(docs/method.md#gradient-rules) is memory that does not grow with N (one graph at a time), while the
``unrolled`` reference keeps N graphs. ``first_order`` holds only w_0 and the current w_i (it
replays the unroll); ``exact`` holds, as a phase does by default, the w_i that fit in 10% of one
step's graph memory, at least ``exact_checkpoints(N)`` (whose schedule replays fewer than N steps;
6 at N = 32). This script checks the memory claim, and the cost of ``exact`` relative to
``first_order``, on the toy student (tiny ViT, 32x32 images).

Every (method, N) runs in two fresh subprocesses so that allocator state from one
measurement does not leak into the next. Memory: one warm-up iteration, then for each
measured iteration the kernel's high-water mark is reset (``echo 5 > /proc/self/clear_refs``)
and the peak RSS (VmHWM) is read after the iteration; the figure reported is that peak minus
the RSS right before the iteration. glibc is told to mmap large blocks
(MALLOC_MMAP_THRESHOLD_) and trim eagerly, so freed tensors return to the OS and RSS tracks
live memory. Time comes from the second subprocess with glibc's default allocator: the
settings above make every tensor allocation an mmap with fresh page faults, which triples
the time per iteration. Time is read both as wall clock and as the process's CPU time; the
student runs on one thread, so on a quiet machine the two agree, and on a shared one the CPU
time is the steadier measure of cost (the time target is judged on it).

    .venv/bin/python bench/bench_matching.py            # N = 2 4 8 16 32, ~6 minutes
    .venv/bin/python bench/bench_matching.py --quick    # N = 2 8 32
    .venv/bin/python bench/bench_matching.py --profile exact --steps 8   # where the time goes
    .venv/bin/python bench/bench_matching.py --steps 2 32 --methods first_order exact \
        --checkpoints 5 --no-write                      # exact's memory/time trade-off
    .venv/bin/python bench/bench_matching.py --steps 32 --interleave 0 5 32   # time ratios in one process
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from _common import command_line, machine, replace_section, status_kb  # noqa: E402
SECTION = "## Matching step: memory and time vs N"
from ptmst_ray.vocab import GRAD_METHODS as METHODS  # noqa: E402
STEPS = (2, 4, 8, 16, 32)
QUICK_STEPS = (2, 8, 32)
PAIRS, MINIBATCH, TEXT_DIM, IMAGE_SIZE = 50, 10, 64, 32
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}
RESULTS_INTRO = """# Benchmark results

Measurements behind ptmst_ray's design claims and the toy recipe. Every section gives the exact
command (run from the repository root), the machine (`nproc`, CPU model from /proc/cpuinfo,
RAM, torch version) and the date, so that a figure can be reproduced or re-measured.
"""


# --------------------------------------------------------------------------- measurement (child)


def _reset_hwm() -> None:
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _setup(method: str, steps: int, checkpoints: int | None = None, minibatch: int = MINIBATCH,
           keep_graphs: bool = False):
    """Toy student, noise synthetic set, theta_s = the student's params, theta_t a perturbed copy."""
    import torch

    from ptmst_ray.config import ModelConfig, SimilarityConfig
    from ptmst_ray.distill.matching import MinibatchSampler, default_exact_checkpoints, matching_step
    from ptmst_ray.distill.synthetic import SyntheticSet
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student

    torch.set_num_threads(1)
    torch.manual_seed(0)
    student = FunctionalStudent(build_student(ModelConfig(), text_dim=TEXT_DIM, seed=0))
    gen = torch.Generator().manual_seed(0)
    syn = SyntheticSet.from_noise(PAIRS, (3, IMAGE_SIZE, IMAGE_SIZE), TEXT_DIM, SimilarityConfig(), 0.1, gen)
    theta_s = student.params()
    theta_t = tuple(v + 0.01 * torch.randn(v.shape, generator=gen) for v in theta_s)
    sampler = MinibatchSampler(PAIRS, minibatch, gen)
    if method == "exact" and checkpoints is None:  # the phase loop's default: the memory budget
        checkpoints = default_exact_checkpoints(student.logits, "WBCE", syn, theta_s, minibatch, steps)

    def iteration() -> dict:
        syn.zero_grad(set_to_none=True)
        return matching_step(student.logits, "WBCE", syn, theta_s, theta_t, steps, sampler, method=method,
                             checkpoints=checkpoints, keep_graphs=keep_graphs)

    return iteration, sum(v.numel() for v in theta_s), checkpoints


DEFAULT_HELD = ("the phase default, `default_exact_checkpoints`: the w_i that fit in 10% of one step's graph, "
                "at least `exact_checkpoints(N)`")


def run_one(method: str, steps: int, iters: int, checkpoints: int | None = None, minibatch: int = MINIBATCH) -> dict:
    """Warm-up, then ``iters`` timed iterations; peak RSS above the pre-iteration RSS (MB)."""
    import gc

    from ptmst_ray.distill.matching import _reversal_plan

    iteration, params, checkpoints = _setup(method, steps, checkpoints, minibatch)
    iteration()  # warm-up: lazy initialisation, first allocations
    times, cpu, peaks, residue = [], [], [], []
    for _ in range(iters):
        gc.collect()
        base = status_kb("VmRSS")
        _reset_hwm()
        t0, c0 = time.perf_counter(), time.process_time()
        out = iteration()
        times.append(time.perf_counter() - t0)
        cpu.append(time.process_time() - c0)
        peaks.append((status_kb("VmHWM") - base) / 1024)
        gc.collect()
        residue.append((status_kb("VmRSS") - base) / 1024)
    held = checkpoints if method == "exact" else 1
    replayed = _reversal_plan(steps, held, True)[0] if method == "exact" else 0
    return {"method": method, "steps": steps, "params": params, "replayed": replayed, "times": times, "cpu_times": cpu,
            "peaks_mb": peaks, "residue_mb": residue, "s_per_iter": statistics.median(times),
            "cpu_s_per_iter": statistics.median(cpu), "peak_mb": statistics.median(peaks), "loss": out["loss"],
            "held": {"first_order": 1, "exact": held, "unrolled": steps}[method]}


def profile_one(method: str, steps: int) -> None:
    """Top operators of one iteration (after a warm-up) by self CPU time."""
    from torch.profiler import ProfilerActivity, profile

    iteration = _setup(method, steps)[0]
    iteration()
    with profile(activities=[ProfilerActivity.CPU]) as prof:
        iteration()
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=20))


def interleaved(steps: int, ks: list[int], rounds: int, minibatch: int = MINIBATCH) -> str:
    """first_order (replaying its steps, the constant-memory default of `matching_step`, and keeping its N
    graphs, `distill.keep_graphs`) and exact at each k (0 = the default schedule) in ONE process, one iteration
    of each in turn for ``rounds`` rounds: load drift on a shared machine hits every method alike. Median CPU
    time."""
    cases = {"first_order": _setup("first_order", steps, minibatch=minibatch)[0],
             "first_order, keep_graphs": _setup("first_order", steps, minibatch=minibatch, keep_graphs=True)[0]}
    for k in ks:
        iteration, _, held = _setup("exact", steps, k or None, minibatch)
        cases[f"exact, exact_checkpoints={k or f'default ({held})'}"] = iteration
    for iteration in cases.values():
        iteration()  # warm-up
    cpu: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, iteration in cases.items():
            c0 = time.process_time()
            iteration()
            cpu[name].append(time.process_time() - c0)
    base = statistics.median(cpu["first_order"])
    lines = [f"| N={steps}, one process, {rounds} rounds | median CPU s/iter | vs first_order | min..max s |",
             "|---|---:|---:|---:|"]
    lines += [f"| {name} | {statistics.median(t):.3f} | {statistics.median(t) / base:.2f} | "
              f"{min(t):.2f}..{max(t):.2f} |" for name, t in cpu.items()]
    return "\n".join(lines)


# --------------------------------------------------------------------------- driver (parent)


def spawn(method: str, steps: int, iters: int, checkpoints: int | None = None, minibatch: int = MINIBATCH) -> dict:
    """Memory from a child with the eager-trim allocator, time from a child with the default one."""
    cmd = [sys.executable, __file__, "--child", method, str(steps), "--iters", str(iters), "--minibatch", str(minibatch)]
    if checkpoints is not None:
        cmd += ["--checkpoints", str(checkpoints)]
    rows = []
    for env in ({**os.environ, **MALLOC_ENV}, {k: v for k, v in os.environ.items() if k not in MALLOC_ENV}):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
        if proc.returncode != 0:
            raise RuntimeError(f"{method} N={steps} failed:\n{proc.stderr[-3000:]}")
        rows.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    memory, timing = rows
    return {**memory, **{k: timing[k] for k in ("times", "cpu_times", "s_per_iter", "cpu_s_per_iter")}}


def table(rows: list[dict]) -> str:
    by = {(r["method"], r["steps"]): r for r in rows}
    lines = ["| N | method | w_i held | s/iter (wall) | CPU s/iter | peak MiB over baseline | memory vs N=2 "
             "| exact/first_order CPU time (wall) |",
             "|---:|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        first = by.get((r["method"], min(s for m, s in by if m == r["method"])))
        mem_ratio = r["peak_mb"] / first["peak_mb"] if first and first["peak_mb"] > 0 else float("nan")
        ratio = ""
        if r["method"] == "exact" and ("first_order", r["steps"]) in by:
            fo = by[("first_order", r["steps"])]
            ratio = f"{r['cpu_s_per_iter'] / fo['cpu_s_per_iter']:.2f} ({r['s_per_iter'] / fo['s_per_iter']:.2f})"
        lines.append(f"| {r['steps']} | {r['method']} | {r['held']} | {r['s_per_iter']:.3f} | "
                     f"{r['cpu_s_per_iter']:.3f} | {r['peak_mb']:.1f} | {mem_ratio:.2f} | {ratio} |")
    return "\n".join(lines)


def verdict(rows: list[dict], mem_tol: float = 0.10, time_tol: float = 1.3) -> str:
    """The issue's targets, checked on ``rows``, plus the memory growth per extra step vs one parameter vector."""
    by = {(r["method"], r["steps"]): r for r in rows}
    steps = sorted({r["steps"] for r in rows})
    lines = []
    for method in ("first_order", "exact"):
        have = [n for n in steps if (method, n) in by]
        if len(have) < 2:
            continue
        lo, hi = by[(method, have[0])], by[(method, have[-1])]
        worst = max(by[(method, n)]["peak_mb"] / lo["peak_mb"] for n in have)
        over = [n for n in have if by[(method, n)]["peak_mb"] > (1 + mem_tol) * lo["peak_mb"]]
        slope = (hi["peak_mb"] - lo["peak_mb"]) / (hi["steps"] - lo["steps"])
        lines.append(f"* {method}: memory within {mem_tol:.0%} of N={have[0]}: "
                     f"{'MET' if not over else 'NOT MET (N = ' + ', '.join(map(str, over)) + ')'}; worst ratio "
                     f"{worst:.2f}; growth {slope:.3f} MiB per extra step (one parameter vector is "
                     f"{lo['params'] * 4 / 2**20:.3f} MiB"
                     + ("; i.e. the stored unroll iterates w_0..w_N)" if 0.7 < slope / (lo["params"] * 4 / 2**20) < 1.3
                        else ")"))
    if any(m == "unrolled" for m, _ in by):
        have = [n for n in steps if ("unrolled", n) in by]
        lines.append(f"* unrolled: memory grows {by[('unrolled', have[-1])]['peak_mb'] / by[('unrolled', have[0])]['peak_mb']:.1f}x "
                     f"from N={have[0]} to N={have[-1]}")
    both = [n for n in steps if ("exact", n) in by and ("first_order", n) in by]
    cpu = [by[("exact", n)]["cpu_s_per_iter"] / by[("first_order", n)]["cpu_s_per_iter"] for n in both]
    wall = [by[("exact", n)]["s_per_iter"] / by[("first_order", n)]["s_per_iter"] for n in both]
    if cpu:
        over = [n for n, r in zip(both, cpu) if r > time_tol]
        lines.append(f"* exact time <= {time_tol}x first_order (CPU time): "
                     f"{'MET' if not over else 'NOT MET (N = ' + ', '.join(map(str, over)) + ')'} "
                     f"(ratio {min(cpu):.2f} to {max(cpu):.2f}; wall clock {min(wall):.2f} to {max(wall):.2f})")
    return "\n".join(lines)


def tradeoff(rows: list[dict], pairs: list[tuple[dict, dict]], mem_tol: float = 0.10, time_tol: float = 1.3) -> str:
    """exact at one N for several ``distill.exact_checkpoints`` values: memory vs exact's smallest N in ``rows``,
    CPU time vs the ``first_order`` run measured right before each (``pairs``: (first_order, exact))."""
    base = min((r for r in rows if r["method"] == "exact"), key=lambda r: r["steps"])
    lines = [f"| exact_checkpoints | w_i held | replayed steps | CPU s/iter | first_order CPU s/iter "
             f"| exact/first_order CPU (wall) | peak MiB | memory vs N={base['steps']} "
             f"| memory <= {1 + mem_tol:.2f} | time <= {time_tol} |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---|---|"]
    for fo, ex in pairs:
        mem, cpu = ex["peak_mb"] / base["peak_mb"], ex["cpu_s_per_iter"] / fo["cpu_s_per_iter"]
        label = ex["label"]
        lines.append(f"| {label} | {ex['held']} | {ex['replayed']} | {ex['cpu_s_per_iter']:.3f} | "
                     f"{fo['cpu_s_per_iter']:.3f} | {cpu:.2f} ({ex['s_per_iter'] / fo['s_per_iter']:.2f}) | "
                     f"{ex['peak_mb']:.1f} | {mem:.2f} | {'MET' if mem <= 1 + mem_tol else 'NOT MET'} | "
                     f"{'MET' if cpu <= time_tol else 'NOT MET'} |")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--quick", action="store_true", help=f"N in {QUICK_STEPS} instead of {STEPS}")
    p.add_argument("--steps", type=int, nargs="+", help="explicit list of N")
    p.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    p.add_argument("--iters", type=int, default=3, help="timed iterations after one warm-up (median reported)")
    p.add_argument("--no-write", action="store_true", help="print the section instead of writing RESULTS.md")
    p.add_argument("--checkpoints", type=int, help="w_i exact may hold besides w_0, at every N (default exact_checkpoints(N))")
    p.add_argument("--tradeoff", type=int, nargs="*", default=[1, 5, 0],
                   help="then exact at the largest N with these exact_checkpoints values (0 = N: keep every w_i), "
                        "each timed against a fresh first_order run; none to skip")
    p.add_argument("--interleave", type=int, nargs="+", metavar="K",
                   help="instead: time first_order and exact at these exact_checkpoints (0 = default) in one "
                        "process, round-robin, at the first --steps value (prints a table, writes nothing)")
    p.add_argument("--rounds", type=int, default=7, help="rounds for --interleave")
    p.add_argument("--minibatch", type=int, default=MINIBATCH,
                   help=f"synthetic pairs per inner step (default {MINIBATCH}, the toy recipe's; the paper's: 20, 40)")
    p.add_argument("--child", nargs=2, metavar=("METHOD", "N"), help=argparse.SUPPRESS)
    p.add_argument("--profile", choices=METHODS, help="profile one iteration of this method (first --steps value)")
    args = p.parse_args()
    if args.child:
        print(json.dumps(run_one(args.child[0], int(args.child[1]), args.iters, args.checkpoints, args.minibatch)))
        return
    steps = args.steps or (QUICK_STEPS if args.quick else STEPS)
    if args.profile:
        profile_one(args.profile, steps[0])
        return
    if args.interleave:
        print(f"Command: `{command_line()}`\n\nMachine: {machine(load=True)}\n\n"
              + interleaved(steps[0], args.interleave, args.rounds, args.minibatch))
        return
    rows, t0 = [], time.perf_counter()
    for n in steps:
        for method in args.methods:
            r = spawn(method, n, args.iters, args.checkpoints, args.minibatch)
            print(f"N={n:3d} {method:12s} {r['s_per_iter']:.3f} s/iter (CPU {r['cpu_s_per_iter']:.3f})  "
                  f"peak {r['peak_mb']:7.1f} MiB "
                  f"(iters {[round(x, 1) for x in r['peaks_mb']]}, residue {[round(x, 1) for x in r['residue_mb']]})",
                  flush=True)
            rows.append(r)
    rows.sort(key=lambda r: (r["steps"], METHODS.index(r["method"])))
    md = table(rows) + "\n\nTargets (computed by the script):\n\n" + verdict(rows)
    n_max, pairs = max(steps), []
    if args.tradeoff and "exact" in args.methods:
        default = next(r for r in rows if r["method"] == "exact" and r["steps"] == n_max)
        fo_default = next((r for r in rows if r["method"] == "first_order" and r["steps"] == n_max), None)
        if fo_default is not None:
            pairs.append((fo_default, {**default, "label": f"default ({default['held']})"}))
        for k in args.tradeoff:
            fo = spawn("first_order", n_max, args.iters, minibatch=args.minibatch)
            ex = spawn("exact", n_max, args.iters, k or n_max, args.minibatch)
            print(f"N={n_max} exact_checkpoints={k or n_max}: CPU {ex['cpu_s_per_iter']:.3f} vs first_order "
                  f"{fo['cpu_s_per_iter']:.3f}, peak {ex['peak_mb']:.1f} MiB", flush=True)
            pairs.append((fo, {**ex, "label": str(k or n_max) + (" (= N)" if not k else "")}))
        pairs.sort(key=lambda pair: pair[1]["held"])
        md += (f"\n\nTrade-off at N={n_max}: `distill.exact_checkpoints` (the default row is the table's; each other "
               "row is timed against a first_order run made right before it):\n\n" + tradeoff(rows, pairs))
    print(md)
    print(f"total {time.perf_counter() - t0:.0f} s")
    params = rows[0]["params"]
    body = (f"Command: `{command_line()}`\n\n"
            f"Machine: {machine(load=True)} (load average read at the end of the run)\n\n"
            f"Setup: toy student (`build_student(ModelConfig(), text_dim={TEXT_DIM}, seed=0)`, "
            f"{params} trainable parameters), {PAIRS} noise pairs of 3x{IMAGE_SIZE}x{IMAGE_SIZE}, "
            f"minibatch {args.minibatch}, WBCE, full similarity, float32, one thread. Each row is a fresh "
            f"subprocess: one warm-up iteration, then the median of {args.iters} timed iterations; "
            "memory is the peak RSS (VmHWM after `clear_refs`) above the RSS right before the iteration, "
            f"with glibc set to mmap and trim eagerly ({' '.join(f'{k}={v}' for k, v in MALLOC_ENV.items())}; "
            "without these glibc keeps the warm-up's freed memory and the figure reads close to 0). "
            "Time: a second subprocess per row with glibc's default allocator (the settings above make "
            "every tensor allocation an mmap with fresh page faults and triple the time), wall clock and "
            "the process's CPU time (one thread, so they agree on a quiet machine; the time target is "
            "judged on CPU time, which other processes on a shared machine disturb less). \"w_i held\": "
            "parameter vectors alive at once besides w_0 = theta_s (`exact`: "
            f"{DEFAULT_HELD if args.checkpoints is None else args.checkpoints}; "
            "`unrolled`: its graph keeps w_0..w_N-1).\n\n"
            f"{md}\n")
    if args.no_write:
        print(f"\n{SECTION}\n\n{body}")
    else:
        replace_section(SECTION, body, intro=RESULTS_INTRO)

if __name__ == "__main__":
    main()
