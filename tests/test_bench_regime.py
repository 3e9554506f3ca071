"""bench/bench_regime.py --expert-lrs and --windows end to end on --quick sizes (one process, no Ray, ~10 s each):
one expert per candidate lr, stored apart from the run's experts, and the rule's pick from their displacement
cosines; the windows' rule over the run's stored experts."""

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from ptmst_ray.layout import experts_hash
from ptmst_ray.trajectories.expert import ALIGNED_COSINE, ALIGNED_EPOCHS, displacement_cosines
from ptmst_ray.trajectories.store import TrajectoryStore

_PATH = Path(__file__).resolve().parents[1] / "bench" / "bench_regime.py"
_SPEC = importlib.util.spec_from_file_location("bench_regime", _PATH)
br = importlib.util.module_from_spec(_SPEC)
sys.modules["bench_regime"] = br
_SPEC.loader.exec_module(br)


def test_expert_lr_rule_end_to_end(tmp_path, capsys):
    root = tmp_path / "root"
    res = br.main(["--root", str(root), "--quick", "--threads", "1", "--expert-lrs", "0.3", "0.01"])
    rule = res["expert_lr"]
    assert sorted(rule["candidates"]) == [0.01, 0.3]
    cfg = br.load(br.parse_args(["--root", str(root), "--quick"]))
    passing = []
    for lr, got in rule["candidates"].items():
        trial = cfg.replace(**{"experts.lr_img": lr, "experts.lr_txt": lr})
        store = TrajectoryStore(str(root / "eval" / "expert_lr" / f"lr{lr:g}"))
        snaps = store.load_expert(0, experts_hash(trial))  # trained at that lr: the hash says so
        assert len(snaps) == ALIGNED_EPOCHS + 1
        assert got["consecutive_cosine"] == pytest.approx(displacement_cosines(snaps))
        if all(c >= ALIGNED_COSINE for c in got["consecutive_cosine"][:ALIGNED_EPOCHS - 1]):
            passing.append(lr)
    assert rule["pick"] == (max(passing) if passing else None)
    assert not (root / "experts").exists() or not any((root / "experts").iterdir())  # the run's experts untouched
    saved = json.loads((root / "eval" / "expert_lr.json").read_text())
    assert saved["expert_lr"]["pick"] == rule["pick"]
    out = capsys.readouterr().out
    assert ("pick: lr" in out) if rule["pick"] else ("no candidate passes" in out)


def test_expert_lr_rule_needs_four_epochs(tmp_path, monkeypatch):
    monkeypatch.setattr(br, "QUICK_EXPERT_EPOCHS", 3)  # --quick's experts then have 3 epochs, the windows clipped
    with pytest.raises(SystemExit, match="experts.epochs=3: the rule looks at the first 4"):
        br.main(["--root", str(tmp_path), "--quick", "--expert-lrs", "0.1"])
    assert not any(tmp_path.iterdir())  # refused before any stage wrote anything


def test_windows_rule_over_the_roots_stored_experts(tmp_path, capsys):
    """--windows N reads the run's experts 0..N-1 (here the one --quick trains) and gives each phase the range end
    whose chord is best aligned with its target epochs; a missing expert is named with what to do."""
    from ptmst_ray.stages.experts import expert_store
    from ptmst_ray.trajectories.expert import chord_alignment

    root = tmp_path / "root"
    args = br.parse_args(["--root", str(root), "--quick", "--threads", "1"])
    cfg = br.prerequisites(br.load(args), 0, {})  # data, towers and the run's expert 0 (4 epochs)
    res = br.main(["--root", str(root), "--quick", "--threads", "1", "--windows", "1"])
    out = capsys.readouterr().out
    snaps = expert_store(cfg).load_expert(0, experts_hash(cfg))
    assert len(res["windows"]) == len(cfg.phases)
    for w, ph in zip(res["windows"], cfg.phases):
        targets = list(range(ph.start_min, ph.start_max + cfg.distill.expert_epochs))
        assert w["target_epochs"] == targets
        want = chord_alignment(snaps, ph.range_start, targets, range(max(targets) + 1, cfg.experts.epochs + 1))
        assert w["scores"] == pytest.approx(want)
        assert w["pick"] == max(want, key=lambda b: (want[b], -b))
        assert f"target epochs {targets}): " in out and f"-> range [{ph.range_start}, {w['pick']}]" in out
        still_rising = f"phase {w['phase']}: the score still rises at the experts' last epoch"
        assert (still_rising in out) == (w["pick"] == cfg.experts.epochs)
    assert json.loads((root / "eval" / "windows.json").read_text())["windows"][0]["pick"] == res["windows"][0]["pick"]
    with pytest.raises(SystemExit, match=r"expert 1 of this config is not stored under .*pass a smaller --windows"):
        br.main(["--root", str(root), "--quick", "--threads", "1", "--windows", "2"])
