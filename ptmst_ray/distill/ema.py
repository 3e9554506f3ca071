"""Exponential moving average of named tensors (the synthetic set's saved and evaluated copy).

Why this file exists: the synthetic data moves with large learning rates and noisy matching
gradients; PTM-ST saves and evaluates the EMA (decay 0.99) of the images, texts, similarity
parameters and step sizes instead of the raw state (docs/method.md#update-ema-and-divergence). The recurrence is
e_0 = x_0, e_t = d e_{t-1} + (1 - d) x_t; decay 0 means a plain copy (the EMA ablation).
"""

from __future__ import annotations

from typing import Mapping

import torch

__all__ = ["EMA"]


class EMA:
    """EMA of a fixed set of named tensors (e.g. ``module.named_parameters()``), initialised to a copy."""

    def __init__(self, tensors: Mapping[str, torch.Tensor], decay: float):
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"EMA decay must be in [0, 1), got {decay}")
        self.decay = float(decay)
        self.shadow: dict[str, torch.Tensor] = {k: v.detach().clone() for k, v in tensors.items()}

    @torch.no_grad()
    def update(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """e <- d e + (1 - d) x for every name (the names must match the initial ones)."""
        if set(tensors) != set(self.shadow):
            raise KeyError(f"EMA tracks {sorted(self.shadow)}, got {sorted(tensors)}")
        for name, x in tensors.items():
            e = self.shadow[name]
            if self.decay == 0.0:
                e.copy_(x.detach())
            else:
                e.mul_(self.decay).add_(x.detach(), alpha=1.0 - self.decay)

    def state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the averaged tensors."""
        return {k: v.clone() for k, v in self.shadow.items()}

    def is_finite(self) -> bool:
        return all(bool(torch.isfinite(v).all()) for v in self.shadow.values())

    def state_dict(self) -> dict:
        return {"decay": self.decay, "shadow": self.state()}

    def load_state_dict(self, state: Mapping) -> None:
        shadow = state["shadow"]
        if set(shadow) != set(self.shadow):
            raise KeyError(f"EMA checkpoint has {sorted(shadow)}, this EMA tracks {sorted(self.shadow)}")
        self.decay = float(state["decay"])
        for name, value in shadow.items():
            self.shadow[name].copy_(value)
