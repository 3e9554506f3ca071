"""The student as a function of flat parameter vectors, so trajectory snapshots plug in directly.

Why this file exists: trajectory matching differentiates the student's updates with respect to
the synthetic data, twice. Holding the image-encoder and projection-head parameters as one flat
vector each (with names, shapes and order recorded) lets a snapshot be swapped in, stepped with
vector arithmetic and mapped back to named tensors at any time.
"""

from __future__ import annotations

import contextlib
import functools
from dataclasses import dataclass
from typing import Iterable, Mapping

import torch
from torch import nn
from torch.func import functional_call

IMAGE_PREFIX = "image."
TEXT_PREFIX = "head."


@dataclass(frozen=True)
class ParamSpec:
    """Names, shapes and order of a group of parameters laid out in one flat vector."""

    names: tuple[str, ...]
    shapes: tuple[tuple[int, ...], ...]

    @classmethod
    def from_named(cls, named: Iterable[tuple[str, torch.Tensor]]) -> "ParamSpec":
        named = list(named)
        return cls(tuple(n for n, _ in named), tuple(tuple(t.shape) for _, t in named))

    @functools.cached_property
    def numels(self) -> tuple[int, ...]:
        return tuple(int(torch.Size(s).numel()) for s in self.shapes)

    @functools.cached_property
    def numel(self) -> int:
        return sum(self.numels)

    def flatten(self, tensors: Mapping[str, torch.Tensor]) -> torch.Tensor:
        """One 1-D vector from named tensors, in spec order."""
        missing = [n for n in self.names if n not in tensors]
        if missing:
            raise KeyError(f"snapshot lacks parameters {missing[:3]} (and {max(0, len(missing) - 3)} more)")
        if not self.names:
            return torch.zeros(0)
        return torch.cat([tensors[n].reshape(-1) for n in self.names])

    def unflatten(self, flat: torch.Tensor) -> dict[str, torch.Tensor]:
        """Named views into ``flat``."""
        if flat.numel() != self.numel:
            raise ValueError(f"flat vector has {flat.numel()} values, the spec needs {self.numel}")
        # One split, not a slice per tensor: the backward of a slice writes its gradient into a
        # full-size zero vector, once per tensor (a quarter of a profiled matching step; 5% of its time);
        # the backward of a split concatenates the pieces once.
        pieces = torch.split(flat, self.numels)
        return {name: piece.view(shape) for name, shape, piece in zip(self.names, self.shapes, pieces)}


@contextlib.contextmanager
def seeded(seed: int | None, device: torch.device):
    """Deterministic random draws (dropout masks) inside the block when ``seed`` is given."""
    if seed is None:
        yield
        return
    if device.type == "cpu":
        # What fork_rng + torch.manual_seed do for the CPU generator, without their cost: torch.manual_seed
        # also queues a lazy seed for every CUDA device with a formatted stack trace (0.15 ms, once per
        # student forward, on a machine without CUDA).
        generator = torch.default_generator
        state = generator.get_state()
        generator.manual_seed(seed)
        try:
            yield
        finally:
            generator.set_state(state)
        return
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


class FunctionalStudent:
    """Functional view of a :class:`~ptmst_ray.models.student.Student`."""

    def __init__(self, student: nn.Module):
        self.student = student
        trainable = [(n, p) for n, p in student.named_parameters() if p.requires_grad]
        self.img_spec = ParamSpec.from_named((n, p) for n, p in trainable if n.startswith(IMAGE_PREFIX))
        self.txt_spec = ParamSpec.from_named((n, p) for n, p in trainable if n.startswith(TEXT_PREFIX))
        other = [n for n, _ in trainable if not n.startswith((IMAGE_PREFIX, TEXT_PREFIX))]
        if other:
            raise ValueError(f"trainable parameters outside image./head.: {other[:3]}")
        self.frozen = {n: p.detach() for n, p in student.named_parameters() if not p.requires_grad}
        # functional_call unties shared tensors on every call (half its cost); needed only if the module
        # holds one tensor under two names, which named_parameters/named_buffers then list once.
        named = [*student.named_parameters(remove_duplicate=False), *student.named_buffers(remove_duplicate=False)]
        self._tied = len({id(t) for _, t in named}) < len(named)

    @property
    def device(self) -> torch.device:
        return next(self.student.parameters()).device

    def params(self) -> tuple[torch.Tensor, torch.Tensor]:
        named = dict(self.student.named_parameters())
        return (self.img_spec.flatten(named).detach().clone(), self.txt_spec.flatten(named).detach().clone())

    def split_snapshot(self, snapshot: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        return self.img_spec.flatten(snapshot), self.txt_spec.flatten(snapshot)

    def join(self, w_img: torch.Tensor, w_txt: torch.Tensor) -> dict[str, torch.Tensor]:
        return {**self.img_spec.unflatten(w_img), **self.txt_spec.unflatten(w_txt)}

    def logits(self, w_img: torch.Tensor, w_txt: torch.Tensor, images: torch.Tensor, text_emb: torch.Tensor,
               seed: int | None = None) -> torch.Tensor:
        params = {**self.frozen, **self.join(w_img, w_txt)}
        with seeded(seed, images.device):
            return functional_call(self.student, params, (images, text_emb), tie_weights=self._tied)

    @torch.no_grad()
    def load_(self, w_img: torch.Tensor, w_txt: torch.Tensor) -> None:
        named = dict(self.student.named_parameters())
        for name, value in self.join(w_img, w_txt).items():
            named[name].copy_(value)
