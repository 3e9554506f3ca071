"""The synthetic set of one phase: what distillation learns.

Why this file exists: a phase learns n image-text pairs (images in CLIP-normalised pixel
space, "texts" as free vectors in the frozen text tower's embedding space), a similarity
generator that gives their soft targets, and one student step size per modality. Keeping them
in one ``nn.Module`` gives a single ``state_dict`` for checkpoints, EMA and export, and one
place that records how the set was initialised (docs/method.md#the-synthetic-set).
"""

from __future__ import annotations

import logging
from typing import Any, Protocol

import torch
from torch import nn

from ptmst_ray.config import SimilarityConfig
from ptmst_ray.distill.similarity import Similarity, build_similarity

log = logging.getLogger(__name__)

__all__ = ["RealRows", "SyntheticSet", "choose_init_indices", "kmeans_init_indices"]

KMEANS_POOL = 20000
"""Caption rows a k-means initialisation clusters at most (a seeded random pool of them): its memory and time stay
bounded at COCO's 566k captions (20000 x 768 floats, 61 MB) while each centre has tens of candidates."""


class RealRows(Protocol):
    """Anything with a length whose rows can be gathered by a LongTensor (a tensor is one)."""

    def __len__(self) -> int: ...

    def __getitem__(self, indices: torch.Tensor) -> torch.Tensor: ...


def choose_init_indices(num_rows: int, n: int, generator: torch.Generator) -> torch.Tensor:
    """n distinct random train rows (sorted, so the record is easy to read)."""
    if n > num_rows:
        raise ValueError(f"cannot initialise {n} synthetic pairs from {num_rows} real train rows; lower the phase's pairs")
    return torch.randperm(num_rows, generator=generator)[:n].sort().values


def kmeans_init_indices(text: RealRows, total: int, offset: int, n: int, seed: int, iters: int = 30,
                        pool: int = KMEANS_POOL) -> torch.Tensor:
    """Rows ``offset .. offset + n`` of ``total`` train rows that cover the captions (``distill.init: kmeans``).

    Spherical k-means with ``total`` centres on the L2-normalised caption embeddings ``text`` (at most ``pool``
    rows, a seeded random sample), ``iters`` Lloyd steps from k-means++ starting centres; centre k's row is
    the pool row nearest it not taken by an earlier centre. Every phase computes the same clustering from the same
    ``seed`` (``run.seed``) and takes its own slice, so the phases' pairs are disjoint and together are the
    single-phase set's. Returned sorted, as :func:`choose_init_indices`.
    """
    rows = len(text)
    if not (0 <= offset and n >= 1 and offset + n <= total):
        raise ValueError(f"rows {offset}..{offset + n} are not within the {total} of the clustering")
    if total > rows:
        raise ValueError(f"cannot initialise {total} synthetic pairs from {rows} real train rows; lower the phases' pairs")
    gen = torch.Generator().manual_seed(seed)
    candidates = (torch.randperm(rows, generator=gen)[:pool] if rows > pool else torch.arange(rows)).sort().values
    if len(candidates) < total:
        raise ValueError(f"a k-means initialisation of {total} pairs needs at least {total} candidate rows, "
                         f"got {len(candidates)} (pool {pool})")
    x = nn.functional.normalize(torch.as_tensor(text[candidates]).float(), dim=1)  # rows in file order
    centres = _kmeans_plus_plus(x, total, gen)
    for _ in range(iters):
        nearest = (x @ centres.T).argmax(dim=1)
        sums = torch.zeros_like(centres).index_add_(0, nearest, x)
        filled = torch.bincount(nearest, minlength=total) > 0  # an empty cluster keeps its centre
        centres[filled] = nn.functional.normalize(sums[filled], dim=1)
    sims = x @ centres.T
    chosen: list[int] = []
    for k in range(offset + n):  # centre k's nearest pool row that no earlier centre took
        column = sims[:, k].clone()
        column[chosen] = float("-inf")
        chosen.append(int(column.argmax()))
    return candidates[torch.tensor(chosen[offset:], dtype=torch.long)].sort().values


def _kmeans_plus_plus(x: torch.Tensor, k: int, gen: torch.Generator) -> torch.Tensor:
    """k starting centres among the unit rows ``x`` (k-means++: each next one drawn with probability proportional
    to its squared distance, 2 - 2 cos, from the nearest centre so far)."""
    first = int(torch.randint(len(x), (1,), generator=gen))
    centres = [x[first]]
    gap = (2 - 2 * (x @ x[first])).clamp_min(0)
    for _ in range(k - 1):
        weights = gap if gap.sum() > 0 else torch.ones_like(gap)  # every row on a centre: any row
        pick = int(torch.multinomial(weights, 1, generator=gen))
        centres.append(x[pick])
        gap = torch.minimum(gap, (2 - 2 * (x @ x[pick])).clamp_min(0))
    return torch.stack(centres).clone()


class SyntheticSet(nn.Module):
    """Images X (n x 3 x H x W), text embeddings T (n x d_t), similarity S, step sizes alpha_img/alpha_txt."""

    def __init__(self, images: torch.Tensor, text: torch.Tensor, similarity: Similarity,
                 alpha_init: float | tuple[float, float], init_indices: torch.Tensor | None = None):
        super().__init__()
        if images.shape[0] != text.shape[0]:
            raise ValueError(f"{images.shape[0]} synthetic images but {text.shape[0]} synthetic texts")
        if images.dim() != 4 or text.dim() != 2:
            raise ValueError(f"images must be n x 3 x H x W and text n x d_t, got {tuple(images.shape)}, {tuple(text.shape)}")
        self.images = nn.Parameter(images.detach().clone())
        self.text = nn.Parameter(text.detach().clone())
        self.similarity = similarity
        a_img, a_txt = alpha_init if isinstance(alpha_init, tuple) else (alpha_init, alpha_init)  # (img, txt)
        self.alpha_img = nn.Parameter(torch.tensor(float(a_img), dtype=images.dtype, device=images.device))
        self.alpha_txt = nn.Parameter(torch.tensor(float(a_txt), dtype=images.dtype, device=images.device))
        indices = init_indices if init_indices is not None else torch.zeros(0, dtype=torch.long)
        self.register_buffer("init_indices", indices.detach().clone().long().cpu())

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):  # type: ignore[override]
        """Accept any number of recorded init indices (a noise-initialised shell can load a real-init state)."""
        key = prefix + "init_indices"
        if key in state_dict:
            self.init_indices = state_dict[key].detach().clone().long().to(self.init_indices.device)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)

    @property
    def n(self) -> int:
        return self.images.shape[0]

    @property
    def alphas(self) -> tuple[nn.Parameter, nn.Parameter]:
        return self.alpha_img, self.alpha_txt

    @classmethod
    def from_real(cls, real_images: RealRows, real_text: RealRows, n: int, similarity: SimilarityConfig,
                  alpha_init: float | tuple[float, float], generator: torch.Generator, dtype: torch.dtype | None = None,
                  device: torch.device | None = None, indices: torch.Tensor | None = None) -> "SyntheticSet":
        """n real train pairs (image tensor, frozen caption embedding), random or the rows ``indices``
        (:func:`kmeans_init_indices`); the row indices are recorded."""
        if len(real_images) != len(real_text):
            raise ValueError(f"{len(real_images)} real images but {len(real_text)} caption embeddings")
        if indices is None:
            indices = choose_init_indices(len(real_images), n, generator)
        elif len(indices) != n:
            raise ValueError(f"{len(indices)} initial rows for {n} synthetic pairs")
        images = torch.as_tensor(real_images[indices]).to(device=device, dtype=dtype)
        text = torch.as_tensor(real_text[indices]).to(device=device, dtype=dtype)
        sim = build_similarity(similarity, n, generator, dtype=images.dtype, device=images.device)
        log.info("synthetic set: %d real pairs (rows %s...)", n, indices[:5].tolist())
        return cls(images, text, sim, alpha_init, indices)

    @classmethod
    def from_noise(cls, n: int, image_shape: tuple[int, int, int], text_dim: int, similarity: SimilarityConfig,
                   alpha_init: float | tuple[float, float], generator: torch.Generator,
                   dtype: torch.dtype | None = None, device: torch.device | None = None) -> "SyntheticSet":
        """n Gaussian pairs (standard normal in CLIP-normalised pixel space and in embedding space)."""
        dtype = dtype or torch.get_default_dtype()
        images = torch.randn(n, *image_shape, generator=generator, dtype=dtype)
        text = torch.randn(n, text_dim, generator=generator, dtype=dtype)
        sim = build_similarity(similarity, n, generator, dtype=dtype)
        out = cls(images, text, sim, alpha_init)
        return out.to(device) if device is not None else out

    def tensors(self) -> dict[str, torch.Tensor]:
        """Everything that is learned, by name (the EMA and the export use these names)."""
        return {name: p for name, p in self.named_parameters()}

    def describe(self) -> dict[str, Any]:
        return {"n": self.n, "image_shape": list(self.images.shape[1:]), "text_dim": self.text.shape[1],
                "similarity": self.similarity.kind, "init_indices": self.init_indices.tolist()}
