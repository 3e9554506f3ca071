"""bench/bench_scaling.py's rounds: the per-round ratios, the medians and the order of the variants, on runs
made up here (the benchmark itself runs the pipeline five ways: minutes, not a test)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

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
