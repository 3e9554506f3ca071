"""Built-in generated dataset: determinism, disjoint pretrain split, caption variety."""

from __future__ import annotations


from ptmst_ray import storage
from ptmst_ray.config import BuiltinDataConfig
from ptmst_ray.data import builtin
from ptmst_ray.data.annotations import read_split

SMALL = BuiltinDataConfig(seed=3, pretrain_seed=7, train_images=60, test_images=20, pretrain_images=80, captions_per_image=2)


def _all_bytes(url: str) -> dict[str, bytes]:
    m = storage.read_manifest(url)
    return {name: storage.read_bytes(storage.join(url, name)) for name in m["files"]}


def test_same_seed_same_bytes(tmp_path):
    a, b = str(tmp_path / "a"), str(tmp_path / "b")
    builtin.generate_builtin(a, SMALL, 32)
    builtin.generate_builtin(b, SMALL, 32)
    fa, fb = _all_bytes(a), _all_bytes(b)
    assert fa == fb and len(fa) == 60 + 20 + 80 + 3


def test_different_seed_differs(tmp_path):
    import dataclasses

    a = builtin.generate_builtin(str(tmp_path / "a"), SMALL, 32)
    b = builtin.generate_builtin(str(tmp_path / "b"), dataclasses.replace(SMALL, seed=4), 32)
    assert a["files"]["builtin_test.json"] != b["files"]["builtin_test.json"]
    assert a["files"]["images/train/train_00000.png"] != b["files"]["images/train/train_00000.png"]
    # the pretrain split follows pretrain_seed; it changes only through the exclusion of other scenes
    assert a["config_hash"] != b["config_hash"]


def test_pretrain_disjoint_from_train_and_test(tmp_path):
    plan = builtin.plan_scenes(SMALL)
    scenes = {s: set(v) for s, v in plan.items()}
    assert not scenes["pretrain"] & (scenes["train"] | scenes["test"])
    assert not scenes["train"] & scenes["test"]
    m = builtin.generate_builtin(str(tmp_path / "d"), SMALL, 32)
    hashes = {k: v for k, v in m["files"].items() if k.endswith(".png")}
    assert len(set(hashes.values())) == len(hashes)  # no two images share pixels


def test_files_read_as_annotations_and_counts(tmp_path):
    d = str(tmp_path / "d")
    m = builtin.generate_builtin(d, SMALL, 32)
    train = read_split(d, "builtin", "train")
    test = read_split(d, "builtin", "test")
    pre = read_split(d, "builtin", "pretrain")
    assert len(train.rows) == 120 and len(test.rows) == 20 and test.num_captions == 100 and len(pre.rows) == 160
    assert all(len(set(r.captions)) == 5 for r in test.rows)
    assert m["stats"]["test"] == {"images": 20, "captions": 100, "distinct_captions": 100, "captions_shared_by_images": 0}


def test_idempotent_via_manifest(tmp_path, monkeypatch):
    d = str(tmp_path / "d")
    m1 = builtin.generate_builtin(d, SMALL, 32)
    monkeypatch.setattr(builtin, "render", lambda *a, **k: (_ for _ in ()).throw(AssertionError("re-rendered")))
    assert builtin.generate_builtin(d, SMALL, 32) == m1


def test_variety_of_default_config():
    """Learnability proxy: every caption of the default config belongs to exactly one image."""
    cfg = BuiltinDataConfig()
    plan = builtin.plan_scenes(cfg)
    import random

    rows = {}
    for split, scenes in plan.items():
        n = 5 if split == "test" else cfg.captions_per_image
        rows[split] = [{"image": str(i), "caption": builtin.captions_for(s, n, random.Random(i))}
                       for i, s in enumerate(scenes)]
    stats = builtin.caption_stats(rows)
    for split, st in stats.items():
        assert st["captions_shared_by_images"] == 0 and st["distinct_captions"] == st["captions"], (split, st)
    # attributes are spread over the whole vocabulary
    objs = [o for s in plan["train"] for o in s.objects]
    assert {o.shape for o in objs} == set(builtin.SHAPES) and {o.colour for o in objs} == set(builtin.COLOURS)
    assert {s.background for s in plan["train"]} == set(builtin.BACKGROUNDS)


def test_many_captions_per_image():
    import random

    scene = builtin.plan_scenes(SMALL)["train"][0]
    caps = builtin.captions_for(scene, 9, random.Random(0))
    assert len(caps) == 9 and len(set(caps)) >= 6
