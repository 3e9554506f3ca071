"""Train a fresh student on a set of image-text pairs and score it by retrieval.

Why this file exists: a distilled set (or a baseline subset of real pairs) is only as good as a
student trained on it (docs/method.md#evaluation-protocol). This module holds that one training loop:
minibatch SGD with momentum and weight decay on the pairs, the subset's similarity matrix as
soft target, separate step sizes for the image encoder and the text projection head (the
learned alphas of distillation), a x0.1 step decay, and evaluations at evenly spaced epochs.
It is plain PyTorch; the Ray layer calls it once per seed.

Epochs are numbered 1..E. Epoch e runs at lr * 0.1 when e >= E // 2 + 1 (so E=100: epochs
1-50 at lr, 51-100 at lr/10). The paper's code (MTT/LoRS ``evaluate_synset``) loops over
ep = 0..E, decays after ep = E//2+1 and rebuilds the optimiser (dropping momentum); here the
schedule is exactly E epochs and the momentum buffer is kept across the decay.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Iterator, Optional, Protocol, Sequence, Union

import torch
from torch import Tensor, nn

from ptmst_ray.device import pin
from ptmst_ray.evaluate.metrics import retrieval_metrics
from ptmst_ray.models.losses import contrastive_loss

if TYPE_CHECKING:
    from ptmst_ray.data.dataset import ImageRows

log = logging.getLogger(__name__)

Images = Union[Tensor, "ImageRows"]
"""Images by row: a float tensor, or rows whose ``[idx]`` (LongTensor or slice) gives the CLIP-normalised float
batch from uint8 pixels held once per image (a real split is never materialised as float)."""

Metrics = dict[str, float]
EpochBatches = Callable[[int], Iterable[tuple[Tensor, Tensor, Tensor]]]
"""epoch (1-based) -> that epoch's (rows, images, text) minibatches, e.g. a ``ptmst_ray.data.stream.CaptionStream``
over a split too large to hold; ``rows`` index the soft target."""
Target = Union[Tensor, Callable[[Tensor], Tensor], None]
"""n x n similarity of the pairs; or f(indices) -> b x b (e.g. ``FullSimilarity.matrix``); None = I."""


class RetrievalData(Protocol):
    """What scoring needs from a test split: one row per image, captions flattened."""

    images: Images  # n_images x 3 x H x W, float, CLIP-normalised (per batch)
    text_emb: Tensor  # n_captions x d_t (frozen text-tower embeddings)
    txt2img: Tensor  # n_captions, long: image index of each caption


@dataclass
class RetrievalSet:
    """A concrete test split in memory (any object with these three attributes works)."""

    images: Images
    text_emb: Tensor
    txt2img: Tensor


@dataclass
class TrainResult:
    """Outcome of one training run; metrics are None when no ``eval_fn`` was given."""

    final: Optional[Metrics]
    """Metrics at the last evaluation point (the final epoch unless training diverged)."""
    best: Optional[Metrics]
    """Metrics of the evaluation point with the highest r_mean (the paper's best-of protocol)."""
    best_epoch: Optional[int]
    history: list[dict[str, Any]] = field(default_factory=list)
    """One entry per evaluation point: {"epoch", "loss", **metrics}."""
    epoch_losses: list[float] = field(default_factory=list)
    """Mean training loss of each completed epoch."""
    diverged_at: Optional[int] = None
    """Epoch at which a non-finite loss stopped training (the last good weights were kept)."""
    stopped_at: Optional[int] = None
    """Epoch after which ``early_stop`` ended training (None: it ran its epochs, or diverged)."""
    decayed_at: Optional[int] = None
    """First epoch trained at lr * 0.1 (None: training ended before any)."""
    epochs_run: int = 0
    """Epochs trained (the last one included even when it diverged)."""


@dataclass(frozen=True)
class EarlyStop:
    """Train until ``key`` (a metric of the evaluation points, e.g. ``val/r_mean``) stops improving.

    After ``patience`` evaluation points in a row without a value above the best so far, the lr drops x0.1
    (the one step decay every schedule here has, placed by the metric instead of at E // 2 + 1, which still
    applies if it comes first); after ``patience`` more points without a new best, training stops. The epochs
    given to :func:`train_student` are then the most it may train.
    """

    patience: int
    key: str = "r_mean"

    def __post_init__(self):
        if self.patience < 1:
            raise ValueError(f"early-stopping patience must be >= 1 evaluation point, got {self.patience}")


def first_best(values: Sequence[float]) -> int:
    """Index of the first maximum of ``values`` (a later equal value is no improvement); -1 when empty."""
    best = -1
    for i, v in enumerate(values):
        if best < 0 or v > values[best]:
            best = i
    return best


def points_without_improvement(values: Sequence[float], since: int = -1) -> int:
    """Evaluation points at the end of ``values`` that did not beat the best before them, counting only points
    after index ``since`` (the point at which the lr last dropped: the count starts afresh there)."""
    return len(values) - 1 - max(first_best(values), since)


def eval_epochs(epochs: int, points: int) -> list[int]:
    """``points`` evenly spaced epochs in 1..epochs, always including the last one."""
    if epochs < 1 or points < 1:
        raise ValueError(f"epochs and eval points must be >= 1, got {epochs} and {points}")
    points = min(points, epochs)
    return sorted({math.ceil(k * epochs / points) for k in range(1, points + 1)})


def decay_epoch(epochs: int) -> int:
    """First (1-based) epoch trained at lr * 0.1: E // 2 + 1."""
    return epochs // 2 + 1


def _param_groups(student: nn.Module, lr_img: float, lr_txt: float) -> list[dict[str, Any]]:
    image = [p for p in student.image.parameters() if p.requires_grad]
    head = [p for p in student.head.parameters() if p.requires_grad]
    other = [
        n for n, p in student.named_parameters()
        if p.requires_grad and not (n.startswith("image.") or n.startswith("head."))
    ]
    if other:
        raise ValueError(f"student has trainable parameters outside image/head: {other[:5]}")
    groups = [{"params": head, "lr": lr_txt, "base_lr": lr_txt, "name": "txt"}]
    if image:
        groups.insert(0, {"params": image, "lr": lr_img, "base_lr": lr_img, "name": "img"})
    return groups


def _batch_target(target: Target, idx: Tensor, dtype: torch.dtype, device: torch.device) -> Tensor:
    if target is None:
        return torch.eye(len(idx), dtype=dtype, device=device)
    if callable(target) and not isinstance(target, Tensor):
        sub = target(idx)
    else:
        sub = target[idx][:, idx]
    return sub.detach().to(dtype=dtype, device=device)


def _evaluate(student: nn.Module, eval_fn: Callable[[nn.Module], Metrics]) -> Metrics:
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            return dict(eval_fn(student))
    finally:
        student.train(was_training)


def train_student(
    student: nn.Module,
    images: Images,
    text_emb: Tensor,
    target: Target = None,
    *,
    epochs: int,
    batch_size: int = 128,
    lr_img: float = 0.1,
    lr_txt: float = 0.1,
    momentum: float = 0.9,
    weight_decay: float = 5e-4,
    loss: str = "WBCE",
    seed: int = 0,
    eval_fn: Optional[Callable[[nn.Module], Metrics]] = None,
    eval_points: int = 10,
    progress: Optional[Callable[[dict[str, Any]], None]] = None,
    epoch_batches: Optional[EpochBatches] = None,
    eval_at: Optional[Sequence[int]] = None,
    early_stop: Optional[EarlyStop] = None,
) -> TrainResult:
    """Train ``student`` in place on the pairs (images[i], text_emb[i]), i < n.

    Minibatch b uses ``target[b][:, b]`` as the soft target of ``loss``. Image-encoder
    parameters step with ``lr_img``, projection-head parameters with ``lr_txt`` (frozen
    parameters, e.g. ``image_trainable=False``, are left alone). ``eval_fn(student) -> metrics``
    runs (in eval mode, without grad) at ``eval_points`` evenly spaced epochs including the last;
    ``progress`` receives one dict per epoch ({"epoch", "loss", "lr_img" (None when the image
    tower is frozen), "lr_txt"} plus metrics at evaluation points). Shuffling and dropout draw
    from ``seed`` without touching the global RNG. A non-finite loss stops training before the
    bad step (see ``TrainResult.diverged_at``). With ``epoch_batches`` (a stream of the same pairs) each
    epoch trains on its batches instead of a permutation of the rows; the rows then only give n.
    ``eval_at`` (epochs in 1..epochs) replaces the evenly spaced points; ``early_stop`` (needs ``eval_fn``)
    drops the lr and then stops by a metric of the points instead of by the fixed schedule (:class:`EarlyStop`).
    """
    n = images.shape[0]
    if text_emb.shape[0] != n:
        raise ValueError(f"images ({n}) and text_emb ({text_emb.shape[0]}) must have one row per pair")
    if isinstance(target, Tensor) and tuple(target.shape) != (n, n):
        raise ValueError(f"target must be {n} x {n}, got {tuple(target.shape)}")
    if n == 0:
        raise ValueError("cannot train on an empty set of pairs")
    lr_img, lr_txt = float(lr_img), float(lr_txt)
    device = next(student.parameters()).device
    groups = _param_groups(student, lr_img, lr_txt)
    optimizer = torch.optim.SGD(groups, lr=lr_txt, momentum=momentum, weight_decay=weight_decay)
    points = _points(epochs, eval_points, eval_at) if eval_fn is not None else set()
    if early_stop is not None and eval_fn is None:
        raise ValueError("early_stop needs eval_fn: it stops by a metric of the evaluation points")
    plateau_drop = False  # the lr dropped because early_stop's metric stopped improving
    since = -1  # index of the evaluation point the lr dropped at
    result = TrainResult(final=None, best=None, best_epoch=None)
    gen = torch.Generator().manual_seed(seed)
    bs = max(1, min(batch_size, n))
    student.train()
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for epoch in range(1, epochs + 1):
            scheduled = epoch >= decay_epoch(epochs)
            if scheduled and early_stop is not None and result.decayed_at is None:
                since = len(result.history) - 1  # the scheduled drop: points after it count afresh
            scale = 0.1 if scheduled or plateau_drop else 1.0
            if scale < 1.0 and result.decayed_at is None:
                result.decayed_at = epoch
            result.epochs_run = epoch
            for g in optimizer.param_groups:
                g["lr"] = g["base_lr"] * scale
            if epoch_batches is not None:
                epoch_iter = epoch_batches(epoch)
            else:
                epoch_iter = _permuted(images, text_emb, bs, gen)
            epoch_loss, diverged = _run_epoch(student, optimizer, epoch_iter, target, loss, device)
            if diverged:
                result.diverged_at = epoch
                log.warning("non-finite %s loss at epoch %d; stopping with the last good weights", loss, epoch)
                if eval_fn is not None:
                    _record(result, epoch, epoch_loss, _evaluate(student, eval_fn))
                break
            result.epoch_losses.append(epoch_loss)
            lrs = {g["name"]: g["lr"] for g in optimizer.param_groups}
            report: dict[str, Any] = {
                "epoch": epoch, "loss": epoch_loss, "lr_img": lrs.get("img"), "lr_txt": lrs["txt"],
            }
            stop = False
            if epoch in points:
                metrics = _evaluate(student, eval_fn)
                _record(result, epoch, epoch_loss, metrics)
                report.update(metrics)
                log.debug("epoch %d loss %.4f r_mean %.2f", epoch, epoch_loss, metrics.get("r_mean", float("nan")))
                if early_stop is not None:
                    values = [h[early_stop.key] for h in result.history]
                    if points_without_improvement(values, since) >= early_stop.patience:
                        if result.decayed_at is None:
                            plateau_drop, since = True, len(values) - 1
                        else:
                            stop = True
            if progress is not None:
                progress(report)
            if stop:
                result.stopped_at = epoch
                log.info("%s did not improve for %d evaluation points: stopping after epoch %d (of at most %d)",
                         early_stop.key, early_stop.patience, epoch, epochs)
                break
    return result


def _points(epochs: int, eval_points: int, eval_at: Optional[Sequence[int]]) -> set[int]:
    if eval_at is None:
        return set(eval_epochs(epochs, eval_points))
    points = {int(e) for e in eval_at}
    if not points or min(points) < 1 or max(points) > epochs:
        raise ValueError(f"eval_at must list epochs in 1..{epochs}, got {sorted(points)}")
    return points


def _record(result: TrainResult, epoch: int, epoch_loss: float, metrics: Metrics) -> None:
    result.history.append({"epoch": epoch, "loss": epoch_loss, **metrics})
    result.final = metrics
    if result.best is None or metrics.get("r_mean", -math.inf) > result.best.get("r_mean", -math.inf):
        result.best, result.best_epoch = metrics, epoch


def _permuted(images: Images, text_emb: Tensor, batch_size: int, gen: torch.Generator
              ) -> Iterator[tuple[Tensor, Tensor, Tensor]]:
    """(rows, images, text) minibatches of one random permutation of the pairs."""
    order = torch.randperm(images.shape[0], generator=gen)
    for start in range(0, len(order), batch_size):
        idx = order[start : start + batch_size]
        yield idx, images[idx], text_emb[idx]


def _run_epoch(
    student: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor, Tensor]],
    target: Target,
    loss_name: str,
    device: torch.device,
) -> tuple[float, bool]:
    """One pass over (rows, images, text) minibatches; returns (mean loss, diverged)."""
    total, count = 0.0, 0
    for idx, images, text in batches:
        x = pin(images, device).to(device, non_blocking=True)  # pinned: the copy overlaps compute on CUDA
        t = pin(text, device).to(device, non_blocking=True)
        logits = student(x, t)
        value = contrastive_loss(loss_name, logits, _batch_target(target, idx, logits.dtype, device))
        if not torch.isfinite(value):
            return (total / count if count else float("nan")), True
        optimizer.zero_grad(set_to_none=True)
        value.backward()
        optimizer.step()
        total += float(value.detach()) * len(idx)
        count += len(idx)
    return total / count, False


def encode_test(student: nn.Module, test_images: Images, test_text_emb: Tensor, batch_size: int = 256) -> Tensor:
    """Cosine similarity matrix n_images x n_captions of the student's normalised embeddings."""
    device = next(student.parameters()).device
    was_training = student.training
    student.eval()
    try:
        with torch.no_grad():
            img = torch.cat([student.encode_image(test_images[i : i + batch_size].to(device)).cpu()
                             for i in range(0, test_images.shape[0], batch_size)])
            txt = torch.cat([student.encode_text(test_text_emb[i : i + batch_size].to(device)).cpu()
                             for i in range(0, test_text_emb.shape[0], batch_size)])
    finally:
        student.train(was_training)
    return img @ txt.T


def evaluate_student(student: nn.Module, test_set: RetrievalData, batch_size: int = 256) -> Metrics:
    """Retrieval metrics (percent) of ``student`` on ``test_set``."""
    sim = encode_test(student, test_set.images, test_set.text_emb, batch_size)
    return retrieval_metrics(sim, test_set.txt2img)
