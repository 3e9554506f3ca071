"""Paper-scale cost: one expert step and one matching iteration on the paper's architecture (issue #20 item 5).

Why this file exists: bench_matching.py measures the gradient rules on the toy student, whose step graph is
small against its parameter vector; the paper's student (NFNet-L0 image tower, 35M parameters, a 768 -> 2304
text head) at minibatch 40 and N = 8 has a very different graph-to-parameter ratio, and that ratio decides
what ``exact`` costs (how many w_i its memory budget holds, how many steps it replays) and whether N = 32 is
affordable. This script measures, at the paper's settings and on the configured device:

* one expert training step (SGD, batch ``--expert-batch``, the paper's 128) of the trainable NFNet-L0 student;
* one matching iteration for ``first_order`` and ``exact`` (the phase default of held vectors,
  ``default_exact_checkpoints``) at N = 8 (and N = 32 at the smallest size): seconds, peak memory;
* one step graph's bytes (``matching.graph_bytes``) against one parameter vector's.

224 px on this CPU takes too long per case, so the default measures at two smaller sizes and reports the
scaling between them (convolution cost and activation memory grow with the pixel count; parameters do not).
Each case runs in a fresh subprocess. CPU memory: peak RSS over the pre-step RSS (VmHWM reset before the
step; glibc told to return freed blocks, as bench_matching.py does); CUDA: ``max_memory_allocated`` over the
allocated bytes before the step. Time: the median of ``--iters`` timed runs after one warm-up (wall clock;
CPU time too on the CPU).

    .venv/bin/python bench/bench_paper_scale.py                        # 32 and 64 px on this CPU, ~20 min
    .venv/bin/python bench/bench_paper_scale.py --device cuda --sizes 112 224
    .venv/bin/python bench/bench_paper_scale.py --quick --no-write     # seconds: a smoke run
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import RESULTS, command_line, machine, replace_section, status_kb  # noqa: E402

SECTION = "## Paper scale: expert step and matching iteration on NFNet-L0"
MODEL = "ptmst-nfnet_l0-bert"
TEXT_DIM, PAIRS, MINIBATCH, EXPERT_BATCH = 768, 100, 40, 128
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536", "MALLOC_TRIM_THRESHOLD_": "0", "MALLOC_ARENA_MAX": "1"}


# --------------------------------------------------------------------------- measurement (child)


def _student(bert_dir: str, device: str):
    import torch

    from ptmst_ray.config import ModelConfig
    from ptmst_ray.models.student import build_student

    torch.manual_seed(0)
    cfg = ModelConfig(name=MODEL, text_pretrained=bert_dir, image_trainable=True)  # the text tower is unused:
    return build_student(cfg, text_dim=TEXT_DIM, seed=0).to(device)  # the student reads caption embeddings


class _Meter:
    """Peak memory of one call over the memory before it, on the CPU (RSS) or CUDA (allocator)."""

    def __init__(self, device: str):
        import torch

        self.cuda = device.startswith("cuda")
        self.torch = torch

    def __enter__(self):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.torch.cuda.reset_peak_memory_stats()
            self.base = self.torch.cuda.memory_allocated()
        else:
            import gc

            gc.collect()
            self.base = status_kb("VmRSS") * 1024
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        self.t0, self.c0 = time.perf_counter(), time.process_time()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.torch.cuda.synchronize()
            self.peak = self.torch.cuda.max_memory_allocated() - self.base
        else:
            self.peak = status_kb("VmHWM") * 1024 - self.base
        self.seconds, self.cpu = time.perf_counter() - self.t0, time.process_time() - self.c0


def child(kind: str, size: int, method: str, steps: int, iters: int, device: str, minibatch: int,
          expert_batch: int, bert_dir: str, warmup: bool = True) -> dict:
    import torch

    from ptmst_ray.config import ExpertsConfig, SimilarityConfig
    from ptmst_ray.distill.matching import (
        MinibatchSampler, default_exact_checkpoints, graph_bytes, matching_step,
    )
    from ptmst_ray.distill.synthetic import SyntheticSet
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.losses import contrastive_loss
    from ptmst_ray.trajectories.expert import make_optimizer

    if not device.startswith("cuda"):
        torch.set_num_threads(int(os.environ.get("PTMST_BENCH_THREADS", "1")))
    student = _student(bert_dir, device)
    gen = torch.Generator().manual_seed(0)
    out: dict = {"kind": kind, "size": size, "method": method, "steps": steps, "device": device}
    if kind == "expert":
        optimizer = make_optimizer(student, ExpertsConfig())
        images = torch.randn(expert_batch, 3, size, size, generator=gen).to(device)
        text = torch.randn(expert_batch, TEXT_DIM, generator=gen).to(device)
        target = torch.eye(expert_batch, device=device)

        def run() -> None:
            logits = student(images, text)
            loss = contrastive_loss("InfoNCE", logits, target)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
        out["params"] = sum(p.numel() for p in student.parameters() if p.requires_grad)
    else:
        fs = FunctionalStudent(student.train())
        syn = SyntheticSet.from_noise(PAIRS, (3, size, size), TEXT_DIM, SimilarityConfig(), 0.1, gen, device=device)
        theta_s = tuple(v.detach() for v in fs.params())
        theta_t = tuple(v + 0.01 * torch.randn(v.shape, generator=gen).to(device) for v in theta_s)
        sampler = MinibatchSampler(PAIRS, minibatch, gen)
        out["params"] = sum(v.numel() for v in theta_s)
        out["vector_bytes"] = sum(v.numel() * v.element_size() for v in theta_s)
        out["graph_bytes"] = graph_bytes(fs.logits, "WBCE", syn, theta_s, minibatch)
        held = default_exact_checkpoints(fs.logits, "WBCE", syn, theta_s, minibatch, steps) if method == "exact" else None
        out["held"] = held if method == "exact" else 1

        def run() -> None:
            syn.zero_grad(set_to_none=True)
            matching_step(fs.logits, "WBCE", syn, theta_s, theta_t, steps, sampler, method=method, checkpoints=held)
    if warmup:
        run()  # warm-up: lazy initialisation, first allocations
    seconds, cpu, peaks = [], [], []
    for _ in range(iters):
        with _Meter(device) as m:
            run()
        seconds.append(m.seconds)
        cpu.append(m.cpu)
        peaks.append(m.peak)
    out.update(seconds=statistics.median(seconds), cpu_seconds=statistics.median(cpu),
               peak_bytes=statistics.median(peaks))
    return out


# --------------------------------------------------------------------------- driver (parent)


def _bert(folder: Path) -> str:
    """A tiny BERT folder: the paper model's text tower must load, but the student never runs it."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    from _tiny_models import make_tiny_bert

    return str(make_tiny_bert(folder / "bert"))


def spawn(args, kind: str, size: int, method: str, steps: int, bert_dir: str) -> dict:
    cmd = [sys.executable, __file__, "--child", kind, str(size), method, str(steps), "--iters", str(args.iters),
           "--device", args.device, "--minibatch", str(args.minibatch), "--expert-batch", str(args.expert_batch),
           "--bert", bert_dir, *(["--no-warmup"] if not getattr(args, "warmup", True) else [])]
    env = {**os.environ, **(MALLOC_ENV if args.device == "cpu" else {})}
    t0 = time.time()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{kind} {size}px {method} N={steps} failed:\n{proc.stderr[-3000:]}")
    row = json.loads(proc.stdout.strip().splitlines()[-1])
    print(f"  {kind:6s} {size:4d}px {method:11s} N={steps:<3d} {row['seconds']:8.2f} s "
          f"{row['peak_bytes'] / 2**20:9.1f} MiB  ({time.time() - t0:.0f} s with set-up)", flush=True)
    return row


def measure(args, on_row=None) -> list[dict]:
    """Every case in turn; ``on_row(rows, total)`` after each (the section is rewritten as cases finish)."""
    methods = getattr(args, "methods", ["expert", "first_order", "exact"])
    cases = [(kind, size, method, n) for size in args.sizes
             for kind, method, n in (("expert", "-", 0), ("match", "first_order", args.steps),
                                     ("match", "exact", args.steps)) if (method if kind == "match" else kind) in methods]
    cases += [("match", min(args.sizes), method, n) for n in args.more_steps for method in ("first_order", "exact")
              if method in methods]
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        bert_dir = _bert(Path(tmp))
        for case in cases:
            rows.append(spawn(args, *case, bert_dir))
            if on_row is not None:
                on_row(rows, len(cases))
    return rows


def report(rows: list[dict], args) -> str:
    mib = lambda b: f"{b / 2**20:.0f}"  # noqa: E731
    lines = ["| case | size px | N | w_i held | s | CPU s | peak MiB | graph MiB / vector MiB |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        name = "expert step (batch %d)" % args.expert_batch if r["kind"] == "expert" else f"matching, {r['method']}"
        ratio = (f"{mib(r['graph_bytes'])} / {mib(r['vector_bytes'])} = {r['graph_bytes'] / r['vector_bytes']:.1f}"
                 if "graph_bytes" in r else "")
        lines.append(f"| {name} | {r['size']} | {r['steps'] or ''} | {r.get('held', '') if r['kind'] == 'match' else ''} "
                     f"| {r['seconds']:.2f} | {r['cpu_seconds']:.2f} | {mib(r['peak_bytes'])} | {ratio} |")
    by = {(r["kind"], r["size"], r["method"], r["steps"]): r for r in rows}
    notes = []
    for n in sorted({r["steps"] for r in rows if r["kind"] == "match"}):
        for size in sorted({r["size"] for r in rows}):
            fo, ex = by.get(("match", size, "first_order", n)), by.get(("match", size, "exact", n))
            if fo and ex:
                notes.append(f"* N = {n}, {size} px: exact / first_order time {ex['seconds'] / fo['seconds']:.2f} "
                             f"(CPU time {ex['cpu_seconds'] / max(fo['cpu_seconds'], 1e-9):.2f}), "
                             f"memory {ex['peak_bytes'] / max(fo['peak_bytes'], 1):.2f} (exact holds {ex['held']} w_i)")
    sizes = sorted({r["size"] for r in rows})
    if len(sizes) >= 2:
        a, b = sizes[0], sizes[-1]
        for key, label in ((("expert", "-", 0), "expert step"), (("match", "first_order", args.steps), "first_order"),
                           (("match", "exact", args.steps), "exact")):
            ra, rb = by.get((key[0], a, key[1], key[2])), by.get((key[0], b, key[1], key[2]))
            if ra and rb:
                pixels = (b / a) ** 2
                t_scale = rb["seconds"] / ra["seconds"]
                notes.append(f"* {label}, {a} -> {b} px ({pixels:.1f}x pixels): time x{t_scale:.2f}, memory "
                             f"x{rb['peak_bytes'] / max(ra['peak_bytes'], 1):.2f}; at 224 px by the same power law: "
                             f"~{rb['seconds'] * (224 / b) ** (2 * _power(t_scale, pixels)):.0f} s")
    return "\n".join(lines) + "\n\n" + "\n".join(notes)


def _power(scale: float, pixels: float) -> float:
    """The exponent p with scale = pixels ** p (time grows like the pixel count to that power)."""
    import math

    return math.log(scale) / math.log(pixels) if scale > 0 and pixels > 1 else 1.0


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--child", nargs=4, metavar=("KIND", "SIZE", "METHOD", "N"))
    p.add_argument("--device", default="cpu")
    p.add_argument("--sizes", type=int, nargs="+", default=[32, 64])
    p.add_argument("--steps", type=int, default=8, help="N of the main cases (the paper's 8)")
    p.add_argument("--more-steps", type=int, nargs="*", default=[32], help="further N, at the smallest size")
    p.add_argument("--iters", type=int, default=2)
    p.add_argument("--minibatch", type=int, default=MINIBATCH)
    p.add_argument("--expert-batch", type=int, default=EXPERT_BATCH)
    p.add_argument("--bert", default="")
    p.add_argument("--no-warmup", dest="warmup", action="store_false",
                   help="measure the first run (for cases of many minutes; memory then includes first allocations)")
    p.add_argument("--methods", nargs="+", default=["expert", "first_order", "exact"],
                   help="the cases to run: expert, first_order, exact")
    p.add_argument("--quick", action="store_true", help="a smoke run: 32 px, N = 2, minibatch 4, batch 8")
    p.add_argument("--no-write", action="store_true")
    p.add_argument("--results", type=Path, default=RESULTS)
    args = p.parse_args()
    if args.child:
        kind, size, method, n = args.child
        print(json.dumps(child(kind, int(size), method, int(n), args.iters, args.device, args.minibatch,
                               args.expert_batch, args.bert, args.warmup)))
        return
    if args.quick:
        args.sizes, args.steps, args.more_steps, args.iters, args.minibatch, args.expert_batch = [32], 2, [], 1, 4, 8
    print(f"paper-scale cost on {args.device}: sizes {args.sizes}, N={args.steps} (+{args.more_steps})", flush=True)
    def partial(rows: list[dict], total: int) -> None:
        if not args.no_write and len(rows) < total:
            write(report(rows, args) + f"\n\n(partial: {len(rows)} of {total} cases measured so far)", args,
                  args.results)

    rows = measure(args, partial)
    body = report(rows, args)
    print(body)
    if not args.no_write:
        write(body, args, args.results)


def write(body: str, args, path: Path, heading: str = SECTION) -> None:
    text = (f"Command: `{command_line()}`\n\nMachine: {machine(load=True)}, device {args.device}\n\n"
            f"NFNet-L0 student (trainable tower, {MODEL}), text embeddings {TEXT_DIM}-d, synthetic set of {PAIRS} "
            f"pairs, matching minibatch {args.minibatch}, WBCE; expert step: SGD on InfoNCE. Each case in a fresh "
            f"process, {'one warm-up, ' if getattr(args, 'warmup', True) else 'no warm-up, '}median of {args.iters}."
            f"\n\n{body}")
    replace_section(heading, text, path)


if __name__ == "__main__":
    main()
