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

import dataclasses
import hashlib
import json
import mmap
import os
import struct
import weakref
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
    the file: no copy is made; indexing gathers the rows asked for (:func:`release_pages` drops them from the
    process again). Copy-on-write, so a write to the tensor never reaches the file (nothing writes to it). ``url`` names the file in errors (the artefact a local
    copy was made of)."""
    start, shape = read_header(path, url)
    if shape[0] * shape[1] == 0:
        return torch.empty(shape, dtype=torch.float32)
    mapped = np.memmap(path, dtype="<f4", mode="c", offset=start, shape=shape)
    text = torch.from_numpy(mapped)
    _MAPS[:] = [m for m in _MAPS if m.array() is not None]
    _MAPS.append(_Map(text.data_ptr(), text.data_ptr() + text.numel() * 4, weakref.ref(mapped), path, start,
                      shape[1] * 4))
    return text


@dataclasses.dataclass(frozen=True)
class _Map:
    lo: int  # first address of the data
    hi: int  # end address
    array: weakref.ref  # the np.memmap
    path: str
    offset: int  # of the data in the file
    row_bytes: int


_MAPS: list[_Map] = []
"""Every live mapping :func:`map_embeddings` made in this process."""


def _map_of(text: torch.Tensor) -> _Map | None:
    """The mapping ``text`` (a :func:`map_embeddings` tensor or a row view of one) lies in, else None."""
    ptr = text.data_ptr() if text.numel() else -1
    return next((m for m in _MAPS if m.lo <= ptr < m.hi and m.array() is not None), None)


def release_pages(text: torch.Tensor) -> None:
    """Drop the pages of the file mapping ``text`` lies in (a :func:`map_embeddings` tensor or a view of one) from
    this process: they stay in the node's page cache, shared by its processes, and the next access reads them back.
    A scan of every row (the nearest captions) calls this after each chunk, so its resident memory holds a chunk,
    not the file. Anything else: nothing."""
    m = _map_of(text)
    if m is not None:
        m.array()._mmap.madvise(mmap.MADV_DONTNEED)  # a private mapping never written: the file's pages again


def gather(text: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """``text[rows]``, for a mapped ``text`` (a :func:`map_embeddings` tensor or a contiguous row view of one) read
    from its file row by row instead of through the mapping: the process's memory then holds the rows asked for
    and nothing else (a faulted mapping keeps whole page-cache folios resident, up to 2 MiB each on a recent
    Linux, so a streamed epoch of random rows would end with the whole file in its RSS). Other tensors: indexed."""
    m = _map_of(text)
    if m is None or not text.is_contiguous() or text.dim() != 2:
        return text[rows]
    first = (text.data_ptr() - m.lo) // m.row_bytes
    out = np.empty((len(rows), text.shape[1]), dtype="<f4")
    view = out.view(np.uint8).reshape(len(rows), m.row_bytes)
    fd = os.open(m.path, os.O_RDONLY)
    try:
        for k, r in enumerate(rows.tolist()):
            if not 0 <= r < text.shape[0]:
                raise IndexError(f"row {r} of {text.shape[0]}")
            got = os.preadv(fd, [view[k]], m.offset + (first + r) * m.row_bytes)
            if got != m.row_bytes:
                raise OSError(f"{m.path}: short read of row {first + r}")
    finally:
        os.close(fd)
    return torch.from_numpy(out)


def open_embeddings(directory: str, name: str, digest: str) -> torch.Tensor:
    """The caption embeddings ``directory/name`` listed in its manifest with sha256 ``digest``, mapped
    (:func:`map_embeddings`) from a local file checked against ``digest`` once per node and file version
    (:func:`ptmst_ray.storage.verified_local_file`: in place for a local run root, a node-local copy for a URL)."""
    return map_embeddings(storage.verified_local_file(directory, name, digest), storage.join(directory, name))
