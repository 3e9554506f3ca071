"""bench/bench_scaling.py's rounds: the per-round ratios, the medians and the order of the variants, on runs
made up here (the benchmark itself runs the pipeline five ways: minutes, not a test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_scaling.py"
_SPEC = importlib.util.spec_from_file_location("bench_scaling", _PATH)
bs = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_scaling"] = bs
_SPEC.loader.exec_module(bs)


def run(wall: float, phases: float, **extra) -> dict:
    return {"wall": wall, "stages": {"phases": phases, "start-up": wall - phases}, "methods": {}, **extra}


ROUNDS = [
    {"plain": run(100.0, 30.0), "laptop": run(120.0, 40.0), "serial": run(140.0, 64.0)},
    {"plain": run(90.0, 28.0), "laptop": run(117.0, 39.0), "serial": run(150.0, 60.0)},
    {"plain": run(110.0, 33.0), "laptop": run(121.0, 45.0), "serial": run(130.0, 62.0)},
]


def test_ratios_are_each_rounds_own():
    r = bs.ratios(ROUNDS[1])
    assert r["laptop"] == 117.0 / 90.0 and r["serial"] == 150.0 / 90.0 and r["phases"] == 39.0 / 60.0
    assert set(r) == {"laptop", "serial", "phases"}  # plain is the base, not a ratio


def test_median_runs_take_each_stage_and_wall_separately():
    med = bs.median_runs(ROUNDS)
    assert med["laptop"]["wall"] == 120.0 and med["laptop"]["stages"]["phases"] == 40.0
    assert med["serial"]["wall"] == 140.0 and med["serial"]["stages"]["phases"] == 62.0  # from another round
    assert med["plain"]["stages"]["start-up"] == sorted(r["plain"]["wall"] - r["plain"]["stages"]["phases"]
                                                        for r in ROUNDS)[1]


def test_round_notes_give_every_round_and_the_median_of_its_ratios():
    lines = bs.round_notes(ROUNDS)
    assert len(lines) == len(ROUNDS) + 1
    overheads = sorted(100 * (r["laptop"]["wall"] / r["plain"]["wall"] - 1) for r in ROUNDS)  # +20, +30, +10
    assert f"laptop {overheads[1]:+.0f}%" in lines[-1] and lines[-1].startswith("* median")
    assert f"phases {40.0 / 64.0:.2f}x" in lines[0] and f"laptop {overheads[2]:+.0f}%" in lines[1]


def test_rounds_alternate_the_order_and_keep_each_round(tmp_path, monkeypatch):
    order = []

    def fake_plain(config, overrides, root, log, threads):
        order.append(root.name)
        return run(100.0, 30.0)

    def fake_cli(config, overrides, root, log, env):
        order.append(root.name)
        return run(120.0 if "distill.max_concurrent=1" not in overrides else 140.0, 40.0)

    monkeypatch.setattr(bs, "run_plain", fake_plain)
    monkeypatch.setattr(bs, "run_cli", fake_cli)
    bs.main(["--variants", "plain", "laptop", "serial", "--rounds", "2", "--work", str(tmp_path / "w"), "--no-write"])
    assert order == ["plain-r1", "laptop-r1", "serial-r1", "serial-r2", "laptop-r2", "plain-r2"]
    assert len(json.loads((tmp_path / "w" / "rounds.json").read_text())) == 2
    assert set(json.loads((tmp_path / "w" / "runs.json").read_text())) == {"plain", "laptop", "serial"}  # medians


def test_union_seconds_counts_overlapping_attempts_once():
    # side by side: two attempts overlapping by 8 s; in turn: two apart; one inside another
    assert bs.union_seconds([(10.0, 30.0), (12.0, 38.0)]) == 28.0
    assert bs.union_seconds([(50.0, 60.0), (10.0, 30.0)]) == 30.0
    assert bs.union_seconds([(0.0, 10.0), (2.0, 5.0), (9.0, 12.0)]) == 12.0
    assert bs.union_seconds([]) == 0.0


def test_attempt_spans_take_each_runs_last_finished_attempt(tmp_path):
    records = {"phase0": [{"start": 5.0}, {"start": 1.0, "end": 4.0}, {"start": 2.0, "end": 9.0}],  # killed one last
               "phase1": [{"start": 3.0, "end": 7.5}], "single_phase": [{"start": 6.0}]}  # never finished
    for run, attempts in records.items():
        folder = tmp_path / "phases" / run / "attempts"
        folder.mkdir(parents=True)
        for i, a in enumerate(attempts):
            (folder / f"{i}.json").write_text(json.dumps(a))
    assert bs.attempt_spans(tmp_path) == {"phase0": (2.0, 9.0), "phase1": (3.0, 7.5)}


def test_report_gives_the_phases_stage_outside_the_attempts():
    runs = {"laptop": {**run(120.0, 40.0), "attempts": {"phase0": 27.0, "phase1": 26.0}, "attempts_union": 28.5}}
    text = bs.report(runs, {"laptop": "1.0"})
    assert "* laptop: distillation attempts phase0 27.0 / phase1 26.0 s; the phases stage outside them 11.5 s" in text
    med = bs.median_runs([{"laptop": {**run(120.0, 40.0), "attempts": {"phase0": a}, "attempts_union": a}}
                          for a in (20.0, 30.0, 25.0)])
    assert med["laptop"]["attempts"] == {"phase0": 25.0} and med["laptop"]["attempts_union"] == 25.0


_MODEL_PATH = Path(__file__).resolve().parents[1] / "bench" / "model_scaling.py"
_MODEL_SPEC = importlib.util.spec_from_file_location("model_scaling", _MODEL_PATH)
ms = importlib.util.module_from_spec(_MODEL_SPEC)
_MODEL_SPEC.loader.exec_module(ms)


def test_model_schedules_plain_calls_including_the_pipelines_optional_stages():
    """bench_scaling's plain variant records every stage the pipeline ran, ``expert_lr`` and ``features``
    included (a KeyError once): they are serial stages of the model; experts pair training with compression."""
    calls = [("prepare", 1.0), ("pretrain", 10.0), ("pretrain", 12.0), ("embed", 0.5), ("features", 0.25),
             ("expert_lr", 3.0), ("experts", 4.0), ("experts", 1.0), ("experts", 6.0), ("experts", 1.0),
             ("phases", 8.0), ("phases", 9.0), ("aggregate", 0.1), ("eval ptm_st", 2.0), ("eval random", 3.0),
             ("eval ptm_st", 2.0)]
    units = ms.unit_costs(calls)
    assert units["experts"] == [5.0, 7.0] and units["expert_lr"] == [3.0] and units["features"] == [0.25]
    one = ms.predict(units, slots=1, phase_slots=1, experts=2)
    two = ms.predict(units, slots=2, phase_slots=2, experts=2)
    # by hand: in turn everything adds up; on two slots the experts (5, 7), the phases (8, 9) and the evaluation
    # tasks (2, 3, 2: 2 and 3 start, the third follows the 2) overlap
    assert one == {"data": 1.0, "pretrain": 11.0, "embed": 0.5, "features": 0.25, "expert_lr": 3.0, "experts": 12.0,
                   "phases": 17.0, "aggregate": 0.1, "eval": 7.0}
    assert (two["experts"], two["phases"], two["eval"]) == (7.0, 9.0, 4.0)
    # units beside each other slowed by the side-by-side factor; a stage on one slot is not
    slow = ms.predict(units, slots=2, phase_slots=2, experts=2, side_by_side=1.5)
    assert (slow["pretrain"], slow["experts"], slow["phases"], slow["eval"]) == (16.5, 10.5, 13.5, 6.0)
    assert ms.predict(units, slots=1, phase_slots=1, experts=2, side_by_side=1.5) == one
    stages = {"data": 1.5, "pretrain": 12.0, "embed": 0.6, "expert_lr": 3.5, "experts": 8.0, "phases": 11.0,
              "aggregate": 0.1, "eval": 5.0, "start-up": 6.0}
    runs = {"plain-1": {"calls": calls}, "laptop": {"stages": stages, "wall": 47.7}}
    table, excess, factor = ms.check(runs, slots=2)
    assert "| expert_lr | 3.0 | 3.5 |" in table and factor == 1.0  # no attempt records: no factor
    # laptop's measured minus the model's seconds for experts, phases, eval over their waves (1 + 1 + 2)
    assert excess == ((8.0 - 7.0) + (11.0 - 9.0) + (5.0 - 4.0)) / 4
    # with the phase workers' attempts (9.0 and 11.0 s against 8.0 and 9.0 alone): factor 10 / 8.5
    runs["laptop"]["attempts"] = {"phase0": 9.0, "phase1": 11.0}
    table, excess, factor = ms.check(runs, slots=2)
    assert factor == pytest.approx(10.0 / 8.5)
    assert excess == pytest.approx(((8.0 - 7.0 * factor) + (11.0 - 9.0 * factor) + (5.0 - 4.0 * factor)) / 4)


def test_a_rewritten_section_keeps_what_follows_its_keep_line(tmp_path):
    """bench/_common.replace_section: a benchmark rewriting its figures replaces its section up to the KEEP line
    and keeps the hand-written analysis after it; the other sections are untouched; without the line the whole
    section is replaced."""
    import _common

    path = tmp_path / "RESULTS.md"
    path.write_text("# R\n\n## A\n\nold figures\n\n" + _common.KEEP + "\nwhy, by hand\n\n## B\n\nb\n")
    _common.replace_section("## A", "new figures\n", path=path)
    assert path.read_text() == "# R\n\n## A\n\nnew figures\n\n" + _common.KEEP + "\nwhy, by hand\n\n## B\n\nb\n"
    _common.replace_section("## B", "b2\n", path=path)
    assert path.read_text().endswith("why, by hand\n\n## B\n\nb2\n")
    _common.replace_section("## A", "newest\n", path=path)
    assert "new figures" not in path.read_text() and path.read_text().count("why, by hand") == 1
    path.write_text("## A\n\nold\nwhy\n\n## B\n\nb\n")
    _common.replace_section("## A", "x\n", path=path)
    assert path.read_text() == "## A\n\nx\n\n## B\n\nb\n"
