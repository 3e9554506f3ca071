"""Diagnostic: how far the EMA subset of a phase has moved from its initialisation, against the raw final state.

Why this file exists: on `scenes` the no-EMA ablation scores above PTM-ST. The saved subset of a phase is the
EMA of its iterates (decay d, initialised to the starting set, no bias correction), so after T iterations it
still holds d^T of the initial set and lags the raw state. Two cells of bench/bench_quality.py that differ only
in `distill.ema_decay` (ptm_st and no_ema) follow the same raw trajectory; this prints, per phase and learned
tensor, the projection of the EMA's move on the raw move, <e_T - x_0, x_T - x_0> / ||x_T - x_0||^2, beside the
value a straight-line drift would give, 1 - d (1 - d^T) / (T (1 - d)).

    .venv/bin/python bench/probe_ema_lag.py --ema R/cells/b50/ptm_st --raw R/cells/b50/no_ema
"""

from __future__ import annotations

import argparse


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--ema", required=True, help="cell root whose phases kept the EMA (ptm_st)")
    ap.add_argument("--raw", required=True, help="cell root of the same phases without it (no_ema)")
    args = ap.parse_args(argv)

    import torch

    from ptmst_ray.config import load_config
    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.layout import Layout, phase_name
    from ptmst_ray.stages.embed import load_real

    ema_cfg, raw_cfg = (load_config(f"{root}/config.yaml", []) for root in (args.ema, args.raw))
    if ema_cfg.phases != raw_cfg.phases or raw_cfg.distill.ema_decay != 0.0:
        raise SystemExit(f"{args.raw} must have the phases of {args.ema} and distill.ema_decay 0")
    real = load_real(ema_cfg, whole_train=False)
    print("| phase | iterations T | tensor | EMA move / raw move (projection) | straight-line drift |")
    print("|---|---:|---|---:|---:|")
    for i, phase in enumerate(ema_cfg.phases):
        name = phase_name(i)
        ema, raw = (load_subset(Layout.of(c).subset(name)) for c in (ema_cfg, raw_cfg))
        idx = torch.as_tensor(ema.meta["init_indices"])
        init = {"images": torch.as_tensor(real.train_images[idx]).float(), "text": torch.as_tensor(real.train_text[idx]).float()}
        t, d = phase.iterations, ema_cfg.distill.ema_decay_for(phase.iterations)
        drift = 1 - d * (1 - d ** t) / (t * (1 - d))
        for key in ("images", "text"):
            e, r = getattr(ema, key).float() - init[key], getattr(raw, key).float() - init[key]
            print(f"| {name} | {t} | {key} | {float((e * r).sum() / (r * r).sum()):.3f} | {drift:.3f} |")
        print(f"| {name} | {t} | alpha_img / alpha_txt | EMA {ema.alpha_img:.4g} / {ema.alpha_txt:.4g}, raw "
              f"{raw.alpha_img:.4g} / {raw.alpha_txt:.4g} (init {ema_cfg.distill.alpha_init:g}) | |")


if __name__ == "__main__":
    main()
