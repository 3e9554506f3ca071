"""Image-text retrieval recall (IR@K, TR@K, r_mean): the score every distilled set is judged by.

Why this file exists: docs/method.md#evaluation-protocol defines the numbers the paper reports. They are
computed here once, vectorised (1000 images x 5000 captions in well under a second), from a
similarity matrix, independently of how the embeddings were produced.

Ranks and ties. A rank is the 0-based position of the true item in the list sorted by
decreasing similarity; recall@K is the percentage of queries whose rank is < K. Ties are broken
PESSIMISTICALLY: every wrong item whose score equals the true item's score is placed ahead of
it. So
  * TR (image -> text): rank_i = #{wrong captions c : sim[i, c] >= max over true captions of sim[i, .]}
  * IR (text -> image): rank_j = #{wrong images i : sim[i, j] >= sim[true image, j]}
A collapsed model that gives every pair the same score thus scores 0 (at K < n), not 100.
NaN scores are treated as -inf (lowest), so they never help the true item.
"""

from __future__ import annotations

import logging
import math
from typing import Sequence, Union

import numpy as np
import torch
from torch import Tensor

from ptmst_ray.vocab import METRICS

log = logging.getLogger(__name__)

KS: tuple[int, ...] = (1, 5, 10)
METRIC_NAMES = METRICS
"""The six recalls and r_mean (:data:`ptmst_ray.vocab.METRICS`)."""

# Elements of the n_images x n_captions matrix handled per chunk (bounds temporary memory).
_CHUNK_ELEMENTS = 1 << 24

ArrayLike = Union[Tensor, np.ndarray, Sequence]


def _as_tensors(sim: ArrayLike, txt2img: ArrayLike) -> tuple[Tensor, Tensor]:
    sim_t = torch.as_tensor(np.asarray(sim) if not isinstance(sim, Tensor) else sim).detach().cpu()
    if not sim_t.is_floating_point():
        sim_t = sim_t.to(torch.float64)
    t2i = torch.as_tensor(np.asarray(txt2img) if not isinstance(txt2img, Tensor) else txt2img).detach().cpu().long()
    if sim_t.dim() != 2:
        raise ValueError(f"sim must be n_images x n_captions, got shape {tuple(sim_t.shape)}")
    n_img, n_cap = sim_t.shape
    if t2i.shape != (n_cap,):
        raise ValueError(f"txt2img must have one entry per caption ({n_cap}), got shape {tuple(t2i.shape)}")
    if n_cap and (t2i.min() < 0 or t2i.max() >= n_img):
        raise ValueError(f"txt2img entries must be image indices in [0, {n_img}), got range [{t2i.min()}, {t2i.max()}]")
    if torch.isnan(sim_t).any():
        n_nan = int(torch.isnan(sim_t).sum())
        log.warning("similarity matrix has %d NaN entries; treating them as the lowest score", n_nan)
        sim_t = torch.nan_to_num(sim_t, nan=-math.inf)
    return sim_t, t2i


def text_retrieval_ranks(sim: Tensor, txt2img: Tensor) -> Tensor:
    """Per image, the pessimistic rank of its best-ranked true caption (long tensor, n_images)."""
    n_img, n_cap = sim.shape
    counts = torch.bincount(txt2img, minlength=n_img)
    if (counts == 0).any():
        missing = int((counts == 0).sum())
        raise ValueError(f"{missing} image(s) have no caption in txt2img; text retrieval needs at least one per image")
    ranks = torch.empty(n_img, dtype=torch.long)
    step = max(1, _CHUNK_ELEMENTS // max(n_cap, 1))
    cap_img = txt2img.unsqueeze(0)
    for start in range(0, n_img, step):  # chunks of rows, not one row at a time
        rows = sim[start : start + step]
        true = cap_img == torch.arange(start, start + rows.shape[0]).unsqueeze(1)
        best_true = torch.where(true, rows, torch.full_like(rows, -math.inf)).amax(dim=1, keepdim=True)
        ranks[start : start + rows.shape[0]] = ((rows >= best_true) & ~true).sum(dim=1)
    return ranks


def image_retrieval_ranks(sim: Tensor, txt2img: Tensor) -> Tensor:
    """Per caption, the pessimistic rank of its image among all images (long tensor, n_captions)."""
    n_img, n_cap = sim.shape
    ranks = torch.empty(n_cap, dtype=torch.long)
    step = max(1, _CHUNK_ELEMENTS // max(n_img, 1))
    for start in range(0, n_cap, step):
        cols = sim[:, start : start + step]
        idx = txt2img[start : start + cols.shape[1]]
        true_score = cols.gather(0, idx.unsqueeze(0))
        # the true image itself satisfies >=, so subtract it
        ranks[start : start + cols.shape[1]] = (cols >= true_score).sum(dim=0) - 1
    return ranks


def _recall(ranks: Tensor, k: int) -> float:
    if ranks.numel() == 0:
        return 0.0
    return 100.0 * float((ranks < k).double().mean())


def retrieval_metrics(sim: ArrayLike, txt2img: ArrayLike) -> dict[str, float]:
    """Recall@{1,5,10} in percent for both directions, and their mean.

    ``sim`` is n_images x n_captions (higher = more similar); ``txt2img[j]`` is the image of
    caption j. Returns floats under "IR@1", "IR@5", "IR@10" (text -> image), "TR@1", "TR@5",
    "TR@10" (image -> text) and "r_mean" (mean of the six). Ties count against the true item.
    """
    sim_t, t2i = _as_tensors(sim, txt2img)
    tr = text_retrieval_ranks(sim_t, t2i)
    ir = image_retrieval_ranks(sim_t, t2i)
    out: dict[str, float] = {}
    for k in KS:
        out[f"IR@{k}"] = _recall(ir, k)
    for k in KS:
        out[f"TR@{k}"] = _recall(tr, k)
    out["r_mean"] = sum(out[name] for name in METRIC_NAMES[:-1]) / 6.0
    return out
