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

import logging
import uuid
from typing import Any, Callable, Protocol

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


def load_cache(key_dir: str, dim: int) -> dict[str, np.ndarray]:
    """caption -> embedding (float32, ``dim``) of every part under ``key_dir``."""
    out: dict[str, np.ndarray] = {}
    for name in storage.listdir(key_dir):
        if not (name.startswith("part-") and name.endswith(".parquet")):
            continue
        fs, path = storage.filesystem(storage.join(key_dir, name))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f)
        emb_type = table.schema.field("embedding").type
        if getattr(emb_type, "list_size", None) != dim:
            raise storage.StorageError(
                f"{storage.join(key_dir, name)}: embeddings are not {dim}-dimensional; delete {key_dir} and re-run"
            )
        flat = table.column("embedding").combine_chunks().flatten().to_numpy(zero_copy_only=False)
        emb = flat.astype(np.float32, copy=False).reshape(-1, dim)
        for caption, vec in zip(table.column("caption").to_pylist(), emb):
            out.setdefault(caption, vec)
    return out


def _write_part(key_dir: str, captions: list[str], emb: np.ndarray) -> None:
    dim = emb.shape[1]
    arr = pa.FixedSizeListArray.from_arrays(pa.array(emb.reshape(-1), type=pa.float32()), dim)
    table = pa.Table.from_arrays([pa.array(captions, type=pa.string()), arr], schema=_schema(dim))
    url = storage.join(key_dir, f"part-{uuid.uuid4().hex[:16]}.parquet")
    with storage.atomic_open(url, "wb") as f:
        pq.write_table(table, f)


def _compute_missing(missing: list[str], encoder: CaptionEncoder, key_dir: str, batch_size: int,
                     cache: dict[str, np.ndarray], progress: Callable[[int, int], None] | None) -> None:
    """Encode ``missing`` in batches, adding them to ``cache`` and to new part files."""
    pending_caps: list[str] = []
    pending_emb: list[np.ndarray] = []
    for start in range(0, len(missing), batch_size):
        batch = missing[start:start + batch_size]
        emb = encoder.encode(batch, batch_size=batch_size).detach().float().cpu().numpy()
        if emb.shape != (len(batch), encoder.dim):
            raise ValueError(f"encoder returned shape {emb.shape} for {len(batch)} captions; expected (n, {encoder.dim})")
        cache.update(zip(batch, emb))
        pending_caps.extend(batch)
        pending_emb.append(emb)
        done = start + len(batch)
        if len(pending_caps) >= PART_CAPTIONS or done == len(missing):
            _write_part(key_dir, pending_caps, np.concatenate(pending_emb))
            pending_caps, pending_emb = [], []
        if progress:
            progress(done, len(missing))


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
    key_dir = storage.join(cache_dir, cache_key(encoder, settings))
    storage.makedirs(key_dir)
    if not storage.exists(storage.join(key_dir, "meta.json")):
        storage.write_json(storage.join(key_dir, "meta.json"),
                           {"encoder_key": encoder.key, "dim": int(encoder.dim),
                            "normalization": NORMALIZATION, "settings": settings or {}})
    cache = load_cache(key_dir, int(encoder.dim))
    missing = [c for c in dict.fromkeys(captions) if c not in cache]
    log.info("text cache %s: %d captions, %d distinct, %d cached, %d to encode",
             key_dir, len(captions), len(set(captions)), len(set(captions)) - len(missing), len(missing))
    if missing:
        _compute_missing(missing, encoder, key_dir, batch_size, cache, progress)
    if not captions:
        return torch.empty(0, int(encoder.dim))
    return torch.from_numpy(np.stack([cache[c] for c in captions]).astype(np.float32, copy=False))
