"""Training one expert on the real train split (docs/method.md#expert-trajectories).

Why this file exists: the teacher trajectories that distillation matches are the
parameters of experts trained with the ordinary CLIP loss (InfoNCE with S = I) and plain
SGD, saved after epoch 0 (initial) and after every epoch. An expert is independent of all
the others, so this is one plain function the Ray layer runs once per expert id; the seed
``cfg.seed + expert_id`` fixes the head's initialisation (and the image tower's, when it
has no pretrained weights) and the data order.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Callable, Iterable, Sequence, Union

import torch
from torch import Tensor, nn

from ptmst_ray.config import ExpertsConfig, ModelConfig
from ptmst_ray.device import pick_device, pin
from ptmst_ray.models.losses import contrastive_loss
from ptmst_ray.models.student import build_student, drop_frozen_tower

if TYPE_CHECKING:
    from ptmst_ray.data.dataset import ImageRows

log = logging.getLogger(__name__)

Images = Union[Tensor, "ImageRows"]
"""Train images by row: a float tensor, or rows whose ``[idx]`` gives the float batch (pixels kept as uint8)."""

Snapshot = dict[str, Tensor]
EpochCallback = Callable[[int, dict], None]
EpochBatches = Callable[[int], Iterable[tuple[Tensor, Tensor]]]
"""epoch (1-based) -> that epoch's (images, text) minibatches, e.g. from ``ptmst_ray.data.stream.CaptionStream``."""


def expert_seed(cfg: ExpertsConfig, expert_id: int) -> int:
    """Expert ``expert_id``'s seed: fixed by the config, never by what is on disk."""
    return cfg.seed + expert_id


def trainable_params(model: nn.Module) -> dict[str, nn.Parameter]:
    """The parameters a trajectory records: trainable "image.*" and "head.*" tensors, in module order."""
    return {
        n: p for n, p in model.named_parameters() if p.requires_grad and n.split(".", 1)[0] in ("image", "head")
    }


def snapshot(model: nn.Module) -> Snapshot:
    """Detached CPU copies of the trainable parameters."""
    return {n: p.detach().to("cpu", copy=True) for n, p in trainable_params(model).items()}


def make_optimizer(model: nn.Module, cfg: ExpertsConfig) -> torch.optim.SGD:
    """Plain SGD, one parameter group per modality (lr_img for the image tower, lr_txt for the head)."""
    params = trainable_params(model)
    groups = [
        {"params": [p for n, p in params.items() if n.startswith("image.")], "lr": cfg.lr_img},
        {"params": [p for n, p in params.items() if n.startswith("head.")], "lr": cfg.lr_txt},
    ]
    groups = [g for g in groups if g["params"]]
    return torch.optim.SGD(groups, lr=cfg.lr_txt, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def batches(n: int, batch_size: int, generator: torch.Generator) -> list[Tensor]:
    """A fresh random permutation of 0..n-1 cut into minibatches; a last batch of 1 is dropped
    (a contrastive loss needs at least two pairs)."""
    order = torch.randperm(n, generator=generator)
    chunks = list(order.split(batch_size))
    return [c for c in chunks if len(c) >= 2]


def train_epoch(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    images: Images,
    text: Tensor,
    loss_name: str,
    order: list[Tensor],
    device: torch.device,
) -> float:
    """One pass over ``order``'s minibatches; returns the mean loss. Stops on a non-finite loss."""
    return train_batches(model, optimizer, ((images[idx], text[idx]) for idx in order), loss_name, device)


def train_batches(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: Iterable[tuple[Tensor, Tensor]],
    loss_name: str,
    device: torch.device,
) -> float:
    """One pass over (images, text) minibatches (row-aligned, on the CPU); returns the mean loss.
    Stops on a non-finite loss."""
    model.train()
    total, count = 0.0, 0
    for images, text in batches:
        x = pin(images, device).to(device, non_blocking=True)  # pinned: the copy overlaps compute on CUDA
        t = pin(text, device).to(device, non_blocking=True)
        logits = model(x, t)
        loss = contrastive_loss(loss_name, logits, torch.eye(len(x), device=device, dtype=logits.dtype))
        if not torch.isfinite(loss):
            raise FloatingPointError(
                f"expert loss became {loss.item()} after {count} steps of this epoch; lower experts.lr_img / lr_txt"
            )
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        total += loss.item() * len(x)
        count += len(x)
    return total / max(count, 1)


DROPOUT_SEED_OFFSET = 15_485_863
EPOCH_SEEDS = 100_003
"""An expert's dropout masks (the paper recipes' head has dropout 0.1) in epoch e come from a global generator seeded
with ``DROPOUT_SEED_OFFSET + seed * EPOCH_SEEDS + e`` (apart from its data order's generator and its initialisation's
seeds; no two (expert, epoch) pairs share one below EPOCH_SEEDS epochs), so its trajectory is the same in whatever
process, and after whatever, it is trained (a restarted expert or a probe expert repeats itself), and an expert
continued from a stored epoch is the one trained in one go."""


def dropout_seed(seed: int, epoch: int) -> int:
    """The global generator's seed for an expert's dropout masks in ``epoch`` (see :data:`EPOCH_SEEDS`)."""
    return DROPOUT_SEED_OFFSET + seed * EPOCH_SEEDS + epoch


def train_expert(
    cfg: ExpertsConfig,
    model_cfg: ModelConfig,
    train_images: Images,
    train_text: Tensor,
    expert_id: int,
    on_epoch: EpochCallback | None = None,
    device: torch.device | None = None,
    epoch_batches: EpochBatches | None = None,
    frozen_features: Callable[[nn.Module], None] | None = None,
    start: Sequence[Snapshot] | None = None,
    on_snapshot: Callable[[int, Snapshot], None] | None = None,
    keep: bool = True,
) -> list[Snapshot]:
    """Train expert ``expert_id`` and return its trajectory: snapshots after epochs 0..cfg.epochs.

    ``train_images`` (N rows x 3 x H x W, CLIP-normalised: a tensor, or :class:`ImageRows` that
    normalise each minibatch from uint8 pixels held once per image) and ``train_text`` (N x d_t
    caption embeddings) are row-aligned pairs, kept on the CPU; minibatches move to ``device``.
    With ``epoch_batches`` (a stream of the same pairs, e.g. read shard by shard) each epoch trains on
    its batches instead of a permutation of the rows; the rows then only give the split's size and d_t.
    With ``frozen_features`` the images are a frozen tower's cached features (``model.image_trainable: false``):
    it is called with the student's frozen tower (to check these are its features; it raises if not), then the
    tower is dropped and never runs. The trajectory is the same, up to float rounding.
    With ``start`` (the snapshots of this expert's first epochs, as stored) training continues after its last one:
    the trajectory is the one trained in one go (SGD without momentum keeps no state between epochs); only its
    length, first and last snapshots are read.
    ``on_snapshot(epoch, snapshot)`` is called with each new snapshot (epoch 0 unless continuing) before
    ``on_epoch``, e.g. to store it; with ``keep=False`` no snapshot is kept (returns []): the memory of one.
    """
    if len(train_images) != len(train_text):
        raise ValueError(f"{len(train_images)} train images but {len(train_text)} caption embeddings; they must pair up")
    if len(train_images) < 2:
        raise ValueError("the train split needs at least two pairs for a contrastive loss")
    device = device or pick_device()
    seed = expert_seed(cfg, expert_id)
    model = build_student(model_cfg, text_dim=train_text.shape[1], seed=seed)
    if frozen_features is not None:
        frozen_features(model.frozen_tower())
        drop_frozen_tower(model)
    model = model.to(device)
    optimizer = make_optimizer(model, cfg)
    generator = torch.Generator().manual_seed(seed)
    first, stored = snapshot(model), 0
    if start:
        if cfg.momentum:
            raise ValueError(f"expert {expert_id}: SGD with momentum keeps state between epochs; it cannot be "
                             "continued from a stored epoch")
        stored_first = start[0]
        if list(stored_first) != list(first) or not all(torch.equal(stored_first[n], t) for n, t in first.items()):
            raise ValueError(f"expert {expert_id}: the stored epoch 0 is not this expert's starting point (another "
                             "seed, model or weights); it cannot be continued")
        del stored_first
        if len(start) > cfg.epochs:
            return [dict(s) for s in start[:cfg.epochs + 1]] if keep else []
        stored = len(start) - 1
        last = start[-1]  # read once: ``start`` may read a stored epoch at each index
        with torch.no_grad():
            for n, p in trainable_params(model).items():
                p.copy_(last[n])
        del last
        trajectory = [dict(s) for s in start] if keep else []
        if epoch_batches is None:
            for _ in range(stored):  # the order the stored epochs drew
                batches(len(train_images), cfg.batch_size, generator)
    else:
        trajectory = [first] if keep else []
        if on_snapshot is not None:
            on_snapshot(0, first)
    del first
    with torch.random.fork_rng(devices=[]):  # dropout draws from the expert's seed, not from what ran before it
        for epoch in range(stored + 1, cfg.epochs + 1):
            torch.manual_seed(dropout_seed(seed, epoch))
            started = time.perf_counter()
            if epoch_batches is not None:
                loss = train_batches(model, optimizer, epoch_batches(epoch), cfg.loss, device)
            else:
                order = batches(len(train_images), cfg.batch_size, generator)
                loss = train_epoch(model, optimizer, train_images, train_text, cfg.loss, order, device)
            snap = snapshot(model)
            if keep:
                trajectory.append(snap)
            if on_snapshot is not None:
                on_snapshot(epoch, snap)
            del snap
            stats = {"loss": loss, "seconds": time.perf_counter() - started, "expert_id": expert_id}
            log.info("expert %d epoch %d/%d: loss %.4f (%.1fs)", expert_id, epoch, cfg.epochs, loss,
                     stats["seconds"])
            if on_epoch is not None:
                on_epoch(epoch, stats)
    return trajectory


ALIGNED_COSINE = 0.5
"""The experts' learning-rate rule's bar: consecutive epoch displacements at least this aligned."""
ALIGNED_EPOCHS = 4
"""... over this many first epochs (their ALIGNED_EPOCHS - 1 consecutive pairs)."""


def displacement_cosines(trajectory: list[Snapshot]) -> list[float]:
    """Cosines of consecutive epoch displacements: entry i compares theta_(i+1) - theta_i with
    theta_(i+2) - theta_(i+1).

    All recorded parameters count as one flat vector (float64). Near 0, the expert moves by SGD noise; clearly
    positive, its epochs point one way and a trajectory segment carries a direction to match.
    """
    flat = [torch.cat([t.detach().flatten().double() for t in s.values()]) for s in trajectory]
    steps = [b - a for a, b in zip(flat, flat[1:])]
    return [float(torch.nn.functional.cosine_similarity(a, b, dim=0)) for a, b in zip(steps, steps[1:])]


def aligned_lr(cosines_by_lr: dict[float, list[float]], min_cosine: float = ALIGNED_COSINE,
               epochs: int = ALIGNED_EPOCHS) -> float | None:
    """The experts' learning rate by the recipe's rule (docs/method.md#a-recipe-for-new-data).

    ``cosines_by_lr`` maps each candidate lr to its expert's :func:`displacement_cosines`. The rule: the largest lr
    whose first ``epochs`` epochs keep every consecutive cosine >= ``min_cosine``; None when no candidate does
    (then try smaller ones).
    """
    if epochs < 2:
        raise ValueError(f"epochs={epochs}: the rule compares consecutive epochs, so it needs at least 2")
    passing = []
    for lr, cosines in cosines_by_lr.items():
        if len(cosines) < epochs - 1:
            raise ValueError(f"the expert at lr {lr:g} has {len(cosines) + 1} epochs; the rule looks at its first "
                             f"{epochs}: train experts of at least {epochs} epochs")
        if keeps_aligned(cosines, min_cosine, epochs):
            passing.append(lr)
    return max(passing) if passing else None


def chord_alignment(trajectory: Sequence[Snapshot], start: int, epochs: Sequence[int],
                    ends: Iterable[int]) -> dict[int, float]:
    """How well each shortcut chord theta_b - theta_start points along the expert's own epochs ``epochs``.

    For each range end b of ``ends``: the mean over the two towers (the image encoder's parameters, named under
    ``image.``, and the rest) and over k in ``epochs`` of cos(theta_b - theta_start, theta_(k+1) - theta_k), each
    tower one flat float64 vector. A tower that does not move over a pair (a zero vector) is left out of that pair's
    mean; a pair where neither moves counts 0. The windows' rule (:func:`aligned_range_end`) takes the best b.
    """
    epochs = list(epochs)
    return {b: sum(by_k[k] for k in epochs) / len(epochs)
            for b, by_k in pair_cosines(trajectory, start, epochs, ends).items()}


def pair_cosines(trajectory: Sequence[Snapshot], start: int, epochs: Sequence[int],
                 ends: Iterable[int]) -> dict[int, dict[int, float]]:
    """:func:`chord_alignment`'s terms: for each end b and epoch k, the mean over the two towers of
    cos(theta_b - theta_start, theta_(k+1) - theta_k) (0 when neither tower moves)."""
    from ptmst_ray.models.functional import IMAGE_PREFIX

    epochs, ends = sorted(set(epochs)), list(ends)
    if not epochs:
        raise ValueError("epochs is empty: name the epochs whose displacements the chord should follow")
    last = len(trajectory) - 1
    for what, values, lo, hi in (("epochs", epochs, start, last - 1), ("ends", ends, start + 1, last)):
        bad = [v for v in values if not lo <= v <= hi]
        if bad:
            raise ValueError(f"{what} {bad} outside [{lo}, {hi}] (a trajectory of {last} epochs, range start {start})")

    def towers(snap: Snapshot) -> list[Tensor]:
        image = [t.detach().flatten().double() for n, t in sorted(snap.items()) if n.startswith(IMAGE_PREFIX)]
        other = [t.detach().flatten().double() for n, t in sorted(snap.items()) if not n.startswith(IMAGE_PREFIX)]
        return [torch.cat(v) for v in (image, other) if v]

    # each epoch the displacements need is read once while the epochs run on (a stored trajectory reads a snapshot
    # when indexed); held: theta_start, one displacement per target epoch and two epochs (then the current chord),
    # never the whole trajectory: :func:`alignment_vectors`. Each vector's norm is taken once.
    base = towers(trajectory[start])
    steps, last_epoch, last = {}, start, base
    for k in epochs:
        here = last if last_epoch == k else towers(trajectory[k])
        last_epoch, last = k + 1, towers(trajectory[k + 1])
        steps[k] = [(d, float(d.norm())) for d in (b - a for a, b in zip(here, last))]
    del here, last
    out = {}
    for b in ends:
        chord = [(c, float(c.norm())) for c in (tb - ta for ta, tb in zip(base, towers(trajectory[b])))]
        out[b] = {}
        for k in epochs:
            cos = [float(torch.dot(c, d)) / (cn * dn) for (c, cn), (d, dn) in zip(chord, steps[k]) if cn > 0 and dn > 0]
            out[b][k] = sum(cos) / len(cos) if cos else 0.0
    return out


def alignment_vectors(n_epochs: int) -> int:
    """Float32 parameter vectors' worth of memory :func:`pair_cosines` holds at its peak for ``n_epochs`` target
    epochs: theta_start, a displacement per epoch and two epochs (or an end and its chord), each in float64, and
    one snapshot as read."""
    return 2 * (n_epochs + 3) + 1


def aligned_range_end(trajectories: Sequence[Sequence[Snapshot]], start: int, epochs: Sequence[int],
                      max_end: int) -> tuple[int, dict[int, float]]:
    """The windows' rule (docs/method.md#a-recipe-for-new-data): the range end b of a phase whose targets lie in
    ``epochs`` is the b in (max(epochs), max_end] whose chord theta_b - theta_start is best aligned with those
    epochs' displacements, :func:`chord_alignment` averaged over ``trajectories``; returns (b, scores by b).
    Ties go to the smaller b."""
    return aligned_range_ends(trajectories, start, [epochs], max_end)[0]


def aligned_range_ends(trajectories: Sequence[Sequence[Snapshot]], start: int, epoch_sets: Sequence[Sequence[int]],
                       max_end: int) -> list[tuple[int, dict[int, float]]]:
    """:func:`aligned_range_end` for several phases of the same range start at once (one per set of target epochs),
    each trajectory read once for all of them."""
    if not trajectories:
        raise ValueError("no trajectories: the rule averages over at least one expert")
    epoch_sets = [list(s) for s in epoch_sets]
    for s in epoch_sets:
        if not range(max(s) + 1, max_end + 1):
            raise ValueError(f"max_end {max_end} leaves no range end past the last target epoch {max(s)}")
    union = sorted({k for s in epoch_sets for k in s})
    per = [pair_cosines(t, start, union, range(min(max(s) for s in epoch_sets) + 1, max_end + 1))
           for t in trajectories]
    out = []
    for s in epoch_sets:
        ends = range(max(s) + 1, max_end + 1)
        scores = {b: sum(sum(p[b][k] for k in s) / len(s) for p in per) / len(per) for b in ends}
        out.append((max(ends, key=lambda b: (scores[b], -b)), scores))
    return out


def keeps_aligned(cosines: list[float], min_cosine: float = ALIGNED_COSINE, epochs: int = ALIGNED_EPOCHS) -> bool:
    """Whether an expert's first ``epochs`` epochs keep every consecutive displacement cosine >= ``min_cosine``."""
    return all(c >= min_cosine for c in cosines[:epochs - 1])
