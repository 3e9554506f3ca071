"""Stage `experts` (+ `shortcut`): one expert trajectory trained and stored; one expert compressed
into the shortcut trajectories the phases match.

Experts are addressed by id and stored an epoch at a time as they train (each file atomically), so a retried
expert lands exactly once and continues from its last stored epoch; the Ray layer trains many at once and
compresses each as soon as it is stored.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING, Callable, Iterator, Sequence

from ptmst_ray.config import Config, ExpertsConfig
from ptmst_ray.layout import Layout, experts_hash, needed_ranges
from ptmst_ray.stages import features
from ptmst_ray.stages.embed import RealData, load_real, stream_split, train_stream
from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore

if TYPE_CHECKING:
    from torch import Tensor


log = logging.getLogger(__name__)


def expert_store(cfg: Config) -> TrajectoryStore:
    return TrajectoryStore(Layout.of(cfg).experts)


def shortcut_store(cfg: Config) -> ShortcutStore:
    return ShortcutStore(Layout.of(cfg).shortcuts)


def train_and_store_expert(cfg: Config, expert_id: int, on_epoch: Callable[[int, dict], None] | None = None,
                           store: TrajectoryStore | None = None, stored: int | None = None) -> int:
    """Train expert ``expert_id`` (unless complete), storing each epoch in the trajectory store as it ends
    (``store``: another one, e.g. for experts under trial settings that must not replace the run's). A stored expert
    of this config with fewer epochs (a config asking for more, or a training cut short) is continued from its last
    one (SGD without momentum: the expert trained in one go). ``stored``: the expert's stored epochs as the caller
    just read them (``TrajectoryStore.complete_epochs``), not read again."""
    from ptmst_ray.trajectories.expert import expert_seed

    store, chash = store or expert_store(cfg), experts_hash(cfg)
    stored = store.complete_epochs(expert_id, chash) if stored is None else stored
    if stored >= cfg.experts.epochs:
        return expert_id
    start = None
    if continues_from(cfg, stored) is not None:
        start = store.trajectory(expert_id, chash)  # its first and last epochs are read
        log.info("expert %d: continuing from its stored epoch %d to %d", expert_id, stored, cfg.experts.epochs)
    seed = expert_seed(cfg.experts, expert_id)

    def write(epoch: int, snapshot: dict) -> None:
        store.write_epoch(expert_id, epoch, snapshot, seed=seed, config_hash=chash)

    expert_trajectory(cfg, expert_id, on_epoch, start=start, on_snapshot=write, keep=False)
    return expert_id


def continues_from(cfg: Config, stored: int) -> int | None:
    """The epoch training continues from when an expert of this config has ``stored`` epochs stored (-1: none): those
    epochs (0: its starting point alone, not written again) when fewer than the config asks for and SGD keeps no state
    between epochs (no momentum); None when it is trained from the start."""
    return stored if 0 <= stored < cfg.experts.epochs and not cfg.experts.momentum else None


def expert_trajectory(cfg: Config, expert_id: int, on_epoch: Callable[[int, dict], None] | None = None,
                      experts: ExpertsConfig | None = None, start: Sequence | None = None,
                      on_snapshot: Callable[[int, dict], None] | None = None, keep: bool = True) -> list:
    """Train expert ``expert_id`` on the run's train split (streamed, or on a frozen tower's cached features, as the
    run does) with ``experts`` (default: the config's); its snapshots after epochs 0..experts.epochs (``start``: its
    stored first ones, continued; ``on_snapshot``, ``keep``: as :func:`~ptmst_ray.trajectories.expert.train_expert`)."""
    from ptmst_ray.trajectories.expert import expert_seed, train_expert

    streamed = stream_split(cfg, "train")
    cached = features.find(cfg)  # a frozen tower's features, computed once: the tower never runs here
    # streamed: the train pixels are never held; cached: never read
    real = load_real(cfg, whole_train=not streamed and cached is None)
    seed = expert_seed(cfg.experts, expert_id)
    images = real.train_images if cached is None else features.FeatureRows(cached, real.train_image_index)
    epoch_batches = _streamed_epochs(cfg, real, seed, cached) if streamed else None
    return train_expert(experts or cfg.experts, cfg.model, images, real.train_text, expert_id, on_epoch=on_epoch,
                        epoch_batches=epoch_batches, frozen_features=cached.check_tower if cached else None,
                        start=start, on_snapshot=on_snapshot, keep=keep)


def _streamed_epochs(cfg: Config, real: RealData, seed: int, cached: features.CachedFeatures | None = None
                     ) -> Callable[[int], Iterator[tuple[Tensor, Tensor]]]:
    """epoch -> the expert's (images, text) batches streamed in the stream's (seed, epoch) order: the same in any
    process and on any retry (with ``cached``: the images' frozen-tower features, in the same order)."""
    if cached is not None:
        stream = features.feature_stream(cfg, cached, real.train_text, cfg.experts.batch_size, seed,
                                         image_index=real.train_image_index)
    else:
        stream = train_stream(cfg, "train", real.train_text, cfg.experts.batch_size, seed,
                              image_index=real.train_image_index)

    def epoch_batches(epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        return ((images, text) for _, images, text in stream.epoch(epoch))

    return epoch_batches


def compress_expert(cfg: Config, expert_id: int,
                    ranges: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """Shortcut trajectories of one finished expert for ``ranges`` (default: every range the phases need)."""
    from ptmst_ray.trajectories.shortcut import shortcut_trajectory

    todo = missing_shortcuts(cfg, expert_id, ranges)
    if not todo:
        return []
    chash, shortcuts = experts_hash(cfg), shortcut_store(cfg)
    stored = expert_store(cfg).trajectory(expert_id, chash)
    lo, hi = min(a for a, _ in todo), max(b for _, b in todo)
    window = stored[lo:hi + 1]  # each epoch the ranges span read once, no other
    snapshots = [None] * lo + window  # indexed by epoch; no range reaches below lo
    for a, b in todo:
        shortcuts.write(a, b, expert_id, shortcut_trajectory(snapshots, a, b), config_hash=chash)
    return todo


def missing_shortcuts(cfg: Config, expert_id: int,
                      ranges: list[tuple[int, int]] | None = None) -> list[tuple[int, int]]:
    """The ``ranges`` (default: every range the phases need) whose shortcut of expert ``expert_id`` is not
    complete; a cheap check (sidecars and file headers), so a driver can skip starting a worker for nothing."""
    chash, shortcuts = experts_hash(cfg), shortcut_store(cfg)
    return [r for r in (ranges or needed_ranges(cfg)) if not shortcuts.is_complete(r[0], r[1], expert_id, chash)]
