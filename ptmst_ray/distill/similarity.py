"""Learned similarity generators: the soft targets of the synthetic image-text pairs.

Why this file exists: LoRS-style distillation learns, next to the synthetic pairs, an n x n
target similarity S that the contrastive loss uses instead of the identity. A minibatch B of
synthetic pairs only ever needs S[B][:, B], so each generator materialises just that block
(docs/method.md#similarity):

* :class:`FullSimilarity`: S is a free n x n parameter, initialised to the identity.
* :class:`LowRankSimilarity`: S = diag(w) + (alpha / r) L R^T with w = 1, L ~ N(0, 1) (seeded),
  R = 0 at init; a minibatch uses w[B], L[B], R[B], so its cost is O(b^2 r), not O(n^2).
"""

from __future__ import annotations

import torch
from torch import nn

from ptmst_ray.config import SimilarityConfig

__all__ = ["FullSimilarity", "LowRankSimilarity", "build_similarity", "similarity_from_state"]


class FullSimilarity(nn.Module):
    """A free n x n similarity matrix (init identity)."""

    kind = "full"

    def __init__(self, n: int, dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if n < 1:
            raise ValueError(f"FullSimilarity needs n >= 1 synthetic pairs, got {n}")
        self.n = n
        self.sim = nn.Parameter(torch.eye(n, dtype=dtype, device=device))

    def matrix(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """S (n x n), or the block S[B][:, B] (b x b) for the pairs ``indices``."""
        if indices is None:
            return self.sim
        return self.sim[indices[:, None], indices[None, :]]

    def extra_repr(self) -> str:
        return f"n={self.n}"


class LowRankSimilarity(nn.Module):
    """S = diag(w) + (alpha / r) L R^T (init w = 1, L ~ N(0, 1) seeded, R = 0)."""

    kind = "lowrank"

    def __init__(self, n: int, rank: int, alpha: float = 1.0, generator: torch.Generator | None = None,
                 dtype: torch.dtype | None = None, device: torch.device | None = None):
        super().__init__()
        if n < 1 or rank < 1:
            raise ValueError(f"LowRankSimilarity needs n >= 1 and rank >= 1, got n={n}, rank={rank}")
        self.n, self.rank, self.alpha = n, rank, float(alpha)
        dtype = dtype or torch.get_default_dtype()
        left = torch.randn(n, rank, generator=generator, dtype=dtype)  # generator lives on the CPU
        self.diag = nn.Parameter(torch.ones(n, dtype=dtype, device=device))
        self.left = nn.Parameter(left.to(device) if device is not None else left)
        self.right = nn.Parameter(torch.zeros(n, rank, dtype=dtype, device=device))

    @property
    def scale(self) -> float:
        return self.alpha / self.rank

    def matrix(self, indices: torch.Tensor | None = None) -> torch.Tensor:
        """S (n x n), or S[B][:, B] built from w[B], L[B], R[B] only."""
        if indices is None:
            diag, left, right = self.diag, self.left, self.right
        else:
            diag, left, right = self.diag[indices], self.left[indices], self.right[indices]
        return torch.diag(diag) + self.scale * (left @ right.T)

    def extra_repr(self) -> str:
        return f"n={self.n}, rank={self.rank}, alpha={self.alpha}"


Similarity = FullSimilarity | LowRankSimilarity


def build_similarity(cfg: SimilarityConfig, n: int, generator: torch.Generator | None = None,
                     dtype: torch.dtype | None = None, device: torch.device | None = None) -> Similarity:
    """The generator named by ``cfg.kind`` for ``n`` synthetic pairs (``generator`` seeds L)."""
    if cfg.kind == "full":
        return FullSimilarity(n, dtype=dtype, device=device)
    if cfg.kind == "lowrank":
        return LowRankSimilarity(n, cfg.rank, cfg.alpha, generator=generator, dtype=dtype, device=device)
    raise ValueError(f"unknown similarity kind {cfg.kind!r}; use 'full' or 'lowrank'")


def similarity_from_state(cfg: SimilarityConfig, n: int, state: dict[str, torch.Tensor]) -> Similarity:
    """A generator holding the parameters ``state`` (a similarity ``state_dict``), e.g. an EMA copy."""
    first = next(iter(state.values()))
    sim = build_similarity(cfg, n, dtype=first.dtype, device=first.device)
    sim.load_state_dict(state)
    return sim
