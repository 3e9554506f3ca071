"""bench/bench_quality.py's pure parts: the budget split, the packing of cells into waves, the ratio and
table formatting, and the RESULTS.md section replacement (synthetic inputs, no Ray)."""

import importlib.util
import sys
from pathlib import Path

import pytest

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_quality.py"
_SPEC = importlib.util.spec_from_file_location("bench_quality", _PATH)
bq = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_quality"] = bq  # dataclasses look their module up while the file executes
_SPEC.loader.exec_module(bq)


def test_split_budget_keeps_the_config_proportions():
    # toy: 20 + 30 = 50 -> 40% / 60%
    assert bq.split_budget(20, [20, 30]) == [8, 12]
    assert bq.split_budget(50, [20, 30]) == [20, 30]
    assert bq.split_budget(100, [20, 30]) == [40, 60]
    # 10 * 1/3 = 3.33, 10 * 2/3 = 6.67 -> the larger remainder (second) gets the extra pair
    assert bq.split_budget(10, [1, 2]) == [3, 7]
    # equal remainders (7 * 1/2 = 3.5 each): the earlier phase gets the extra pair
    assert bq.split_budget(7, [5, 5]) == [4, 3]
    # three phases 1:1:1 of 11 -> 3.67 each: two extras to the first two
    assert bq.split_budget(11, [2, 2, 2]) == [4, 4, 3]
    for total in range(10, 60):  # every part >= 2 from 10 on (10 * 0.2)
        assert sum(bq.split_budget(total, [2, 3, 5])) == total


def test_split_budget_rejects_a_phase_below_two_pairs():
    with pytest.raises(ValueError, match="fewer than 2 pairs"):
        bq.split_budget(5, [1, 9])  # 0.5 / 4.5 -> [1, 4]
    with pytest.raises(ValueError):
        bq.split_budget(10, [0, 3])


def test_pack_waves_fills_slots_in_order():
    jobs = [("single@20", 1), ("ptm@20", 2), ("exact@20", 2), ("single@50", 1), ("ptm@50", 2)]
    assert bq.pack_waves(jobs, 2) == [["single@20", "single@50"], ["ptm@20"], ["exact@20"], ["ptm@50"]]
    assert bq.pack_waves(jobs, 4) == [["single@20", "ptm@20", "single@50"], ["exact@20", "ptm@50"]]


def _stat(mean, std=0.0):
    return {"mean": mean, "std": std}


def _cell(method, budget, best, final, pairs=None):
    recalls = {r: _stat(10.0 * (i + 1)) for i, r in enumerate(bq.RECALLS)}
    return {"method": method, "budget": budget, "pairs": pairs or budget,
            "best": {**recalls, "r_mean": _stat(best, 1.5)}, "final": {**recalls, "r_mean": _stat(final, 0.5)}}


def test_ratios_against_random_at_the_same_budget_and_full_data():
    cells = {"random@20": _cell("random", 20, 40.0, 32.0), "ptm_st@20": _cell("ptm_st", 20, 50.0, 40.0),
             "random@50": _cell("random", 50, 60.0, 60.0), "ptm_st@50": _cell("ptm_st", 50, 45.0, 30.0),
             "single_phase@50": _cell("single_phase", 50, 30.0, 15.0)}
    full = _cell("full", 0, 80.0, 75.0, pairs=2000)
    rows = bq.ratios(cells, full)
    assert [(r["budget"], r["method"]) for r in rows] == [(20, "ptm_st"), (50, "single_phase"), (50, "ptm_st")]
    r20, sp50, r50 = rows
    assert r20["random_best"] == pytest.approx(50 / 40) and r20["random_final"] == pytest.approx(40 / 32)
    assert r20["full_best"] == pytest.approx(50 / 80) and r20["full_final"] == pytest.approx(40 / 75)
    assert r50["random_best"] == pytest.approx(0.75) and r50["random_final"] == pytest.approx(0.5)
    assert sp50["random_final"] == pytest.approx(0.25) and sp50["full_final"] == pytest.approx(0.2)
    table = bq.ratio_table(rows)
    assert "| 20 | ptm_st | 1.25 | 1.25 | 0.62 | 0.53 |" in table
    assert "| 50 | ptm_st | 0.75 | 0.50 | 0.56 | 0.40 |" in table
    # no random cell at a budget and no full data: n/a
    alone = bq.ratios({"ptm_st@9": _cell("ptm_st", 9, 30.0, 30.0)}, None)
    assert "| 9 | ptm_st | n/a | n/a | n/a | n/a |" in bq.ratio_table(alone)


def test_metric_table_rows_best_and_final():
    cells = {"ptm_st@20": _cell("ptm_st", 20, 50.0, 40.0), "random@20": _cell("random", 20, 40.0, 32.0),
             "no_ema@20": {"method": "no_ema", "budget": 20, "status": "failed"}}
    full = _cell("full", 0, 80.0, 75.0, pairs=2000)
    best = bq.metric_table(cells, full, "best").splitlines()
    assert best[0] == "| budget | method | pairs | r_mean | TR@1 | TR@5 | TR@10 | IR@1 | IR@5 | IR@10 |"
    # method order: random, single_phase, ptm_st, ptm_st_exact, then the ablations
    assert best[2] == "| 20 | random | 20 | 40.0 ± 1.5 | 10.0 | 20.0 | 30.0 | 40.0 | 50.0 | 60.0 |"
    assert best[3].startswith("| 20 | ptm_st | 20 | 50.0 ± 1.5 |")
    assert best[4].startswith("| 20 | no_ema | | failed |")
    assert best[5].startswith("| all | full | 2000 | 80.0 ± 1.5 |")
    final = bq.metric_table(cells, full, "final").splitlines()
    assert final[3].startswith("| 20 | ptm_st | 20 | 40.0 ± 0.5 |")


def test_replace_section_touches_only_its_section():
    text = "# R\n\n## A\n\na\n\n## Quality matrix (issue #11)\n\nold\n\n### sub\n\nold too\n\n## B\n\nb\n"
    out = bq.replace_section(text, bq.SECTION, "new\n")
    assert out == "# R\n\n## A\n\na\n\n## Quality matrix (issue #11)\n\nnew\n\n## B\n\nb\n"
    # absent: appended after a blank line; replacing again is idempotent
    added = bq.replace_section("# R\n\n## A\n\na\n", bq.SECTION, "x\n")
    assert added == "# R\n\n## A\n\na\n\n## Quality matrix (issue #11)\n\nx\n"
    assert bq.replace_section(added, bq.SECTION, "x\n") == added
    # last section of the file
    assert bq.replace_section(added, bq.SECTION, "y\n").endswith("## Quality matrix (issue #11)\n\ny\n")


def test_cell_notes_name_failed_and_diverged_cells():
    cells = {"ptm_st@20": {**_cell("ptm_st", 20, 50.0, 40.0), "status": "done", "diverged_phases": ["phase1"]},
             "no_ema@20": {"method": "no_ema", "budget": 20, "status": "failed", "distill_detail": "phase0: failed (x)"},
             "random@20": {**_cell("random", 20, 40.0, 32.0), "status": "done"}}
    notes = bq.cell_notes(cells)
    assert "* ptm_st@20: phases phase1 diverged; scored with their last finite EMA state" in notes
    assert "* no_ema@20: failed: phase0: failed (x)" in notes
    assert len([n for n in notes if n.startswith("* ")]) == 2
    assert bq.cell_notes({"random@20": {**_cell("random", 20, 40.0, 32.0), "status": "done"}}) == []
