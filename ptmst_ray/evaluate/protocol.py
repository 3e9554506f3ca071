"""The PTM evaluation protocol: fresh students per seed, trained on the phase subsets in order.

Why this file exists: docs/method.md#evaluation-protocol fixes how a distilled set is scored, and the
baselines (random coreset, full data) must be scored the same way for the comparison to mean
anything. This module turns "subsets + a student factory + a test split" into per-seed metrics
and their mean/std, both for the FINAL epoch and for the BEST of the evaluation points (the
paper's reporting, chosen on the test set). Plain PyTorch: the Ray layer runs
``evaluate_one_seed`` once per task and ``aggregate``s the results.

Evaluation points are taken during the LAST subset only (the model after all phases is the one
being scored); earlier subsets contribute their training-loss history.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import Any, Callable, Iterable, Optional, Sequence, Union

import torch
from torch import Tensor, nn

from ptmst_ray.config import EvalConfig
from ptmst_ray.evaluate.metrics import METRIC_NAMES
from ptmst_ray.evaluate.student import Images, Metrics, RetrievalData, evaluate_student, train_student

log = logging.getLogger(__name__)

DEFAULT_LR = 0.1
"""Student step size when neither a learned alpha nor ``EvalConfig.lr`` is given (the experts' lr)."""
DEFAULT_LOSS = "WBCE"


@dataclass
class Subset:
    """One phase's training pairs: images (float, CLIP-normalised; for the full-data baseline the train
    split's :class:`~ptmst_ray.data.dataset.ImageRows`, normalised per batch), text embeddings, soft target."""

    images: Images
    text_emb: Tensor
    similarity: Optional[Tensor] = None
    """n x n soft target; None = identity (real pairs)."""
    lr_img: Optional[float] = None
    """Learned image-encoder step size; None = ``EvalConfig.lr`` or 0.1."""
    lr_txt: Optional[float] = None
    """Learned projection-head step size; None = ``EvalConfig.lr`` or 0.1."""
    stream: Optional[Callable[[int, int], Iterable[tuple[Tensor, Tensor, Tensor]]]] = None
    """(seed, epoch) -> the epoch's (rows, images, text) minibatches of these pairs, streamed from the shards
    (a train split too large to hold, ``data.stream``); None = minibatches of a permutation of ``images``."""

    def __len__(self) -> int:
        return int(self.images.shape[0])


def _lr(learned: Optional[Union[float, Tensor]], cfg: EvalConfig) -> float:
    if learned is not None:
        return float(learned)
    return float(cfg.lr) if cfg.lr is not None else DEFAULT_LR


def _loss_name(loss: Optional[str], cfg: EvalConfig) -> str:
    return loss or cfg.loss or DEFAULT_LOSS


PHASE_TRAINING = ("sequential", "cumulative", "joint")


def arrange_subsets(subsets: Sequence[Subset], mode: str) -> list[Subset]:
    """The training stages a student goes through for the phase subsets under ``mode``.

    * ``sequential`` (docs/method.md#evaluation-protocol, the paper): each subset in phase order.
    * ``cumulative``: stage p trains on subsets 0..p together, in phase order.
    * ``joint``: one stage on all subsets together.
    Subsets trained together are concatenated with a block-diagonal soft target (pairs of different
    phases are negatives; a missing similarity is the identity) and the newest phase's step sizes.
    """
    if mode not in PHASE_TRAINING:
        raise ValueError(f"phase training mode {mode!r}: choose from {', '.join(PHASE_TRAINING)}")
    subsets = list(subsets)
    if mode == "sequential" or len(subsets) <= 1:
        return subsets
    if mode == "joint":
        return [_concat(subsets)]
    return [_concat(subsets[:p + 1]) for p in range(len(subsets))]


def _concat(subsets: Sequence[Subset]) -> Subset:
    if len(subsets) == 1:
        return subsets[0]
    if any(s.stream is not None for s in subsets):
        raise ValueError("a streamed subset (the full train split) cannot be trained together with others")
    blocks = [s.similarity if s.similarity is not None else torch.eye(len(s), dtype=s.images.dtype)
              for s in subsets]
    last = subsets[-1]
    return Subset(images=torch.cat([s.images for s in subsets]), text_emb=torch.cat([s.text_emb for s in subsets]),
                  similarity=torch.block_diag(*[b.to(subsets[0].images.dtype) for b in blocks]),
                  lr_img=last.lr_img, lr_txt=last.lr_txt)


def evaluate_one_seed(
    subsets: Sequence[Subset],
    student: nn.Module,
    test_set: RetrievalData,
    cfg: EvalConfig,
    loss: Optional[str] = None,
    *,
    seed: int = 0,
    epochs: Optional[int] = None,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
) -> dict[str, Any]:
    """Train ``student`` (fresh, built by the caller) on ``subsets`` in order and score it.

    Each subset trains for ``epochs`` (default ``cfg.epochs``) with its own step sizes and
    similarity; ``seed`` drives shuffling and dropout. Returns {"final": metrics at the last
    epoch, "best": metrics at the best-r_mean evaluation point, "best_epoch", "history": one entry
    per evaluation point and per-subset epoch losses, "diverged_at": (subset, epoch) or None}.
    """
    if not subsets:
        raise ValueError("evaluate_one_seed needs at least one subset")
    loss_name = _loss_name(loss, cfg)
    n_epochs = epochs if epochs is not None else cfg.epochs
    history: list[dict[str, Any]] = []
    result = None
    for p, subset in enumerate(subsets):
        last = p == len(subsets) - 1
        stream = subset.stream
        result = train_student(
            student, subset.images, subset.text_emb, subset.similarity,
            epochs=n_epochs, batch_size=cfg.batch_size,
            lr_img=_lr(subset.lr_img, cfg), lr_txt=_lr(subset.lr_txt, cfg),
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, loss=loss_name,
            seed=seed * 1000 + p,
            eval_fn=(lambda st: evaluate_student(st, test_set, cfg.batch_size)) if last else None,
            eval_points=cfg.eval_points,
            progress=(lambda r, p=p: progress({"subset": p, **r})) if progress is not None else None,
            epoch_batches=(lambda e, s=seed * 1000 + p: stream(s, e)) if stream is not None else None,
        )
        history.append({"subset": p, "epoch_losses": result.epoch_losses, "points": result.history})
        if result.diverged_at is not None:
            log.warning("seed %d: training diverged on subset %d at epoch %d", seed, p, result.diverged_at)
            if not last:
                # score the last good state so the run still yields numbers, and say so
                final = evaluate_student(student, test_set, cfg.batch_size)
                return {"final": final, "best": final, "best_epoch": None, "history": history,
                        "diverged_at": (p, result.diverged_at)}
            return {"final": result.final, "best": result.best, "best_epoch": result.best_epoch,
                    "history": history, "diverged_at": (p, result.diverged_at)}
    assert result is not None
    return {"final": result.final, "best": result.best, "best_epoch": result.best_epoch,
            "history": history, "diverged_at": None}


def aggregate(runs: Iterable[Metrics]) -> dict[str, dict[str, float]]:
    """Mean and population std (ddof=0, as numpy's default) over runs, for every metric name."""
    runs = list(runs)
    if not runs:
        raise ValueError("aggregate needs at least one metrics dict")
    names = [n for n in METRIC_NAMES if all(n in r for r in runs)]
    out: dict[str, dict[str, float]] = {}
    for name in names:
        values = [float(r[name]) for r in runs]
        mean = sum(values) / len(values)
        std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
        out[name] = {"mean": mean, "std": std}
    return out


def random_coreset(
    n_train_rows: int,
    pairs: int,
    seed: int,
    row_image: Optional[Union[Sequence[int], Tensor]] = None,
) -> Tensor:
    """Sorted row indices of a random subset of ``pairs`` train rows.

    With ``row_image`` (the image id of each train row; the train split has one row per
    caption) the subset uses distinct images where possible: ``pairs`` distinct images with one
    random caption each; if ``pairs`` exceeds the number of images, every image once and then
    random further rows. Without it, rows are sampled uniformly without replacement.
    """
    if not 1 <= pairs <= n_train_rows:
        raise ValueError(f"pairs must be in [1, {n_train_rows}] (train rows), got {pairs}")
    gen = torch.Generator().manual_seed(seed)
    if row_image is None:
        return torch.randperm(n_train_rows, generator=gen)[:pairs].sort().values
    img = torch.as_tensor(row_image, dtype=torch.long)
    if img.shape != (n_train_rows,):
        raise ValueError(f"row_image must have one entry per train row ({n_train_rows}), got {tuple(img.shape)}")
    # a random order of rows; the first row of each image in that order is its random caption
    order = torch.randperm(n_train_rows, generator=gen)
    vals, pos = torch.sort(img[order], stable=True)
    starts = torch.ones(n_train_rows, dtype=torch.bool)
    starts[1:] = vals[1:] != vals[:-1]
    first = torch.zeros(n_train_rows, dtype=torch.bool)
    first[pos[starts]] = True
    primary, rest = order[first], order[~first]
    chosen = torch.cat([primary, rest])[:pairs] if pairs > len(primary) else primary[:pairs]
    return chosen.sort().values


def coreset_subset(images: Images, text_emb: Tensor, indices: Tensor) -> Subset:
    """A real-pair subset (identity target, default step sizes) from row indices."""
    return Subset(images=images[indices], text_emb=text_emb[indices])
