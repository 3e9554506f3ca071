"""Pretraining the tiny towers CLIP-style, so the laptop pipeline starts from pretrained encoders.

Why this file exists: the paper's experts and students fine-tune a PRETRAINED image encoder over
a PRETRAINED frozen text encoder. Nothing can be downloaded here, so the built-in default makes
its own: both towers are trained with the CLIP loss on a pretraining split that is disjoint from
the distillation train split and from the test split, and saved as a checkpoint that the same
loading path as real pretrained weights reads (``model.pretrained`` = a safetensors file).
"""

from __future__ import annotations

import dataclasses
import logging
import math
from typing import Callable, Iterable, Optional

import torch
import torch.nn.functional as F
from safetensors.torch import save as st_save

from ptmst_ray import storage
from ptmst_ray.config import ModelConfig, PretrainConfig
from ptmst_ray.device import pick_device
from ptmst_ray.models.openclip import open_clip
from ptmst_ray.models.towers import build_clip

log = logging.getLogger(__name__)


def clip_loss(image_features: torch.Tensor, text_features: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    logits = logit_scale * F.normalize(image_features, dim=-1) @ F.normalize(text_features, dim=-1).T
    labels = torch.arange(logits.shape[0], device=logits.device)
    return 0.5 * (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels))


EpochBatches = Callable[[int], Iterable[tuple[torch.Tensor, torch.Tensor]]]
"""epoch (1-based) -> that epoch's (caption rows, their images) minibatches, e.g. streamed from the shards."""


def pretrain_clip(model_cfg: ModelConfig, cfg: PretrainConfig, images: Optional[torch.Tensor], captions: list[str],
                  on_epoch: Callable[[int, dict], None] | None = None,
                  device: torch.device | None = None,
                  epoch_batches: Optional[EpochBatches] = None, label: str = "pretrain") -> dict[str, torch.Tensor]:
    """Train both towers of ``model_cfg.name`` from scratch on (images, captions); return the state dict.

    ``images`` are float, CLIP-normalised, one row per caption (``captions[i]`` describes ``images[i]``): a
    tensor or any rows object (``ptmst_ray.data.dataset.ImageRows``) whose ``[idx]`` gives such a batch.
    With ``epoch_batches`` (then ``images`` may be None) each epoch trains on its (rows, images) batches
    instead of a permutation; they should be full batches, ``len(captions) // batch_size`` an epoch, which
    the learning-rate schedule assumes. Each epoch's loss is logged as ``label`` (which run of the stage).
    """
    device = device or pick_device()
    bare = dataclasses.replace(model_cfg, pretrained=None, image_pretrained=None, text_pretrained=None)
    model = build_clip(bare, seed=cfg.seed).to(device).train()
    tokens = open_clip.get_tokenizer(model_cfg.name)(captions)
    full_embedding = _train_used_rows_only(model, tokens)
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    n = len(captions)
    if images is not None and images.shape[0] != n:
        raise ValueError(f"{images.shape[0]} images but {n} captions; they must pair up (one image row per caption)")
    steps_per_epoch = max(1, n // cfg.batch_size)
    total = cfg.epochs * steps_per_epoch
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 0.5 * (1 + math.cos(math.pi * min(s, total) / total)))
    gen = torch.Generator().manual_seed(cfg.seed)
    unused_rows_kept = 1.0  # what AdamW's decoupled weight decay leaves of a row no caption uses
    for epoch in range(cfg.epochs):
        batches = epoch_batches(epoch + 1) if epoch_batches is not None else _permuted(images, n, steps_per_epoch,
                                                                                         cfg.batch_size, gen)
        losses = []
        for idx, batch in batches:
            img_f, txt_f, scale = model(batch.to(device), tokens[idx].to(device))[:3]
            loss = clip_loss(img_f, txt_f, scale)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            unused_rows_kept *= 1 - opt.param_groups[0]["lr"] * cfg.weight_decay
            opt.step()
            sched.step()
            with torch.no_grad():
                model.logit_scale.clamp_(0, math.log(100))
            losses.append(loss.item())
        if on_epoch:
            on_epoch(epoch + 1, {"loss": sum(losses) / len(losses)})
        log.info("%s epoch %d/%d: loss %.4f", label, epoch + 1, cfg.epochs, sum(losses) / len(losses))
    if full_embedding is not None:
        _put_back(model, full_embedding, unused_rows_kept)
    return {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}


class _UsedRows(torch.nn.Module):
    """The rows of a token embedding that the captions use, trained in its place; token ids stay as they are.

    Why: the tiny text tower has open_clip's 49,408-token vocabulary and the built-in captions use a few dozen
    tokens. Trained whole, AdamW updates all 3.2M embedding values every step (13% of a pretraining step on the
    toy: bench/RESULTS.md); every other row's gradient is zero, so AdamW only decays it. Training the used rows
    and decaying the others once at the end (:func:`_put_back`) gives the same weights."""

    def __init__(self, full: torch.nn.Embedding, rows: torch.Tensor):
        super().__init__()
        self.rows = rows  # a plain attribute: the full embedding is neither a parameter nor a submodule here
        self.weight = torch.nn.Parameter(full.weight.detach()[rows].clone())
        lookup = torch.full((full.num_embeddings,), -1, dtype=torch.long, device=rows.device)
        lookup[rows] = torch.arange(len(rows), device=rows.device)
        self.register_buffer("lookup", lookup, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(self.lookup[ids], self.weight)


def _train_used_rows_only(model: torch.nn.Module, tokens: torch.Tensor) -> torch.nn.Embedding | None:
    """Swap an open_clip text tower's token embedding for :class:`_UsedRows` of ``tokens``; returns the full
    embedding (None: the model has no such tower)."""
    full = getattr(model, "token_embedding", None)
    if not isinstance(full, torch.nn.Embedding):
        return None
    model.token_embedding = _UsedRows(full, torch.unique(tokens).to(full.weight.device))
    return full


def _put_back(model: torch.nn.Module, full: torch.nn.Embedding, unused_kept: float) -> None:
    """The full embedding back in ``model``: the trained rows, every other row times ``unused_kept``."""
    used: _UsedRows = model.token_embedding
    with torch.no_grad():
        full.weight.mul_(unused_kept)
        full.weight[used.rows] = used.weight
    model.token_embedding = full


def _permuted(images, n: int, steps: int, batch_size: int, gen: torch.Generator):
    """(rows, images) of ``steps`` full minibatches of a random permutation of the n rows."""
    perm = torch.randperm(n, generator=gen)
    for b in range(steps):
        idx = perm[b * batch_size:(b + 1) * batch_size]
        yield idx, images[idx]


def save_checkpoint(url: str, state: dict[str, torch.Tensor]) -> str:
    """Write a CLIP state dict as safetensors (atomically); returns its sha256."""
    blob = st_save(state)
    storage.write_bytes(url, blob)
    return storage.hash_bytes(blob)
