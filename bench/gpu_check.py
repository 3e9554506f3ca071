"""Everything the first GPU should measure, in one command (issue #20 item 6).

Why this file exists: the project is developed on a CPU-only machine; the paper's recipes are meant for GPUs.
On a CUDA machine this script runs (1) the recipe-family end-to-end tests (tests/test_paper_recipes.py) and the
device-placement tests (tests/test_device_placement.py), with the test Ray given the machine's real GPU count,
and (2) the paper-scale figures of bench/bench_paper_scale.py (an expert step, first_order and exact matching
iterations at N = 8 and 32, graph vs parameter bytes) on CUDA at 112 and 224 px, then writes one RESULTS.md
section "GPU check on <device>" with the test outcomes, their times and the figures. Target: under 10 minutes
on one GPU.

``--smoke`` is its CPU fallback (what CI runs, via tests/test_gpu_check.py): the placement tests only and the
paper-scale cases at 32 px, N = 2, tiny batches, in this process; it exercises every line that the GPU run
uses except the CUDA device itself.

    .venv/bin/python bench/gpu_check.py                          # on a CUDA machine: everything, ~10 min
    .venv/bin/python bench/gpu_check.py --device cpu --smoke --no-write   # the CPU fallback, ~1 min
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_paper_scale as paper  # noqa: E402
from _common import RESULTS, command_line, machine, replace_section  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
FULL_TESTS = ["tests/test_paper_recipes.py", "tests/test_device_placement.py"]
SMOKE_TESTS = ["tests/test_device_placement.py"]


def default_device() -> str:
    import torch

    return "cuda" if torch.cuda.is_available() else "cpu"


def run_tests(paths: list[str], device: str) -> tuple[str, float, str]:
    """pytest on ``paths`` (slow tests included); returns (outcome line, seconds, tail of the output)."""
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    if device.startswith("cuda"):
        import torch

        env["PTMST_TEST_GPUS"] = str(torch.cuda.device_count())  # the test Ray gets the real GPUs
    t0 = time.time()
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *paths], cwd=REPO,
                          env=env, capture_output=True, text=True, check=False)
    lines = [ln for ln in proc.stdout.strip().splitlines() if ln.strip()]
    outcome = lines[-1] if lines else f"pytest exited {proc.returncode}"
    return outcome, time.time() - t0, "\n".join(lines[-15:])


def smoke_figures(device: str) -> tuple[list[dict], argparse.Namespace]:
    """The paper-scale cases at toy sizes, in this process."""
    args = argparse.Namespace(sizes=[32], steps=2, more_steps=[], iters=1, minibatch=4, expert_batch=8,
                              device=device)
    with tempfile.TemporaryDirectory() as tmp:
        bert = paper._bert(Path(tmp))
        rows = [paper.child(kind, 32, method, n, 1, device, args.minibatch, args.expert_batch, bert)
                for kind, method, n in (("expert", "-", 0), ("match", "first_order", 2), ("match", "exact", 2))]
    return rows, args


def full_figures(device: str) -> tuple[list[dict], argparse.Namespace]:
    """The paper-scale cases at 112 and 224 px, N = 8 and 32 (each case in a fresh process)."""
    args = argparse.Namespace(sizes=[112, 224], steps=8, more_steps=[32], iters=2, minibatch=paper.MINIBATCH,
                              expert_batch=paper.EXPERT_BATCH, device=device)
    return paper.measure(args), args


def main(argv: list[str] | None = None) -> str:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda (default when torch sees one) or cpu")
    p.add_argument("--smoke", action="store_true", help="the CPU fallback: placement tests, toy-size figures")
    p.add_argument("--no-tests", action="store_true", help="figures only")
    p.add_argument("--results", type=Path, default=RESULTS)
    p.add_argument("--no-write", action="store_true")
    args = p.parse_args(argv)
    device = args.device or default_device()
    if device.startswith("cuda") and default_device() != "cuda":
        raise SystemExit("--device cuda: torch sees no CUDA device here; use --device cpu --smoke")
    print(f"GPU check on {device}{' (smoke)' if args.smoke else ''}", flush=True)
    parts = []
    if not args.no_tests:
        tests = SMOKE_TESTS if args.smoke else FULL_TESTS
        outcome, seconds, tail = run_tests(tests, device)
        print(f"tests: {outcome} ({seconds:.0f} s)", flush=True)
        parts.append(f"Tests `{' '.join(tests)}`: **{outcome}** in {seconds:.0f} s.")
        if "failed" in outcome or "error" in outcome:
            parts.append("```\n" + tail + "\n```")
    t0 = time.time()
    rows, fig_args = smoke_figures(device) if args.smoke else full_figures(device)
    figures = paper.report(rows, fig_args)
    print(figures, flush=True)
    parts.append(f"Paper-scale figures ({time.time() - t0:.0f} s; sizes {fig_args.sizes} px, N = {fig_args.steps}"
                 f"{' and ' + ', '.join(map(str, fig_args.more_steps)) if fig_args.more_steps else ''}, matching "
                 f"minibatch {fig_args.minibatch}, expert batch {fig_args.expert_batch}):\n\n{figures}")
    body = f"Command: `{command_line()}`\n\nMachine: {machine(load=True)}, device {device}\n\n" + "\n\n".join(parts)
    if not args.no_write:
        replace_section(f"## GPU check on {device}{' (smoke)' if args.smoke else ''}", body, args.results)
    return body


if __name__ == "__main__":
    main()
