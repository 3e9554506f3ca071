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

import json
import os
import struct

import numpy as np
import torch

from ptmst_ray import storage

KEY = "text"


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
