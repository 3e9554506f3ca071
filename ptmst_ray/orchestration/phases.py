"""Phases as concurrent Ray Train runs: one Train run (one worker) per phase, all at once.

Why this file exists: the phases do not depend on each other, so P phases on P GPUs take the
time of the slowest. Each phase is a Train run named by its config hash under
``<root>/phases``: checkpoints go through Train's checkpointing (safetensors + JSON, no pickle),
a failed worker is retried from its last checkpoint (FailureConfig), and running the same
config again resumes unfinished phases and skips finished ones (their subset manifest exists).

A phase's launcher (:func:`fit_phase`, a Ray task that builds the Train run and blocks on ``fit()``) imports this
module and nothing of torch: torch, the student and the distillation are imported by the Train worker that
computes (:func:`phase_train_func`), and the driver sizes the run's memory (:func:`phase_memory`) and hands it over.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
import shutil
import signal
import threading
import time
from typing import Any

import ray
from ray.train import Checkpoint, CheckpointConfig, CheckpointUploadMode, FailureConfig, RunConfig, ScalingConfig
from ray.train.v2._internal.callbacks.datasets import DatasetsCallback
from ray.train.v2.api.data_parallel_trainer import DataParallelTrainer

from ptmst_ray import storage, tensorio
from ptmst_ray.config import Config, PhaseConfig, build_section, from_dict
from ptmst_ray.layout import TRAIN_SNAPSHOT, Layout, PhaseJob, phase_jobs, phase_outcome
from ptmst_ray.orchestration.metrics import phase_metrics
from ptmst_ray.orchestration.runtime import (
    Poll, check_threads, cluster_info, ensure_train_state_actor, record_attempt, report_progress,
    request_gpus, resolve_accelerator, run_all, uses_gpus,
)

log = logging.getLogger(__name__)

MAX_FAILURES = 2
HEALTH_CHECK_VAR = "RAY_TRAIN_HEALTH_CHECK_INTERVAL_S"
HEALTH_CHECK_S = "0.5"
"""How often a Train run's controller polls its worker (Ray Train 2.60's default: every 2 s). The controller
notices the worker group up, and the training function returned, only at its next poll, so every run waited up to
two polls for nothing (bench/RESULTS.md "Scaling", what cut Ray's costs). A poll is one small remote call to
the run's one worker. Train's controller takes the value from the environment of the process that calls fit()
(Train 2.60 propagates this variable), so :func:`make_trainer` sets it there; a value already set is kept."""
_PYARROW_SCHEMES = ("s3", "gs", "gcs", "hdfs", "viewfs", "abfs", "abfss", "file")


def storage_args(url: str) -> dict[str, Any]:
    """RunConfig storage for a local path or URL; fsspec-only schemes go through pyarrow's FSSpecHandler.

    On GCS with STORAGE_EMULATOR_HOST set, pyarrow's GcsFileSystem is pointed at the emulator explicitly: gcsfs
    and Google's clients read that variable, pyarrow's filesystem from a ``gs://`` URI does not (it would go to
    Google's endpoint)."""
    scheme = url.split("://", 1)[0] if "://" in url else ""
    import pyarrow.fs

    emulator = storage.gcs_emulator() if scheme in storage.GCS_SCHEMES else None
    if emulator:
        http, host = emulator.split("://", 1)
        fs = pyarrow.fs.GcsFileSystem(anonymous=True, endpoint_override=host.rstrip("/"), scheme=http)
        return {"storage_path": url.split("://", 1)[1], "storage_filesystem": fs}
    if not scheme or scheme in _PYARROW_SCHEMES:
        return {"storage_path": url}

    fs, path = storage.filesystem(url)
    return {"storage_path": path, "storage_filesystem": pyarrow.fs.PyFileSystem(pyarrow.fs.FSSpecHandler(fs))}


def _scalar_metrics(metrics: dict) -> dict:
    return {k: (float(v) if isinstance(v, (int, float)) and not isinstance(v, bool) else str(v))
            for k, v in metrics.items()}


def phase_train_func(config: dict) -> None:
    """Per-worker function: parse the config, distil the phase, report metrics and checkpoints."""
    import ray.train.torch
    import torch

    from ptmst_ray.device import pick_device, set_threads
    from ptmst_ray.stages.phase import distill_phase

    cfg = from_dict(config["cfg"])
    name, phase = config["name"], build_section(PhaseConfig, config["phase"])
    set_threads(config["threads"])
    check_threads(config["threads"])
    device = ray.train.torch.get_device() if torch.cuda.is_available() else pick_device()
    if device.type == "cuda":
        torch.cuda.set_device(device)  # the one setting TorchTrainer's context made for a one-worker run
    board = config.get("board")
    label = config.get("label") or name  # progress-board name (sweep trials prefix their id)
    layout = Layout.of(cfg)
    metrics_url = layout.metrics(name)
    history: list[dict] = []
    resume_state = None
    ckpt = ray.train.get_checkpoint()
    if ckpt is not None:
        with ckpt.as_directory() as d:
            resume_state, _ = tensorio.load_state(d)
    given = int(resume_state["iteration"]) if resume_state is not None else None
    stored = None
    if config.get("run_name"):
        # the controller's checkpoint can be older than one already on storage (a kill between
        # the upload and its registration): take the furthest intact state of the two
        stored = latest_stored(layout.train_run(config["run_name"]), above=given)
        resume_state = furthest_state(resume_state, stored[0] if stored else None)
    if resume_state is not None:
        if storage.exists(metrics_url):
            history = [m for m in storage.read_json(metrics_url) if m["iteration"] <= resume_state["iteration"]]
        log.info("%s: resuming from the checkpoint at iteration %d", name, resume_state["iteration"])
    if stored is not None:
        # Train holds an earlier checkpoint than the one resumed from: register that one with it, so that Train's
        # checkpoints, its retention and the clean-up after fit() follow the run's real resume point
        at = [m for m in history if m["iteration"] == resume_state["iteration"]]
        register_stored_checkpoint(os.path.basename(stored[1]),
                                   at[-1] if at else {"iteration": float(resume_state["iteration"])})
    start = time.time()
    attempt_url = layout.attempt(name, os.getpid(), start)
    attempt = record_attempt(attempt_url, start=start, given_checkpoint=given, threads=torch.get_num_threads(),
                             resumed_from=int(resume_state["iteration"]) if resume_state else None)
    pending: dict[str, str] = {}
    last_recall: dict[str, float] = {}
    trial = config.get("trial") or ""

    def save_checkpoint(state: dict) -> None:
        tmp = storage.scratch_dir(name)
        tensorio.save_state(tmp, state, meta={"phase": name})
        pending["dir"] = tmp

    def report(metrics: dict, is_checkpoint: bool) -> None:
        metrics = _scalar_metrics(metrics)
        history.append(metrics)
        phase_metrics(metrics, name, trial)
        if "recall/r_mean" in metrics:
            last_recall["r_mean"] = metrics["recall/r_mean"]
        recall = f" r_mean {last_recall['r_mean']:.1f}" if "r_mean" in last_recall else ""
        report_progress(board, label, metrics["iteration"], phase.iterations,
                        f"M {metrics['loss']:.4f} a_img {metrics['alpha_img']:.3g} {metrics['sec_per_iter']:.2f}s/it"
                        + recall)
        # Only checkpoints go through ray.train.report: Train 2.60 takes one report per worker per
        # controller poll (2 s) and blocks the next until then, so a report per iteration would pace the
        # phase at 2 s an iteration (bench/RESULTS.md "Ray Train's report"). Metrics reach the board,
        # Prometheus and metrics.json above without it.
        if is_checkpoint and "dir" in pending:
            storage.write_json(metrics_url, history)
            d = pending.pop("dir")
            ray.train.report(metrics, checkpoint=Checkpoint.from_directory(d))
            shutil.rmtree(d, ignore_errors=True)

    result = distill_phase(cfg, name, phase, device=device, seed=config["seed"],
                                  save_checkpoint=save_checkpoint, report=report, resume_state=resume_state,
                                  until=config.get("until"))
    storage.write_json(metrics_url, history)
    final = {"iteration": float(history[-1]["iteration"]) if history else float(phase.iterations),
             "status": result["status"]}
    if "dir" in pending:  # divergence / `until` checkpoint: a resume sees it and does not redo the phase
        d = pending.pop("dir")
        ray.train.report(final, checkpoint=Checkpoint.from_directory(d))
        shutil.rmtree(d, ignore_errors=True)
    report_progress(board, label, phase.iterations if result["status"] == "done" else final["iteration"],
                    phase.iterations, result["status"])
    record_attempt(attempt_url, attempt, end=time.time(), status=result["status"])


def furthest_state(*states: dict | None) -> dict | None:
    """The state with the highest ``iteration`` among those given (None entries skipped), or None."""
    found = [s for s in states if s is not None]
    return max(found, key=lambda s: int(s["iteration"])) if found else None


def latest_stored_state(run_dir: str, above: int | None = None) -> dict | None:
    """The state of :func:`latest_stored`, or None."""
    found = latest_stored(run_dir, above)
    return found[0] if found else None


def latest_stored(run_dir: str, above: int | None = None) -> tuple[dict, str] | None:
    """(state, folder URL) of the furthest intact phase state among the Train run's checkpoint folders (past
    ``above``), or None.

    Ray Train hands a restarted worker its latest *registered* checkpoint, but when the worker
    process is SIGKILLed, Train 2.60 restarts it with ``get_checkpoint() is None`` or with an
    earlier checkpoint than the last one uploaded (uploaded, yet not registered with the
    controller when the process died). The checkpoints are on the run's storage
    all the same, each hash-checked by :func:`tensorio.load_state`; a partial upload fails that
    check and is skipped, so a kill during an upload falls back to the previous checkpoint.
    Only the JSON skeletons are read to order them; tensors are read from the furthest down
    until one is intact (at paper scale a state is hundreds of MB, perhaps on remote storage),
    and not at all for states at or before ``above`` (the iteration the caller already holds).
    """
    found = []
    for entry, iteration in _stored_iterations(run_dir):
        url = storage.join(run_dir, entry)
        if iteration is None:
            log.warning("%s: skipping a checkpoint without a readable state.json (a cut upload?)", url)
        elif above is None or iteration > above:
            found.append((iteration, url))
    for iteration, url in sorted(found, reverse=True):
        try:
            state, _ = tensorio.load_state(url)
        except Exception as e:  # noqa: BLE001 - partial/corrupt upload: skip it, say so
            log.warning("%s: skipping unreadable checkpoint (%s)", url, e)
            continue
        return state, url
    return None


def register_stored_checkpoint(folder: str, metrics: dict) -> None:
    """Register with Ray Train a checkpoint folder that is already in this run's storage (nothing is copied).

    Called by a worker that resumes from a state Train never registered (:func:`latest_stored`): without it,
    Train keeps handing out and retaining its older checkpoints, and the resumed state's folder stays outside
    ``num_to_keep`` (a run killed just after its last upload ended with four checkpoint folders, not two).
    """
    store = ray.train.get_context().get_storage()
    checkpoint = Checkpoint(path=f"{store.experiment_fs_path.rstrip('/')}/{folder}", filesystem=store.storage_filesystem)
    ray.train.report(_scalar_metrics(metrics), checkpoint=checkpoint,
                     checkpoint_upload_mode=CheckpointUploadMode.NO_UPLOAD)


def checkpoint_dirs(run_dir: str) -> list[str]:
    """The base names of a Train run's checkpoint folders (not its :data:`TRAIN_SNAPSHOT` file)."""
    return [e for e in storage.listdir(run_dir)
            if e.startswith("checkpoint_") and storage.isdir(storage.join(run_dir, e))]


def _stored_iteration(checkpoint_dir: str) -> int | None:
    """The ``iteration`` in a checkpoint's JSON skeleton (no tensors read), or None if it has none."""
    try:
        return int(tensorio.load_scalars(checkpoint_dir)["iteration"])
    except Exception:  # noqa: BLE001 - missing/partial upload: no iteration
        return None


def _stored_iterations(run_dir: str) -> list[tuple[str, int | None]]:
    """(folder name, :func:`_stored_iteration`) of each of the run's checkpoint folders."""
    return [(e, _stored_iteration(storage.join(run_dir, e))) for e in checkpoint_dirs(run_dir)]


def prune_unregistered(run_dir: str, registered: list[str]) -> list[str]:
    """Delete the ``checkpoint_*`` folders of a finished Train run that Train does not hold.

    A worker killed between uploads and their registration leaves folders Train never held:
    Train's ``num_to_keep`` counts registered checkpoints only, so they are never deleted (up to
    ~1 GB each at paper scale); the restarted worker registers the furthest of them
    (:func:`register_stored_checkpoint`), not those before it, and an upload cut by a kill
    leaves a partial folder. Call only after ``fit()`` returned, when no worker writes.
    ``registered``: the base names of the checkpoints Train keeps (``Result.best_checkpoints``);
    every folder Train's :data:`TRAIN_SNAPSHOT` names is kept as well (a restore asserts that they
    all exist). A folder whose state is further than every registered one is kept: it is the
    resume point. Returns the deleted folders' URLs.
    """
    snapshot = storage.join(run_dir, TRAIN_SNAPSHOT)
    tracked = storage.read_text(snapshot) if storage.exists(snapshot) else ""
    stored = _stored_iterations(run_dir)
    kept = [i for n, i in stored if n in registered and i is not None]
    if not kept:
        return []
    removed = []
    for entry, iteration in stored:
        if entry in registered or entry in tracked or (iteration is not None and iteration > max(kept)):
            continue
        url = storage.join(run_dir, entry)
        storage.remove(url, recursive=True)
        removed.append(url)
    if removed:
        log.info("%s: removed %d checkpoint folder(s) Train does not track: %s", run_dir, len(removed),
                 ", ".join(os.path.basename(u) for u in removed))
    return removed


def fit_and_prune(trainer: DataParallelTrainer, run_dir: str):
    """``trainer.fit()``, then :func:`prune_unregistered` on its run folder; returns the Result.
    The clean-up only frees space: if it fails, a warning says so and the run still counts.

    Called on a process's main thread (the launcher task), Train 2.60's ``fit()`` installs a SIGINT handler that
    holds the run's controller actor and never removes it: the finished controller (~700 MB) then lives as long as
    the launcher's worker process. The handler that was there before is put back when ``fit()`` returns or raises,
    which releases the controller."""
    on_main = threading.current_thread() is threading.main_thread()
    handler = signal.getsignal(signal.SIGINT) if on_main else None
    try:
        result = trainer.fit()
    finally:
        if on_main:
            signal.signal(signal.SIGINT, handler)
    names = [os.path.basename(str(c.path).rstrip("/")) for c, _ in (result.best_checkpoints or [])]
    try:
        prune_unregistered(run_dir, names)
    except Exception as e:  # noqa: BLE001 - storage hiccup: the finished work must not be marked failed
        log.warning("%s: could not remove stale checkpoint folders (%s); they may be deleted by hand", run_dir, e)
    return result


def phase_memory(cfg: Config) -> dict:
    """What a phase worker holds in host memory: the caption embeddings (it decodes only its initial
    images) and every expert's shortcut for its range (the raw ablation reads each snapshot when used: two
    at a time), as a Ray ``memory`` request."""
    from ptmst_ray.orchestration.experts import memory_option, shortcut_nbytes, split_nbytes

    teachers = (cfg.experts.num_experts * shortcut_nbytes(cfg) if cfg.shortcut.enabled else shortcut_nbytes(cfg))
    return memory_option(split_nbytes(cfg, images=False) + teachers)


class PhaseTrainer(DataParallelTrainer):
    """Train's generic trainer, less the dataset manager of a run given no Ray Dataset. Train 2.60 starts a
    ``DatasetManager`` actor for every run, datasets or not (its ``DatasetsCallback``), and a phase reads its data
    itself and passes Train none: one process per run that does nothing but start (bench/RESULTS.md "Scaling",
    the Train runs' processes). With datasets the trainer is Train's own."""

    def _create_default_callbacks(self) -> list:
        callbacks = super()._create_default_callbacks()
        if self.datasets:
            return callbacks
        return [c for c in callbacks if not isinstance(c, DatasetsCallback)]


def make_trainer(cfg_dict: dict, name: str, phase: dict, seed: int, run_name: str, board=None,
                 max_failures: int = MAX_FAILURES, until: int | None = None,
                 label: str | None = None, trial: str = "", cpus: int = 1, memory: dict | None = None) -> PhaseTrainer:
    """One phase's Train run; ``until`` stops it early (checkpointed), ``label`` names its progress bar,
    ``trial`` (a sweep trial's id) tags its metrics, ``cpus`` is what its worker asks for when it computes on
    CPUs (its torch threads unless ``run.threads_per_worker`` is set; a GPU worker asks for one), ``memory`` its
    :func:`phase_memory` when the caller has it (the launcher is given it: computing it imports torch). The run's name
    (the dashboard's Train page) is ``run_name``; Train 2.60 gives its controller and worker actors no name of
    their own."""
    cfg = from_dict(cfg_dict)
    os.environ.setdefault(HEALTH_CHECK_VAR, HEALTH_CHECK_S)  # read by fit() in this process
    gpus = cfg.distill.gpus_per_phase if uses_gpus(cfg) else 0  # the run's target, not the GPUs up right now
    cpus = 1 if gpus else max(1, cpus)
    threads = cfg.run.threads_per_worker or cpus
    scaling = ScalingConfig(num_workers=1, use_gpu=gpus > 0,
                            resources_per_worker={"CPU": cpus, **({"GPU": gpus} if gpus else {}),
                                                  **(phase_memory(cfg) if memory is None else memory)})
    run_config = RunConfig(name=run_name, failure_config=FailureConfig(max_failures=max_failures),
                           checkpoint_config=CheckpointConfig(num_to_keep=2),
                           **storage_args(Layout.of(cfg).phases))
    # Train's generic trainer, not TorchTrainer: a phase is one worker and calls no collectives, so TorchTrainer's
    # gloo process group was start-up for nothing, and its TorchConfig made the run's controller import torch
    # (bench/RESULTS.md "Scaling", what cut Ray's costs); phase_train_func sets the CUDA device
    return PhaseTrainer(phase_train_func, scaling_config=scaling, run_config=run_config,
                        train_loop_config={"cfg": cfg_dict, "name": name, "phase": phase, "seed": seed,
                                           "threads": threads, "board": board, "until": until, "label": label,
                                           "run_name": run_name, "trial": trial})


@ray.remote(num_cpus=0)
def fit_phase(cfg_dict: dict, name: str, phase: dict, seed: int, run_name: str, board=None, cpus: int = 1,
              memory: dict | None = None) -> dict:
    """Launcher task (holds no CPU): build the phase's Train run and block on fit()."""
    trainer = make_trainer(cfg_dict, name, phase, seed, run_name, board, cpus=cpus, memory=memory)
    try:
        fit_and_prune(trainer, Layout.of(from_dict(cfg_dict)).train_run(run_name))
    except Exception as e:  # noqa: BLE001 - Train wraps worker errors; report them per phase
        return {"name": name, "status": "failed", "detail": f"{type(e).__name__}: {e}"}
    return {"name": name, "status": "finished"}


def run_phases(cfg: Config, board=None, poll: Poll | None = None, with_baseline: bool = True) -> dict[str, dict]:
    """Distil every phase (and the single-phase baseline) as concurrent Train runs; returns per-phase status."""
    cfg = resolve_accelerator(cfg)
    cfg_dict = cfg.to_dict()
    todo: collections.deque[PhaseJob] = collections.deque()
    status = {}
    for job in phase_jobs(cfg, with_baseline):
        if phase_outcome(cfg, job).status == "done":
            status[job.name] = {"status": "done", "skipped": True}
            report_progress(board, job.name, job.phase.iterations, job.phase.iterations, "done (skipped)")
        else:
            todo.append(job)
    cluster, on_gpus = cluster_info(), uses_gpus(cfg)
    slots = cluster.slots(cfg.distill.gpus_per_phase, on_gpus)
    if cfg.distill.max_concurrent:
        slots = min(slots, cfg.distill.max_concurrent)
    cpus = 1 if on_gpus else cluster.cpu_share(min(len(todo), slots))  # fewer runs than CPUs: threads
    log.info("%d distillation run(s) to do, up to %d at once%s", len(todo), slots,
             "" if on_gpus else f", {cpus} CPU(s) each")

    if todo:
        request_gpus(cfg, min(len(todo), slots), cfg.distill.gpus_per_phase, "phases")
        ensure_train_state_actor()  # concurrent runs would race to create it (a spurious failed task)

    memory = phase_memory(cfg) if todo else {}  # sized here: the launchers import no torch

    def submit(job: PhaseJob):
        return fit_phase.options(name=f"phase {job.run_name}").remote(
            cfg_dict, job.name, dataclasses.asdict(job.phase), job.seed, job.run_name, board, cpus, memory)

    def finished(job: PhaseJob, ref) -> None:
        status[job.name] = ray.get(ref)

    run_all(todo, submit, slots, finished, poll)  # stopped (Ctrl-C in a notebook): the runs are aborted
    for job in phase_jobs(cfg, with_baseline):
        outcome = phase_outcome(cfg, job)
        if outcome.status == "done":
            status[job.name] = {**status.get(job.name, {}), "status": "done"}
        elif outcome.status == "diverged":
            status[job.name] = {"status": "diverged", "detail": outcome.detail}
    return status
