"""The evaluation protocol with a val split (issue 25, item 2): the best evaluation point chosen on val and
reported with its test recall beside the paper's best-on-test; the full-data baseline trained until val recall
stops improving; the val split prepared, embedded and cached end to end; no val split = the protocol as before.
No Ray: the stages run in-process."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from conftest import tiny_config
from ptmst_ray import storage
from ptmst_ray.config import ConfigError, EvalConfig, ModelConfig
from ptmst_ray.data import builtin
from ptmst_ray.data.annotations import EvalRow, iter_split
from ptmst_ray.data.dataset import split_manifest
from ptmst_ray.evaluate.metrics import METRIC_NAMES
from ptmst_ray.evaluate.protocol import Subset, evaluate_one_seed, select_points
from ptmst_ray.evaluate.student import (
    EarlyStop, first_best, points_without_improvement, train_student,
)
from ptmst_ray.layout import Layout, data_hash, experts_hash
from ptmst_ray.models.student import build_student
from ptmst_ray.stages import data as data_stage
from ptmst_ray.stages import embed as embed_stage
from ptmst_ray.stages import features
from ptmst_ray.stages import pretrain as pretrain_stage
from ptmst_ray.stages.score import PROTOCOL_TEST, schedule, score_one_seed, summarise

import test_evaluate

TEXT_DIM = test_evaluate.TEXT_DIM  # the class problem's text width
_threads = test_evaluate._threads  # its autouse fixture: 2 torch threads per test


def make_problem(n_cls: int = 8, per_cls: int = 4, test_per_cls: int = 2, caps: int = 2, seed: int = 0):
    """tests/test_evaluate.py's class problem with its "crossed" split, whose captions describe the NEXT
    class's images: a student's best point there comes early while the test split's comes late."""
    from test_evaluate import make_problem as class_problem

    train_images, train_text, _, test, crossed = class_problem(n_cls, per_cls, test_per_cls, caps, seed, crossed=True)
    return train_images, train_text, test, crossed


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def student(seed: int = 1):
    return build_student(ModelConfig(), text_dim=TEXT_DIM, seed=seed)


# ---------------------------------------------------------------- choosing the best point


def point(epoch: int, test: float, val: float | None) -> dict:
    """One evaluation point of a history: every test metric = ``test``, every val metric = ``val``."""
    p = {"epoch": epoch, "loss": 1.0 / epoch, **{m: test + 0.01 * k for k, m in enumerate(METRIC_NAMES[:-1])},
         "r_mean": test}
    if val is not None:
        p.update({f"val/{m}": val for m in METRIC_NAMES[:-1]} | {"val/r_mean": val})
    return p


def test_select_points_by_val_and_by_test():
    """A constructed history whose best val point (epoch 4) is not its best test point (epoch 8): "best" is the
    test recall at the best VAL point, "best_on_test" the best test point; ties keep the first point."""
    test_curve = [10.0, 20.0, 25.0, 30.0, 28.0, 31.0, 31.0, 40.0, 35.0, 33.0]
    val_curve = [12.0, 22.0, 27.0, 45.0, 30.0, 45.0, 29.0, 31.0, 30.0, 30.0]
    points = [point(e, t, v) for e, (t, v) in enumerate(zip(test_curve, val_curve), start=1)]
    by_val, by_test = int(np.argmax(val_curve)), int(np.argmax(test_curve))  # numpy: the first maximum
    assert by_val != by_test
    out = select_points(points, use_val=True)
    assert out["selection"] == "val"
    assert out["best_epoch"] == by_val + 1 == 4 and out["best"]["r_mean"] == test_curve[by_val]
    assert out["best_on_test_epoch"] == by_test + 1 == 8 and out["best_on_test"]["r_mean"] == test_curve[by_test]
    assert out["best_val"]["r_mean"] == val_curve[by_val]
    assert out["final"]["r_mean"] == test_curve[-1]
    assert set(out["best"]) == set(out["best_on_test"]) == set(out["final"]) == set(METRIC_NAMES)  # test only
    assert out["best"]["IR@5"] == pytest.approx(test_curve[by_val] + 0.01)  # the test metrics of that point
    plain = select_points([point(e, t, None) for e, t in enumerate(test_curve, start=1)], use_val=False)
    assert plain["selection"] == "test" and plain["best_val"] is None
    assert plain["best_epoch"] == plain["best_on_test_epoch"] == by_test + 1
    assert first_best([]) == -1 and first_best([3.0, 5.0, 5.0, 1.0]) == 1
    with pytest.raises(ValueError, match="no evaluation points"):
        select_points([], use_val=True)


def test_evaluate_one_seed_chooses_on_val(problem):
    """A student trained for real, scored on a val split that disagrees with test (the crossed captions): the
    chosen point is the history's first best VAL r_mean, reported with its TEST recall; best_on_test is the
    history's first best test r_mean, as computed here from the returned history."""
    x, t, test, crossed = problem
    cfg = EvalConfig(epochs=6, batch_size=16, eval_points=6, lr=0.05)
    out = evaluate_one_seed([Subset(x, t)], student(), test, cfg, seed=0, val_set=crossed)
    points = out["history"][-1]["points"]
    assert [p["epoch"] for p in points] == [1, 2, 3, 4, 5, 6]
    val_curve = [p["val/r_mean"] for p in points]
    test_curve = [p["r_mean"] for p in points]
    by_val, by_test = int(np.argmax(val_curve)), int(np.argmax(test_curve))
    assert by_val < by_test  # the constructed disagreement: the crossed split peaks before the true one
    assert out["selection"] == "val"
    assert out["best_epoch"] == points[by_val]["epoch"]
    assert out["best"] == {m: points[by_val][m] for m in METRIC_NAMES}
    assert out["best_val"] == {m: points[by_val][f"val/{m}"] for m in METRIC_NAMES}
    assert out["best_on_test_epoch"] == points[by_test]["epoch"]
    assert out["best_on_test"] == {m: points[by_test][m] for m in METRIC_NAMES}
    assert out["best_on_test"]["r_mean"] > out["best"]["r_mean"]  # the optimistic figure is the higher one
    assert out["final"] == {m: points[-1][m] for m in METRIC_NAMES}
    # the val split only scores: the test figures are those of the same student trained without it
    plain = evaluate_one_seed([Subset(x, t)], student(), test, cfg, seed=0)
    assert [{m: p[m] for m in METRIC_NAMES} for p in plain["history"][-1]["points"]] == \
        [{m: p[m] for m in METRIC_NAMES} for p in points]


def test_no_val_is_the_plain_protocol(problem):
    """Without a val split the result is what the student loop itself reports (the protocol before val existed):
    the same final, best and best epoch, best_on_test the same point, selection "test"."""
    x, t, test, _ = problem
    cfg = EvalConfig(epochs=4, batch_size=16, eval_points=4, lr=0.05)
    soft = torch.eye(len(x))
    subsets = [Subset(x[:16], t[:16], soft[:16, :16], lr_img=0.05, lr_txt=0.05), Subset(x[16:], t[16:])]
    out = evaluate_one_seed(subsets, student(3), test, cfg, seed=7)
    ref_student = student(3)
    train_student(ref_student, x[:16], t[:16], soft[:16, :16], epochs=4, batch_size=16, lr_img=0.05, lr_txt=0.05,
                  loss="WBCE", seed=7000)
    from ptmst_ray.evaluate.student import evaluate_student

    ref = train_student(ref_student, x[16:], t[16:], None, epochs=4, batch_size=16, lr_img=0.05, lr_txt=0.05,
                        loss="WBCE", seed=7001, eval_fn=lambda st: evaluate_student(st, test, 16), eval_points=4)
    assert out["final"] == ref.final and out["best"] == ref.best and out["best_epoch"] == ref.best_epoch
    assert out["best_on_test"] == ref.best and out["best_on_test_epoch"] == ref.best_epoch
    assert out["selection"] == "test" and out["best_val"] is None and out["diverged_at"] is None
    assert out["epochs_run"] == 4


# ---------------------------------------------------------------- the full-data baseline's stopping rule


def scripted(values: list[float]):
    """An eval_fn returning the scripted ``val/r_mean`` values in turn (test r_mean 0), whatever the student."""
    it = iter(values)

    def eval_fn(_student) -> dict:
        return {"r_mean": 0.0, "val/r_mean": next(it)}

    return eval_fn


def run_scripted(problem, values: list[float], epochs: int, patience: int):
    x, t, _, _ = problem
    reports: list[dict] = []
    res = train_student(student(), x[:16], t[:16], None, epochs=epochs, batch_size=8, lr_img=0.2, lr_txt=0.2,
                        seed=0, eval_fn=scripted(values), eval_at=range(1, epochs + 1),
                        early_stop=EarlyStop(patience, "val/r_mean"), progress=reports.append)
    return res, [r["lr_txt"] for r in reports]


def test_points_without_improvement():
    assert points_without_improvement([1.0]) == 0
    assert points_without_improvement([1.0, 2.0, 2.0, 1.5]) == 2  # an equal value is no improvement
    assert points_without_improvement([1.0, 2.0, 2.0, 1.5], since=2) == 1  # counted afresh after the lr drop
    assert points_without_improvement([1.0, 2.0, 3.0]) == 0


def test_patience_drops_the_lr_then_stops(problem):
    """patience 2, val evaluated every epoch: best 3.0 at epoch 3; epochs 4 (3.0, equal) and 5 bring nothing:
    the lr drops x0.1 from epoch 6; 6 sets a new best (4.0); 7 and 8 bring nothing: training stops after 8."""
    values = [1.0, 2.0, 3.0, 3.0, 2.5, 4.0, 4.0, 3.9, 9.0, 9.0, 9.0, 9.0]
    res, lrs = run_scripted(problem, values, epochs=12, patience=2)
    assert res.decayed_at == 6 and res.stopped_at == 8 and res.epochs_run == 8
    assert [h["epoch"] for h in res.history] == list(range(1, 9))
    assert lrs == pytest.approx([0.2] * 5 + [0.02] * 3)


def test_scheduled_drop_restarts_the_count(problem):
    """The schedule's own drop (epoch 10 // 2 + 1 = 6) comes before any plateau (patience 3): the points
    before it do not count towards stopping. Best 3.0 at epoch 3; 4, 5 bring nothing (2 points); the lr drops
    at 6, so 6, 7, 8 are the 3 points without improvement: stop after 8 (not at 6)."""
    res, lrs = run_scripted(problem, [1.0, 2.0, 3.0] + [3.0] * 7, epochs=10, patience=3)
    assert res.decayed_at == 6 and res.stopped_at == 8 and res.epochs_run == 8
    assert lrs == pytest.approx([0.2] * 5 + [0.02] * 3)


def test_improving_run_trains_every_epoch(problem):
    res, lrs = run_scripted(problem, [float(v) for v in range(10)], epochs=10, patience=2)
    assert res.stopped_at is None and res.epochs_run == 10 and res.decayed_at == 6
    assert len(res.history) == 10 and lrs == pytest.approx([0.2] * 5 + [0.02] * 5)


def test_early_stop_needs_val_and_checks_its_inputs(problem):
    x, t, test, _ = problem
    cfg = EvalConfig(epochs=2, batch_size=16, eval_points=2)
    with pytest.raises(ValueError, match="needs a val split"):
        evaluate_one_seed([Subset(x, t)], student(), test, cfg, early_stop=2)
    with pytest.raises(ValueError, match="patience"):
        EarlyStop(0)
    with pytest.raises(ValueError, match="eval_at"):
        train_student(student(), x[:8], t[:8], epochs=2, eval_fn=lambda s: {"r_mean": 0.0}, eval_at=[3])
    with pytest.raises(ValueError, match="needs eval_fn"):
        train_student(student(), x[:8], t[:8], epochs=2, early_stop=EarlyStop(1))


def test_full_data_schedule():
    """The full-data baseline stops by val only with a val split and full_data_patience > 0; evaluated every
    full_data_val_every epochs and at the last; other methods keep their fixed schedule."""
    cfg = EvalConfig(epochs=7, full_data_epochs=3, full_data_patience=4, full_data_max_epochs=10, full_data_val_every=3)
    assert schedule(cfg, "full", has_val=False) == {"epochs": 3, "eval_at": None, "patience": None}
    assert schedule(cfg, "full", has_val=True) == {"epochs": 10, "eval_at": [3, 6, 9, 10], "patience": 4}
    assert schedule(cfg, "random", has_val=True) == {"epochs": 7, "eval_at": None, "patience": None}
    fixed = EvalConfig(full_data_epochs=3, full_data_patience=0)
    assert schedule(fixed, "full", has_val=True) == {"epochs": 3, "eval_at": None, "patience": None}
    for bad in ({"full_data_patience": -1}, {"full_data_max_epochs": 0}, {"full_data_val_every": 0},
                {"full_data_max_epochs": 5, "full_data_val_every": 6}):
        with pytest.raises(ConfigError):
            EvalConfig(**bad)


def test_full_baseline_stops_by_val_and_keeps_its_best_val_point(problem):
    """The protocol's early stop on a real student: it stops once val r_mean has not improved for patience
    points twice (the lr drop, then the stop), and its reported point is the best-val one."""
    x, t, test, crossed = problem
    cfg = EvalConfig(batch_size=16, eval_points=2, lr=0.05)
    out = evaluate_one_seed([Subset(x, t)], student(), test, cfg, seed=0, val_set=crossed, epochs=40,
                            eval_at=range(1, 41), early_stop=2)
    points = out["history"][-1]["points"]
    val_curve = [p["val/r_mean"] for p in points]
    assert out["epochs_run"] == len(points) < 40  # the crossed split stops improving early
    assert points_without_improvement(val_curve) >= 2
    assert out["best_epoch"] == points[int(np.argmax(val_curve))]["epoch"]


# ---------------------------------------------------------------- the val split end to end (built-in data)

VAL = {"data.builtin.val_images": 12, "eval.full_data_max_epochs": 6, "eval.full_data_patience": 1}


@pytest.fixture(scope="module")
def val_root(tmp_path_factory):
    """The tiny config with a built-in val split: data, pretrained towers and caption embeddings, in-process."""
    root = tmp_path_factory.mktemp("val")
    cfg = tiny_config(root, **VAL)
    data_stage.prepare(cfg)
    pretrain_stage.pretrain(cfg)
    embed_stage.embed(cfg)
    return root


def test_val_images_zero_keeps_every_hash():
    """val_images at its default leaves the built-in data, and so every artefact's identity, as before."""
    cfg = tiny_config("/tmp/unused")
    with_val = tiny_config("/tmp/unused", **{"data.builtin.val_images": 3})
    assert "val_images" not in cfg.data.builtin.identity() and "val_images" not in cfg.data.output_settings()["builtin"]
    assert builtin.config_hash(cfg.data.builtin, 32) != builtin.config_hash(with_val.data.builtin, 32)
    assert data_hash(cfg) != data_hash(with_val) and experts_hash(cfg) != experts_hash(with_val)
    with pytest.raises(ConfigError, match="val_images"):
        tiny_config("/tmp/unused", **{"data.builtin.val_images": -1})


def test_builtin_val_split_generated(tmp_path):
    """builtin_val.json: val_images rows of 5 captions (the test shape), scenes disjoint from every other split;
    train and test are byte for byte those generated without val."""
    cfg = tiny_config(tmp_path).data.builtin
    with_val = tiny_config(tmp_path, **{"data.builtin.val_images": 10}).data.builtin
    plan = builtin.plan_scenes(with_val)
    assert len(plan["val"]) == 10
    others = set(plan["train"]) | set(plan["test"]) | set(plan["pretrain"])
    assert not set(plan["val"]) & others
    assert "val" not in builtin.plan_scenes(cfg)
    builtin.generate_builtin(str(tmp_path / "a"), cfg)
    builtin.generate_builtin(str(tmp_path / "b"), with_val)
    rows = list(iter_split(str(tmp_path / "b"), "builtin", "val"))
    assert len(rows) == 10 and all(isinstance(r, EvalRow) and len(r.captions) == 5 for r in rows)
    for name in ("builtin_train.json", "builtin_test.json"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes()
    assert not (tmp_path / "a" / "builtin_val.json").exists()


def test_val_prepared_embedded_and_loaded(val_root):
    cfg = tiny_config(val_root, **VAL)
    layout = Layout.of(cfg)
    assert data_stage.has_val(layout.data) and data_stage.eval_splits(layout.data) == ("test", "val")
    m = split_manifest(layout.data, "val")
    assert m["split_kind"] == "eval" and m["images"] == 12 and m["captions"] == 60
    embedded = storage.read_manifest(layout.embedded(storage.read_text(layout.embedded_current).strip()))
    assert set(embedded["files"]) == {"train.safetensors", "test.safetensors", "val.safetensors"}
    real = embed_stage.load_real(cfg, whole_train=False)
    assert real.val is not None and real.val.images.shape[0] == 12 and real.val.text_emb.shape == (60, real.text_dim)
    assert real.val.txt2img.tolist() == [i for i in range(12) for _ in range(5)]
    assert features.splits(cfg) == ("train", "test", "val")


def test_flickr_val_split_embedded(tiny_flickr_dir, tmp_path):
    """A Karpathy-format benchmark's val file (flickr30k_val.json: the fixture's 12 images) is prepared, embedded
    and loaded for scoring: its captions in file order, each pointing at its image."""
    cfg = tiny_config(tmp_path / "root", **{"data.dataset": "flickr30k", "data.annotations": str(tiny_flickr_dir),
                                            "pretrain.enabled": False, "model.pretrained": None})
    assert set(data_stage.prepare(cfg)["splits"]) == {"train", "test", "val"}
    embed_stage.embed(cfg)
    real = embed_stage.load_real(cfg, whole_train=False)
    raw = json.loads((tiny_flickr_dir / "flickr30k_val.json").read_text())
    assert real.val.images.shape[0] == len(raw) == 12
    assert real.val.txt2img.tolist() == [i for i, r in enumerate(raw) for _ in r["caption"]]
    assert real.val.text_emb.shape == (sum(len(r["caption"]) for r in raw), real.text_dim)


def test_embeddings_made_before_val_are_kept(val_root):
    """A root embedded before its data had val (simulated: val's file left out of the manifest) keeps its train
    and test embeddings: the embed stage adds val's alone, under the same key."""
    cfg = tiny_config(val_root, **VAL)
    layout = Layout.of(cfg)
    key = storage.read_text(layout.embedded_current).strip()
    out = layout.embedded(key)
    full = storage.read_manifest(out)
    old = {k: v for k, v in full["files"].items() if k != "val.safetensors"}
    storage.remove(storage.join(out, "val.safetensors"))
    storage.write_manifest(out, {**full, "files": old})
    stamps = {n: os.stat(storage.join(out, n)).st_mtime_ns for n in old}
    assert embed_stage.embed(cfg) == key
    after = storage.read_manifest(out)
    assert after["files"] == full["files"]  # val's embeddings are the same bytes as before
    assert {n: os.stat(storage.join(out, n)).st_mtime_ns for n in old} == stamps  # not rewritten


def test_random_and_full_scores_do_not_depend_on_the_distillation_draw(val_root):
    """What lets their score keys leave run.seed out: the random coreset's and the full-data student's scores
    are the same under another run.seed (the RNG state between the calls differs, so nothing global seeds them)."""
    cfg = tiny_config(val_root, **VAL)
    other = cfg.replace(**{"run.seed": 3})
    first = {}
    for method in ("random", "full"):
        a, b = score_one_seed(cfg, method, 1), score_one_seed(other, method, 1)
        first[method] = a
        assert (a["best"], a["best_val"], a["epochs_run"]) == (b["best"], b["best_val"], b["epochs_run"]), method
    assert score_one_seed(cfg, "random", 0)["best"] != first["random"]["best"]  # the seed does matter


def test_score_with_val_and_results_json(val_root):
    """score_one_seed with a val split: every method chooses on val and reports best_on_test beside; the full
    baseline stops by val within full_data_max_epochs; results.json (summarise) carries both figures and the
    CLI table shows them."""
    cfg = tiny_config(val_root, **VAL)
    runs = [score_one_seed(cfg, m, s) for m in ("random", "full") for s in range(2)]
    for r in runs:
        assert r["selection"] == "val" and set(r["best_val"]) == set(METRIC_NAMES)
        assert r["best_on_test"]["r_mean"] >= r["best"]["r_mean"]
    full = [r for r in runs if r["method"] == "full"]
    assert all(1 <= r["epochs_run"] <= 6 for r in full)
    res = json.loads(json.dumps(summarise(runs, cfg)))  # as written to results.json
    assert res["selection"] == "val" and "on val" in res["protocol"]
    for method, mine in (("random", runs[:2]), ("full", full)):
        m = res["methods"][method]
        assert m["r_mean"]["mean"] == pytest.approx(np.mean([r["best"]["r_mean"] for r in mine]))
        assert m["best_on_test"]["r_mean"]["mean"] == pytest.approx(np.mean([r["best_on_test"]["r_mean"] for r in mine]))
        assert m["val"]["r_mean"]["mean"] == pytest.approx(np.mean([r["best_val"]["r_mean"] for r in mine]))
        assert m["epochs_run"] == [r["epochs_run"] for r in mine]
    assert res["methods"]["full"]["epochs"] == 6 and res["methods"]["full"]["patience"] == 1
    from rich.console import Console

    from ptmst_ray_cli.commands import results_table

    console = Console(record=True, width=300)
    console.print(results_table(res))
    text = console.export_text()
    assert "r_mean best on test" in text and "val r_mean" in text


def test_score_without_val_as_before(val_root):
    """Without a val split (the data of a root that has none) scoring keeps the paper's protocol: selection
    test, the fixed full_data_epochs schedule, the old protocol string, best_on_test equal to best."""
    cfg = tiny_config(str(val_root) + "-noval")
    data_stage.prepare(cfg)
    pretrain_stage.pretrain(cfg)
    embed_stage.embed(cfg)
    assert features.splits(cfg) == features.SPLITS and embed_stage.load_real(cfg).val is None
    runs = [score_one_seed(cfg, "full", 0)]
    assert runs[0]["selection"] == "test" and runs[0]["best_val"] is None
    assert runs[0]["epochs_run"] == cfg.eval.full_data_epochs
    assert runs[0]["best_on_test"] == runs[0]["best"]
    res = summarise(runs, cfg)
    assert res["selection"] == "test" and res["protocol"] == PROTOCOL_TEST and "ratios_best_on_test" not in res
    assert "val" not in res["methods"]["full"]


def test_frozen_tower_features_cover_val(val_root):
    """A frozen image tower's feature cache includes the val split, and scoring on the cache equals scoring
    without it (val chooses the same point, the same figures)."""
    frozen = {**VAL, "model.image_trainable": False, "model.image_proj_dim": 16}
    cfg = tiny_config(val_root, **frozen)
    assert features.compute(cfg)["key"] is not None
    cached = features.find(cfg)
    assert set(cached.manifest["splits"]) == {"train", "test", "val"} and cached.split("val").shape[0] == 12
    with_cache = score_one_seed(cfg, "random", 0)
    without = score_one_seed(tiny_config(val_root, **frozen, **{"model.cache_frozen_features": False}), "random", 0)
    assert with_cache["best_epoch"] == without["best_epoch"]
    for key in ("best", "best_on_test", "best_val"):
        assert with_cache[key] == pytest.approx(without[key], abs=1e-6)


# ---------------------------------------------------------------- stored scores: what a rerun reuses


def test_score_key_follows_each_scores_inputs(tmp_path):
    """A stored (method, seed) score is reused only while what it was computed from holds: its seed, the
    evaluation settings its student uses, the data, the towers, and the method's own input (the distilled set's
    content, the single-phase subset's, the random coreset's budget); not how many seeds or which baselines run."""
    from ptmst_ray.stages.score import score_key

    cfg = tiny_config(tmp_path)
    layout = Layout.of(cfg)
    assert score_key(cfg, "ptm_st", 0) is None and score_key(cfg, "single_phase", 0) is None  # nothing distilled
    storage.write_manifest(layout.distilled, {"config_hash": "x", "files": {"distilled.safetensors": "aa"}})
    storage.write_manifest(layout.subset("single_phase"), {"config_hash": "y", "files": {"subset.safetensors": "bb"}})
    methods = ("ptm_st", "random", "single_phase", "full")
    keys = {m: score_key(cfg, m, 0) for m in methods}
    assert None not in keys.values() and len(set(keys.values())) == 4
    assert score_key(cfg, "random", 1) != keys["random"]

    assert {m: score_key(cfg.replace(**{"eval.seeds": 7, "eval.baselines": ["random"]}), m, 0) for m in methods} == keys
    longer = cfg.replace(**{"eval.epochs": cfg.eval.epochs + 1})  # the subsets' students; full has its own schedule
    assert [score_key(longer, m, 0) == keys[m] for m in methods] == [False, False, False, True]
    assert [score_key(cfg.replace(**{"eval.full_data_epochs": 3}), m, 0) == keys[m] for m in methods] == \
        [True, True, True, False]
    assert all(score_key(cfg.replace(**{"eval.lr": 0.05}), m, 0) != keys[m] for m in methods)
    # the students' loss, however it is written: inherited from distill.loss (None) or named; a distillation loss
    # of its own changes only what distils (the subsets' content), not the baselines' students
    named = cfg.replace(**{"eval.loss": cfg.distill.loss})
    assert cfg.eval.loss is None and {m: score_key(named, m, 0) for m in methods} == keys
    other = "WBCE" if cfg.eval_loss != "WBCE" else "InfoNCE"
    assert all(score_key(cfg.replace(**{"eval.loss": other}), m, 0) != keys[m] for m in methods)
    assert all(score_key(cfg.replace(**{"distill.loss": other}), m, 0) != keys[m] for m in methods)  # follows it
    apart = cfg.replace(**{"distill.loss": other, "eval.loss": cfg.eval_loss})
    assert {m: score_key(apart, m, 0) for m in methods} == keys
    # another distillation draw: the subsets' keys change (and their content would), random's and full's do not
    assert [score_key(cfg.replace(**{"run.seed": 3}), m, 0) == keys[m] for m in methods] == [False, True, False, True]

    storage.write_manifest(layout.distilled, {"config_hash": "x", "files": {"distilled.safetensors": "cc"}})
    assert score_key(cfg, "ptm_st", 0) != keys["ptm_st"] and score_key(cfg, "single_phase", 0) == keys["single_phase"]
    smaller = cfg.replace(**{"phases.0.pairs": 5})  # the coreset's budget; the full data does not change
    assert (score_key(smaller, "random", 0) != keys["random"], score_key(smaller, "full", 0) == keys["full"]) == \
        (True, True)
    assert score_key(cfg.replace(**{"data.builtin.train_images": 61}), "full", 0) != keys["full"]
    assert score_key(cfg.replace(**{"pretrain.epochs": 2}), "random", 0) != keys["random"]  # other towers


def test_stored_score_is_reused_only_under_its_key(tmp_path, caplog):
    from ptmst_ray.stages.score import score_key, store_score, stored_score

    cfg = tiny_config(tmp_path)
    run = {"method": "random", "seed": 0, "pairs": 14, "best": {"r_mean": 12.5}}
    assert stored_score(cfg, "random", 0) is None
    store_score(cfg, "random", 0, run, score_key(cfg, "random", 0))
    assert stored_score(cfg, "random", 0) == {**run, "reused": True}
    assert stored_score(cfg, "random", 1) is None
    assert stored_score(cfg.replace(**{"eval.epochs": 3}), "random", 0) is None  # computed with other settings
    store_score(cfg, "ptm_st", 0, run, score_key(cfg, "ptm_st", 0))  # no distilled set: no key, nothing kept
    assert not storage.exists(Layout.of(cfg).score("ptm_st", 0))
    url = Layout.of(cfg).score("random", 0)
    with open(url, "w") as f:
        f.write('{"key": ')  # cut short
    with caplog.at_level("WARNING"):
        assert stored_score(cfg, "random", 0) is None
    assert "random-seed0.json" in caplog.text and "computed again" in caplog.text
