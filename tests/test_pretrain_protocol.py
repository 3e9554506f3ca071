"""The pretraining and evaluation protocol's invariants (issue #12), on tiny models, without Ray.

* the pretraining split shares no image, scene (attribute combination) or pixels with the
  distillation train split or the test split, as prepared on disk;
* the pretrained checkpoint round-trips through the ``model.pretrained`` loader bit for bit, for
  both towers and for their consumers (frozen text encoder, student image tower);
* experts start from the same (pretrained) image encoder and different projection heads;
* no evaluation student starts from an expert's exact starting point: the seeds are captured from
  the functions that choose them (``train_expert``, ``scoring.score_one_seed``,
  ``phase_stage.phase_recall``) for every shipped config, and the students they build are compared.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from pathlib import Path

import open_clip
import pytest
import torch

from ptmst_ray.config import (
    BuiltinDataConfig, ConfigError, DataConfig, ExpertsConfig, ModelConfig, PretrainConfig, load_config, section_hash,
)
from ptmst_ray.data import builtin
from ptmst_ray.data.dataset import load_split
from ptmst_ray.data.prepare import prepare_dataset
from ptmst_ray.evaluate.protocol import Subset
from ptmst_ray.models import student as student_mod
from ptmst_ray.models.pretrain import pretrain_clip, save_checkpoint
from ptmst_ray.models.student import build_student
from ptmst_ray.models.towers import build_clip, build_text_encoder
from ptmst_ray import layout
from ptmst_ray.stages import data as data_stage
from ptmst_ray.stages import embed as embed_stage
from ptmst_ray.stages import pretrain as pretrain_stage
from ptmst_ray.stages import phase as phase_stage
from ptmst_ray.stages import score as scoring
from ptmst_ray.trajectories import expert as expert_mod
from ptmst_ray.trajectories.expert import snapshot, train_expert

CPU = torch.device("cpu")
CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))
SMALL = BuiltinDataConfig(seed=3, pretrain_seed=7, train_images=40, test_images=15, pretrain_images=60,
                          captions_per_image=2)
TOY = ModelConfig()  # ptmst-toy-vit: 32x32 images, d_t = 64
TEXT_DIM = 64
CAPTIONS = [f"a {s} {c} shape" for s in ("small", "large") for c in ("red", "green", "blue", "cyan")] * 2


@pytest.fixture(scope="module")
def pretrained_ckpt(tmp_path_factory) -> tuple[str, dict[str, torch.Tensor]]:
    """One epoch of the real pretraining on 16 noise pairs, saved by the real checkpoint writer."""
    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=g)
    state = pretrain_clip(TOY, PretrainConfig(enabled=True, epochs=1, batch_size=8, seed=3), images, CAPTIONS,
                          device=CPU)
    url = str(tmp_path_factory.mktemp("pretrain") / "clip.safetensors")
    save_checkpoint(url, state)
    return url, state


# --------------------------------------------------------------------------- disjoint pretraining split


def test_prepared_pretrain_split_disjoint_from_train_and_test(tmp_path):
    root = str(tmp_path / "data")
    prepare_dataset(DataConfig(dataset="builtin", image_size=32, builtin=SMALL), root)
    splits = {s: load_split(root, s) for s in ("train", "test", "pretrain")}
    assert [splits[s].images.shape[0] for s in ("train", "test", "pretrain")] == [40, 15, 60]
    ids = {s: set(d.image_ids) for s, d in splits.items()}
    # every caption names every attribute of its scene: shared captions would mean a shared scene
    caps = {s: set(d.captions) for s, d in splits.items()}
    pixels = {s: {img.numpy().tobytes() for img in d.images} for s, d in splits.items()}
    for other in ("train", "test"):
        assert not ids["pretrain"] & ids[other]
        assert not caps["pretrain"] & caps[other], sorted(caps["pretrain"] & caps[other])[:3]
        assert not pixels["pretrain"] & pixels[other]
    assert not pixels["train"] & pixels["test"]
    # the decoded images are the ones compared: every split's pixels are distinct within it, too
    assert all(len(pixels[s]) == splits[s].images.shape[0] for s in splits)


@pytest.mark.parametrize("path", [p for p in CONFIGS if load_config(p).data.dataset == "builtin"],
                         ids=lambda p: p.name)
def test_shipped_builtin_config_scenes_disjoint(path):
    """The attribute combinations planned for the shipped config (whatever its current counts)."""
    cfg = load_config(path)
    plan = {s: set(v) for s, v in builtin.plan_scenes(cfg.data.builtin).items()}
    assert len(plan["pretrain"]) == cfg.data.builtin.pretrain_images
    assert not plan["pretrain"] & (plan["train"] | plan["test"])
    assert not plan["train"] & plan["test"]


def test_pretraining_the_used_token_rows_gives_the_weights_of_training_all_rows(monkeypatch):
    """Pretraining trains only the token-embedding rows its captions use (AdamW sees 2 of 3.2M rows' values);
    the reference trains the whole embedding as plain AdamW does. Every weight agrees: the used rows trained,
    the rest only decayed (AdamW's decoupled weight decay; their gradients are zero)."""
    from ptmst_ray.models import pretrain as pretrain_mod

    g = torch.Generator().manual_seed(0)
    images = torch.randn(len(CAPTIONS), 3, 32, 32, generator=g)
    cfg = PretrainConfig(enabled=True, epochs=2, batch_size=4, seed=3, weight_decay=0.5, lr=0.01)
    sizes = []
    real_adamw = torch.optim.AdamW

    def recording(params, **kw):
        params = list(params)
        sizes.append(sum(p.numel() for p in params))
        return real_adamw(params, **kw)

    monkeypatch.setattr(torch.optim, "AdamW", recording)
    fast = pretrain_clip(TOY, cfg, images, CAPTIONS, device=CPU)
    monkeypatch.setattr(pretrain_mod, "_train_used_rows_only", lambda model, tokens: None)  # every row trained
    dense = pretrain_clip(TOY, cfg, images, CAPTIONS, device=CPU)
    init = build_clip(TOY, seed=3).state_dict()["token_embedding.weight"]
    vocab, width = init.shape
    used = torch.unique(open_clip.get_tokenizer(TOY.name)(CAPTIONS))
    assert sizes[1] - sizes[0] == (vocab - len(used)) * width  # the fast run's optimiser never held the other rows
    assert fast.keys() == dense.keys()
    for k in dense:
        torch.testing.assert_close(fast[k], dense[k], rtol=1e-5, atol=1e-6, msg=k)
    emb = dense["token_embedding.weight"]
    other = torch.ones(vocab, dtype=torch.bool)
    other[used] = False
    assert not torch.allclose(emb[used], init[used], atol=1e-3)  # the used rows trained ...
    ratio = emb[other] / init[other]  # ... the others decayed by the same factor, as their gradient is zero
    assert 0.9 < ratio.mean() < 0.99 and torch.allclose(ratio, ratio.mean().expand_as(ratio), rtol=1e-4)


# --------------------------------------------------------------------------- checkpoint round trip


def test_pretrained_checkpoint_round_trip_identical_outputs(pretrained_ckpt):
    url, state = pretrained_ckpt
    ref = build_clip(TOY, seed=0)
    ref.load_state_dict(state)
    ref.eval()
    cfg = dataclasses.replace(TOY, pretrained=url)
    loaded = build_clip(cfg, seed=12345).eval()  # a different seed: everything must come from the file
    assert set(loaded.state_dict()) == set(state)
    for k, v in loaded.state_dict().items():
        assert torch.equal(v, state[k]), k
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    tokens = open_clip.get_tokenizer(TOY.name)(CAPTIONS[:5])
    with torch.no_grad():
        assert torch.equal(loaded.encode_image(x), ref.encode_image(x))
        assert torch.equal(loaded.encode_text(tokens), ref.encode_text(tokens))
        # the consumers: the frozen text encoder and the student's image tower
        enc = build_text_encoder(cfg, device=CPU)
        assert torch.equal(enc.encode(CAPTIONS[:5]), ref.encode_text(tokens, normalize=False))
        st = build_student(cfg, enc.dim, seed=7).eval()
        assert torch.equal(st.image(x), ref.visual(x))
        # and the file was really read: an unloaded model of the same architecture differs
        fresh = build_clip(TOY, seed=12345).eval()
        assert not torch.equal(fresh.encode_image(x), ref.encode_image(x))
        assert not torch.equal(fresh.encode_text(tokens), ref.encode_text(tokens))


# --------------------------------------------------------------------------- experts


def test_experts_share_pretrained_image_encoder_and_differ_in_heads(pretrained_ckpt):
    url, state = pretrained_ckpt
    cfg = ExpertsConfig(epochs=1, batch_size=8, seed=0)
    g = torch.Generator().manual_seed(0)
    images, text = torch.randn(16, 3, 32, 32, generator=g), torch.randn(16, TEXT_DIM, generator=g)
    starts = [train_expert(cfg, dataclasses.replace(TOY, pretrained=url), images, text, i, device=CPU)[0]
              for i in range(3)]
    image_names = [n for n in starts[0] if n.startswith("image.")]
    head_random = ["head.projection.weight", "head.projection.bias", "head.fc.weight", "head.fc.bias"]
    assert image_names and set(head_random) <= set(starts[0])
    for s in starts:
        for n in image_names:
            assert torch.equal(s[n], state["visual." + n[len("image."):]]), n
    for i in range(3):
        for j in range(i + 1, 3):
            for n in head_random:
                assert not torch.equal(starts[i][n], starts[j][n]), (i, j, n)


# --------------------------------------------------------------------------- evaluation start points


class _Captured(Exception):
    """Raised by the stub builder once the seed is known (nothing is trained)."""


def _capture(monkeypatch, module, seeds: list[int]) -> None:
    def stub(model_cfg, text_dim, seed):
        seeds.append(seed)
        raise _Captured

    monkeypatch.setattr(module, "build_student", stub)


def expert_seeds(cfg, monkeypatch) -> list[int]:
    """The seed ``train_expert`` builds each configured expert from."""
    seeds: list[int] = []
    with monkeypatch.context() as m:
        _capture(m, expert_mod, seeds)
        for i in range(cfg.experts.num_experts):
            with pytest.raises(_Captured):
                train_expert(cfg.experts, cfg.model, torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), i, device=CPU)
    return seeds


def eval_seeds(cfg, monkeypatch) -> list[int]:
    """The seeds evaluation students are built from: ``score_one_seed`` for every seed offset the
    driver schedules (range(eval.seeds), every method) and the live recall of a phase."""
    real = embed_stage.RealData(torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), ["a", "b"], torch.arange(2),
                           torch.zeros(2, 3, 8, 8), torch.zeros(2, 4), ["a", "b"], torch.arange(2))
    dummy = [Subset(images=torch.zeros(2, 3, 8, 8), text_emb=torch.zeros(2, 4))]
    seeds: list[int] = []
    with monkeypatch.context() as m:
        _capture(m, student_mod, seeds)
        m.setattr(scoring, "load_real", lambda c, whole_train=True: real)
        m.setattr(scoring.features, "find", lambda c: None)  # a frozen tower's cache: none here (cc3m), tower runs
        m.setattr("ptmst_ray.distill.export.similarity_matrix", lambda c, s: torch.eye(2))
        for method in scoring.METHODS:
            for s in range(cfg.eval.seeds):
                with pytest.raises(_Captured):
                    scoring.score_one_seed(cfg, method, s, subsets=dummy)
        ema = {"images": torch.zeros(2, 3, 8, 8), "text": torch.zeros(2, 4),
               "alpha_img": torch.tensor(0.1), "alpha_txt": torch.tensor(0.1)}
        with pytest.raises(_Captured):
            phase_stage.phase_recall(cfg, cfg.phases[0], ema, real)
    return seeds


_STARTS: dict[tuple[int, str | None], dict[str, torch.Tensor]] = {}


def start_of(seed: int, pretrained: str | None) -> dict[str, torch.Tensor]:
    """The trainable parameters a toy student built from ``seed`` starts with (cached)."""
    key = (seed, pretrained)
    if key not in _STARTS:
        _STARTS[key] = snapshot(build_student(dataclasses.replace(TOY, pretrained=pretrained), TEXT_DIM, seed))
    return _STARTS[key]


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_eval_students_never_start_at_an_expert_start(path, pretrained_ckpt, monkeypatch):
    cfg = load_config(path)
    experts, evals = expert_seeds(cfg, monkeypatch), eval_seeds(cfg, monkeypatch)
    assert len(experts) == cfg.experts.num_experts and len(evals) == len(scoring.METHODS) * cfg.eval.seeds + 1
    # the config's model may be a large tower; the start points depend on the seeds only, so the
    # toy model stands in, once with no pretrained weights (everything seeded) and once pretrained
    for pretrained in (None, pretrained_ckpt[0]):
        a, b = start_of(experts[0], pretrained), start_of(experts[0] + 1, pretrained)
        seeded = [n for n in a if not torch.equal(a[n], b[n])]  # the parameters a seed draws
        assert "head.projection.weight" in seeded
        assert (pretrained is None) == any(n.startswith("image.") for n in seeded)
        for e in sorted(set(evals)):
            for x in sorted(set(experts)):
                s_eval, s_exp = start_of(e, pretrained), start_of(x, pretrained)
                same = [n for n in seeded if torch.equal(s_eval[n], s_exp[n])]
                assert not same, f"{path.name}: eval seed {e} starts like expert seed {x} in {same[:3]}"


@pytest.mark.parametrize("overrides", [
    {"experts.num_experts": 101},  # expert seeds 0..100 reach eval seed 100
    {"experts.seed": 100},
    {"eval.seed": 3},
])
def test_colliding_expert_and_eval_seeds_are_rejected(overrides):
    cfg = load_config()  # configs/toy.yaml
    base = {"experts.seed": 0, "experts.num_experts": 20, "eval.seed": 100, "eval.seeds": 5}
    with pytest.raises(ConfigError, match="seed"):
        cfg.replace(**{**base, **overrides})


def test_a_moved_run_root_keeps_its_experts(tmp_path):
    """The pretrain stage's checkpoint path holds the run root; the experts' identity must not."""
    from conftest import tiny_config

    a, b = tiny_config(tmp_path / "a"), tiny_config(tmp_path / "b")
    assert a.model.pretrained != b.model.pretrained  # ${run.root} expanded to two places
    assert layout.experts_hash(a) == layout.experts_hash(b)
    assert layout.experts_hash(a) != layout.experts_hash(a.replace(**{"pretrain.epochs": 2}))
    # user-given weights (no pretraining stage): another file is another starting point
    c = a.replace(**{"pretrain.enabled": False, "model.pretrained": str(tmp_path / "x.safetensors")})
    d = c.replace(**{"model.pretrained": str(tmp_path / "y.safetensors")})
    assert layout.experts_hash(c) != layout.experts_hash(d)
    # a model field added later (stored roots never hashed it) counts once set, and not at its default
    for added in layout.ADDED_MODEL_FIELDS:
        assert getattr(a.model, added) is None
        assert layout.experts_hash(a) != layout.experts_hash(a.replace(**{f"model.{added}": 8}))
    older = {k: v for k, v in dataclasses.asdict(a.model).items()
             if k not in layout.ADDED_MODEL_FIELDS + layout.UNHASHED_MODEL_FIELDS}
    assert layout.experts_hash(a) == layout.experts_hash(a.replace(**{"model.cache_frozen_features": False}))
    older["pretrained"] = None
    assert layout.model_hash(a) == section_hash(older, layout.pretrain_hash(a))


def test_separate_towers_take_each_tower_from_its_own_pretraining_run(tmp_path, caplog):
    """pretrain.towers=separate: image tower of the CLIP run with `seed`, text tower of the run with
    `seed + 1` (reference: the two runs made directly with pretrain_clip on the same split); the log names which
    run an epoch's loss is of."""
    from conftest import tiny_config
    from safetensors.torch import load_file

    cfg = tiny_config(tmp_path / "run", **{"pretrain.towers": "separate"})
    data_stage.prepare(cfg)
    with caplog.at_level(logging.INFO, logger="ptmst_ray.models.pretrain"):
        manifest = pretrain_stage.pretrain(cfg)
    epochs = [r.getMessage().split(" epoch ")[0] for r in caplog.records if " epoch " in r.getMessage()]
    assert epochs == ["pretrain image tower"] * cfg.pretrain.epochs + ["pretrain text tower"] * cfg.pretrain.epochs
    merged = load_file(cfg.model.pretrained)
    data, images = pretrain_stage.normalised_split(cfg, "pretrain")
    ref = [pretrain_clip(cfg.model, dataclasses.replace(cfg.pretrain, seed=cfg.pretrain.seed + k),
                         images[data.image_index], list(data.captions), device=CPU) for k in (0, 1)]
    assert merged.keys() == ref[0].keys()
    visual = [k for k in merged if k.startswith("visual.")]
    text = [k for k in merged if not k.startswith("visual.")]
    assert visual and text
    for k in visual:
        torch.testing.assert_close(merged[k], ref[0][k], rtol=0, atol=0)
    for k in text:
        torch.testing.assert_close(merged[k], ref[1][k], rtol=0, atol=0)
    assert any(not torch.equal(ref[0][k], ref[1][k]) for k in text)  # the two runs really differ
    assert set(manifest["zero_shot"]) >= {"r_mean", "IR@1", "TR@1"}
    joint = cfg.replace(**{"pretrain.towers": "joint"})
    assert layout.experts_hash(joint) != layout.experts_hash(cfg)  # another starting point


def test_unknown_towers_mode_is_rejected():
    with pytest.raises(ConfigError, match="towers"):
        load_config(overrides=["pretrain.towers=aligned"])


@pytest.mark.ray
def test_driver_trains_the_two_runs_at_once_with_the_same_result(tmp_path, ray_session):
    """Through Ray the separate-towers stage runs its two CLIP runs as concurrent 1-CPU tasks and writes the
    checkpoint the in-process stage writes, byte for byte."""
    import ray

    from conftest import finished_tasks, tiny_config
    from ptmst_ray.orchestration.pipeline import pretrain_task as _pretrain_task

    cfg = tiny_config(tmp_path / "ray", **{"pretrain.towers": "separate", "pretrain.epochs": 2})
    data_stage.prepare(cfg)
    submitted_ms = time.time() * 1000
    manifest = ray.get(_pretrain_task.remote(cfg.to_dict()))
    ref = tiny_config(tmp_path / "local", **{"pretrain.towers": "separate", "pretrain.epochs": 2})
    data_stage.prepare(ref)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as in a 1-CPU Ray task: the same float reduction order
    try:
        assert pretrain_stage.pretrain(ref)["sha256"] == manifest["sha256"]
    finally:
        torch.set_num_threads(threads)
    # this session's Ray, of any on the machine; this test's runs (other tests may share the session)
    runs = finished_tasks(ray_session.dashboard_url, "_pretrain_run_task", 2, since_ms=submitted_ms)
    assert len(runs) == 2, runs
    # at once: both submitted before either ended, each asking for one CPU (and one of the session's two logical
    # GPUs). Not the spans: a worker process that starts late under load can begin its run after a short other
    # run ended
    assert max(t.creation_time_ms for t in runs) < min(t.end_time_ms for t in runs), \
        [(t.creation_time_ms, t.start_time_ms, t.end_time_ms) for t in runs]
    assert [t.required_resources.get("CPU") for t in runs] == [1.0, 1.0], [t.required_resources for t in runs]
