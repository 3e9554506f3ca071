"""bench/bench_regime.py --expert-lrs end to end on --quick sizes (one process, no Ray, ~10 s): one expert per
candidate lr, stored apart from the run's experts, and the rule's pick from their displacement cosines."""

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
