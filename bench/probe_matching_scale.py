"""Diagnostic: how far the synthetic student's unroll gets towards the expert's target, per tower and step size.

Why this file exists: on `scenes` the matching loss of every phase stays near its start (M = M_img +
M_txt, each 1 where the student gets no closer to the target than where it started). This measures,
without training anything, for one phase of a distilled cell: the expert's displacement over
`distill.expert_epochs` (||theta_t - theta_s||), the synthetic unroll's (||w_N - theta_s||, N =
`distill.syn_steps` steps on the phase's minibatches) and the cosine between them, per tower, and the
matching loss the unroll reaches at each given step size alpha (the same for both towers). It also gives
the best alpha of the linear picture, alpha* = <theta_t - theta_s, -G> / ||G||^2 (G: the sum of the N
gradients at the smallest alpha), where M_tower = 1 - cos^2 (the floor a step size alone can reach), so it
tells apart "the steps are too short" (alpha* far above alpha, cosine high) from "the steps point the
wrong way" (cosine near 0: no step size helps; the data must change).

    .venv/bin/python bench/probe_matching_scale.py --cell ROOT/cells/b50/ptm_st [--phase phase0]
        [--state init|distilled] [--alphas 0.01 0.03 0.1 0.3 1] [--draws 8] [--threads 1]
        [--pairs 2000 --minibatch 64 --steps 31]   # a real reference: the expert's own batches

ROOT/cells/... is a cell of bench/bench_quality.py (its config.yaml and the shared prerequisites); the
`init` state is the phase's own initial set (same seed as the phase), `distilled` its saved subset.
Prints one table per tower (mean over draws of (expert, start epoch)) and the per-draw linear optimum.
"""

from __future__ import annotations

import argparse
import statistics

import torch


def load_synthetic(cfg, name: str, state: str, device, pairs: int | None = None):
    """The phase's synthetic set: its initial one (seeded as the phase, at the recipe's starting step sizes; ``pairs``
    real pairs instead of the phase's, e.g. a large real reference) or its saved (distilled) subset with its learned
    step sizes."""
    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.distill.similarity import FullSimilarity
    from ptmst_ray.distill.synthetic import SyntheticSet
    from ptmst_ray.layout import Layout, phase_jobs
    from ptmst_ray.stages.embed import load_real

    job = next(j for j in phase_jobs(cfg, with_baseline=False) if j.name == name)
    if state == "distilled":
        sub = load_subset(Layout.of(cfg).subset(name))
        sim = FullSimilarity(sub.images.shape[0], dtype=sub.images.dtype)
        sim.sim.data.copy_(sub.similarity.to(sub.images.dtype))
        return job, SyntheticSet(sub.images, sub.text, sim, (sub.alpha_img, sub.alpha_txt))
    real = load_real(cfg, whole_train=False)
    syn = SyntheticSet.from_real(real.train_images, real.train_text, pairs or job.phase.pairs, job.phase.similarity,
                                 cfg.alpha_starts(), torch.Generator().manual_seed(job.seed), device=device)
    return job, syn


def measure(cfg, name: str, state: str, alphas: list[float], draws: int, seed: int = 0, pairs: int | None = None,
            minibatch: int | None = None, steps: int | None = None) -> dict:
    """Per tower and alpha: mean M, ||w_N - theta_s|| / ||theta_t - theta_s|| and cos(w_N - theta_s, theta_t -
    theta_s) over ``draws`` (expert, start) draws; and per draw the linear optimum alpha* and its floor."""
    from ptmst_ray.distill.matching import MinibatchSampler, Step, _Context, _sweep, resolve_loss
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student
    from ptmst_ray.stages.embed import load_real
    from ptmst_ray.stages.phase import StoredTrajectories

    device = torch.device("cpu")
    real = load_real(cfg, whole_train=False)
    fs = FunctionalStudent(build_student(cfg.model, real.text_dim, seed=cfg.experts.seed).to(device).train())
    job, syn = load_synthetic(cfg, name, state, device, pairs)
    phase, d = job.phase, cfg.distill
    batch, n_steps = minibatch or phase.minibatch, steps or d.syn_steps
    source = StoredTrajectories(cfg, phase, fs.split_snapshot, device)
    gen = torch.Generator().manual_seed(seed)
    ctx = _Context(fs.logits, resolve_loss(d.loss), syn)
    rows: dict = {a: {"M": [[], []], "reach": [[], []], "cos": [[], []]} for a in alphas}
    linear = []
    for i in range(draws):
        expert = i % source.num_experts
        start = phase.start_min + int(torch.randint(phase.start_max - phase.start_min + 1, (1,), generator=gen))
        theta_s = source.snapshot(expert, start - phase.range_start)
        theta_t = source.snapshot(expert, start - phase.range_start + d.expert_epochs)
        sampler = MinibatchSampler(syn.n, batch, torch.Generator().manual_seed(seed * 1000 + i))
        plan = [Step(sampler.next_indices(), sampler.next_seed()) for _ in range(n_steps)]
        target = [t - s for s, t in zip(theta_s, theta_t)]
        for a in sorted(alphas):
            with torch.no_grad():
                syn.alpha_img.fill_(a)
                syn.alpha_txt.fill_(a)
            w_n, big_g = _sweep(ctx, theta_s, plan)
            for m, (w, s, tgt) in enumerate(zip(w_n, theta_s, target)):
                move = w.detach() - s
                rows[a]["M"][m].append(float((move - tgt).pow(2).sum() / tgt.pow(2).sum()))
                rows[a]["reach"][m].append(float(move.norm() / tgt.norm()))
                rows[a]["cos"][m].append(float(torch.nn.functional.cosine_similarity(move, tgt, dim=0)))
            if a == min(alphas):
                g = [-x.detach() for x in big_g]
                linear.append({"expert": expert, "start": start, "target_norm": [float(t.norm()) for t in target],
                               "alpha_star": [float((gm * t).sum() / gm.pow(2).sum()) for gm, t in zip(g, target)],
                               "floor": [1 - float(torch.nn.functional.cosine_similarity(gm, t, dim=0)) ** 2
                                         for gm, t in zip(g, target)]})
    return {"rows": rows, "linear": linear, "phase": phase, "distill": d, "pairs": syn.n, "minibatch": batch,
            "steps": n_steps}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", required=True, help="a bench_quality cell's run root (holds config.yaml)")
    ap.add_argument("--phase", default="phase0")
    ap.add_argument("--state", choices=("init", "distilled"), default="init")
    ap.add_argument("--alphas", type=float, nargs="+", default=[0.01, 0.03, 0.1, 0.3, 1.0])
    ap.add_argument("--draws", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--pairs", type=int, default=None, help="init state: this many random real pairs (a reference)")
    ap.add_argument("--minibatch", type=int, default=None, help="pairs per unrolled step (default: the phase's)")
    ap.add_argument("--steps", type=int, default=None, help="unrolled steps (default: distill.syn_steps)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ptmst_ray.config import load_config

    cfg = load_config(f"{args.cell}/config.yaml", [])
    if args.state == "distilled" and args.pairs:
        raise SystemExit("--pairs makes a real initial set; it does not apply to --state distilled")
    out = measure(cfg, args.phase, args.state, args.alphas, args.draws, pairs=args.pairs, minibatch=args.minibatch,
                  steps=args.steps)
    p, d = out["phase"], out["distill"]
    print(f"{args.cell} {args.phase} ({args.state}): {out['pairs']} pairs, range [{p.range_start}, {p.range_end}], "
          f"starts {p.start_min}-{p.start_max}, N = {out['steps']} steps of {out['minibatch']}, target {d.expert_epochs} expert "
          f"epoch(s); {args.draws} draws; mean over draws")
    mean = statistics.mean
    for m, tower in enumerate(("image", "text")):
        print(f"\n{tower} tower\n| alpha | M_{tower[:3]} | ||w_N - theta_s|| / ||theta_t - theta_s|| | cos(move, target) |")
        print("|---:|---:|---:|---:|")
        for a in sorted(out["rows"]):
            r = out["rows"][a]
            print(f"| {a:g} | {mean(r['M'][m]):.3f} | {mean(r['reach'][m]):.3f} | {mean(r['cos'][m]):+.3f} |")
        lin = out["linear"]
        per_draw = ", ".join(f"{x['alpha_star'][m]:.3g}" for x in lin)
        print(f"linear optimum at alpha {min(out['rows']):g}: alpha* {mean(x['alpha_star'][m] for x in lin):.3g} "
              f"(per draw {per_draw}), floor M_{tower[:3]} = 1 - cos^2 "
              f"{mean(x['floor'][m] for x in lin):.3f}; ||theta_t - theta_s|| {mean(x['target_norm'][m] for x in lin):.3g}")


if __name__ == "__main__":
    main()
