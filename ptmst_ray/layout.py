"""The run root's layout and every artefact's identity: where each thing lives, which config hash
marks it complete, which stage owns it, and what a phase's recorded outcome is.

Why this file exists: every stage and every scheduler asks the same questions ("where is phase 1's
subset?", "is it complete for this config?", "did it diverge?", "which stage do I rebuild when this
file is corrupt?"). They are answered here and only here; nothing builds a run-root path by hand.
This module sits low (it needs only the config and storage), so the stages, the Ray layer and the
CLI can all use it. See docs/design.md#run-root-layout.
"""

from __future__ import annotations

import dataclasses
import errno
import logging
import os
from dataclasses import dataclass

from ptmst_ray import storage
from ptmst_ray.config import Config, ConfigError, ExpertsConfig, PhaseConfig, section_hash
from ptmst_ray.vocab import SINGLE_PHASE, STAGES

log = logging.getLogger(__name__)

METRICS_FILE = "metrics.json"
"""Per-phase history of the reported metrics, under ``phases/<name>/``."""
RESULTS_FILE = "results.json"
TRAIN_SNAPSHOT = "checkpoint_manager_snapshot.json"
"""Ray Train 2.60's record of the checkpoints it tracks, next to the checkpoint folders of a run."""


class StageError(RuntimeError):
    """A stage cannot run; the message names the artefact and how to fix or rebuild it."""


# --------------------------------------------------------------------------- paths


@dataclass(frozen=True)
class Layout:
    """Where every artefact of a run lives.

    ``root`` holds this run's own artefacts (phases, distilled set, evaluation, sweeps);
    ``shared`` the ones several runs may share (data, pretraining, experts, shortcuts): the
    base run's root for a sweep trial, else ``root`` itself.
    """

    root: str
    shared: str = ""

    def __post_init__(self):
        if not self.shared:
            object.__setattr__(self, "shared", self.root)

    @classmethod
    def of(cls, cfg: Config) -> "Layout":
        return cls(cfg.run.root, cfg.run.shared_root or cfg.run.root)

    # shared artefacts
    @property
    def data(self) -> str:
        return storage.join(self.shared, "data")

    def split(self, name: str) -> str:
        return storage.join(self.data, name)

    @property
    def text_cache(self) -> str:
        """Per-caption embeddings, reused across runs and configs."""
        return storage.join(self.data, "text_cache")

    @property
    def embedded_root(self) -> str:
        return storage.join(self.data, "embedded")

    def embedded(self, key: str) -> str:
        """One tower's caption embeddings of the train and test splits."""
        return storage.join(self.embedded_root, key)

    @property
    def embedded_current(self) -> str:
        """A text file naming the key of the current caption embeddings."""
        return storage.join(self.embedded_root, "CURRENT")

    @property
    def features_root(self) -> str:
        return storage.join(self.shared, "features")

    def features(self, key: str) -> str:
        """A frozen image tower's features of every train and test image (``stages/features.py``)."""
        return storage.join(self.features_root, key)

    @property
    def features_current(self) -> str:
        """A text file naming the key of the features the last feature pass computed or found complete."""
        return storage.join(self.features_root, "CURRENT")

    @property
    def pretrain(self) -> str:
        return storage.join(self.shared, "pretrain")

    @property
    def experts(self) -> str:
        return storage.join(self.shared, "experts")

    @property
    def expert_lr(self) -> str:
        """The experts' learning-rate rule (``experts.lr_img: auto``): one file per candidate it tried."""
        return storage.join(self.experts, "lr_rule")

    @property
    def windows(self) -> str:
        """The windows' rule (a phase's ``range_end: auto``): one file per start window it picked an end for."""
        return storage.join(self.experts, "windows")

    def expert_attempt(self, expert_id: int, pid: int) -> str:
        """Where one actor's attempt at an expert is recorded (node, GPU ids, start)."""
        return storage.join(self.experts, "attempts", f"expert{expert_id:04d}-{pid}.json")

    @property
    def shortcuts(self) -> str:
        return storage.join(self.shared, "shortcuts")

    # this run's own artefacts
    @property
    def config_yaml(self) -> str:
        return storage.join(self.root, "config.yaml")

    @property
    def phases(self) -> str:
        """Where every phase's folder and its Ray Train run folders live."""
        return storage.join(self.root, "phases")

    def phase(self, name: str) -> str:
        return storage.join(self.phases, name)

    def train_run(self, run_name: str) -> str:
        """A phase's Ray Train run folder (``checkpoint_*`` folders): ``phases/<name>-<hash>``."""
        return storage.join(self.phases, run_name)

    def subset(self, name: str) -> str:
        """A finished phase's EMA subset."""
        return storage.join(self.phase(name), "subset")

    def partial(self, name: str) -> str:
        """EMA subset of a phase stopped early (sweep rounds); never marked complete for the phase."""
        return storage.join(self.phase(name), "partial")

    def diverged(self, name: str) -> str:
        """Where a diverged phase keeps its last finite EMA state (never counted as the phase's subset)."""
        return storage.join(self.phase(name), "diverged")

    def metrics(self, name: str) -> str:
        return storage.join(self.phase(name), METRICS_FILE)

    def attempt(self, name: str, pid: int, start: float) -> str:
        """Where one Train worker's attempt at a phase is recorded."""
        return storage.join(self.phase(name), "attempts", f"{pid}-{int(start)}.json")

    @property
    def distilled(self) -> str:
        return storage.join(self.root, "distilled")

    @property
    def eval(self) -> str:
        return storage.join(self.root, "eval")

    @property
    def results(self) -> str:
        return storage.join(self.eval, RESULTS_FILE)

    def score(self, method: str, seed: int) -> str:
        """One (method, seed) evaluation's stored scores, reused while what they were computed from holds."""
        return storage.join(self.eval, "scores", f"{method}-seed{seed}.json")

    @property
    def plot(self) -> str:
        return storage.join(self.eval, "plot.png")

    @property
    def sweeps(self) -> str:
        return storage.join(self.root, "sweeps")

    def sweep(self, name: str) -> str:
        return storage.join(self.sweeps, name)

    def trial(self, sweep: str, trial_id: str) -> str:
        """A sweep trial's own run root."""
        return storage.join(self.sweep(sweep), trial_id)


# --------------------------------------------------------------------------- identity


def data_hash(cfg: Config) -> str:
    """Identity of the prepared data: the data section minus settings that do not change the output."""
    return section_hash(cfg.data.output_settings())


ORDER_SETTINGS = ("stream", "hold_images_mb", "stream_buffer")
"""``data`` settings that decide the order training reads a split in (held and permuted, or streamed)."""


def data_order(cfg: Config) -> list:
    """The :data:`ORDER_SETTINGS` set away from their defaults, for the hashes of what training makes. At the
    defaults the choice follows from the prepared data alone (its size, fixed by :func:`data_hash`), so stored
    runs keep their hashes; setting any of them makes experts and pretraining of another order."""
    default = type(cfg.data)()
    return [[name, getattr(cfg.data, name)] for name in ORDER_SETTINGS if getattr(cfg.data, name) != getattr(default, name)]


def pretrain_hash(cfg: Config) -> str:
    order = data_order(cfg)
    return section_hash(data_hash(cfg), cfg.model.name, cfg.pretrain, *([order] if order else []))


ADDED_MODEL_FIELDS = ("image_proj_dim",)
"""``model`` fields newer than stored runs; at their default (None) they leave every hash unchanged."""


UNHASHED_MODEL_FIELDS = ("cache_frozen_features",)
"""``model`` settings of where a frozen tower's features come from (computed once or every epoch), not of what
the experts are: never part of their identity."""


def model_hash(cfg: Config) -> str:
    """Identity of the student's starting point (model config + the pretraining that made its weights)."""
    model = dataclasses.asdict(cfg.model)
    if cfg.pretrain.enabled:  # the checkpoint is this run's own pretraining (pretrain_hash): its path, which
        model["pretrained"] = None  # holds the run root, must not tie the experts to where the root lives
    for unhashed in UNHASHED_MODEL_FIELDS:
        del model[unhashed]
    for added in ADDED_MODEL_FIELDS:  # fields added later count only when set, so older roots keep their experts
        if model[added] is None:
            del model[added]
    return section_hash(model, pretrain_hash(cfg) if cfg.pretrain.enabled else None)


def experts_hash(cfg: Config, experts: ExpertsConfig | None = None) -> str:
    """Experts depend on data, model and expert settings (``experts``: others than the config's, e.g. the
    learning-rate rule's probe experts); not on the number of experts (ids are stable), nor on the learning rates
    the rule tried (``lr_candidates``): on the rate it picked; nor on their epochs: an expert's first k epochs are
    the same whatever it trains for (a stored expert serves any config asking for at most its epochs, and one
    asking for more continues it: :func:`~ptmst_ray.stages.experts.train_and_store_expert`)."""
    experts = experts or cfg.experts
    if experts.lr_img == "auto":
        raise StageError(f"experts.lr_img is auto and the experts' learning-rate rule has not picked it under "
                         f"{Layout.of(cfg).expert_lr} for this data, model and expert settings: `ptmst-ray run` "
                         f"(or `ptmst-ray experts`) runs the rule before the experts")
    experts = dataclasses.asdict(experts)
    for volatile in ("num_experts", "gpus_per_expert", "lr_candidates", "epochs"):
        experts.pop(volatile)
    order = data_order(cfg)
    return section_hash(data_hash(cfg), model_hash(cfg), experts, *([order] if order else []))


PHASE_VOLATILE = ("checkpoint_every", "report_every", "recall_every", "gpus_per_phase", "exact_checkpoints",
                  "keep_graphs", "max_concurrent")
"""``distill`` settings that do not change a phase's result (how often it reports, where and when it runs)."""


def phase_hash(cfg: Config, phase: PhaseConfig) -> str:
    if phase.range_end == "auto":
        raise StageError(f"a phase's range_end is auto and the windows' rule has not picked it under "
                         f"{Layout.of(cfg).windows} for these experts and this start window: `ptmst-ray run` "
                         f"(or `ptmst-ray experts` / `shortcut`) runs the rule once expert 0 is trained")
    distill = dataclasses.asdict(cfg.distill)
    for volatile in PHASE_VOLATILE:
        distill.pop(volatile)
    return section_hash(experts_hash(cfg), cfg.experts.num_experts, cfg.shortcut, phase, distill, cfg.run.seed)


def distilled_hash(cfg: Config, statuses: list[str] | None = None) -> str:
    """Identity of the distilled set: its phases' hashes (and which of them diverged)."""
    return section_hash([phase_hash(cfg, p) for p in cfg.phases], statuses or ["done"] * len(cfg.phases))


# --------------------------------------------------------------------------- the distillation runs


def phase_name(index: int) -> str:
    return f"phase{index}"


@dataclass(frozen=True)
class PhaseJob:
    """One distillation run: a phase of the recipe, or the single-phase baseline."""

    name: str
    phase: PhaseConfig
    seed: int
    hash: str

    @property
    def run_name(self) -> str:
        """The Ray Train run's name (its folder under ``phases/``): the phase name and its config hash."""
        return f"{self.name}-{self.hash}"


def single_phase_config(cfg: Config) -> PhaseConfig:
    """The LoRS-style baseline: ONE subset of the same total budget over one range (the first phase's
    range and start window), as many iterations as the longest phase."""
    first = cfg.phases[0]
    return dataclasses.replace(first, pairs=cfg.total_pairs, iterations=max(p.iterations for p in cfg.phases))


def phase_jobs(cfg: Config, with_baseline: bool = True) -> list[PhaseJob]:
    """Every distillation run: the phases, then the single-phase baseline (when evaluated)."""
    runs = [(phase_name(i), p, cfg.run.seed * 1000 + i) for i, p in enumerate(cfg.phases)]
    if with_baseline and SINGLE_PHASE in cfg.eval.baselines:
        runs.append((SINGLE_PHASE, single_phase_config(cfg), cfg.run.seed * 1000 + 999))
    return [PhaseJob(name, p, seed, phase_hash(cfg, p)) for name, p, seed in runs]


def needed_ranges(cfg: Config) -> list[tuple[int, int]]:
    """The distinct teacher ranges [a, b] of every distillation run (phases and the single-phase baseline)."""
    return sorted({(j.phase.range_start, j.phase.range_end) for j in phase_jobs(cfg)})


@dataclass(frozen=True)
class PhaseOutcome:
    """What a phase's folder records: ``done`` (its subset is complete), ``diverged`` (its last finite
    EMA state is kept, with the iteration and detail), or ``none`` (not finished)."""

    status: str
    dir: str | None = None
    iteration: int | None = None
    detail: str | None = None


def phase_outcome(cfg: Config, job: PhaseJob) -> PhaseOutcome:
    """The recorded outcome of ``job`` for this config (subset complete, diverged, or neither)."""
    layout = Layout.of(cfg)
    if storage.is_complete(layout.subset(job.name), job.hash):
        return PhaseOutcome("done", layout.subset(job.name))
    manifest = storage.read_manifest(layout.diverged(job.name))
    if manifest is not None and manifest.get("config_hash") == job.hash:
        info = manifest.get("diverged") or {}
        return PhaseOutcome("diverged", layout.diverged(job.name), int(info.get("iteration", 0)), info.get("detail"))
    return PhaseOutcome("none")


# --------------------------------------------------------------------------- stage ownership


def stage_dirs(cfg: Config, stage: str) -> list[str]:
    """The directories that hold ``stage``'s artefacts (the shared ones under ``run.shared_root``)."""
    layout = Layout.of(cfg)
    dirs = {
        "data": [layout.data],
        "pretrain": [layout.pretrain] if cfg.pretrain.enabled else [],
        "embed": [layout.embedded_root, layout.text_cache, layout.features_root],
        "experts": [layout.experts],
        "shortcut": [layout.shortcuts],
        "phases": [layout.phases],
        "aggregate": [layout.distilled],
        "eval": [layout.eval],
    }
    if stage not in dirs:
        raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    return dirs[stage]


def owning_stage(cfg: Config, url: str) -> str | None:
    """The stage whose artefacts include ``url`` (the stage to rebuild when it is corrupt), or None."""
    best = None
    for stage in STAGES:
        for d in stage_dirs(cfg, stage):
            if (url == d or url.startswith(d + "/")) and (best is None or len(d) > len(best[1])):
                best = (stage, d)
    return best[0] if best else None


def rebuild(cfg: Config, stage: str) -> list[str]:
    """Delete the artefacts of ``stage`` and of every later stage, so the next run redoes exactly those.

    Later stages are invalidated explicitly (not left to their config hashes, which do not
    change): they were computed from the artefacts being rebuilt, which need not come out bit
    for bit the same (training is not deterministic across machines). Earlier stages are kept.
    Returns the directories removed. Artefacts under a different ``run.shared_root`` belong to
    other runs too and are refused.
    """
    if stage not in STAGES:
        raise StageError(f"unknown stage {stage!r}; choose one of {', '.join(STAGES)}")
    doomed = [d for s in STAGES[STAGES.index(stage):] for d in stage_dirs(cfg, s)]
    layout = Layout.of(cfg)
    if layout.shared != layout.root:
        shared = [d for d in doomed if d.startswith(layout.shared + "/")]
        if shared:
            raise StageError(f"{shared[0]}: lives in run.shared_root ({layout.shared}), shared with other runs; "
                             f"rebuild it from the run that owns it, or choose a stage after shortcut")
    removed = [d for d in doomed if storage.exists(d)]
    for d in removed:
        log.info("rebuild %s: removing %s", stage, d)
        storage.remove(d, recursive=True)
    return removed


WRITE_ERRNOS = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS})
"""OSErrors that a full or read-only run root causes (the user frees space or fixes permissions); any other
(a connection reset, a file replaced mid-read) passes with a plain retry."""


def explain(cfg: Config, error: BaseException) -> str:
    """``error``'s message, plus the `--rebuild` command when it names a corrupt or missing artefact."""
    cause = getattr(error, "cause", None)  # a Ray task error: show the library error it carries
    if isinstance(cause, BaseException):
        error = cause
    message = str(error)
    if isinstance(error, OSError):  # raised past the storage layer (e.g. inside a third-party writer)
        where = error.filename or cfg.run.root
        fix = ("free space or make the run root writable, then run the same command again" if error.errno in WRITE_ERRNOS
               else "run the same command again (finished stages are kept)")
        return f"{where}: {error.strerror or error}; nothing half-written is marked complete: {fix}"
    if isinstance(error, storage.StorageError) and "run `ptmst-ray" not in message and "run --rebuild" not in message:
        # a broken artefact: name the rebuild (a missing one's message already says which command makes it)
        stage = owning_stage(cfg, error.url)
        if stage is not None:
            message += f" (to redo it: `ptmst-ray run --rebuild {stage}`)"
    return message


def check_paths(cfg: Config, models: bool = True) -> None:
    """Fail fast, before Ray starts, on input paths that do not exist and a run root that cannot be written; the
    weights' paths too unless not ``models`` (data preparation reads none).

    Raises :class:`~ptmst_ray.config.ConfigError` naming the field.
    """
    inputs = [("data.annotations", cfg.data.annotations), ("data.images", cfg.data.images)]
    for field_name in ("pretrained", "image_pretrained", "text_pretrained") if models else ():
        value = getattr(cfg.model, field_name)
        made_here = field_name == "pretrained" and cfg.pretrain.enabled  # written by the pretrain stage
        if value and ("/" in value or "://" in value) and not made_here:
            inputs.append((f"model.{field_name}", value))
    for name, value in inputs:
        if cfg.data.dataset == "builtin" and name.startswith("data."):
            continue
        if value and not storage.exists(value):
            raise ConfigError(name, f"{value} does not exist; fix the path (or --set {name}=...)")
    if storage.scheme(cfg.run.root) in storage.OBJECT_STORE_SCHEMES:  # bounded: an unreachable endpoint fails fast
        try:
            storage.check_writable(cfg.run.root)
        except (OSError, storage.StorageError) as e:
            raise ConfigError("run.root", f"{e}; or choose another run root (--set run.root=...)") from None
        return
    probe = storage.join(cfg.run.root, f".ptmst-write-check-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"ok")
        storage.remove(probe)
    except (OSError, storage.StorageError) as e:
        cause = e.__cause__ if isinstance(e, storage.StorageError) else e
        reason = getattr(cause, "strerror", None) or str(cause or e)
        raise ConfigError("run.root", f"{cfg.run.root} cannot be written ({reason}); choose a writable folder "
                                      "or URL (--set run.root=...)") from None
