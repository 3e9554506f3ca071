"""Experts on a pool of Ray actors, and the shortcut actor that compresses each one as it finishes.

Why this file exists: experts are independent, so E of them train in parallel, one GPU each
where the cluster has GPUs (one CPU otherwise). An actor that dies mid-expert restarts and its
expert is resubmitted; the store's atomic, id-addressed writes make a retried expert land exactly
once. Each finished expert is handed at once to a CPU shortcut actor (pipelined with the
experts still training), which writes the compact shortcut trajectories the phases need.
"""

from __future__ import annotations

import logging
import os

import ray

from ptmst_ray import storage
from ptmst_ray.config import Config, from_dict
from ptmst_ray.device import set_threads
from ptmst_ray.layout import Layout, StageError, experts_hash, needed_ranges
from ptmst_ray.orchestration.metrics import expert_metrics, expert_tag
from ptmst_ray.orchestration.runtime import (
    ActorQueue, Poll, actor_name, cluster_info, record_attempt, report_progress, request_gpus, resolve_accelerator,
    uses_gpus, wait_all, worker_threads,
)
from ptmst_ray.stages import expert_lr, windows
from ptmst_ray.stages.embed import stream_split
from ptmst_ray.stages.experts import (
    compress_expert, continues_from, expert_store, missing_shortcuts, train_and_store_expert,
)

log = logging.getLogger(__name__)


TEXT_WIDTH_BOUND = 1024
"""Upper bound of a caption embedding's width (BERT-base: 768) when sizing what a worker holds."""


def snapshot_nbytes(cfg: Config) -> int:
    """Bytes of one epoch's snapshot of an expert (the student's vector), from the first stored expert's index of
    this config; 0 before any exists."""
    store, chash = expert_store(cfg), experts_hash(cfg)
    for i in range(cfg.experts.num_experts):
        index = store.index(i)
        if index and index.get("config_hash") == chash and index.get("snapshot_nbytes"):
            return int(index["snapshot_nbytes"])
    return 0


def shortcut_nbytes(cfg: Config, snapshot: int | None = None) -> int:
    """Bytes of one expert's shortcut (its two end points) for a phase range: 2 snapshots."""
    return 2 * (snapshot_nbytes(cfg) if snapshot is None else snapshot)


def compress_nbytes(cfg: Config, ranges: list[tuple[int, int]]) -> int:
    """Bytes a worker compressing one expert into ``ranges`` holds: the epochs the ranges span, each read once
    (:func:`~ptmst_ray.stages.experts.compress_expert`), and a shortcut per range; 0 before any expert exists."""
    snapshot = snapshot_nbytes(cfg)
    span = max(b for _, b in ranges) - min(a for a, _ in ranges) + 1
    return snapshot * span + shortcut_nbytes(cfg, snapshot) * len(ranges)


def split_nbytes(cfg: Config, images: bool = True) -> int:
    """Bytes a worker holding the real data keeps (:class:`~ptmst_ray.stages.embed.RealData`): each distinct
    image once as uint8 pixels (unless ``images`` is False: a phase decodes only its initial pairs; a train
    split that training streams, ``data.stream``, costs :func:`stream_nbytes` instead) and a float32
    embedding per caption, train and test, counted from the prepared splits' manifests (0 before the data
    is prepared)."""
    total = 0
    for split in ("train", "test"):
        manifest = storage.read_manifest(Layout.of(cfg).split(split)) or {}
        pixels = _pixel_nbytes(cfg, split, manifest) if images else 0
        total += pixels + int(manifest.get("captions", 0)) * TEXT_WIDTH_BOUND * 4
    return total


def pairs_split_nbytes(cfg: Config, split: str) -> int:
    """What a worker training on the whole pairs split ``split`` holds of its pixels: each image once as uint8,
    or :func:`stream_nbytes` when training streams it (0 before the data is prepared)."""
    return _pixel_nbytes(cfg, split, storage.read_manifest(Layout.of(cfg).split(split)) or {})


def _pixel_nbytes(cfg: Config, split: str, manifest: dict) -> int:
    """A split's pixels held once per image as uint8, or a stream's bound for a pairs split training streams."""
    held = int(manifest.get("images", 0)) * 3 * cfg.data.image_size ** 2
    return stream_nbytes(cfg) if held and split != "test" and stream_split(cfg, split) else held


def stream_nbytes(cfg: Config) -> int:
    """A bound on what a streaming consumer holds of a split's pixels, whatever the split's size: the decoded-image
    cache, and the shuffle buffer's encoded images counted at their decoded size (an encoded image is smaller)."""
    return int(cfg.data.image_cache_mb * 2**20) + cfg.data.stream_buffer * 3 * cfg.data.image_size ** 2


TRAINING_VECTORS = 3
"""Copies of the parameter vector an expert actor holds while it trains: the parameters, their gradients and SGD's
momentum buffer. Activations (which grow with the batch and the image size) come on top and are not counted."""
WRITE_VECTORS = 2
"""... and while it stores an epoch (or reads a stored one to continue from): the snapshot and its file's bytes.
Its earlier epochs are in the store, not in memory."""


def memory_option(nbytes: int) -> dict:
    """``{"memory": nbytes}`` for Ray (so it never packs more such workers on a node than its RAM holds),
    or nothing when the size is not known yet."""
    return {"memory": int(nbytes)} if nbytes > 0 else {}


@ray.remote(max_restarts=-1, max_task_retries=0)
class ExpertActor:
    """Trains experts by id; holds the real data in memory between experts. The progress board comes with
    each call, not to the constructor: an actor handle among a restartable actor's constructor arguments
    makes Ray log an error line on every run (ray-project/ray#53727)."""

    def __init__(self, cfg: dict):
        self.cfg = from_dict(cfg)
        set_threads(worker_threads(self.cfg.run.threads_per_worker))

    def __repr__(self) -> str:  # the dashboard's "Repr" of this actor (taken once, at creation)
        return f"ExpertActor(experts={self.cfg.experts.num_experts}, epochs={self.cfg.experts.epochs})"

    def ready(self) -> bool:
        """A no-op: called with retries, it returns once a restarting actor is up again
        (:func:`~ptmst_ray.orchestration.runtime.restarted`)."""
        return True

    def train(self, expert_id: int, board=None) -> int:
        stored = expert_store(self.cfg).complete_epochs(expert_id, experts_hash(self.cfg))  # read once, passed down
        total, done = self.cfg.experts.epochs, start_epoch(self.cfg, stored)
        name = f"expert {expert_id}"
        report_progress(board, name, done, total, "continuing" if done else "starting")
        print(f"{expert_tag(expert_id)}: training {total - done} epoch(s)"  # the actor's log in the dashboard
              + (f", continuing from its stored epoch {done}" if done else ""), flush=True)

        def on_epoch(epoch: int, metrics: dict) -> None:
            report_progress(board, name, epoch, total, f"loss {metrics.get('loss', float('nan')):.3f}")
            expert_metrics(expert_id, epoch, metrics)

        # where it ran (node, GPU ids): `experts/attempts/` shows the spread over a cluster
        record_attempt(Layout.of(self.cfg).expert_attempt(expert_id, os.getpid()), expert_id=expert_id,
                       from_epoch=done)
        return train_and_store_expert(self.cfg, expert_id, on_epoch=on_epoch, stored=stored)


def stored_epochs(cfg: Config, expert_id: int) -> int:
    """The epoch expert ``expert_id``'s training starts from (its actor's progress): its stored epochs for this config
    when it is continued (:func:`~ptmst_ray.stages.experts.continues_from`), the config's epochs when it is complete,
    else 0."""
    return start_epoch(cfg, expert_store(cfg).complete_epochs(expert_id, experts_hash(cfg)))


def start_epoch(cfg: Config, stored: int) -> int:
    """:func:`stored_epochs` from an expert's count of stored epochs (``TrajectoryStore.complete_epochs``)."""
    return cfg.experts.epochs if stored >= cfg.experts.epochs else continues_from(cfg, stored) or 0


@ray.remote(num_cpus=0, max_restarts=-1, max_task_retries=3)
class ShortcutActor:
    """Compresses finished experts into the shortcut ranges the phases need (light CPU work). With a range end
    auto, its first call applies the windows' rule (expert 0 must be stored by then) and every call uses its picks."""

    def __init__(self, cfg: dict):
        set_threads(1)
        self.cfg = from_dict(cfg)

    def compress(self, expert_id: int) -> list[tuple[int, int]]:
        if windows.is_auto(self.cfg):
            self.cfg = windows.pick(self.cfg)
        return compress_expert(self.cfg, expert_id)


def bound_ranges(cfg: Config) -> list[tuple[int, int]]:
    """The ranges the phases need (:func:`~ptmst_ray.layout.needed_ranges`); an auto range end (not picked yet)
    counted at the experts' last epoch, the largest it can take."""
    if not windows.is_auto(cfg):
        return needed_ranges(cfg)
    return sorted({(p.range_start, windows.end_bound(cfg, p)) for p in cfg.phases})


def _shortcut_actor(cfg_dict: dict):
    """The shortcut actor, named ``shortcut-<driver id>`` in the dashboard; it holds the epochs of one expert that
    the ranges span and its shortcuts at a time (or, to pick an auto range end, what the windows' rule holds), and
    asks for that memory once an expert's size is known."""
    from ptmst_ray.trajectories.expert import alignment_vectors

    cfg = from_dict(cfg_dict)
    memory = compress_nbytes(cfg, bound_ranges(cfg))
    if windows.is_auto(cfg):
        memory = max(memory, alignment_vectors(windows.union_epochs(cfg)) * snapshot_nbytes(cfg))
    return ShortcutActor.options(name=actor_name("shortcut"), **memory_option(memory)).remote(cfg_dict)


def _compress(shortcut, expert_id: int):
    """One expert's shortcuts, as a task named ``shortcut expert-NNNN``."""
    return shortcut.compress.options(name=f"shortcut {expert_tag(expert_id)}").remote(expert_id)


def _actor_options(cfg: Config, n_actors: int) -> dict:
    """An expert actor's resources: ``experts.gpus_per_expert`` GPUs and one CPU when the run targets GPUs
    (``run.accelerator``, whether or not GPU nodes are up yet), else an equal share of the CPUs
    (:meth:`~ptmst_ray.orchestration.runtime.ClusterInfo.cpu_share`); and the
    memory of what it holds (the real data; once an expert's size is known, the vectors training and storing an
    epoch hold: :data:`TRAINING_VECTORS`, :data:`WRITE_VECTORS`). Its torch threads follow from what it was given
    (:func:`~ptmst_ray.orchestration.runtime.worker_threads`)."""
    memory = memory_option(split_nbytes(cfg) + (TRAINING_VECTORS + WRITE_VECTORS) * snapshot_nbytes(cfg))
    if uses_gpus(cfg):
        return {"num_gpus": cfg.experts.gpus_per_expert, "num_cpus": 1, **memory}
    return {"num_cpus": cluster_info().cpu_share(n_actors), **memory}


def experts_stored(cfg: Config) -> bool:
    """True when the learning-rate rule has picked (``experts.lr_img: auto``) and every expert of the config is
    stored with its shortcuts: :func:`run_expert_lr` and :func:`run_experts` would do nothing, and a command can
    say so without Ray (:func:`stored_experts_summary`)."""
    if expert_lr.missing(cfg):
        return False
    cfg = expert_lr.resolved(cfg)
    return (not expert_store(cfg).missing_ids(cfg.experts.num_experts, experts_hash(cfg), cfg.experts.epochs)
            and shortcuts_stored(cfg))


def stored_experts_summary(cfg: Config) -> dict:
    """What :func:`run_experts` returns when :func:`experts_stored`, found without Ray (``cfg`` as configured: the
    learning-rate rule's pick is read here, which the windows' picks are stored under)."""
    return {"trained": 0, "skipped": cfg.experts.num_experts, "actor_restarts": 0, "shortcuts_written": 0,
            "windows": windows.picks(expert_lr.resolved(cfg))}


def run_experts(cfg: Config, board=None, poll: Poll | None = None) -> dict:
    """Train every missing expert and compress every expert into shortcuts (a range end auto: the windows' rule picks
    it from expert 0 first); returns counts and the rule's picks (:func:`~ptmst_ray.stages.windows.picks`)."""
    cfg = resolve_accelerator(cfg)
    store = expert_store(cfg)
    if legacy := store.legacy_files():
        log.warning("%s: %d file(s) of experts in the older one-file format (%s ...) are not read; the experts are "
                    "trained again. Delete them to free the space.", store.root, len(legacy), legacy[0])
    missing = store.missing_ids(cfg.experts.num_experts, experts_hash(cfg), cfg.experts.epochs)
    complete = [i for i in range(cfg.experts.num_experts) if i not in missing]
    # the shortcut actor and the expert actors end with the call, also when it is stopped (Ctrl-C in a notebook):
    # stored epochs and shortcuts are kept
    with Compressor(windows.resolved(cfg)) as compressor:  # range ends auto that the rule picked before: numbers
        # an expert whose shortcuts all exist costs no actor start (a rerun or a resume starts none)
        for i in complete:
            compressor.add(i)
        retries = _train_experts(cfg, missing, len(complete), compressor, board, poll) if missing else 0
        written = compressor.finish()
    return {"trained": len(missing), "skipped": len(complete), "actor_restarts": retries, "shortcuts_written": written,
            "windows": windows.picks(cfg)}


def _train_experts(cfg: Config, missing: list[int], stored: int, compressor: Compressor, board, poll: Poll | None
                   ) -> int:
    """Train the ``missing`` experts on a pool of actors, handing each to ``compressor`` as it is stored; returns the
    actors' restarts. The actors end when it returns or raises."""
    n_actors = min(cluster_info().slots(cfg.experts.gpus_per_expert, uses_gpus(cfg)), len(missing))
    options = _actor_options(cfg, n_actors)
    request_gpus(cfg, n_actors, cfg.experts.gpus_per_expert, "experts")
    log.info("training %d expert(s) on %d actor(s) (%s), %d already complete", len(missing), n_actors, options, stored)
    cfg_dict = cfg.to_dict()
    actors = [ExpertActor.options(name=actor_name(f"expert-actor-{k}"), **options).remote(cfg_dict)
              for k in range(n_actors)]
    queue = ActorQueue(actors, lambda actor, eid: actor.train.options(name=expert_tag(eid)).remote(eid, board),
                       poll, label=lambda eid: f"expert {eid}")
    try:
        for done, (eid, _) in enumerate(queue.run(missing), start=stored + 1):
            compressor.add(eid)
            report_progress(board, "experts", done, cfg.experts.num_experts)
    finally:
        for actor in actors:
            ray.kill(actor)
    return queue.restarts


class Compressor:
    """Hands finished experts to one shortcut actor, started with the first expert that needs it (when the memory it
    needs is known). A range end auto that the windows' rule has not picked yet holds every expert back until
    expert 0, which the rule reads, is stored; then the actor's first call (expert 0's) picks the ends, and only
    the actor knows the ranges: every later expert goes to it (it skips the shortcuts already stored)."""

    def __init__(self, cfg: Config):
        self.cfg, self.cfg_dict = cfg, cfg.to_dict()
        self.auto = self.waiting = windows.is_auto(cfg)
        self.held: list[int] = []
        self.refs: list = []
        self.actor = None

    def add(self, expert_id: int) -> None:
        if self.waiting:
            self.held.append(expert_id)
            if windows.EXPERT in self.held:  # the rule's expert first, then the rest in the order they finished
                for i in sorted(self.held, key=lambda i: i != windows.EXPERT):
                    self._compress(i)
                self.held, self.waiting = [], False
        elif self.auto or missing_shortcuts(self.cfg, expert_id):  # auto: only the actor knows the ranges
            self._compress(expert_id)

    def _compress(self, expert_id: int) -> None:
        if self.actor is None:
            self.actor = _shortcut_actor(self.cfg_dict)
        self.refs.append(_compress(self.actor, expert_id))

    def finish(self) -> int:
        """Wait for every compression; the shortcuts written (the actor ends with the `with` block)."""
        if self.held:
            raise StageError(f"range_end auto: expert {windows.EXPERT} is not among the stored experts, and the "
                             f"windows' rule reads it; train the experts first (`ptmst-ray experts`)")
        return sum(len(ranges) for ranges in ray.get(self.refs)) if self.refs else 0  # none: Ray not needed

    def __enter__(self) -> Compressor:
        return self

    def __exit__(self, *exc) -> None:
        """The actor ends, whatever it is doing (the shortcuts it wrote are kept)."""
        if self.actor is not None:
            ray.kill(self.actor)
            self.actor = None


@ray.remote
def _lr_candidate_task(cfg_dict: dict, lr: float, board=None) -> list[float]:
    """One candidate of the experts' learning-rate rule: its probe expert, as a task named ``expert lr <lr>``."""
    from ptmst_ray.trajectories.expert import ALIGNED_EPOCHS

    cfg = from_dict(cfg_dict)
    set_threads(worker_threads(cfg.run.threads_per_worker))
    name = f"expert lr {lr:g}"
    report_progress(board, name, 0, ALIGNED_EPOCHS, "starting")

    def on_epoch(epoch: int, metrics: dict) -> None:
        report_progress(board, name, epoch, ALIGNED_EPOCHS, f"loss {metrics.get('loss', float('nan')):.3f}")

    return expert_lr.try_candidate(cfg, lr, on_epoch)


def run_expert_lr(cfg: Config, board=None, poll: Poll | None = None) -> tuple[Config, int]:
    """``experts.lr_img: auto``: the rule's untried candidates at once, one task each with an expert actor's
    resources; returns the config with the pick (a StageError when no candidate passes) and how many candidates
    were tried now. Other configs: as given, 0."""
    todo = expert_lr.missing(cfg)
    if todo:
        probe = cfg.replace(**{"experts.lr_img": todo[0], "experts.lr_txt": todo[0]})  # sized as an expert
        log.info("experts' learning-rate rule: %d probe expert(s) (lr %s), %d epochs each", len(todo),
                 ", ".join(f"{lr:g}" for lr in todo), expert_lr.probe_experts(cfg, todo[0]).epochs)
        options = _actor_options(probe, len(todo))
        # a short stage ahead of the experts: the experts' larger standing request (run_pipeline) stays
        request_gpus(cfg, len(todo), cfg.experts.gpus_per_expert, "the experts' learning-rate rule", keep_larger=True)
        wait_all([_lr_candidate_task.options(name=f"expert lr {lr:g}", **options).remote(cfg.to_dict(), lr, board)
                  for lr in todo], poll)
    return expert_lr.resolved(cfg), len(todo)


def complete_experts(cfg: Config) -> list[int]:
    """The stored experts of this config (no Ray needed); a StageError naming the command when there are none."""
    ids = expert_store(cfg).complete_ids(experts_hash(cfg), cfg.experts.epochs)
    if not ids:
        raise StageError(f"{cfg.run.root}: no complete experts for this config; run `ptmst-ray experts` first")
    return ids


def shortcuts_stored(cfg: Config) -> bool:
    """True when every complete expert's shortcut of every range the phases need is stored (the range ends picked):
    :func:`run_shortcuts` then writes nothing and needs no Ray."""
    cfg = windows.resolved(cfg)
    return not windows.is_auto(cfg) and not any(missing_shortcuts(cfg, i) for i in complete_experts(cfg))


def run_shortcuts(cfg: Config) -> dict:
    """`ptmst-ray shortcut`: compress every complete expert for the configured ranges (a range end auto: picked by
    the windows' rule first; no actor starts, and Ray is not used, when every shortcut is stored)."""
    ids = complete_experts(cfg)
    with Compressor(windows.resolved(cfg)) as compressor:
        for i in ids:
            compressor.add(i)
        written = compressor.finish()
    return {"experts": len(ids), "written": written, "ranges": needed_ranges(windows.check_resolved(cfg)),
            "windows": windows.picks(cfg)}
