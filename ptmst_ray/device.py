"""The one place that chooses a torch device (cuda, then mps, then cpu)."""

from __future__ import annotations

import os

import torch


def pick_device() -> torch.device:
    """cuda if torch sees a GPU, else mps (Apple), else cpu. Ray's logical GPUs without CUDA fall back to cpu."""
    if torch.cuda.is_available():
        return torch.device("cuda", 0)
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        return torch.device("mps")
    return torch.device("cpu")


def set_threads(n: int) -> None:
    """Set torch intra-op threads (0 = leave as is); Ray workers should match their CPU share."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))
