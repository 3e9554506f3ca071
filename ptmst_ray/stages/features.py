"""A frozen image tower's features of every real image, computed once per (tower, split) and reused.

Why this file exists: with ``model.image_trainable: false`` (CC3M's recipes) the image tower never changes, yet
every expert epoch, every full-data baseline epoch and every evaluation student would run it on every real image
again (~80 GPU-hours for CC3M's 20 experts x 10 epochs). Its output on a real image is a fixed function of the
tower's weights and the image, so :func:`compute` runs it once per image of the train and test splits (one row
per IMAGE; captions point at images through ``image_index`` / ``txt2img``) and stores the rows under
``features/<key>/`` (one safetensors file per image shard, manifest last). The key covers everything the rows
depend on: the tower's weights (their sha256, ``models.student.tower_digest``), the model name, the image size and
each split's content hashes; a changed tower or split gets a new folder, a second run reuses the first's.

Consumers (:func:`find`): the experts, the full-data baseline and the evaluation students. A student whose
frozen tower hashes to the key's digest drops the tower (``models.student.drop_frozen_tower``) and trains on
the rows (:class:`FeatureRows`, or :class:`FeatureStream` when ``data.stream`` streams the train split, in the
pixel stream's exact batch order). Distillation's synthetic images cannot use them: the matching loss needs
gradients with respect to the pixels, through the tower. docs/design.md "Cached frozen-tower features".
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import nn

from ptmst_ray import storage
from ptmst_ray.config import Config, section_hash
from ptmst_ray.data.dataset import (
    decode_png, image_shards, normalize_images, read_image_shard, split_dir, split_manifest,
)
from ptmst_ray.data.stream import CaptionStream, Row
from ptmst_ray.layout import Layout, StageError

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bumped when what a feature file holds changes (part of the key)."""
SPLITS = ("train", "test")
"""The splits whose features are always cached; val too when the data has one (:func:`splits`)."""
BATCH = 64
"""Images per forward pass of the feature pass (a batch of decoded pixels is all it holds of a split)."""

Progress = Callable[[int, int], None]


def splits(cfg: Config) -> tuple[str, ...]:
    """The splits whose features this run caches: :data:`SPLITS`, and val when the data has one (so a run
    without val keeps its features key)."""
    from ptmst_ray.stages.data import VAL, has_val

    return SPLITS + ((VAL,) if has_val(Layout.of(cfg).data) else ())


def skip_reason(cfg: Config) -> str | None:
    """Why this run has no features to cache (None: its frozen tower's features are cached and used)."""
    if cfg.model.image_trainable:
        return "the image tower trains (model.image_trainable: true)"
    if not cfg.model.cache_frozen_features:
        return "model.cache_frozen_features is false"
    return None


def split_identity(manifest: dict) -> dict:
    """What a prepared split's features depend on: its files' content hashes, image count and size."""
    return {"files": storage.stable_hash(manifest["files"]), "images": int(manifest["images"]),
            "image_size": int(manifest["image_size"])}


def features_key(cfg: Config, digest: str, manifests: dict[str, dict]) -> str:
    """The folder key of the features of a tower with weights ``digest`` over the splits of ``manifests``."""
    return section_hash(FORMAT_VERSION, cfg.model.name, digest, {s: split_identity(m) for s, m in manifests.items()})


def feature_file(split: str, image_shard: str) -> str:
    """The features file of one image shard (``images-00003.parquet`` -> ``train/features-00003.safetensors``)."""
    stem = image_shard.rsplit(".", 1)[0].split("-", 1)[-1]
    return f"{split}/features-{stem}.safetensors"


def frozen_tower_of(cfg: Config, seed: int = 0) -> nn.Module:
    """The frozen image module every student of ``cfg`` has (its weights come from a checkpoint, so the seed
    does not change them: config validation requires weights for a frozen tower), in eval mode."""
    from ptmst_ray.models.student import build_student

    return build_student(cfg.model, text_dim=1, seed=seed).frozen_tower().eval()


@torch.no_grad()
def featurize(tower: nn.Module, images: torch.Tensor, device: torch.device | None = None,
              batch_size: int = BATCH) -> torch.Tensor:
    """``tower``'s float32 CPU features of CLIP-normalised ``images`` (a tensor, or rows indexed by slices), in
    eval mode and in batches (synthetic subsets of an evaluation, whose pixels never change there)."""
    device = device or next(tower.parameters()).device
    was_training = tower.training
    tower.eval()
    try:
        out = [tower(images[i:i + batch_size].to(device)).float().cpu() for i in range(0, len(images), batch_size)]
    finally:
        tower.train(was_training)
    return torch.cat(out) if out else torch.empty(0, 0)


def compute(cfg: Config, progress: Progress | None = None, device: torch.device | None = None) -> dict:
    """The feature pass: every train and test image through the frozen tower once, under ``features/<key>/``.

    Returns {"key", "ran" (whether anything was computed), "skipped" (the reason, or None)}. Reads one image
    shard at a time and decodes ``BATCH`` images at a time; a shard's features are written as soon as they
    are computed, so an interrupted pass resumes at the first missing shard. Skipped (and logged) when
    :func:`skip_reason` gives a reason.
    """
    from ptmst_ray.device import pick_device
    from ptmst_ray.models.towers import tower_source

    reason = skip_reason(cfg)
    if reason:
        log.info("frozen-tower features: skipped: %s", reason)
        return {"key": None, "ran": False, "skipped": reason}
    layout = Layout.of(cfg)
    manifests = {s: split_manifest(layout.data, s, verify=False) for s in splits(cfg)}
    source = tower_source(cfg.model, "image")
    found = _current(cfg, manifests)
    if found is not None and found[1].get("source") == source:  # finished for a tower of this source: no tower
        key, done = found                                         # built, no file read (consumers check theirs)
        if done.get("weights") != weights_config(cfg):  # the same weights under another name: consumers compare names
            storage.write_manifest(layout.features(key), {**done, "weights": weights_config(cfg)})
        return {"key": key, "ran": False, "skipped": None}
    device = device or pick_device()
    tower = frozen_tower_of(cfg).to(device)
    from ptmst_ray.models.student import tower_digest

    digest = tower_digest(tower)
    key = features_key(cfg, digest, manifests)
    out = layout.features(key)
    done = storage.read_manifest(out)
    if done is not None and done.get("config_hash") == key:  # complete, made before CURRENT named another tower's
        storage.write_manifest(out, {**done, "source": source, "weights": weights_config(cfg)})
        storage.write_text(layout.features_current, key)
        return {"key": key, "ran": False, "skipped": None}
    total = sum(int(m["images"]) for m in manifests.values())
    files, shards, dim, seen = {}, {}, None, 0
    for split in manifests:
        d, m = split_dir(layout.data, split), manifests[split]
        shards[split] = {}
        for name in image_shards(m):
            rel = feature_file(split, name)
            url = storage.join(out, rel)
            if storage.exists(url):  # an interrupted pass's shard: written atomically, so whole
                blob = storage.read_bytes(url)
            else:
                first, pngs = read_image_shard(d, name, m["files"][name])
                feats = _shard_features(tower, pngs, device)
                blob = st_save({"features": feats.contiguous(), "first": torch.tensor([first], dtype=torch.long)})
                storage.write_bytes(url, blob)
            rows = st_load(blob)
            feats, first = rows["features"], int(rows["first"][0])
            dim = int(feats.shape[1]) if len(feats) else dim
            files[rel] = storage.hash_bytes(blob)
            shards[split][name] = {"file": rel, "first": first, "images": int(len(feats))}
            seen += len(feats)
            if progress is not None:
                progress(seen, total)
        counted = sum(s["images"] for s in shards[split].values())
        if counted != int(m["images"]):
            raise StageError(f"{split_dir(layout.data, split)}: {counted} images in the shards but {m['images']} in "
                             "the manifest; rebuild with `ptmst-ray data prepare`")
    storage.write_manifest(out, {"config_hash": key, "files": files, "dim": dim, "tower": digest,
                                 "model": cfg.model.name, "splits": shards, "source": source,
                                 "weights": weights_config(cfg),
                                 "images": {s: int(manifests[s]["images"]) for s in manifests}})
    storage.write_text(layout.features_current, key)
    log.info("frozen-tower features: %d images (%d-d) under %s", total, dim or 0, out)
    return {"key": key, "ran": True, "skipped": None}


@torch.no_grad()
def _shard_features(tower: nn.Module, pngs: list[bytes], device: torch.device) -> torch.Tensor:
    """One shard's features, its images decoded and normalised ``BATCH`` at a time."""
    out = []
    for i in range(0, len(pngs), BATCH):
        pixels = torch.stack([torch.from_numpy(decode_png(p)).permute(2, 0, 1) for p in pngs[i:i + BATCH]])
        out.append(tower(normalize_images(pixels).to(device)).float().cpu())
    return torch.cat(out) if out else torch.empty(0, 0)


# --------------------------------------------------------------------------- consumers


@dataclass(frozen=True)
class CachedFeatures:
    """A complete features folder: where it is, its manifest, and the tower digest it was computed with."""

    dir: str
    manifest: dict

    @property
    def digest(self) -> str:
        return self.manifest["tower"]

    def split(self, split: str) -> torch.Tensor:
        """Every image's features of ``split`` (images x dim, float32), each file checked as read."""
        parts, done = [], 0
        for name in sorted(self.manifest["splits"][split]):
            first, feats = self.shard(split, name)
            if first != done:
                raise StageError(f"{self.dir}: the features of {split} shard {name} start at image {first}, expected "
                                 f"{done}; rebuild them with `ptmst-ray run --rebuild embed`")
            parts.append(feats)
            done += len(feats)
        if done != int(self.manifest["images"][split]):
            raise StageError(f"{self.dir}: {done} {split} features but {self.manifest['images'][split]} images; "
                             "rebuild them with `ptmst-ray run --rebuild embed`")
        return torch.cat(parts)

    def shard(self, split: str, image_shard: str) -> tuple[int, torch.Tensor]:
        """(index of its first image, its features) of one image shard of ``split``."""
        entry = self.manifest["splits"][split].get(image_shard)
        if entry is None:
            raise StageError(f"{self.dir}: no features of {split} shard {image_shard}; rebuild them with "
                             "`ptmst-ray run --rebuild embed`")
        rows = st_load(storage.read_verified(self.dir, entry["file"], self.manifest["files"][entry["file"]]))
        return int(rows["first"][0]), rows["features"]

    def rows(self, split: str, ids: torch.Tensor) -> torch.Tensor:
        """The features of images ``ids`` (any order, repeats allowed), reading only the shards that hold them."""
        flat = ids.reshape(-1)
        out = torch.empty((len(flat), int(self.manifest["dim"])), dtype=torch.float32)
        found = torch.zeros(len(flat), dtype=torch.bool)
        for name, entry in self.manifest["splits"][split].items():
            inside = (flat >= entry["first"]) & (flat < entry["first"] + entry["images"])
            if inside.any():
                first, feats = self.shard(split, name)
                out[inside] = feats[flat[inside] - first]
                found |= inside
        if not bool(found.all()):
            raise IndexError(f"{self.dir}: image {int(flat[~found][0])} is out of range of the {split} features")
        return out.reshape(*ids.shape, -1)

    def check_tower(self, tower: nn.Module) -> None:
        """Raise unless ``tower``'s weights are the ones these features were computed with."""
        from ptmst_ray.models.student import tower_digest

        if tower_digest(tower) != self.digest:
            raise StageError(f"{self.dir}: computed with another image tower than this student's (its weights "
                             "differ: a weights file changed since); `ptmst-ray run` computes this tower's features "
                             "(or `ptmst-ray run --rebuild embed` redoes them all)")


def weights_config(cfg: Config) -> dict:
    """The config fields that name the frozen tower's weights (compared by a consumer, which hashes no file)."""
    return {"name": cfg.model.name, "pretrained": cfg.model.pretrained, "image_pretrained": cfg.model.image_pretrained}


def _current(cfg: Config, manifests: dict[str, dict]) -> tuple[str, dict] | None:
    """(key, manifest) of the features ``features/CURRENT`` names, when complete and made from the splits of
    ``manifests`` by a tower of this model config (its recorded digest put into this config's key), else None."""
    layout = Layout.of(cfg)
    if not storage.exists(layout.features_current):
        return None
    key = storage.read_text(layout.features_current).strip()
    manifest = storage.read_manifest(layout.features(key))
    if manifest is None or manifest.get("config_hash") != key or "tower" not in manifest:
        return None
    return (key, manifest) if features_key(cfg, manifest["tower"], manifests) == key else None


def done_key(cfg: Config) -> str | None:
    """The key of this run's finished features (the current ones, of a tower with this run's source, over its
    splits), else None; builds no tower and reads no features file."""
    from ptmst_ray.models.towers import tower_source

    if skip_reason(cfg):
        return None
    manifests = {s: split_manifest(Layout.of(cfg).data, s, verify=False) for s in splits(cfg)}
    found = _current(cfg, manifests)
    return found[0] if found is not None and found[1].get("source") == tower_source(cfg.model, "image") else None


def find(cfg: Config) -> CachedFeatures | None:
    """This run's complete features folder, or None: the tower trains, the cache is off, or it has not been
    computed (then the consumer runs the tower, as without the cache, and says so).

    Builds no tower and hashes no weights file: the folder is the one the driver's feature pass (:func:`compute`,
    which checks the tower's source) named in ``features/CURRENT``, when it was made from this run's splits and
    weight fields. The consumer's own student checks its tower against the folder's digest
    (:meth:`CachedFeatures.check_tower`), so a weights file changed since is refused, not used.
    """
    if skip_reason(cfg):
        return None
    layout = Layout.of(cfg)
    manifests = {s: split_manifest(layout.data, s, verify=False) for s in splits(cfg)}
    found = _current(cfg, manifests)
    if found is None or found[1].get("weights") != weights_config(cfg):
        log.warning("frozen-tower features of this tower and data are not computed under %s: running the frozen "
                    "tower on every real image instead (`ptmst-ray run` computes them first)", layout.features_root)
        return None
    return CachedFeatures(layout.features(found[0]), found[1])


class FeatureRows:
    """Rows (captions) -> their image's cached features, as :class:`~ptmst_ray.data.dataset.ImageRows` gives their
    pixels: ``rows[idx]`` is ``features[index[idx]]`` (``index`` None: row i is image i).

    ``source`` is the features (images x dim) or a :class:`CachedFeatures` read only when first indexed: with
    ``keep`` the whole split once (an expert's or the full baseline's epochs), without it only the shards that
    hold the asked rows (a coreset). A streamed consumer never indexes it (its batches come from
    :class:`FeatureStream`), so the split's features are never all held.
    """

    dtype = torch.float32

    def __init__(self, source: "torch.Tensor | CachedFeatures", index: torch.Tensor | None = None,
                 split: str = "train", keep: bool = True):
        self.source, self.index, self.split, self.keep = source, index, split, keep
        if isinstance(source, torch.Tensor):
            self.images, self.dim = int(source.shape[0]), int(source.shape[1])
        else:
            self.images, self.dim = int(source.manifest["images"][split]), int(source.manifest["dim"])
        if index is not None and len(index) and int(index.max()) >= self.images:
            raise ValueError(f"rows refer to images up to {int(index.max())} but there are {self.images} features")

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else self.images

    @property
    def shape(self) -> torch.Size:
        """(rows, dim): never the shape of pixels, so nothing mistakes these rows for images."""
        return torch.Size((len(self), self.dim))

    def __getitem__(self, rows: torch.Tensor | slice | int) -> torch.Tensor:
        ids = torch.arange(self.images)[rows] if self.index is None else self.index[rows]
        if isinstance(self.source, CachedFeatures):
            if not self.keep:
                return self.source.rows(self.split, ids)
            self.source = self.source.split(self.split)
        return self.source[ids]


class FeatureStream(CaptionStream):
    """A :class:`~ptmst_ray.data.stream.CaptionStream` that yields each image's cached features instead of its
    pixels: the same rows in the same (seed, epoch) order, one features file read per image shard."""

    def __init__(self, cached: CachedFeatures, data_dir: str, split: str, text: torch.Tensor, batch_size: int,
                 seed: int, **kwargs):
        super().__init__(data_dir, split, text, batch_size, seed, **kwargs)
        self.cached, self.split = cached, split

    def shard_images(self, name: str) -> tuple[int, list]:
        first, feats = self.cached.shard(self.split, name)
        return first, list(feats)

    def batch_images(self, rows: list[Row]) -> torch.Tensor:
        return torch.stack([f for _, _, f in rows])


def feature_stream(cfg: Config, cached: CachedFeatures, text: torch.Tensor, batch_size: int, seed: int,
                   min_batch: int = 2, image_index: torch.Tensor | None = None) -> FeatureStream:
    """:func:`ptmst_ray.stages.embed.train_stream` of the train split with features for pixels."""
    return FeatureStream(cached, Layout.of(cfg).data, "train", text, batch_size, seed, buffer=cfg.data.stream_buffer,
                         rows=cfg.data.max_train_rows, min_batch=min_batch, prefetch=cfg.data.prefetch,
                         image_index=image_index)  # nothing to decode: one thread stacks the feature rows
