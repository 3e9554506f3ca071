"""Quality benchmark (issues #11 and #25): retrieval of each method at several pair budgets, on the Ray pipeline.

Why this file exists: one command answers "does PTM-ST beat a random coreset and single-phase
distillation, at which budget, how much of the random-to-full gap does it close, and what do its
parts contribute?". It runs the pipeline's own pieces on a local Ray: the prerequisite stages once
(data, pretraining, caption embeddings, experts + shortcuts under ONE shared root, as sweep trials
do), then every (method, budget) cell's distillation in its own sub-root (its phases as concurrent
Ray Train runs through `run_phases`, cells packed so the Train runs of a wave fill the cluster's
slots), then every (cell, evaluation seed) as one Ray task through `scoring.score_one_seed`.
Finished distillations are skipped on a re-run (config hashes); the cells' scoring is always redone, the
full-data baseline's seeds are reused from <root>/cells/full/ when the data, model, pretraining and evaluation
settings are the same (--rescore-full redoes them; the report says which were reused and from which commit).

    .venv/bin/python bench/bench_quality.py [--config configs/toy.yaml] [--set KEY=VALUE ...]
        [--budgets 20 50 100] [--one-phase-upto N] [--headline B] [--seeds 3] [--draws 1]
        [--methods random single_phase ptm_st ptm_st_exact] [--ablations] [--eval-epochs N]
        [--root ~/.cache/ptmst-ray/bench-quality] [--name NAME] [--out bench/<stem>.md] [--write-results] [--quick]
        [--rescore-full]

Methods: random (coreset of real pairs, a different subset per seed), single_phase (one subset
over the first phase's range, `layout.single_phase_config`), ptm_st (phases + shortcut, the
first_order), ptm_st_exact (distill.grad_method=exact); with --ablations no_shortcut
(shortcut.enabled=false: raw trajectories), no_ema (distill.ema_decay=0: the raw final state) and
fixed_similarity (distill.lr_sim=0: S stays at its initialisation, the identity) and fixed_step_sizes
(distill.lr_lr=0: alpha_img and alpha_txt stay at their start, which the students then train at). A budget is split
between the config's phases in the config's proportions, except budgets of at most --one-phase-upto
pairs, which distil ONE phase (the paper's choice at small budgets; there ptm_st is the single-phase
distillation, so no single_phase cell runs); a phase's minibatch is capped at its pairs. The full
train split is scored once, on the config's schedule (with a val split: until val stops improving).
With --draws D each distilled cell is distilled D times (run.seed + 0..D-1) and its D x seeds runs pooled.

Figures: "best" is the test recall at the evaluation point chosen on the val split when the data has
one (the honest figure), else on test; "best_on_test" (the paper's protocol) is reported beside it.
Per budget: the gap closed, (method - random) / (full - random), and issue #25's targets (gap
closed >= 60%, PTM-ST ahead of single-phase by more than the sum of the stds, exact >= first_order);
what each part carries (ptm_st minus the cell without it); per phase, the matching loss, the learned
step sizes and similarity.

Writes <out>.md (tables, command, machine, wall time), <out>.png (r_mean vs budget) and <out>.json
(every figure, per-seed run and per-phase matching loss curve); the default <out> and the RESULTS.md
section depend on the data (`section_and_stem`): the shapes toy "## Quality matrix (issue #11)" and
bench/quality_matrix.*, scenes "## Quality matrix on `scenes` (issue #25)" and bench/quality_scenes.*;
--write-results replaces that section of bench/RESULTS.md only.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import logging
import os
import platform
import shlex
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

RECALLS = ("TR@1", "TR@5", "TR@10", "IR@1", "IR@5", "IR@10")
BASE_METHODS = ("random", "single_phase", "ptm_st", "ptm_st_exact")
ABLATIONS = ("no_shortcut", "no_ema", "fixed_similarity", "fixed_step_sizes")
DISTILLED = ("single_phase", "ptm_st", "ptm_st_exact", *ABLATIONS)
METHOD_OVERRIDES: dict[str, dict[str, Any]] = {
    "ptm_st": {"distill.grad_method": "first_order"},  # the matrix: first_order vs exact, whatever the config says
    "ptm_st_exact": {"distill.grad_method": "exact"},
    "single_phase": {"distill.grad_method": "first_order"},  # the LoRS-style baseline uses the paper's rule
    "no_shortcut": {"shortcut.enabled": False},
    "no_ema": {"distill.ema_decay": 0.0},
    # S stays at its initialisation (the identity for kind full), whether the config fixes or derives lr_sim
    "fixed_similarity": {"distill.lr_sim": 0.0, "distill.rel_lr_sim": None},
    # the step sizes stay at their start (distill.alpha_init, or rel_alpha x the experts' lr), whether the config
    # fixes or derives lr_lr; the students then train at those step sizes
    "fixed_step_sizes": {"distill.lr_lr": 0.0, "distill.rel_lr_lr": None},
    "random": {},
}
GAP_TARGET = 0.60  # issue #25: PTM-ST closes at least 60% of the random-to-full gap at the headline budget
# The RESULTS.md section and output stem of each data set's matrix (others: "Quality matrix on `<name>`").
SECTIONS = {"shapes": ("## Quality matrix (issue #11)", "quality_matrix"),
            "scenes": ("## Quality matrix on `scenes` (issue #25)", "quality_scenes")}
SECTION = SECTIONS["shapes"][0]
DEFAULT_ROOT = "~/.cache/ptmst-ray/bench-quality"
RESULTS_MD = REPO / "bench" / "RESULTS.md"


def data_name(cfg) -> str:
    """The data a config scores on: the built-in generator's kind (shapes, scenes, scenes-alt) or the data set."""
    return cfg.data.builtin.kind if cfg.data.dataset == "builtin" else cfg.data.dataset


def section_and_stem(name: str) -> tuple[str, str]:
    """The RESULTS.md heading and the output file stem (bench/<stem>.md/.json/.png) of the matrix on ``name``:
    each data set has its own, so the matrix on one never overwrites another's."""
    if name in SECTIONS:
        return SECTIONS[name]
    safe = "".join(ch if ch.isalnum() else "_" for ch in name)
    return f"## Quality matrix on `{name}`", f"quality_{safe}"


# --------------------------------------------------------------------------- budgets and cells


def split_budget(total: int, shares: list[int]) -> list[int]:
    """``total`` pairs split in proportion to ``shares`` (largest remainder; ties go to the earlier phase).

    Every part must keep at least 2 pairs (a minibatch needs 2).
    """
    if not shares or any(s <= 0 for s in shares):
        raise ValueError(f"shares must be positive, got {shares}")
    weight = sum(shares)
    exact = [total * s / weight for s in shares]
    parts = [int(x) for x in exact]
    order = sorted(range(len(shares)), key=lambda i: (-(exact[i] - parts[i]), i))
    for i in order[: total - sum(parts)]:
        parts[i] += 1
    if min(parts) < 2:
        raise ValueError(f"a budget of {total} pairs split as {parts} (proportions {shares}) leaves a phase with "
                         "fewer than 2 pairs (a minibatch needs 2); use a larger budget")
    return parts


@dataclass(frozen=True)
class Cell:
    """One (method, budget) entry of the matrix and the config it runs with."""

    method: str
    budget: int
    cfg: Any  # ptmst_ray.config.Config
    draw: int = 0  # the distillation's draw: run.seed = the base config's + draw (--draws)

    @property
    def entry(self) -> str:
        """The matrix entry the cell is part of (the report pools its draws)."""
        return f"{self.method}@{self.budget}"

    @property
    def key(self) -> str:
        return self.entry if self.draw == 0 else f"{self.entry}~draw{self.draw}"

    @property
    def distilled(self) -> bool:
        return self.method in DISTILLED

    @property
    def score_method(self) -> str:
        """The scoring method name: a distilled cell is scored like `ptm_st` (its own distilled set)."""
        return "ptm_st" if self.distilled else self.method


def budget_phases(base, budget: int, method: str, one_phase_upto: int = 0) -> list:
    """The phase configs of ``method`` at ``budget``.

    single_phase, and every method at a budget of at most ``one_phase_upto`` pairs (the paper distils ONE
    phase at small budgets): one phase of the whole budget over the first phase's range and start window
    (`layout.single_phase_config`); otherwise the budget split between the config's phases in its proportions.
    A phase's minibatch is capped at its pairs.
    """
    from ptmst_ray import layout

    if method == "single_phase" or budget <= one_phase_upto:
        if budget < 2:
            raise ValueError(f"a budget of {budget} pairs cannot be distilled (a minibatch needs 2 pairs)")
        single = layout.single_phase_config(base)
        return [dataclasses.replace(single, pairs=budget, minibatch=min(single.minibatch, budget))]
    parts = split_budget(budget, [p.pairs for p in base.phases])
    return [dataclasses.replace(p, pairs=n, minibatch=min(p.minibatch, n)) for p, n in zip(base.phases, parts)]


def cell_config(base, method: str, budget: int, cells_dir: str, one_phase_upto: int = 0, draw: int = 0):
    """The base config at ``budget`` with ``method``'s overrides, phases under its own root, prerequisites shared.
    Draw d > 0 of a distilled method distils with run.seed + d (the phases' own seeds; data, towers, experts and
    evaluation seeds are the same) under ``<method>-draw<d>``."""
    from ptmst_ray import layout, storage

    overrides = {
        "phases": [dataclasses.asdict(p) for p in budget_phases(base, budget, method, one_phase_upto)],
        "run.root": storage.join(cells_dir, f"b{budget}", method if draw == 0 else f"{method}-draw{draw}"),
        "run.seed": base.run.seed + draw,
        "run.shared_root": layout.Layout.of(base).shared,
        "eval.baselines": [],
        **METHOD_OVERRIDES[method],
    }
    return base.replace(**overrides)


def make_cells(base, methods: list[str], budgets: list[int], cells_dir: str, one_phase_upto: int = 0,
               draws: int = 1) -> list[Cell]:
    """Every (method, budget) cell, a distilled method's in ``draws`` distillation draws (the random coreset and
    full data do not depend on run.seed: one each); single_phase is left out at one-phase budgets (there ptm_st IS
    the single-phase distillation: the same config)."""
    if draws < 1:
        raise ValueError(f"--draws must be at least 1, got {draws}")
    return [Cell(m, b, cell_config(base, m, b, cells_dir, one_phase_upto, d), d) for b in budgets for m in methods
            if not (m == "single_phase" and b <= one_phase_upto) for d in range(draws if m in DISTILLED else 1)]


def quick_budgets(budgets: list[int], one_phase_upto: int = 0) -> list[int]:
    """--quick's budgets: the smallest one-phase budget and the smallest budget that uses every phase."""
    one = [b for b in sorted(budgets) if b <= one_phase_upto][:1]
    multi = [b for b in sorted(budgets) if b > one_phase_upto][:1]
    return one + multi


def pack_waves(jobs: list[tuple[str, int]], slots: int) -> list[list[str]]:
    """First-fit packing of (name, Train runs) into waves of at most ``slots`` concurrent runs (order kept)."""
    waves: list[tuple[int, list[str]]] = []
    for name, n in jobs:
        for i, (used, names) in enumerate(waves):
            if used + n <= slots:
                waves[i] = (used + n, names + [name])
                break
        else:
            waves.append((n, [name]))
    return [names for _, names in waves]


# --------------------------------------------------------------------------- Ray stages


class PlainUI:
    """Stage headers, and at most one line every ``every`` seconds summarising the progress board."""

    def __init__(self, t0: float, every: float = 30.0):
        self.t0, self.every, self.last = t0, every, 0.0

    def stage(self, name: str) -> None:
        say(self.t0, f"== {name}")

    def update(self, tasks: dict[str, dict]) -> None:
        now = time.monotonic()
        if now - self.last < self.every or not tasks:
            return
        self.last = now
        busy = [f"{n} {t['done']:.0f}/{t['total']:.0f}" for n, t in sorted(tasks.items()) if t["done"] < t["total"]]
        if busy:
            say(self.t0, "   running: " + ", ".join(busy[:8]) + (f" (+{len(busy) - 8})" if len(busy) > 8 else ""))


def say(t0: float, text: str) -> None:
    print(f"[{time.time() - t0:7.0f}s] {text}", flush=True)


def _import_ray_parts():
    import ray

    from ptmst_ray.device import set_threads
    from ptmst_ray.orchestration.runtime import report_progress
    from ptmst_ray.layout import Layout
    from ptmst_ray.stages.data import has_val
    from ptmst_ray.stages.score import schedule, score_one_seed

    @ray.remote(num_cpus=1)
    def score_task(cfg_dict: dict, method: str, seed: int, label: str, board=None) -> dict:
        """One evaluation seed of one cell: the pipeline's scoring, labelled for the progress board."""
        from ptmst_ray.config import from_dict

        set_threads(1)
        cfg = from_dict(cfg_dict)
        epochs = schedule(cfg.eval, method, has_val(Layout.of(cfg).data))["epochs"]  # full by val: the most
        t = time.time()
        out = score_one_seed(cfg, method, seed, progress=lambda r: report_progress(board, label, r.get("epoch", 0),
                                                                                  epochs))
        report_progress(board, label, epochs, epochs, f"r_mean {out['best']['r_mean']:.1f}")
        return {**out, "seconds": time.time() - t}

    return ray, score_task


def pending_runs(cfg) -> int:
    """Phases of ``cfg`` with neither a finished subset nor a kept diverged state (both count as distilled)."""
    from ptmst_ray.layout import phase_jobs, phase_outcome

    return sum(phase_outcome(cfg, job).status == "none" for job in phase_jobs(cfg, with_baseline=False))


def finish_cell(cell: Cell, status: dict[str, dict], t: float) -> dict:
    """Aggregate a cell whose phases all ran (a diverged phase contributes its last finite EMA state, as in
    `ptmst-ray run`); the result records each phase's matching loss over iterations, final step sizes and
    learned similarity (`phase_record`), its final losses and any diverged phase."""
    from ptmst_ray.stages.aggregate import aggregate
    from ptmst_ray.layout import StageError

    failed = {n: s for n, s in status.items() if s.get("status") not in ("done", "diverged")}
    diverged = sorted(n for n, s in status.items() if s.get("status") == "diverged")
    if failed:
        return {"status": "failed", "seconds": time.time() - t,
                "detail": "; ".join(f"{n}: {s.get('status')} ({s.get('detail')})" for n, s in failed.items())}
    try:
        aggregate(cell.cfg)
    except StageError as e:
        return {"status": "failed", "seconds": time.time() - t, "detail": str(e), "diverged": diverged}
    phases = {name: phase_record(cell.cfg, name) for name in sorted(status)}
    losses = {n: r["loss_last"] for n, r in phases.items() if r.get("loss_last") is not None}
    return {"status": "done", "seconds": time.time() - t, "final_loss": losses, "diverged": diverged,
            "phases": phases}


def phase_record(cfg, name: str) -> dict:
    """What one phase of a cell did, from its files: the matching loss at every report (metrics.json), the raw
    step sizes at the last report, and from its saved subset (complete or diverged) the EMA step sizes and the
    learned similarity S (mean diagonal, mean off-diagonal, largest |S - I|). The loss M is the sum of the image
    and text towers' normalised distances (docs/method.md: each is 1 where the student got no closer to the target
    than its start), so M = 2 is no progress; the last report's two parts are kept too."""
    from ptmst_ray import storage
    from ptmst_ray.distill.export import load_subset
    from ptmst_ray.layout import Layout, phase_jobs, phase_outcome

    url = Layout.of(cfg).metrics(name)
    hist = storage.read_json(url) if storage.exists(url) else []
    rec: dict[str, Any] = {"curve": [[int(h["iteration"]), round(float(h["loss"]), 4)] for h in hist]}
    if hist:
        losses = [float(h["loss"]) for h in hist]
        rec.update(loss_first=round(losses[0], 4), loss_last=round(losses[-1], 4), loss_min=round(min(losses), 4),
                   loss_img_last=float(hist[-1]["loss_img"]), loss_txt_last=float(hist[-1]["loss_txt"]),
                   alpha_img_raw=float(hist[-1]["alpha_img"]), alpha_txt_raw=float(hist[-1]["alpha_txt"]))
    job = next(j for j in phase_jobs(cfg, with_baseline=False) if j.name == name)
    outcome = phase_outcome(cfg, job)
    if outcome.dir is not None:
        sub = load_subset(outcome.dir)
        rec.update(alpha_img=sub.alpha_img, alpha_txt=sub.alpha_txt, **similarity_stats(sub.similarity.double()))
    return rec


def refresh_phase_records(res: dict) -> None:
    """Re-read every distilled cell's `phase_record` from its root (when the root and its config.yaml are still
    there), so a report rewritten from an earlier run's json shows what the files hold now."""
    from ptmst_ray import storage
    from ptmst_ray.config import from_dict
    import yaml

    for c in res["cells"].values():
        url = storage.join(c["root"], "config.yaml") if c.get("phases") is not None else None
        if url and storage.exists(url):
            cfg = from_dict(yaml.safe_load(storage.read_text(url)))
            c["phases"] = {name: phase_record(cfg, name) for name in c["phases"]}


def similarity_stats(sim) -> dict:
    """Mean diagonal, mean off-diagonal and largest |S - I| entry of a square similarity matrix S (a tensor)."""
    import torch

    n = sim.shape[0]
    eye = torch.eye(n, dtype=sim.dtype)
    off = (sim * (1 - eye)).sum() / (n * n - n) if n > 1 else torch.tensor(0.0)
    return {"sim_diag": float(sim.diagonal().mean()), "sim_offdiag": float(off),
            "sim_max_dev": float((sim - eye).abs().max())}


def distil_cell(cell: Cell, board) -> dict:
    """The cell's phases as concurrent Train runs (complete ones are skipped), then its aggregated set."""
    from ptmst_ray import storage
    from ptmst_ray.orchestration.phases import run_phases

    t = time.time()
    storage.write_text(storage.join(cell.cfg.run.root, "config.yaml"), cell.cfg.to_yaml())
    return finish_cell(cell, run_phases(cell.cfg, board, None, with_baseline=False), t)


def distil_all(cells: list[Cell], board, poll, t0: float, slots: int) -> dict[str, dict]:
    """Distil every distilled cell, waves of cells whose Train runs together fit the cluster's slots."""
    from ptmst_ray.layout import phase_name

    out: dict[str, dict] = {}
    todo = []
    for c in cells:
        if not c.distilled:
            continue
        runs = pending_runs(c.cfg)
        if runs == 0:  # every phase ran before: aggregate (skipped when up to date) and record
            status = {phase_name(i): _phase_status(c.cfg, i) for i in range(len(c.cfg.phases))}
            out[c.key] = {**finish_cell(c, status, time.time()), "skipped": True}
        else:
            todo.append((c.key, min(runs, slots)))
    for k in sorted(out):
        detail = f" {out[k]['detail']}" if out[k].get("detail") else ""
        say(t0, f"distilled {k}: {out[k]['status']} (ran before){_diverged_note(out[k])}{detail}")
    by_key = {c.key: c for c in cells}
    waves = pack_waves(todo, slots)
    for w, wave in enumerate(waves, 1):
        say(t0, f"wave {w}/{len(waves)}: {', '.join(wave)}")
        with concurrent.futures.ThreadPoolExecutor(len(wave)) as pool:
            futures = {pool.submit(distil_cell, by_key[k], board): k for k in wave}
            pending = set(futures)
            while pending:
                done, pending = concurrent.futures.wait(pending, timeout=0.5)
                poll()
                for f in done:
                    k = futures[f]
                    try:
                        out[k] = f.result()
                    except Exception as e:  # noqa: BLE001 - one failed cell must not lose the others
                        out[k] = {"status": "failed", "seconds": 0.0, "detail": f"{type(e).__name__}: {e}"}
                    r = out[k]
                    extra = f"final M {r['final_loss']}" if r["status"] == "done" else r.get("detail", "")
                    say(t0, f"distilled {k}: {r['status']} in {r['seconds']:.0f}s {extra}{_diverged_note(r)}")
    return out


def _phase_status(cfg, i: int) -> dict:
    """Status of phase ``i`` when it has run (pending_runs == 0): done, else its diverged state is kept."""
    from ptmst_ray.layout import phase_jobs, phase_outcome

    return {"status": phase_outcome(cfg, phase_jobs(cfg, with_baseline=False)[i]).status}


def _diverged_note(r: dict) -> str:
    return f" (DIVERGED: {', '.join(r['diverged'])}; their last finite EMA state is used)" if r.get("diverged") else ""


def full_score_key(cfg, seed: int) -> str:
    """The cache key of one full-data seed's scores: the pipeline's own (`stages.score.score_key`): the data, the
    towers and their pretraining (a run's own pretrained checkpoint counts by its pretraining settings, not by the
    path of the root it lies in, so a copied root reuses the scores) and the full-data student's evaluation
    settings; not run.seed (another distillation draw reuses them)."""
    from ptmst_ray.stages.score import score_key

    return score_key(cfg, "full", seed)


def full_score_path(cells_dir: str, cfg, seed: int) -> str:
    from ptmst_ray import storage

    return storage.join(cells_dir, "full", f"seed{seed}-{full_score_key(cfg, seed)}.json")


def load_full_score(cells_dir: str, cfg, seed: int) -> dict | None:
    """A full-data seed scored before with the same settings (``store_full_score``), else None."""
    from ptmst_ray import storage

    path = full_score_path(cells_dir, cfg, seed)
    if not storage.exists(path):
        return None
    entry = json.loads(storage.read_text(path))
    return {**entry["run"], "reused": {"path": path, "commit": entry.get("commit"), "date": entry.get("date")}}


def store_full_score(cells_dir: str, cfg, seed: int, run: dict) -> None:
    from ptmst_ray import storage

    entry = {"key": full_score_key(cfg, seed), "commit": _commit(), "date": datetime.date.today().isoformat(),
             "run": run}
    storage.write_text(full_score_path(cells_dir, cfg, seed), json.dumps(entry, default=str))


def _commit() -> str | None:
    import subprocess

    try:
        return subprocess.run(["git", "-C", str(REPO), "rev-parse", "--short", "HEAD"], capture_output=True,
                              text=True, check=True).stdout.strip() or None
    except (OSError, subprocess.CalledProcessError):
        return None


def score_all(cells: list[Cell], full_cfg, seeds: int, board, poll, t0: float, distill: dict,
              cells_dir: str | None = None, rescore_full: bool = False) -> dict[str, list]:
    """Every (cell, seed) and the full-data seeds as parallel Ray tasks; returns the runs per cell key. With
    ``cells_dir``, full-data seeds scored before with the same settings are reused (unless ``rescore_full``)
    and new ones are stored there: the full-data baseline is the evaluation's longest task and does not
    depend on the cells."""
    ray, score_task = _import_ray_parts()
    refs: dict = {}
    for c in cells:
        if c.distilled and distill.get(c.key, {}).get("status") != "done":
            continue
        for s in range(seeds):
            refs[score_task.remote(c.cfg.to_dict(), c.score_method, s, f"eval {c.key} s{s}", board)] = c.key
    runs: dict[str, list] = {}
    for s in range(seeds):
        cached = None if rescore_full or cells_dir is None else load_full_score(cells_dir, full_cfg, s)
        if cached is not None:
            runs.setdefault("full", []).append(cached)
        else:
            refs[score_task.remote(full_cfg.to_dict(), "full", s, f"eval full s{s}", board)] = "full"
    if runs.get("full"):
        say(t0, f"full data: {len(runs['full'])} seed(s) reused from {cells_dir}/full (--rescore-full redoes them)")
    expected = {k: sum(1 for v in refs.values() if v == k) + len(runs.get(k, [])) for k in set(refs.values())}
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1, timeout=0.5)
        poll()
        for ref in ready:
            key = refs[ref]
            runs.setdefault(key, []).append(ray.get(ref))
            if key == "full" and cells_dir is not None:
                store_full_score(cells_dir, full_cfg, runs[key][-1]["seed"], runs[key][-1])
            if len(runs[key]) == expected[key]:
                best = [r["best"]["r_mean"] for r in runs[key]]
                say(t0, f"scored {key}: r_mean best {sum(best) / len(best):.1f} over {len(best)} seeds "
                        f"({sum(r['seconds'] for r in runs[key]):.0f}s of task time)")
    return runs


# --------------------------------------------------------------------------- figures


def cell_figures(runs: list[dict], cfg, method: str) -> dict:
    """Mean/std of a cell's seeds (the pipeline's `summarise`): "best" (the point chosen on val when the data has
    a val split, else on test: "selection"), "best_on_test" (the paper's figure) and "final" metrics."""
    from ptmst_ray.evaluate.metrics import METRIC_NAMES
    from ptmst_ray.stages.score import summarise

    summary = summarise(runs, cfg)
    m = summary["methods"][runs[0]["method"]]
    return {"method": method, "pairs": m["pairs"], "seeds": m["seeds"], "epochs": m["epochs"],
            "selection": summary["selection"], "best": {k: m[k] for k in METRIC_NAMES}, "final": m["final"],
            "best_on_test": m["best_on_test"], **({"val": m["val"]} if "val" in m else {}), "epochs_run": m["epochs_run"],
            "best_epochs": [r["best_epoch"] for r in runs],
            "diverged": [r["diverged_at"] for r in runs if r["diverged_at"]],
            "eval_task_seconds": sum(r.get("seconds", 0.0) for r in runs)}


def ratios(cells: dict[str, dict], full: dict | None) -> list[dict]:
    """Per (budget, distilled method): r_mean / random's at the same budget and / full data (best and final)."""
    rows = []
    for key, c in cells.items():
        if c["method"] not in DISTILLED or "best" not in c:
            continue
        row = {"budget": c["budget"], "method": c["method"]}
        rnd = cells.get(f"random@{c['budget']}")
        for which in ("best", "final"):
            top = c[which]["r_mean"]["mean"]
            row[f"random_{which}"] = _ratio(top, rnd[which]["r_mean"]["mean"]) if rnd and which in rnd else None
            row[f"full_{which}"] = _ratio(top, full[which]["r_mean"]["mean"]) if full else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["budget"], DISTILLED.index(r["method"])))


def _ratio(a: float, b: float) -> float | None:
    return a / b if b > 0 else None


def gap_closed(value: float, random: float, full: float) -> float | None:
    """The share of the random-to-full gap a method closes at one budget: (value - random) / (full - random);
    None when full data does not score above the random coreset (no gap to close)."""
    return (value - random) / (full - random) if full > random else None


def gaps(cells: dict[str, dict], full: dict | None) -> list[dict]:
    """Per (budget, distilled method): the gap closed, from the "best" (val-selected when the data has a val
    split) and the "best_on_test" means of the method, the random coreset at its budget and full data (None for
    a figure one of the three lacks: reports written before best-on-test was kept have "best" alone)."""
    rows = []
    if full is None:
        return rows
    for c in cells.values():
        rnd = cells.get(f"random@{c['budget']}")
        if c["method"] not in DISTILLED or "best" not in c or not rnd or "best" not in rnd:
            continue
        row = {"budget": c["budget"], "method": c["method"]}
        for which in ("best", "best_on_test"):
            have = all(which in x for x in (c, rnd, full))
            row[which] = gap_closed(c[which]["r_mean"]["mean"], rnd[which]["r_mean"]["mean"],
                                    full[which]["r_mean"]["mean"]) if have else None
        rows.append(row)
    return sorted(rows, key=lambda r: (r["budget"], DISTILLED.index(r["method"])))


def compare(a: dict | None, b: dict | None, which: str = "best") -> dict | None:
    """Cell ``a`` against cell ``b`` on r_mean: margin (a - b, means), std_sum (a's std + b's), whether a
    beats b by more than the sum of the stds (the issue's test), and the same seed by seed (:func:`paired`, None
    without both cells' runs); None when either was not scored."""
    if not a or not b or which not in a or which not in b:
        return None
    sa, sb = a[which]["r_mean"], b[which]["r_mean"]
    margin, std_sum = sa["mean"] - sb["mean"], sa["std"] + sb["std"]
    return {"margin": margin, "std_sum": std_sum, "beats": margin > std_sum, "paired": paired(a, b, which)}


def paired(a: dict, b: dict, which: str = "best") -> dict | None:
    """Cell ``a`` against cell ``b`` seed by seed (the pipeline's ``per_seed_difference``: evaluation seed s trains
    both cells' students from the same initialisation) on r_mean: {"seeds", "ahead", "mean", "std"}; None when
    the cells share no scored seed."""
    from ptmst_ray.evaluate.protocol import per_seed_difference

    def by_seed(cell: dict) -> dict:  # with --draws, a pair is one draw's one evaluation seed in both cells
        return {(r.get("draw", 0), r["seed"]): r[which]["r_mean"] for r in cell.get("runs") or [] if r.get(which)}

    return per_seed_difference(by_seed(a), by_seed(b))


def targets(cells: dict[str, dict], full: dict | None, budgets: list[int]) -> list[dict]:
    """Issue #25's targets per budget, on the "best" (val-selected) figures: PTM-ST's gap closed (target >=
    GAP_TARGET), PTM-ST against single-phase (target: ahead by more than the sum of the stds; None at a
    one-phase budget, where ptm_st is the single-phase distillation) and exact against first_order (target:
    exact's mean >= first_order's)."""
    rows = []
    for b in budgets:
        ptm, rnd = cells.get(f"ptm_st@{b}"), cells.get(f"random@{b}")
        gap = None
        if ptm and rnd and full and "best" in ptm and "best" in rnd:
            gap = gap_closed(ptm["best"]["r_mean"]["mean"], rnd["best"]["r_mean"]["mean"], full["best"]["r_mean"]["mean"])
        vs_single = compare(ptm, cells.get(f"single_phase@{b}"))
        exact = compare(cells.get(f"ptm_st_exact@{b}"), ptm)
        rows.append({"budget": b, "gap": gap, "gap_met": None if gap is None else gap >= GAP_TARGET,
                     "vs_single": vs_single, "exact_vs_first_order": exact,
                     "exact_met": None if exact is None else exact["margin"] >= 0})
    return rows


def parts(cells: dict[str, dict], budgets: list[int]) -> list[dict]:
    """What each part of PTM-ST carries, per budget: ptm_st minus the cell without it (phases: single_phase;
    shortcut: no_shortcut; EMA: no_ema; learned similarity: fixed_similarity; learned step sizes:
    fixed_step_sizes), with the sum of the stds."""
    removed = (("phases", "single_phase"), ("shortcut", "no_shortcut"), ("EMA", "no_ema"),
               ("learned similarity", "fixed_similarity"), ("learned step sizes", "fixed_step_sizes"))
    rows = []
    for b in budgets:
        for part, method in removed:
            cmp = compare(cells.get(f"ptm_st@{b}"), cells.get(f"{method}@{b}"))
            if cmp is not None:
                rows.append({"budget": b, "part": part, "without": method, **cmp})
    return rows


def _pm(stat: dict) -> str:
    return f"{stat['mean']:.1f} ± {stat['std']:.1f}"


def _num(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.2f}"


def metric_table(cells: dict[str, dict], full: dict | None, which: str, on_test: bool = False) -> str:
    """Markdown rows: budget, method, pairs, r_mean mean ± std (with ``on_test``: then the best-on-test r_mean
    beside it), the six recalls (means) for ``which``."""
    extra = "r_mean best on test | " if on_test else ""
    lines = [f"| budget | method | pairs | r_mean | {extra}" + " | ".join(RECALLS) + " |",
             "|---:|---|---:|---:|" + "---:|" * (len(RECALLS) + on_test)]

    def row(budget, method, pairs, c):
        m = c[which]
        test = f"{_pm(c['best_on_test']['r_mean'])} | " if on_test else ""
        return (f"| {budget} | {method} | {pairs} | {_pm(m['r_mean'])} | {test}"
                + " | ".join(f"{m[r]['mean']:.1f}" for r in RECALLS) + " |")

    for c in sorted(cells.values(), key=lambda c: (c["budget"], _method_rank(c["method"]))):
        if which not in c:
            lines.append(f"| {c['budget']} | {c['method']} | | {c.get('status', 'missing')} |"
                         + " |" * (len(RECALLS) + on_test))
        else:
            lines.append(row(c["budget"], c["method"], c["pairs"], c))
    if full is not None:
        lines.append(row("all", "full", full["pairs"], full))
    return "\n".join(lines)


def _method_rank(method: str) -> int:
    order = BASE_METHODS + ABLATIONS
    return order.index(method) if method in order else len(order)


def md_table(head: list[str], align: str, rows: list[list]) -> str:
    """A markdown table: ``head`` cells, ``align`` one letter a column (l: left, r: right), ``rows`` of cells."""
    bar = "|" + "".join("---|" if a == "l" else "---:|" for a in align)
    return "\n".join(["| " + " | ".join(head) + " |", bar, *("| " + " | ".join(map(str, r)) + " |" for r in rows)])


def ratio_table(rows: list[dict]) -> str:
    return md_table(["budget", "method", "/ random (best)", "/ random (final)", "/ full (best)", "/ full (final)"],
                    "rlrrrr", [[r["budget"], r["method"], _num(r["random_best"]), _num(r["random_final"]),
                                _num(r["full_best"]), _num(r["full_final"])] for r in rows])


def timing_table(cells: dict[str, dict]) -> str:
    lines = ["| budget | method | distillation s (wall, wave shared) | evaluation s (sum of seed tasks) |",
             "|---:|---|---:|---:|"]
    for c in sorted(cells.values(), key=lambda c: (c["budget"], _method_rank(c["method"]))):
        d = c.get("distill_seconds")
        dist = "" if d is None else ("skipped" if c.get("distill_skipped") else f"{d:.0f}")
        lines.append(f"| {c['budget']} | {c['method']} | {dist} | {c.get('eval_task_seconds', 0.0):.1f} |")
    return "\n".join(lines)


def cell_notes(cells: dict[str, dict]) -> list[str]:
    """Report lines for cells whose distillation failed or had a diverged phase."""
    notes = [f"* {k}: phases {', '.join(c['diverged_phases'])} diverged; scored with their last finite EMA state"
             for k, c in cells.items() if c.get("diverged_phases")]
    notes += [f"* {k}: {c['status']}: {c.get('distill_detail')}" for k, c in cells.items()
              if c.get("status") not in ("done", None)]
    notes += [f"* {k}: draw {d['draw']} (run.seed {d['run_seed']}) {d['status']}: left out of the pooled figures"
              for k, c in cells.items() for d in c.get("draws") or [] if d["status"] != "done"]
    return ["", "Notes:", "", *notes] if notes else []


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.0f}%"


def _gap_pct(x: float | None) -> str:
    """The gap closed against its target: one decimal where whole percent would round a miss up to the target."""
    if x is not None and x < GAP_TARGET and round(100 * x) >= round(100 * GAP_TARGET):
        return f"{100 * x:.1f}%"
    return _pct(x)


def gap_table(rows: list[dict], on_test: bool) -> str:
    """Gap closed per (budget, method); with ``on_test`` also from the best-on-test figures."""
    head = ["budget", "method", "gap closed"] + (["gap closed (best on test)"] if on_test else [])
    return md_table(head, "rlr" + "r" * on_test, [[r["budget"], r["method"], _pct(r["best"])]
                                                  + ([_pct(r["best_on_test"])] if on_test else []) for r in rows])


def _vs(cmp: dict | None, na: str = "n/a") -> str:
    if cmp is None:
        return na
    pair = cmp.get("paired")
    seeds = (f" (per seed: ahead in {pair['ahead']} of {pair['seeds']}, {pair['mean']:+.1f} ± {pair['std']:.1f})"
             if pair else "")
    return f"{cmp['margin']:+.1f} vs std sum {cmp['std_sum']:.1f}{seeds}"


def _met(flag: bool | None) -> str:
    return "n/a" if flag is None else ("MET" if flag else "NOT MET")


def _met_within(flag: bool | None, cmp: dict | None) -> str:
    """MET / NOT MET, and a miss by less than the sum of the stds said so (the means alone decided it)."""
    if flag is False and cmp is not None and abs(cmp["margin"]) <= cmp["std_sum"]:
        return "NOT MET (within the std sum)"
    return _met(flag)


def targets_table(rows: list[dict], one_phase_upto: int, headline: int | None) -> str:
    """Issue #25's targets per budget (the headline budget in bold)."""
    out = []
    for r in rows:
        one = r["budget"] <= one_phase_upto
        out.append([f"**{r['budget']}**" if r["budget"] == headline else r["budget"], _gap_pct(r["gap"]),
                    _met(r["gap_met"]), _vs(r["vs_single"], "one phase: ptm_st is the single-phase set" if one else "n/a"),
                    "n/a" if r["vs_single"] is None else _met(r["vs_single"]["beats"]),
                    _vs(r["exact_vs_first_order"]), _met_within(r["exact_met"], r["exact_vs_first_order"])])
    return md_table(["budget", f"PTM-ST gap closed (>= {GAP_TARGET:.0%})", "", "PTM-ST - single_phase",
                     "beats by > std sum", "exact - first_order", "exact >= first_order"], "rrlrlrl", out)


def parts_table(rows: list[dict]) -> str:
    def seeds(pair: dict | None) -> str:
        return f"{pair['ahead']} of {pair['seeds']}" if pair else "n/a"

    return md_table(["budget", "part", "cell without it", "ptm_st - that cell (r_mean)", "std sum", "> std sum",
                     "seeds where ptm_st is ahead"], "rllrrlr",
                    [[r["budget"], r["part"], r["without"], f"{r['margin']:+.1f}", f"{r['std_sum']:.1f}",
                      "yes" if r["beats"] else "no", seeds(r.get("paired"))] for r in rows])


def draw_table(cells: dict[str, dict], full: dict | None) -> str:
    """Per distilled cell with several draws, each draw: its run.seed, its seeds' mean r_mean (val-selected, best
    on test, and on val at the chosen points: what a choice between recipes looks at), the gap it closes against
    the random coreset and full data, its final matching losses."""
    rows = []
    for c in sorted(cells.values(), key=lambda c: (c["budget"], _method_rank(c["method"]))):
        rnd = cells.get(f"random@{c['budget']}")
        for d in c.get("draws") or []:
            have = d["best"] is not None and full and rnd and "best" in rnd
            gap = gap_closed(d["best"], rnd["best"]["r_mean"]["mean"], full["best"]["r_mean"]["mean"]) if have else None
            loss = " / ".join(f"{v:.2f}" for _, v in sorted((d.get("final_loss") or {}).items()))
            rows.append([c["budget"], c["method"], d["draw"], d["run_seed"], d["seeds"], _num(d["best"]),
                         _num(d["best_on_test"]), _num(d.get("val")), _pct(gap), loss or d["status"]])
    return md_table(["budget", "method", "draw", "run.seed", "seeds", "r_mean", "r_mean best on test", "r_mean on val",
                     "gap closed", "final M per phase"], "rlrrrrrrrl", rows)


def curve_points(curve: list, most: int = 6) -> list:
    """At most ``most`` evenly spaced [iteration, loss] entries of a matching-loss curve, first and last kept."""
    if len(curve) <= most:
        return list(curve)
    return [curve[round(i * (len(curve) - 1) / (most - 1))] for i in range(most)]


def matching_table(cells: dict[str, dict]) -> str:
    """Per distilled cell and phase: the matching loss M = M_img + M_txt (first report, lowest, last, the last
    report's two parts, and a few points of its curve as iteration:loss; 2 = no progress), the learned step sizes
    (EMA) and the learned similarity's shape."""
    fmts = (("loss_first", "{:.3f}"), ("loss_min", "{:.3f}"), ("loss_last", "{:.3f}"), ("loss_img_last", "{:.3f}"),
            ("loss_txt_last", "{:.3f}"), ("alpha_img", "{:.4g}"),
            ("alpha_txt", "{:.4g}"), ("sim_diag", "{:.3f}"), ("sim_offdiag", "{:+.4f}"), ("sim_max_dev", "{:.3f}"))
    rows = [[c["budget"], c["method"], name, *("" if r.get(k) is None else f.format(r[k]) for k, f in fmts),
             " ".join(f"{i}:{v:.2f}" for i, v in curve_points(r.get("curve") or []))]
            for c in sorted(cells.values(), key=lambda c: (c["budget"], _method_rank(c["method"])))
            for name, r in sorted((c.get("phases") or {}).items())]
    return md_table(["budget", "method", "phase", "M first", "M min", "M last", "M_img last", "M_txt last",
                     "alpha_img", "alpha_txt", "S diag", "S off-diag", "max abs(S - I)", "M over iterations"],
                    "rll" + "r" * 10 + "l", rows)


def format_report(res: dict, details: str | None = None) -> str:
    """The markdown body (under the section heading): setup, tables, gap closed, targets, parts, then the per-phase
    matching table, final-epoch figures, ratios and timings; with ``details`` (the file that holds them) those
    last four are left out and a line points there (the RESULTS.md section)."""
    mach, ev = res["machine"], res["eval"]
    one = res.get("one_phase_upto", 0)
    splits = ", ".join(f"{b} = {' + '.join(map(str, p))}" + (" (one phase)" if int(b) <= one else "")
                       for b, p in res["splits"].items())
    capped = f" ({'; '.join(res['notes'])})" if res.get("notes") else ""
    sets = " with " + ", ".join(f"`{s}`" for s in res["overrides"]) if res["overrides"] else ""
    on_val = res.get("selection") == "val"
    if on_val:
        best_txt = (f"test recall at the evaluation point chosen on the val split (the honest figure; "
                    f"{ev['eval_points']} points per seed), the best-on-test r_mean (the paper's protocol) beside it")
        full_txt = (f"full data: trained until val r_mean stops improving (patience {ev['full_data_patience']} "
                    f"evaluations, at most {ev['full_data_max_epochs']} epochs; epochs run per seed "
                    f"{(res.get('full') or {}).get('epochs_run')})")
    else:
        best_txt = (f"best of {ev['eval_points']} evaluation points per seed (the paper's protocol, chosen on the "
                    f"test split: the data has no val split)")
        full_txt = f"full data: {ev['full_data_epochs']} epochs"
    reused = (res.get("full") or {}).get("reused") or []
    if reused:
        full_txt += (f"; its {len(reused)} seed(s) reused from an earlier run with the same data, model, "
                     f"pretraining and evaluation settings (computed at "
                     f"{', '.join(sorted({str(r.get('commit')) + ' on ' + str(r.get('date')) for r in reused}))})")
    one_txt = (f" Budgets of at most {one} pairs distil ONE phase (the first phase's range and start window, as "
               f"the paper does at small budgets), so there ptm_st is the single-phase distillation and no "
               f"single_phase cell is run." if one else "")
    gap_rows = gaps(res["cells"], res.get("full"))
    draws = res.get("draws", 1)
    draws_txt = (f" Each distilled cell is distilled {draws} times (run.seed + 0..{draws - 1}: the phases' own draws; "
                 f"data, towers, experts and evaluation seeds shared) and its figures pool the {draws} x "
                 f"{ev['seeds']} runs: the stds include the draws' spread, and a per-seed comparison pairs the same "
                 f"draw and evaluation seed." if draws > 1 else "")
    out = [
        f"Command: `{res['command']}`",
        "",
        f"Machine: nproc {mach['nproc']}, CPU \"{mach['cpu']}\", RAM {mach['ram_gib']:.1f} GiB, torch {mach['torch']}, "
        f"Python {mach['python']}, {mach['date']}; load average {mach['load_start']} at the start, "
        f"{mach['load_end']} at the end.",
        "",
        f"Wall time: {res['wall_seconds'] / 60:.1f} min (prerequisites {res['prereq_seconds'] / 60:.1f} min, "
        f"distillation {res['distill_seconds'] / 60:.1f} min, evaluation {res['eval_seconds'] / 60:.1f} min)."
        + (" Target (recorded, not asserted): the default matrix in under 40 min on 2 CPU cores."
           if res.get("data") == "shapes" else ""),
        "",
        f"Setup: config `{res['config']}`{sets} (data `{res.get('data', '?')}`); "
        f"budgets {res['budgets']} split between the phases as {splits}{capped}; {ev['seeds']} evaluation seeds per "
        f"cell (a fresh student initialisation each, and a different subset for the random coreset); "
        f"{ev['epochs']} evaluation epochs per subset ({full_txt}); eval loss {ev['loss']}; selection of the "
        f"reported point: {'val' if on_val else 'test'}.{one_txt}{draws_txt}"
        + (" QUICK development run: not the benchmark." if res.get("quick") else ""),
        "",
        f"### r_mean and recalls: {best_txt} (mean ± std over seeds; recalls are means)",
        "",
        metric_table(res["cells"], res.get("full"), "best", on_test=on_val),
        "",
        "### Gap closed: (method - random) / (full - random), r_mean means at the same budget"
        + (" (val-selected; best on test beside it)" if on_val else ""),
        "",
        gap_table(gap_rows, on_test=on_val),
        "",
        "### Targets (issue #25; " + ("val-selected" if on_val else "best-on-test") + " figures)",
        "",
        targets_table(targets(res["cells"], res.get("full"), res["budgets"]), one, res.get("headline")),
        "",
        "### What each part carries: ptm_st minus the cell without it",
        "",
        parts_table(parts(res["cells"], res["budgets"])),
        *(["", "### Each distillation draw: its seeds' mean r_mean and the gap it closes", "",
           draw_table(res["cells"], res.get("full"))] if draws > 1 else []),
        *cell_notes(res["cells"]),
    ]
    if details:
        out += ["", f"Per-phase matching losses, step sizes and similarity, final-epoch figures, ratios and per-cell "
                    f"times: `{details}` (its `.json`: every figure, per-seed run and matching-loss curve)."]
        return "\n".join(out) + "\n"
    out += [
        "",
        "### Matching loss and learned parameters per phase (from each cell's metrics.json and saved subset)",
        "",
        matching_table(res["cells"]),
        "",
        f"### r_mean and recalls at the final epoch ({ev['epochs']} epochs per subset)",
        "",
        metric_table(res["cells"], res.get("full"), "final"),
        "",
        "### Ratios of r_mean (distilled / random coreset at the same budget, distilled / full data)",
        "",
        ratio_table(res["ratios"]),
        "",
        "### Time per cell",
        "",
        timing_table(res["cells"]),
    ]
    return "\n".join(out) + "\n"


def replace_section(text: str, heading: str, body: str) -> str:
    """``text`` with the level-2 section ``heading`` replaced by ``heading + body`` (appended when absent).

    The section runs to the next line starting with "## " (not "###") or the end of the text.
    """
    lines = text.splitlines(keepends=True)
    new = [heading + "\n", "\n", body if body.endswith("\n") else body + "\n"]
    start = next((i for i, line in enumerate(lines) if line.rstrip("\n") == heading), None)
    if start is None:
        sep = "" if not text or text.endswith("\n\n") else ("\n" if text.endswith("\n") else "\n\n")
        return text + sep + "".join(new)
    end = next((i for i in range(start + 1, len(lines)) if lines[i].startswith("## ")), len(lines))
    tail = lines[end:]
    return "".join(lines[:start] + new + (["\n"] if tail else []) + tail)


def plot_matrix(res: dict, path: Path) -> None:
    """r_mean against budget per method (left: best of points, right: final), full data as a line."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    methods = sorted({c["method"] for c in res["cells"].values()}, key=_method_rank)
    for ax, which in zip(axes, ("best", "final")):
        for j, m in enumerate(methods):
            pts = sorted((c["budget"], c[which]["r_mean"]) for c in res["cells"].values()
                         if c["method"] == m and which in c)
            shift = 1.0 + 0.015 * (j - (len(methods) - 1) / 2)  # side by side, so the error bars stay readable
            if pts:
                ax.errorbar([b * shift for b, _ in pts], [s["mean"] for _, s in pts], yerr=[s["std"] for _, s in pts],
                            marker="o", capsize=3, label=m, linestyle="--" if m in ABLATIONS else "-")
        if res.get("full"):
            ax.axhline(res["full"][which]["r_mean"]["mean"], color="black", linestyle=":", label="full data")
        ax.set_xscale("log")
        ax.set_xlabel("total pairs (budget, log scale)")
        ax.set_xticks(res["budgets"], [str(b) for b in res["budgets"]])
        ax.minorticks_off()
        chosen = "val-selected point" if res.get("selection") == "val" else "best of evaluation points (on test)"
        ax.set_title(chosen if which == "best" else f"final epoch ({res['eval']['epochs']})")
        ax.grid(alpha=0.3)
    axes[0].set_ylabel(f"r_mean (%), mean ± std over {res['eval']['seeds']} seeds")
    axes[1].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


# --------------------------------------------------------------------------- machine and driver


def machine_info() -> dict:
    import torch

    cpu = "unknown"
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    ram = 0.0
    try:
        kb = next(int(line.split()[1]) for line in Path("/proc/meminfo").read_text().splitlines()
                  if line.startswith("MemTotal"))
        ram = kb / 2**20
    except (OSError, StopIteration):
        pass
    return {"nproc": os.cpu_count(), "cpu": cpu, "ram_gib": ram, "torch": torch.__version__,
            "python": platform.python_version(), "date": datetime.date.today().isoformat(),
            "load_start": _load()}


def _load() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--config", default=str(REPO / "configs" / "toy.yaml"))
    ap.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                    help="config override (repeatable), applied to every cell")
    ap.add_argument("--budgets", type=int, nargs="+", default=[20, 50, 100], help="total pairs per cell")
    ap.add_argument("--seeds", type=int, default=None, help="evaluation seeds per cell (default: eval.seeds)")
    ap.add_argument("--draws", type=int, default=1, metavar="D",
                    help="distil each distilled cell D times, with run.seed, run.seed + 1, ... (the phases' own "
                         "draws; data, towers, experts and evaluation seeds shared) and pool the D x seeds runs: "
                         "the figures then weigh the distillation's draw, not only the evaluation's (default 1)")
    ap.add_argument("--methods", nargs="+", default=list(BASE_METHODS), choices=BASE_METHODS + ABLATIONS)
    ap.add_argument("--ablations", action="store_true", help=f"add {', '.join(ABLATIONS)}")
    ap.add_argument("--one-phase-upto", type=int, default=0, metavar="N",
                    help="budgets of at most N pairs distil ONE phase of the whole budget (the first phase's range "
                         "and window), as the paper does at small budgets (default 0: every budget uses all phases)")
    ap.add_argument("--headline", type=int, default=None, metavar="BUDGET",
                    help="the budget the issue's targets are judged at (marked in the targets table)")
    ap.add_argument("--name", default=None, help="the data's name for the RESULTS.md section and output files "
                                                 "(default: the built-in kind or the data set of the config)")
    ap.add_argument("--eval-epochs", type=int, default=None, help="evaluation epochs per subset (default: eval.epochs)")
    ap.add_argument("--root", default=DEFAULT_ROOT, help="run root shared by every cell")
    ap.add_argument("--out", default=None, help="markdown output; .png and .json beside it (default "
                                                "bench/<stem>.md, e.g. quality_matrix.md for the shapes, "
                                                "quality_scenes.md for scenes; --quick: <root>/quick/<stem>.md)")
    ap.add_argument("--write-results", action="store_true",
                    help="replace the data's own section of bench/RESULTS.md (" +
                         "; ".join(f"{k}: {v[0]!r}" for k, v in SECTIONS.items()) + ")")
    ap.add_argument("--from-json", default=None, metavar="JSON",
                    help="run nothing: rewrite the outputs (and with --write-results the RESULTS.md section) from the "
                         ".json of an earlier run, e.g. after a change to the report's format")
    ap.add_argument("--rescore-full", action="store_true",
                    help="score the full-data baseline again instead of reusing its stored scores (cells/full/: "
                         "kept per data, model, pretraining and evaluation settings and seed)")
    ap.add_argument("--quick", action="store_true", help="development: the smallest budget of each kind (one "
                                                         "phase, all phases), 10 iterations per phase, 2 seeds, 5 "
                                                         "eval epochs, full data at most 5 (cells under "
                                                         "<root>/cells-quick)")
    return ap.parse_args(argv)


def build_base(args: argparse.Namespace):
    """The shared base config (run.root = --root), with --quick's reductions applied."""
    from ptmst_ray.config import load_config

    base = load_config(args.config, [*args.overrides, f"run.root={args.root}"])
    extra: dict[str, Any] = {}
    if args.quick:
        extra.update({f"phases.{i}.iterations": min(p.iterations, 10) for i, p in enumerate(base.phases)})
        extra.update({"eval.full_data_epochs": min(base.eval.full_data_epochs, 5),
                      "eval.full_data_max_epochs": min(base.eval.full_data_max_epochs, 5),
                      "eval.full_data_val_every": 1})
    epochs = args.eval_epochs or (min(base.eval.epochs, 5) if args.quick else base.eval.epochs)
    seeds = args.seeds or (min(base.eval.seeds, 2) if args.quick else base.eval.seeds)
    extra.update({"eval.epochs": epochs, "eval.seeds": seeds, "eval.eval_points": min(base.eval.eval_points, epochs)})
    return base.replace(**extra)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    if args.quick and args.write_results:
        raise SystemExit("--quick runs are for development; they do not go into bench/RESULTS.md")
    if args.from_json:
        res = json.loads(Path(args.from_json).read_text())
        res.setdefault("data", "shapes")  # reports written before `scenes` existed are the toy's
        res.setdefault("section", section_and_stem(res["data"])[0])
        refresh_phase_records(res)
        if res.get("quick") and args.write_results:
            raise SystemExit(f"{args.from_json} is a --quick run's; it does not go into bench/RESULTS.md")
        write_outputs(res, Path(args.out) if args.out else REPO / "bench" / f"{section_and_stem(res['data'])[1]}.md",
                      args.write_results)
        return res
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    os.environ.setdefault("RAY_ENABLE_UV_RUN_RUNTIME_ENV", "0")
    t0 = time.time()
    machine = machine_info()
    base = build_base(args)
    methods = list(dict.fromkeys(args.methods + (list(ABLATIONS) if args.ablations else [])))
    budgets = sorted(set(args.budgets))
    if args.quick:
        budgets = quick_budgets(budgets, args.one_phase_upto)
    from ptmst_ray import storage

    cells_dir = storage.join(base.run.root, "cells-quick" if args.quick else "cells")
    # validates every cell's config before Ray starts
    cells = make_cells(base, methods, budgets, cells_dir, args.one_phase_upto, args.draws)
    section, stem = section_and_stem(args.name or data_name(base))
    out = Path(args.out) if args.out else (Path(os.path.expanduser(args.root)) / "quick" / f"{stem}.md"
                                           if args.quick else REPO / "bench" / f"{stem}.md")
    command = ".venv/bin/python bench/bench_quality.py " + " ".join(shlex.quote(a) for a in (argv or sys.argv[1:]))
    say(t0, f"{len(cells)} cells ({', '.join(methods)} x budgets {budgets}"
            + (f", {args.draws} draws of each distilled one" if args.draws > 1 else "") + f"), {base.eval.seeds} seeds, "
            f"{base.eval.epochs} eval epochs; root {base.run.root}")

    import ray

    from ptmst_ray.orchestration.pipeline import run_prerequisites
    from ptmst_ray.orchestration.runtime import connect, install_interrupt_handler, make_poll, progress_board
    from ptmst_ray.stages import expert_lr, windows

    install_interrupt_handler()  # Ctrl-C lands at the next poll (inside Ray's blocking calls it can be lost)
    info = connect(base.run.address)
    say(t0, f"Ray: {info.cpus:.0f} CPUs, {info.gpus:.0f} GPUs")
    ui = PlainUI(t0)
    board = progress_board()
    ray.get(board.clear.remote())
    poll = make_poll(board, ui)
    storage.write_text(storage.join(base.run.root, "config.yaml"), base.to_yaml())
    prereq_cfg = base.replace(**{"eval.baselines": ["single_phase"]})  # its range gets shortcuts too
    run_prerequisites(prereq_cfg, ui, board, poll)
    picked = windows.resolved(expert_lr.resolved(base))  # lr or range ends auto: the cells take the rules' picks
    if picked != base:
        base = picked
        cells = make_cells(base, methods, budgets, cells_dir, args.one_phase_upto, args.draws)
    t_prereq = time.time()
    ui.stage("distillation (cells in waves of concurrent Train runs)")
    ray.get(board.clear.remote())
    slots = info.parallel_slots(base.distill.gpus_per_phase)
    distill = distil_all(cells, board, poll, t0, slots)
    t_distill = time.time()
    ui.stage(f"evaluation ({len(cells)} cells + full data, {base.eval.seeds} seeds each, Ray tasks)")
    ray.get(board.clear.remote())
    runs = score_all(cells, base, base.eval.seeds, board, poll, t0, distill, cells_dir, args.rescore_full)
    t_eval = time.time()
    res = assemble(args, base, cells, distill, runs, machine, command)
    res.update(section=section, data=data_name(base), one_phase_upto=args.one_phase_upto, headline=args.headline)
    res.update(wall_seconds=t_eval - t0, prereq_seconds=t_prereq - t0, distill_seconds=t_distill - t_prereq,
               eval_seconds=t_eval - t_distill)
    res["machine"]["load_end"] = _load()
    write_outputs(res, out, args.write_results)
    return res


def assemble(args, base, cells: list[Cell], distill: dict, runs: dict, machine: dict, command: str) -> dict:
    """The report's data: one entry per (method, budget), its draws' runs pooled (each run tagged with its draw)."""
    table: dict[str, dict] = {}
    entries: dict[str, list[Cell]] = {}
    for c in cells:
        entries.setdefault(c.entry, []).append(c)
    for key, group in entries.items():
        c = group[0]  # draw 0: the cell's phases, matching losses and root are its
        entry: dict[str, Any] = {"method": c.method, "budget": c.budget, "pairs": c.cfg.total_pairs,
                                 "phase_pairs": [p.pairs for p in c.cfg.phases], "root": c.cfg.run.root}
        if c.distilled:
            d = distill.get(c.key, {})
            details = [d["detail"]] if d.get("detail") else []
            details += [f"draw {g.draw}: {distill.get(g.key, {}).get('detail')}" for g in group[1:]
                        if distill.get(g.key, {}).get("status") != "done"]  # a failed draw: pooled without it
            entry.update(status=d.get("status", "missing"), distill_seconds=d.get("seconds"),
                         distill_skipped=bool(d.get("skipped")), distill_detail="; ".join(details) or None,
                         final_loss=d.get("final_loss"), diverged_phases=d.get("diverged") or [],
                         phases=d.get("phases"))
        pooled = [{**r, "draw": g.draw} for g in group for r in runs.get(g.key, [])]
        if pooled:
            entry.update(cell_figures(pooled, c.cfg, c.method), status="done", runs=_lean(pooled))
        if len(group) > 1:
            entry["draws"] = [draw_record(g, distill.get(g.key, {}), runs.get(g.key, [])) for g in group]
        table[key] = entry
    full = None
    if "full" in runs:
        full = {**cell_figures(runs["full"], base, "full"), "runs": _lean(runs["full"]),
                "reused": [r["reused"] for r in runs["full"] if r.get("reused")]}
    splits = {b: [p.pairs for p in budget_phases(base, b, "ptm_st", args.one_phase_upto)]
              for b in sorted({c.budget for c in cells})}
    notes = [f"{c.key}: phase {i} minibatch {p.minibatch} (the config's {q.minibatch} capped at its pairs)"
             for c in cells if c.method == "ptm_st" or c.method == "single_phase"
             for i, (p, q) in enumerate(zip(c.cfg.phases, base.phases)) if p.minibatch < q.minibatch]
    selection = {c["selection"] for c in [*table.values(), full or {}] if "selection" in c}
    return {"command": command, "config": os.path.relpath(args.config, REPO) if Path(args.config).is_absolute()
            else args.config, "overrides": args.overrides, "quick": args.quick, "root": base.run.root,
            "budgets": sorted(splits), "splits": {str(b): s for b, s in splits.items()}, "notes": notes,
            "methods": list(dict.fromkeys(c.method for c in cells)), "machine": machine, "draws": args.draws,
            "selection": "/".join(sorted(selection)) or None,
            "eval": {"epochs": base.eval.epochs, "seeds": base.eval.seeds, "eval_points": base.eval.eval_points,
                     "full_data_epochs": base.eval.full_data_epochs, "full_data_patience": base.eval.full_data_patience,
                     "full_data_max_epochs": base.eval.full_data_max_epochs, "loss": base.eval_loss},
            "cells": table, "full": full, "ratios": ratios(table, full)}


def draw_record(cell: Cell, distilled: dict, runs: list[dict]) -> dict:
    """One draw of a distilled cell: its run.seed, root, distillation status and final matching losses, and its
    seeds' mean r_mean (val-selected "best", best-on-test, and the val recall that chose; None when none was
    scored)."""
    def mean(which: str) -> float | None:
        xs = [r[which]["r_mean"] for r in runs if r.get(which)]
        return sum(xs) / len(xs) if xs else None

    return {"draw": cell.draw, "run_seed": cell.cfg.run.seed, "root": cell.cfg.run.root,
            "status": distilled.get("status", "missing"), "final_loss": distilled.get("final_loss"),
            "seeds": len(runs), "best": mean("best"), "best_on_test": mean("best_on_test"), "val": mean("best_val")}


def _lean(runs: list[dict]) -> list[dict]:
    keep = ("seed", "draw", "pairs", "final", "best", "best_epoch", "best_on_test", "best_on_test_epoch", "selection",
            "best_val", "epochs_run", "diverged_at", "seconds")
    return [{k: r.get(k) for k in keep} for r in runs]


def write_outputs(res: dict, out: Path, write_results: bool) -> None:
    body, section = format_report(res), res["section"]
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(f"# {section[3:]}\n\n{body}")
    out.with_suffix(".json").write_text(json.dumps(res, indent=1, default=str))
    plot_matrix(res, out.with_suffix(".png"))
    print(body, flush=True)
    print(f"wrote {out}, {out.with_suffix('.png')}, {out.with_suffix('.json')}", flush=True)
    if write_results:
        text = RESULTS_MD.read_text()  # re-read right before writing: other sections change meanwhile
        rel = os.path.relpath(out.resolve(), REPO) if out.resolve().is_relative_to(REPO) else out.name
        RESULTS_MD.write_text(replace_section(text, section, format_report(res, details=rel)))
        print(f"replaced the section {section!r} of {RESULTS_MD}", flush=True)


if __name__ == "__main__":
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted: finished distillations and full-data scores are kept; the same command resumes",
              file=sys.stderr, flush=True)
        sys.exit(130)
