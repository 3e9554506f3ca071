"""Regime of a dataset: how far random coresets sit from full data, and whether experts carry signal.

Why this file exists: distillation can only show head-room where a small random coreset scores far below
the full train split and where experts keep improving over their epochs (issue #25). On Flickr30k 500
random pairs score 0.25x full data and experts improve for 10 epochs; on the built-in shapes 50 random
pairs score 0.68x and experts converge in one epoch, then move by SGD noise. This script measures a
config's regime with the pipeline's own stage functions, in ONE process (no Ray), like
bench/bench_quality_probe.py:

* the full-data baseline (``eval.seeds`` seeds; stopped by val when the data has a val split);
* random coresets of each ``--budgets`` size (the same seeds), and their ratio to full data;
* one expert trajectory: test recall after every epoch, the norm of each epoch's displacement
  theta_e - theta_(e-1), and the cosine of consecutive displacements (near 0: the expert moves by SGD
  noise; clearly positive: its epochs point one way, and a trajectory carries something to match).

    .venv/bin/python bench/bench_regime.py --root /tmp/regime/scenes [--config configs/scenes.yaml]
        [--set KEY=VALUE ...] [--budgets 50 100] [--expert 0] [--threads 2] [--quick] [--write-results]

With ``--expert-lrs LR ...`` it applies the recipe's rule for the experts' learning rate instead
(docs/method.md#a-recipe-for-new-data): one expert per candidate lr (``--expert``'s id, stored under
<root>/eval/expert_lr/, never in place of the run's experts), the cosines of its consecutive epoch displacements,
and the largest lr whose first four epochs keep them >= 0.5, with the settings that follow from it:

    .venv/bin/python bench/bench_regime.py --root R [--config C] --expert-lrs 0.3 0.1 0.03 0.01

With ``--windows N`` it applies the windows' rule to each phase of the config over the root's first N stored
experts (trained by a run on that root; nothing is trained or scored): for each range end b up to the experts'
epochs, the mean cosine between the chord theta_b - theta_start and the displacements of the epochs the phase's
targets lie in, and the best b beside the config's (docs/method.md#a-recipe-for-new-data):

    .venv/bin/python bench/bench_regime.py --root R [--config C] --windows 20

Stages already complete under the root are skipped (config hashes). Prints a summary and writes every
figure to <root>/eval/regime.json. --quick shrinks the data, pretraining, experts and evaluation to prove
the script works in a couple of minutes (its figures mean nothing); --write-results puts the summary into
bench/RESULTS.md ("## Regime: <config> (<kind>)") and is refused with --quick.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
for p in (REPO, REPO / "bench"):
    if str(p) not in sys.path:
        sys.path.insert(0, str(p))

QUICK = [
    "data.builtin.train_images=200", "data.builtin.test_images=100", "data.builtin.pretrain_images=200",
    "pretrain.epochs=1", "experts.num_experts=1", "eval.epochs=3", "eval.seeds=1", "eval.full_data_epochs=2",
]
"""--quick's overrides; besides, 4 expert epochs (what the experts' lr rule looks at; the phase windows clipped to
them), at most 3 full-data epochs and, when the config has a val split, 100 val images."""
QUICK_EXPERT_EPOCHS = 4


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--root", required=True, help="run root (a fresh or reusable directory)")
    ap.add_argument("--config", default="configs/scenes.yaml")
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    ap.add_argument("--budgets", type=int, nargs="+", default=[50, 100], help="random coreset sizes (pairs)")
    ap.add_argument("--expert", type=int, default=0, help="the expert whose trajectory is measured")
    ap.add_argument("--expert-lrs", type=float, nargs="+", metavar="LR",
                    help="apply the experts' learning-rate rule over these candidates (no coreset scoring)")
    ap.add_argument("--windows", type=int, metavar="N",
                    help="apply the windows' rule to each phase over the root's first N stored experts (no training, "
                         "no scoring): each range end's chord alignment and the pick")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--quick", action="store_true", help="tiny sizes: proves the script runs, measures nothing")
    ap.add_argument("--write-results", action="store_true", help="put the summary into bench/RESULTS.md")
    return ap.parse_args(argv)


def load(args: argparse.Namespace):
    from ptmst_ray.config import load_config
    from ptmst_ray.stages.windows import end_bound

    overrides = [f"run.root={args.root}"]
    if not args.quick:
        return load_config(args.config, overrides + args.overrides)
    base = load_config(args.config, overrides + QUICK + args.overrides)
    epochs = QUICK_EXPERT_EPOCHS
    phases = []
    for p in base.phases:  # the windows clipped to the short experts (phases are not run here; the config checks them)
        end = min(end_bound(base, p), epochs)
        start_max = min(p.start_max, end - 1)
        start_min = min(p.start_min, start_max)
        phases.append(dataclasses.replace(p, range_start=min(p.range_start, start_min), start_min=start_min,
                                          start_max=start_max, range_end=end if p.range_end != "auto" else "auto"))
    quick = {"experts.epochs": epochs, "phases": [dataclasses.asdict(p) for p in phases]}
    if getattr(base.data.builtin, "val_images", 0):
        quick["data.builtin.val_images"] = 100
    if hasattr(base.eval, "full_data_max_epochs"):  # with val, full data trains until val stops improving
        quick["eval.full_data_max_epochs"] = 3
    return base.replace(**quick)


def prerequisites(cfg, expert_id: int | None, times: dict[str, float]):
    """Data, pretraining, caption embeddings and the one expert (None: no expert), as `ptmst-ray run` makes them;
    returns the config (with ``experts.lr_img: auto`` and an expert: the rule's pick, as the run's stage makes it)."""
    from ptmst_ray import storage
    from ptmst_ray.stages import data as data_stage, embed as embed_stage, expert_lr, experts as experts_stage
    from ptmst_ray.stages import pretrain as pretrain_stage

    storage.write_text(storage.join(cfg.run.root, "config.yaml"), cfg.to_yaml())
    steps = [("data", data_stage.prepare, ()), ("pretrain", pretrain_stage.pretrain, ()),
             ("embed", embed_stage.embed, ())]
    for name, fn, a in steps:
        t = time.perf_counter()
        fn(cfg, *a)
        times[name] = time.perf_counter() - t
        print(f"{name}: {times[name]:.0f}s", flush=True)
    if expert_id is not None:
        t = time.perf_counter()
        cfg = expert_lr.run_in_turn(cfg)
        experts_stage.train_and_store_expert(cfg, expert_id)
        times["expert"] = time.perf_counter() - t
        print(f"expert: {times['expert']:.0f}s", flush=True)
    return cfg


def coreset_config(cfg, budget: int):
    """``cfg`` with its phases resized to ``budget`` pairs in total (what a random coreset's size follows)."""
    from bench_quality import budget_phases

    return cfg.replace(phases=[dataclasses.asdict(p) for p in budget_phases(cfg, budget, "random")])


def score(cfg, method: str, seeds: int) -> dict[str, Any]:
    """``method`` scored over ``seeds`` seeds: per-seed runs and the mean/std summary of the stage."""
    from ptmst_ray.stages import score as scoring

    runs = [scoring.score_one_seed(cfg, method, s) for s in range(seeds)]
    summary = scoring.summarise(runs, cfg)["methods"][method]
    return {"runs": runs, "summary": summary}


def r_mean(entry: dict) -> float:
    """The headline r_mean of a method: its (val-selected when the data has val) best point, mean over seeds."""
    return float(entry["summary"]["r_mean"]["mean"])


def expert_trajectory(cfg, expert_id: int, store=None) -> dict[str, list[float]]:
    """Test recall after each epoch of expert ``expert_id`` (from ``store``, default the run's), and the geometry
    of its epoch displacements."""
    from ptmst_ray.evaluate.student import RetrievalSet, evaluate_student
    from ptmst_ray.layout import experts_hash
    from ptmst_ray.models.student import build_student
    from ptmst_ray.stages.embed import load_real
    from ptmst_ray.stages.experts import expert_store
    from ptmst_ray.trajectories.expert import displacement_cosines, expert_seed

    snapshots = (store or expert_store(cfg)).trajectory(expert_id, experts_hash(cfg))[:cfg.experts.epochs + 1]
    real = load_real(cfg, whole_train=False)
    test = RetrievalSet(real.test_images, real.test_text, real.txt2img)
    student = build_student(cfg.model, real.text_dim, seed=expert_seed(cfg.experts, expert_id))
    recall = []
    for snap in snapshots:
        missing = set(snap) - set(student.state_dict())
        if missing:
            raise SystemExit(f"expert {expert_id}'s snapshot names {sorted(missing)[:3]} are not the student's")
        student.load_state_dict(snap, strict=False)
        recall.append(evaluate_student(student, test)["r_mean"])
    norms = [float(sum(((b[k].double() - a[k].double()) ** 2).sum() for k in a) ** 0.5)
             for a, b in zip(snapshots, snapshots[1:])]
    return {"test_r_mean": recall, "step_norm": norms, "consecutive_cosine": displacement_cosines(snapshots)}


def expert_lr_rule(cfg, expert_id: int, lrs: list[float], times: dict[str, float]) -> dict[str, Any]:
    """One expert per candidate lr (both modalities), stored apart from the run's; the rule's pick."""
    from ptmst_ray import storage
    from ptmst_ray.layout import Layout
    from ptmst_ray.stages.experts import train_and_store_expert
    from ptmst_ray.trajectories.expert import ALIGNED_COSINE, ALIGNED_EPOCHS, aligned_lr
    from ptmst_ray.trajectories.store import TrajectoryStore

    per_lr: dict[float, dict] = {}
    candidates = sorted(set(lrs), reverse=True)
    for i, lr in enumerate(candidates, 1):
        t = time.perf_counter()
        trial = cfg.replace(**{"experts.lr_img": lr, "experts.lr_txt": lr})
        store = TrajectoryStore(storage.join(Layout.of(cfg).eval, "expert_lr", f"lr{lr:g}"))
        train_and_store_expert(trial, expert_id, store=store)
        per_lr[lr] = expert_trajectory(trial, expert_id, store)
        times[f"expert lr {lr:g}"] = time.perf_counter() - t
        cosines = ", ".join(f"{c:+.2f}" for c in per_lr[lr]["consecutive_cosine"])
        print(f"[{i}/{len(candidates)}] lr {lr:g}: cos {cosines} ({times[f'expert lr {lr:g}']:.0f}s)", flush=True)
    pick = aligned_lr({lr: r["consecutive_cosine"] for lr, r in per_lr.items()})
    return {"candidates": per_lr, "pick": pick, "min_cosine": ALIGNED_COSINE, "epochs": ALIGNED_EPOCHS}


def windows_rule(cfg, n_experts: int) -> list[dict[str, Any]]:
    """The windows' rule (docs/method.md#a-recipe-for-new-data) for each phase of ``cfg``, over its run root's
    experts 0..n_experts-1 as stored: each phase's target epochs, the chord alignment of every range end up to
    the experts' epochs, and the pick beside the config's range end."""
    from ptmst_ray.layout import experts_hash
    from ptmst_ray.stages.experts import expert_store
    from ptmst_ray.stages.windows import target_epochs, weigh
    from ptmst_ray.storage import StorageError

    store, h, epochs = expert_store(cfg), experts_hash(cfg), cfg.experts.epochs
    trajectories = []
    for e in range(n_experts):
        try:
            snaps = store.trajectory(e, h)
        except StorageError as exc:
            raise SystemExit(f"expert {e} of this config is not stored under {cfg.run.root} ({exc}): run the "
                             f"pipeline (ptmst-ray run or bench/bench_quality.py) on this root first, or pass a "
                             f"smaller --windows") from None
        if len(snaps) < epochs + 1:
            raise SystemExit(f"expert {e} has {len(snaps) - 1} of its {epochs} epochs stored: let the experts "
                             f"stage finish first")
        trajectories.append(snaps)  # read an epoch at a time as the rule indexes it
    return [{"phase": i, "range_start": ph.range_start, "starts": [ph.start_min, ph.start_max],
             "target_epochs": target_epochs(cfg, ph), "scores": scores, "pick": pick, "config_range_end": ph.range_end}
            for i, (ph, (pick, scores)) in enumerate(zip(cfg.phases, weigh(cfg, trajectories, list(cfg.phases))))]


def windows_report(res: dict) -> str:
    lines = [f"config {res['config']} (kind {res['kind']}), overrides {res['overrides']}",
             f"the windows' rule over {res['experts']} experts: each phase's range end b maximises the mean "
             f"cos(theta_b - theta_start, theta_(k+1) - theta_k) over its target epochs k and the two towers"]
    for w in res["windows"]:
        lines.append(f"phase {w['phase']} (starts {w['starts'][0]}-{w['starts'][1]}, target epochs "
                     f"{w['target_epochs']}): " + " ".join(f"{b}:{v:.3f}" for b, v in w["scores"].items())
                     + f" -> range [{w['range_start']}, {w['pick']}] (the config: [{w['range_start']}, "
                       f"{w['config_range_end']}])")
        if w["pick"] == res["expert_epochs"]:
            lines.append(f"  phase {w['phase']}: the score still rises at the experts' last epoch "
                         f"({res['expert_epochs']}): train longer experts (experts.epochs) and apply the rule again")
    lines.append("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in res["times"].items()))
    return "\n".join(lines)


def lr_report(res: dict) -> str:
    from ptmst_ray.trajectories.expert import keeps_aligned

    rule = res["expert_lr"]
    lines = [f"config {res['config']} (kind {res['kind']}), overrides {res['overrides']}",
             f"the experts' learning rate: the largest candidate whose first {rule['epochs']} epochs keep "
             f"cos(consecutive displacements) >= {rule['min_cosine']}"]
    for lr, r in sorted(rule["candidates"].items(), reverse=True):
        ok = keeps_aligned(r["consecutive_cosine"], rule["min_cosine"], rule["epochs"])
        lines.append(f"lr {lr:g}: {'passes' if ok else 'fails '}; cos " + ", ".join(
            f"{c:+.2f}" for c in r["consecutive_cosine"]) + "; test r_mean by epoch " + ", ".join(
            f"{x:.1f}" for x in r["test_r_mean"]) + " (not used by the rule)")
    pick = rule["pick"]
    if pick is None:
        lines.append("no candidate passes: try smaller learning rates")
    else:
        lines.append(f"pick: lr {pick:g}; set experts.lr_img={pick:g} experts.lr_txt={pick:g} (a recipe with "
                     f"distill.rel_alpha 0.1 and rel_min_alpha 0.1, as configs/scenes.yaml, then starts the step "
                     f"sizes at {pick / 10:g} and floors them at {pick / 100:g})")
    lines.append("times: " + ", ".join(f"{k} {v:.0f}s" for k, v in res["times"].items()))
    return "\n".join(lines)


def _extra(entry: dict) -> str:
    """The paper's best-on-test figure and the epochs trained, when the stage reports them (data with val)."""
    s, runs = entry["summary"], entry["runs"]
    out = f"; best on test {s['best_on_test']['r_mean']['mean']:.1f}" if "best_on_test" in s else ""
    if "epochs_run" in runs[0]:
        out += f"; epochs trained {[r['epochs_run'] for r in runs]}"
    return out


def report(res: dict) -> str:
    full = res["full"]
    lines = [f"config {res['config']} (kind {res['kind']}), overrides {res['overrides']}",
             f"full data ({full['pairs']} pairs): r_mean {r_mean(full):.1f} +- {full['summary']['r_mean']['std']:.1f}"
             f" (best point chosen on {res['selection']}){_extra(full)}"]
    for b, entry in res["random"].items():
        lines.append(f"random {b} pairs: r_mean {r_mean(entry):.1f} +- {entry['summary']['r_mean']['std']:.1f}, "
                     f"{res['ratios'][b]:.2f}x full{_extra(entry)}")
    ex = res["expert"]
    lines += ["expert test r_mean by epoch (0 = its start): " + ", ".join(f"{x:.1f}" for x in ex["test_r_mean"]),
              "epoch displacement norms: " + ", ".join(f"{x:.3f}" for x in ex["step_norm"]),
              "cos(consecutive displacements): " + ", ".join(f"{x:+.2f}" for x in ex["consecutive_cosine"]),
              "times: " + ", ".join(f"{k} {v:.0f}s" for k, v in res["times"].items())]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick and args.write_results:
        raise SystemExit("--quick runs prove the script works; they do not go into bench/RESULTS.md")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    import torch

    torch.set_num_threads(args.threads)
    cfg = load(args)
    times: dict[str, float] = {}
    t0 = time.perf_counter()
    kind = cfg.data.builtin.kind if cfg.data.dataset == "builtin" else cfg.data.dataset
    if args.windows is not None:
        if args.windows < 1:
            raise SystemExit(f"--windows {args.windows}: the rule needs at least one expert")
        windows = windows_rule(cfg, args.windows)
        times["windows"] = time.perf_counter() - t0
        res = {"config": args.config, "kind": kind, "overrides": args.overrides, "quick": args.quick,
               "experts": args.windows, "expert_epochs": cfg.experts.epochs, "windows": windows, "times": times,
               "wall_seconds": times["windows"]}
        return publish(res, cfg, "windows.json", windows_report(res), args,
                       f"## The windows' rule: {args.config} ({kind})")
    if args.expert_lrs:
        from ptmst_ray.trajectories.expert import ALIGNED_EPOCHS

        if cfg.experts.epochs < ALIGNED_EPOCHS:  # before any stage runs
            raise SystemExit(f"experts.epochs={cfg.experts.epochs}: the rule looks at the first {ALIGNED_EPOCHS} "
                             f"epochs; set experts.epochs to at least {ALIGNED_EPOCHS}")
        prerequisites(cfg, None, times)
        res = {"config": args.config, "kind": kind, "overrides": args.overrides, "quick": args.quick,
               "expert_lr": expert_lr_rule(cfg, args.expert, args.expert_lrs, times), "times": times}
        res["wall_seconds"] = time.perf_counter() - t0
        return publish(res, cfg, "expert_lr.json", lr_report(res), args,
                       f"## The experts' learning rate: {args.config} ({kind})")
    cfg = prerequisites(cfg, args.expert, times)
    t = time.perf_counter()
    full = score(cfg, "full", cfg.eval.seeds)
    times["full"] = time.perf_counter() - t
    res: dict[str, Any] = {"config": args.config, "kind": kind, "overrides": args.overrides, "quick": args.quick,
                           "full": {"pairs": full["runs"][0]["pairs"], **full}, "random": {}, "ratios": {},
                           "selection": full["runs"][0].get("selection", "test")}
    for b in sorted(set(args.budgets)):
        t = time.perf_counter()
        res["random"][b] = score(coreset_config(cfg, b), "random", cfg.eval.seeds)
        res["ratios"][b] = r_mean(res["random"][b]) / max(r_mean(full), 1e-9)
        times[f"random {b}"] = time.perf_counter() - t
        print(f"random {b}: {r_mean(res['random'][b]):.1f} ({res['ratios'][b]:.2f}x full)", flush=True)
    t = time.perf_counter()
    res["expert"] = expert_trajectory(cfg, args.expert)
    times["expert recall"] = time.perf_counter() - t
    res["times"], res["wall_seconds"] = times, time.perf_counter() - t0
    return publish(res, cfg, "regime.json", report(res), args, f"## Regime: {args.config} ({kind})")


def publish(res: dict, cfg, name: str, text: str, args: argparse.Namespace, section: str) -> dict:
    """Write ``res`` to <root>/eval/``name``, print ``text``, and with --write-results put it into RESULTS.md."""
    from ptmst_ray import storage
    from ptmst_ray.layout import Layout

    out = storage.join(Layout.of(cfg).eval, name)
    storage.write_text(out, json.dumps(res, indent=1, default=str))
    print(text + f"\nwritten to {out}; total {res['wall_seconds']:.0f}s")
    if args.write_results:
        from _common import command_line, machine, replace_section

        replace_section(section, f"Command: `{command_line()}`. Machine: {machine(load=True)}. Wall time "
                                 f"{res['wall_seconds'] / 60:.1f} min.\n\n```\n{text}\n```")
    return res


if __name__ == "__main__":
    main()
