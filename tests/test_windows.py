"""The windows' rule as a stage (a phase's ``range_end: auto``; docs/method.md#a-recipe-for-new-data): its picks
against a numpy reference over expert 0's stored trajectory, what it stores and reuses, the config and sweep checks,
the order the shortcut worker gets the experts in, and the run's stage on Ray with the CLI reading the picks back."""

from __future__ import annotations

import json

import numpy as np
import pytest

from conftest import copy_root, tiny_config
from ptmst_ray import storage
from ptmst_ray.config import ConfigError
from ptmst_ray.layout import Layout, StageError, experts_hash, needed_ranges, phase_hash
from ptmst_ray.stages import windows
from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore

AUTO = {"phases.0.range_end": "auto", "phases.0.start_max": 0, "phases.1.range_end": "auto"}
"""Phase 0 (start 0, one expert epoch: targets in epoch 0) weighs ends 1-3 of the tiny experts' 3 epochs; phase 1
(starts 1-2: epochs 1-2) only 3."""


def _reference(root, start: int, epochs: list[int], max_end: int, expert: int = 0) -> tuple[int, dict[int, float]]:
    """The rule by hand in numpy: per end b, the mean over ``epochs`` of the mean over the towers (image.* and the
    rest) of cos(theta_b - theta_start, theta_(k+1) - theta_k); the best b, ties to the smaller."""
    cfg = tiny_config(root)
    snaps = TrajectoryStore(Layout.of(cfg).experts).trajectory(expert, experts_hash(cfg))

    def towers(e):
        s = snaps[e]
        return [np.concatenate([s[n].numpy().ravel().astype(np.float64) for n in sorted(s) if pick(n)])
                for pick in (lambda n: n.startswith("image."), lambda n: not n.startswith("image."))]

    def cos(u, v):
        return float(u @ v / np.sqrt((u @ u) * (v @ v)))

    scores = {}
    for b in range(max(epochs) + 1, max_end + 1):
        chord = [y - x for x, y in zip(towers(start), towers(b))]
        per_k = [np.mean([cos(c, y - x) for c, x, y in zip(chord, towers(k), towers(k + 1))]) for k in epochs]
        scores[b] = float(np.mean(per_k))
    best = max(scores.values())
    return min(b for b, v in scores.items() if v == best), scores


@pytest.fixture
def root(prepared_root, tmp_path):
    """A copy of the prepared root: data, towers, 2 experts of 3 epochs and their shortcuts."""
    return copy_root(prepared_root, tmp_path / "run")


def test_the_picks_are_the_best_aligned_ends_of_expert_0_and_are_stored(root, monkeypatch):
    cfg = tiny_config(root, **AUTO)
    assert windows.is_auto(cfg) and windows.resolved(cfg) == cfg
    with pytest.raises(StageError, match="windows' rule has not picked"):
        phase_hash(cfg, cfg.phases[0])  # nothing keyed by a phase before the rule has picked its end
    with pytest.raises(StageError, match="ptmst-ray experts"):
        windows.check_resolved(cfg)
    out = windows.pick(cfg)
    ref0, scores0 = _reference(root, 0, [0], 3)
    ref1, scores1 = _reference(root, 0, [1, 2], 3)
    assert len(scores0) == 3 and len(set(np.round(list(scores0.values()), 6))) == 3  # three ends, told apart
    assert [p.range_end for p in out.phases] == [ref0, ref1] == [w["range"][1] for w in windows.picks(cfg)]
    for w, scores in zip(windows.picks(cfg), (scores0, scores1)):
        assert {int(b): v for b, v in w["scores"].items()} == pytest.approx(scores, abs=1e-9)
        assert w["expert"] == 0
    # the phases of the picks are those of a config naming the ends: a root distilled so is reused
    named = tiny_config(root, **{**AUTO, "phases.0.range_end": ref0, "phases.1.range_end": ref1})
    assert out == named and [phase_hash(out, p) for p in out.phases] == [phase_hash(named, p) for p in named.phases]
    # a resumed run reads the files and weighs nothing again
    from ptmst_ray.trajectories import expert as expert_mod

    monkeypatch.setattr(expert_mod, "aligned_range_ends", lambda *a: pytest.fail("the rule ran again"))
    assert windows.pick(cfg) == out == windows.resolved(cfg) == windows.check_resolved(cfg)
    files = sorted(p.name for p in (root / "experts" / "windows").iterdir())
    assert len(files) == 2 and all(f.startswith(experts_hash(cfg)) for f in files)


def test_an_expert_0_not_trained_to_the_end_is_named(root):
    cfg = tiny_config(root, **{**AUTO, "experts.epochs": 4})  # the stored experts have 3 epochs
    with pytest.raises(StageError, match=r"expert 0 has 3 of its 4 epochs stored.*ptmst-ray experts"):
        windows.pick(cfg)
    assert not (root / "experts" / "windows").exists()  # nothing half-picked is stored


def test_config_checks_of_auto_ends(tmp_path):
    cfg = tiny_config(tmp_path, **AUTO)
    assert [p.range_end for p in cfg.phases] == ["auto", "auto"]
    with pytest.raises(ConfigError, match=r"phases\[1\]\.start_max.*\[4, 3\], which is empty.*at most 1"):
        tiny_config(tmp_path, **{**AUTO, "distill.expert_epochs": 2})
    with pytest.raises(ConfigError, match="range_end"):
        tiny_config(tmp_path, **{"phases.0.range_end": "later"})
    assert windows.end_bound(cfg, cfg.phases[0]) == 3 and windows.target_epochs(cfg, cfg.phases[1]) == [1, 2]


def test_a_sweep_cannot_try_auto_ends(tmp_path):
    from ptmst_ray.orchestration import sweep as sw

    cfg = tiny_config(tmp_path, **AUTO)
    sw.check_space(cfg.replace(**{"sweep.space": {"distill.syn_steps": {"choice": [1, 2]}}}))  # the base's auto: fine
    phase = {"range_start": 0, "range_end": "auto", "start_min": 0, "start_max": 1, "pairs": 6, "iterations": 6,
             "minibatch": 3}
    for space in ({"phases.0.range_end": {"choice": [2, "auto"]}}, {"phases.0": {"grid": [phase]}},
                  {"phases": {"grid": [[phase]]}}):
        with pytest.raises(sw.SweepError, match="range_end auto in a trial"):
            sw.check_space(cfg.replace(**{"sweep.space": space}))


def test_experts_wait_for_expert_0_before_any_shortcut(tmp_path, monkeypatch):
    """The shortcut worker's first call must be expert 0's (it picks the ends); later experts go at once."""
    from ptmst_ray.orchestration import experts as orch

    calls: list[int] = []
    monkeypatch.setattr(orch, "_shortcut_actor", lambda cfg_dict: "actor")
    monkeypatch.setattr(orch, "_compress", lambda actor, i: calls.append(i))
    compressor = orch.Compressor(tiny_config(tmp_path, **AUTO))
    for i in (2, 1):
        compressor.add(i)
    assert calls == []
    compressor.add(0)
    compressor.add(3)
    assert calls == [0, 2, 1, 3]
    held = orch.Compressor(tiny_config(tmp_path, **AUTO))
    held.add(1)
    with pytest.raises(StageError, match="expert 0 is not among the stored experts"):
        held.finish()


@pytest.mark.ray
def test_the_run_picks_the_ends_before_the_shortcuts_and_the_cli_reads_them(prepared_root, tmp_path, ray_session,
                                                                           monkeypatch):
    """Experts trained from nothing with both ends auto: the stage's picks equal the reference, the shortcuts are
    those of the picked ranges for every expert, a rerun does nothing, and `ptmst-ray shortcut` reads the picks."""
    from typer.testing import CliRunner

    from ptmst_ray.orchestration.pipeline import StageTimes, run_prerequisites
    from ptmst_ray.orchestration.runtime import NullUI, make_poll, progress_board
    from ptmst_ray_cli.common import console
    from ptmst_ray_cli.main import app

    root = copy_root(prepared_root, tmp_path / "run", parts=("data", "pretrain"))
    cfg = tiny_config(root, **AUTO)
    board = progress_board()
    poll = make_poll(board, NullUI())
    out, experts = run_prerequisites(cfg, NullUI(), board, poll, StageTimes(cfg.run.root, poll))
    assert experts["trained"] == cfg.experts.num_experts
    ref = [_reference(root, 0, [0], 3)[0], _reference(root, 0, [1, 2], 3)[0]]
    assert [p.range_end for p in out.phases] == ref == [w["range"][1] for w in experts["windows"]]
    shortcuts, chash = ShortcutStore(Layout.of(out).shortcuts), experts_hash(out)
    assert needed_ranges(out) == sorted({(0, b) for b in ref})
    assert experts["shortcuts_written"] == cfg.experts.num_experts * len(needed_ranges(out))
    for a, b in needed_ranges(out):
        assert shortcuts.complete_ids(a, b, chash) == list(range(cfg.experts.num_experts))
    again, experts2 = run_prerequisites(cfg, NullUI(), board, poll, StageTimes(cfg.run.root, poll))
    assert again == out and experts2["trained"] == experts2["shortcuts_written"] == 0
    assert experts2["windows"] == experts["windows"]

    config = tmp_path / "auto.yaml"
    config.write_text(cfg.to_yaml())
    monkeypatch.setattr(console, "width", 4000)
    result = CliRunner().invoke(app, ["shortcut", "--config", str(config)])
    assert result.exit_code == 0, result.output
    assert f"phase 0: range [0, {ref[0]}], the windows' rule's pick from expert 0" in result.output
    assert f"ranges {needed_ranges(out)}: 0 written" in result.output
    stored = json.loads(storage.read_text(windows._url(out, cfg.phases[0])))
    assert stored["range_end"] == ref[0] and stored["target_epochs"] == [0]
