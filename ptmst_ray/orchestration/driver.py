"""The driver: the whole pipeline, stage by stage, skipping what is already complete.

prepare data -> pretrain (built-in default) -> caption embeddings -> experts (actor pool) +
shortcuts (pipelined actor) -> phases (concurrent Train runs) -> aggregate -> evaluation
(one Ray task per method and seed) -> results.json, table, plot. The CLI passes a ``ui``
object for stage headers and progress; nothing here prints.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from typing import Any, Protocol

import ray

from ptmst_ray import storage
from ptmst_ray.config import Config, PretrainConfig, _build, from_dict
from ptmst_ray.device import set_threads
from ptmst_ray.orchestration import stages
from ptmst_ray.orchestration.runtime import check_interrupted, cluster_info, progress_board, report_progress

log = logging.getLogger(__name__)


class UI(Protocol):
    def stage(self, name: str) -> None: ...

    def update(self, tasks: dict[str, dict]) -> None: ...


class NullUI:
    def stage(self, name: str) -> None:
        log.info("== %s", name)

    def update(self, tasks: dict[str, dict]) -> None:
        pass


class PipelineError(RuntimeError):
    """A stage failed; finished work is kept and the same command resumes."""


def _poller(board, ui: UI):
    last = [0.0]

    def poll() -> None:
        check_interrupted()
        now = time.monotonic()
        if now - last[0] >= 0.5:
            last[0] = now
            try:
                ui.update(ray.get(board.snapshot.remote(), timeout=5))
            except Exception as e:  # noqa: BLE001 - the display must not fail the run
                log.debug("progress poll failed: %s", e)

    return poll


def _wait(refs: list, poll) -> list:
    pending = list(refs)
    while pending:
        _, pending = ray.wait(pending, num_returns=len(pending), timeout=0.5)
        poll()
    return ray.get(refs)


@ray.remote(num_cpus=1)
def _pretrain_run_task(cfg_dict: dict, run: dict, label: str, board=None) -> dict:
    """One CLIP run of the pretraining stage on its own CPU."""
    set_threads(max(1, int(ray.get_runtime_context().get_assigned_resources().get("CPU", 1))))
    run_cfg = _build(PretrainConfig, run)
    return stages.pretrain_run(from_dict(cfg_dict), run_cfg,
                               on_epoch=lambda epoch, _m: report_progress(board, label, epoch, run_cfg.epochs))


@ray.remote(num_cpus=0)
def _pretrain_task(cfg_dict: dict, board=None) -> dict | None:
    """The pretraining stage; its CLIP runs (two with separate towers) train at once, one task each."""

    def train(_cfg, runs: list) -> list[dict]:
        labels = ["pretrain"] if len(runs) == 1 else ["pretrain image tower", "pretrain text tower"]
        return ray.get([_pretrain_run_task.remote(cfg_dict, dataclasses.asdict(r), label, board)
                        for r, label in zip(runs, labels)])

    return stages.pretrain(from_dict(cfg_dict), train=train)


@ray.remote(num_cpus=1)
def _score_task(cfg_dict: dict, method: str, seed: int, board=None) -> dict:
    from ptmst_ray.orchestration.scoring import score_one_seed

    set_threads(1)
    cfg = from_dict(cfg_dict)
    name = f"eval {method} seed {seed}"
    points = cfg.eval.eval_points

    def progress(r: dict) -> None:
        report_progress(board, name, r.get("epoch", 0), cfg.eval.epochs if method != "full" else cfg.eval.full_data_epochs)

    out = score_one_seed(cfg, method, seed, progress=progress)
    report_progress(board, name, 1, 1, f"r_mean {out['best']['r_mean']:.1f} (of {points} points)")
    return out


def evaluation_methods(cfg: Config) -> list[str]:
    return ["ptm_st", *cfg.eval.baselines]


def evaluate(cfg: Config, methods: list[str], board, poll) -> dict:
    from ptmst_ray.orchestration.scoring import summarise

    refs = [_score_task.remote(cfg.to_dict(), m, s, board) for m in methods for s in range(cfg.eval.seeds)]
    runs = _wait(refs, poll)
    results = summarise(runs, cfg)
    results["runs"] = runs
    return results


def run_prerequisites(cfg: Config, ui: UI, board, poll) -> dict:
    """Data, pretraining, caption embeddings, experts + shortcuts (each skipped when complete).

    Shared by `run` and `sweep`; returns run_experts' counts.
    """
    from ptmst_ray.orchestration.experts import run_experts

    ui.stage("data: prepare")
    stages.prepare(cfg, progress=lambda split, d, t: (report_progress(board, f"data {split}", d, t), poll()))
    if cfg.pretrain.enabled:
        ui.stage("pretrain towers")
        _wait([_pretrain_task.remote(cfg.to_dict(), board)], poll)
    ui.stage("caption embeddings")
    stages.embed(cfg)
    ui.stage(f"experts ({cfg.experts.num_experts}) + shortcuts")
    return run_experts(cfg, board, poll)


def run_pipeline(cfg: Config, ui: UI | None = None) -> dict[str, Any]:
    """Run (or resume) everything; returns results.json's content."""
    ui = ui or NullUI()
    layout = stages.Layout(cfg.run.root)
    storage.write_text(storage.join(cfg.run.root, "config.yaml"), cfg.to_yaml())
    info = cluster_info()
    log.info("cluster: %.0f CPUs, %.0f GPUs, %d node(s); run root %s", info.cpus, info.gpus, info.nodes, cfg.run.root)
    board = progress_board()
    ray.get(board.clear.remote())
    poll = _poller(board, ui)
    t0 = time.time()
    experts = run_prerequisites(cfg, ui, board, poll)

    from ptmst_ray.orchestration.phases import run_phases

    ui.stage(f"phases ({len(cfg.phases)}" + (" + single-phase baseline)" if "single_phase" in cfg.eval.baselines else ")"))
    status = run_phases(cfg, board, poll)
    bad = {n: s for n, s in status.items() if s.get("status") != "done"}
    failed = {n: s for n, s in bad.items() if n.startswith("phase") and s.get("status") != "diverged"}
    if failed:
        raise PipelineError("; ".join(f"{n}: {s.get('status')} ({s.get('detail')})" for n, s in failed.items())
                            + ". Finished phases are kept; fix the cause and run the same command again.")
    warnings = [f"{n} diverged ({s.get('detail')}); the distilled set uses its last finite EMA state. Lower "
                "distill.lr_img / lr_txt / lr_sim, then `ptmst-ray run --rebuild phases`"
                for n, s in bad.items() if n.startswith("phase")]
    for w in warnings:
        log.warning("%s", w)

    from ptmst_ray.orchestration.distilled import aggregate

    ui.stage("aggregate distilled set")
    distilled = aggregate(cfg)
    methods = evaluation_methods(cfg)
    if "single_phase" in bad:
        log.warning("single-phase baseline %s; it is left out of the evaluation", bad["single_phase"].get("status"))
        methods.remove("single_phase")
    ui.stage(f"evaluation ({', '.join(methods)} x {cfg.eval.seeds} seeds)")
    results = evaluate(cfg, methods, board, poll)
    results.update({"experts": experts, "phases": status, "distilled": distilled["pairs"],
                    "diverged_phases": distilled.get("diverged", []), "warnings": warnings,
                    "wall_seconds": time.time() - t0, "run_root": cfg.run.root})
    storage.write_json(storage.join(layout.eval, "results.json"), results)
    _plot(cfg, results)
    return results


def _plot(cfg: Config, results: dict) -> None:
    from ptmst_ray.orchestration.phases import METRICS_FILE
    from ptmst_ray.orchestration.plots import plot_run

    layout = stages.Layout(cfg.run.root)
    histories = {}
    for name, _, _ in stages.phase_jobs(cfg):
        url = storage.join(layout.phases, name, METRICS_FILE)
        histories[name] = storage.read_json(url) if storage.exists(url) else []
    plot_run(histories, results, storage.join(layout.eval, "plot.png"))
