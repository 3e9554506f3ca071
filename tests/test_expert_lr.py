"""The experts' learning-rate rule as a stage (``experts.lr_img: auto``; docs/method.md#a-recipe-for-new-data):
its pick against probe experts trained and measured here, what it stores and reuses, its errors, and the pipeline's
stage on Ray with the CLI reading the pick back."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from conftest import copy_root, tiny_config
from ptmst_ray import storage
from ptmst_ray.config import ConfigError, load_config
from ptmst_ray.layout import Layout, StageError, experts_hash
from ptmst_ray.stages import expert_lr
from ptmst_ray.stages.embed import load_real
from ptmst_ray.trajectories.expert import ALIGNED_EPOCHS, train_expert
from ptmst_ray.trajectories.store import TrajectoryStore

CANDIDATES = [0.3, 0.1, 0.01, 0.001]
"""On the tiny data 0.3 and 0.1 move by noise in their first epochs (a cosine below 0.5), 0.01 and 0.001 do not."""
AUTO = {"experts.lr_img": "auto", "experts.lr_txt": "auto", "experts.lr_candidates": CANDIDATES,
        "experts.epochs": 5, "phases.1.range_end": 5}
"""The rule on, and a phase range past the probe experts' 4 epochs (as the toy's and the paper's recipes have)."""


def _by_hand(cfg, lr: float) -> list[float]:
    """Cosines of consecutive epoch displacements of expert 0 at ``lr``, trained and measured here."""
    real = load_real(cfg)
    experts = dataclasses.replace(cfg.experts, lr_img=lr, lr_txt=lr, epochs=ALIGNED_EPOCHS)
    snaps = train_expert(experts, cfg.model, real.train_images, real.train_text, 0)
    flat = [torch.cat([s[k].flatten().double() for k in sorted(s)]) for s in snaps]
    steps = [b - a for a, b in zip(flat, flat[1:])]
    return [float(a @ b / (a.norm() * b.norm())) for a, b in zip(steps, steps[1:])]


@pytest.fixture
def auto_root(prepared_root, tmp_path):
    """A copy of the prepared root's data and towers (caption embeddings included), no experts."""
    return copy_root(prepared_root, tmp_path / "run", parts=("data", "pretrain"))


def test_the_pick_is_the_largest_rate_whose_probe_expert_keeps_aligned(auto_root):
    cfg = tiny_config(auto_root, **AUTO)
    with pytest.raises(StageError, match="ptmst-ray run"):
        experts_hash(cfg)  # nothing keyed by the experts before the rule has picked
    assert expert_lr.missing(cfg) == CANDIDATES and expert_lr.resolved(cfg) is cfg
    out = expert_lr.run_in_turn(cfg)
    ref = {lr: _by_hand(cfg, lr) for lr in CANDIDATES}
    passing = [lr for lr, cos in ref.items() if all(c >= 0.5 for c in cos[:ALIGNED_EPOCHS - 1])]
    assert passing and len(passing) < len(CANDIDATES), ref  # the candidates tell the rule something
    assert out.experts.lr_img == out.experts.lr_txt == max(passing)
    stored = expert_lr.stored(cfg)
    for lr in CANDIDATES:
        assert stored[lr] == pytest.approx(ref[lr], abs=1e-6)
    # a resumed run tries nothing again and resolves to the same rate; the trajectories were not kept
    assert expert_lr.missing(cfg) == [] and expert_lr.resolved(cfg) == out
    assert not list((auto_root / "experts").glob("**/*.safetensors"))
    # the experts of the pick are those of a config naming that rate: a root trained so is reused
    named = tiny_config(auto_root, **{**AUTO, "experts.lr_img": max(passing), "experts.lr_txt": max(passing),
                                      "experts.lr_candidates": [1.0]})
    assert experts_hash(out) == experts_hash(named)
    # the step sizes follow the picked rate (distill.rel_alpha), and cannot be asked for before it
    rel = {"distill.rel_alpha": 0.1}
    assert out.replace(**rel).alpha_starts() == pytest.approx((0.1 * max(passing),) * 2)
    with pytest.raises(ConfigError, match="experts.lr_img"):
        cfg.replace(**rel).alpha_starts()


def test_no_candidate_passing_names_the_cosines_and_what_to_do(auto_root):
    cfg = tiny_config(auto_root, **{**AUTO, "experts.lr_candidates": [0.3, 0.1]})
    with pytest.raises(StageError, match=r"no candidate.*lr 0\.3: .*lr 0\.1: .*add smaller learning rates"):
        expert_lr.run_in_turn(cfg)
    # both tried and stored: asking again answers from the files
    assert sorted(expert_lr.stored(cfg)) == [0.1, 0.3] and expert_lr.missing(cfg) == []
    with pytest.raises(StageError, match="no candidate"):
        expert_lr.resolved(cfg)


@pytest.mark.parametrize("overrides, field", [
    ({"experts.lr_img": "auto"}, "experts.lr_txt"),
    ({"experts.lr_txt": "auto"}, "experts.lr_txt"),
    ({"experts.lr_img": "auto", "experts.lr_txt": "auto", "experts.lr_candidates": []}, "experts.lr_candidates"),
    ({"experts.lr_candidates": [0.1, -0.01]}, "experts.lr_candidates"),
])
def test_bad_rule_settings_are_refused(overrides, field, tmp_path):
    with pytest.raises(ConfigError, match=field):
        tiny_config(tmp_path, **overrides)


def test_a_named_rate_ignores_the_candidates():
    base = load_config(None, [])
    assert expert_lr.missing(base) == [] and expert_lr.resolved(base) is base
    other = base.replace(**{"experts.lr_candidates": [1.0]})
    assert experts_hash(other) == experts_hash(base)  # stored experts of every root stay valid


@pytest.mark.ray
def test_pipeline_runs_the_rule_as_a_stage_and_the_cli_reads_its_pick(auto_root, tmp_path, ray_session, monkeypatch):
    """The driver's stage (one Ray task per candidate), the experts it then trains at the pick, a rerun that tries
    nothing, and `ptmst-ray shortcut` on the root resolving the pick from the stored files."""
    from ptmst_ray.orchestration.pipeline import StageTimes, run_prerequisites
    from ptmst_ray.orchestration.runtime import NullUI, make_poll, progress_board
    from ptmst_ray_cli.common import console
    from ptmst_ray_cli.main import app
    from typer.testing import CliRunner

    cfg = tiny_config(auto_root, **AUTO)
    board = progress_board()
    poll = make_poll(board, NullUI())
    times = StageTimes(cfg.run.root, poll)
    out, experts = run_prerequisites(cfg, NullUI(), board, poll, times)
    rows = {r["stage"]: r for r in times.rows}
    assert list(rows) == ["data", "pretrain", "embed", "expert_lr", "experts"] and rows["expert_lr"]["ran"]
    pick = out.experts.lr_img
    assert pick in CANDIDATES and out.experts.lr_txt == pick and experts["trained"] == cfg.experts.num_experts
    assert pick == expert_lr.pick(cfg) and sorted(expert_lr.stored(cfg)) == sorted(CANDIDATES)
    store = TrajectoryStore(Layout.of(cfg).experts)
    assert store.complete_ids(experts_hash(out), out.experts.epochs) == list(range(cfg.experts.num_experts))

    again = StageTimes(cfg.run.root, poll)
    out2, experts2 = run_prerequisites(cfg, NullUI(), board, poll, again)
    assert out2 == out and {r["stage"]: r["ran"] for r in again.rows}["expert_lr"] is False
    assert experts2["trained"] == 0

    config = tmp_path / "auto.yaml"
    config.write_text(cfg.to_yaml())
    monkeypatch.setattr(console, "width", 4000)  # the session's Ray is the one the command uses
    from ptmst_ray.layout import needed_ranges
    from ptmst_ray.orchestration import experts as orchestration_experts
    from ptmst_ray.trajectories.store import ShortcutStore, sidecar_url

    with monkeypatch.context() as m:  # every shortcut is stored (the experts stage wrote them): no actor, no Ray
        m.setattr(orchestration_experts, "_shortcut_actor", lambda *a: pytest.fail("a shortcut actor started"))
        m.setattr("ptmst_ray_cli.commands.connect_ray", lambda *a, **k: pytest.fail("the command joined Ray"))
        result = CliRunner().invoke(app, ["shortcut", "--config", str(config)])
        assert result.exit_code == 0, result.output
        assert f"shortcuts for {cfg.experts.num_experts} experts" in result.output and ": 0 written" in result.output
        result = CliRunner().invoke(app, ["experts", "--config", str(config)])  # nor for the experts
        assert result.exit_code == 0, result.output
        assert f"experts: 0 trained, {cfg.experts.num_experts} already complete" in result.output, result.output
    shortcuts = ShortcutStore(Layout.of(out).shortcuts)
    assert orchestration_experts.experts_stored(cfg)
    # with a range end auto too, the summary reads the windows' picks under the rule's rate (none picked here)
    auto_end = cfg.replace(phases=[{**dataclasses.asdict(cfg.phases[0]), "range_end": "auto"}])
    assert orchestration_experts.stored_experts_summary(auto_end)["windows"] == []
    for a, b in needed_ranges(out):  # expert 1's shortcuts gone: those alone are written again
        for url in (shortcuts.url(a, b, 1), sidecar_url(shortcuts.url(a, b, 1))):
            storage.remove(url)
    assert not orchestration_experts.experts_stored(cfg)
    result = CliRunner().invoke(app, ["shortcut", "--config", str(config)])
    assert result.exit_code == 0 and f": {len(needed_ranges(out))} written" in result.output, result.output
    assert shortcuts.complete_ids(*needed_ranges(out)[0], experts_hash(out)) == list(range(cfg.experts.num_experts))
    # a root whose rule never ran: the command says which one runs it
    fresh = tmp_path / "fresh.yaml"
    fresh.write_text(cfg.replace(**{"run.root": str(tmp_path / "fresh")}).to_yaml())
    refused = CliRunner().invoke(app, ["shortcut", "--config", str(fresh)])
    assert refused.exit_code == 1 and "ptmst-ray run" in refused.output, refused.output
    assert json.loads(storage.read_text(expert_lr._result_url(cfg, pick)))["lr"] == pick
