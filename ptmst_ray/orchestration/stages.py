"""The pipeline's stages as plain functions (no Ray here): each takes the config, reads and
writes under the run root, and skips work whose manifest matches the config hash.

Why this file exists: the Ray layer (experts.py, phases.py, evaluation.py, driver.py) only
schedules these; a test can call any stage in-process. The run root's layout lives in
:class:`Layout`, and the identity of every artefact in the ``*_hash`` functions, so that a
change to a setting redoes exactly the stages that depend on it.
"""

from __future__ import annotations

import dataclasses
import functools
import logging
import os
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ptmst_ray import storage
from ptmst_ray.config import Config, PhaseConfig, PretrainConfig, section_hash

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


class StageError(RuntimeError):
    """A stage cannot run; the message names the artefact and how to fix or rebuild it."""


STAGES = ("data", "pretrain", "embed", "experts", "shortcut", "phases", "aggregate", "eval")
"""The pipeline's stages in order; ``ptmst-ray run --rebuild STAGE`` takes one of these."""


# --------------------------------------------------------------------------- layout and identity


@dataclass(frozen=True)
class Layout:
    """Where every artefact of a run lives under its root (a local path or fsspec URL)."""

    root: str

    @property
    def data(self) -> str:
        return storage.join(self.root, "data")

    @property
    def pretrain(self) -> str:
        return storage.join(self.root, "pretrain")

    def embedded(self, key: str) -> str:
        return storage.join(self.root, "data", "embedded", key)

    @property
    def phases(self) -> str:
        return storage.join(self.root, "phases")

    def subset(self, name: str) -> str:
        return storage.join(self.root, "phases", name, "subset")

    def partial(self, name: str) -> str:
        """EMA subset of a phase stopped early at ``until`` (sweep rounds); never marked complete."""
        return storage.join(self.root, "phases", name, "partial")

    @property
    def distilled(self) -> str:
        return storage.join(self.root, "distilled")

    @property
    def eval(self) -> str:
        return storage.join(self.root, "eval")

    @property
    def sweeps(self) -> str:
        return storage.join(self.root, "sweeps")


def shared_root(cfg: Config) -> str:
    """Root of the artefacts several runs may share: data, pretrain, experts, shortcuts.

    ``run.shared_root`` when set (a sweep trial reads the base run's), else ``run.root``.
    """
    return cfg.run.shared_root or cfg.run.root


def stage_dirs(cfg: Config, stage: str) -> list[str]:
    """The directories that hold ``stage``'s artefacts (the shared ones under :func:`shared_root`)."""
    shared, own = Layout(shared_root(cfg)), Layout(cfg.run.root)
    dirs = {
        "data": [shared.data],
        "pretrain": [shared.pretrain] if cfg.pretrain.enabled else [],
        "embed": [storage.join(shared.data, "embedded"), storage.join(shared.data, "text_cache")],
        "experts": [storage.join(shared.root, "experts")],
        "shortcut": [storage.join(shared.root, "shortcuts")],
        "phases": [own.phases],
        "aggregate": [own.distilled],
        "eval": [own.eval],
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
    if shared_root(cfg) != cfg.run.root:
        shared = [d for d in doomed if d.startswith(shared_root(cfg) + "/")]
        if shared:
            raise StageError(f"{shared[0]}: lives in run.shared_root ({shared_root(cfg)}), shared with other runs; "
                             f"rebuild it from the run that owns it, or choose a stage after shortcut")
    removed = [d for d in doomed if storage.exists(d)]
    for d in removed:
        log.info("rebuild %s: removing %s", stage, d)
        storage.remove(d, recursive=True)
    _load_real_cached.cache_clear()
    return removed


def explain(cfg: Config, error: BaseException) -> str:
    """``error``'s message, plus the `--rebuild` command when it names a corrupt or missing artefact."""
    from ptmst_ray.storage import StorageError

    cause = getattr(error, "cause", None)  # a Ray task error: show the library error it carries
    if isinstance(cause, BaseException):
        error = cause
    message = str(error)
    if isinstance(error, OSError):  # raised past the storage layer (e.g. inside a third-party writer)
        where = error.filename or cfg.run.root
        return (f"{where}: {error.strerror or error}; nothing half-written is marked complete: free space or "
                "make the run root writable, then run the same command again")
    if isinstance(error, StorageError) and "run --rebuild" not in message:
        stage = owning_stage(cfg, error.url)
        if stage is not None:
            message += f" (to redo it: `ptmst-ray run --rebuild {stage}`)"
    return message


def check_paths(cfg: Config) -> None:
    """Fail fast, before Ray starts, on input paths that do not exist and a run root that cannot be written.

    Raises :class:`~ptmst_ray.config.ConfigError` naming the field.
    """
    from ptmst_ray.config import ConfigError

    inputs = [("data.annotations", cfg.data.annotations), ("data.images", cfg.data.images)]
    for field_name in ("pretrained", "image_pretrained", "text_pretrained"):
        value = getattr(cfg.model, field_name)
        made_here = field_name == "pretrained" and cfg.pretrain.enabled  # written by the pretrain stage
        if value and ("/" in value or "://" in value) and not made_here:
            inputs.append((f"model.{field_name}", value))
    for name, value in inputs:
        if cfg.data.dataset == "builtin" and name.startswith("data."):
            continue
        if value and not storage.exists(value):
            raise ConfigError(name, f"{value} does not exist; fix the path (or --set {name}=...)")
    probe = storage.join(cfg.run.root, f".ptmst-write-check-{os.getpid()}")
    try:
        storage.write_bytes(probe, b"ok")
        storage.remove(probe)
    except (OSError, storage.StorageError) as e:
        cause = e.__cause__ if isinstance(e, storage.StorageError) else e
        reason = getattr(cause, "strerror", None) or str(cause or e)
        raise ConfigError("run.root", f"{cfg.run.root} cannot be written ({reason}); choose a writable folder "
                                      "or URL (--set run.root=...)") from None


def data_hash(cfg: Config) -> str:
    """Identity of the prepared data: the data section minus settings that do not change the output."""
    return section_hash(cfg.data.output_settings())


def pretrain_hash(cfg: Config) -> str:
    return section_hash(data_hash(cfg), cfg.model.name, cfg.pretrain)


def model_hash(cfg: Config) -> str:
    """Identity of the student's starting point (model config + the pretraining that made its weights)."""
    model = dataclasses.asdict(cfg.model)
    if cfg.pretrain.enabled:  # the checkpoint is this run's own pretraining (pretrain_hash): its path, which
        model["pretrained"] = None  # holds the run root, must not tie the experts to where the root lives
    for added in ADDED_MODEL_FIELDS:  # fields added later count only when set, so older roots keep their experts
        if model[added] is None:
            del model[added]
    return section_hash(model, pretrain_hash(cfg) if cfg.pretrain.enabled else None)


ADDED_MODEL_FIELDS = ("image_proj_dim",)
"""``model`` fields newer than stored runs; at their default (None) they leave every hash unchanged."""


def experts_hash(cfg: Config) -> str:
    """Experts depend on data, model and expert settings; not on the number of experts (ids are stable)."""
    experts = dataclasses.asdict(cfg.experts)
    experts.pop("num_experts")
    experts.pop("gpus_per_expert")
    return section_hash(data_hash(cfg), model_hash(cfg), experts)


def phase_name(index: int) -> str:
    return f"phase{index}"


SINGLE_PHASE = "single_phase"


def phase_jobs(cfg: Config, with_baseline: bool = True) -> list[tuple[str, PhaseConfig, int]]:
    """(name, phase config, seed) of every distillation run: the phases, then the single-phase baseline."""
    jobs = [(phase_name(i), p, cfg.run.seed * 1000 + i) for i, p in enumerate(cfg.phases)]
    if with_baseline and "single_phase" in cfg.eval.baselines:
        jobs.append((SINGLE_PHASE, single_phase_config(cfg), cfg.run.seed * 1000 + 999))
    return jobs


def phase_hash(cfg: Config, phase: PhaseConfig) -> str:
    distill = dataclasses.asdict(cfg.distill)
    for volatile in ("checkpoint_every", "report_every", "recall_every", "gpus_per_phase", "exact_checkpoints"):
        distill.pop(volatile)
    return section_hash(experts_hash(cfg), cfg.experts.num_experts, cfg.shortcut, phase, distill, cfg.run.seed)


def needed_ranges(cfg: Config) -> list[tuple[int, int]]:
    """The distinct teacher ranges [a, b] the configured phases (and the single-phase baseline) match."""
    ranges = {(p.range_start, p.range_end) for p in cfg.phases}
    if "single_phase" in cfg.eval.baselines:
        single = single_phase_config(cfg)
        ranges.add((single.range_start, single.range_end))
    return sorted(ranges)


def single_phase_config(cfg: Config) -> PhaseConfig:
    """The LoRS-style baseline: ONE subset of the same total budget over one range (the first phase's
    range and start window), as many iterations as the longest phase."""
    first = cfg.phases[0]
    return dataclasses.replace(first, pairs=cfg.total_pairs, iterations=max(p.iterations for p in cfg.phases))


# --------------------------------------------------------------------------- data


def prepare(cfg: Config, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Prepared Parquet shards for every split under ``<root>/data`` (skipped when up to date).

    ``progress(split, done, total)``; split is "source" while the built-in dataset is generated.
    """
    from ptmst_ray.data.dataset import split_manifest
    from ptmst_ray.data.prepare import prepare_dataset

    data_dir = Layout(shared_root(cfg)).data
    manifest = prepare_dataset(cfg.data, data_dir, progress=progress)
    for split in manifest["splits"]:  # cheap check before anything uses them; loaders verify hashes
        m = split_manifest(data_dir, split, verify=False)
        for name in m["files"]:
            url = storage.join(data_dir, split, name)
            if not storage.exists(url):
                raise storage.StorageError(f"{url}: listed in the split's manifest but missing", url)
    return manifest


def _normalised_split(cfg: Config, split: str):
    from ptmst_ray.data.dataset import load_split, normalize_images

    data = load_split(Layout(shared_root(cfg)).data, split)
    return data, normalize_images(data.images)


# --------------------------------------------------------------------------- pretraining


def pretrain_runs(cfg: Config) -> list[PretrainConfig]:
    """The CLIP runs of the pretraining stage: one (``joint``), or two independent ones (``separate``:
    the image tower of the first, the text tower of the second, seed + 1)."""
    if cfg.pretrain.towers == "joint":
        return [cfg.pretrain]
    return [cfg.pretrain, dataclasses.replace(cfg.pretrain, seed=cfg.pretrain.seed + 1)]


def pretrain_run(cfg: Config, run_cfg: PretrainConfig, on_epoch: Callable[[int, dict], None] | None = None) -> dict:
    """One CLIP run of :func:`pretrain_runs` on the pretraining split; returns its state dict."""
    from ptmst_ray.models.pretrain import pretrain_clip

    data, images = _normalised_split(cfg, "pretrain")
    # one row per caption -> its image
    return pretrain_clip(cfg.model, run_cfg, images[data.image_index], list(data.captions), on_epoch=on_epoch)


TrainRuns = Callable[[Config, list[PretrainConfig]], list[dict]]
"""Trains the given CLIP runs (each with :func:`pretrain_run`) and returns their state dicts, in order."""


def _runs_in_turn(progress: Progress | None) -> TrainRuns:
    """The default :data:`TrainRuns`: one run after the other in this process, one progress count."""

    def train(cfg: Config, runs: list[PretrainConfig]) -> list[dict]:
        total, done, states = sum(r.epochs for r in runs), 0, []
        for run_cfg in runs:
            def on_epoch(epoch: int, _metrics: dict, before: int = done) -> None:
                if progress:
                    progress(before + epoch, total)

            states.append(pretrain_run(cfg, run_cfg, on_epoch=on_epoch))
            done += run_cfg.epochs
        return states

    return train


def pretrain(cfg: Config, progress: Progress | None = None, train: TrainRuns | None = None) -> dict | None:
    """Pretrain the towers on the disjoint pretraining split (built-in dataset); skip when done.

    ``train`` runs the CLIP runs (the driver runs them as parallel Ray tasks); by default they run here
    in turn, reporting ``progress(epochs done, epochs in all)``.
    """
    if not cfg.pretrain.enabled:
        return None
    from ptmst_ray.models.pretrain import save_checkpoint

    out = Layout(shared_root(cfg)).pretrain
    chash = pretrain_hash(cfg)
    done = storage.read_manifest(out)
    if done is not None and done.get("config_hash") == chash and storage.exists(cfg.model.pretrained):
        return done
    states = (train or _runs_in_turn(progress))(cfg, pretrain_runs(cfg))
    state = states[0] if len(states) == 1 else merge_towers(image_state=states[0], text_state=states[1])
    digest = save_checkpoint(cfg.model.pretrained, state)
    zero_shot = zero_shot_recall(dataclasses.replace(cfg.model, pretrained=cfg.model.pretrained), cfg)
    manifest = {"config_hash": chash, "checkpoint": cfg.model.pretrained, "sha256": digest, "zero_shot": zero_shot}
    storage.write_manifest(out, manifest)
    return manifest


def merge_towers(image_state: dict, text_state: dict) -> dict:
    """One CLIP state dict: the image tower (``visual.*``) of one run, everything else of the other."""
    if image_state.keys() != text_state.keys():
        raise StageError("merge_towers: the two pretraining runs have different parameter names")
    return {k: (image_state[k] if k.startswith("visual.") else text_state[k]) for k in image_state}


def zero_shot_recall(model_cfg, cfg: Config) -> dict:
    """Retrieval of the pretrained CLIP (both towers) on the test split."""
    import open_clip

    from ptmst_ray.evaluate.metrics import retrieval_metrics
    from ptmst_ray.models.towers import build_clip

    test, images = _normalised_split(cfg, "test")
    model = build_clip(model_cfg).eval()
    tok = open_clip.get_tokenizer(model_cfg.name)
    with torch.no_grad():
        img = torch.nn.functional.normalize(model.encode_image(images), dim=-1)
        txt = torch.cat([model.encode_text(tok(test.captions[i:i + 512]), normalize=True)
                         for i in range(0, len(test.captions), 512)])
    return retrieval_metrics(img @ txt.T, test.txt2img)


# --------------------------------------------------------------------------- caption embeddings


def embed(cfg: Config, progress: Progress | None = None) -> str:
    """Frozen-text-tower embeddings of the train and test captions, under data/embedded/<key>.

    Uses the per-caption cache (reused across runs and configs). Returns the key.
    """
    from ptmst_ray.data.dataset import load_split
    from ptmst_ray.data.text_cache import embed_captions
    from ptmst_ray.models.towers import build_text_encoder

    layout = Layout(shared_root(cfg))
    encoder = build_text_encoder(cfg.model)
    key = section_hash(encoder.key, data_hash(cfg))
    out = layout.embedded(key)
    done = storage.read_manifest(out)
    if done is not None and done.get("config_hash") == key:
        storage.verify_files(out, done["files"])  # small files: check them before any worker uses them
        return key
    files = {}
    for split in ("train", "test"):
        data = load_split(layout.data, split)
        emb = embed_captions(list(data.captions), encoder, storage.join(layout.data, "text_cache"),
                             progress=progress)
        blob = st_save({"text": emb.float().contiguous()})
        storage.write_bytes(storage.join(out, f"{split}.safetensors"), blob)
        files[f"{split}.safetensors"] = storage.hash_bytes(blob)
    storage.write_manifest(out, {"config_hash": key, "files": files, "dim": encoder.dim})
    storage.write_text(storage.join(layout.data, "embedded", "CURRENT"), key)
    return key


@dataclass
class RealData:
    """The real train split (one row per caption) and the test split, ready for the models."""

    train_images: torch.Tensor  # float, CLIP-normalised, one row per caption
    train_text: torch.Tensor  # caption embeddings, one row per caption
    train_captions: list[str]
    train_image_index: torch.Tensor  # row -> distinct train image
    test_images: torch.Tensor
    test_text: torch.Tensor
    test_captions: list[str]
    txt2img: torch.Tensor

    @property
    def text_dim(self) -> int:
        return int(self.train_text.shape[1])


@functools.lru_cache(maxsize=2)
def _load_real_cached(root: str, key: str, max_train_rows: int | None) -> RealData:
    from ptmst_ray.data.dataset import load_split, normalize_images

    layout = Layout(root)
    out = layout.embedded(key)
    manifest = storage.read_manifest(out)
    if manifest is None:
        raise StageError(f"{out}: caption embeddings are missing; run `ptmst-ray run` (or `ptmst-ray data prepare`)")
    storage.verify_files(out, manifest["files"])
    emb = {s: st_load(storage.read_bytes(storage.join(out, f"{s}.safetensors")))["text"] for s in ("train", "test")}
    train, test = load_split(layout.data, "train"), load_split(layout.data, "test")
    rows = torch.arange(len(train.captions))
    if max_train_rows is not None:
        rows = rows[:max_train_rows]
    return RealData(
        train_images=normalize_images(train.images[train.image_index[rows]]),
        train_text=emb["train"][rows],
        train_captions=[train.captions[i] for i in rows.tolist()],
        train_image_index=train.image_index[rows],
        test_images=normalize_images(test.images),
        test_text=emb["test"],
        test_captions=list(test.captions),
        txt2img=test.txt2img,
    )


def load_real(cfg: Config) -> RealData:
    """The embedded real data of this run (cached per process: Ray workers load it once)."""
    layout = Layout(shared_root(cfg))
    current = storage.join(layout.data, "embedded", "CURRENT")
    if not storage.exists(current):
        raise StageError(f"{current}: no caption embeddings yet; run `ptmst-ray run` or `ptmst-ray data prepare`")
    return _load_real_cached(layout.root, storage.read_text(current).strip(), cfg.data.max_train_rows)


# --------------------------------------------------------------------------- experts and shortcuts


def train_and_store_expert(cfg: Config, expert_id: int, on_epoch: Callable[[int, dict], None] | None = None) -> int:
    """Train expert ``expert_id`` (unless complete) and write it to the trajectory store."""
    from ptmst_ray.trajectories.expert import expert_seed, train_expert
    from ptmst_ray.trajectories.store import TrajectoryStore

    store = TrajectoryStore.for_run(shared_root(cfg))
    chash = experts_hash(cfg)
    if store.is_complete(expert_id, chash):
        return expert_id
    real = load_real(cfg)
    snapshots = train_expert(cfg.experts, cfg.model, real.train_images, real.train_text, expert_id, on_epoch=on_epoch)
    store.write_expert(expert_id, snapshots, seed=expert_seed(cfg.experts, expert_id), config_hash=chash)
    return expert_id


def compress_expert(cfg: Config, expert_id: int,
                    ranges: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Shortcut trajectories of one finished expert for ``ranges`` (default: every range the phases need)."""
    from ptmst_ray.trajectories.shortcut import shortcut_trajectory
    from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore

    chash = experts_hash(cfg)
    shortcuts = ShortcutStore.for_run(shared_root(cfg))
    todo = [r for r in (ranges or needed_ranges(cfg)) if not shortcuts.is_complete(r[0], r[1], expert_id, chash)]
    if not todo:
        return []
    snapshots = TrajectoryStore.for_run(shared_root(cfg)).load_expert(expert_id, chash)
    for a, b in todo:
        shortcuts.write(a, b, expert_id, shortcut_trajectory(snapshots, a, b), config_hash=chash)
    return todo


# --------------------------------------------------------------------------- phases


class StoredTrajectories:
    """TrajectorySource over the stored shortcut (or, for the ablation, raw) trajectories of one range."""

    def __init__(self, cfg: Config, phase: PhaseConfig, split: Callable, device: torch.device):
        from ptmst_ray.trajectories.shortcut import raw_trajectory
        from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore

        a, b, chash = phase.range_start, phase.range_end, experts_hash(cfg)
        n = cfg.experts.num_experts
        if cfg.shortcut.enabled:
            store = ShortcutStore.for_run(shared_root(cfg))
            missing = store.missing_ids(a, b, n, chash)
            if missing:
                raise StageError(f"{store.range_dir(a, b)}: shortcut trajectories of experts {missing} are missing; "
                                 "run `ptmst-ray shortcut` (or `ptmst-ray run`) first")
            self.trajs = [store.load(a, b, i).to(device) for i in range(n)]
        else:
            store = TrajectoryStore.for_run(shared_root(cfg))
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

    layout, chash = Layout(cfg.run.root), phase_hash(cfg, phase)
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
    real_captions = _nearest_caption_extra(ema, real)
    save_subset(layout.subset(name), ema, phase, init_indices=syn.init_indices, iterations=trainer.iteration,
                config_hash=chash, extra={"name": name, "nearest_captions": real_captions})
    return {"status": "done", "skipped": False, "iterations": trainer.iteration}


def phase_recall(cfg: Config, phase: PhaseConfig, ema: dict, real: RealData, seed: int = 0) -> dict[str, float]:
    """Retrieval recall of one phase's current EMA subset alone (one student, its learned step sizes).

    The student draws its initialisation and batches from its own seeded generators, so scoring
    does not perturb the distillation's random streams (a resumed run stays bit-identical).
    """
    from ptmst_ray.distill.export import _similarity_matrix
    from ptmst_ray.evaluate.protocol import Subset, evaluate_one_seed
    from ptmst_ray.evaluate.student import RetrievalSet
    from ptmst_ray.models.student import build_student

    state = {k: v.detach().float().cpu() for k, v in ema.items()}
    subset = Subset(images=state["images"], text_emb=state["text"],
                    similarity=_similarity_matrix(phase.similarity, state).float(),
                    lr_img=float(state["alpha_img"]), lr_txt=float(state["alpha_txt"]))
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


def _nearest_caption_extra(ema: dict, real: RealData) -> list[str]:
    from ptmst_ray.distill.export import nearest_captions

    return nearest_captions(ema["text"].float().cpu(), real.train_text, real.train_captions)


def diverged_dir(cfg: Config, name: str) -> str:
    """Where a diverged phase keeps its last finite EMA state (never counted as the phase's subset)."""
    return storage.join(cfg.run.root, "phases", name, "diverged")


def _keep_diverged(cfg: Config, name: str, phase: PhaseConfig, ema: dict, info: dict) -> dict:
    from ptmst_ray.distill.export import save_subset

    out = diverged_dir(cfg, name)
    finite_at = max(0, int(info.get("iteration", 1)) - 1)  # the EMA was last updated by the iteration before
    save_subset(out, ema, phase, config_hash=phase_hash(cfg, phase), iterations=finite_at,
                extra={"name": name, "diverged": info, "nearest_captions": _nearest_caption_extra(ema, load_real(cfg))})
    log.error("phase %s diverged (%s); its last finite EMA state is in %s", name, info.get("detail"), out)
    return {"status": "diverged", "detail": info.get("detail"), "kept": out}
