"""A split's caption-embedding file: one safetensors tensor ``text`` (n captions x d, float32), mapped, never read whole.

Why this file exists: every worker (expert actors, phase workers, scoring tasks, the full-data baseline) needs the
train split's caption embeddings, and at paper scale they are large (COCO with BERT: 566k x 768 x 4 B = 1.7 GB;
CC3M: 8.6 GB). Reading the file into memory and deserialising it costs two copies per process. Here the file is
memory-mapped at its data offset instead: ``text[rows]`` gathers rows from the page cache, which every process on
the node shares, and a process holds only the rows it gathered. The file is the one ``safetensors.torch.save``
writes for ``{"text": tensor}``; the header is checked (one F32 tensor of two dimensions whose bytes fill the
file) before anything is mapped.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
from typing import IO

import numpy as np
import torch

from ptmst_ray import storage

KEY = "text"


def header_bytes(n: int, d: int) -> bytes:
    """The first bytes of the file ``safetensors.torch.save({"text": t})`` writes for an (n, d) float32 ``t``: the
    8-byte little-endian length, then the compact JSON header padded with spaces to a multiple of 8 bytes."""
    text = json.dumps({KEY: {"dtype": "F32", "shape": [n, d], "data_offsets": [0, n * d * 4]}}, separators=(",", ":"))
    text += " " * (-len(text) % 8)
    return struct.pack("<Q", len(text)) + text.encode("ascii")


class EmbeddingWriter:
    """Writes a caption-embedding file a chunk of rows at a time into the binary file ``f``: the bytes
    ``safetensors.torch.save({"text": t})`` writes for the (n, d) float32 ``t`` the chunks make up, with n and d
    known up front, so no more than a chunk is ever in memory; the sha256 is computed while writing
    (:meth:`finish`)."""

    def __init__(self, f: IO[bytes], n: int, d: int):
        self.f, self.n, self.d, self.rows = f, n, d, 0
        self._hash = hashlib.sha256()
        self._write(header_bytes(n, d))

    def _write(self, data: bytes) -> None:
        self.f.write(data)
        self._hash.update(data)

    def add(self, rows: torch.Tensor | np.ndarray) -> None:
        """Append ``rows`` (k x d; cast to float32)."""
        a = rows.detach().cpu().float().numpy() if isinstance(rows, torch.Tensor) else np.asarray(rows)
        if a.ndim != 2 or a.shape[1] != self.d or self.rows + a.shape[0] > self.n:
            raise ValueError(f"rows of shape {tuple(a.shape)} after {self.rows} of ({self.n}, {self.d})")
        self._write(np.ascontiguousarray(a, dtype="<f4").tobytes())
        self.rows += a.shape[0]

    def finish(self) -> str:
        """The file's sha256 (hex), once all n rows are written."""
        if self.rows != self.n:
            raise ValueError(f"{self.rows} rows written of {self.n}")
        return self._hash.hexdigest()


def _bad(url: str, what: str) -> storage.StorageError:
    return storage.StorageError(f"{url}: {what}; not a caption-embedding file: rebuild this stage", url)


def read_header(path: str, url: str | None = None) -> tuple[int, tuple[int, int]]:
    """(offset of the data in the file, (n, d)) of the caption-embedding file at the local ``path``; raises
    :class:`~ptmst_ray.storage.StorageError` naming ``url`` (default: ``path``) when it is not one."""
    url = url or path
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise _bad(url, f"{size} bytes, shorter than a safetensors header")
        (length,) = struct.unpack("<Q", head)
        if length > size - 8:
            raise _bad(url, f"header of {length} bytes in a file of {size}")
        try:
            header = json.loads(f.read(length))
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise _bad(url, f"unreadable safetensors header ({e})") from None
    entry = header.get(KEY) if isinstance(header, dict) else None
    tensors = sorted(k for k in (header if isinstance(header, dict) else {}) if k != "__metadata__")
    if not isinstance(entry, dict) or tensors != [KEY]:
        raise _bad(url, f"tensors {tensors}, expected only {KEY!r}")
    shape, offsets = entry.get("shape"), entry.get("data_offsets")
    if entry.get("dtype") != "F32" or not isinstance(shape, list) or len(shape) != 2:
        raise _bad(url, f"{KEY!r} is {entry.get('dtype')} of shape {shape}, expected F32 of shape (captions, dim)")
    n, d = (int(v) for v in shape)
    start = 8 + length
    if offsets != [0, n * d * 4] or start + n * d * 4 != size:
        raise _bad(url, f"{KEY!r} of shape {shape} at offsets {offsets} does not fill the file's {size - start} "
                   "data bytes")
    return start, (n, d)


def map_embeddings(path: str, url: str | None = None) -> torch.Tensor:
    """The caption embeddings of the local file ``path`` (n x d float32) as a tensor backed by a memory map of
    the file: no copy is made; indexing gathers the rows asked for. Copy-on-write, so a write to the tensor
    stays in this process and never reaches the file. ``url`` names the file in errors (the artefact a local
    copy was made of)."""
    start, shape = read_header(path, url)
    if shape[0] * shape[1] == 0:
        return torch.empty(shape, dtype=torch.float32)
    return torch.from_numpy(np.memmap(path, dtype="<f4", mode="c", offset=start, shape=shape))


def open_embeddings(directory: str, name: str, digest: str) -> torch.Tensor:
    """The caption embeddings ``directory/name`` listed in its manifest with sha256 ``digest``, mapped
    (:func:`map_embeddings`) from a local file checked against ``digest`` once per node and file version
    (:func:`ptmst_ray.storage.verified_local_file`: in place for a local run root, a node-local copy for a URL)."""
    return map_embeddings(storage.verified_local_file(directory, name, digest), storage.join(directory, name))
