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


def worker_device(device: "torch.device | str | None" = None) -> torch.device:
    """The device a stage computes on: ``device`` if given (a caller's explicit choice, e.g. a test's), else
    :func:`pick_device`. In a Ray worker that was given a GPU, Ray sets CUDA_VISIBLE_DEVICES to that GPU
    alone, so ``cuda:0`` is the GPU Ray gave it (never another task's): such a worker is a process of its own
    (an actor, a Train worker, or a task submitted through ``orchestration.runtime.Task``), since CUDA keeps
    the device a process first bound."""
    return torch.device(device) if device is not None else pick_device()


def pin(tensor: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``tensor`` in page-locked memory when it will be copied to a CUDA device (so ``.to(device,
    non_blocking=True)`` overlaps the copy with compute), else unchanged (pinning is pointless on the CPU)."""
    if device.type == "cuda" and tensor.device.type == "cpu" and not tensor.is_pinned():
        return tensor.pin_memory()
    return tensor


def set_threads(n: int) -> None:
    """Set torch intra-op threads (0 = leave as is); Ray workers should match their CPU share."""
    if n > 0:
        torch.set_num_threads(n)
        os.environ.setdefault("OMP_NUM_THREADS", str(n))


GPU_DECODE_THREADS = 3
"""Decoding threads a GPU worker uses at least (``data.decode_workers: 0``): NFNet-L0 trains ~720 images/s at 224 px
on an RTX 3090 (timm's published benchmark) and one CPU decodes and normalises ~300 PNG rows/s at that size
(bench/RESULTS.md "Train data path"), so fewer threads would starve the GPU."""


def decode_threads(decode_workers: int) -> int:
    """Threads that decode a streamed split's batches (``data.decode_workers``): the setting when above 0, else on a
    GPU worker its torch threads (the Ray layer sets them: ``runtime.worker_threads``, 2 on a real GPU by default) but
    at least :data:`GPU_DECODE_THREADS` (its CPUs have no model to run), else 1 (the CPUs train the model)."""
    if decode_workers > 0:
        return decode_workers
    return max(GPU_DECODE_THREADS, torch.get_num_threads()) if pick_device().type == "cuda" else 1
