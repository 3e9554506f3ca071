"""Stage `embed`: caption embeddings by the frozen text tower, and the real data the models read.

The embeddings of every train and test caption are written once per (tower, data) under
``data/embedded/<key>`` (built from a per-caption cache that is reused across runs and configs);
:func:`load_real` gives the experts, phases and evaluation the real splits with those embeddings.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Callable

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ptmst_ray import storage
from ptmst_ray.config import Config, section_hash
from ptmst_ray.layout import Layout, StageError, data_hash

Progress = Callable[[int, int], None]


def embed(cfg: Config, progress: Progress | None = None) -> str:
    """Frozen-text-tower embeddings of the train and test captions, under data/embedded/<key>.

    Uses the per-caption cache (reused across runs and configs). Returns the key.
    """
    from ptmst_ray.data.dataset import load_split
    from ptmst_ray.data.text_cache import embed_captions
    from ptmst_ray.models.towers import build_text_encoder

    layout = Layout.of(cfg)
    encoder = build_text_encoder(cfg.model)
    key = section_hash(encoder.key, data_hash(cfg))
    out = layout.embedded(key)
    done = storage.read_manifest(out)
    if done is not None and done.get("config_hash") == key:
        storage.verify_files(out, done["files"])  # small files: check them before any worker uses them
        return key
    files = {}
    for split in ("train", "test"):
        data = load_split(layout.data, split)
        emb = embed_captions(list(data.captions), encoder, layout.text_cache, progress=progress)
        blob = st_save({"text": emb.float().contiguous()})
        storage.write_bytes(storage.join(out, f"{split}.safetensors"), blob)
        files[f"{split}.safetensors"] = storage.hash_bytes(blob)
    storage.write_manifest(out, {"config_hash": key, "files": files, "dim": encoder.dim})
    storage.write_text(layout.embedded_current, key)
    return key


@dataclass
class RealData:
    """The real train split (one row per caption) and the test split, ready for the models."""

    train_images: torch.Tensor  # float, CLIP-normalised, one row per caption
    train_text: torch.Tensor  # caption embeddings, one row per caption
    train_captions: list[str]
    train_image_index: torch.Tensor  # row -> distinct train image
    test_images: torch.Tensor
    test_text: torch.Tensor
    test_captions: list[str]
    txt2img: torch.Tensor

    @property
    def text_dim(self) -> int:
        return int(self.train_text.shape[1])


@functools.lru_cache(maxsize=2)
def _load_real_cached(data_dir: str, embedded_dir: str, files: tuple, max_train_rows: int | None) -> RealData:
    from ptmst_ray.data.dataset import load_split, normalize_images

    storage.verify_files(embedded_dir, dict(files))
    emb = {s: st_load(storage.read_bytes(storage.join(embedded_dir, f"{s}.safetensors")))["text"]
           for s in ("train", "test")}
    train, test = load_split(data_dir, "train"), load_split(data_dir, "test")
    rows = torch.arange(len(train.captions))
    if max_train_rows is not None:
        rows = rows[:max_train_rows]
    return RealData(
        train_images=normalize_images(train.images[train.image_index[rows]]),
        train_text=emb["train"][rows],
        train_captions=[train.captions[i] for i in rows.tolist()],
        train_image_index=train.image_index[rows],
        test_images=normalize_images(test.images),
        test_text=emb["test"],
        test_captions=list(test.captions),
        txt2img=test.txt2img,
    )


def load_real(cfg: Config) -> RealData:
    """The embedded real data of this run (cached per process: a Ray worker loads it once; a rebuilt
    embedding, which has a new manifest, is read afresh)."""
    layout = Layout.of(cfg)
    if not storage.exists(layout.embedded_current):
        raise StageError(f"{layout.embedded_current}: no caption embeddings yet; run `ptmst-ray run` "
                         "or `ptmst-ray data prepare`")
    out = layout.embedded(storage.read_text(layout.embedded_current).strip())
    manifest = storage.read_manifest(out)
    if manifest is None:
        raise StageError(f"{out}: caption embeddings are missing; run `ptmst-ray run` (or `ptmst-ray data prepare`)")
    return _load_real_cached(layout.data, out, tuple(sorted(manifest["files"].items())), cfg.data.max_train_rows)
