"""Stage `phases`: one phase's distillation, from the stored shortcut trajectories to its EMA subset.

A phase has its own teacher range, its own synthetic pairs and its own seed; the Ray layer runs
every phase at once as a Train run and passes in the checkpoint to resume from and the callbacks
that save checkpoints and report metrics. The loop itself is :class:`ptmst_ray.distill.phase.PhaseTrainer`.
"""

from __future__ import annotations

import logging
from typing import Callable

import torch

from ptmst_ray import storage
from ptmst_ray.config import Config, PhaseConfig
from ptmst_ray.layout import Layout, StageError, experts_hash, phase_hash
from ptmst_ray.stages.embed import RealData, load_real
from ptmst_ray.stages.experts import expert_store, shortcut_store

log = logging.getLogger(__name__)


class StoredTrajectories:
    """TrajectorySource over the stored shortcut (or, for the ablation, raw) trajectories of one range."""

    def __init__(self, cfg: Config, phase: PhaseConfig, split: Callable, device: torch.device):
        from ptmst_ray.trajectories.shortcut import raw_trajectory

        a, b, chash = phase.range_start, phase.range_end, experts_hash(cfg)
        n = cfg.experts.num_experts
        if cfg.shortcut.enabled:
            store = shortcut_store(cfg)
            missing = store.missing_ids(a, b, n, chash)
            if missing:
                raise StageError(f"{store.range_dir(a, b)}: shortcut trajectories of experts {missing} are missing; "
                                 "run `ptmst-ray shortcut` (or `ptmst-ray run`) first")
            self.trajs = [store.load(a, b, i).to(device) for i in range(n)]
        else:
            store = expert_store(cfg)
            self.trajs = [raw_trajectory(store.load_expert(i, chash), a, b) for i in range(n)]
        self.split, self.device = split, device

    @property
    def num_experts(self) -> int:
        return len(self.trajs)

    def snapshot(self, expert: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        w_img, w_txt = self.split(self.trajs[expert].snapshot(k))
        return w_img.to(self.device), w_txt.to(self.device)


def distill_phase(cfg: Config, name: str, phase: PhaseConfig, *, device: torch.device, seed: int = 0,
                  save_checkpoint=None, report=None, resume_state: dict | None = None,
                  until: int | None = None) -> dict:
    """Distil one phase and write its EMA subset to ``phases/<name>/subset``.

    Returns {"status": "done" | "diverged" | "partial", ...}. A diverged phase keeps its last finite
    EMA state under ``phases/<name>/diverged`` and never marks the subset complete. With ``until``
    below the phase's iterations the run stops there (checkpointed, so the next call resumes) and
    writes the EMA so far to ``phases/<name>/partial`` (status "partial").
    """
    from ptmst_ray.distill.export import save_subset
    from ptmst_ray.distill.phase import DivergenceError, PhaseTrainer
    from ptmst_ray.distill.synthetic import SyntheticSet
    from ptmst_ray.models.functional import FunctionalStudent
    from ptmst_ray.models.student import build_student

    layout, chash = Layout.of(cfg), phase_hash(cfg, phase)
    if storage.is_complete(layout.subset(name), chash):
        return {"status": "done", "skipped": True}
    real = load_real(cfg)
    fs = FunctionalStudent(build_student(cfg.model, real.text_dim, seed=cfg.experts.seed).to(device).train())
    gen = torch.Generator().manual_seed(seed)
    if cfg.distill.init == "real":
        syn = SyntheticSet.from_real(real.train_images, real.train_text, phase.pairs, phase.similarity,
                                     cfg.distill.alpha_init, gen, device=device)
    else:
        syn = SyntheticSet.from_noise(phase.pairs, tuple(real.train_images.shape[1:]), real.text_dim,
                                      phase.similarity, cfg.distill.alpha_init, gen, device=device)
    source = StoredTrajectories(cfg, phase, fs.split_snapshot, device)
    if report is not None and cfg.distill.recall_every:
        report = _with_recall(cfg, phase, real, lambda: trainer.ema.state(), report)
    trainer = PhaseTrainer(phase, cfg.distill, syn, fs.logits, source, phase=name, seed=seed,
                           save_checkpoint=save_checkpoint, report=report)
    if resume_state is not None:
        if "diverged" in resume_state:
            return _keep_diverged(cfg, name, phase, resume_state["ema"]["shadow"], resume_state["diverged"])
        trainer.resume(resume_state)
    try:
        ema = trainer.run(until)
    except DivergenceError as e:
        return _keep_diverged(cfg, name, phase, trainer.ema.state(), {"iteration": e.iteration, "detail": str(e)})
    if trainer.iteration < phase.iterations:
        save_subset(layout.partial(name), ema, phase, init_indices=syn.init_indices, iterations=trainer.iteration,
                    config_hash=f"{chash}@{trainer.iteration}", extra={"name": name, "partial": True})
        return {"status": "partial", "skipped": False, "iterations": trainer.iteration}
    save_subset(layout.subset(name), ema, phase, init_indices=syn.init_indices, iterations=trainer.iteration,
                config_hash=chash, extra={"name": name, "nearest_captions": _nearest_captions(ema, real)})
    return {"status": "done", "skipped": False, "iterations": trainer.iteration}


def phase_recall(cfg: Config, phase: PhaseConfig, ema: dict, real: RealData, seed: int = 0) -> dict[str, float]:
    """Retrieval recall of one phase's current EMA subset alone (one student, its learned step sizes).

    The student draws its initialisation and batches from its own seeded generators, so scoring
    does not perturb the distillation's random streams (a resumed run stays bit-identical).
    """
    from ptmst_ray.evaluate.protocol import evaluate_one_seed
    from ptmst_ray.evaluate.student import RetrievalSet
    from ptmst_ray.models.student import build_student
    from ptmst_ray.stages.score import subset_from_state

    subset = subset_from_state(phase, ema)
    student = build_student(cfg.model, real.text_dim, seed=cfg.eval.seed + seed)
    test = RetrievalSet(real.test_images, real.test_text, real.txt2img)
    with torch.random.fork_rng(devices=[]):
        out = evaluate_one_seed([subset], student, test, cfg.eval, loss=cfg.eval_loss, seed=seed)
    return {f"recall/{k}": float(v) for k, v in out["best"].items()}


def _with_recall(cfg: Config, phase: PhaseConfig, real: RealData, ema_state: Callable[[], dict], report):
    """Wrap a phase reporter so every ``distill.recall_every``-th iteration also carries recall."""
    every, last = cfg.distill.recall_every, {"at": 0}

    def wrapped(metrics: dict, is_checkpoint: bool) -> None:
        it = int(metrics["iteration"])  # reports come every report_every: score once a multiple is passed
        if it // every > last["at"] // every or it == phase.iterations:
            metrics = {**metrics, **phase_recall(cfg, phase, ema_state(), real)}
            last["at"] = it
        report(metrics, is_checkpoint)

    return wrapped


def _nearest_captions(ema: dict, real: RealData) -> list[str]:
    from ptmst_ray.distill.export import nearest_captions

    return nearest_captions(ema["text"].float().cpu(), real.train_text, real.train_captions)


def _keep_diverged(cfg: Config, name: str, phase: PhaseConfig, ema: dict, info: dict) -> dict:
    """Record a divergence: the last finite EMA state under ``phases/<name>/diverged``, the iteration and
    detail in its manifest (read by :func:`ptmst_ray.layout.phase_outcome`)."""
    from ptmst_ray.distill.export import save_subset

    out = Layout.of(cfg).diverged(name)
    finite_at = max(0, int(info.get("iteration", 1)) - 1)  # the EMA was last updated by the iteration before
    save_subset(out, ema, phase, config_hash=phase_hash(cfg, phase), iterations=finite_at,
                extra={"name": name, "diverged": info, "nearest_captions": _nearest_captions(ema, load_real(cfg))},
                record={"diverged": info})
    log.error("phase %s diverged (%s); its last finite EMA state is in %s", name, info.get("detail"), out)
    return {"status": "diverged", "detail": info.get("detail"), "kept": out}
