"""Typed, strict configuration: one frozen dataclass per pipeline stage, loaded from YAML.

Why this file exists: every stage reads its settings from here, and every bad value must be
rejected *before* any work starts, with a message that names the file and the field path
(``phases[1].start_max``). Unknown keys and wrong types are errors; per-phase settings are a
list of :class:`PhaseConfig`, never parallel lists.
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

from ptmst_ray.vocab import BASELINES, GRAD_METHODS, LOSS_NAMES

_HERE = Path(__file__).resolve().parent
CONFIG_DIR = _HERE / "configs" if (_HERE / "configs").is_dir() else _HERE.parent / "configs"
"""The shipped recipes: the clone's configs/ (an editable install, as `make` does), or the copy a wheel
installs inside the package (pyproject.toml maps configs/ to ``ptmst_ray.configs``)."""
DEFAULT_CONFIG = CONFIG_DIR / "toy.yaml"


def shipped_configs() -> list[str]:
    """The shipped recipes' names (``toy``, ``scenes``, ...), what :func:`find_config` takes as a bare name."""
    return sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def find_config(path: str | os.PathLike) -> str:
    """``path`` as given, or, for a bare name that is no file here (``scenes``, ``scenes.yaml``), that shipped
    recipe in :data:`CONFIG_DIR`. A name with a folder or a URL is always taken as given."""
    text = str(path)
    if "://" in text or os.sep in text or "/" in text or os.path.exists(text):
        return text
    shipped = CONFIG_DIR / (text if text.endswith((".yaml", ".yml")) else f"{text}.yaml")
    return str(shipped) if shipped.is_file() else text


class ConfigError(ValueError):
    """A bad configuration value. ``path`` is the dotted field path, ``source`` the file."""

    def __init__(self, path: str, message: str, source: str | None = None):
        self.path, self.message, self.source = path, message, source
        field = f"{path}: " if path else ("" if source else "the config's top level: ")  # a whole file: its name
        super().__init__(f"{source}: {field}{message}" if source else f"{field}{message}")

    def __reduce__(self):  # pickled by its fields: Ray carries a task's error to the driver so (args is the text)
        return type(self), (self.path, self.message, self.source)

    def at(self, prefix: str, source: str | None = None) -> "ConfigError":
        path = _join_path(prefix, self.path)
        return ConfigError(path, self.message, source or self.source)


def _join_path(prefix: str, path: str) -> str:
    if not prefix:
        return path
    if not path:
        return prefix
    return f"{prefix}{path}" if path.startswith("[") else f"{prefix}.{path}"


def _check(cond: bool, path: str, message: str) -> None:
    if not cond:
        raise ConfigError(path, message)


# --------------------------------------------------------------------------- sections


@dataclass(frozen=True)
class RunConfig:
    """Where a run lives and how it reaches Ray."""

    root: str = "~/.cache/ptmst-ray/toy"
    """Run root: a local path or any fsspec URL (s3://, gs://, memory://). Every stage writes under it."""
    seed: int = 0
    """Master seed; stage seeds derive from it."""
    address: Optional[str] = None
    """Ray address of an existing cluster; None starts a local one (laptop mode). RAY_ADDRESS also works."""
    threads_per_worker: int = 0
    """torch threads inside each Ray worker; 0 = the CPUs the worker was given (on CPUs, the expert actors,
    pretraining runs and phase workers of a stage share the cluster's CPUs equally). More than that, where the
    workers compute on CPUs side by side, oversubscribes the cores (a worker warns: several times slower)."""
    shared_root: Optional[str] = None
    """Root whose data, pretrain, experts and shortcuts this run reuses (sweep trials); None = root."""
    gpus_per_task: float = 1.0
    """GPUs each evaluation task (one method x seed student, the full-data baseline) and each pretraining run
    asks Ray for when the cluster has GPUs (fractions share one); 0 = CPU only. Without GPUs: one CPU each."""
    accelerator: Literal["auto", "gpu", "cpu"] = "auto"
    """What the heavy stages (experts, phases, pretraining, evaluation) ask Ray for, decided once when the
    run starts and printed: gpu = GPUs (the autoscaler is asked for GPU nodes before each stage, so a
    cluster whose GPU workers have min_workers 0 gets them); cpu = CPUs only; auto = gpu when the cluster
    has GPUs now or its autoscaler config lists GPU node types, else cpu (a laptop's local Ray: cpu)."""

    def __post_init__(self):
        _check(bool(self.root), "root", "must be a path or URL, e.g. ~/ptmst-runs/toy or s3://bucket/runs/toy")
        _check(self.threads_per_worker >= 0, "threads_per_worker", "must be >= 0")
        _check(self.gpus_per_task >= 0, "gpus_per_task", "must be >= 0 (0: evaluation and pretraining on CPUs)")


@dataclass(frozen=True)
class BuiltinDataConfig:
    """The generated dataset: coloured shapes, or scenes of several objects (``kind``; docs/design.md#built-in-data)."""

    seed: int = 0
    """Generation seed of the distillation train/test splits."""
    pretrain_seed: int = 1000
    """Generation seed of the disjoint pretraining split."""
    train_images: int = 1000
    """Images in the train split (each with captions_per_image rows)."""
    test_images: int = 1000
    """Images in the test split (5 captions each); 1000 = the Flickr30k (Karpathy) test split's size."""
    pretrain_images: int = 2000
    """Images in the pretraining split (disjoint from train and test)."""
    captions_per_image: int = 2
    """Train rows per image (one per caption)."""
    val_images: int = 0
    """Images in a val split (5 captions each, like test; disjoint from every other split), on which evaluation
    chooses its best point and the full-data baseline stops (docs/method.md#evaluation-protocol); 0 = no val split."""
    kind: Literal["shapes", "scenes", "scenes-alt"] = "shapes"
    """What the generator draws. shapes: one or two coloured shapes, every caption naming every attribute (the
    laptop demo; few concepts, so 50 random pairs already score near full data). scenes: 2-5 objects (20 kinds,
    11 colours, 3 sizes, 5 textures, a 3x3 grid) with relations, each caption naming a different part, a concept
    space far larger than the budgets (configs/scenes.yaml). scenes-alt: the same generator with other objects,
    words and image statistics, kept out of tuning to check that a recipe carries over (docs/design.md#built-in-data)."""
    objects_min: int = 2
    """Fewest objects in a scene (scenes kinds only)."""
    objects_max: int = 5
    """Most objects in a scene (scenes kinds only; at most 9, the grid's cells)."""

    def __post_init__(self):
        for name in ("train_images", "test_images", "pretrain_images", "captions_per_image"):
            _check(getattr(self, name) >= 1, name, "must be >= 1")
        _check(self.val_images >= 0, "val_images", "must be >= 0 (0: no val split)")
        _check(1 <= self.objects_min <= self.objects_max <= 9, "objects_max",
               f"objects_min ({self.objects_min}) and objects_max ({self.objects_max}) must satisfy "
               "1 <= objects_min <= objects_max <= 9 (a scene's objects sit in distinct cells of a 3x3 grid)")

    def identity(self) -> dict[str, Any]:
        """The fields as a dict for hashing, without the fields added later while they hold their default
        (:data:`ADDED_BUILTIN_DEFAULTS`): a config that does not use them keeps the hashes, and the prepared data
        and experts, it had before they existed."""
        fields = dataclasses.asdict(self)
        for name, default in ADDED_BUILTIN_DEFAULTS.items():
            if name in fields and fields[name] == default:
                del fields[name]
        return fields


ADDED_BUILTIN_DEFAULTS: dict[str, Any] = {"val_images": 0, "kind": "shapes", "objects_min": 2, "objects_max": 5}
"""``data.builtin`` fields added after data was first prepared, with the default that leaves their hash out."""


READ_SETTINGS = ("stream", "hold_images_mb", "stream_buffer", "prefetch", "decode_workers", "image_cache_mb")
"""``data`` settings of how training reads the prepared data, not of what preparation writes."""


@dataclass(frozen=True)
class DataConfig:
    """Which image-text dataset, and how it is prepared."""

    dataset: Literal["builtin", "flickr30k", "coco", "cc3m", "karpathy"] = "builtin"
    """builtin (generated); a benchmark in the Karpathy/BLIP annotation format, under its own file names
    (flickr30k_test.json, coco_karpathy_test.json, cc3m_captions_test.json); or karpathy: data of your own in that
    format as train.json, test.json and, optionally, val.json."""
    annotations: Optional[str] = None
    """Folder (path or fsspec URL) holding the annotation JSON files; unused for builtin."""
    images: Optional[str] = None
    """Folder (path or fsspec URL) the annotations' relative image paths start from; default = annotations."""
    image_size: int = 32
    """Images are resized to this (the model's input size, pixels per side)."""
    max_words: int = 30
    """Captions are cut to this many words after normalisation."""
    shard_rows: int = 2048
    """Rows per Parquet shard when preparing."""
    skip_bad: bool = False
    """Skip (and list in the manifest) rows whose image or caption is bad instead of failing."""
    max_train_rows: Optional[int] = None
    """Use only the first N train rows (debugging); None = all."""
    workers: int = 1
    """Image decoding while preparing: 1 = in this process; N > 1 = up to N Ray tasks at once (same output)."""
    stream: Literal["auto", "on", "off"] = "auto"
    """How training reads a whole pairs split (experts, the full-data baseline, pretraining): on = stream
    batches from the Parquet shards (memory bounded by a shard, ``stream_buffer`` and ``prefetch``, not by the
    split); off = decode every image once and hold it as uint8 in each worker; auto = hold when the split's
    decoded uint8 pixels fit in ``hold_images_mb``, else stream. Held and streamed batches come in different
    (each seeded) orders, so this decides the experts' data order; decided once per split and logged."""
    hold_images_mb: float = 2048.0
    """``stream: auto`` holds a split whose decoded uint8 pixels (images x 3 x size^2 bytes) fit in this many MiB
    (per worker process: each expert actor and evaluation task holds its own copy); above it, it streams."""
    stream_buffer: int = 4096
    """Caption rows (encoded images) in the streaming shuffle buffer: more mixes shards more, costs memory."""
    prefetch: int = 2
    """Batches a background thread decodes ahead of training when streaming (0 = decode in the training thread)."""
    decode_workers: int = 0
    """Threads that decode a streamed split's batches at once (PIL and torch release the GIL); batches and their
    order are the same for any value. 0 = auto: 1 on a worker that trains on its CPUs (they run the model), the
    worker's torch threads on a GPU worker (the Ray layer sets them from the CPUs Ray gave it:
    ``runtime.worker_threads``), at least 3 there (``device.GPU_DECODE_THREADS``: what a GPU training NFNet-L0 at
    224 px consumes, bench/RESULTS.md "Train data path"): give such a worker the CPUs to match."""
    image_cache_mb: float = 256.0
    """Decoded uint8 images a stream keeps (LRU, per worker) so an image's other captions are not decoded
    again; 0 = none. Changes speed and memory only, never the batches."""
    builtin: BuiltinDataConfig = field(default_factory=BuiltinDataConfig)
    """The generated dataset's sizes and seeds; read only when dataset is builtin."""

    def output_settings(self) -> dict[str, Any]:
        """The settings that decide what preparation writes (all but ``workers``, which only decides
        where images are decoded): the identity of the prepared data."""
        settings = dataclasses.asdict(self)
        for read_only in ("workers",) + READ_SETTINGS:
            settings.pop(read_only)
        settings["builtin"] = self.builtin.identity()
        return settings

    def __post_init__(self):
        _check(self.workers >= 1, "workers", "must be >= 1 (1 decodes in this process, N > 1 in N Ray tasks)")
        _check(self.image_size >= 8, "image_size", "must be >= 8")
        _check(self.max_words >= 1, "max_words", "must be >= 1")
        _check(self.shard_rows >= 1, "shard_rows", "must be >= 1")
        _check(self.hold_images_mb >= 0, "hold_images_mb", "must be >= 0 (MiB of decoded pixels a worker may hold)")
        _check(self.stream_buffer >= 1, "stream_buffer", "must be >= 1 (caption rows in the shuffle buffer)")
        _check(self.prefetch >= 0, "prefetch", "must be >= 0 (0 decodes in the training thread)")
        _check(self.decode_workers >= 0, "decode_workers", "must be >= 0 (0 = auto, N = N decoding threads)")
        _check(self.image_cache_mb >= 0, "image_cache_mb", "must be >= 0 (0 = no decoded-image cache)")
        if self.dataset != "builtin":
            _check(
                self.annotations is not None,
                "annotations",
                f"dataset {self.dataset!r} needs the folder of its annotation JSON files "
                "(set data.annotations to a path or fsspec URL)",
            )


@dataclass(frozen=True)
class ModelConfig:
    """Trainable image tower + text projection head over a frozen text tower (open_clip)."""

    name: str = "ptmst-toy-vit"
    """open_clip model config name (open_clip's own or one in ptmst_ray/models/model_configs)."""
    pretrained: Optional[str] = None
    """open_clip pretrained tag, or a local/fsspec checkpoint of the whole CLIP model."""
    image_pretrained: Optional[str] = None
    """Checkpoint (path/URL) of the image tower only; overrides `pretrained` for it."""
    text_pretrained: Optional[str] = None
    """Checkpoint (path/URL) of the text tower only; overrides `pretrained` for it."""
    image_trainable: bool = True
    """Train the whole image encoder (paper) or freeze it (CC3M recipe; needs image weights)."""
    image_proj_dim: Optional[int] = None
    """Size of a trainable linear map (no bias) of the image features, trained even with a frozen tower; None = none."""
    head_dim: Optional[int] = None
    """Text head output size; must equal the image embedding size (after image_proj_dim); None = that size."""
    head_dropout: float = 0.0
    """Dropout probability inside the text projection head."""
    temperature: float = 0.07
    """Logit scale is 1/temperature (fixed)."""
    cache_frozen_features: bool = True
    """With a frozen image tower (image_trainable: false): compute its features of every real train and test image
    once (run root's features/<key>/) and train experts, the full-data baseline and evaluation students on them
    instead of running the tower every epoch; the same results up to float rounding. false: run the tower
    every epoch. Has no effect with a trainable tower, and is not part of any artefact's hash."""

    def __post_init__(self):
        _check(self.temperature > 0, "temperature", "must be > 0")
        _check(0.0 <= self.head_dropout < 1.0, "head_dropout", "must be in [0, 1)")
        if self.head_dim is not None:
            _check(self.head_dim >= 1, "head_dim", "must be >= 1")
        if self.image_proj_dim is not None:
            _check(self.image_proj_dim >= 1, "image_proj_dim", "must be >= 1")


@dataclass(frozen=True)
class PretrainConfig:
    """Pretraining of the (tiny) towers for the built-in dataset (no downloadable weights here)."""

    enabled: bool = False
    """Run the pretraining stage (writes the checkpoint `model.pretrained` points at)."""
    epochs: int = 10
    """Passes over the pretraining split; the learning rate decays to 0 by a cosine over all of them."""
    batch_size: int = 128
    """Caption rows per CLIP step (a contrastive loss needs >= 2); a short last batch of an epoch is dropped."""
    lr: float = 1e-3
    """Peak AdamW learning rate (cosine decay to 0 over all epochs)."""
    weight_decay: float = 0.1
    """AdamW (decoupled) weight decay."""
    seed: int = 0
    """Seed of the CLIP model's initialisation and of the data order."""
    towers: Literal["joint", "separate"] = "joint"
    """joint: one CLIP run (aligned towers); separate: two runs (seed, seed + 1), unaligned as the paper's towers."""

    def __post_init__(self):
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 2, "batch_size", "must be >= 2")
        _check(self.towers in ("joint", "separate"), "towers", "must be joint or separate")
        _check(self.lr > 0, "lr", "must be > 0")


@dataclass(frozen=True)
class ExpertsConfig:
    """Expert trajectories: students trained on the real train split, the teachers distillation matches."""

    num_experts: int = 20
    """Experts (independent trajectories) to train; distillation draws its teacher from them in turn."""
    epochs: int = 10
    """K_e: snapshots after epochs 0..epochs are saved."""
    lr_img: float | Literal["auto"] = 0.1
    """SGD learning rate of the trainable image side (the tower unless frozen, and the image projection); auto =
    picked before the experts by the experts' learning-rate rule over ``lr_candidates`` (then lr_txt is auto too:
    docs/method.md#a-recipe-for-new-data)."""
    lr_txt: float | Literal["auto"] = 0.1
    """SGD learning rate of the text projection head (auto: the rule's pick, the same as lr_img's)."""
    lr_candidates: list[float] = field(default_factory=lambda: [0.3, 0.1, 0.03, 0.01])
    """With lr auto: the learning rates the rule tries, one probe expert each (a factor ~3 apart); the pick is the
    largest whose expert keeps its first epochs' displacements aligned."""
    momentum: float = 0.0
    """SGD momentum of the experts (the paper: 0, plain SGD)."""
    weight_decay: float = 0.0
    """SGD weight decay of the experts (the paper: 0)."""
    batch_size: int = 128
    """Real pairs per expert SGD step; a last batch of one pair is dropped."""
    loss: str = "InfoNCE"
    """Expert loss against identity targets, one of LOSS_NAMES (InfoNCE = the CLIP loss, the paper's)."""
    seed: int = 0
    """Expert i uses seed + i (head init and data order)."""
    gpus_per_expert: float = 1.0
    """GPUs per expert actor when the cluster has GPUs."""

    def __post_init__(self):
        _check(self.num_experts >= 1, "num_experts", "must be >= 1")
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.batch_size >= 2, "batch_size", "must be >= 2")
        _check((self.lr_img == "auto") == (self.lr_txt == "auto"), "lr_txt",
               "must be auto exactly when lr_img is (the rule picks one learning rate for both)")
        _check(self.lr_img == "auto" or (self.lr_img > 0 and self.lr_txt > 0), "lr_img", "learning rates must be > 0")
        _check(len(self.lr_candidates) >= 1 and all(lr > 0 for lr in self.lr_candidates), "lr_candidates",
               "must list at least one learning rate, each > 0")
        _check(self.loss in LOSS_NAMES, "loss", f"must be one of {', '.join(LOSS_NAMES)}")


@dataclass(frozen=True)
class ShortcutConfig:
    """Shortcut trajectories (docs/method.md#shortcut-trajectories)."""

    enabled: bool = True
    """False = match against the raw expert trajectory (ablation)."""


@dataclass(frozen=True)
class SimilarityConfig:
    """The learned target similarity S of a phase's synthetic pairs (docs/method.md#similarity)."""

    kind: Literal["full", "lowrank"] = "full"
    """full: a free n x n matrix (init identity); lowrank: diag(w) + (alpha / r) L R^T, whose cost grows with n r."""
    rank: int = 10
    """Rank r of the low-rank generator."""
    alpha: float = 1.0
    """Scale alpha of the low-rank term (alpha / r) L R^T."""

    def __post_init__(self):
        _check(self.rank >= 1, "rank", "must be >= 1")


@dataclass(frozen=True)
class PhaseConfig:
    """One phase: its teacher range, start window and synthetic subset (docs/method.md#phases)."""

    range_start: int = 0
    """a: first epoch of the (shortcut) teacher range."""
    range_end: int | Literal["auto"] = 6
    """b: last epoch of the teacher range; auto = the windows' rule's pick from expert 0's trajectory, made once
    that expert is trained (docs/method.md#a-recipe-for-new-data): the b in [start_max + expert_epochs,
    experts.epochs] whose chord theta_b - theta_a is best aligned with the epochs this phase's targets lie in."""
    start_min: int = 0
    """Smallest start epoch (absolute epoch, within [a, b])."""
    start_max: int = 1
    """Largest start epoch; start + expert_epochs must stay <= range_end."""
    pairs: int = 99
    """Synthetic image-text pairs of this phase."""
    iterations: int = 2000
    """Distillation iterations (one trajectory match and one optimiser step each) of this phase."""
    minibatch: int = 20
    """Synthetic pairs per student step."""
    similarity: SimilarityConfig = field(default_factory=SimilarityConfig)
    """How this phase's learned target similarity S is parameterised."""

    def __post_init__(self):
        _check(self.range_start >= 0, "range_start", "must be >= 0")
        _check(self.range_end == "auto" or self.range_end > self.range_start, "range_end",
               f"must be > range_start ({self.range_start}) or auto")
        _check(self.start_min >= self.range_start, "start_min", f"must be >= range_start ({self.range_start})")
        _check(self.start_max >= self.start_min, "start_max", f"must be >= start_min ({self.start_min})")
        _check(self.pairs >= 1, "pairs", "must be >= 1")
        _check(self.iterations >= 1, "iterations", "must be >= 1")
        _check(self.minibatch >= 2, "minibatch", "must be >= 2")
        _check(
            self.pairs >= self.minibatch,
            "pairs",
            f"the phase budget ({self.pairs} pairs) is smaller than its minibatch ({self.minibatch}); "
            "raise pairs or lower minibatch",
        )


AUTO_EMA_ITERATIONS = 20
"""``distill.ema_decay: auto`` = 1 - this / iterations: the paper's 0.99 at its 2000 iterations."""


@dataclass(frozen=True)
class DistillConfig:
    """Settings shared by every phase's distillation (docs/method.md#gradient-rules)."""

    syn_steps: int = 8
    """N: student steps unrolled per iteration."""
    expert_epochs: int = 1
    """m: target = trajectory[start + m]."""
    grad_method: Literal[GRAD_METHODS] = "first_order"
    """Meta-gradient rule: first_order (paper), exact (adjoint = autograd, checkpointed) or unrolled (reference)."""
    exact_checkpoints: Optional[int] = None
    """exact only: parameter vectors held at once (fewer = less memory, more replays; same result); None/0 = auto."""
    keep_graphs: Optional[bool] = None
    """first_order only: keep the N step graphs of the unroll instead of replaying it (same result, ~10% less
    time on the toy, N graphs' memory); None = auto: keep them when they take at most 256 MiB."""
    loss: str = "WBCE"
    """Student loss in the matching unroll, one of LOSS_NAMES (the paper: WBCE); also the evaluation's default."""
    lr_img: float = 1000.0
    """SGD learning rate of the synthetic images (CLIP-normalised pixels); lower it if matching diverges."""
    lr_txt: float = 1000.0
    """SGD learning rate of the synthetic text embeddings; lower it if matching diverges."""
    rel_lr_img: Optional[float] = None
    """Set instead of lr_img to derive it from the data: at a phase's first iteration lr_img becomes
    rel_lr_img x RMS(images) / RMS(dM/d images), so that the first update moves the images by this fraction of
    their RMS whatever the pixel statistics and the matching gradient's scale; null = the fixed lr_img."""
    rel_lr_txt: Optional[float] = None
    """The same for the synthetic texts and lr_txt (RMS of the text embeddings and of their gradient)."""
    lr_lr: float = 0.01
    """SGD learning rate of the learned student step sizes alpha_img and alpha_txt."""
    rel_lr_lr: Optional[float] = None
    """Set instead of lr_lr to derive it likewise: rel_lr_lr x RMS(alpha_img, alpha_txt) / RMS(dM/d alpha)."""
    lr_sim: float = 10.0
    """SGD learning rate of the learned similarity S; 0 keeps S at its initialisation."""
    rel_lr_sim: Optional[float] = None
    """Set instead of lr_sim to derive it likewise from the similarity's parameters and their gradient."""
    momentum: float = 0.5
    """Momentum of the one SGD optimiser over the images, texts, step sizes and similarity."""
    alpha_init: float = 0.1
    """Initial student step size (alpha_img and alpha_txt) of the unroll; lower it if matching diverges."""
    rel_alpha: Optional[float] = None
    """Set instead of alpha_init to start each step size in units of its tower's expert learning rate: alpha_img
    at rel_alpha x experts.lr_img, alpha_txt at rel_alpha x experts.lr_txt (the paper's recipes: 1, the expert's
    own step); null = both at alpha_init."""
    min_alpha: Optional[float] = None
    """Clamp the learned step sizes from below (None = no clamp)."""
    rel_min_alpha: Optional[float] = None
    """Set instead of min_alpha to floor each step size at this fraction of its start (e.g. 0.1); null = min_alpha."""
    ema_decay: float | Literal["auto"] = 0.99
    """Decay of the EMA of the synthetic state that is saved; 0 disables the EMA (ablation): the raw state.
    auto = 1 - 20 / the phase's iterations (the paper's 0.99 at its 2000), so the saved state averages about the
    last 5% of any phase's iterations instead of lagging a short phase (0.99 over 150 iterations keeps 22% of
    the initial set)."""
    init: Literal["real", "kmeans", "noise"] = "real"
    """Synthetic set initialisation: real = random real train pairs (the paper's; their rows recorded), kmeans = the
    real pairs nearest the centres of a k-means of the caption embeddings (one clustering of the whole budget, each
    phase its own slice), noise = Gaussian."""
    checkpoint_every: int = 100
    """Iterations between phase checkpoints (a resume starts from the last); never changes the result."""
    report_every: int = 10
    """Iterations between metric reports (dashboard, metrics.json, log); never changes the result."""
    recall_every: int = 0
    """Iterations between quick recall scores of the phase's EMA subset (one student training each); 0 = off."""
    gpus_per_phase: float = 1.0
    """GPUs per phase trainer when the cluster has GPUs."""
    max_concurrent: int = 0
    """Distillation runs (phases, the single-phase baseline) at once; 0 = as many as the cluster has room for.
    1 runs them in turn (e.g. to leave the rest of a shared cluster free); never changes a result."""

    def ema_decay_for(self, iterations: int) -> float:
        """The EMA decay of a phase of ``iterations`` (``ema_decay``, or its auto rule)."""
        if self.ema_decay == "auto":
            return max(0.0, 1.0 - AUTO_EMA_ITERATIONS / iterations)
        return float(self.ema_decay)

    def __post_init__(self):
        _check(self.syn_steps >= 1, "syn_steps", "must be >= 1")
        _check(self.expert_epochs >= 1, "expert_epochs", "must be >= 1")
        _check(self.exact_checkpoints is None or self.exact_checkpoints >= 0, "exact_checkpoints",
               f"must be >= 1 parameter vectors (or null/0 for the default schedule), got {self.exact_checkpoints}")
        _check(self.loss in LOSS_NAMES, "loss", f"must be one of {', '.join(LOSS_NAMES)}")
        for name in ("lr_img", "lr_txt", "lr_lr", "lr_sim", "alpha_init"):
            _check(getattr(self, name) >= 0, name, "must be >= 0")
        _check(0.0 <= self.momentum < 1.0, "momentum", "must be in [0, 1)")
        _check(self.ema_decay == "auto" or 0.0 <= self.ema_decay < 1.0, "ema_decay", "must be in [0, 1) or auto")
        for name in ("rel_alpha", "rel_min_alpha"):
            _check(getattr(self, name) is None or getattr(self, name) > 0, name, "must be > 0 or null")
        _check(self.min_alpha is None or self.rel_min_alpha is None, "rel_min_alpha",
               "and min_alpha are two floors for the same step sizes: set one of them (the other null)")
        for name in ("lr_img", "lr_txt", "lr_lr", "lr_sim"):
            rel = getattr(self, f"rel_{name}")
            _check(rel is None or rel > 0, f"rel_{name}",
                   "must be > 0 (a fraction of the RMS, e.g. 0.01) or null for the fixed learning rate")
            _check(rel is None or getattr(self, name) != 0, f"rel_{name}",
                   f"derives {name}, but {name} is 0 (which keeps those parameters fixed): set rel_{name}: null "
                   f"to keep them fixed, or remove {name}: 0")
        _check(self.checkpoint_every >= 1, "checkpoint_every", "must be >= 1")
        _check(self.max_concurrent >= 0, "max_concurrent", "must be >= 0 (0 = as many as fit)")
        _check(self.report_every >= 1, "report_every", "must be >= 1")
        _check(self.recall_every >= 0, "recall_every", "must be >= 0 (0 = no recall during distillation)")


@dataclass(frozen=True)
class EvalConfig:
    """Scoring a distilled set or a baseline by retrieval (docs/method.md#evaluation-protocol)."""

    epochs: int = 100
    """E_eval: student epochs per subset; the learning rate drops x0.1 for the second half."""
    batch_size: int = 128
    """Pairs per student SGD step, and test rows per scoring batch."""
    momentum: float = 0.9
    """SGD momentum of the evaluation student."""
    weight_decay: float = 5e-4
    """SGD weight decay of the evaluation student."""
    lr: Optional[float] = None
    """Fixed student lr for baselines without learned step sizes; None = 0.1 (the experts' lr)."""
    seeds: int = 5
    """Students trained per method; results are the mean and std over them."""
    seed: int = 100
    """Evaluation seed s uses seed + s (never an expert's seed)."""
    eval_points: int = 10
    """Number of evaluation points over training (best-of protocol)."""
    loss: Optional[str] = None
    """Student loss; None = the distillation loss."""
    baselines: list[str] = field(default_factory=lambda: ["random", "single_phase", "full"])
    """Baselines run by `ptmst-ray run`: random, single_phase, full."""
    full_data_epochs: int = 10
    """Student epochs of the full-train-split baseline (full) when it has a fixed schedule: without a val split,
    or with ``full_data_patience: 0``."""
    full_data_patience: int = 5
    """With a val split, the full-data baseline trains until val r_mean stops improving: after this many val
    evaluations without a new best its lr drops x0.1, after as many more it stops, and its best-val point is
    reported; 0 = the fixed ``full_data_epochs`` schedule even with a val split. Unused without a val split."""
    full_data_max_epochs: int = 100
    """The most epochs the full-data baseline trains when it stops by val (``full_data_patience`` > 0); its lr
    also drops x0.1 from epoch max // 2 + 1 if no plateau came first."""
    full_data_val_every: int = 1
    """Epochs between the val evaluations of the full-data baseline that stops by val (and its last epoch)."""
    phase_training: Literal["sequential", "cumulative", "joint"] = "sequential"
    """How students train on the phase subsets: sequential (in phase order, the paper), cumulative or joint."""

    def __post_init__(self):
        _check(self.epochs >= 1, "epochs", "must be >= 1")
        _check(self.phase_training in ("sequential", "cumulative", "joint"), "phase_training",
               "must be sequential, cumulative or joint")
        _check(self.seeds >= 1, "seeds", "must be >= 1")
        _check(self.eval_points >= 1, "eval_points", "must be >= 1")
        _check(self.full_data_epochs >= 1, "full_data_epochs", "must be >= 1")
        _check(self.full_data_patience >= 0, "full_data_patience",
               "must be >= 0 (val evaluations without improvement; 0: the fixed full_data_epochs schedule)")
        _check(self.full_data_max_epochs >= 1, "full_data_max_epochs", "must be >= 1")
        _check(1 <= self.full_data_val_every <= self.full_data_max_epochs, "full_data_val_every",
               f"must be in 1..full_data_max_epochs ({self.full_data_max_epochs})")
        if self.loss is not None:
            _check(self.loss in LOSS_NAMES, "loss", f"must be one of {', '.join(LOSS_NAMES)}")
        for i, b in enumerate(self.baselines):
            _check(b in BASELINES, f"baselines[{i}]", f"must be one of {', '.join(BASELINES)}")


@dataclass(frozen=True)
class SweepConfig:
    """Ray Tune search over the matching ranges (`ptmst-ray sweep`)."""

    searcher: Literal["grid", "random", "optuna", "hyperopt", "bayesopt"] = "random"
    """grid: every combination of the choice/grid values once; random; or a model-based search (own package)."""
    num_samples: int = 8
    """Trials to sample (times each grid value, for random); unused by the grid searcher."""
    max_concurrent: int = 0
    """0 = sized to the cluster: GPUs // phases per trial, else CPUs // phases per trial (at least 1)."""
    scheduler: Literal["none", "asha"] = "asha"
    """asha: stop trials with a low r_mean after a round; none: every trial runs all its rounds."""
    grace_period: int = 1
    """ASHA: evaluation rounds before a trial may be stopped."""
    rounds: int = 3
    """Each trial's phase iterations are split into this many rounds, each ending in a quick evaluation."""
    eval_epochs: Optional[int] = None
    """Student epochs of a round's quick evaluation (one seed); None = eval.epochs."""
    space: dict[str, Any] = field(default_factory=dict)
    """Dotted config path -> {choice|grid: [...]} or {randint|uniform|loguniform: [lo, hi]}."""

    def __post_init__(self):
        _check(self.num_samples >= 1, "num_samples", "must be >= 1")
        _check(self.max_concurrent >= 0, "max_concurrent", "must be >= 0")
        _check(self.rounds >= 1, "rounds", "must be >= 1")
        _check(self.eval_epochs is None or self.eval_epochs >= 1, "eval_epochs", "must be >= 1 (or null)")
        kinds = {"choice", "grid", "randint", "uniform", "loguniform"}
        for key, spec in self.space.items():
            _check(
                isinstance(spec, dict) and len(spec) == 1 and next(iter(spec)) in kinds,
                f"space.{key}",
                f"must be a mapping with one of {sorted(kinds)}, e.g. {{choice: [6, 8]}}",
            )


@dataclass(frozen=True)
class Config:
    """The whole pipeline's configuration (one section per stage)."""

    run: RunConfig = field(default_factory=RunConfig)
    """Where the run lives and how it reaches Ray."""
    data: DataConfig = field(default_factory=DataConfig)
    """The image-text dataset and its preparation."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The student: towers, their weights, and which parts train."""
    pretrain: PretrainConfig = field(default_factory=PretrainConfig)
    """The optional stage that pretrains the towers on the built-in dataset."""
    experts: ExpertsConfig = field(default_factory=ExpertsConfig)
    """The expert trajectories distillation matches."""
    shortcut: ShortcutConfig = field(default_factory=ShortcutConfig)
    """Shortcut (straight-line) teacher trajectories, or the raw ones."""
    phases: list[PhaseConfig] = field(default_factory=lambda: [PhaseConfig()])
    """The phases in order, one synthetic subset each; the distilled set is their union."""
    distill: DistillConfig = field(default_factory=DistillConfig)
    """Distillation settings shared by every phase."""
    eval: EvalConfig = field(default_factory=EvalConfig)
    """Retrieval scoring of the distilled set and the baselines."""
    sweep: SweepConfig = field(default_factory=SweepConfig)
    """The Ray Tune search of `ptmst-ray sweep`."""

    def __post_init__(self):
        _check(len(self.phases) >= 1, "phases", "needs at least one phase")
        if self.pretrain.enabled:
            _check(
                bool(self.model.pretrained) and ("/" in self.model.pretrained or "://" in self.model.pretrained),
                "model.pretrained",
                "pretrain.enabled needs model.pretrained to be the checkpoint path it writes, "
                "e.g. ${run.root}/pretrain/clip.safetensors",
            )
            _check(self.data.dataset == "builtin", "pretrain.enabled",
                   "the pretraining stage trains on the built-in dataset's pretraining split only; "
                   "for benchmarks set model.pretrained / image_pretrained to real weights; for the tiny "
                   "towers on data of your own, set pretrain.enabled=false and model.pretrained to the "
                   "towers a built-in run pretrained (its run root's pretrain/clip.safetensors, e.g. "
                   "~/.cache/ptmst-ray/toy/pretrain/clip.safetensors after `make demo`)")
        _check(
            self.model.image_trainable or bool(self.model.pretrained or self.model.image_pretrained),
            "model.image_trainable",
            "false (a frozen image tower) needs its weights (model.image_pretrained or model.pretrained): "
            "a frozen tower without them is drawn at random per seed, so experts, distillation and "
            "evaluation would each see different features",
        )
        experts = range(self.experts.seed, self.experts.seed + self.experts.num_experts)
        evals = range(self.eval.seed, self.eval.seed + self.eval.seeds)
        _check(
            max(experts.start, evals.start) >= min(experts.stop, evals.stop),
            "eval.seed",
            f"evaluation seeds {evals.start}..{evals.stop - 1} overlap the expert seeds "
            f"{experts.start}..{experts.stop - 1} (experts.seed + expert id): an evaluation student would start "
            f"at an expert's exact starting point; set eval.seed to at least {experts.stop}",
        )
        m = self.distill.expert_epochs
        for i, ph in enumerate(self.phases):
            p = f"phases[{i}]"
            if ph.range_end == "auto":  # the rule picks b in [start_max + m, experts.epochs]: that must hold one
                _check(
                    ph.start_max + m <= self.experts.epochs,
                    f"{p}.start_max",
                    f"range_end auto picks an end in [start_max + distill.expert_epochs, experts.epochs] = "
                    f"[{ph.start_max + m}, {self.experts.epochs}], which is empty; lower start_max to at most "
                    f"{self.experts.epochs - m} or train longer experts (experts.epochs)",
                )
                continue
            _check(
                ph.range_end <= self.experts.epochs,
                f"{p}.range_end",
                f"the shortcut range [{ph.range_start}, {ph.range_end}] runs past the experts' "
                f"{self.experts.epochs} epochs (experts.epochs); lower range_end or train longer experts",
            )
            _check(
                ph.start_max + m <= ph.range_end,
                f"{p}.start_max",
                f"start window [{ph.start_min}, {ph.start_max}] plus distill.expert_epochs={m} runs past "
                f"the range end {ph.range_end}; lower start_max to at most {ph.range_end - m}",
            )

    @property
    def total_pairs(self) -> int:
        return sum(p.pairs for p in self.phases)

    def alpha_starts(self) -> tuple[float, float]:
        """The learned step sizes' start (alpha_img, alpha_txt): distill.alpha_init, or its rel_alpha rule."""
        rel = self.distill.rel_alpha
        if rel is None:
            return self.distill.alpha_init, self.distill.alpha_init
        if self.experts.lr_img == "auto":
            raise ConfigError("experts.lr_img", "auto: the step sizes follow the experts' learning rate "
                              "(distill.rel_alpha), which the experts' learning-rate rule has not picked yet")
        return rel * self.experts.lr_img, rel * self.experts.lr_txt

    def alpha_floors(self) -> tuple[float, float] | None:
        """The step sizes' floors (img, txt): distill.min_alpha, or its rel_min_alpha rule; None = no floor."""
        if self.distill.rel_min_alpha is not None:
            return tuple(self.distill.rel_min_alpha * a for a in self.alpha_starts())  # type: ignore[return-value]
        return None if self.distill.min_alpha is None else (self.distill.min_alpha, self.distill.min_alpha)

    @property
    def eval_loss(self) -> str:
        return self.eval.loss or self.distill.loss

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False)

    def replace(self, **overrides: Any) -> "Config":
        """A copy with dotted-path overrides applied and validated, e.g. replace(**{"distill.syn_steps": 4})."""
        raw = self.to_dict()
        for key, value in overrides.items():  # a copy: a later key below this one must not edit the caller's value
            _set_path(raw, key, copy.deepcopy(value), "<replace>")
        return from_dict(raw)


# --------------------------------------------------------------------------- loading


def _type_name(tp: Any) -> str:
    """What a value of annotation ``tp`` looks like, for error messages: `a number or 'auto'`."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " or ".join(repr(a) for a in args)
    names = {float: "a number", int: "an integer", bool: "true or false", str: "a string", type(None): "null"}
    return names.get(tp) or getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


_FLOAT_TEXT = re.compile(r"[+-]?(\d+\.?\d*|\.\d+)[eE][+-]?\d+")
"""Exponent notation without a dot (``1e-4``), which YAML 1.1 (PyYAML) leaves as a string."""


def _coerce(value: Any, tp: Any, path: str) -> Any:
    """Check ``value`` against annotation ``tp``; build dataclasses; return the typed value."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for a in args:
            if a is type(None):
                continue
            try:
                return _coerce(value, a, path)
            except ConfigError as e:
                errors.append(e)
        raise errors[0] if len(errors) == 1 else ConfigError(path, f"expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in args:
            raise ConfigError(path, f"must be one of {', '.join(repr(a) for a in args)}; got {value!r}")
        return value
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping (section), got {type(value).__name__} {value!r}")
        return build_section(tp, value, path)
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise ConfigError(path, f"expected a list, got {type(value).__name__} {value!r}")
        (item_tp,) = args or (Any,)
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(path, f"expected a mapping, got {type(value).__name__} {value!r}")
        return dict(value)
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(path, f"expected true or false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(path, f"expected an integer, got {type(value).__name__} {value!r}")
        return value
    if tp is float:
        if isinstance(value, str) and _FLOAT_TEXT.fullmatch(value.strip()):
            return float(value)  # YAML 1.1 reads 1e-4 (no dot) as a string; it is a number to anyone typing it
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(path, f"expected a number, got {type(value).__name__} {value!r}")
        return float(value)
    if tp is str:
        if not isinstance(value, str):
            raise ConfigError(path, f"expected a string, got {type(value).__name__} {value!r}")
        return value
    raise ConfigError(path, f"unsupported field type {tp!r}")  # a bug in this module, not in the YAML


def build_section(cls: type, raw: dict, path: str = "") -> Any:
    """Build config dataclass ``cls`` from mapping ``raw``, strictly; errors name the field under ``path``."""
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = [k for k in raw if k not in names]
    if unknown:
        key = unknown[0]
        raise ConfigError(
            _join_path(path, str(key)), f"unknown key; {cls.__name__} has: {', '.join(names)}"
        )
    kwargs = {k: _coerce(v, hints[k], _join_path(path, k)) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ConfigError as e:
        raise e.at(path) from None


def from_dict(raw: dict, source: str | None = None) -> Config:
    """Build and validate a :class:`Config`; errors carry ``source`` and the field path."""
    if raw is None:
        raw = {}
    if not isinstance(raw, dict):
        raise ConfigError("", f"the top level must be a mapping of sections, got {type(raw).__name__}", source)
    try:
        cfg = build_section(Config, raw)
    except ConfigError as e:
        raise ConfigError(e.path, e.message, source) from None
    return _resolve_paths(cfg)


ROOT_PLACEHOLDER = "${run.root}"


def _absolute(value: str) -> str:
    return value if "://" in value else str(Path(os.path.expanduser(value)).resolve())


def _resolve_paths(cfg: Config) -> Config:
    """Make local paths absolute (Ray workers run elsewhere) and expand ``${run.root}`` in path fields."""
    root = _absolute(cfg.run.root)

    def fix(value: str | None) -> str | None:
        if value is None:
            return None
        value = value.replace(ROOT_PLACEHOLDER, root)
        # open_clip pretrained tags ("openai", "laion2b_s34b_b79k") stay as they are
        return _absolute(value) if ("/" in value or value.startswith("~")) else value

    model = dataclasses.replace(
        cfg.model,
        pretrained=fix(cfg.model.pretrained),
        image_pretrained=fix(cfg.model.image_pretrained),
        text_pretrained=fix(cfg.model.text_pretrained),
    )
    data = dataclasses.replace(cfg.data, annotations=fix(cfg.data.annotations), images=fix(cfg.data.images))
    shared = _absolute(cfg.run.shared_root) if cfg.run.shared_root else None
    run = dataclasses.replace(cfg.run, root=root, shared_root=shared)
    return dataclasses.replace(cfg, run=run, model=model, data=data)


def parse_override(item: str) -> tuple[str, Any]:
    """``a.b=value`` -> (path, YAML-parsed value)."""
    if "=" not in item:
        raise ConfigError(item, "an override must look like section.field=value, e.g. distill.syn_steps=4", "--set")
    key, text = item.split("=", 1)
    try:
        value = yaml.safe_load(text) if text != "" else ""
    except yaml.YAMLError:
        value = text
    return key.strip(), value


def _set_path(raw: dict, key: str, value: Any, source: str) -> None:
    parts = _dotted(key).split(".")
    node: Any = raw
    for i, part in enumerate(parts):
        last = i == len(parts) - 1
        if isinstance(node, list):
            if not part.isdigit() or int(part) >= len(node):
                raise ConfigError(key, f"index {part!r} is not in a list of {len(node)}", source)
            idx = int(part)
            if last:
                node[idx] = value
            else:
                node = node[idx]
        elif isinstance(node, dict):
            if last:
                node[part] = value
            else:
                if node.get(part) is None:
                    node[part] = {}
                node = node[part]
        else:
            raise ConfigError(key, f"{'.'.join(parts[:i])} is not a section", source)


def load_yaml(path: str | os.PathLike) -> dict:
    from ptmst_ray import storage

    try:
        text = storage.read_text(str(path))
    except storage.StorageError as e:  # a URL's file missing, its store unreachable or refusing: said, no traceback
        message = str(e).removeprefix(f"{path}: ")
        raise ConfigError("", message, str(path)) from None
    except IsADirectoryError:
        raise ConfigError("", "is a folder, not a config file: give a YAML file (configs/toy.yaml, or a shipped "
                          "recipe by name: scenes, flickr30k_500)", str(path)) from None
    except OSError as e:  # unreadable (permissions, ...): said with the reason
        raise ConfigError("", f"cannot read it ({e.strerror or e})", str(path)) from None
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise ConfigError("", f"not valid YAML: {e}", str(path)) from None
    return raw if raw is not None else {}


def load_config(path: str | os.PathLike | None = None, overrides: list[str] | None = None) -> Config:
    """Load a YAML config (default: configs/toy.yaml; a bare name: a shipped recipe, :func:`find_config`), apply
    ``--set`` overrides, validate."""
    path = find_config(path) if path is not None else str(DEFAULT_CONFIG)
    raw = load_yaml(path)
    if not isinstance(raw, dict):
        raise ConfigError("", "the top level must be a mapping of sections", path)
    in_file, raw = raw, copy.deepcopy(raw)  # the file as written: to tell which errors an override made
    applied = []
    for item in overrides or []:
        key, value = parse_override(item)
        try:
            _set_path(raw, key, value, path)
        except ConfigError as e:  # a path the file has no place for: the override's fault, named as such
            raise ConfigError(e.path, e.message, f"--set {item} (over {path})") from None
        applied.append((_dotted(key), item))
    try:
        return from_dict(raw, source=path)
    except ConfigError as e:
        # a value that came from --set is named as such, not as the file's (which may not even have it)
        field = _dotted(e.path)
        for key, item in reversed(applied):
            # the override set that field or one inside it, or made the section it names (`distil.syn_steps=4`)
            if field == key or field.startswith(key + ".") or (key.startswith(field + ".")
                                                              and not _has_path(in_file, field)):
                raise ConfigError(e.path, e.message, f"--set {item} (over {path})") from None
        raise


def get_path(raw: Any, dotted: str) -> Any:
    """The value at ``dotted`` (``phases.0.pairs``) of a config's raw mapping; KeyError, IndexError, TypeError or
    ValueError where it has no such field."""
    node = raw
    for part in dotted.split("."):
        node = node[int(part)] if isinstance(node, list) else node[part]
    return node


def _has_path(raw: Any, dotted: str) -> bool:
    try:
        get_path(raw, dotted)
    except (KeyError, IndexError, TypeError, ValueError):
        return False
    return True


def _dotted(path: str) -> str:
    """``phases[0].pairs`` and ``phases.0.pairs`` alike: the dotted form."""
    return path.replace("[", ".").replace("]", "").strip(".")


def section_hash(*sections: Any) -> str:
    """Stable content hash of config sections (dataclasses, dicts or plain values)."""
    from ptmst_ray.storage import stable_hash

    return stable_hash([dataclasses.asdict(s) if dataclasses.is_dataclass(s) else s for s in sections])
