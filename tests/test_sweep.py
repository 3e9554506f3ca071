"""Sweeps: the search space and trial configs (plain), and a tiny Tune sweep on the shared local Ray with
its run root in an S3 bucket (every trial in the table, ASHA stopping a diverged trial, a rerun restoring
the finished experiment without rerunning any trial, best.yaml valid and cheap to `run`)."""

from __future__ import annotations

import dataclasses

import math
import signal
import threading
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from conftest import finished_tasks, tiny_config, upload_root
from ptmst_ray import storage
from ptmst_ray.config import load_config
from ptmst_ray import layout
from ptmst_ray.orchestration import sweep as sw
from ptmst_ray.orchestration.runtime import ClusterInfo

FAST = {"pretrain.enabled": False, "model.pretrained": None, "experts.epochs": 4,
        "phases.0.iterations": 10, "phases.1.iterations": 10,
        "distill.checkpoint_every": 100, "distill.report_every": 5,
        "eval.epochs": 3, "eval.seeds": 1, "eval.eval_points": 1, "eval.baselines": [],
        "sweep.eval_epochs": 3}


def fast_config(root, **overrides):
    return tiny_config(root, **{**FAST, **overrides})


# --------------------------------------------------------------------------- plain


def test_param_space_grid_and_random(tmp_path):
    space = {"phases.0.range_end": {"choice": [2, 3]}, "distill.lr_img": {"grid": [50.0, 100.0]},
             "distill.syn_steps": {"randint": [1, 3]}, "distill.lr_txt": {"loguniform": [1.0, 100.0]}}
    cfg = fast_config(tmp_path, **{"sweep.space": space, "sweep.num_samples": 3})
    tune_space, samples = sw.param_space(cfg)
    assert samples == 3 and tune_space["distill.lr_img"] == {"grid_search": [50.0, 100.0]}
    assert tune_space["distill.syn_steps"].lower == 1 and tune_space["distill.syn_steps"].upper == 4  # inclusive hi
    with pytest.raises(sw.SweepError, match="grid searcher needs"):
        sw.param_space(cfg.replace(**{"sweep.searcher": "grid"}))
    grid = cfg.replace(**{"sweep.searcher": "grid", "sweep.space": {k: space[k] for k in list(space)[:2]}})
    tune_space, samples = sw.param_space(grid)
    assert samples == 1 and tune_space["phases.0.range_end"] == {"grid_search": [2, 3]}


def test_check_space_rejects_unsweepable_and_unknown_paths(tmp_path):
    cfg = fast_config(tmp_path)
    sw.check_space(cfg.replace(**{"sweep.space": {"phases.1.range_end": {"choice": [3, 4]}}}))
    for key, match in (("experts.lr_img", "only phases"), ("distill.nope", "no such field"),
                       ("phases.5.range_end", "no such field")):
        with pytest.raises(sw.SweepError, match=match):
            sw.check_space(cfg.replace(**{"sweep.space": {key: {"choice": [1, 2]}}}))


def test_a_learning_rate_the_config_derives_is_not_swept_silently(tmp_path):
    cfg = fast_config(tmp_path, **{"distill.rel_lr_sim": 0.001})
    space = {"distill.lr_sim": {"choice": [0.01, 0.1]}}
    with pytest.raises(sw.SweepError, match=r"sweep.space.distill.lr_sim: .*derives it.*rel_lr_sim = 0.001.*"
                                            r"sweep distill.rel_lr_sim instead"):
        sw.check_space(cfg.replace(**{"sweep.space": space}))
    sw.check_space(cfg.replace(**{"sweep.space": {**space, "distill.rel_lr_sim": {"grid": [None, 0.001]}}}))
    sw.check_space(cfg.replace(**{"distill.rel_lr_sim": None, "sweep.space": space}))
    sw.check_space(cfg.replace(**{"sweep.space": {"distill.lr_img": {"choice": [1, 2]}}}))  # not derived


def test_shortcut_ranges_cover_every_trial(tmp_path):
    cfg = fast_config(tmp_path, **{"sweep.space": {"phases.1.range_end": {"choice": [3, 4, 9]},
                                                   "phases.0.range_start": {"randint": [0, 1]}}})
    # base ranges (0,2) (0,3); phase 0 starts 0..1 -> (1,2); phase 1 ends 3, 4 (9 is past the experts' epochs)
    assert sw.shortcut_ranges(cfg) == [(0, 2), (0, 3), (0, 4), (1, 2)]


def test_whole_phases_and_phase_lists_can_be_swept(tmp_path):
    """`phases` (one phase against two, another split of the budget) and `phases.N` (one whole phase) take whole
    values; the shortcut stage prepares every range they use; a bad layout is named before any trial."""
    cfg = fast_config(tmp_path)
    p0, p1 = (dataclasses.asdict(p) for p in cfg.phases)
    one = [{**p0, "pairs": p0["pairs"] + p1["pairs"]}]
    later = {**p1, "range_end": 4, "start_min": 1, "start_max": 2}
    lists, phase1 = {"phases": {"grid": [[p0, p1], one]}}, {"phases.1": {"grid": [p1, later]}}
    for space in (lists, phase1):
        sw.check_space(cfg.replace(**{"sweep.space": space, "sweep.searcher": "grid"}))
    # both at once: the trial of the one-phase list and a phase 1 would fail at its start (there is no phase 1)
    with pytest.raises(sw.SweepError, match=r"2 of the grid's 4 trials would fail at once.*index '1' is not in a list"):
        sw.check_space(cfg.replace(**{"sweep.space": {**lists, **phase1}, "sweep.searcher": "grid"}))
    cfg = cfg.replace(**{"sweep.space": {**lists, "phases.0": {"grid": [p0, {**p0, "range_end": 4}]}},
                         "sweep.searcher": "grid"})
    sw.check_space(cfg)
    assert (0, 4) in sw.shortcut_ranges(cfg) and (0, 4) not in layout.needed_ranges(cfg)
    trial = sw.trial_config(cfg, {"phases": one}, sw.trial_root(cfg, "s", "abc_00002"))
    assert len(trial.phases) == 1 and trial.phases[0].pairs == cfg.total_pairs
    assert layout.experts_hash(trial) == layout.experts_hash(cfg)
    with pytest.raises(sw.SweepError, match="phases"):
        sw.check_space(cfg.replace(**{"sweep.space": {"phases": {"grid": [[{**p0, "range_end": 99}]]}}}))



def test_a_trial_the_config_rejects_is_named_before_the_sweep_starts(tmp_path, caplog):
    """Each combination of the listed values (a range: its bounds) is checked as a trial config: the grid runs them
    all, so one rejected is an error; a sampling searcher gets an error for a value no combination accepts and a
    warning for combinations that fail (a syn_steps of 0 was found by a failed trial after the base run's
    data, pretraining and experts, and reported as Ray's first traceback line)."""
    cfg = fast_config(tmp_path)

    def check(space, searcher="grid"):
        sw.check_space(cfg.replace(**{"sweep.space": space, "sweep.searcher": searcher}))

    with pytest.raises(sw.SweepError, match=r"1 of the grid's 2 trials would fail at once, e.g. "
                                            r"distill.syn_steps=0: distill.syn_steps: must be >= 1"):
        check({"distill.syn_steps": {"grid": [0, 2]}})
    with pytest.raises(sw.SweepError, match=r"sweep.space.distill.syn_steps: the value 0 makes no valid config"):
        check({"distill.syn_steps": {"choice": [0, 2]}, "distill.lr_img": {"choice": [1.0, 2.0]}}, "random")
    with pytest.raises(sw.SweepError, match=r"sweep.space.distill.lr_img: the value -1.0 makes no valid config"):
        check({"distill.lr_img": {"uniform": [-1.0, 100.0]}}, "random")  # a range: its bounds
    window = {"phases.0.range_end": {"grid": [1, 2]}, "phases.0.start_max": {"grid": [0, 1]}}
    with pytest.raises(sw.SweepError, match=r"1 of the grid's 4 trials.*range_end=1, phases.0.start_max=1"):
        check(window)
    caplog.set_level("WARNING", logger=sw.__name__)
    check({k: {"choice": v["grid"]} for k, v in window.items()}, "random")  # each value has a valid combination
    assert "1 of 4 combinations of the listed values make no valid config" in caplog.text
    check({"distill.syn_steps": {"randint": [1, 1000]}, "distill.lr_img": {"loguniform": [1.0, 100.0]}}, "random")


@pytest.mark.ray
def test_a_trials_error_is_reported_by_its_exception_and_message(ray_session):
    """Ray's text of a task's error starts with the worker (``ray::f() (pid=...)``, in terminal colours) and ends
    with the exception: the table and the CLI show the end."""
    import ray

    from ptmst_ray.config import ConfigError

    @ray.remote(num_cpus=0)
    def trial():
        raise ConfigError("distill.syn_steps", "must be >= 1")

    with pytest.raises(ray.exceptions.RayTaskError) as caught:
        ray.get(trial.remote())
    assert str(caught.value).lstrip().split("\n", 1)[0] != str(ConfigError("distill.syn_steps", "must be >= 1"))
    assert sw.error_line(caught.value) == "ptmst_ray.config.ConfigError: distill.syn_steps: must be >= 1"
    assert len(sw.error_line("y" * 400)) == 300

def test_trial_config_shares_inputs_and_rounds(tmp_path):
    base = fast_config(tmp_path)
    trial = sw.trial_config(base, {"distill.lr_img": 7.0}, sw.trial_root(base, "s", "abc_00001"))
    assert trial.distill.lr_img == 7.0 and trial.run.root == str(tmp_path / "sweeps" / "s" / "abc_00001")
    assert layout.Layout.of(trial).shared == base.run.root == layout.Layout.of(base).shared
    assert layout.experts_hash(trial) == layout.experts_hash(base)  # trials reuse the base run's experts
    assert [sw.round_target(10, 3, k) for k in (1, 2, 3)] == [4, 7, 10]
    assert sw.sweep_name(base) == sw.sweep_name(base.replace(**{"run.address": "ray://x:1"}))
    assert sw.sweep_name(base) != sw.sweep_name(base.replace(**{"sweep.num_samples": 2}))


def test_max_concurrent_sized_to_cluster(tmp_path):
    cfg = fast_config(tmp_path)  # two phases per trial
    assert sw.max_concurrent_trials(cfg, ClusterInfo(cpus=2, gpus=0, nodes=1)) == 1
    assert sw.max_concurrent_trials(cfg, ClusterInfo(cpus=8, gpus=4, nodes=1)) == 2
    assert sw.max_concurrent_trials(cfg.replace(**{"sweep.max_concurrent": 3}), ClusterInfo(2, 0, 1)) == 3


def test_trial_objective_is_the_selecting_split():
    """With a val split a trial is ranked on val (test stays out of the tuning); without one on test."""
    recalls = lambda r: {m: r for m in sw.METRICS}  # noqa: E731
    out = {"selection": "val", "best": recalls(40.0), "best_val": recalls(30.0), "final": recalls(35.0)}
    m = sw.trial_metrics(out)
    assert m["r_mean"] == 30.0 and m["IR@1"] == 30.0 and m["test_r_mean"] == 40.0 and m["r_mean_final"] == 35.0
    m = sw.trial_metrics({"selection": "test", "best": recalls(40.0), "best_val": {}, "final": recalls(35.0)})
    assert m["r_mean"] == 40.0 and m["test_r_mean"] == 40.0


def test_outputs_table_yaml_and_plot(tmp_path):
    cfg = fast_config(tmp_path, **{"sweep.space": {"distill.lr_img": {"choice": [50.0, 100.0]},
                                                   "distill.min_alpha": {"choice": [None, 0.01]}}})
    rows = [{"trial_id": f"t_0000{i}", "distill.lr_img": lr, "distill.min_alpha": ma,
             **{m: r for m in sw.METRICS}, "r_mean_final": r, "iterations": 10, "rounds": 1,
             "stopped_early": False, "diverged": False, "error": None}
            for i, (lr, ma, r) in enumerate([(100.0, 0.01, 40.0), (50.0, None, 30.0)])]
    summary = {"selection": "val"}
    sw.write_outputs(cfg, "s", rows, summary)
    out = Path(summary["table"]).parent
    assert (out / sw.BEST_YAML).read_text().startswith("# Best trial t_00000 of sweep s: val r_mean 40.00 ")
    assert pq.read_table(out / sw.TABLE_PARQUET).num_rows == 2 and (out / sw.PLOT).stat().st_size > 1000
    best = load_config(out / sw.BEST_YAML)
    assert best.distill.lr_img == 100.0 and best.distill.min_alpha == 0.01
    assert best.run.root == str(out / "t_00000") and best.run.shared_root == cfg.run.root


def test_the_plot_ticks_whole_number_values_where_they_were_swept_and_names_the_split():
    import matplotlib.pyplot as plt

    rows = [{"trial_id": f"t_{i}", "phases.0.range_end": end, "distill.lr_img": lr, "r_mean": r,
             "stopped_early": False, "diverged": False, "error": None}
            for i, (end, lr, r) in enumerate([(3, 30.0, 25.0), (4, 100.0, 26.0), (7, 30.0, 24.0)])]
    fig = sw.sweep_figure(rows, ["phases.0.range_end", "distill.lr_img"], on="val")
    try:
        ends, lrs = fig.axes
        assert list(ends.get_xticks()) == [3, 4, 7]  # the ends swept, no 3.5 or 5.5 between them
        assert len(lrs.get_xticks()) > 2  # a float parameter keeps matplotlib's own ticks
        assert ends.get_ylabel() == "val r_mean (%)" and "val r_mean" in fig.get_suptitle()
    finally:
        plt.close(fig)


def test_the_table_shows_a_whole_phase_by_what_differs(tmp_path):
    """A swept whole phase (or phase list) shows in the printed table by the settings in which the trials differ,
    one line a trial; the full dicts, printed as they were, wrapped a narrow column into a dozen lines a trial."""
    import io

    from rich.console import Console

    from ptmst_ray_cli.sweep_cmd import cell_text, sweep_table

    cfg = fast_config(tmp_path)
    p0, p1 = (dataclasses.asdict(p) for p in cfg.phases)
    later = {**p1, "range_end": p1["range_end"] + 1, "start_min": p1["start_min"] + 1}
    window = f"[{later['range_start']}, {later['range_end']}] starts {later['start_min']}-{later['start_max']}"
    assert cell_text(later, [p1, later]) == window  # the window as the docs write it
    assert cell_text({**later, "pairs": 7}, [p1, {**later, "pairs": 7}]) == f"{window}, pairs=7"
    everything = [f"{k}={v}" for k, v in p1.items() if k not in ("range_start", "range_end", "start_min", "start_max")]
    assert cell_text(p1, [p1, p1]) == ", ".join([f"[{p1['range_start']}, {p1['range_end']}] starts "
                                                 f"{p1['start_min']}-{p1['start_max']}", *everything])  # all of it
    one = [{**p0, "pairs": p0["pairs"] + p1["pairs"]}]
    assert cell_text(one, [[p0, p1], one]) == f"(pairs={one[0]['pairs']})"
    assert cell_text([p0, p1], [[p0, p1], one]) == f"(pairs={p0['pairs']}) + ({cell_text(p1, [p1])})"
    assert (cell_text(0.04, [0.04, 0.12]), cell_text(None, [None, 0.1])) == ("0.04", "None")

    rows = [{"trial_id": f"t_0000{i}", "phases.1": ph, "distill.lr_img": lr, **{m: 10.0 + i for m in sw.METRICS},
             "iterations": 10, "stopped_early": False, "diverged": False, "error": None}
            for i, (ph, lr) in enumerate([(p1, 30.0), (later, 100.0)])]
    out = io.StringIO()
    Console(file=out, width=200).print(sweep_table({"name": "s", "rows": rows}, ["phases.1", "distill.lr_img"]))
    lines = [ln for ln in out.getvalue().splitlines() if "t_0000" in ln]
    assert len(lines) == 2 and window in lines[1] and "pairs" not in out.getvalue()
    body = [ln for ln in out.getvalue().splitlines() if ln.startswith("│")]
    assert len(body) == 2, body  # one line a trial: no row wraps
    assert "test r_mean" not in out.getvalue()  # ranked on test (no val split): one r_mean
    # ranked on val: the title says so, and each trial's test r_mean stands beside its val r_mean
    for i, r in enumerate(rows):
        r["test_r_mean"] = 7.3 + i
    out = io.StringIO()
    Console(file=out, width=240).print(sweep_table({"name": "s", "rows": rows, "selection": "val"},
                                                   ["phases.1", "distill.lr_img"]))
    text = out.getvalue()
    assert "recalls on val" in text and "val r_mean" in text and "test r_mean" in text, text
    lines = [ln for ln in text.splitlines() if "t_0000" in ln]
    assert [[c.strip() for c in ln.split("│")[4:6]] for ln in lines] == [["10.0", "7.3"], ["11.0", "8.3"]], lines


# --------------------------------------------------------------------------- on Ray


class LockedUI:
    """A progress UI holding a lock, as rich's does (`ptmst-ray sweep` once failed: Tune pickled it)."""

    def __init__(self):
        self.lock, self.updates = threading.RLock(), 0

    def stage(self, name: str) -> None:
        pass

    def update(self, tasks: dict) -> None:
        with self.lock:
            self.updates += 1


class CtrlCInRoundTwo(LockedUI):
    """Ctrl-C (SIGINT to this process) once a trial's phase 1 shows past its round-1 target on the progress board:
    that trial has reported round 1 (ASHA recorded it), the other has not started. Not while a Train run starts:
    Ray Train registers a run's placement group with its cleaner only once the workers are up, so a run killed
    before that leaves its placement group behind in this process's Ray (the CLI's own Ray ends with it). Sent only
    from Tune's loop on the main thread with the sweep's watcher on Tune's handler, so that it can reach nothing
    but Tune; ``sent`` says whether it was."""

    def __init__(self, round_one: int):
        super().__init__()
        self.round_one, self.sent = round_one, False

    def update(self, tasks: dict) -> None:
        super().update(tasks)
        watched = getattr(signal.getsignal(signal.SIGINT), "watched", False)
        if not self.sent and watched and any(name.endswith(" phase1") and t["done"] > self.round_one
                                             for name, t in tasks.items()):
            self.sent = True
            signal.raise_signal(signal.SIGINT)


ON_RAY = {k: v for k, v in FAST.items() if not k.startswith(("pretrain.", "model.", "experts."))}
"""FAST on the session's prepared root (its pretrained towers and 3-epoch experts: no base stage reruns)."""


def ray_config(root, **overrides):
    return tiny_config(root, **{**ON_RAY, **overrides})


def _modified(s3, prefix: str) -> dict[str, object]:
    pages = s3.client().get_paginator("list_objects_v2").paginate(Bucket=s3.bucket, Prefix=prefix)
    return {o["Key"]: o["LastModified"] for page in pages for o in page.get("Contents", [])}


@pytest.mark.ray
@pytest.mark.slow
def test_sweep_on_a_bucket_asha_stops_a_diverged_trial_and_rerun_restores(ray_session, prepared_root, s3, tmp_path):
    """A grid of 2 trials, one at a time, both phases of a trial as concurrent Train runs (phase 0, of one
    iteration, finishes in round 1 and is not run again in round 2); the base run, the
    trials' roots and Tune's experiment in an S3 bucket (issue #21). lr_img = inf diverges at iteration 1 and
    scores 0; running after the good trial, ASHA stops it at the first rung. A range no finished run holds
    (phase 1 over epochs 1..3: its range_end auto, which the windows' rule resolves to 3 from expert 0 in the bucket,
    the only end after its target epochs) is compressed before the trials. Ctrl-C in the good trial's round 2 ends
    the sweep with SweepInterrupted (no table; the signal handlers as they were); the same sweep resumes it, and its
    ASHA stops the bad trial against the round 1 recorded before the stop. The table, plot and best.yaml (naming that end) land in the bucket; the same sweep
    again restores the finished experiment (no trial reruns); `run` on best.yaml reuses the trial's phases."""
    from ptmst_ray.orchestration.pipeline import run_pipeline
    from ptmst_ray.trajectories.store import ShortcutStore

    base = upload_root(prepared_root, s3.url("base"))
    cfg = ray_config(base, **{
        "phases.0.iterations": 1, "phases.1.range_start": 1, "phases.1.range_end": "auto",
        "sweep.searcher": "grid", "sweep.max_concurrent": 1,
        "sweep.scheduler": "asha", "sweep.grace_period": 1, "sweep.rounds": 2, "sweep.space": {"distill.lr_img": {"grid": [100.0, float("inf")]}}})
    shortcuts = ShortcutStore(layout.Layout(base).shortcuts)
    assert shortcuts.complete_ids(1, 3, layout.experts_hash(cfg)) == []  # the prepared run's phase 1 is 0..3
    handler = signal.getsignal(signal.SIGINT)
    stop = CtrlCInRoundTwo(round_one=5)  # like the CLI's rich UI, it cannot be pickled: Tune must not pickle it
    with pytest.raises(sw.SweepInterrupted) as stopped:
        sw.run_sweep(cfg, stop, verbose=0)
    assert stop.sent and stop.updates > 0  # the progress poll ran during the sweep
    assert signal.getsignal(signal.SIGINT) is handler  # not Tune's, which would turn a later Ctrl-C into a warning
    out = stopped.value.url
    assert out.startswith(f"s3://{s3.bucket}/base/sweeps/") and not storage.exists(storage.join(out, sw.TABLE)), out
    prefix = out.removeprefix(f"s3://{s3.bucket}/")
    first = [k for k in _modified(s3, prefix) if k.endswith("/config.yaml")]  # a trial writes it first
    assert len(first) == 1, first  # the second trial had not started
    rungs = storage.read_json(storage.join(out, sw.ASHA_RUNGS))  # what ASHA recorded before the stop: round 1
    summary = sw.run_sweep(cfg, LockedUI(), verbose=0)
    assert summary["resumed"] and summary["dir"] == out
    assert not summary["errors"], summary["errors"]
    assert summary["selection"] == "test"  # the tiny data has no val split: trials are scored on test
    assert shortcuts.complete_ids(1, 3, layout.experts_hash(cfg)) == [0, 1]
    rows = {r["distill.lr_img"]: r for r in summary["rows"]}
    good, bad = rows[100.0], rows[float("inf")]
    assert good["rounds"] == 2 and good["iterations"] == 10 and not good["stopped_early"] and good["r_mean"] > 0
    assert bad["diverged"] and bad["r_mean"] == 0.0 and bad["stopped_early"] and bad["rounds"] == 1
    assert bad["iterations"] == 1  # diverged at its first iteration
    # stopped by the resumed sweep's ASHA against the good trial's round 1, which the stopped sweep had recorded
    # (one bracket, milestones at rounds 2 and 1): Tune itself restores no scheduler state, and the good trial,
    # resumed from its round-1 checkpoint, does not report round 1 again
    assert first == [f"{prefix}/{good['trial_id']}/config.yaml"]
    (two, at_two), (one, at_one) = rungs[0]
    assert (two, one, sorted(at_one)) == (2, 1, [good["trial_id"]]) and sorted(at_two) in ([], [good["trial_id"]])
    assert [r["r_mean"] for r in summary["rows"]] == [good["r_mean"], 0.0]  # best first
    # the good trial's two rounds were scored as evaluation students are: on a GPU where the cluster has them
    # (the session's 2 logical ones), not on one CPU thread
    scored = finished_tasks(ray_session.dashboard_url, "_score_round", 2)  # round 2's may have run twice
    assert len(scored) in (2, 3) and all(t.required_resources.get("GPU") == 1.0 for t in scored), scored

    table = pq.read_table(pa.BufferReader(storage.read_bytes(storage.join(out, sw.TABLE_PARQUET))))
    assert table.num_rows == 2 and storage.read_bytes(storage.join(out, sw.PLOT))[:4] == b"\x89PNG"
    good_root = storage.join(out, good["trial_id"])  # each trial distilled in its own root in the bucket
    for part in ("partial", "subset"):  # round 1 stopped phase 1 at iteration 5
        assert storage.exists(storage.join(good_root, "phases", "phase1", part, storage.MANIFEST)), part
    phase0 = storage.join(good_root, "phases", "phase0")  # finished in round 1: one Train run, no partial subset
    assert storage.exists(storage.join(phase0, "subset", storage.MANIFEST))
    assert not storage.exists(storage.join(phase0, "partial", storage.MANIFEST))
    assert len(storage.listdir(storage.join(phase0, "attempts"))) == 1
    # round 1's Train run and round 2's, which ran again after the stop unless it had stored its subset
    assert len(storage.listdir(storage.join(good_root, "phases", "phase1", "attempts"))) in (2, 3)
    assert not storage.exists(storage.join(base, "phases"))

    stamps = {k: t for k, t in _modified(s3, prefix).items() if k.endswith("/config.yaml")}
    assert len(stamps) == 2, stamps
    again = sw.run_sweep(cfg, LockedUI(), verbose=0)
    assert again["resumed"] and again["name"] == summary["name"]
    assert {r["trial_id"] for r in again["rows"]} == {r["trial_id"] for r in summary["rows"]}
    assert {k: t for k, t in _modified(s3, prefix).items() if k.endswith("/config.yaml")} == stamps  # none reran

    (tmp_path / "best.yaml").write_text(storage.read_text(storage.join(out, sw.BEST_YAML)))
    best = load_config(tmp_path / "best.yaml", ["eval.seeds=1"])
    assert best.run.root == good_root and best.distill.lr_img == 100.0 and best.phases[1].range_start == 1
    assert best.phases[1].range_end == 3 and len(storage.listdir(layout.Layout(base).windows)) == 1
    results = run_pipeline(best)  # phases are complete in the trial's root: only aggregate + evaluation run
    assert results["phases"]["phase0"].get("skipped") and results["phases"]["phase1"].get("skipped")
    assert math.isfinite(results["methods"]["ptm_st"]["r_mean"]["mean"])


def test_cli_sweep_options_and_bad_space_exit_2():
    import typer
    from typer.testing import CliRunner

    from ptmst_ray_cli import sweep_cmd

    app = typer.Typer()
    app.command("other")(lambda: None)  # two commands: typer keeps `sweep` as a subcommand
    sweep_cmd.register(app)
    runner = CliRunner()
    help_text = runner.invoke(app, ["sweep", "--help"]).output
    for option in ("--config", "--set", "--samples", "--address"):
        assert option in help_text
    bad = runner.invoke(app, ["sweep", "--set", "sweep.searcher=grid",
                              "--set", "sweep.space={distill.lr_img: {uniform: [1, 2]}}"])
    assert bad.exit_code == 2 and "grid searcher needs" in bad.output.replace("\n", " ")
    grid = runner.invoke(app, ["sweep", "--samples", "2", "--set", "sweep.searcher=grid", "--set",
                               "sweep.space={distill.lr_img: {choice: [1, 2, 3]}, distill.lr_txt: {grid: [1, 2]}}"])
    assert grid.exit_code == 2, grid.output  # not silently 6 trials where 2 were asked for
    assert "--samples 2: the grid searcher runs every combination of sweep.space once (6 trials here)" in " ".join(
        grid.output.split()), grid.output


def test_cli_sweep_stopped_by_ctrl_c_exits_130_and_says_how_to_resume(tmp_path, monkeypatch):
    """The CLI's handling of a stopped sweep (run_sweep raising SweepInterrupted, as the bucket test above makes it
    do on Tune's loop): exit 130, where the state is, that the same command resumes; no table, no Ray started."""
    import typer
    from typer.testing import CliRunner

    from ptmst_ray.orchestration import runtime
    from ptmst_ray_cli import common, sweep_cmd

    url = str(tmp_path / "run" / "sweeps" / "grid-0")

    def stopped(cfg, ui):
        print("Trial status: 1 RUNNING")  # as Tune's progress reporter prints it, to stdout
        raise sw.SweepInterrupted(url)

    monkeypatch.setattr(sw, "run_sweep", stopped)
    monkeypatch.setattr(common, "connect_ray", lambda cfg, address: None)
    monkeypatch.setattr(runtime, "install_interrupt_handler", lambda: None)  # this process's SIGINT left as it is
    monkeypatch.setattr("ray.shutdown", lambda: None)  # the CLI ends its Ray; this process's is the session's
    monkeypatch.setattr(common.console, "width", 4000)  # each message on one line
    app = typer.Typer()
    app.command("other")(lambda: None)
    sweep_cmd.register(app)
    result = CliRunner().invoke(app, ["sweep", "--set", f"run.root={tmp_path / 'run'}"])
    assert result.exit_code == 130, result.output
    assert f"interrupted: Tune saved the sweep under {url}: the same command resumes it" in result.output
    assert "best:" not in result.output and "Traceback" not in result.output
    # Tune's tables are progress: on stderr with the rest, stdout kept for what scripts read
    assert "Trial status: 1 RUNNING" in result.stderr and result.stdout == "", result.stdout
