"""Stage `embed`: caption embeddings by the frozen text tower, and the real data the models read.

The embeddings of every train and test caption (and val's, when the data has one) are written once per
(tower, data) under
``data/embedded/<key>`` (built from a per-caption cache that is reused across runs and configs; only
the caption shards are read, never the images); :func:`load_real` gives the experts, phases and
evaluation the real splits with those embeddings, each image's pixels held once as uint8 or, when
:func:`stream_split` says so (``data.stream``), never held: :func:`train_stream` then streams them.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable

import torch

from ptmst_ray import storage
from ptmst_ray.config import Config, section_hash
from ptmst_ray.layout import Layout, StageError, data_hash

if TYPE_CHECKING:
    from ptmst_ray.data.dataset import ImageRows
    from ptmst_ray.data.stream import CaptionStream
    from ptmst_ray.evaluate.student import RetrievalSet

log = logging.getLogger(__name__)

Progress = Callable[[int, int], None]


def embed(cfg: Config, progress: Progress | None = None) -> str:
    """Frozen-text-tower embeddings of the train and test captions (and val's, when the data has one), under
    data/embedded/<key>.

    Uses the per-caption cache (reused across runs and configs). Returns the key. The key does not cover the
    val split: embeddings made before val existed are kept, and only val's are added to them. Finished
    embeddings of this tower and data (:func:`done_key`) cost no tower build and no read of their files.
    """
    from ptmst_ray.data.dataset import iter_captions
    from ptmst_ray.data.text_cache import embed_split
    from ptmst_ray.models.towers import build_text_encoder, tower_source
    from ptmst_ray.stages.data import eval_splits

    layout = Layout.of(cfg)
    splits = ("train", *eval_splits(layout.data))
    source, dhash = tower_source(cfg.model, "text"), data_hash(cfg)
    key = _recorded_key(layout, source, dhash, splits)
    if key is not None:
        return key
    encoder = build_text_encoder(cfg.model)
    key = section_hash(encoder.key, dhash)
    out = layout.embedded(key)
    done = storage.read_manifest(out)
    # complete but for a split prepared since (val), or made before sources were recorded: kept as they are; the
    # workers check each file's bytes as they read them (load_real), so they are not hashed here
    files = dict(done["files"]) if done is not None and done.get("config_hash") == key else {}
    for split in splits:
        if f"{split}.safetensors" in files:
            continue
        # the caption shards (or column) only, a shard at a time; the file written a cache part at a time
        files[f"{split}.safetensors"] = embed_split(storage.join(out, f"{split}.safetensors"),
                                                    functools.partial(iter_captions, layout.data, split), encoder,
                                                    layout.text_cache, progress=progress)
    storage.write_manifest(out, {"config_hash": key, "files": files, "dim": encoder.dim, "source": source,
                                 "data": dhash})
    storage.write_text(layout.embedded_current, key)
    return key


def done_key(cfg: Config) -> str | None:
    """The key of this run's finished caption embeddings (the current ones, made by a text tower of the same
    source from the same data, with every split's file listed), else None; builds no tower and reads no
    embedding file."""
    from ptmst_ray.models.towers import tower_source
    from ptmst_ray.stages.data import eval_splits

    layout = Layout.of(cfg)
    return _recorded_key(layout, tower_source(cfg.model, "text"), data_hash(cfg),
                         ("train", *eval_splits(layout.data)))


def _recorded_key(layout: Layout, source: str, dhash: str, splits: tuple[str, ...]) -> str | None:
    if not storage.exists(layout.embedded_current):
        return None
    key = storage.read_text(layout.embedded_current).strip()
    done = storage.read_manifest(layout.embedded(key))
    if done is None or done.get("config_hash") != key or done.get("source") != source or done.get("data") != dhash:
        return None
    return key if all(f"{s}.safetensors" in done["files"] for s in splits) else None


@dataclass
class RealData:
    """The real train split (one row per caption) and the test split, ready for the models.

    ``train_images`` and ``test_images`` are :class:`~ptmst_ray.data.dataset.ImageRows`: indexing rows
    gives their CLIP-normalised float pixels, while each distinct image is held once as uint8 (or, for a
    phase, read from the shards only when asked for). No float or per-caption copy of a split exists.
    """

    train_images: "ImageRows"  # rows = captions -> float, CLIP-normalised batches
    train_text: torch.Tensor  # caption embeddings, one row per caption (memory-mapped: rows read when indexed)
    train_captions: Sequence[str]  # read from the caption shards only for the rows asked for
    train_image_index: torch.Tensor  # row -> distinct train image
    test_images: "ImageRows"  # rows = test images
    test_text: torch.Tensor
    test_captions: list[str]
    txt2img: torch.Tensor
    val: "RetrievalSet | None" = None
    """The val split (images, caption embeddings, caption -> image) when the data has one, else None."""

    @property
    def text_dim(self) -> int:
        return int(self.train_text.shape[1])


def _read_embeddings(embedded_dir: str, files: dict[str, str], split: str) -> torch.Tensor:
    """The split's caption embeddings, memory-mapped from a file checked once per node (data/embedfile.py)."""
    from ptmst_ray.data.embedfile import open_embeddings

    name = f"{split}.safetensors"
    return open_embeddings(embedded_dir, name, files[name])


@functools.lru_cache(maxsize=4)
def _test_images(data_dir: str, embedded_dir: str, files: tuple, split: str = "test") -> "ImageRows":
    """The test (or val) images, shared by both train modes of :func:`load_real` (decoded once per process, on
    first use; ``embedded_dir`` and ``files`` key the cache to the data the embeddings were built from)."""
    from ptmst_ray.data.dataset import ImageRows, ShardImages

    return ImageRows(ShardImages(data_dir, split, keep=True))


def _val_split(data_dir: str, embedded_dir: str, files: tuple) -> "RetrievalSet | None":
    """The val split for scoring, when its embeddings exist (the data has a val split), else None."""
    from ptmst_ray.data.dataset import read_captions
    from ptmst_ray.evaluate.student import RetrievalSet

    if "val.safetensors" not in dict(files):
        return None
    text = _read_embeddings(embedded_dir, dict(files), "val")
    caps = read_captions(data_dir, "val")
    if len(caps.captions) != len(text):
        raise StageError(f"{embedded_dir}/val.safetensors: {len(text)} caption embeddings but the val split has "
                         f"{len(caps.captions)} captions; run `ptmst-ray run --rebuild embed` to rebuild them")
    return RetrievalSet(_test_images(data_dir, embedded_dir, files, "val"), text, caps.image_index)


@functools.lru_cache(maxsize=4)
def _load_real_cached(data_dir: str, embedded_dir: str, files: tuple, max_train_rows: int | None,
                      whole_train: bool) -> RealData:
    from ptmst_ray.data.dataset import ImageRows, ShardImages, read_caption_index, read_captions, split_manifest

    emb = {s: _read_embeddings(embedded_dir, dict(files), s) for s in ("train", "test")}
    manifests = {s: split_manifest(data_dir, s, verify=False) for s in ("train", "test")}
    train_index, train_captions = read_caption_index(data_dir, "train", manifests["train"], max_train_rows)
    test = read_captions(data_dir, "test", manifests["test"])
    for s, n in (("train", len(train_index)), ("test", len(test.captions))):
        if n != len(emb[s]):
            raise StageError(f"{embedded_dir}/{s}.safetensors: {len(emb[s])} caption embeddings but the {s} split "
                             f"has {n} captions; run `ptmst-ray data prepare` to rebuild them")
    index = train_index[:len(train_captions)]
    return RealData(
        train_images=ImageRows(ShardImages(data_dir, "train", manifests["train"], keep=whole_train), index),
        train_text=emb["train"][:len(index)],  # a view of the mapped file: rows are gathered when indexed
        train_captions=train_captions,
        train_image_index=index,
        test_images=_test_images(data_dir, embedded_dir, files),
        test_text=emb["test"],
        test_captions=list(test.captions),
        txt2img=test.image_index,
        val=_val_split(data_dir, embedded_dir, files),
    )


def load_real(cfg: Config, whole_train: bool = True) -> RealData:
    """The embedded real data of this run (cached per process: a Ray worker loads it once; a rebuilt
    embedding, which has a new manifest, is read afresh).

    Only captions and embeddings are read here; pixels are read when first indexed. With
    ``whole_train`` (experts, the full-data baseline) the first access decodes every train image once
    and keeps it as uint8; without it (a phase's initial pairs, a coreset) each access reads and decodes
    only the images asked for. The test images are decoded once, on first use (scoring, phase recall); so are
    the val split's, there when its embeddings are (the data has a val split).
    """
    layout = Layout.of(cfg)
    if not storage.exists(layout.embedded_current):
        raise StageError(f"{layout.embedded_current}: no caption embeddings yet; run `ptmst-ray run` "
                         "or `ptmst-ray data prepare`")
    out = layout.embedded(storage.read_text(layout.embedded_current).strip())
    manifest = storage.read_manifest(out)
    if manifest is None:
        raise StageError(f"{out}: caption embeddings are missing; run `ptmst-ray run` (or `ptmst-ray data prepare`)")
    return _load_real_cached(layout.data, out, tuple(sorted(manifest["files"].items())), cfg.data.max_train_rows,
                             whole_train)


def stream_split(cfg: Config, split: str = "train") -> bool:
    """Whether training on the whole pairs split ``split`` (train: experts, the full-data baseline; pretrain:
    pretraining) streams its batches (:func:`train_stream`) instead of holding every image decoded.

    The one place ``data.stream`` is decided: on / off, or auto = stream when the split's decoded uint8 pixels
    (its manifest's image count x 3 x size^2 bytes) exceed ``data.hold_images_mb``. Logged once per process.
    """
    data = cfg.data
    return _stream_decision(Layout.of(cfg).data, split, data.stream, data.hold_images_mb, data.image_size)


@functools.lru_cache(maxsize=8)
def _stream_decision(data_dir: str, split: str, mode: str, hold_mb: float, image_size: int) -> bool:
    if mode != "auto":
        log.info("data.stream: %s: training %s the %s split", mode, "streams" if mode == "on" else "holds", split)
        return mode == "on"
    from ptmst_ray.data.dataset import split_manifest

    m = split_manifest(data_dir, split, verify=False)
    mib = int(m["images"]) * 3 * int(m.get("image_size", image_size)) ** 2 / 2**20
    streamed = mib > hold_mb
    log.info("data.stream: auto: the %s split's decoded pixels are %.0f MiB (%d images), %s data.hold_images_mb "
             "%.0f MiB: training %s them", split, mib, int(m["images"]), ">" if streamed else "<=", hold_mb,
             "streams" if streamed else "holds")
    return streamed


def train_stream(cfg: Config, split: str, text: torch.Tensor, batch_size: int, seed: int, min_batch: int = 2,
                 image_index: torch.Tensor | None = None) -> "CaptionStream":
    """The caption rows of the pairs split ``split`` streamed per epoch with ``data``'s buffer, prefetch and
    image cache (``text``: one row per caption; ``image_index``: the split's, when already read, so the
    caption shards are not read again). The train split is cut to ``data.max_train_rows`` like
    :func:`load_real`'s rows."""
    from ptmst_ray.data.stream import CaptionStream
    from ptmst_ray.device import decode_threads

    rows = cfg.data.max_train_rows if split == "train" else None
    return CaptionStream(Layout.of(cfg).data, split, text, batch_size, seed, buffer=cfg.data.stream_buffer,
                         rows=rows, min_batch=min_batch, prefetch=cfg.data.prefetch, cache_mb=cfg.data.image_cache_mb,
                         image_index=image_index, decode_workers=decode_threads(cfg.data.decode_workers))
