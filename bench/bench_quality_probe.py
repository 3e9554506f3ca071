"""Quality probe of a recipe: the whole pipeline in ONE process (no Ray), then every method scored.

Why this file exists: judging a toy recipe (PTM-ST vs a random coreset, single-phase and full
data) needs many small runs on a 2-core machine; Ray's start-up and parallel workers get in the
way there. This script calls the same stage functions `ptmst-ray run` schedules (prepare,
pretrain, embed, experts + shortcuts, phases, aggregate, scoring), one after another, so its
figures are the pipeline's figures. Stages already complete under the run root are skipped
(their config hashes match), so a sweep over distillation settings reuses the experts.

    .venv/bin/python bench/bench_quality_probe.py --root /tmp/q/a [--config configs/toy.yaml]
        [--set key=value ...] [--methods ptm_st random single_phase full] [--threads 2]

Prints per-stage wall and CPU times, each phase's final matching loss and step sizes, and a markdown
table (best-of-points and final-epoch r_mean, mean +- std over eval.seeds, six recalls), and
writes everything to <root>/eval/probe.json.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import time

import torch


def main(argv: list[str] | None = None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="run root (a fresh or reusable directory)")
    ap.add_argument("--config", default="configs/toy.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--methods", nargs="+", default=["ptm_st", "random", "single_phase", "full"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    torch.set_num_threads(args.threads)

    from ptmst_ray import storage
    from ptmst_ray.config import load_config
    from ptmst_ray import layout
    from ptmst_ray.stages import score as scoring
    from ptmst_ray.stages import windows

    cfg = load_config(args.config, [f"run.root={args.root}", *args.overrides])
    # the baselines scored are --methods' (a single_phase method needs its distillation run, which follows them)
    cfg = cfg.replace(**{"eval.baselines": [m for m in args.methods if m != "ptm_st"]})
    storage.write_text(storage.join(cfg.run.root, "config.yaml"), cfg.to_yaml())
    times: dict[str, float] = {}
    cpu: dict[str, float] = {}  # this process's CPU seconds per stage: comparable across variants on a loaded machine

    def timed(name, fn, *a, **k):
        t, c = time.perf_counter(), time.process_time()
        out = fn(*a, **k)
        times[name] = times.get(name, 0.0) + time.perf_counter() - t
        cpu[name] = cpu.get(name, 0.0) + time.process_time() - c
        return out

    t_all = time.perf_counter()
    pre, phases, runs = run_in_process(cfg, args.methods, timed)
    results = scoring.summarise(runs, cfg)
    results.update(runs=runs, phases=phases, times=times, cpu_seconds=cpu, wall_seconds=time.perf_counter() - t_all,
                   zero_shot=(pre or {}).get("zero_shot"), overrides=args.overrides, threads=args.threads,
                   final_ratios=_final_ratios(results))
    storage.write_json(storage.join(layout.Layout(cfg.run.root).eval, "probe.json"), results)
    print(report(results))
    return results


def run_in_process(cfg, methods: list[str], timed) -> tuple[dict | None, dict, list[dict]]:
    """The pipeline's stages for ``methods`` in this process, one after another, each call wrapped by
    ``timed(name, fn, *args)``: (pretraining manifest, each phase's last metrics, one score per method and seed).
    Stage names: prepare, pretrain, embed, expert_lr (``experts.lr_img: auto``), experts, windows (``range_end:
    auto``), phases, aggregate, ``eval <method>``."""
    from ptmst_ray import layout
    from ptmst_ray import vocab
    from ptmst_ray.stages import aggregate as distilled_mod
    from ptmst_ray.stages import data as data_stage
    from ptmst_ray.stages import embed as embed_stage
    from ptmst_ray.stages import expert_lr
    from ptmst_ray.stages import experts as experts_stage
    from ptmst_ray.stages import phase as phase_stage
    from ptmst_ray.stages import pretrain as pretrain_stage
    from ptmst_ray.stages import score as scoring

    timed("prepare", data_stage.prepare, cfg)
    pre = timed("pretrain", pretrain_stage.pretrain, cfg)
    timed("embed", embed_stage.embed, cfg)
    distilled = bool({"ptm_st", "single_phase"} & set(methods))  # random/full alone need no experts
    if distilled:
        cfg = timed("expert_lr", expert_lr.run_in_turn, cfg)  # experts.lr_img auto: the rule's pick; else cfg
    for i in range(cfg.experts.num_experts if distilled else 0):
        timed("experts", experts_stage.train_and_store_expert, cfg, i)
        if i == windows.EXPERT:
            cfg = timed("windows", windows.pick, cfg)  # range_end auto: the windows' rule's picks; else cfg
        timed("experts", experts_stage.compress_expert, cfg, i)
    phases = {}
    jobs = layout.phase_jobs(cfg, with_baseline="single_phase" in methods) if distilled else []
    if "ptm_st" not in methods:
        jobs = [j for j in jobs if j.name == vocab.SINGLE_PHASE]
    for name, phase, seed in ((j.name, j.phase, j.seed) for j in jobs):
        last: dict = {}
        out = timed("phases", phase_stage.distill_phase, cfg, name, phase, device=torch.device("cpu"), seed=seed,
                    report=lambda m, ck, last=last: last.update(m))
        phases[name] = {**out, **{k: last[k] for k in ("iteration", "loss", "loss_img", "loss_txt", "alpha_img",
                                                        "alpha_txt") if k in last}}
        print(f"{name}: {json.dumps(phases[name])}", flush=True)
    if "ptm_st" in methods:
        timed("aggregate", distilled_mod.aggregate, cfg)
    runs = []
    for method in methods:
        for s in range(cfg.eval.seeds):
            runs.append(timed(f"eval {method}", scoring.score_one_seed, cfg, method, s))
    return pre, phases, runs


def _final_ratios(results: dict) -> dict:
    m = results["methods"]
    if "ptm_st" not in m:
        return {}
    top = m["ptm_st"]["final"]["r_mean"]["mean"]
    return {f"ptm_st/{b}": top / m[b]["final"]["r_mean"]["mean"] for b in m if b != "ptm_st"
            and m[b]["final"]["r_mean"]["mean"] > 0}


def report(results: dict) -> str:
    """A markdown table of the methods (best-of-points, with the final-epoch r_mean beside it)."""
    names = ["TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10"]
    rows = ["| method | pairs | r_mean (best) | r_mean (final) | " + " | ".join(names) + " |",
            "|---|---:|---:|---:|" + "---:|" * len(names)]
    for method, m in results["methods"].items():
        cells = [f"{m[n]['mean']:.1f}" for n in names]
        rows.append(f"| {method} | {m['pairs']} | {m['r_mean']['mean']:.1f} ± {m['r_mean']['std']:.1f} | "
                    f"{m['final']['r_mean']['mean']:.1f} ± {m['final']['r_mean']['std']:.1f} | " + " | ".join(cells) + " |")
    ratios = ", ".join(f"{k} {v:.2f}" for k, v in results["ratios"].items())
    final = ", ".join(f"{k} {v:.2f}" for k, v in results.get("final_ratios", {}).items())
    cpu = results.get("cpu_seconds", {})
    times = ", ".join(f"{k} {v:.0f}s" + (f" ({cpu[k]:.0f} CPU-s)" if k in cpu else "") for k, v in results["times"].items())
    return "\n".join(rows + [f"ratios (best): {ratios}", f"ratios (final): {final}", f"zero-shot: {results.get('zero_shot')}",
                             f"times: {times}; total {results['wall_seconds']:.0f}s"])


if __name__ == "__main__":
    sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    main()
