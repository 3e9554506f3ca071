"""bench/bench_quality.py's pure parts: the budget split, the packing of cells into waves, the ratio and
table formatting, and the RESULTS.md section replacement (synthetic inputs, no Ray)."""

import importlib.util
import json
import math
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


def test_gap_closed_is_the_share_of_the_random_to_full_gap():
    # random 4.1, full 15.6 (scenes, 50 pairs): a method at 11.0 closes (11.0 - 4.1) / (15.6 - 4.1) = 6.9 / 11.5
    assert bq.gap_closed(11.0, 4.1, 15.6) == pytest.approx(0.6)
    assert bq.gap_closed(4.1, 4.1, 15.6) == 0.0
    assert bq.gap_closed(2.95, 4.1, 15.6) == pytest.approx(-0.1)  # below random: negative
    assert bq.gap_closed(20.0, 4.1, 15.6) == pytest.approx(15.9 / 11.5)  # above full: over 100%
    assert bq.gap_closed(5.0, 6.0, 6.0) is None and bq.gap_closed(5.0, 7.0, 6.0) is None  # no gap to close


def _sel_cell(method, budget, best, best_std, on_test):
    c = _cell(method, budget, best, best)
    c["best"]["r_mean"] = _stat(best, best_std)
    return {**c, "best_on_test": {"r_mean": _stat(on_test, best_std)}, "selection": "val"}


def _scenes_like():
    cells = {"random@50": _sel_cell("random", 50, 4.0, 0.5, 4.5),
             "single_phase@50": _sel_cell("single_phase", 50, 8.0, 1.0, 8.5),
             "ptm_st@50": _sel_cell("ptm_st", 50, 11.0, 1.0, 12.5),
             "ptm_st_exact@50": _sel_cell("ptm_st_exact", 50, 10.5, 0.8, 12.0),
             "no_ema@50": _sel_cell("no_ema", 50, 10.0, 0.6, 10.0),
             "random@20": _sel_cell("random", 20, 2.0, 0.3, 2.2),
             "ptm_st@20": _sel_cell("ptm_st", 20, 6.0, 0.5, 6.2)}
    full = _sel_cell("full", 0, 14.0, 0.4, 14.5)
    return cells, full


def test_gaps_per_cell_from_the_selected_and_the_best_on_test_means():
    cells, full = _scenes_like()
    rows = {(r["budget"], r["method"]): r for r in bq.gaps(cells, full)}
    assert set(rows) == {(50, "single_phase"), (50, "ptm_st"), (50, "ptm_st_exact"), (50, "no_ema"), (20, "ptm_st")}
    assert rows[(50, "ptm_st")]["best"] == pytest.approx((11 - 4) / (14 - 4))
    assert rows[(50, "ptm_st")]["best_on_test"] == pytest.approx((12.5 - 4.5) / (14.5 - 4.5))
    assert rows[(20, "ptm_st")]["best"] == pytest.approx(4 / 12)
    assert bq.gaps(cells, None) == []
    table = bq.gap_table(bq.gaps(cells, full), on_test=True)
    assert "| 50 | ptm_st | 70% | 80% |" in table and "| 20 | ptm_st | 33% | 33% |" in table  # 4 / 12.3 = 32.5%


def test_compare_margin_against_the_sum_of_the_stds():
    cells, _ = _scenes_like()
    cmp = bq.compare(cells["ptm_st@50"], cells["single_phase@50"])
    assert cmp["margin"] == pytest.approx(3.0) and cmp["std_sum"] == pytest.approx(2.0) and cmp["beats"]
    close = bq.compare(cells["ptm_st@50"], cells["no_ema@50"])  # 1.0 ahead, stds 1.0 + 0.6
    assert close["margin"] == pytest.approx(1.0) and close["std_sum"] == pytest.approx(1.6) and not close["beats"]
    assert bq.compare(cells["ptm_st@50"], None) is None
    assert bq.compare(cells["ptm_st@50"], {"method": "x", "status": "failed"}) is None


def test_targets_and_parts_per_budget():
    cells, full = _scenes_like()
    rows = {r["budget"]: r for r in bq.targets(cells, full, [20, 50])}
    r50 = rows[50]
    assert r50["gap"] == pytest.approx(0.7) and r50["gap_met"] is True
    assert r50["vs_single"]["beats"] is True
    assert r50["exact_vs_first_order"]["margin"] == pytest.approx(-0.5) and r50["exact_met"] is False
    r20 = rows[20]  # one phase: no single_phase cell, no exact cell
    assert r20["gap"] == pytest.approx(1 / 3) and r20["gap_met"] is False
    assert r20["vs_single"] is None and r20["exact_met"] is None
    table = bq.targets_table(list(rows.values()), one_phase_upto=20, headline=50)
    assert "| **50** | 70% | MET | +3.0 vs std sum 2.0 | MET | -0.5 vs std sum 1.8 | NOT MET (within the std sum) |" \
        in table
    assert "| 20 | 33% | NOT MET | one phase: ptm_st is the single-phase set | n/a | n/a | n/a |" in table
    steps = _sel_cell("fixed_step_sizes", 50, 9.0, 0.5, 9.0)
    prt = bq.parts({**cells, "fixed_step_sizes@50": steps}, [20, 50])
    assert [(p["budget"], p["part"], p["without"]) for p in prt] == [
        (50, "phases", "single_phase"), (50, "EMA", "no_ema"), (50, "learned step sizes", "fixed_step_sizes")]
    assert prt[1]["margin"] == pytest.approx(1.0) and not prt[1]["beats"]
    assert prt[2]["margin"] == pytest.approx(2.0) and prt[2]["std_sum"] == pytest.approx(1.5) and prt[2]["beats"]
    assert "| 50 | EMA | no_ema | +1.0 | 1.6 | no | n/a |" in bq.parts_table(prt)  # no per-seed runs in these cells


def _with_runs(cell: dict, scores: dict[int, float]) -> dict:
    return {**cell, "runs": [{"seed": s, "best": {"r_mean": v}} for s, v in scores.items()]}


def test_paired_comparison_takes_the_seeds_both_cells_scored():
    cells, full = _scenes_like()
    ptm = _with_runs(cells["ptm_st@50"], {0: 11.0, 1: 10.0, 2: 12.0, 3: 9.5})
    single = _with_runs(cells["single_phase@50"], {0: 10.0, 1: 10.5, 2: 11.0, 4: 8.0})  # seed 3 / 4 in one cell only
    pair = bq.paired(ptm, single)
    # seeds 0, 1, 2: differences +1.0, -0.5, +1.0 -> mean 0.5, population std sqrt(((0.5)^2 * 2 + 1^2) / 3)
    assert pair == {"seeds": 3, "ahead": 2, "mean": pytest.approx(0.5), "std": pytest.approx(math.sqrt(0.5))}
    assert bq.paired(ptm, cells["single_phase@50"]) is None  # the other cell has no runs
    cmp = bq.compare(ptm, single)
    assert cmp["paired"] == pair and cmp["margin"] == pytest.approx(3.0)  # the cells' means are the issue's test
    rows = {r["budget"]: r for r in bq.targets({**cells, "ptm_st@50": ptm, "single_phase@50": single}, full, [50])}
    table = bq.targets_table(list(rows.values()), one_phase_upto=0, headline=50)
    assert "| +3.0 vs std sum 2.0 (per seed: ahead in 2 of 3, +0.5 ± 0.7) | MET |" in table
    prt = bq.parts({"ptm_st@50": ptm, "single_phase@50": single}, [50])
    assert "| 50 | phases | single_phase | +3.0 | 2.0 | yes | 2 of 3 |" in bq.parts_table(prt)


def test_gap_against_its_target_never_rounds_a_miss_up():
    assert bq.GAP_TARGET == 0.60
    assert [bq._gap_pct(x) for x in (0.597, 0.5949, 0.6, 0.604, 0.7, 0.3333, None)] == \
        ["59.7%", "59%", "60%", "60%", "70%", "33%", "n/a"]


def test_metric_table_puts_best_on_test_beside_the_selected_figure():
    cells, full = _scenes_like()
    lines = bq.metric_table({"ptm_st@50": cells["ptm_st@50"]}, full, "best", on_test=True).splitlines()
    assert lines[0].startswith("| budget | method | pairs | r_mean | r_mean best on test | TR@1 |")
    assert lines[1].count("|") == lines[0].count("|")
    assert lines[2].startswith("| 50 | ptm_st | 50 | 11.0 ± 1.0 | 12.5 ± 1.0 | 10.0 |")
    assert lines[3].startswith("| all | full | 0 | 14.0 ± 0.4 | 14.5 ± 0.4 |")


def test_each_data_set_has_its_own_section_and_files():
    assert bq.section_and_stem("shapes") == ("## Quality matrix (issue #11)", "quality_matrix")
    assert bq.section_and_stem("scenes") == ("## Quality matrix on `scenes` (issue #25)", "quality_scenes")
    assert bq.section_and_stem("scenes-alt") == ("## Quality matrix on `scenes-alt`", "quality_scenes_alt")
    assert bq.SECTION == bq.section_and_stem("shapes")[0]
    # writing the scenes section leaves the toy's alone
    text = "# R\n\n## Quality matrix (issue #11)\n\ntoy\n\n## B\n\nb\n"
    out = bq.replace_section(text, bq.section_and_stem("scenes")[0], "scenes body\n")
    assert out == text + "\n## Quality matrix on `scenes` (issue #25)\n\nscenes body\n"


def test_data_name_of_the_configs():
    from ptmst_ray.config import load_config

    configs = Path(__file__).resolve().parents[1] / "configs"
    assert bq.data_name(load_config(configs / "toy.yaml", [])) == "shapes"
    assert bq.data_name(load_config(configs / "scenes.yaml", [])) == "scenes"
    assert bq.data_name(load_config(configs / "scenes.yaml", ["data.builtin.kind=scenes-alt"])) == "scenes-alt"
    assert bq.data_name(load_config(configs / "flickr30k_500.yaml", [])) == "flickr30k"


def test_one_phase_budgets_distil_the_first_phase_window_with_the_whole_budget():
    from ptmst_ray.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "scenes.yaml", [])
    p0, p1 = base.phases
    one = bq.budget_phases(base, 20, "ptm_st", one_phase_upto=20)
    assert len(one) == 1
    assert (one[0].pairs, one[0].range_start, one[0].range_end, one[0].start_min, one[0].start_max) == \
        (20, p0.range_start, p0.range_end, p0.start_min, p0.start_max)
    assert one[0].iterations == max(p0.iterations, p1.iterations) and one[0].minibatch == min(p0.minibatch, 20)
    # the same phase as single_phase's at that budget: one distillation, so make_cells runs no single_phase there
    assert one == bq.budget_phases(base, 20, "single_phase", one_phase_upto=20)
    two = bq.budget_phases(base, 50, "ptm_st", one_phase_upto=20)
    assert [p.pairs for p in two] == [20, 30] and (two[1].start_min, two[1].start_max) == (p1.start_min, p1.start_max)
    assert [p.pairs for p in bq.budget_phases(base, 20, "ptm_st")] == [8, 12]  # default: every budget in phases
    with pytest.raises(ValueError, match="minibatch needs 2"):
        bq.budget_phases(base, 1, "ptm_st", one_phase_upto=20)
    cells = bq.make_cells(base, ["random", "single_phase", "ptm_st", "fixed_similarity"], [20, 50], "/tmp/x", 20)
    assert [c.key for c in cells] == ["random@20", "ptm_st@20", "fixed_similarity@20", "random@50",
                                      "single_phase@50", "ptm_st@50", "fixed_similarity@50"]
    fixed = next(c for c in cells if c.key == "fixed_similarity@50")
    assert fixed.cfg.distill.lr_sim == 0 and fixed.distilled and [p.pairs for p in fixed.cfg.phases] == [20, 30]
    # the config derives lr_lr (rel_lr_lr); the ablation fixes it at 0 and drops the rule, which the config's own
    # check would otherwise refuse (a derived rate of a fixed parameter)
    assert base.distill.rel_lr_lr is not None and base.distill.lr_lr > 0
    steps = bq.make_cells(base, ["fixed_step_sizes"], [50], "/tmp/x", 20)[0]
    assert (steps.cfg.distill.lr_lr, steps.cfg.distill.rel_lr_lr) == (0, None) and steps.distilled
    assert steps.cfg.distill.rel_alpha == base.distill.rel_alpha and steps.cfg.distill.lr_sim == base.distill.lr_sim


def _scored(method: str, seed: int, value: float) -> dict:
    """One evaluation seed's run as the scoring returns it, every metric at ``value`` (best on test 0.5 higher, val
    1.0 lower)."""
    from ptmst_ray.evaluate.metrics import METRIC_NAMES

    metrics = {k: value for k in METRIC_NAMES}
    return {"method": method, "seed": seed, "pairs": 50, "best": metrics, "final": metrics,
            "best_val": {k: value - 1.0 for k in METRIC_NAMES},
            "best_on_test": {k: value + 0.5 for k in METRIC_NAMES}, "selection": "val", "best_epoch": 40,
            "epochs_run": 100, "diverged_at": None}


def test_draws_distil_each_cell_with_its_own_run_seed_and_pool_their_runs():
    import argparse
    import statistics

    from ptmst_ray.config import load_config

    base = load_config(Path(__file__).resolve().parents[1] / "configs" / "scenes.yaml", ["run.seed=7"])
    cells = bq.make_cells(base, ["random", "single_phase", "ptm_st"], [50], "/tmp/x", draws=2)
    assert [(c.key, c.entry, c.cfg.run.seed, c.cfg.run.root) for c in cells] == [
        ("random@50", "random@50", 7, "/tmp/x/b50/random"),
        ("single_phase@50", "single_phase@50", 7, "/tmp/x/b50/single_phase"),
        ("single_phase@50~draw1", "single_phase@50", 8, "/tmp/x/b50/single_phase-draw1"),
        ("ptm_st@50", "ptm_st@50", 7, "/tmp/x/b50/ptm_st"),
        ("ptm_st@50~draw1", "ptm_st@50", 8, "/tmp/x/b50/ptm_st-draw1")]
    # draw 0 is the cell a run without --draws makes (its distillation is reused), and a draw differs in run.seed alone
    assert [c.cfg for c in cells if c.draw == 0] == [c.cfg for c in bq.make_cells(base, ["random", "single_phase",
                                                                                         "ptm_st"], [50], "/tmp/x")]
    assert cells[4].cfg.replace(**{"run.seed": 7, "run.root": "/tmp/x/b50/ptm_st"}) == cells[3].cfg
    with pytest.raises(ValueError, match="--draws must be at least 1"):
        bq.make_cells(base, ["ptm_st"], [50], "/tmp/x", draws=0)

    scores = {"random@50": [4.0, 5.0], "single_phase@50": [10.0, 11.0], "single_phase@50~draw1": [9.5, 8.0],
              "ptm_st@50": [11.0, 12.0], "ptm_st@50~draw1": [9.0, 10.0]}
    runs = {c.key: [_scored(c.score_method, s, v) for s, v in enumerate(scores[c.key])] for c in cells}
    distill = {c.key: {"status": "done", "final_loss": {"phase0": 1.1 + c.draw, "phase1": 1.2}} for c in cells
               if c.distilled}
    args = argparse.Namespace(config="configs/scenes.yaml", overrides=[], quick=False, one_phase_upto=0, draws=2)
    res = bq.assemble(args, base, cells, distill, runs, {}, "cmd")
    assert sorted(res["cells"]) == ["ptm_st@50", "random@50", "single_phase@50"] and res["draws"] == 2
    ptm = res["cells"]["ptm_st@50"]
    pooled = [11.0, 12.0, 9.0, 10.0]
    assert ptm["seeds"] == 4 and ptm["best"]["r_mean"]["mean"] == pytest.approx(statistics.mean(pooled))
    assert ptm["best"]["r_mean"]["std"] == pytest.approx(statistics.pstdev(pooled))  # the draws' spread counts
    assert [(r["draw"], r["seed"]) for r in ptm["runs"]] == [(0, 0), (0, 1), (1, 0), (1, 1)]
    assert [(d["draw"], d["run_seed"], d["seeds"], d["best"], d["best_on_test"], d["val"]) for d in ptm["draws"]] == \
        [(0, 7, 2, 11.5, 12.0, 10.5), (1, 8, 2, 9.5, 10.0, 8.5)]
    assert ptm["val"]["r_mean"]["mean"] == pytest.approx(statistics.mean(pooled) - 1.0)
    assert "draws" not in res["cells"]["random@50"] and res["cells"]["random@50"]["seeds"] == 2
    # paired by (draw, seed): +1.0, +1.0, -0.5, +2.0
    pair = bq.compare(ptm, res["cells"]["single_phase@50"])["paired"]
    assert pair["seeds"] == 4 and pair["ahead"] == 3 and pair["mean"] == pytest.approx(0.875)
    full = _sel_cell("full", 0, 14.5, 0.4, 15.0)
    table = bq.draw_table(res["cells"], full)
    # draw 1 of ptm_st: (9.5 - 4.5) / (14.5 - 4.5) = 50% of the gap
    assert "| 50 | ptm_st | 1 | 8 | 2 | 9.50 | 10.00 | 8.50 | 50% | 2.10 / 1.20 |" in table
    assert "| 50 | single_phase | 0 | 7 | 2 | 10.50 | 11.00 | 9.50 | 60% | 1.10 / 1.20 |" in table
    assert "random" not in table
    assert bq.cell_notes(res["cells"]) == []
    res["cells"]["ptm_st@50"]["draws"][1]["status"] = "failed"
    assert bq.cell_notes(res["cells"])[-1] == "* ptm_st@50: draw 1 (run.seed 8) failed: left out of the pooled figures"


def test_quick_budgets_one_of_each_kind():
    assert bq.quick_budgets([100, 20, 50], one_phase_upto=20) == [20, 50]
    assert bq.quick_budgets([20, 50, 100]) == [20]
    assert bq.quick_budgets([10, 20], one_phase_upto=50) == [10]


def test_similarity_stats_and_the_matching_table():
    import torch

    stats = bq.similarity_stats(torch.tensor([[1.0, -0.1], [0.2, 0.9]], dtype=torch.float64))
    assert stats["sim_diag"] == pytest.approx(0.95) and stats["sim_offdiag"] == pytest.approx(0.05)
    assert stats["sim_max_dev"] == pytest.approx(0.2)
    cell = {"method": "ptm_st", "budget": 50, "phases": {"phase0": {"loss_first": 1.2, "loss_min": 0.9,
                                                                    "loss_last": 1.0, "loss_img_last": 0.55,
                                                                    "loss_txt_last": 0.45, "alpha_img": 0.0123,
                                                                    "alpha_txt": 0.001, **stats,
                                                                    "curve": [[10, 1.2], [20, 0.9], [30, 1.0]]}}}
    table = bq.matching_table({"ptm_st@50": cell, "random@50": {"method": "random", "budget": 50}})
    assert table.splitlines()[2:] == [
        "| 50 | ptm_st | phase0 | 1.200 | 0.900 | 1.000 | 0.550 | 0.450 | 0.0123 | 0.001 | 0.950 | +0.0500 | 0.200 | "
        "10:1.20 20:0.90 30:1.00 |"]


def test_curve_points_evenly_spaced_with_both_ends():
    curve = [[10 * (i + 1), float(i)] for i in range(15)]  # 150 iterations reported every 10
    assert bq.curve_points(curve, 6) == [curve[0], curve[3], curve[6], curve[8], curve[11], curve[14]]
    assert bq.curve_points(curve[:4], 6) == curve[:4]
    assert bq.curve_points([], 6) == []


def _res():
    cells, full = _scenes_like()
    for c in cells.values():
        c["final"]["r_mean"] = c["best"]["r_mean"]
    return {"command": "bench/bench_quality.py --config configs/scenes.yaml", "config": "configs/scenes.yaml",
            "overrides": [], "quick": False, "data": "scenes", "selection": "val", "one_phase_upto": 20,
            "headline": 50, "budgets": [20, 50], "splits": {"20": [20], "50": [20, 30]}, "notes": [],
            "machine": {"nproc": 2, "cpu": "x", "ram_gib": 23.5, "torch": "t", "python": "p", "date": "d",
                        "load_start": "1", "load_end": "2"},
            "eval": {"epochs": 30, "seeds": 5, "eval_points": 5, "full_data_epochs": 30, "full_data_patience": 5,
                     "full_data_max_epochs": 100, "loss": "InfoNCE"},
            "cells": cells, "full": {**full, "epochs_run": [21, 19]}, "ratios": bq.ratios(cells, full),
            "wall_seconds": 600.0, "prereq_seconds": 60.0, "distill_seconds": 300.0, "eval_seconds": 240.0}


def test_format_report_full_and_for_results():
    res = _res()
    body = bq.format_report(res)
    assert "20 = 20 (one phase), 50 = 20 + 30" in body and "selection of the reported point: val" in body
    assert "epochs run per seed [21, 19]" in body and "| **50** | 70% | MET |" in body
    assert "### Matching loss" in body and "### Time per cell" in body
    short = bq.format_report(res, details="bench/quality_scenes.md")
    assert "### Matching loss" not in short and "### Time per cell" not in short
    assert "| **50** | 70% | MET |" in short and "`bench/quality_scenes.md`" in short


def test_a_miss_beyond_the_std_sum_is_a_plain_not_met():
    assert bq._met_within(False, {"margin": -2.0, "std_sum": 1.5}) == "NOT MET"
    assert bq._met_within(False, {"margin": -1.5, "std_sum": 1.5}) == "NOT MET (within the std sum)"
    assert bq._met_within(True, {"margin": 0.1, "std_sum": 1.5}) == "MET"
    assert bq._met_within(None, None) == "n/a"


def test_full_data_scores_are_reused_only_for_the_same_data_model_and_evaluation(tmp_path):
    from conftest import TINY, tiny_config

    cfg = tiny_config(tmp_path / "root")
    cells = str(tmp_path / "root" / "cells")
    run = {"method": "full", "seed": 1, "best": {"r_mean": 12.5}, "seconds": 300.0}
    assert bq.load_full_score(cells, cfg, 1) is None
    bq.store_full_score(cells, cfg, 1, run)
    got = bq.load_full_score(cells, cfg, 1)
    assert {k: got[k] for k in run} == run and got["reused"]["path"].startswith(cells)
    assert bq.load_full_score(cells, cfg, 0) is None  # another seed
    # what the full-data baseline does not depend on: how many seeds, which baselines, the distillation and its draw
    same = cfg.replace(**{"eval.seeds": 5, "eval.baselines": ["random"], "eval.epochs": 9,
                          "eval.phase_training": "cumulative", "distill.rel_lr_img": 0.5,
                          "phases.0.pairs": 3, "experts.num_experts": 7, "run.seed": 4})
    assert bq.load_full_score(cells, same, 1) is not None
    # nor where the root lies: a copy of it (its own pretraining's checkpoint under another path) reuses the scores
    assert "${run.root}" in TINY["model"]["pretrained"] and cfg.pretrain.enabled
    assert bq.load_full_score(cells, tiny_config(tmp_path / "copy"), 1) is not None
    # what it does: the data, the towers and their pretraining, the evaluation schedule
    for key, value in [("data.builtin.train_images", 61), ("model.temperature", 0.05), ("pretrain.epochs", 3),
                       ("eval.full_data_max_epochs", 9), ("eval.lr", 0.5)]:
        assert bq.load_full_score(cells, cfg.replace(**{key: value}), 1) is None, key
    # without pretraining the checkpoint named is what the towers are: another path is another model
    ckpt = {"pretrain.enabled": False, "model.pretrained": str(tmp_path / "a.safetensors")}
    bq.store_full_score(cells, cfg.replace(**ckpt), 1, run)
    assert bq.load_full_score(cells, cfg.replace(**ckpt), 1) is not None
    other = cfg.replace(**{**ckpt, "model.pretrained": str(tmp_path / "b.safetensors")})
    assert bq.load_full_score(cells, other, 1) is None


def test_a_report_written_before_the_val_split_renders_again(tmp_path):
    """bench/quality_matrix.json (the toy's, 2026-11-24) predates the data name, the section and best-on-test:
    `--from-json` renders it with the figures it has (the toy's section, gaps from its "best" means)."""
    src = Path(__file__).resolve().parents[1] / "bench" / "quality_matrix.json"
    old = json.loads(src.read_text())
    assert "section" not in old and "best_on_test" not in old["cells"]["ptm_st@50"]
    res = bq.main(["--from-json", str(src), "--out", str(tmp_path / "m.md")])
    assert res["section"] == bq.SECTION
    mean = lambda cell: cell["best"]["r_mean"]["mean"]  # noqa: E731
    gap = (mean(old["cells"]["ptm_st@50"]) - mean(old["cells"]["random@50"])) / \
        (mean(old["full"]) - mean(old["cells"]["random@50"]))
    assert f"| 50 | ptm_st | {gap:.0%} |" in (tmp_path / "m.md").read_text()
