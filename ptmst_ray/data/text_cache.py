"""Caption-embedding cache: the frozen text tower's output for each distinct caption, stored once.

Why this file exists: the text tower is frozen, so a caption's embedding never changes for a
given tower; experts, distillation (real-text initialisation) and evaluation all need them, and
encoding ~600k COCO captions with BERT is far slower than reading them back. The cache lives at
``<data_dir>/text_cache/<key>/`` where the key hashes the encoder's own key (tower config and
weights) and the caption normalisation: a different tower means a different folder, never a
stale embedding. Each run appends only the missing captions as new Parquet parts, each written
atomically, so an interrupted run keeps what it finished.
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import uuid
from typing import Any, Callable, Iterable, Protocol

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

from ptmst_ray import storage
from ptmst_ray.data.annotations import NORMALIZATION

log = logging.getLogger(__name__)

PART_CAPTIONS = 16384
"""Newly computed embeddings are flushed to a new part file every this many captions."""


class CaptionEncoder(Protocol):
    key: str
    dim: int

    def encode(self, captions: list[str], batch_size: int = 256) -> torch.Tensor: ...


def cache_key(encoder: CaptionEncoder, settings: dict[str, Any] | None = None) -> str:
    """Folder name of ``encoder``'s cache: hash of its key, dim, the normalisation and ``settings``."""
    return storage.stable_hash({"encoder": encoder.key, "dim": int(encoder.dim),
                                "normalization": NORMALIZATION, "settings": settings or {}})


def _schema(dim: int) -> pa.Schema:
    return pa.schema([("caption", pa.string()), ("embedding", pa.list_(pa.float32(), dim))])


def _parts(key_dir: str) -> list[str]:
    return [n for n in storage.listdir(key_dir) if n.startswith("part-") and n.endswith(".parquet")]


def _read_part(key_dir: str, name: str, dim: int) -> tuple[list[str], np.ndarray]:
    """(captions, embeddings n x ``dim`` float32) of one cache part."""
    table = storage.read_parquet(storage.join(key_dir, name))
    emb_type = table.schema.field("embedding").type
    if getattr(emb_type, "list_size", None) != dim:
        raise storage.StorageError(
            f"{storage.join(key_dir, name)}: embeddings are not {dim}-dimensional; delete {key_dir} and re-run"
        )
    flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
    return table.column("caption").to_pylist(), flat.astype(np.float32, copy=False).reshape(-1, dim)


def load_cache(key_dir: str, dim: int) -> dict[str, np.ndarray]:
    """caption -> embedding (float32, ``dim``) of every part under ``key_dir`` (the first part holding a caption
    wins)."""
    out: dict[str, np.ndarray] = {}
    for name in _parts(key_dir):
        captions, emb = _read_part(key_dir, name, dim)
        for caption, vec in zip(captions, emb):
            out.setdefault(caption, vec)
    return out


def _write_part(key_dir: str, captions: list[str], emb: np.ndarray) -> None:
    dim = emb.shape[1]
    arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), dim)
    table = pa.Table.from_arrays([pa.array(captions, type=pa.string()), arr], schema=_schema(dim))
    url = storage.join(key_dir, f"part-{uuid.uuid4().hex[:16]}.parquet")
    with storage.atomic_open(url, "wb") as f:
        pq.write_table(table, f)


def _encode(encoder: CaptionEncoder, batch: list[str], batch_size: int) -> np.ndarray:
    emb = encoder.encode(batch, batch_size=batch_size).detach().float().cpu().numpy()
    if emb.shape != (len(batch), encoder.dim):
        raise ValueError(f"encoder returned shape {emb.shape} for {len(batch)} captions; expected (n, {encoder.dim})")
    return emb


def _compute_missing(missing: list[str], encoder: CaptionEncoder, key_dir: str, batch_size: int,
                     cache: dict[str, np.ndarray], progress: Callable[[int, int], None] | None) -> None:
    """Encode ``missing`` in batches, adding them to ``cache`` and to new part files."""
    pending_caps: list[str] = []
    pending_emb: list[np.ndarray] = []
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        emb = _encode(encoder, batch, batch_size)
        cache.update(zip(batch, emb))
        pending_caps.extend(batch)
        pending_emb.append(emb)
        done = start + len(batch)
        if len(pending_caps) >= PART_CAPTIONS or done == len(missing):
            _write_part(key_dir, pending_caps, np.concatenate(pending_emb))
            pending_caps, pending_emb = [], []
        if progress:
            progress(done, len(missing))


def _digest(caption: str) -> bytes:
    return hashlib.blake2b(caption.encode("utf-8"), digest_size=16).digest()


class _SplitRows:
    """A split's caption rows by caption digest (16 bytes a row, sorted once): which rows hold a caption, and which
    are filled yet. What :func:`embed_split` keeps of the split instead of its strings and embeddings."""

    def __init__(self, digests: np.ndarray):
        self.order = np.argsort(digests, kind="stable")
        self.sorted = digests[self.order]
        self.filled = np.zeros(len(digests), dtype=bool)

    def rows_of(self, digests: np.ndarray) -> list[np.ndarray]:
        lo, hi = np.searchsorted(self.sorted, digests, "left"), np.searchsorted(self.sorted, digests, "right")
        return [self.order[a:b] for a, b in zip(lo.tolist(), hi.tolist())]


def _write_rows(fd: int, start: int, emb: np.ndarray, rows: list[np.ndarray], split: _SplitRows) -> None:
    """Write ``emb[j]`` at every caption row in ``rows[j]`` not filled yet (the first embedding of a caption wins, as
    in :func:`load_cache`) into the embedding file open as ``fd`` whose data start at ``start``; consecutive rows
    from consecutive embeddings go in one write."""
    target, source = [], []
    for j, rs in enumerate(rows):
        rs = rs[~split.filled[rs]]
        split.filled[rs] = True
        target.append(rs)
        source.append(np.full(len(rs), j))
    t, src = (np.concatenate(v) if v else np.zeros(0, dtype=np.int64) for v in (target, source))
    if not len(t):
        return
    by_row = np.argsort(t, kind="stable")
    t, src = t[by_row], src[by_row]
    breaks = np.flatnonzero((np.diff(t) != 1) | (np.diff(src) != 1)) + 1
    row_bytes = emb.shape[1] * 4
    for a, b in zip([0, *breaks.tolist()], [*breaks.tolist(), len(t)]):
        data = np.ascontiguousarray(emb[src[a]:src[a] + (b - a)], dtype="<f4").tobytes()
        os.pwrite(fd, data, start + int(t[a]) * row_bytes)


def embed_split(
    url: str,
    captions: Callable[[], Iterable[list[str]]],
    encoder: CaptionEncoder,
    cache_dir: str,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> str:
    """Write the caption-embedding file of a split (``data/embedfile.py``) at ``url``; returns its sha256.

    The bytes are those of ``safetensors.torch.save({"text": embed_captions(all captions, ...)})`` (the same cache
    entries, the same captions encoded in the same batches, the same new parts), with memory bounded by a shard of
    captions, a cache part and a batch, not by the split: ``captions()`` yields the split's captions a shard at a
    time (called once more when some are not cached); the split is kept as 16-byte caption digests; each cache
    part is read once and its embeddings written straight to the rows that use them in a scratch file (beside
    ``url`` when it is local, else in this node's cache), which is then hashed and moved to ``url``.
    """
    from ptmst_ray.data.embedfile import header_bytes

    key_dir = _key_dir(cache_dir, encoder, settings)
    dim = int(encoder.dim)
    digests = np.array([_digest(c) for chunk in captions() for c in chunk], dtype="S16")
    n = len(digests)
    split = _SplitRows(digests)
    local = storage.local_path(url)
    scratch = (local if local is not None else os.path.join(storage.cache_root(), "tmp", "embeddings"))
    scratch = f"{scratch}{storage.TMP_MARK}{uuid.uuid4().hex[:12]}"
    os.makedirs(os.path.dirname(scratch), exist_ok=True)
    header = header_bytes(n, dim)
    try:
        _write_scratch(scratch, url, header, n, dim, key_dir, split, digests, captions, encoder, batch_size, progress)
        digest = storage.hash_file(scratch)
        storage.put_file(scratch, url)
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.remove(scratch)
    return digest


def _write_scratch(scratch: str, url: str, header: bytes, n: int, dim: int, key_dir: str, split: "_SplitRows",
                   digests: np.ndarray, captions: Callable[[], Iterable[list[str]]], encoder: CaptionEncoder,
                   batch_size: int, progress: Callable[[int, int], None] | None) -> None:
    """Fill the scratch file of :func:`embed_split`: the header, the cached rows, then the encoded ones. A failed
    write (a full disk) is the StorageError of ``url``, the file it was to become."""
    try:
        with open(scratch, "wb") as f:
            f.write(header)
            f.truncate(len(header) + n * dim * 4)
            for name in _parts(key_dir):  # the cache: one part at a time, in load_cache's order
                part_caps, emb = _read_part(key_dir, name, dim)
                _write_rows(f.fileno(), len(header), emb, split.rows_of(np.array([_digest(c) for c in part_caps],
                                                                                  dtype="S16")), split)
            missing = len(np.unique(digests[~split.filled]))
            log.info("text cache %s: %d captions, %d distinct, %d cached, %d to encode", key_dir, n,
                     len(np.unique(digests)), len(np.unique(digests)) - missing, missing)
            if missing:
                _encode_missing(captions(), split, missing, encoder, key_dir, batch_size, f.fileno(), len(header),
                                progress)
    except OSError as e:
        raise storage.write_error(url, e) from e


def _encode_missing(captions: Iterable[list[str]], split: _SplitRows, missing: int, encoder: CaptionEncoder,
                    key_dir: str, batch_size: int, fd: int, start: int,
                    progress: Callable[[int, int], None] | None) -> None:
    """Encode the split's captions that no part holds, distinct ones in order of first appearance, in batches of
    ``batch_size`` (:func:`_compute_missing`'s batches), writing them to new parts and to their rows."""
    pending: dict[bytes, str] = {}
    part_caps: list[str] = []
    part_emb: list[np.ndarray] = []
    done = 0

    def flush_batch() -> None:
        nonlocal done
        batch, keys = list(pending.values()), np.array(list(pending), dtype="S16")
        emb = _encode(encoder, batch, batch_size)
        _write_rows(fd, start, emb, split.rows_of(keys), split)
        pending.clear()
        part_caps.extend(batch)
        part_emb.append(emb)
        done += len(batch)
        if len(part_caps) >= PART_CAPTIONS or done == missing:
            _write_part(key_dir, part_caps, np.concatenate(part_emb))
            part_caps.clear()
            part_emb.clear()
        if progress:
            progress(done, missing)

    row = 0
    for chunk in captions:
        for caption in chunk:
            if not split.filled[row]:
                key = _digest(caption)
                if key not in pending:
                    pending[key] = caption
                    if len(pending) == batch_size:
                        flush_batch()
            row += 1
    if pending:
        flush_batch()


def _key_dir(cache_dir: str, encoder: CaptionEncoder, settings: dict[str, Any] | None) -> str:
    """``encoder``'s cache folder under ``cache_dir``, made (with its meta.json) when missing."""
    key_dir = storage.join(cache_dir, cache_key(encoder, settings))
    storage.makedirs(key_dir)
    if not storage.exists(storage.join(key_dir, "meta.json")):
        storage.write_json(storage.join(key_dir, "meta.json"),
                           {"encoder_key": encoder.key, "dim": int(encoder.dim),
                            "normalization": NORMALIZATION, "settings": settings or {}})
    return key_dir


def embed_captions(
    captions: list[str],
    encoder: CaptionEncoder,
    cache_dir: str,
    batch_size: int = 256,
    progress: Callable[[int, int], None] | None = None,
    settings: dict[str, Any] | None = None,
) -> torch.Tensor:
    """Embeddings (n x encoder.dim, float32) of ``captions`` (already normalised), in order.

    ``cache_dir`` is the cache root (``Layout.text_cache`` of a run); entries live in its
    ``cache_key(encoder, settings)`` sub-folder. Only captions missing there are encoded.
    """
    key_dir = _key_dir(cache_dir, encoder, settings)
    cache = load_cache(key_dir, int(encoder.dim))
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    log.info("text cache %s: %d captions, %d distinct, %d cached, %d to encode",
             key_dir, len(captions), len(set(captions)), len(set(captions)) - len(missing), len(missing))
    if missing:
        _compute_missing(missing, encoder, key_dir, batch_size, cache, progress)
    if not captions:
        return torch.empty(0, int(encoder.dim))
    return torch.from_numpy(np.stack([cache[c] for c in captions]).astype(np.float32, copy=False))
