"""A frozen image tower's features, computed once per (tower, split) and used by experts and evaluation
(stages/features.py): equal to the tower's own forward, the same trajectories and scores as without the cache,
keyed by the tower's weights and the split, streamed splits included, and the tower never run by a consumer."""

from __future__ import annotations

import contextlib
import logging

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from ptmst_ray import layout, storage
from ptmst_ray.data.dataset import load_split, normalize_images
from ptmst_ray.layout import Layout, StageError, experts_hash
from ptmst_ray.models.student import build_student, drop_frozen_tower, tower_digest
from ptmst_ray.models.towers import build_clip
from ptmst_ray.stages import data as data_stage
from ptmst_ray.stages import embed as embed_stage
from ptmst_ray.stages import features
from ptmst_ray.stages import pretrain as pretrain_stage
from ptmst_ray.stages.experts import expert_store, train_and_store_expert
from ptmst_ray.stages.score import score_one_seed

FROZEN = {"model.image_trainable": False, "model.image_proj_dim": 16,
          "data.shard_rows": 16}
"""CC3M's shape on the tiny config: the pretrained tower frozen, a trainable 16-d projection of its features;
small shards, so a split spans several feature files."""


def frozen_config(root, **overrides):
    return tiny_config(root, **{**FROZEN, **overrides})


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Data, pretrained towers and caption embeddings of the tiny frozen-tower config (in-process, no Ray)."""
    root = tmp_path_factory.mktemp("frozen")
    cfg = frozen_config(root)
    data_stage.prepare(cfg)
    pretrain_stage.pretrain(cfg)
    embed_stage.embed(cfg)
    return root


def _trajectory(cfg, expert_id: int = 0) -> list[dict]:
    """Expert ``expert_id`` trained afresh (an earlier one of this root removed first) and read back."""
    experts_dir = Layout.of(cfg).experts
    if storage.exists(experts_dir):
        storage.remove(experts_dir, recursive=True)
    train_and_store_expert(cfg, expert_id)
    return expert_store(cfg).load_expert(expert_id, experts_hash(cfg))


def _assert_same_trajectory(a: list[dict], b: list[dict]) -> None:
    assert len(a) == len(b) == 4  # epochs 0..3
    assert list(a[0]) == list(b[0]) and "image.proj.weight" in a[0]  # the same trainable parameters, same names
    for snap_a, snap_b in zip(a, b):
        for name in snap_a:
            torch.testing.assert_close(snap_a[name], snap_b[name], rtol=1e-4, atol=1e-5)
    assert not torch.equal(a[0]["image.proj.weight"], a[-1]["image.proj.weight"])  # it trained


class TowerCalls:
    """Counts forward calls of the image tower's class, whichever instance (a global forward hook)."""

    def __init__(self, tower_type: type):
        self.tower_type, self.calls = tower_type, 0

    def __enter__(self):
        def hook(module, _args, _out):
            if type(module) is self.tower_type:
                self.calls += 1

        self.handle = torch.nn.modules.module.register_module_forward_hook(hook)
        return self

    def __exit__(self, *exc):
        self.handle.remove()


def _other_tower(prepared, tmp_path, delta: float = 1e-3):
    """The frozen config with a tower checkpoint whose image weights differ by ``delta`` from the pretrained ones."""
    cfg = frozen_config(prepared)
    ckpt = load_file(cfg.model.pretrained)
    name = next(k for k in ckpt if k.startswith("visual."))
    ckpt[name] = ckpt[name] + delta
    other = tmp_path / "clip.safetensors"
    save_file(ckpt, str(other))
    return frozen_config(prepared, **{"model.pretrained": str(other), "pretrain.enabled": False})


@contextlib.contextmanager
def _never_whole_split(monkeypatch, split: str = "train"):
    """Fail if a consumer reads every feature of ``split`` at once (a streamed split must not)."""
    real_split = features.CachedFeatures.split

    def guarded(self, name):
        if name == split:
            raise AssertionError(f"the whole {split} split's features were read")
        return real_split(self, name)

    with monkeypatch.context() as m:
        m.setattr(features.CachedFeatures, "split", guarded)
        yield


def test_features_equal_the_towers_forward(prepared):
    """(a) every train and test image's cached row is the tower's output on the decoded image (the tower built
    here from the config, in eval mode, as an independent reference); one row per image, not per caption."""
    cfg = frozen_config(prepared)
    out = features.compute(cfg)
    assert out["ran"] and out["skipped"] is None
    cached = features.find(cfg)
    assert cached is not None and cached.dir == Layout.of(cfg).features(out["key"])
    assert len([f for f in cached.manifest["files"] if f.startswith("train/")]) > 1  # several shards
    tower = build_clip(cfg.model, seed=123).visual.eval()
    for split in ("train", "test"):
        images = load_split(Layout.of(cfg).data, split).images
        with torch.no_grad():
            want = tower(normalize_images(images))
        got = cached.split(split)
        assert got.shape == want.shape == (len(images), 64)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # rows of a few images, read from their shards only, in any order and with repeats
    ids = torch.tensor([[59, 0], [17, 17]])
    torch.testing.assert_close(cached.rows("train", ids), cached.split("train")[ids])
    lazy = features.FeatureRows(cached, torch.tensor([3, 3, 40]), keep=False)
    assert lazy.shape == (3, 64) and torch.equal(lazy[torch.tensor([2, 0])], cached.split("train")[[40, 3]])
    with pytest.raises(IndexError):
        cached.rows("train", torch.tensor([60]))
    # a second pass reuses them, writing nothing
    writes = storage.writes()
    assert features.compute(cfg) == {"key": out["key"], "ran": False, "skipped": None}
    assert storage.writes() == writes


def test_expert_with_cache_equals_expert_without(prepared):
    """(b) the same trajectory, snapshot for snapshot, with the cache on and off; (e) with it on, the tower
    never runs on a real image during the expert's epochs (without it, it runs every step)."""
    cfg_on = frozen_config(prepared)
    cfg_off = frozen_config(prepared, **{"model.cache_frozen_features": False})
    assert experts_hash(cfg_on) == experts_hash(cfg_off)  # the switch changes where features come from, not what
    features.compute(cfg_on)
    tower_type = type(build_student(cfg_on.model, 64, seed=0).frozen_tower())
    with TowerCalls(tower_type) as off:
        without = _trajectory(cfg_off)
    with TowerCalls(tower_type) as on:
        with_cache = _trajectory(cfg_on)
    assert off.calls >= 3 * (120 // 32)  # 3 epochs of 120 caption rows in batches of 32: the check can fail
    assert on.calls == 0
    _assert_same_trajectory(with_cache, without)


def test_streamed_split_uses_the_cache(prepared, monkeypatch):
    """(d) data.stream: on: the feature pass reads shard by shard, and an expert trained on the streamed features
    follows the pixel stream's batches: the same trajectory as streaming pixels, without running the tower."""
    cfg_on = frozen_config(prepared, **{"data.stream": "on"})
    cfg_off = frozen_config(prepared, **{"data.stream": "on", "model.cache_frozen_features": False})
    assert embed_stage.stream_split(cfg_on)
    features.compute(cfg_on)
    tower_type = type(build_student(cfg_on.model, 64, seed=0).frozen_tower())
    without = _trajectory(cfg_off)
    with TowerCalls(tower_type) as on, _never_whole_split(monkeypatch):
        with_cache = _trajectory(cfg_on)
    assert on.calls == 0
    _assert_same_trajectory(with_cache, without)
    held = _trajectory(frozen_config(prepared))
    assert not torch.equal(held[1]["head.fc.weight"], with_cache[1]["head.fc.weight"])  # another (streamed) order


@pytest.mark.parametrize("method,stream", [("random", "off"), ("full", "off"), ("full", "on")])
def test_evaluation_with_cache_scores_as_without(prepared, method, stream, monkeypatch):
    """The evaluation students (a coreset, the full-data baseline held or streamed) score the same with the
    test split's and train split's features as with the tower, and never run it."""
    cfg_on = frozen_config(prepared, **{"data.stream": stream})
    cfg_off = frozen_config(prepared, **{"data.stream": stream, "model.cache_frozen_features": False})
    features.compute(cfg_on)
    tower_type = type(build_student(cfg_on.model, 64, seed=0).frozen_tower())
    without = score_one_seed(cfg_off, method, 0, device="cpu")
    # a coreset reads only its images' shards; a streamed full baseline never holds the train split's features
    guard = method == "random" or stream == "on"
    whole = _never_whole_split(monkeypatch, "train") if guard else contextlib.nullcontext()
    with TowerCalls(tower_type) as on, whole:
        with_cache = score_one_seed(cfg_on, method, 0, device="cpu")
    assert on.calls == 0
    for point in ("final", "best"):
        assert with_cache[point] == pytest.approx(without[point], abs=1e-6), point


def test_synthetic_subsets_are_featurised_once(prepared):
    """Pixel subsets (a distilled set's images) pass through the tower once per evaluation, not once an epoch,
    and score as when the tower runs every step."""
    from ptmst_ray.evaluate.protocol import Subset

    cfg_on = frozen_config(prepared)
    cfg_off = frozen_config(prepared, **{"model.cache_frozen_features": False})
    features.compute(cfg_on)
    g = torch.Generator().manual_seed(0)
    subset = [Subset(images=torch.randn(10, 3, 32, 32, generator=g), text_emb=torch.randn(10, 64, generator=g),
                     lr_img=0.1, lr_txt=0.1)]
    tower_type = type(build_student(cfg_on.model, 64, seed=0).frozen_tower())
    without = score_one_seed(cfg_off, "ptm_st", 0, subsets=subset, device="cpu")
    with TowerCalls(tower_type) as on:
        with_cache = score_one_seed(cfg_on, "ptm_st", 0, subsets=subset, device="cpu")
    assert on.calls == 1  # 10 images, one batch, once (eval.epochs = 2)
    assert with_cache["final"] == pytest.approx(without["final"], abs=1e-6)


def test_key_follows_the_towers_weights_and_the_split(prepared, tmp_path):
    """(c) another tower checkpoint or another split content gives another key (a new folder); the same ones the
    same key; a student whose tower differs from the features' is refused."""
    cfg = frozen_config(prepared)
    manifests = {s: storage.read_manifest(Layout.of(cfg).split(s)) for s in features.SPLITS}
    tower = features.frozen_tower_of(cfg)
    digest = tower_digest(tower)
    assert tower_digest(features.frozen_tower_of(cfg, seed=7)) == digest  # pretrained: the seed changes nothing
    key = features.features_key(cfg, digest, manifests)
    assert features.features_key(cfg, digest, manifests) == key
    changed = {**manifests, "train": {**manifests["train"], "files": {**manifests["train"]["files"], "x": "0"}}}
    assert features.features_key(cfg, digest, changed) != key
    with torch.no_grad():
        next(tower.parameters()).add_(1e-3)
    assert features.features_key(cfg, tower_digest(tower), manifests) != key

    # end to end: a changed checkpoint (another pretraining) writes a second folder next to the first
    first = features.compute(cfg)["key"]
    cfg2 = _other_tower(prepared, tmp_path)
    second = features.compute(cfg2)
    assert second["ran"] and second["key"] != first
    root = Layout.of(cfg).features_root
    assert {p.rstrip("/").rsplit("/", 1)[-1] for p in storage.listdir(root) if storage.isdir(storage.join(root, p))} \
        == {first, second["key"]}
    with pytest.raises(StageError, match="another image tower"):
        features.find(cfg2).check_tower(features.frozen_tower_of(cfg))


def test_trainable_tower_caches_nothing(tmp_path, caplog):
    """The default (a trainable tower): the pass is skipped and logged, nothing is written, hashes unchanged."""
    cfg = tiny_config(tmp_path)
    with caplog.at_level(logging.INFO, logger="ptmst_ray.stages.features"):
        out = features.compute(cfg)
    assert out == {"key": None, "ran": False, "skipped": "the image tower trains (model.image_trainable: true)"}
    assert "skipped" in caplog.text
    assert features.find(cfg) is None and not storage.exists(Layout.of(cfg).features_root)
    off = cfg.replace(**{"model.cache_frozen_features": False})
    assert experts_hash(off) == experts_hash(cfg) and layout.distilled_hash(off) == layout.distilled_hash(cfg)
    assert Layout.of(cfg).features_root in layout.stage_dirs(cfg, "embed")  # `--rebuild embed` removes them


def test_missing_features_fall_back_to_the_tower(prepared, tmp_path, caplog):
    """Features never computed for this tower (e.g. `ptmst-ray eval` on an older root): the consumer warns and
    runs the tower, as without the cache."""
    cfg = _other_tower(prepared, tmp_path, delta=2e-3)  # a tower no other test computed features of
    with caplog.at_level(logging.WARNING, logger="ptmst_ray.stages.features"):
        assert features.find(cfg) is None
    assert "not computed" in caplog.text


class Builds:
    """Counts image-tower builds (open_clip's ``_build_vision_tower``: each student, each whole model), feature-file
    reads and weights-file hashes."""

    def __init__(self, monkeypatch, features_root: str):
        import open_clip

        self.students, self.reads, self.hashed = 0, [], []
        build, read_bytes, hash_file = open_clip.model._build_vision_tower, storage.read_bytes, storage.hash_file

        def counted(*args, **kwargs):
            self.students += 1
            return build(*args, **kwargs)

        def read(url, *args, **kwargs):
            if str(url).startswith(features_root) and str(url).endswith(".safetensors"):
                self.reads.append(url)
            return read_bytes(url, *args, **kwargs)

        def hashed(url, *args, **kwargs):
            self.hashed.append(url)
            return hash_file(url, *args, **kwargs)

        monkeypatch.setattr(open_clip.model, "_build_vision_tower", counted)
        monkeypatch.setattr(storage, "read_bytes", read)
        monkeypatch.setattr(storage, "hash_file", hashed)


def test_finding_features_builds_no_tower(prepared, monkeypatch):
    """A consumer finds its features from the manifest CURRENT names: no tower built, no weights file hashed, no
    features file read; the driver's pass on finished features hashes the weights file (its source) and builds
    nothing; the one tower a consumer builds is its own student's, checked against the features' digest."""
    cfg = frozen_config(prepared)
    key = features.compute(cfg)["key"]
    spy = Builds(monkeypatch, Layout.of(cfg).features_root)
    cached = features.find(cfg)
    assert cached is not None and cached.dir == Layout.of(cfg).features(key)
    assert spy.students == 0 and spy.hashed == [] and spy.reads == []
    assert features.compute(cfg) == {"key": key, "ran": False, "skipped": None}
    assert spy.students == 0 and spy.reads == [] and spy.hashed == [cfg.model.pretrained]
    train_and_store_expert(cfg, 1)
    assert spy.students == 1  # the expert's own student


def test_weights_changed_in_place_are_caught(prepared, tmp_path):
    """The same weights path with other content: the driver's pass sees another source, builds the tower and
    computes another folder; before it has, a consumer's own tower does not match the current features and is
    refused (never trained on another tower's features). The process re-reads the rewritten file (its checkpoint
    cache follows the file's version, not only its path)."""
    weights = tmp_path / "clip.safetensors"
    ckpt = load_file(frozen_config(prepared).model.pretrained)
    save_file(ckpt, str(weights))
    cfg = frozen_config(prepared, **{"model.pretrained": str(weights), "pretrain.enabled": False})
    first = features.compute(cfg)["key"]
    name = next(k for k in ckpt if k.startswith("visual."))
    ckpt[name] = ckpt[name] + 3e-3
    save_file(ckpt, str(weights))
    assert features.done_key(cfg) is None
    with pytest.raises(StageError, match="another image tower"):
        features.find(cfg).check_tower(features.frozen_tower_of(cfg))
    second = features.compute(cfg)
    assert second["ran"] and second["key"] != first
    features.find(cfg).check_tower(features.frozen_tower_of(cfg))


def test_damaged_features_are_named_with_the_rebuild(prepared, tmp_path):
    """A features file changed after it was written: its consumers stop naming it (each checks the bytes it reads;
    the driver's pass, which found the features complete from their manifest, reads none), and the run's error
    says which stage redoes it (`--rebuild embed`)."""
    from conftest import copy_root

    copy_root(prepared, tmp_path, parts=("data", "pretrain"))
    cfg = frozen_config(tmp_path)
    key = features.compute(cfg)["key"]
    cached = features.find(cfg)
    rel = sorted(f for f in cached.manifest["files"] if f.startswith("train/"))[1]
    url = storage.join(Layout.of(cfg).features(key), rel)
    blob = bytearray(storage.read_bytes(url))
    blob[-1] ^= 0xFF
    storage.write_bytes(url, bytes(blob))
    assert features.compute(cfg) == {"key": key, "ran": False, "skipped": None}
    for attempt in (lambda: cached.split("train"), lambda: train_and_store_expert(cfg, 0)):
        with pytest.raises(storage.StorageError) as e:
            attempt()
        assert rel in str(e.value)
        assert "ptmst-ray run --rebuild embed" in layout.explain(cfg, e.value)
    assert not expert_store(cfg).is_complete(0, experts_hash(cfg), cfg.experts.epochs)


def test_frozen_tower_stays_in_eval_mode():
    """A frozen tower is one fixed function: train() leaves it in eval mode (the path without the cache runs
    the same forward as the feature pass); the projection and the head train."""
    from ptmst_ray.config import ModelConfig

    student = build_student(ModelConfig(image_trainable=False, image_proj_dim=8, head_dropout=0.5), 64, seed=0)
    student.train()
    assert not any(m.training for m in student.frozen_tower().modules())
    assert student.head.training and student.image.proj.training
    trainable = {n for n, p in student.named_parameters() if p.requires_grad}
    tower = drop_frozen_tower(student)
    assert {n for n, p in student.named_parameters() if p.requires_grad} == trainable  # snapshots keep their names
    assert isinstance(student.image.tower, torch.nn.Identity) and tower is not None
    feats = torch.randn(3, 64)
    torch.testing.assert_close(student.eval().encode_image(feats),
                               torch.nn.functional.normalize(student.image.proj(feats), dim=-1))
    full = build_student(ModelConfig(), 64, seed=0)
    full.train()
    assert full.image.training  # a trainable tower trains as before
    with pytest.raises(ValueError, match="trainable"):
        full.frozen_tower()


def test_feature_pass_is_a_gpu_task_when_the_run_targets_gpus(prepared, tmp_path, ray_session):
    """The driver's feature pass runs as a Ray task holding a GPU when the run targets GPUs (the session's Ray
    has 2 logical GPUs), in the driver on CPUs, and not at all with a trainable tower; an expert actor then
    trains on the features, to the trajectory of an expert trained without them."""
    from conftest import copy_root
    from ptmst_ray.orchestration.pipeline import image_features

    copy_root(prepared, tmp_path, parts=("data", "pretrain"))
    cfg = frozen_config(tmp_path)
    on_gpu = image_features(cfg.replace(**{"run.accelerator": "gpu"}))
    assert on_gpu["ran"] and on_gpu["gpu_ids"] and on_gpu["node_id"], on_gpu
    assert features.find(cfg) is not None
    on_cpu = image_features(cfg.replace(**{"run.accelerator": "cpu"}))
    assert on_cpu == {"key": on_gpu["key"], "ran": False, "skipped": None, "node_id": None, "gpu_ids": []}
    trainable = image_features(cfg.replace(**{"model.image_trainable": True}))
    assert trainable["skipped"] and not trainable["ran"]

    # an expert actor trains on them: the trajectory of an expert trained here without the cache
    from ptmst_ray.orchestration.experts import run_experts

    one = cfg.replace(**{"experts.num_experts": 1})
    assert run_experts(one)["trained"] == 1
    by_actor = expert_store(one).load_expert(0, experts_hash(one))
    off_root = copy_root(prepared, tmp_path / "off", parts=("data", "pretrain"))
    _assert_same_trajectory(by_actor, _trajectory(frozen_config(off_root, **{"model.cache_frozen_features": False})))
