"""Readers of prepared splits: decoded image tensors, captions and their image indices.

Why this file exists: experts, distillation and evaluation all need the same in-memory view of
a prepared split, and must refuse to use data that was never completely prepared or was
changed since (the manifest and its file hashes are checked before anything is decoded).
"""

from __future__ import annotations

import io
import logging
from dataclasses import dataclass, field

import numpy as np
import pyarrow.parquet as pq
import torch
from PIL import Image

from ptmst_ray import storage

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """A train-shape split: ``images`` (N x 3 x H x W uint8, one per distinct image), and per
    caption row its ``caption`` and ``image_index`` (into ``images``)."""

    images: torch.Tensor
    captions: list[str]
    image_index: torch.Tensor
    image_ids: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class TestSet:
    """An evaluation split: ``images`` (N x 3 x H x W uint8), all captions flattened, and
    ``txt2img[j]`` = the image of caption j (LongTensor)."""

    images: torch.Tensor
    captions: list[str]
    txt2img: torch.Tensor
    image_ids: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    __test__ = False  # not a pytest class


def split_dir(data_dir: str, split: str) -> str:
    return storage.join(data_dir, split)


def split_manifest(data_dir: str, split: str, verify: bool = True) -> dict:
    """The split's manifest; raises StorageError (saying what to run) when it is missing or its files changed."""
    d = split_dir(data_dir, split)
    m = storage.read_manifest(d)
    if m is None:
        raise storage.StorageError(
            f"{d}: split {split!r} is not prepared (no manifest); run `ptmst-ray data prepare` first"
        )
    if verify:
        storage.verify_files(d, m["files"])
    return m


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> H x W x 3 uint8 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


def _read_table(d: str, names: list[str], columns: list[str]) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    for name in names:
        fs, path = storage.filesystem(storage.join(d, name))
        with fs.open(path, "rb") as f:
            table = pq.read_table(f, columns=columns)
        for c in columns:
            out[c].extend(table.column(c).to_pylist())
    return out


def _shards(m: dict, prefix: str) -> list[str]:
    return sorted(n for n in m["files"] if n.startswith(prefix + "-"))


def _decode_all(pngs: list[bytes], size: int) -> torch.Tensor:
    out = torch.empty((len(pngs), 3, size, size), dtype=torch.uint8)
    for i, data in enumerate(pngs):
        out[i] = torch.from_numpy(decode_png(data)).permute(2, 0, 1)
    return out


def load_split(data_dir: str, split: str, verify: bool = True) -> PairSet | TestSet:
    """A prepared split, decoded: :class:`PairSet` for train/pretrain, :class:`TestSet` for val/test."""
    m = split_manifest(data_dir, split, verify)
    d = split_dir(data_dir, split)
    is_pairs = m["split_kind"] == "pairs"
    cols = ["image_index", "image_id", "png"] + ([] if is_pairs else ["captions"])
    imgs = _read_table(d, _shards(m, "images"), cols)
    if imgs["image_index"] != list(range(len(imgs["image_index"]))):
        raise storage.StorageError(f"{d}: image shards are out of order; rebuild with `ptmst-ray data prepare`")
    images = _decode_all(imgs["png"], m["image_size"])
    if is_pairs:
        caps = _read_table(d, _shards(m, "captions"), ["image_index", "caption"])
        return PairSet(images, caps["caption"], torch.tensor(caps["image_index"], dtype=torch.long),
                       imgs["image_id"], m)
    captions = [c for cs in imgs["captions"] for c in cs]
    txt2img = torch.tensor([i for i, cs in enumerate(imgs["captions"]) for _ in cs], dtype=torch.long)
    return TestSet(images, captions, txt2img, imgs["image_id"], m)


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean/std shaped for ``x`` (batch or single image). open_clip is imported here, not at the
    top: importing it costs ~280 MiB of RSS, which `data prepare` (it only reads manifests here) need not pay."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    return (torch.tensor(OPENAI_DATASET_MEAN, device=x.device).view(shape),
            torch.tensor(OPENAI_DATASET_STD, device=x.device).view(shape))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N x 3 x H x W or 3 x H x W) -> float32 scaled to [0, 1] with CLIP mean/std normalisation."""
    x = images.float() / 255.0
    mean, std = _mean_std(x)
    return (x - mean) / std


def denormalize_images(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_images` (float in, uint8 out, clamped)."""
    mean, std = _mean_std(x)
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
