"""`data prepare`: annotations + images (any fsspec URL) -> Parquet shards and split manifests.

Why this file exists: later stages (experts on Ray workers, distillation, evaluation) need the
images decoded once, resized to the model's size, and stored next to their captions in a form
any worker can read from the run root. Preparation streams: the annotation file is parsed
incrementally and shards are written row group by row group (memory is bounded by ``ROW_GROUP_BYTES``
of images plus a map of image name -> index, whatever the split or shard size); decoding can run in
Ray tasks (``data.workers``) with identical output. Each shard is written atomically and the split's
manifest last, so an interrupted run leaves no manifest and is redone, while a finished one is skipped.

Layout of a prepared split folder ``<data_root>/<split>/``:
* ``images-00000.parquet`` ...: one row per image: ``image_index`` (0..N-1), ``image`` (relative
  path in the annotations), ``image_id``, ``png`` (RGB PNG at image_size), ``row`` (annotation
  row of its first use) and, for val/test, ``captions`` (list of normalised captions).
* train/pretrain only, ``captions-00000.parquet`` ...: one row per caption: ``row``
  (annotation row), ``image_index``, ``caption``. Images are stored once, not once per caption.
* ``manifest.json``: counts, files with sha256, content hash, settings, skipped rows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import logging
from typing import Any, Callable, Iterable, Iterator, TypeVar

import pyarrow as pa
import pyarrow.parquet as pq
from PIL import Image

from ptmst_ray import storage
from ptmst_ray.config import DataConfig
from ptmst_ray.data.annotations import (
    DataError, EvalRow, NORMALIZATION, PairRow, annotation_source, has_split, iter_file, missing_annotations,
    split_kind, warn_skipped,
)

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
"""Bump when the shard layout changes (part of every split's settings hash)."""

Progress = Callable[[int, int], None]

IMAGE_SCHEMA_PAIRS = pa.schema([
    ("image_index", pa.int64()), ("image", pa.string()), ("image_id", pa.string()),
    ("row", pa.int64()), ("png", pa.binary()),
])
IMAGE_SCHEMA_EVAL = IMAGE_SCHEMA_PAIRS.append(pa.field("captions", pa.list_(pa.string())))
CAPTION_SCHEMA = pa.schema([("row", pa.int64()), ("image_index", pa.int64()), ("caption", pa.string())])


# --------------------------------------------------------------------------- images


def encode_image(data: bytes, size: int) -> bytes:
    """Decode any PIL-readable image, convert to RGB, resize to size x size (bicubic), encode PNG."""
    with Image.open(io.BytesIO(data)) as im:
        im.load()
        rgb = im.convert("RGB")
    if rgb.size != (size, size):
        rgb = rgb.resize((size, size), Image.Resampling.BICUBIC)
    buf = io.BytesIO()
    rgb.save(buf, format="PNG")
    return buf.getvalue()


def _load_image(url: str, size: int) -> bytes:
    """The image at ``url`` as a resized RGB PNG; ValueError (with the reason) if missing or corrupt."""
    try:
        data = storage.read_bytes(url)
    except storage.StorageError:
        raise ValueError(f"image file {url} not found") from None
    try:
        return encode_image(data, size)
    except (OSError, ValueError, Image.DecompressionBombError) as e:
        # PIL's own message for an unknown format names an in-memory buffer's address, not the file
        reason = "unknown or corrupt image format" if isinstance(e, Image.UnidentifiedImageError) else e
        raise ValueError(f"image file {url} is not a readable image ({reason})") from None


ImageResult = tuple[bytes | None, str | None]
"""A prepared PNG, or None and the reason the image is unusable."""


def load_images(urls: list[str], size: int) -> list[ImageResult]:
    """:func:`_load_image` over a batch, with unusable images reported instead of raised (a Ray task's work)."""
    out: list[ImageResult] = []
    for url in urls:
        try:
            out.append((_load_image(url, size), None))
        except ValueError as e:
            out.append((None, str(e)))
    return out


Row = TypeVar("Row", PairRow, EvalRow)


def with_images(rows: Iterable[Row], image_url: Callable[[Row], str | None], cfg: DataConfig
                ) -> Iterator[tuple[Row, ImageResult | None]]:
    """``rows`` in their order, each with its prepared image when ``image_url(row)`` names one (else None).

    ``cfg.workers`` == 1 decodes here, one image at a time; more spreads the decoding over Ray tasks
    (:func:`ptmst_ray.data.parallel.map_images`) with a bounded number of batches in flight. Either
    way the results come back in row order, so the shards are byte-identical.
    """
    if cfg.workers > 1:
        from ptmst_ray.data.parallel import map_images

        yield from map_images(rows, image_url, load_images, cfg.image_size, cfg.workers)
        return
    for r in rows:
        url = image_url(r)
        yield r, (None if url is None else load_images([url], cfg.image_size)[0])


# --------------------------------------------------------------------------- shard writer


ROW_GROUP_BYTES = 16 << 20
"""Rows are buffered up to this much payload (or ``shard_rows`` rows), then written as one Parquet
row group: this, not the shard size or the dataset size, bounds the memory of preparation."""


def _payload(row: dict[str, Any]) -> int:
    return sum(len(v) for v in row.values() if isinstance(v, (bytes, str)))


class ShardWriter:
    """Streams rows into ``<prefix>-NNNNN.parquet`` shards of ``shard_rows`` rows, each written atomically.

    A shard is written row group by row group (at most ``row_group_bytes`` of buffered payload),
    so memory does not grow with the shard or the split. Use as a context manager: on an error the
    open shard's temporary file is removed and no partial shard takes its final name.
    """

    def __init__(self, out_dir: str, prefix: str, schema: pa.Schema, shard_rows: int,
                 row_group_bytes: int | None = None):
        self.out_dir, self.prefix, self.schema, self.shard_rows = out_dir, prefix, schema, shard_rows
        self.row_group_bytes = ROW_GROUP_BYTES if row_group_bytes is None else row_group_bytes
        self.buffer: list[dict[str, Any]] = []
        self.buffer_bytes = 0
        self.files: dict[str, str] = {}
        self.rows = 0
        """Rows in finished shards."""
        self.added = 0
        """Rows added so far (finished shards, the open shard and the buffer)."""
        self._in_shard = 0
        self._open: tuple[str, contextlib.ExitStack, pq.ParquetWriter] | None = None

    def __enter__(self) -> "ShardWriter":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc_type is None:
            self.flush()
        elif self._open is not None:
            _, stack, writer = self._open
            self._open, self.buffer = None, []
            with contextlib.suppress(Exception):
                writer.close()
            stack.__exit__(exc_type, exc, tb)  # atomic_open removes the temporary file

    def add(self, row: dict[str, Any]) -> None:
        self.buffer.append(row)
        self.buffer_bytes += _payload(row)
        self.added += 1
        self._in_shard += 1
        if self._in_shard >= self.shard_rows:
            self.flush()
        elif self.buffer_bytes >= self.row_group_bytes:
            self._write_row_group()

    def _write_row_group(self) -> None:
        if not self.buffer:
            return
        if self._open is None:
            name = f"{self.prefix}-{len(self.files):05d}.parquet"
            stack = contextlib.ExitStack()
            f = stack.enter_context(storage.atomic_open(storage.join(self.out_dir, name), "wb"))
            # PNG bytes are all distinct: a dictionary for them only costs memory and time
            dictionary = [n for n in self.schema.names if n != "png"]
            self._open = (name, stack, pq.ParquetWriter(f, self.schema, use_dictionary=dictionary))
        self._open[2].write_table(pa.Table.from_pylist(self.buffer, schema=self.schema))
        self.buffer, self.buffer_bytes = [], 0

    def flush(self) -> None:
        """Write what is buffered and finish the open shard (moved into place, hashed)."""
        self._write_row_group()
        if self._open is None:
            return
        name, stack, writer = self._open
        self._open = None
        writer.close()
        stack.close()
        self.files[name] = storage.hash_file(storage.join(self.out_dir, name))
        self.rows += self._in_shard
        self._in_shard = 0


# --------------------------------------------------------------------------- splits


def _source_dirs(cfg: DataConfig) -> tuple[str, str]:
    if cfg.annotations is None:
        raise DataError(f"dataset {cfg.dataset!r}: data.annotations is not set; point it at the annotation folder")
    return cfg.annotations, cfg.images or cfg.annotations


def split_settings(cfg: DataConfig, split: str, annotation_sha256: str) -> dict[str, Any]:
    """Everything the prepared split depends on; its hash decides whether a re-run can skip."""
    settings = {
        "format": FORMAT_VERSION, "dataset": cfg.dataset, "split": split, "image_size": cfg.image_size,
        "max_words": cfg.max_words, "normalization": NORMALIZATION, "shard_rows": cfg.shard_rows,
        "skip_bad": cfg.skip_bad, "annotation_sha256": annotation_sha256,
        "max_rows": cfg.max_train_rows if split == "train" else None,
    }
    if cfg.dataset == "builtin":
        settings["builtin"] = cfg.builtin.identity()  # fields added later count only when set
    return settings


def _skip_or_raise(cfg: DataConfig, skipped: list[dict], file: str, row: int, reason: str) -> None:
    if not cfg.skip_bad:
        raise DataError(f"{file}: row {row}: {reason} (or set data.skip_bad=true to skip bad rows)")
    skipped.append({"file": file, "row": row, "reason": reason})


def _write_pairs(url: str, rows: Iterable[PairRow], total: int, cfg: DataConfig, images_dir: str, out_dir: str,
                 progress: Progress | None) -> dict[str, Any]:
    """Stream train-shape rows into image and caption shards; each image is prepared at its first use."""
    index: dict[str, int] = {}  # per image, not per row: the state that grows with the split
    bad: set[str] = set()
    requested: set[str] = set()
    skipped: list[dict] = []

    def first_use(r: PairRow) -> str | None:
        if r.image in requested:
            return None
        requested.add(r.image)
        return storage.join(images_dir, r.image)

    with ShardWriter(out_dir, "images", IMAGE_SCHEMA_PAIRS, cfg.shard_rows) as imgs, \
            ShardWriter(out_dir, "captions", CAPTION_SCHEMA, cfg.shard_rows) as caps:
        for k, (r, image) in enumerate(with_images(rows, first_use, cfg)):
            if image is not None and image[0] is None:
                bad.add(r.image)
                _skip_or_raise(cfg, skipped, url, r.row, image[1])
            elif r.image in bad:
                _skip_or_raise(cfg, skipped, url, r.row, f"its image {r.image} was unusable (see an earlier row)")
            else:
                if image is not None:
                    index[r.image] = len(index)
                    imgs.add({"image_index": index[r.image], "image": r.image, "image_id": r.image_id,
                              "row": r.row, "png": image[0]})
                caps.add({"row": r.row, "image_index": index[r.image], "caption": r.caption})
            if progress:
                progress(k + 1, total)
    return {"images": imgs.rows, "captions": caps.rows, "rows": caps.rows,
            "files": {**imgs.files, **caps.files}, "skipped": skipped}


def _write_eval(url: str, rows: Iterable[EvalRow], total: int, cfg: DataConfig, images_dir: str, out_dir: str,
                progress: Progress | None) -> dict[str, Any]:
    """Stream val/test-shape rows (an image with its captions) into image shards."""
    skipped: list[dict] = []
    n_caps = 0
    with ShardWriter(out_dir, "images", IMAGE_SCHEMA_EVAL, cfg.shard_rows) as imgs:
        for k, (r, (png, reason)) in enumerate(with_images(rows, lambda r: storage.join(images_dir, r.image), cfg)):
            if png is None:
                _skip_or_raise(cfg, skipped, url, r.row, reason)
            else:
                imgs.add({"image_index": imgs.added, "image": r.image, "image_id": r.image_id,
                          "row": r.row, "png": png, "captions": r.captions})
                n_caps += len(r.captions)
            if progress:
                progress(k + 1, total)
    return {"images": imgs.rows, "captions": n_caps, "rows": imgs.rows, "files": imgs.files, "skipped": skipped}


def prepare_split(cfg: DataConfig, split: str, out_dir: str, progress: Progress | None = None) -> dict:
    """Prepare one split of ``cfg``'s dataset into ``out_dir``; returns its manifest.

    Skips the work when ``out_dir`` already has a manifest with the same settings hash;
    otherwise clears ``out_dir`` (a partial or outdated output) and writes it again. The annotation
    file is streamed twice: a first pass checks every row and counts them (so a bad row stops the
    run before any image work, and progress has a total), the second prepares the images.
    """
    _, images_dir = _source_dirs(cfg)
    ann_url, settings, chash = _split_source(cfg, split)
    old = storage.read_manifest(out_dir)
    if old is not None and old.get("config_hash") == chash:
        log.info("%s: split %s already prepared (%d rows); skipping", out_dir, split, old["rows"])
        return old
    storage.remove(out_dir, recursive=True)
    storage.makedirs(out_dir)
    max_rows = cfg.max_train_rows if split == "train" else None

    def rows(skipped: list[dict] | None = None) -> Iterator:
        return iter_file(ann_url, split, cfg.max_words, cfg.skip_bad, max_rows, skipped)

    ann_skipped: list[dict] = []
    total = sum(1 for _ in rows(ann_skipped))
    warn_skipped(ann_url, ann_skipped)
    kind = split_kind(split)
    writer = _write_pairs if kind == "pairs" else _write_eval
    result = writer(ann_url, rows(), total, cfg, images_dir, out_dir, progress)
    warn_skipped(ann_url, result["skipped"])  # rows whose image is missing or unreadable
    if result["rows"] == 0:
        raise DataError(f"{ann_url}: every row was skipped as bad; nothing to prepare (see the log)")
    manifest = {
        "kind": "data_split", "split": split, "split_kind": kind, "dataset": cfg.dataset,
        "config_hash": chash, "settings": settings, "source": ann_url, "images_root": images_dir,
        "rows": result["rows"], "images": result["images"], "captions": result["captions"],
        "image_size": cfg.image_size, "files": result["files"],
        "content_hash": storage.stable_hash(result["files"]),
        "skipped": ann_skipped + result["skipped"],
    }
    storage.write_manifest(out_dir, manifest)
    log.info("%s: prepared split %s: %d images, %d captions, %d skipped%s", out_dir, split,
             manifest["images"], manifest["captions"], len(manifest["skipped"]),
             " (each with its row and reason in the split's manifest.json, `skipped`)" if manifest["skipped"] else "")
    return manifest


# --------------------------------------------------------------------------- datasets


def _split_source(cfg: DataConfig, split: str) -> tuple[str, dict[str, Any], str]:
    """The split's annotation file, its settings (:func:`split_settings`, with the file's hash) and their hash."""
    ann_dir, _ = _source_dirs(cfg)
    ann_url = annotation_source(ann_dir, cfg.dataset, split)
    if ann_url is None:
        raise DataError(f"data.annotations: {missing_annotations(cfg.dataset, ann_dir, (split,))}")
    settings = split_settings(cfg, split, storage.hash_file(ann_url))
    return ann_url, settings, storage.stable_hash(settings)


def is_prepared(cfg: DataConfig, data_root: str) -> bool:
    """True when ``data_root`` holds every split prepared from the current annotation files and settings, i.e.
    :func:`prepare_dataset` would write nothing (`data prepare` then starts no Ray for ``data.workers`` > 1). It
    hashes the annotation files, as that does."""
    manifest = storage.read_manifest(data_root)
    if manifest is None or manifest.get("config_hash") != data_config_hash(cfg):
        return False
    src_cfg = source_config(cfg, data_root)
    try:
        return all((storage.read_manifest(storage.join(data_root, split)) or {}).get("config_hash")
                   == _split_source(src_cfg, split)[2] for split in splits_to_prepare(src_cfg))
    except DataError:  # an annotation file gone: preparing says which
        return False


def splits_to_prepare(cfg: DataConfig) -> list[str]:
    """train and test; val when its file exists (Karpathy's single file: when it has val images; the built-in
    dataset: when ``builtin.val_images`` > 0); pretrain for the built-in dataset."""
    if cfg.dataset == "builtin":
        return ["train", "test", "pretrain"] + (["val"] if cfg.builtin.val_images > 0 else [])
    ann_dir, _ = _source_dirs(cfg)
    splits = ["train", "test"]
    if (val := annotation_source(ann_dir, cfg.dataset, "val")) is not None and has_split(val, "val"):
        splits.append("val")
    return splits


def source_config(cfg: DataConfig, data_root: str) -> DataConfig:
    """``cfg`` with annotations/images pointing at the generated source for the built-in dataset."""
    if cfg.dataset != "builtin":
        return cfg
    src = storage.join(data_root, "source")
    return dataclasses.replace(cfg, annotations=src, images=src)


def prepare_dataset(cfg: DataConfig, data_root: str,
                    progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Prepare every split under ``data_root/<split>/``; returns the dataset manifest (written last).

    For ``builtin`` the generated annotation files and PNGs go to ``data_root/source`` first.
    ``progress(split, done, total)`` is called as rows are processed.
    """
    from ptmst_ray.data.builtin import generate_builtin

    chash = data_config_hash(cfg)
    old = storage.read_manifest(data_root)
    if old is not None and old.get("config_hash") != chash:
        storage.remove(storage.join(data_root, storage.MANIFEST))  # outdated: not complete until rewritten
    if cfg.dataset == "builtin":
        generate_builtin(storage.join(data_root, "source"), cfg.builtin, cfg.image_size,
                         (lambda d, t: progress("source", d, t)) if progress else None)
    src_cfg = source_config(cfg, data_root)
    splits: dict[str, dict] = {}
    for split in splits_to_prepare(src_cfg):
        cb = (lambda d, t, s=split: progress(s, d, t)) if progress else None
        m = prepare_split(src_cfg, split, storage.join(data_root, split), cb)
        splits[split] = {k: m[k] for k in ("rows", "images", "captions", "content_hash", "config_hash")}
        splits[split]["skipped"] = len(m["skipped"])
    manifest = {"kind": "data", "dataset": cfg.dataset, "config_hash": chash,
                "image_size": cfg.image_size, "splits": splits,
                "content_hash": storage.stable_hash({s: v["content_hash"] for s, v in splits.items()})}
    storage.write_manifest(data_root, manifest)
    return manifest


def data_config_hash(cfg: DataConfig) -> str:
    """Hash of the data settings (the dataset manifest's ``config_hash``); ``workers`` is left out:
    it changes how the images are decoded, not what is written."""
    return storage.stable_hash({"data": cfg.output_settings(), "format": FORMAT_VERSION})
