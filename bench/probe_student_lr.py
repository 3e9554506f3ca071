"""Diagnostic: a stored set scored with its students' step sizes scaled by a factor.

Why this file exists: the evaluation trains each student on a distilled subset at the step sizes the phase learned
(alpha_img, alpha_txt; the paper's protocol), and a real-pair coreset at `eval.lr`. Whether those step sizes are
near the best the subset allows, or leave recall on the table for one method more than another, is a question
about the protocol, not the set. This scores a cell's method at alpha x f for each factor f, every seed as the
benchmark's evaluation does, and prints the val mean (each student's best val point) and the val-selected test
r_mean.

    .venv/bin/python bench/probe_student_lr.py --cell R/cells/b50/ptm_st --factors 0.25 0.5 1 2 [--method random]

A cell is a run root of bench/bench_quality.py (or `ptmst-ray run`) whose distilled set is stored; `--method
random` scales `eval.lr` of the cell's random coreset instead.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", required=True, help="run root whose distilled set is scored")
    ap.add_argument("--method", default="ptm_st", choices=["ptm_st", "random"],
                    help="ptm_st: the root's distilled set (a single_phase cell's is its one subset)")
    ap.add_argument("--factors", type=float, nargs="+", default=[0.5, 1.0, 2.0])
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)

    import torch

    from ptmst_ray.config import load_config
    from ptmst_ray.evaluate.protocol import _lr
    from ptmst_ray.stages import score as scoring

    torch.set_num_threads(args.threads)
    cfg = load_config(f"{args.cell}/config.yaml", [])
    # each seed's subsets once (a random coreset differs by seed), with the step sizes the protocol would use
    by_seed = {seed: scoring.method_subsets(cfg, args.method, seed) for seed in range(args.seeds)}
    lrs = {seed: [(_lr(s.lr_img, cfg.eval), _lr(s.lr_txt, cfg.eval)) for s in subs] for seed, subs in by_seed.items()}
    print(f"{args.cell}: {args.method}, {args.seeds} seeds")
    print("| factor | step sizes (img / txt, per subset) | val r_mean | test r_mean (val-selected) |\n|---:|---|---:|---:|")
    for f in args.factors:
        vals, tests = [], []
        steps = ", ".join(f"{a * f:.2g} / {b * f:.2g}" for a, b in lrs[0])
        for seed, subs in by_seed.items():
            subsets = [dataclasses.replace(s, lr_img=a * f, lr_txt=b * f) for s, (a, b) in zip(subs, lrs[seed])]
            out = scoring.score_one_seed(cfg, args.method, seed, subsets=subsets)
            vals.append(out["best_val"]["r_mean"])
            tests.append(out["best"]["r_mean"])
        print(f"| {f:g} | {steps} | {statistics.mean(vals):.2f} | {statistics.mean(tests):.2f} ± "
              f"{statistics.pstdev(tests):.2f} |", flush=True)


if __name__ == "__main__":
    main()
