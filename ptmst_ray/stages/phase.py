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
from ptmst_ray.layout import Layout, StageError, experts_hash, phase_hash, phase_name
from ptmst_ray.stages.embed import RealData, load_real
from ptmst_ray.stages.experts import expert_store, shortcut_store

log = logging.getLogger(__name__)


class StoredTrajectories:
    """TrajectorySource over the stored shortcut (or, for the ablation, raw) trajectories of one range.

    Only the expert an iteration matches against is on ``device``: the shortcuts of all experts stay in
    host memory (pinned when ``device`` is CUDA, so the copy is fast), and each iteration's expert is
    copied over once (its two snapshots are then built there). At paper scale all 20 experts' shortcuts
    are about 6.4 GB, an A10G's GPU would hold them beside NFNet's double-backward graph only just. The
    raw trajectories of the no-shortcut ablation (22-29 GB) are not held at all: each snapshot is read
    from the expert store when asked for. On a CPU the tensors and arithmetic are those of holding
    everything in place, so results are bit-identical.
    """

    def __init__(self, cfg: Config, phase: PhaseConfig, split: Callable, device: torch.device):
        a, b, chash = phase.range_start, phase.range_end, experts_hash(cfg)
        n = cfg.experts.num_experts
        self.range_start, self.range_end = a, b
        self.split, self.device = split, device
        self._on_device: tuple[int, object] | None = None
        if cfg.shortcut.enabled:
            store = shortcut_store(cfg)
            missing = store.missing_ids(a, b, n, chash)
            if missing:
                raise StageError(f"{store.range_dir(a, b)}: shortcut trajectories of experts {missing} are missing; "
                                 "run `ptmst-ray shortcut` (or `ptmst-ray run`) first")
            pin = device.type == "cuda" and torch.cuda.is_available()
            self.trajs = [_pinned(store.load(a, b, i)) if pin else store.load(a, b, i) for i in range(n)]
            self.raw = None
        else:
            self.raw = expert_store(cfg)
            missing = self.raw.missing_ids(n, chash, cfg.experts.epochs)
            if missing:
                raise StageError(f"{self.raw.root}: experts {missing} are missing or were trained for another "
                                 "config; run `ptmst-ray experts` (or `ptmst-ray run`) first")
            if not 0 <= a < b <= cfg.experts.epochs:
                raise StageError(f"phase range [{a}, {b}] is not inside the experts' epochs 0..{cfg.experts.epochs}; "
                                 "choose range_start < range_end <= experts.epochs")
            self.trajs = list(range(n))

    @property
    def num_experts(self) -> int:
        return len(self.trajs)

    def snapshot(self, expert: int, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= k <= self.range_end - self.range_start:
            raise IndexError(f"snapshot index {k} is outside 0..{self.range_end - self.range_start} of the range "
                             f"[{self.range_start}, {self.range_end}]")
        if self.raw is not None:  # the ablation: one epoch of one expert, read now
            params = self.raw.load_snapshot(expert, self.range_start + k)
        else:
            params = self._expert_on_device(expert).snapshot(k)
        w_img, w_txt = self.split(params)
        return w_img.to(self.device), w_txt.to(self.device)

    def _expert_on_device(self, expert: int):
        """The shortcut of ``expert`` on the device; the previous iteration's copy is dropped first."""
        if self._on_device is None or self._on_device[0] != expert:
            self._on_device = None  # free the last expert's copy before the next one arrives
            self._on_device = (expert, self.trajs[expert].to(self.device))
        return self._on_device[1]


def _pinned(traj):
    """A shortcut whose end points are in pinned (page-locked) host memory: faster, asynchronous copies."""
    return type(traj)({n: t.pin_memory() for n, t in traj.theta_a.items()},
                      {n: t.pin_memory() for n, t in traj.theta_b.items()}, dict(traj.beta), traj.start)


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
    real = load_real(cfg, whole_train=False)  # pixels of the n initial pairs only (and the test split for recall)
    fs = FunctionalStudent(build_student(cfg.model, real.text_dim, seed=cfg.experts.seed).to(device).train())
    gen = torch.Generator().manual_seed(seed)
    if cfg.distill.init in ("real", "kmeans"):
        rows = init_rows(cfg, name, phase, real.train_text) if cfg.distill.init == "kmeans" else None
        syn = SyntheticSet.from_real(real.train_images, real.train_text, phase.pairs, phase.similarity,
                                     cfg.alpha_starts(), gen, device=device, indices=rows)
    else:
        syn = SyntheticSet.from_noise(phase.pairs, tuple(real.train_images.shape[1:]), real.text_dim,
                                      phase.similarity, cfg.alpha_starts(), gen, device=device)
    source = StoredTrajectories(cfg, phase, fs.split_snapshot, device)
    if report is not None and cfg.distill.recall_every:
        report = _with_recall(cfg, phase, real, lambda: trainer.ema.state(), report)
    trainer = PhaseTrainer(phase, cfg.distill, syn, fs.logits, source, phase=name, seed=seed,
                           save_checkpoint=save_checkpoint, report=report, alpha_floors=cfg.alpha_floors())
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


def init_rows(cfg: Config, name: str, phase: PhaseConfig, text) -> torch.Tensor:
    """The train rows that initialise phase ``name`` under ``distill.init: kmeans``: one clustering of the whole
    budget (``cfg.total_pairs`` centres, seeded by run.seed), phase p taking the rows after the earlier phases'
    (a single-phase run, the baseline included, the first ``phase.pairs``)."""
    from ptmst_ray.distill.synthetic import kmeans_init_indices

    index = next((i for i, p in enumerate(cfg.phases) if phase_name(i) == name and p == phase), None)
    offset = 0 if index is None else sum(p.pairs for p in cfg.phases[:index])
    total = max(cfg.total_pairs, offset + phase.pairs)
    return kmeans_init_indices(text, total, offset, phase.pairs, cfg.run.seed)


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
                extra={"name": name, "diverged": info, "nearest_captions": _nearest_captions(ema, load_real(cfg, whole_train=False))},
                record={"diverged": info})
    log.error("phase %s diverged (%s); its last finite EMA state is in %s", name, info.get("detail"), out)
    return {"status": "diverged", "detail": info.get("detail"), "kept": out}
