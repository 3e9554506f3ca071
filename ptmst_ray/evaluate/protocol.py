"""The PTM evaluation protocol: fresh students per seed, trained on the phase subsets in order.

Why this file exists: docs/method.md#evaluation-protocol fixes how a distilled set is scored, and the
baselines (random coreset, full data) must be scored the same way for the comparison to mean
anything. This module turns "subsets + a student factory + a test split" into per-seed metrics
and their mean/std, both for the FINAL epoch and for the BEST of the evaluation points. The best point
is chosen on the val split when the data has one (the honest figure: the test split never chooses
anything) and reported with its TEST metrics, beside the best point chosen on test (the paper's
reporting, optimistic); without a val split both are the best-on-test point, as in the paper. Plain
PyTorch: the Ray layer runs ``evaluate_one_seed`` once per task and ``aggregate``s the results.

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
from ptmst_ray.evaluate.student import (
    EarlyStop, Images, Metrics, RetrievalData, evaluate_student, first_best, train_student,
)

log = logging.getLogger(__name__)

DEFAULT_LR = 0.1
"""Student step size when neither a learned alpha nor ``EvalConfig.lr`` is given (the experts' lr)."""
DEFAULT_LOSS = "WBCE"
VAL_PREFIX = "val/"
"""Evaluation points carry the val split's metrics under this prefix, beside the test metrics."""
SELECTION_VAL, SELECTION_TEST = "val", "test"
"""Which split chose a run's best evaluation point (results.json ``selection``)."""


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
    val_set: Optional[RetrievalData] = None,
    eval_at: Optional[Sequence[int]] = None,
    early_stop: Optional[int] = None,
) -> dict[str, Any]:
    """Train ``student`` (fresh, built by the caller) on ``subsets`` in order and score it.

    Each subset trains for ``epochs`` (default ``cfg.epochs``) with its own step sizes and
    similarity; ``seed`` drives shuffling and dropout. At each evaluation point of the last subset
    (``cfg.eval_points`` evenly spaced, or the epochs ``eval_at``) the student is scored on the test
    split and, given ``val_set``, on the val split too. ``early_stop`` (patience in evaluation points;
    needs ``val_set``) trains the last subset until val r_mean stops improving (:class:`EarlyStop`),
    ``epochs`` being then the most it trains. Returns {"final": test metrics at the last point, "best":
    test metrics at the point of the best val r_mean (without ``val_set``: of the best test r_mean),
    "best_epoch", "best_on_test" / "best_on_test_epoch" (the point of the best test r_mean, the paper's
    figure), "selection" ("val" or "test"), "best_val" (val metrics at the chosen point, or None),
    "history": one entry per evaluation point and per-subset epoch losses, "epochs_run" (of the last
    subset), "diverged_at": (subset, epoch) or None}.
    """
    if not subsets:
        raise ValueError("evaluate_one_seed needs at least one subset")
    if early_stop is not None and val_set is None:
        raise ValueError("early stopping needs a val split: it stops when val recall stops improving, and the "
                         "test split must not choose anything")
    loss_name = _loss_name(loss, cfg)
    n_epochs = epochs if epochs is not None else cfg.epochs
    history: list[dict[str, Any]] = []
    result = None

    def score(st: nn.Module) -> Metrics:
        metrics = evaluate_student(st, test_set, cfg.batch_size)
        if val_set is not None:
            metrics.update({VAL_PREFIX + k: v for k, v in evaluate_student(st, val_set, cfg.batch_size).items()})
        return metrics

    for p, subset in enumerate(subsets):
        last = p == len(subsets) - 1
        stream = subset.stream
        result = train_student(
            student, subset.images, subset.text_emb, subset.similarity,
            epochs=n_epochs, batch_size=cfg.batch_size,
            lr_img=_lr(subset.lr_img, cfg), lr_txt=_lr(subset.lr_txt, cfg),
            momentum=cfg.momentum, weight_decay=cfg.weight_decay, loss=loss_name,
            seed=seed * 1000 + p,
            eval_fn=score if last else None,
            eval_points=cfg.eval_points,
            progress=(lambda r, p=p: progress({"subset": p, **r})) if progress is not None else None,
            epoch_batches=(lambda e, s=seed * 1000 + p: stream(s, e)) if stream is not None else None,
            eval_at=eval_at if last else None,
            early_stop=EarlyStop(early_stop, VAL_PREFIX + "r_mean") if last and early_stop is not None else None,
        )
        history.append({"subset": p, "epoch_losses": result.epoch_losses, "points": result.history})
        if result.diverged_at is not None:
            log.warning("seed %d: training diverged on subset %d at epoch %d", seed, p, result.diverged_at)
            if not last:
                # score the last good state so the run still yields numbers, and say so
                final = score(student)
                test, val = split_metrics(final)
                return {"final": test, "best": test, "best_epoch": None, "best_on_test": test,
                        "best_on_test_epoch": None, "selection": SELECTION_VAL if val else SELECTION_TEST,
                        "best_val": val, "history": history, "epochs_run": result.epochs_run,
                        "diverged_at": (p, result.diverged_at)}
            break
    assert result is not None
    out = select_points(result.history, use_val=val_set is not None)
    return {**out, "history": history, "epochs_run": result.epochs_run,
            "diverged_at": (len(subsets) - 1, result.diverged_at) if result.diverged_at is not None else None}


def split_metrics(metrics: Metrics) -> tuple[Metrics, Optional[Metrics]]:
    """(the test metrics, the val metrics or None) of one evaluation point's metrics."""
    test = {k: v for k, v in metrics.items() if not k.startswith(VAL_PREFIX) and k not in ("epoch", "loss")}
    val = {k[len(VAL_PREFIX):]: v for k, v in metrics.items() if k.startswith(VAL_PREFIX)}
    return test, (val or None)


def select_points(points: Sequence[dict[str, Any]], use_val: bool) -> dict[str, Any]:
    """The chosen evaluation points of one run's history (entries {"epoch", "loss", test metrics, val metrics
    under ``val/``}): "best" = the test metrics at the first point of the highest val r_mean (``use_val``) or
    test r_mean; "best_on_test" = those of the highest test r_mean; "final" = the last point's; with their
    epochs, the val metrics at the chosen point ("best_val") and which split chose it ("selection")."""
    if not points:
        raise ValueError("no evaluation points to choose from")
    on_test = first_best([float(p["r_mean"]) for p in points])
    chosen = first_best([float(p[VAL_PREFIX + "r_mean"]) for p in points]) if use_val else on_test
    best, best_val = split_metrics(points[chosen])
    return {"final": split_metrics(points[-1])[0], "best": best, "best_epoch": points[chosen]["epoch"],
            "best_on_test": split_metrics(points[on_test])[0], "best_on_test_epoch": points[on_test]["epoch"],
            "selection": SELECTION_VAL if use_val else SELECTION_TEST, "best_val": best_val}


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


def per_seed_difference(a: dict[int, float], b: dict[int, float]) -> Optional[dict[str, float]]:
    """Method a against method b seed by seed ({seed: score} each): evaluation seed s trains every method's
    student from the same initialisation, so a - b per seed leaves out the spread that the initialisation causes
    in both. {"seeds" (scored by both), "ahead" (seeds where a scored higher), "mean" and "std" (population, as
    :func:`aggregate`) of the differences}; None when no seed was scored by both."""
    diffs = [a[s] - b[s] for s in sorted(a.keys() & b.keys())]
    if not diffs:
        return None
    mean = sum(diffs) / len(diffs)
    return {"seeds": len(diffs), "ahead": sum(d > 0 for d in diffs), "mean": mean,
            "std": math.sqrt(sum((d - mean) ** 2 for d in diffs) / len(diffs))}


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
