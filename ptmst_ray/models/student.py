"""The trainable student: the image tower plus the text projection head, scored by cosine logits.

Why this file exists: experts, distillation and evaluation all train the same model:
f_phi (the whole image encoder, docs/method.md#data-and-models, "image_trainable") and h_psi (the projection
head over frozen caption embeddings), with logits L_ij = s <f(x_i)/|f(x_i)|, h(t_j)/|h(t_j)|>.
"""

from __future__ import annotations

import hashlib

import torch
import torch.nn.functional as F
from torch import nn

from ptmst_ray.config import ModelConfig
from ptmst_ray.models.towers import ModelError, build_image_tower


class ProjectionHead(nn.Module):
    """Linear -> GELU -> Linear -> Dropout -> residual -> LayerNorm (the paper's code)."""

    def __init__(self, in_dim: int, out_dim: int, dropout: float = 0.0):
        super().__init__()
        self.projection = nn.Linear(in_dim, out_dim)
        self.gelu = nn.GELU()
        self.fc = nn.Linear(out_dim, out_dim)
        self.dropout = nn.Dropout(dropout)
        self.layer_norm = nn.LayerNorm(out_dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projected = self.projection(x)
        x = self.dropout(self.fc(self.gelu(projected)))
        return self.layer_norm(x + projected)


class ProjectedTower(nn.Module):
    """An image tower followed by a linear projection of its features (``model.image_proj_dim``).

    With ``image_trainable: false`` only the tower freezes; the projection trains (the CC3M recipes:
    a frozen encoder, a 2048-d projection).
    """

    def __init__(self, tower: nn.Module, proj: nn.Linear):
        super().__init__()
        self.tower = tower
        self.proj = proj

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.proj(self.tower(images))


class Student(nn.Module):
    def __init__(self, image: nn.Module, head: ProjectionHead, temperature: float, image_trainable: bool = True):
        super().__init__()
        self.image = image
        self.head = head
        self.scale = 1.0 / temperature
        self.image_trainable = image_trainable
        if not image_trainable:
            for p in self.frozen_tower().parameters():
                p.requires_grad_(False)

    def frozen_tower(self) -> nn.Module:
        """The image module whose weights never change (``image_trainable: false``): the tower before the
        projection, or the whole image encoder; an empty module once :func:`drop_frozen_tower` removed it."""
        if self.image_trainable:
            raise ValueError("the image tower is trainable (model.image_trainable: true); nothing is frozen")
        return self.image.tower if isinstance(self.image, ProjectedTower) else self.image

    def train(self, mode: bool = True) -> "Student":
        """Train mode for everything but a frozen tower, which stays in eval mode: frozen means its forward is
        one fixed function (no batch statistics, dropout or stochastic depth), the one its cached features
        (``model.cache_frozen_features``) were computed with."""
        super().train(mode)
        if not self.image_trainable:
            self.frozen_tower().eval()
        return self

    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.image(images), dim=-1)

    def encode_text(self, text_emb: torch.Tensor) -> torch.Tensor:
        return F.normalize(self.head(text_emb), dim=-1)

    def forward(self, images: torch.Tensor, text_emb: torch.Tensor) -> torch.Tensor:
        return self.scale * self.encode_image(images) @ self.encode_text(text_emb).T

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached CPU copies of the trainable parameters: one trajectory snapshot."""
        return {n: p.detach().cpu().clone() for n, p in self.named_parameters() if p.requires_grad}


def drop_frozen_tower(student: Student) -> nn.Module:
    """Remove ``student``'s frozen tower (replaced by the identity) and return it: the student then takes the
    tower's features where it took images. The trainable parameters, their names and values are unchanged, so
    its trajectory snapshots are those of the whole student."""
    tower = student.frozen_tower()
    if isinstance(student.image, ProjectedTower):
        student.image.tower = nn.Identity()
    else:
        student.image = nn.Identity()
    return tower


def tower_digest(tower: nn.Module) -> str:
    """sha256 of a module's weights and buffers (names, dtypes, shapes, bytes): what its outputs depend on
    besides its architecture."""
    h = hashlib.sha256()
    for name, t in sorted(tower.state_dict().items()):
        t = t.detach().cpu().contiguous()
        h.update(f"{name}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def embed_dim_of(image_tower: nn.Module, image_size: int) -> int:
    out_dim = getattr(image_tower, "output_dim", None)
    if out_dim is not None:
        return int(out_dim)
    with torch.no_grad():
        return int(image_tower(torch.zeros(1, 3, image_size, image_size)).shape[-1])


def build_student(cfg: ModelConfig, text_dim: int, seed: int) -> Student:
    """Image tower from its pretrained weights (random parts drawn from ``seed``) + a head seeded by ``seed``."""
    image = build_image_tower(cfg, seed=seed)
    size = getattr(image, "image_size", 224)
    size = int(size[0] if isinstance(size, (tuple, list)) else size)
    out_dim = embed_dim_of(image, size)
    if cfg.image_proj_dim is not None:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + 104729)  # independent of the tower's and the head's draws
            image = ProjectedTower(image, nn.Linear(out_dim, cfg.image_proj_dim, bias=False))
        out_dim = cfg.image_proj_dim
    if cfg.head_dim is not None and cfg.head_dim != out_dim:
        raise ModelError(f"model.head_dim {cfg.head_dim} differs from the image embedding size {out_dim} "
                         f"({cfg.name}); the logits compare the two, so leave head_dim unset or set it to {out_dim}")
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed + 7919)  # head init is independent of the image tower's random draws
        head = ProjectionHead(text_dim, out_dim, cfg.head_dropout)
    return Student(image, head, cfg.temperature, cfg.image_trainable)
