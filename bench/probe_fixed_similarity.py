"""Diagnostic: a random coreset trained with a FIXED soft target S = (1 + c) I - c (J - I).

Why this file exists: a learned similarity lifts PTM-ST well above the random coreset on the toy,
and the learned S ends with a slightly negative off-diagonal. This checks whether that shape alone
(applied to real pairs, no learning) explains the gain; RESULTS.md "Toy recipe quality and evaluation baselines" records
that it does not (recall falls as c grows).

    .venv/bin/python bench/probe_fixed_similarity.py --root R [--seeds 5] [--c 0 0.02 0.03] [--lr 0.01]

R is a run root of bench/bench_quality_probe.py (or `ptmst-ray run`) whose data is prepared.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics

import torch


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--c", type=float, nargs="+", default=[0.0, 0.02, 0.03, 0.05])
    ap.add_argument("--lr", type=float, default=None, help="student step size (default: eval.lr)")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from ptmst_ray.config import load_config
    from ptmst_ray.stages import score as scoring

    cfg = load_config(f"{args.root}/config.yaml", [])
    lr = args.lr if args.lr is not None else cfg.eval.lr
    print("| c (off-diagonal -c) | random coreset r_mean (best of points) |\n|---:|---:|")
    for c in args.c:
        scores = []
        for seed in range(args.seeds):
            subsets = []
            for sub in scoring.method_subsets(cfg, "random", seed):
                n = len(sub)
                target = (1.0 + c) * torch.eye(n) - c * torch.ones(n, n)
                subsets.append(dataclasses.replace(sub, similarity=target, lr_img=lr, lr_txt=lr))
            scores.append(scoring.score_one_seed(cfg, "random", seed, subsets=subsets)["best"]["r_mean"])
        print(f"| {c} | {statistics.mean(scores):.1f} ± {statistics.pstdev(scores):.1f} |", flush=True)


if __name__ == "__main__":
    main()
