"""Hyper-parameter sweeps (`ptmst-ray sweep`): Ray Tune trials that each distil their phases as
Train runs and report retrieval r_mean once per round, so ASHA can stop poor trials early.

Why this file exists: a recipe's settings are found by measurement, and
the teacher ranges are the paper's main knob. A trial is the base config with the sampled dotted
values applied, living in its own run root ``<root>/sweeps/<name>/<trial id>`` but reading data,
pretraining, experts and shortcuts from the base root (``run.shared_root``): experts are trained
once, and every shortcut range any trial can need is compressed once, before Tune starts.

A trial's phase iterations are split into ``sweep.rounds``; a round reruns each phase's Train run
(resuming from its checkpoint) up to the round's target iteration, all phases at once, then scores
the phases' EMA subsets with one quick evaluation seed and calls ``tune.report``. Trial drivers
hold ``{"CPU": 0, "train_driver": 1}`` so they never starve the Train workers (the default 1 CPU
per trial deadlocks a small cluster: docs/design.md#ray-topology). Running the same command again restores the
Tune experiment: finished trials are not rerun, unfinished ones resume from their last round.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import io
import itertools
import json
import logging
import math
import re
import shutil
import signal
import threading
import time
from typing import Any

import ray
from ray import tune
from ray.tune.schedulers import ASHAScheduler
from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

from ptmst_ray import storage
from ptmst_ray.config import Config, from_dict, get_path, section_hash
from ptmst_ray.device import set_threads
from ptmst_ray.layout import Layout, StageError, needed_ranges, phase_jobs, phase_outcome
from ptmst_ray.orchestration.experts import compress_nbytes, memory_option
from ptmst_ray.orchestration.phases import fit_and_prune, make_trainer, storage_args
from ptmst_ray.orchestration.pipeline import run_prerequisites, score_resources
from ptmst_ray.orchestration.runtime import (
    TRAIN_DRIVER, ClusterInfo, NullUI, cluster_info, ensure_train_state_actor, make_poll, progress_board, release_gpus,
    report_progress, request_gpus, resolve_accelerator, student_threads, task, wait_all,
)
from ptmst_ray.stages.experts import compress_expert, missing_shortcuts
from ptmst_ray.stages.score import score_one_seed, subset_from_dir
from ptmst_ray.vocab import METRICS, PTM_ST

log = logging.getLogger(__name__)

SWEEPABLE = ("phases.", "distill.", "shortcut.", "eval.")
"""Sections a trial may change: trials reuse the base run's data, pretraining and experts. ``phases`` itself may
be swept too (whole phase lists: one phase against two, other splits of the budget), and so may ``phases.N``
(one whole phase)."""
ROUND_FILE = "round.json"
TABLE, TABLE_PARQUET, BEST_YAML, PLOT = "results.csv", "results.parquet", "best.yaml", "r_mean.png"
ASHA_RUNGS = "asha_rungs.json"
"""ASHA's rungs, in the sweep's folder: what a resumed sweep's scheduler judges the remaining trials against."""


class SweepError(RuntimeError):
    """A sweep cannot start; the message says what to change."""


class SweepInterrupted(KeyboardInterrupt):
    """Ctrl-C (or SIGUSR1) while the trials ran: Tune ended them and saved its experiment under ``url``, which the
    same sweep resumes (finished trials kept, the others from their last round). No table or best.yaml is written."""

    def __init__(self, url: str):
        super().__init__(f"the sweep was stopped; its state is saved under {url}")
        self.url = url

    def __reduce__(self):  # pickled by its field, as ConfigError
        return type(self), (self.url,)


# --------------------------------------------------------------------------- the search space


def sweep_name(cfg: Config) -> str:
    """Deterministic name of this sweep (same config -> same name -> the same command resumes)."""
    raw = cfg.to_dict()
    raw["run"] = {k: v for k, v in raw["run"].items() if k not in ("address", "threads_per_worker", "accelerator")}
    return f"{cfg.sweep.searcher}-{section_hash(raw)[:10]}"


RULED = {"distill.lr_img": "rel_lr_img", "distill.lr_txt": "rel_lr_txt", "distill.lr_lr": "rel_lr_lr",
         "distill.lr_sim": "rel_lr_sim", "distill.alpha_init": "rel_alpha", "distill.min_alpha": "rel_min_alpha"}
"""Settings a config can set by a rule instead (the rule's distill field): then the fixed value is unused."""


def check_space(cfg: Config) -> None:
    """Reject paths outside the sweepable sections and paths the config does not have."""
    if not cfg.sweep.space:
        raise SweepError("sweep.space is empty; add e.g. `phases.0.range_end: {choice: [3, 4, 5]}` to the config")
    for key, spec in cfg.sweep.space.items():
        if not (key.startswith(SWEEPABLE) or key == "phases"):
            raise SweepError(f"sweep.space.{key}: only {', '.join(s.rstrip('.') for s in SWEEPABLE)} settings can be "
                             "swept (trials reuse the base run's data, pretraining and experts)")
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            if not isinstance(values, list) or not values:
                raise SweepError(f"sweep.space.{key}.{kind}: expected a non-empty list of values")
            probe = values[0]
        else:
            if not (isinstance(values, list) and len(values) == 2 and all(isinstance(v, (int, float)) for v in values)
                    and values[0] < values[1]):
                raise SweepError(f"sweep.space.{key}.{kind}: expected [low, high] with low < high")
            if kind == "loguniform" and values[0] <= 0:
                raise SweepError(f"sweep.space.{key}.loguniform: the bounds must be > 0")
            probe = int(values[0]) if kind == "randint" else float(values[0])
        if key in RULED:
            _check_not_derived(cfg, key)
        whole = _whole_phases(key)
        if _auto_end(key, values if kind in ("choice", "grid") else []):
            raise SweepError(f"sweep.space.{key}: a range_end auto in a trial: the windows' rule picks the base "
                             f"config's range ends once, before the trials, which share its shortcuts; sweep "
                             f"numbered range ends, or set auto in the base config's phases")
        try:
            get_path(cfg.to_dict(), key)
            for value in values if whole else [probe]:  # whole phases: every layout is checked before any trial
                cfg.replace(**{key: value})
        except (KeyError, IndexError, TypeError) as e:
            raise SweepError(f"sweep.space.{key}: the config has no such field ({e})") from None
        except ValueError as e:  # ConfigError: a wrong type, or a value the config rejects
            if whole or "unknown key" in str(e) or "not in a list" in str(e) or "is not a section" in str(e):
                raise SweepError(f"sweep.space.{key}: {e}") from None
    _check_trials(cfg)


def _auto_end(key: str, values: list) -> bool:
    """Whether some value of a space's dimension ``key`` is, or holds a phase whose, range_end is auto."""
    if key.endswith(".range_end"):
        return "auto" in values
    if not _whole_phases(key):
        return False
    phases = [p for v in values for p in (v if isinstance(v, list) else [v])]
    return any(isinstance(p, dict) and p.get("range_end") == "auto" for p in phases)


MAX_CHECKED_TRIALS = 2_000
"""Combinations of the space's listable values checked before a sweep starts (a config is built and checked in
1-2 ms: at most a few seconds); a larger space leaves the check to each trial."""


def _check_trials(cfg: Config) -> None:
    """Every trial config the space can make from its listable values (choice, grid and randint values; a range's
    two bounds) is a valid config. The grid searcher runs every combination, so one that the config rejects is an
    error here, before the base run's prerequisites, instead of a failed trial after them; the other searchers
    sample, so a value no combination accepts is an error and a combination the config rejects a warning."""
    keys = list(cfg.sweep.space)
    options = []
    for spec in cfg.sweep.space.values():
        kind, values = next(iter(spec.items()))
        if kind in ("choice", "grid"):
            options.append(list(values))
        elif kind == "randint" and values[1] - values[0] < 100:
            options.append(list(range(int(values[0]), int(values[1]) + 1)))
        else:  # a range (a wide randint too, never listed): its bounds
            options.append([int(v) for v in values] if kind == "randint" else [float(v) for v in values])
    combos = math.prod(len(o) for o in options)
    if combos > MAX_CHECKED_TRIALS:
        log.info("sweep.space: %d combinations of listed values; their configs are checked by the trials", combos)
        return
    rejected: dict[tuple[int, ...], str] = {}  # by the values' indices (whole phases are dicts and lists)
    for picks in itertools.product(*(range(len(o)) for o in options)):
        try:
            cfg.replace(**{k: options[i][j] for i, (k, j) in enumerate(zip(keys, picks))})
        except ValueError as e:  # ConfigError
            rejected[picks] = str(e)
    if not rejected:
        return
    picks, why = next(iter(rejected.items()))
    first = ", ".join(f"{k}={options[i][j]!r}" for i, (k, j) in enumerate(zip(keys, picks)))
    if cfg.sweep.searcher == "grid":
        raise SweepError(f"sweep.space: {len(rejected)} of the grid's {combos} trials would fail at once, e.g. {first}: "
                         f"{why}; remove that value or change the base config")
    for i, key in enumerate(keys):
        for j, value in enumerate(options[i]):
            failing = [why for picks, why in rejected.items() if picks[i] == j]
            if len(failing) == combos // len(options[i]):  # every combination with this value
                raise SweepError(f"sweep.space.{key}: the value {value!r} makes no valid config: {failing[0]}")
    log.warning("sweep.space: %d of %d combinations of the listed values make no valid config (e.g. %s: %s); the "
                "trials sampled there will fail", len(rejected), combos, first, why)


def _check_not_derived(cfg: Config, key: str) -> None:
    """A fixed value is unused when the config sets it by a rule (distill.rel_*): sweeping it would change
    nothing, unless the space sweeps the rule too (a null among its values)."""
    rel = RULED[key]
    if getattr(cfg.distill, rel) is not None and f"distill.{rel}" not in cfg.sweep.space:
        raise SweepError(f"sweep.space.{key}: the config derives it by a rule (distill.{rel} = "
                         f"{getattr(cfg.distill, rel)}), so these values would not be used; sweep distill.{rel} "
                         f"instead, or set distill.{rel}: null to sweep {key}")


def _whole_phases(key: str) -> bool:
    """``phases`` (a whole phase list) or ``phases.N`` (one whole phase): values that are whole phases."""
    return re.fullmatch(r"phases(\.\d+)?", key) is not None


def param_space(cfg: Config) -> tuple[dict[str, Any], int]:
    """Tune's param space (dotted keys) and num_samples for the configured searcher.

    grid: every combination of the choice/grid values once (num_samples is not used).
    random: choice -> tune.choice, grid -> tune.grid_search (each grid value x num_samples),
    randint [lo, hi] (inclusive), uniform, loguniform. Model-based searchers take the same domains.
    """
    sweep, space = cfg.sweep, {}
    for key, spec in sweep.space.items():
        kind, values = next(iter(spec.items()))
        if sweep.searcher == "grid":
            if kind not in ("choice", "grid"):
                raise SweepError(f"sweep.space.{key}: the grid searcher needs `choice` or `grid` values, not {kind}; "
                                 "use searcher: random for sampled ranges")
            space[key] = tune.grid_search(list(values))
        elif kind == "grid" and sweep.searcher == "random":
            space[key] = tune.grid_search(list(values))
        elif kind in ("choice", "grid"):
            space[key] = tune.choice(list(values))
        elif kind == "randint":
            space[key] = tune.randint(int(values[0]), int(values[1]) + 1)
        elif kind == "uniform":
            space[key] = tune.uniform(float(values[0]), float(values[1]))
        else:
            space[key] = tune.loguniform(float(values[0]), float(values[1]))
    return space, (1 if sweep.searcher == "grid" else sweep.num_samples)


def grid_trials(cfg: Config) -> int:
    """The grid searcher's number of trials: the product of the space's value counts."""
    return math.prod(len(next(iter(spec.values()))) for spec in cfg.sweep.space.values())


def _candidates(spec: dict) -> list | None:
    kind, values = next(iter(spec.items()))
    if kind in ("choice", "grid"):
        return list(values)
    if kind == "randint":
        return list(range(int(values[0]), int(values[1]) + 1))
    return None


def shortcut_ranges(cfg: Config) -> list[tuple[int, int]]:
    """Every teacher range any trial can need (enumerable dimensions only), within the experts' epochs."""
    ranges = set(needed_ranges(cfg))
    for key, spec in cfg.sweep.space.items():  # whole phases (or phase lists) as values: the ranges they bring
        if _whole_phases(key):
            for candidate in _candidates(spec) or []:
                ranges.update((p.range_start, p.range_end) for p in cfg.replace(**{key: candidate}).phases)
    for i, phase in enumerate(cfg.phases):
        starts = _candidates(cfg.sweep.space.get(f"phases.{i}.range_start", {"choice": [phase.range_start]}))
        ends = _candidates(cfg.sweep.space.get(f"phases.{i}.range_end", {"choice": [phase.range_end]}))
        for a, b in itertools.product(starts or [phase.range_start], ends or [phase.range_end]):
            if isinstance(a, int) and isinstance(b, int) and 0 <= a < b <= cfg.experts.epochs:
                ranges.add((a, b))
    return sorted(ranges)


def max_concurrent_trials(cfg: Config, info: ClusterInfo) -> int:
    """sweep.max_concurrent, else as many trials as can run all their phases at once (on the GPUs the
    cluster has or its autoscaler can add when the run targets GPUs, ``run.accelerator``)."""
    if cfg.sweep.max_concurrent:
        return cfg.sweep.max_concurrent
    phases = len(cfg.phases)
    accelerator = cfg.run.accelerator
    if accelerator == "gpu" or (accelerator == "auto" and info.has_gpus):
        gpus = max(info.gpus, info.autoscaler_gpus)
        return max(1, int(gpus // (phases * max(cfg.distill.gpus_per_phase, 1e-6))))
    return max(1, int(info.cpus // phases))


# --------------------------------------------------------------------------- one trial


def trial_root(base: Config, name: str, trial_id: str) -> str:
    return Layout.of(base).trial(name, trial_id)


def trial_config(base: Config, values: dict[str, Any], root: str) -> Config:
    """The base config with the sampled dotted values, phase outputs under ``root``, shared inputs from the base."""
    return base.replace(**values, **{"run.root": root, "run.shared_root": Layout.of(base).shared})


def round_target(iterations: int, rounds: int, k: int) -> int:
    """Iteration a phase of ``iterations`` runs to by the end of round k (1-based)."""
    return min(iterations, math.ceil(iterations * k / rounds))


def round_subsets(cfg: Config) -> list:
    """Each phase's EMA subset as of now: the complete one when finished, else the latest partial one."""
    layout, subsets = Layout.of(cfg), []
    for job in phase_jobs(cfg, with_baseline=False):
        outcome = phase_outcome(cfg, job)
        d = outcome.dir if outcome.status == "done" else layout.partial(job.name)
        if not storage.is_complete(d):
            raise StageError(f"{d}: phase {job.name} has no subset yet")
        subsets.append(subset_from_dir(d))
    return subsets


def diverged_phase(cfg: Config) -> tuple[str, int] | None:
    """(name, iteration) of the trial's first diverged phase, or None."""
    for job in phase_jobs(cfg, with_baseline=False):
        outcome = phase_outcome(cfg, job)
        if outcome.status == "diverged":
            return job.name, outcome.iteration or 0
    return None


def eval_config(cfg: Config) -> Config:
    """A round's quick evaluation: one seed, sweep.eval_epochs epochs."""
    epochs = cfg.sweep.eval_epochs or cfg.eval.epochs
    return cfg.replace(**{"eval.seeds": 1, "eval.epochs": epochs, "eval.eval_points": min(cfg.eval.eval_points, epochs)})


_OUTSIDE_TRIAL = PlacementGroupSchedulingStrategy(placement_group=None)
"""Tasks of a trial leave its placement group (one train_driver bundle, no CPU for them)."""


@task(num_cpus=1)
def _score_round(cfg_dict: dict) -> dict:
    """A round's quick evaluation, on a GPU where the run targets GPUs (``pipeline.score_resources``, as an
    evaluation student: at paper scale a student on one CPU thread takes hours), else on one CPU thread."""
    cfg = from_dict(cfg_dict)
    set_threads(student_threads(cfg.run.threads_per_worker))
    return score_one_seed(cfg, PTM_ST, 0, subsets=round_subsets(cfg))


@ray.remote(num_cpus=1)
def _compress_task(cfg_dict: dict, expert_id: int, ranges: list[tuple[int, int]]) -> list:
    set_threads(1)
    return compress_expert(from_dict(cfg_dict), expert_id, [tuple(r) for r in ranges])


def _distil_round(cfg: Config, trial_id: str, k: int, board) -> None:
    """Every phase of the trial up to round k's target, as concurrent Train runs (resumed from checkpoints)."""
    cfg_dict, rounds, layout = cfg.to_dict(), cfg.sweep.rounds, Layout.of(cfg)
    jobs = []
    for job in phase_jobs(cfg, with_baseline=False):
        if phase_outcome(cfg, job).status == "done":
            continue
        until = round_target(job.phase.iterations, rounds, k)
        jobs.append((make_trainer(cfg_dict, job.name, dataclasses.asdict(job.phase), job.seed, job.run_name, board,
                                  until=until, label=f"{trial_id} {job.name}", trial=trial_id),
                     layout.train_run(job.run_name)))
    if not jobs:
        return
    with concurrent.futures.ThreadPoolExecutor(len(jobs)) as pool:
        for future in [pool.submit(fit_and_prune, t, run_dir) for t, run_dir in jobs]:
            future.result()  # a failed Train run fails the trial (Tune records the error)


def _save_round(k: int) -> tune.Checkpoint:
    d = storage.scratch_dir("round")
    with open(f"{d}/{ROUND_FILE}", "w") as f:
        json.dump({"round": k}, f)
    return tune.Checkpoint.from_directory(d)


def _restored_round() -> int:
    ckpt = tune.get_checkpoint()
    if ckpt is None:
        return 0
    with ckpt.as_directory() as d, open(f"{d}/{ROUND_FILE}") as f:
        return int(json.load(f)["round"])


def trial_metrics(out: dict) -> dict[str, float]:
    """What a trial reports to Tune from one evaluation (``score_one_seed``): the objective's recalls on the split
    that chose the evaluation point, val where the data has one, so that tuning never looks at test (whose r_mean
    is reported beside it as ``test_r_mean``), else test as the paper does."""
    chosen = out["best_val"] if out.get("selection") == "val" else out["best"]
    return {m: float(chosen[m]) for m in METRICS} | {"r_mean_final": float(out["final"]["r_mean"]),
                                                     "test_r_mean": float(out["best"]["r_mean"]), "diverged": 0.0}


def run_trial(values: dict[str, Any], base: dict, name: str, board=None) -> None:
    """Tune function trainable: distil the trial's phases round by round, reporting r_mean after each."""
    base_cfg = from_dict(base)
    trial_id = tune.get_context().get_trial_id()
    cfg = trial_config(base_cfg, values, trial_root(base_cfg, name, trial_id))
    storage.write_text(Layout.of(cfg).config_yaml, cfg.to_yaml())
    rounds = cfg.sweep.rounds
    for i in range(cfg.experts.num_experts):  # a range the driver could not foresee: computed once, shared
        compress_expert(cfg, i)
    label = f"trial {trial_id}"
    quick = eval_config(cfg)
    score_options = score_resources(quick)
    for k in range(_restored_round() + 1, rounds + 1):
        report_progress(board, label, k - 1, rounds, "distilling")
        diverged = diverged_phase(cfg)
        if diverged is None:
            _distil_round(cfg, trial_id, k, board)
            diverged = diverged_phase(cfg)
        iterations = max(round_target(p.iterations, rounds, k) for p in cfg.phases)
        if diverged is not None:  # scored 0: a diverged trial must lose, not crash the sweep
            metrics = {m: 0.0 for m in METRICS} | {"r_mean_final": 0.0, "test_r_mean": 0.0, "diverged": 1.0}
            name_diverged, iterations = diverged
            info = f"round {k}: {name_diverged} diverged (r_mean 0)"
        else:
            report_progress(board, label, k - 1, rounds, "evaluating")
            out = ray.get(_score_round.options(scheduling_strategy=_OUTSIDE_TRIAL, name=f"eval {trial_id} round {k}",
                                               **score_options).remote(quick.to_dict()))
            metrics = trial_metrics(out)
            info = f"round {k}: r_mean {metrics['r_mean']:.1f}"
        report_progress(board, label, k, rounds, info)
        ckpt = _save_round(k)
        tune.report({**metrics, "round": k, "iterations": iterations}, checkpoint=ckpt)
        shutil.rmtree(ckpt.path, ignore_errors=True)


# --------------------------------------------------------------------------- the driver


def _searcher(cfg: Config, max_concurrent: int = 0):
    """Tune's search algorithm; BasicVariantGenerator limits concurrency itself (Tune ignores
    TuneConfig.max_concurrent_trials for it), the model-based ones get a ConcurrencyLimiter."""
    from ray.tune.search import ConcurrencyLimiter
    from ray.tune.search.basic_variant import BasicVariantGenerator

    kind = cfg.sweep.searcher
    if kind in ("grid", "random"):
        return BasicVariantGenerator(max_concurrent=max_concurrent, random_state=cfg.run.seed)
    modules = {"optuna": ("ray.tune.search.optuna", "OptunaSearch", "optuna"),
               "hyperopt": ("ray.tune.search.hyperopt", "HyperOptSearch", "hyperopt"),
               "bayesopt": ("ray.tune.search.bayesopt", "BayesOptSearch", "bayesian-optimization")}
    module, cls, package = modules[kind]
    import importlib

    try:
        searcher_cls = getattr(importlib.import_module(module), cls)
        searcher = searcher_cls(random_state=cfg.run.seed) if kind == "bayesopt" else searcher_cls(seed=cfg.run.seed)
        return ConcurrencyLimiter(searcher, max_concurrent) if max_concurrent else searcher
    except (ImportError, AssertionError) as e:
        raise SweepError(f"sweep.searcher {kind!r} needs the {package!r} package ({e}); install it "
                         f"(pip install 'ptmst-ray[sweep]' for optuna) or use searcher: random") from None


_POLL: list = [None]
"""The poll of the sweep running in this process. Held here, not in the callback: Tune pickles its
run config (callbacks included) into the experiment folder, and a CLI poll holds locks (rich)."""


class _PollCallback(tune.Callback):
    """Keeps the CLI's progress bars moving while Tune's loop runs in this thread, and notes a stop signal
    (:func:`_watch_stop_signals`); no state to pickle."""

    def on_step_begin(self, iteration, trials, **info):
        _watch_stop_signals()

    def on_step_end(self, iteration, trials, **info):
        if _POLL[0] is not None:
            _POLL[0]()


def _precompute_shortcuts(cfg: Config, poll) -> list[tuple[int, int]]:
    ranges = shortcut_ranges(cfg)
    if cfg.shortcut.enabled:
        cfg_dict = cfg.to_dict()
        memory = memory_option(compress_nbytes(cfg, ranges))  # one expert each
        wait_all([_compress_task.options(name=f"shortcut expert-{i:04d}", **memory).remote(cfg_dict, i, ranges)
                  for i in range(cfg.experts.num_experts) if missing_shortcuts(cfg, i, ranges)], poll)
    return ranges


class _ResumableASHA(ASHAScheduler):
    """ASHA whose rungs (each trial's score at each milestone round) outlive the driver.

    Tune saves no scheduler with its experiment: a restored sweep rebuilds it from the Tuner as it was at the start
    (ray-project/ray#30838), so a resumed sweep's ASHA would judge the trials it still runs against nothing and stop
    none. This one writes its rungs as JSON (``url``, in the sweep's folder) whenever they change and reads them back
    before the first trial of a resumed sweep is added. Rungs are counted in rounds (the ``round`` each report
    carries), not Tune's ``training_iteration``, which a trial resumed from its checkpoint may count again from 1."""

    def __init__(self, url: str, **kwargs):
        super().__init__(**kwargs)
        self._url, self._read = url, False

    def _rungs(self) -> list[list]:
        return [[[milestone, dict(recorded)] for milestone, recorded in bracket._rungs] for bracket in self._brackets]

    def on_trial_add(self, tune_controller, trial) -> None:
        if not self._read:
            self._read = True
            saved = storage.read_json(self._url) if storage.exists(self._url) else None
            if saved is not None and [[m for m, _ in b] for b in saved] == [[m for m, _ in b] for b in self._rungs()]:
                for bracket, rungs in zip(self._brackets, saved):
                    for (_, recorded), (_, scores) in zip(bracket._rungs, rungs):
                        recorded.update(scores)
        super().on_trial_add(tune_controller, trial)

    def _after(self, before: list[list]) -> None:
        if self._rungs() != before:
            storage.write_json(self._url, self._rungs())

    def on_trial_result(self, tune_controller, trial, result: dict) -> str:
        before = self._rungs()
        action = super().on_trial_result(tune_controller, trial, result)
        self._after(before)
        return action

    def on_trial_complete(self, tune_controller, trial, result: dict) -> None:
        before = self._rungs()
        super().on_trial_complete(tune_controller, trial, result)
        self._after(before)


def build_tuner(cfg: Config, name: str, board=None, poll=None, verbose: int = 1) -> tuple[tune.Tuner, bool]:
    """A new Tuner, or the restored one when this sweep's experiment exists (finished trials are kept)."""
    _POLL[0] = poll  # also read by the callback of a restored Tuner
    sweeps = Layout.of(cfg).sweeps
    args = storage_args(sweeps)
    url = storage.join(sweeps, name)
    path = storage.join(args["storage_path"], name) if "storage_filesystem" in args else url
    trainable = tune.with_resources(tune.with_parameters(run_trial, base=cfg.to_dict(), name=name, board=board),
                                    {"CPU": 0, TRAIN_DRIVER: 1})
    if tune.Tuner.can_restore(path, storage_filesystem=args.get("storage_filesystem")):
        log.info("resuming the sweep at %s (finished trials are kept)", url)
        return tune.Tuner.restore(path, trainable, resume_unfinished=True, resume_errored=True,
                                  storage_filesystem=args.get("storage_filesystem")), True
    from ray.tune.schedulers import FIFOScheduler

    space, samples = param_space(cfg)
    sweep = cfg.sweep
    scheduler = (_ResumableASHA(storage.join(url, ASHA_RUNGS), time_attr="round", max_t=sweep.rounds,
                                grace_period=min(sweep.grace_period, sweep.rounds), reduction_factor=2)
                 if sweep.scheduler == "asha" else FIFOScheduler())
    tune_config = tune.TuneConfig(metric="r_mean", mode="max", num_samples=samples, scheduler=scheduler,
                                  search_alg=_searcher(cfg, max_concurrent_trials(cfg, cluster_info())))
    run_config = tune.RunConfig(name=name, verbose=verbose, callbacks=[_PollCallback()],
                                **args)
    return tune.Tuner(trainable, param_space=space, tune_config=tune_config, run_config=run_config), False


def run_sweep(cfg: Config, ui=None, name: str | None = None, verbose: int = 1) -> dict[str, Any]:
    """Prerequisite stages, the shared shortcut ranges, then the Tune sweep; returns the summary.

    Writes results.csv / results.parquet (one row per trial), best.yaml (ready for `ptmst-ray run`)
    and r_mean.png under ``<root>/sweeps/<name>``.
    """
    ui = ui or NullUI()
    validate_sweep(cfg)
    name = name or sweep_name(cfg)
    cfg = resolve_accelerator(cfg)  # trials ask for what this decides, whatever is up at the moment
    try:
        return _sweep(cfg, ui, name, verbose)
    finally:
        release_gpus()


def _sweep(cfg: Config, ui, name: str, verbose: int) -> dict[str, Any]:
    """:func:`run_sweep` on a config whose accelerator is decided."""
    if not cluster_info_has_driver_slots():
        raise SweepError(f"the Ray cluster has no {TRAIN_DRIVER!r} resource, which sweep trial drivers hold instead of "
                         f"CPUs; start Ray with --resources='{{\"{TRAIN_DRIVER}\": 16}}' (cluster/gpu.yaml does)")
    board = progress_board()
    ray.get(board.clear.remote())
    poll = make_poll(board, ui)
    t0 = time.time()
    cfg, _ = run_prerequisites(cfg, ui, board, poll)  # trials take the experts' learning rate the rule picked
    ui.stage("shortcut ranges of the search space")
    ranges = _precompute_shortcuts(cfg, poll)
    tuner, resumed = build_tuner(cfg, name, board, poll, verbose)
    request_gpus(cfg, max_concurrent_trials(cfg, cluster_info()) * len(cfg.phases), cfg.distill.gpus_per_phase,
                 "sweep trials")
    ensure_train_state_actor()  # the trials' concurrent Train runs would race to create it
    ui.stage(f"sweep {name}" + (" (resumed)" if resumed else ""))
    grid = _fit(tuner)
    out_dir = Layout.of(cfg).sweep(name)
    if _STOP_SIGNALLED.is_set():
        raise SweepInterrupted(out_dir)
    rows = result_rows(grid, cfg)
    summary = {"name": name, "dir": out_dir, "rows": rows, "resumed": resumed, "ranges": ranges,
               "wall_seconds": time.time() - t0, "selection": selection(cfg),
               "errors": [f"trial {r['trial_id']} ({', '.join(f'{k}={r[k]!r}' for k in cfg.sweep.space)}): {r['error']}"
                          for r in rows if r["error"] is not None]}
    write_outputs(cfg, name, rows, summary)
    return summary


_STOP_SIGNALLED = threading.Event()
"""Set when Ctrl-C or SIGUSR1 reached Tune's handler during :func:`_fit`. Tune then ends the running trials, saves
its experiment and returns as if done (its ResultGrid counts the trials it ended as TERMINATED, like finished ones):
this flag is how the sweep tells a stopped experiment from a finished one."""

_STOP_SIGNALS = tuple(s for s in (signal.SIGINT, getattr(signal, "SIGUSR1", None)) if s is not None)


def _fit(tuner: tune.Tuner):
    """``tuner.fit()``; :data:`_STOP_SIGNALLED` tells whether a stop signal ended it. On the main thread the
    handlers that were there before are put back afterwards (Tune leaves its own installed after a finished fit,
    where Ctrl-C would then only log a warning). Tune's hint on Ctrl-C, ``Tuner.restore(...)``, is left out: the
    same sweep resumes."""
    _STOP_SIGNALLED.clear()
    main = threading.current_thread() is threading.main_thread()
    before = {sig: signal.getsignal(sig) for sig in _STOP_SIGNALS} if main else {}
    hint = _NoRestoreHint()
    logging.getLogger("ray.tune.tune").addFilter(hint)
    try:
        return tuner.fit()
    finally:
        logging.getLogger("ray.tune.tune").removeFilter(hint)
        for sig, handler in before.items():
            signal.signal(sig, handler)


def _watch_stop_signals() -> None:
    """Chain :data:`_STOP_SIGNALLED` onto the stop handlers Tune installed for this fit (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        return
    for sig in _STOP_SIGNALS:
        current = signal.getsignal(sig)
        if not callable(current) or getattr(current, "watched", False):
            continue

        def watched(signum, frame, inner=current):
            _STOP_SIGNALLED.set()
            inner(signum, frame)

        watched.watched = True
        signal.signal(sig, watched)


class _NoRestoreHint(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return "Resume experiment with" not in record.getMessage()


def selection(cfg: Config) -> str:
    """The split the trials were scored on (:func:`trial_metrics`): ``val`` where the prepared data has one."""
    from ptmst_ray.evaluate.protocol import SELECTION_TEST, SELECTION_VAL
    from ptmst_ray.stages.data import has_val

    return SELECTION_VAL if has_val(Layout.of(cfg).data) else SELECTION_TEST


def validate_sweep(cfg: Config) -> None:
    """Everything that can be checked before Ray starts: the space's paths, the searcher and its package."""
    check_space(cfg)
    param_space(cfg)
    _searcher(cfg)


def cluster_info_has_driver_slots() -> bool:
    return ray.cluster_resources().get(TRAIN_DRIVER, 0) >= 1


# --------------------------------------------------------------------------- results


def result_rows(grid, cfg: Config) -> list[dict[str, Any]]:
    """One row per trial: swept values, r_mean and the six recalls, iterations, stopped early, status."""
    rows = []
    for result in grid:
        m = result.metrics or {}
        values = {k: result.config.get(k) for k in cfg.sweep.space}
        rounds_run = int(m.get("round", 0))
        error = error_line(result.error) if result.error is not None else None
        rows.append({
            "trial_id": m.get("trial_id") or _trial_id_of(result.path),
            **values,
            **{k: float(m[k]) if k in m else None for k in METRICS},
            "r_mean_final": m.get("r_mean_final"),
            "test_r_mean": m.get("test_r_mean"),
            "iterations": int(m.get("iterations", 0)),
            "rounds": rounds_run,
            "stopped_early": error is None and rounds_run < cfg.sweep.rounds,
            "diverged": bool(m.get("diverged", 0.0)),
            "error": error,
        })
    rows.sort(key=lambda r: -1.0 if r["r_mean"] is None else r["r_mean"], reverse=True)
    return rows


_ANSI = re.compile(r"\x1b\[[0-9;]*[A-Za-z]")


def error_line(error: BaseException | str, limit: int = 300) -> str:
    """A trial's error in one line: the exception and its message (the last line of Ray's text, whose first line
    is only the worker, ``ray::ImplicitFunc.train() (pid=...)``, in terminal colours)."""
    lines = [line.strip() for line in _ANSI.sub("", str(error)).splitlines() if line.strip()]
    return (lines[-1] if lines else type(error).__name__)[:limit]


def _trial_id_of(path: str) -> str:
    """Tune's trial folder is <trainable>_<trial id>_<index>_<params>; the id is `<experiment>_<index>`."""
    parts = path.rstrip("/").rsplit("/", 1)[-1].split("_")
    return f"{parts[1]}_{parts[2]}" if len(parts) > 2 else parts[-1]


def best_config(cfg: Config, name: str, row: dict[str, Any]) -> Config:
    """The full config with the best trial's values, rooted at that trial (its phases are reused by `run`)."""
    values = {k: row[k] for k in cfg.sweep.space}
    return trial_config(cfg, values, trial_root(cfg, name, row["trial_id"]))


def _table(rows: list[dict[str, Any]]):
    import pyarrow as pa

    columns = {}
    for key in dict.fromkeys(k for r in rows for k in r):
        col = [r.get(key) for r in rows]
        kinds = {type(v) for v in col if v is not None}
        if len(kinds) > 1 and not kinds <= {int, float} or kinds & {list, dict}:
            col = [None if v is None else json.dumps(v) if isinstance(v, (list, dict)) else str(v) for v in col]
        columns[key] = col
    return pa.table(columns)


def write_outputs(cfg: Config, name: str, rows: list[dict[str, Any]], summary: dict[str, Any]) -> None:
    import pyarrow.csv as pcsv
    import pyarrow.parquet as pq

    out = Layout.of(cfg).sweep(name)
    if not rows:
        return
    table = _table(rows)
    for fname, writer in ((TABLE, pcsv.write_csv), (TABLE_PARQUET, pq.write_table)):
        buf = io.BytesIO()
        writer(table, buf)
        storage.write_bytes(storage.join(out, fname), buf.getvalue())
    summary["table"] = storage.join(out, TABLE)
    scored = [r for r in rows if r["r_mean"] is not None and r["error"] is None and not r["diverged"]]
    if scored:
        best = best_config(cfg, name, scored[0])
        on = summary.get("selection", "test")
        header = (f"# Best trial {scored[0]['trial_id']} of sweep {name}: {on} r_mean {scored[0]['r_mean']:.2f} "
                  f"(quick evaluation: 1 seed, {cfg.sweep.eval_epochs or cfg.eval.epochs} epochs).\n"
                  f"# Run it with: ptmst-ray run --config {storage.join(out, BEST_YAML)}\n"
                  "# run.root is the trial's folder (its distilled phases are reused); run.shared_root the base\n"
                  "# run (data, pretraining, experts, shortcuts).\n")
        storage.write_text(storage.join(out, BEST_YAML), header + best.to_yaml())
        summary["best"] = {"trial_id": scored[0]["trial_id"], "r_mean": scored[0]["r_mean"],
                           "values": {k: scored[0][k] for k in cfg.sweep.space}, "yaml": storage.join(out, BEST_YAML)}
    plot_sweep(rows, list(cfg.sweep.space), storage.join(out, PLOT), on=summary.get("selection", "test"))
    summary["plot"] = storage.join(out, PLOT)


def plot_sweep(rows: list[dict[str, Any]], params: list[str], url: str, on: str = "test") -> None:
    """r_mean (of the ``on`` split) vs each swept parameter (one panel each); stopped trials hollow, diverged ones
    red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = sweep_figure(rows, params, on)
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=100)
    plt.close(fig)
    storage.write_bytes(url, buf.getvalue())


def sweep_figure(rows: list[dict[str, Any]], params: list[str], on: str = "test"):
    """:func:`plot_sweep`'s figure: a whole-number parameter's ticks at the values swept (not 3.2, 3.4, ...)."""
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, max(1, len(params)), figsize=(4 * max(1, len(params)), 3.4), squeeze=False)
    for ax, key in zip(axes[0], params):
        values = [r[key] for r in rows]
        numeric = all(isinstance(v, (int, float)) and not isinstance(v, bool) for v in values)
        labels = sorted({str(v) for v in values}, key=lambda s: (len(s), s))
        for r in rows:
            x = r[key] if numeric else labels.index(str(r[key]))
            y = r["r_mean"] if r["r_mean"] is not None else 0.0
            face = "none" if r["stopped_early"] else ("tab:red" if r["diverged"] or r["error"] else "tab:blue")
            ax.scatter([x], [y], facecolors=face, edgecolors="tab:red" if r["diverged"] else "tab:blue", s=40)
        if not numeric:
            ax.set_xticks(range(len(labels)), labels)
        elif all(v is not None and v > 0 for v in values) and max(values) / max(min(values), 1e-300) > 100:
            ax.set_xscale("log")
        elif all(isinstance(v, int) for v in values):
            ax.set_xticks(sorted(set(values)))
        ax.set_xlabel(key)
        ax.set_ylabel(f"{on} r_mean (%)")
        ax.grid(alpha=0.3)
    fig.suptitle(f"sweep: {on} r_mean of the last round per trial (hollow = stopped early)")
    fig.tight_layout()
    return fig
