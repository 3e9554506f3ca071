"""Diagnostic: how far `exact`'s meta-gradient is from `first_order`'s, at a phase's step sizes and larger ones.

Why this file exists: on `scenes` the two gradient methods score level (exact - first_order within the seeds'
spread in every comparison) and end with the same matching loss. `first_order` drops the terms of dM/dX that pass
through the later steps' dependence on the earlier ones (docs/method.md: each g_i recomputed at the unroll's w_i, not
differentiated through w_i); those terms scale with the step size alpha, so at small alpha the two gradients nearly
agree and no choice between them can move recall. This measures, for one phase of a distilled cell and the same
draws of (expert, start epoch, minibatches), both methods' gradients of the synthetic images, texts, similarity
and step sizes at the phase's own alphas times each --scales factor: their cosine and relative difference
||g_first_order - g_exact|| / ||g_exact||, and the matching loss M the unroll reaches.

    .venv/bin/python bench/probe_exact_gap.py --cell ROOT/cells/b50/ptm_st [--phase phase0]
        [--state init|distilled] [--scales 1 10 100] [--draws 4] [--threads 2]

ROOT/cells/... is a cell of bench/bench_quality.py; `init` is the phase's initial set at the recipe's starting
step sizes (`Config.alpha_starts`), `distilled` its saved subset at its learned ones.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from probe_matching_scale import load_synthetic

PARTS = ("images", "text", "similarity", "alphas")


def gradients(syn) -> dict[str, torch.Tensor]:
    """The synthetic set's accumulated gradients, one flat vector per part."""
    sim = [p.grad.flatten() for p in syn.similarity.parameters() if p.grad is not None]
    return {"images": syn.images.grad.flatten().clone(), "text": syn.text.grad.flatten().clone(),
            "similarity": torch.cat(sim) if sim else torch.zeros(1),
            "alphas": torch.stack([syn.alpha_img.grad, syn.alpha_txt.grad]).flatten()}


def measure(cfg, name: str, state: str, scales: list[float], draws: int, seed: int = 0) -> dict:
    """Per scale: per part the cosines and relative differences of the two methods' gradients, and first_order's M,
    over ``draws`` draws of (expert, start epoch, minibatch order) shared by both methods."""
    from ptmst_ray.distill.matching import MinibatchSampler, matching_step
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student
    from ptmst_ray.stages.embed import load_real
    from ptmst_ray.stages.phase import StoredTrajectories

    device = torch.device("cpu")
    real = load_real(cfg, whole_train=False)
    fs = FunctionalStudent(build_student(cfg.model, real.text_dim, seed=cfg.experts.seed).to(device).train())
    job, syn = load_synthetic(cfg, name, state, device)
    base = (float(syn.alpha_img), float(syn.alpha_txt))  # the recipe's starts, or the subset's learned step sizes
    phase, d = job.phase, cfg.distill
    source = StoredTrajectories(cfg, phase, fs.split_snapshot, device)
    gen = torch.Generator().manual_seed(seed)
    rows = {s: {"M": [], **{f"cos_{p}": [] for p in PARTS}, **{f"diff_{p}": [] for p in PARTS}} for s in scales}
    for i in range(draws):
        expert = i % source.num_experts
        start = phase.start_min + int(torch.randint(phase.start_max - phase.start_min + 1, (1,), generator=gen))
        theta_s = source.snapshot(expert, start - phase.range_start)
        theta_t = source.snapshot(expert, start - phase.range_start + d.expert_epochs)
        for s in scales:
            got = {}
            for method in ("first_order", "exact"):
                with torch.no_grad():
                    syn.alpha_img.fill_(base[0] * s)
                    syn.alpha_txt.fill_(base[1] * s)
                for t in (syn.images, syn.text, *syn.alphas, *syn.similarity.parameters()):
                    t.grad = None
                sampler = MinibatchSampler(syn.n, phase.minibatch, torch.Generator().manual_seed(seed * 1000 + i))
                out = matching_step(fs.logits, d.loss, syn, theta_s, theta_t, d.syn_steps, sampler, method=method)
                got[method] = gradients(syn)
                if method == "first_order":
                    rows[s]["M"].append(out["loss"])
            for p in PARTS:
                fo, ex = got["first_order"][p], got["exact"][p]
                rows[s][f"cos_{p}"].append(float(torch.nn.functional.cosine_similarity(fo, ex, dim=0)))
                rows[s][f"diff_{p}"].append(float((fo - ex).norm() / ex.norm().clamp_min(1e-30)))
    return {"rows": rows, "base": base, "phase": phase, "distill": d, "pairs": syn.n}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--cell", required=True, help="a bench_quality cell's run root (holds config.yaml)")
    ap.add_argument("--phase", default="phase0")
    ap.add_argument("--state", choices=("init", "distilled"), default="init")
    ap.add_argument("--scales", type=float, nargs="+", default=[1.0, 10.0, 100.0],
                    help="factors on the phase's step sizes")
    ap.add_argument("--draws", type=int, default=4)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    from ptmst_ray.config import load_config

    cfg = load_config(f"{args.cell}/config.yaml", [])
    out = measure(cfg, args.phase, args.state, args.scales, args.draws)
    p, d = out["phase"], out["distill"]
    print(f"{args.cell} {args.phase} ({args.state}): {out['pairs']} pairs, range [{p.range_start}, {p.range_end}], "
          f"starts {p.start_min}-{p.start_max}, N = {d.syn_steps} steps of {p.minibatch}; alphas (img, txt) "
          f"{out['base'][0]:.3g}, {out['base'][1]:.3g} x scale; {args.draws} draws: mean (min) cosine, mean relative "
          "difference")
    mean = statistics.mean
    print("\n| scale | alpha_img | M (first_order) | " + " | ".join(f"cos {q} | diff {q}" for q in PARTS) + " |")
    print("|---:|---:|---:|" + "---:|---:|" * len(PARTS))
    for s, r in out["rows"].items():
        cells = " | ".join(f"{mean(r[f'cos_{q}']):.3f} ({min(r[f'cos_{q}']):.3f}) | {mean(r[f'diff_{q}']):.2f}"
                           for q in PARTS)
        print(f"| {s:g} | {out['base'][0] * s:.3g} | {mean(r['M']):.3f} | {cells} |")


if __name__ == "__main__":
    main()
