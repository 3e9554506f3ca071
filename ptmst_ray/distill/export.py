"""Writing a finished phase subset, reading it back, and looking at it.

Why this file exists: the EMA copy of a phase's synthetic set is the artefact that evaluation
trains on and that people inspect. It is stored as safetensors (never pickle) with a JSON
sidecar that says what it is (phase config, init rows, iterations), written atomically with
the manifest last (ptmst_ray.storage), so a half-written subset is never taken for a finished
one. ``image_grid_png`` shows the images de-normalised, each titled with the real caption
nearest to its synthetic text embedding.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import textwrap
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save
from torch import Tensor

from ptmst_ray import storage
from ptmst_ray.config import PhaseConfig, SimilarityConfig
from ptmst_ray.data.embedfile import release_pages
from ptmst_ray.distill.similarity import similarity_from_state

log = logging.getLogger(__name__)

__all__ = ["DistilledSubset", "image_grid_png", "load_subset", "nearest_captions", "save_subset"]

TENSORS = "subset.safetensors"
SIDECAR = "subset.json"
SIM_PREFIX = "similarity."


@dataclass
class DistilledSubset:
    """One phase's distilled pairs with their soft targets and learned step sizes."""

    images: Tensor
    text: Tensor
    similarity: Tensor
    """The materialised n x n target similarity."""
    alpha_img: float
    alpha_txt: float
    similarity_params: dict[str, Tensor]
    meta: dict[str, Any]


def similarity_matrix(cfg: SimilarityConfig, state: dict[str, Tensor]) -> Tensor:
    params = {k[len(SIM_PREFIX):]: v for k, v in state.items() if k.startswith(SIM_PREFIX)}
    n = state["images"].shape[0]
    with torch.no_grad():
        return similarity_from_state(cfg, n, params).matrix().detach().clone()


def save_subset(out_dir: str, ema_state: dict[str, Tensor], phase_cfg: PhaseConfig, *,
                init_indices: Tensor | Sequence[int] | None = None, iterations: int | None = None,
                config_hash: str | None = None, extra: dict[str, Any] | None = None,
                record: dict[str, Any] | None = None) -> None:
    """Write ``ema_state`` (names as ``SyntheticSet.tensors()``) under ``out_dir``; the manifest goes last.

    ``extra`` goes into the subset's JSON sidecar; ``record`` into its manifest (what the run layout
    reads without loading the subset, e.g. a divergence).
    """
    missing = {"images", "text", "alpha_img", "alpha_txt"} - set(ema_state)
    if missing:
        raise ValueError(f"the EMA state lacks {sorted(missing)}; pass PhaseTrainer.ema.state()")
    tensors = {k: v.detach().cpu().contiguous().clone() for k, v in ema_state.items()}
    tensors["similarity_matrix"] = similarity_matrix(phase_cfg.similarity, tensors).cpu().contiguous()
    indices = [] if init_indices is None else [int(i) for i in torch.as_tensor(init_indices).tolist()]
    meta = {"phase": dataclasses.asdict(phase_cfg), "init_indices": indices, "iterations": iterations,
            "pairs": int(tensors["images"].shape[0]), "alpha_img": float(tensors["alpha_img"]),
            "alpha_txt": float(tensors["alpha_txt"]), **(extra or {})}
    blob = st_save(tensors, metadata={"format": "ptmst-subset-v1"})
    storage.write_bytes(storage.join(out_dir, TENSORS), blob)
    storage.write_json(storage.join(out_dir, SIDECAR), meta)
    files = {name: storage.hash_file(storage.join(out_dir, name)) for name in (TENSORS, SIDECAR)}
    storage.write_manifest(out_dir, {"kind": "phase_subset", "config_hash": config_hash, "files": files,
                                     **(record or {})})
    log.info("wrote %d distilled pairs to %s", meta["pairs"], out_dir)


def load_subset(directory: str) -> DistilledSubset:
    """Read a subset written by :func:`save_subset` (checks its manifest and file hashes)."""
    manifest = storage.read_manifest(directory)
    if manifest is None:
        raise storage.StorageError(f"{directory}: no manifest; the phase subset was never finished (rerun the phase)")
    storage.verify_files(directory, manifest["files"])
    tensors = st_load(storage.read_bytes(storage.join(directory, TENSORS)))
    meta = storage.read_json(storage.join(directory, SIDECAR))
    sim_params = {k[len(SIM_PREFIX):]: v for k, v in tensors.items() if k.startswith(SIM_PREFIX)}
    return DistilledSubset(images=tensors["images"], text=tensors["text"], similarity=tensors["similarity_matrix"],
                           alpha_img=float(tensors["alpha_img"]), alpha_txt=float(tensors["alpha_txt"]),
                           similarity_params=sim_params, meta=meta)


def nearest_captions(syn_text: Tensor, real_text_emb: Tensor, real_captions: Sequence[str],
                     chunk: int = 65536) -> list[str]:
    """For each synthetic text embedding, the real caption with the highest cosine similarity."""
    if len(real_captions) != real_text_emb.shape[0]:
        raise ValueError(f"{real_text_emb.shape[0]} caption embeddings but {len(real_captions)} captions")
    query = torch.nn.functional.normalize(syn_text.detach().float(), dim=-1)
    best_score = torch.full((query.shape[0],), -float("inf"))
    best_index = torch.zeros(query.shape[0], dtype=torch.long)
    for start in range(0, real_text_emb.shape[0], chunk):
        keys = torch.nn.functional.normalize(real_text_emb[start:start + chunk].detach().float().to(query.device), dim=-1)
        score, index = (query @ keys.T).max(dim=1)
        better = score.cpu() > best_score
        best_score = torch.where(better, score.cpu(), best_score)
        best_index = torch.where(better, index.cpu() + start, best_index)
        release_pages(real_text_emb)  # a mapped file's chunk, read once: not kept resident
    take = getattr(real_captions, "take", None)  # captions read on demand (dataset.PairCaptions): one read a shard
    return take(best_index.tolist()) if take is not None else [real_captions[i] for i in best_index.tolist()]


def _denormalise(images: Tensor, mean: Sequence[float] | None, std: Sequence[float] | None) -> Tensor:
    if mean is None or std is None:
        from ptmst_ray.models.towers import image_transform_stats

        mean, std = image_transform_stats()
    m = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
    s = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
    return (images.detach().cpu().float() * s + m).clamp(0.0, 1.0)


def image_grid_png(images: Tensor, captions: Sequence[str] | None, out_png: str, *, columns: int | None = None,
                   tile: int = 128, mean: Sequence[float] | None = None, std: Sequence[float] | None = None) -> None:
    """A PNG grid of CLIP-normalised images (de-normalised, clamped), each with its caption below."""
    from PIL import Image, ImageDraw

    pixels = (_denormalise(images, mean, std) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    n = pixels.shape[0]
    columns = columns or max(1, min(10, int(n ** 0.5 + 0.999)))
    rows = (n + columns - 1) // columns
    text_h = 44 if captions else 0
    sheet = Image.new("RGB", (columns * tile, rows * (tile + text_h)), "white")
    draw = ImageDraw.Draw(sheet)
    for i in range(n):
        x, y = (i % columns) * tile, (i // columns) * (tile + text_h)
        sheet.paste(Image.fromarray(pixels[i]).resize((tile, tile), Image.NEAREST), (x, y))
        if captions:
            lines = textwrap.wrap(captions[i], width=max(8, tile // 6))[:4]
            draw.multiline_text((x + 2, y + tile + 1), "\n".join(lines), fill="black", spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(out_png, buf.getvalue())
