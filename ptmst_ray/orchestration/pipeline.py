"""The driver: the whole pipeline, stage by stage, skipping what is already complete.

prepare data -> pretrain (built-in default) -> caption embeddings -> experts (actor pool) +
shortcuts (pipelined actor) -> phases (concurrent Train runs) -> aggregate -> evaluation
(one Ray task per method and seed; on GPUs a pool of actors, one per GPU) -> results.json, table,
plot. The CLI passes a ``ui`` object for stage headers and progress; nothing here prints.
"""

from __future__ import annotations

import contextlib
import dataclasses
import logging
import time
from typing import Any

import ray

from ptmst_ray import storage
from ptmst_ray.config import Config, PretrainConfig, build_section, from_dict
from ptmst_ray.device import set_threads
from ptmst_ray.layout import Layout, phase_jobs
from ptmst_ray.orchestration.experts import (
    memory_option, pairs_split_nbytes, run_expert_lr, run_experts, split_nbytes, stream_nbytes,
)
from ptmst_ray.orchestration.metrics import stage_started
from ptmst_ray.orchestration.runtime import (
    UI, ActorQueue, NullUI, Poll, actor_name, cluster_info, make_poll, progress_board, release_gpus, report_progress,
    request_gpus, resolve_accelerator, student_threads, task, uses_gpus, wait_all, worker_threads,
)
from ptmst_ray.stages import aggregate as aggregate_stage
from ptmst_ray.stages import data as data_stage
from ptmst_ray.stages import embed as embed_stage
from ptmst_ray.stages import expert_lr, windows
from ptmst_ray.stages import features as features_stage
from ptmst_ray.stages import pretrain as pretrain_stage
from ptmst_ray.stages.plots import plot_run
from ptmst_ray.stages.score import schedule, score_key, score_one_seed, store_score, stored_score, summarise
from ptmst_ray.vocab import PTM_ST, SINGLE_PHASE

log = logging.getLogger(__name__)


class PipelineError(RuntimeError):
    """A stage failed; finished work is kept and the same command resumes."""


def task_resources(cfg: Config) -> dict:
    """What one heavy task (an evaluation student, a pretraining run) asks Ray for: ``run.gpus_per_task``
    GPUs and one CPU when the run targets GPUs (``run.accelerator``), else one CPU (as the experts'
    ``_actor_options``)."""
    if cfg.run.gpus_per_task > 0 and uses_gpus(cfg):
        return {"num_cpus": 1, "num_gpus": cfg.run.gpus_per_task}
    return {"num_cpus": 1}


def pretrain_resources(cfg: Config) -> dict:
    """A pretraining run's :func:`task_resources` and the memory of the pretrain split it trains on."""
    return {**task_resources(cfg), **memory_option(pairs_split_nbytes(cfg, "pretrain"))}


def pretrain_run_options(cfg: Config, runs: int) -> dict:
    """What each of the stage's ``runs`` pretraining runs, trained at once, asks Ray for: :func:`pretrain_resources`,
    on CPUs with the CPUs shared between the runs (one run alone takes them all: its torch threads follow)."""
    options = pretrain_resources(cfg)
    if "num_gpus" not in options:
        options["num_cpus"] = cluster_info().cpu_share(runs)
    return options


def score_resources(cfg: Config) -> dict:
    """An evaluation task's :func:`task_resources` and the memory of the real data it holds."""
    return {**task_resources(cfg), **memory_option(split_nbytes(cfg))}


@task(num_cpus=1)
def _pretrain_run_task(cfg_dict: dict, run: dict, label: str, board=None) -> dict:
    """One CLIP run of the pretraining stage on the GPU Ray gave it (``task_resources``), else on its share of the
    CPUs (as many torch threads)."""
    set_threads(worker_threads(from_dict(cfg_dict).run.threads_per_worker))
    run_cfg = build_section(PretrainConfig, run)
    return pretrain_stage.pretrain_run(from_dict(cfg_dict), run_cfg, label=label,
                                       on_epoch=lambda epoch, _m: report_progress(board, label, epoch, run_cfg.epochs))


@ray.remote(num_cpus=0)
def pretrain_task(cfg_dict: dict, board=None) -> dict | None:
    """The pretraining stage; its CLIP runs (two with separate towers) train at once, one task each."""

    def train(_cfg, runs: list) -> list[dict]:
        labels = pretrain_stage.run_labels(len(runs))
        options = pretrain_run_options(from_dict(cfg_dict), len(runs))
        return ray.get([_pretrain_run_task.options(name=label, **options).remote(cfg_dict, dataclasses.asdict(r),
                                                                                label, board)
                        for r, label in zip(runs, labels)])

    return pretrain_stage.pretrain(from_dict(cfg_dict), train=train)


@task(num_cpus=1)
def _embed_task(cfg_dict: dict, board=None) -> dict:
    """The caption-embedding stage on the GPU Ray gave it (the text tower picks CUDA where there is one):
    BERT-base over 145k-566k captions is hours on a head's CPUs, minutes on a GPU."""
    cfg = from_dict(cfg_dict)
    set_threads(worker_threads(cfg.run.threads_per_worker))
    writes, start = storage.writes(), time.time()
    key = embed_stage.embed(cfg, progress=lambda done, total: report_progress(board, "embed captions", done, total))
    return {"key": key, "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "ran": storage.writes() > writes, "start": start}


def embed_captions(cfg: Config, board=None, poll: Poll | None = None) -> dict:
    """The caption-embedding stage: a Ray task with ``run.gpus_per_task`` GPUs when the run targets GPUs,
    else here in the driver (a laptop: no worker to start, the same bytes as before)."""
    options = task_resources(cfg)
    if not options.get("num_gpus"):
        return {"key": embed_stage.embed(cfg), "node_id": None, "gpu_ids": []}
    key = embed_stage.done_key(cfg)
    if key is not None:  # finished: no GPU to ask for, no task to start
        return {"key": key, "node_id": None, "gpu_ids": [], "ran": False}
    request_gpus(cfg, 1, options["num_gpus"], "embed", keep_larger=True)  # the experts' request covers it
    return wait_all([_embed_task.options(name="embed captions", **options).remote(cfg.to_dict(), board)], poll)[0]


def _features_progress(board):
    """The feature pass's progress callback for the board (None without one)."""
    return (lambda done, total: report_progress(board, "image features", done, total)) if board else None


@task(num_cpus=1)
def _features_task(cfg_dict: dict, board=None) -> dict:
    """The frozen-tower feature pass on the GPU Ray gave it (the tower picks CUDA where there is one)."""
    cfg = from_dict(cfg_dict)
    set_threads(worker_threads(cfg.run.threads_per_worker))
    out = features_stage.compute(cfg, progress=_features_progress(board))
    return {**out, "node_id": ray.get_runtime_context().get_node_id(),
            "gpu_ids": [str(g) for g in ray.get_gpu_ids()]}


def image_features(cfg: Config, board=None, poll: Poll | None = None) -> dict:
    """A frozen image tower's features of every real image, computed once (``stages/features.py``): a Ray task
    with ``run.gpus_per_task`` GPUs when the run targets GPUs, else here in the driver (as the caption
    embeddings); nothing to do, and logged, when the tower trains or ``model.cache_frozen_features`` is off."""
    reason = features_stage.skip_reason(cfg)
    if reason:
        log.info("frozen-tower features: skipped: %s", reason)
        return {"key": None, "ran": False, "skipped": reason, "node_id": None, "gpu_ids": []}
    options = {**task_resources(cfg), **memory_option(stream_nbytes(cfg))}  # one shard and a batch at a time
    if not options.get("num_gpus"):
        return {**features_stage.compute(cfg, progress=_features_progress(board)), "node_id": None, "gpu_ids": []}
    key = features_stage.done_key(cfg)
    if key is not None:  # finished: no GPU to ask for, no task to start
        return {"key": key, "ran": False, "skipped": None, "node_id": None, "gpu_ids": []}
    request_gpus(cfg, 1, options["num_gpus"], "features", keep_larger=True)  # the experts' request covers it
    return wait_all([_features_task.options(name="image features", **options).remote(cfg.to_dict(), board)], poll)[0]


def _score(cfg_dict: dict, method: str, seed: int, board=None) -> dict:
    """One (method, seed) student where this worker runs (its GPU, else its CPU thread), stored as it finishes."""
    cfg = from_dict(cfg_dict)
    name = f"eval {method} seed {seed}"
    points = cfg.eval.eval_points
    epochs = schedule(cfg.eval, method, data_stage.has_val(Layout.of(cfg).data))["epochs"]  # the most it trains

    def progress(r: dict) -> None:
        report_progress(board, name, r.get("epoch", 0), epochs)

    key = score_key(cfg, method, seed)  # before scoring: the inputs the score comes from
    out = score_one_seed(cfg, method, seed, progress=progress)
    report_progress(board, name, 1, 1, f"r_mean {out['best']['r_mean']:.1f} (of {points} points)")
    # results.json's runs: where each seed ran
    out = {**out, "gpu_ids": [str(g) for g in ray.get_gpu_ids()], "node_id": ray.get_runtime_context().get_node_id()}
    store_score(cfg, method, seed, out, key)  # kept as soon as it is finished, whatever happens to the rest
    return out


@task(num_cpus=1)
def _score_task(cfg_dict: dict, method: str, seed: int, board=None) -> dict:
    """One (method, seed) student on one CPU thread of a pooled worker (a run on CPUs)."""
    set_threads(student_threads(from_dict(cfg_dict).run.threads_per_worker))
    return _score(cfg_dict, method, seed, board)


@ray.remote(max_restarts=-1, max_task_retries=0)
class ScoreActor:
    """Evaluation students one after another on the GPU(s) Ray gave this actor when it was made (a run on GPUs):
    one process per GPU slot, not one per student (each would import torch and open_clip and start CUDA again,
    and a pooled task worker must not be reused across GPUs: ``runtime.Task``). A student's memory is freed when
    it returns; torch keeps the cached blocks for the next one on the same device."""

    def __init__(self, cfg_dict: dict):
        set_threads(student_threads(from_dict(cfg_dict).run.threads_per_worker))

    def ready(self) -> bool:
        """A no-op: returns once a restarting actor is up again (``runtime.restarted``)."""
        return True

    def score(self, cfg_dict: dict, method: str, seed: int, board=None) -> dict:
        return _score(cfg_dict, method, seed, board)


def evaluation_methods(cfg: Config) -> list[str]:
    return [PTM_ST, *cfg.eval.baselines]


def _score_on_gpus(cfg: Config, todo: list[tuple[str, int]], options: dict, board, poll: Poll | None) -> dict:
    """The students of ``todo`` on one :class:`ScoreActor` per GPU slot the cluster has or can add (at most one
    per student), the full-data students first (the longest); an actor that dies restarts and its student is
    redone. Returns {(method, seed): score}."""
    n = min(cluster_info().slots(options["num_gpus"], True), len(todo))
    request_gpus(cfg, n, options["num_gpus"], "evaluation")
    cfg_dict = cfg.to_dict()
    actors = [ScoreActor.options(name=actor_name(f"eval-actor-{k}"), **options).remote(cfg_dict) for k in range(n)]
    queue = ActorQueue(actors, lambda actor, p: actor.score.options(name=f"eval {p[0]} seed {p[1]}").remote(
        cfg_dict, *p, board), poll, label=lambda p: f"eval {p[0]} seed {p[1]}")
    try:
        return dict(queue.run(sorted(todo, key=lambda p: p[0] != "full")))
    finally:
        for actor in actors:
            ray.kill(actor)


def scores_stored(cfg: Config, methods: list[str]) -> bool:
    """True when an earlier evaluation stored every (method, seed) score from the same inputs: :func:`evaluate`
    then trains no student and uses no Ray."""
    return all(stored_score(cfg, m, s) is not None for m in methods for s in range(cfg.eval.seeds))


def evaluate(cfg: Config, methods: list[str], board, poll: Poll | None) -> dict:
    """Every (method, seed) student but those whose scores an earlier evaluation stored from the same inputs
    (``stages.score.score_key``: those are reused, marked ``reused``): one Ray task each on CPUs, a pool of
    :class:`ScoreActor` on GPUs; results.json's scores. Ray is used only when a score is to compute."""
    pairs = [(m, s) for m in methods for s in range(cfg.eval.seeds)]
    stored = {(m, s): run for m, s in pairs if (run := stored_score(cfg, m, s)) is not None}
    for (m, s), run in stored.items():
        report_progress(board, f"eval {m} seed {s}", 1, 1, f"r_mean {run['best']['r_mean']:.1f} (stored)")
    todo = [p for p in pairs if p not in stored]
    if stored:
        log.info("evaluation: %d of %d (method, seed) scores reused, stored by an earlier evaluation of the same "
                 "inputs under %s; %d to compute", len(stored), len(pairs), Layout.of(cfg).eval, len(todo))
    computed = {}
    if todo:
        options = score_resources(cfg)
        if options.get("num_gpus"):
            computed = _score_on_gpus(cfg, todo, options, board, poll)
        else:
            refs = [_score_task.options(name=f"eval {m} seed {s}", **options).remote(cfg.to_dict(), m, s, board)
                    for m, s in todo]
            computed = dict(zip(todo, wait_all(refs, poll)))
    runs = [stored[p] if p in stored else computed[p] for p in pairs]
    results = summarise(runs, cfg)
    results["runs"] = runs
    return results


class StageTimes:
    """Wall time of each stage of a run and whether it did work (``ran``) or found it all complete.

    A stage run in the driver that wrote no file did no work; the Ray stages say what they did.
    """

    def __init__(self, run: str = "", poll: Poll | None = None):
        self.run = run
        """The run root: the ``stage`` metric's tag (the dashboard shows the stage in progress)."""
        self.poll = poll
        """Called with ``force=True`` as a stage ends: the display shows the stage's last state before the next."""
        self.rows: list[dict] = []
        """One row per stage in pipeline order: {"stage", "seconds", "ran"} (a list: JSON keeps its order)."""

    @contextlib.contextmanager
    def stage(self, name: str):
        """Time the stage ``name``; the body may set ``ran`` in the yielded dict (else: did it write files)."""
        stage_started(name, self.run)
        t0, writes, out = time.monotonic(), storage.writes(), {}
        yield out
        self.rows.append({"stage": name, "seconds": round(time.monotonic() - t0, 2),
                          "ran": bool(out["ran"]) if "ran" in out else storage.writes() > writes})
        if self.poll is not None:
            self.poll(force=True)


def built_times(rows: list[dict], previous: str) -> list[dict]:
    """``rows`` with, on each stage skipped as complete, ``built_seconds``: the time the run that built it took, from
    the results.json at ``previous`` that this run replaces (a second `run` would otherwise leave only its
    skipped stages' fractions of a second on record)."""
    try:
        before = {r["stage"]: r for r in storage.read_json(previous).get("stages", [])}
    except (storage.StorageError, AttributeError, KeyError, TypeError):  # none yet, or unreadable: nothing to carry
        before = {}
    for row in rows:
        old = before.get(row["stage"])
        if not row["ran"] and old is not None:
            built = old.get("seconds") if old.get("ran") else old.get("built_seconds")
            if isinstance(built, (int, float)):
                row["built_seconds"] = built
    return rows


def run_prerequisites(cfg: Config, ui: UI, board, poll: Poll, times: StageTimes | None = None,
                      where: dict | None = None) -> tuple[Config, dict]:
    """Data, pretraining, caption embeddings, the experts' learning rate (``experts.lr_img: auto``), experts +
    shortcuts (a range end auto: picked first by the windows' rule; each stage skipped when complete).

    Shared by `run` and `sweep`; returns the config the later stages take (with the experts' learning rate and the
    range ends the rules picked) and run_experts' counts. ``times`` records each stage's time, ``where`` (if given) receives
    ``embed``: the node and GPU ids the caption embeddings were computed on.
    """
    times = times or StageTimes(cfg.run.root, poll)
    ui.stage("data: prepare")
    with times.stage("data") as out:
        out["ran"] = False

        def progress(split: str, done: int, total: int) -> None:  # called only while something is prepared
            out["ran"] = True
            report_progress(board, f"data {split}", done, total)
            poll()

        data_stage.prepare(cfg, progress=progress)
    if cfg.pretrain.enabled:
        ui.stage("pretrain towers")
        with times.stage("pretrain") as out:
            out["ran"] = not pretrain_stage.is_done(cfg)
            if out["ran"]:  # a finished stage costs no worker start
                request_gpus(cfg, 2 if cfg.pretrain.towers == "separate" else 1,
                             task_resources(cfg).get("num_gpus", 0), "pretrain", keep_larger=True)
                wait_all([pretrain_task.options(name="pretrain").remote(cfg.to_dict(), board)], poll)
    ui.stage("caption embeddings")
    with times.stage("embed") as out:
        embedded = embed_captions(cfg, board, poll)
        if "ran" in embedded:  # computed in a Ray task: its writes are not this process's
            out["ran"] = embedded["ran"]
    if features_stage.skip_reason(cfg):  # a trainable tower (every recipe but CC3M's): no stage, one log line
        feats = image_features(cfg, board, poll)
    else:
        ui.stage("image features (frozen tower)")
        with times.stage("features") as out:
            feats = image_features(cfg, board, poll)
            out["ran"] = feats["ran"]
    if expert_lr.is_auto(cfg):
        ui.stage(f"experts' learning rate (rule over {len(set(cfg.experts.lr_candidates))} candidates)")
        with times.stage("expert_lr") as out:
            cfg, tried = run_expert_lr(cfg, board, poll)
            out["ran"] = tried > 0
        log.info("experts' learning rate: %g, the rule's pick of %s (%s)", cfg.experts.lr_img,
                 cfg.experts.lr_candidates, Layout.of(cfg).expert_lr)
    ui.stage(f"experts ({cfg.experts.num_experts}) + shortcuts"
             + (" (range ends auto: the windows' rule on expert 0 first)" if windows.is_auto(cfg) else ""))
    with times.stage("experts") as out:
        experts = run_experts(cfg, board, poll)
        out["ran"] = bool(experts["trained"] or experts["shortcuts_written"])
    if windows.is_auto(cfg):
        cfg = windows.check_resolved(cfg)
        log.info("range ends: %s, the windows' rule's picks from expert %d (%s)",
                 ", ".join(f"phase {w['phase']} [{w['range'][0]}, {w['range'][1]}]" for w in experts["windows"]),
                 windows.EXPERT, Layout.of(cfg).windows)
    if where is not None:
        where["embed"] = embedded
        where["features"] = feats
    return cfg, experts


def run_pipeline(cfg: Config, ui: UI | None = None) -> dict[str, Any]:
    """Run (or resume) everything; returns results.json's content."""
    ui = ui or NullUI()
    layout = Layout.of(cfg)
    storage.write_text(layout.config_yaml, cfg.to_yaml())
    info = cluster_info()
    log.info("cluster: %.0f CPUs, %.0f GPUs, %d node(s); run root %s", info.cpus, info.gpus, info.nodes, cfg.run.root)
    cfg = resolve_accelerator(cfg)  # every stage below asks for what this decides, whatever is up at the moment
    try:
        # GPU nodes take minutes to boot: ask for the experts' now, so they start while data and embeddings run
        request_gpus(cfg, cfg.experts.num_experts, cfg.experts.gpus_per_expert, "the run (experts first)")
        return _run_stages(cfg, ui)
    finally:
        release_gpus()  # idle GPU nodes may go once the run no longer needs them


def _run_stages(cfg: Config, ui: UI) -> dict[str, Any]:
    """The stages of :func:`run_pipeline` on a config whose accelerator is decided."""
    layout = Layout.of(cfg)
    board = progress_board()
    ray.get(board.clear.remote())
    poll = make_poll(board, ui)
    t0, times = time.time(), StageTimes(cfg.run.root, poll)
    where: dict = {}
    cfg, experts = run_prerequisites(cfg, ui, board, poll, times, where)

    baseline = SINGLE_PHASE in cfg.eval.baselines
    ui.stage(f"phases ({len(cfg.phases)}" + (" + single-phase baseline)" if baseline else ")"))
    with times.stage("phases") as out:
        # imported here: Ray Train (with Ray Data and pandas) is not worth importing in this module's task workers
        from ptmst_ray.orchestration.phases import run_phases

        status = run_phases(cfg, board, poll)
        out["ran"] = any(not s.get("skipped") for s in status.values())
    bad = {n: s for n, s in status.items() if s.get("status") != "done"}
    failed = {n: s for n, s in bad.items() if n != SINGLE_PHASE and s.get("status") != "diverged"}
    if failed:
        raise PipelineError("; ".join(f"{n}: {s.get('status')} ({s.get('detail')})" for n, s in failed.items())
                            + ". Finished phases are kept; fix the cause and run the same command again.")
    warnings = [f"{n} diverged ({s.get('detail')}); the distilled set uses its last finite EMA state. Lower "
                "distill.lr_img / lr_txt / lr_sim, then `ptmst-ray run --rebuild phases`"
                for n, s in bad.items() if n != SINGLE_PHASE]
    for w in warnings:
        log.warning("%s", w)

    ui.stage("aggregate distilled set")
    with times.stage("aggregate"):
        distilled = aggregate_stage.aggregate(cfg)
    methods = evaluation_methods(cfg)
    if SINGLE_PHASE in bad:
        log.warning("single-phase baseline %s; it is left out of the evaluation", bad[SINGLE_PHASE].get("status"))
        methods.remove(SINGLE_PHASE)
    ui.stage(f"evaluation ({', '.join(methods)} x {cfg.eval.seeds} seeds)")
    with times.stage("eval") as out:
        results = evaluate(cfg, methods, board, poll)
        out["ran"] = any(not r.get("reused") for r in results["runs"])
    results.update({"experts": experts, "experts_lr": [cfg.experts.lr_img, cfg.experts.lr_txt], "phases": status,
                    "distilled": distilled["pairs"],
                    "diverged_phases": distilled.get("diverged", []), "warnings": warnings,
                    "wall_seconds": time.time() - t0, "stages": built_times(times.rows, layout.results),
                    "run_root": cfg.run.root,
                    "accelerator": cfg.run.accelerator, "embed": where.get("embed"),
                    "features": where.get("features")})
    storage.write_json(layout.results, results)
    stage_started("", cfg.run.root)
    _plot(cfg, results)
    return results


def _plot(cfg: Config, results: dict) -> None:
    layout = Layout.of(cfg)
    histories = {}
    for job in phase_jobs(cfg):
        url = layout.metrics(job.name)
        histories[job.name] = storage.read_json(url) if storage.exists(url) else []
    plot_run(histories, results, layout.plot)
