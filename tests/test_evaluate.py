"""Student training and the evaluation protocol on a tiny separable synthetic problem (real toy Student)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from ptmst_ray.config import EvalConfig, ModelConfig
from ptmst_ray.evaluate import protocol
from ptmst_ray.evaluate.metrics import METRIC_NAMES, retrieval_metrics
from ptmst_ray.evaluate.protocol import (
    Subset, aggregate, coreset_subset, evaluate_one_seed, random_coreset,
)
from ptmst_ray.evaluate.student import (
    RetrievalSet, decay_epoch, encode_test, eval_epochs, evaluate_student, train_student,
)
from ptmst_ray.models.student import build_student

TEXT_DIM = 64


@pytest.fixture(autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(old)


def make_problem(n_cls: int = 8, per_cls: int = 4, test_per_cls: int = 2, caps: int = 2, seed: int = 0,
                 crossed: bool = False):
    """Classes with their own colour/pattern and text prototype; pairs share a class. With ``crossed``, also a
    split whose captions describe the NEXT class's images (returned last): the better a student learns the
    true pairs, the lower its recall there."""
    g = torch.Generator().manual_seed(seed)
    colour = torch.randn(n_cls, 3, 1, 1, generator=g)
    pattern = torch.randn(n_cls, 3, 32, 32, generator=g) * 0.5
    text_proto = torch.randn(n_cls, TEXT_DIM, generator=g)

    def images(cls):
        return colour[cls] + pattern[cls] + 0.3 * torch.randn(len(cls), 3, 32, 32, generator=g)

    def texts(cls):
        return text_proto[cls] + 0.3 * torch.randn(len(cls), TEXT_DIM, generator=g)

    train_cls = torch.arange(n_cls).repeat(per_cls)
    test_cls = torch.arange(n_cls).repeat(test_per_cls)
    txt2img = torch.arange(len(test_cls)).repeat_interleave(caps)
    test = RetrievalSet(images(test_cls), texts(test_cls[txt2img]), txt2img)
    if crossed:
        other = RetrievalSet(images(test_cls), texts((test_cls[txt2img] + 1) % n_cls), txt2img)
        return images(train_cls), texts(train_cls), train_cls, test, other
    return images(train_cls), texts(train_cls), train_cls, test


@pytest.fixture(scope="module")
def problem():
    return make_problem()


def student(seed: int = 1, **model):
    return build_student(ModelConfig(**model), text_dim=TEXT_DIM, seed=seed)


def state(m: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in m.state_dict().items()}


# ---------------------------------------------------------------- schedule helpers


def test_eval_epochs_and_decay_epoch():
    assert eval_epochs(100, 10) == list(range(10, 101, 10))
    assert eval_epochs(3, 10) == [1, 2, 3]
    assert eval_epochs(10, 3) == [4, 7, 10]
    assert eval_epochs(7, 1) == [7]
    assert decay_epoch(100) == 51 and decay_epoch(5) == 3 and decay_epoch(1) == 1


# ---------------------------------------------------------------- train_student


def test_training_improves_recall(problem):
    x, t, _, test = problem
    s = student()
    before = evaluate_student(s, test)
    res = train_student(s, x, t, None, epochs=8, batch_size=16, lr_img=0.05, lr_txt=0.05, loss="WBCE", seed=0,
                        eval_fn=lambda st: evaluate_student(st, test), eval_points=4)
    assert [h["epoch"] for h in res.history] == [2, 4, 6, 8]
    assert res.final == {k: v for k, v in res.history[-1].items() if k not in ("epoch", "loss")}
    assert res.best["r_mean"] == max(h["r_mean"] for h in res.history)
    assert res.best_epoch in (2, 4, 6, 8)
    assert res.final["r_mean"] > before["r_mean"] + 15
    assert len(res.epoch_losses) == 8 and res.epoch_losses[-1] < res.epoch_losses[0]
    assert res.diverged_at is None


def test_lr_step_decay_at_half_plus_one(problem, monkeypatch):
    x, t, _, _ = problem
    seen: list[tuple[float, ...]] = []
    real_step = torch.optim.SGD.step

    def recording_step(self, *a, **k):
        seen.append(tuple(g["lr"] for g in self.param_groups))
        return real_step(self, *a, **k)

    monkeypatch.setattr(torch.optim.SGD, "step", recording_step)
    reports = []
    train_student(student(), x[:16], t[:16], None, epochs=5, batch_size=8, lr_img=0.2, lr_txt=0.03,
                  momentum=0.9, seed=0, progress=reports.append)
    assert len(seen) == 10  # 2 steps per epoch
    per_epoch = [seen[2 * e] for e in range(5)]
    for e, lrs in enumerate(per_epoch, start=1):
        scale = 0.1 if e >= 3 else 1.0  # E // 2 + 1 = 3
        assert lrs == pytest.approx((0.2 * scale, 0.03 * scale))
    assert [r["epoch"] for r in reports] == [1, 2, 3, 4, 5]
    assert reports[2]["lr_img"] == pytest.approx(0.02) and reports[1]["lr_txt"] == pytest.approx(0.03)


def test_similarity_target_is_used(problem):
    x, t, cls, _ = problem
    common = dict(epochs=2, batch_size=16, lr_img=0.05, lr_txt=0.05, loss="WBCE", seed=3)
    a, b, c, d = student(), student(), student(), student()
    train_student(a, x, t, None, **common)
    train_student(b, x, t, torch.eye(len(x)), **common)
    soft = (cls[:, None] == cls[None, :]).float() * 0.9 + torch.eye(len(x)) * 0.1
    train_student(c, x, t, soft, **common)
    calls = []

    def target_fn(idx):
        calls.append(idx.clone())
        return soft[idx][:, idx]

    train_student(d, x, t, target_fn, **common)
    sa, sb, sc, sd = state(a), state(b), state(c), state(d)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)  # None means identity
    assert any(not torch.allclose(sa[k], sc[k]) for k in sa)  # a non-identity target changes training
    assert all(torch.equal(sc[k], sd[k]) for k in sc)  # callable target == tensor target
    assert len(calls) == 4 and all(len(i) == 16 for i in calls)


def test_frozen_image_tower_is_not_trained(problem):
    x, t, _, _ = problem
    s = student(image_trainable=False)
    before = state(s)
    reports = []
    train_student(s, x, t, None, epochs=2, batch_size=16, lr_img=0.5, lr_txt=0.05, progress=reports.append)
    after = state(s)
    assert all(torch.equal(before[k], after[k]) for k in before if k.startswith("image."))
    assert any(not torch.equal(before[k], after[k]) for k in before if k.startswith("head."))
    assert reports[0]["lr_img"] is None


def test_deterministic_and_global_rng_untouched(problem):
    x, t, _, _ = problem
    a, b = student(), student()
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    train_student(a, x, t, None, epochs=1, batch_size=8, seed=5)
    assert torch.equal(torch.rand(1), expected_next)
    train_student(b, x, t, None, epochs=1, batch_size=8, seed=5)
    sa, sb = state(a), state(b)
    assert all(torch.equal(sa[k], sb[k]) for k in sa)


def test_non_finite_loss_stops_with_last_good_weights(problem):
    x, t, _, test = problem
    s = student()
    epoch_of_call = []

    def target_fn(idx):
        epoch_of_call.append(1)
        bad = len(epoch_of_call) > 4  # epochs 1-2 fine (2 batches each), NaN from epoch 3
        return torch.full((len(idx), len(idx)), math.nan) if bad else torch.eye(len(idx))

    res = train_student(s, x, t, target_fn, epochs=6, batch_size=16, seed=0,
                        eval_fn=lambda st: evaluate_student(st, test), eval_points=6)
    assert res.diverged_at == 3
    assert len(res.epoch_losses) == 2
    assert all(torch.isfinite(p).all() for p in s.parameters())
    assert res.history[-1]["epoch"] == 3 and res.final is not None


def test_bad_shapes_raise(problem):
    x, t, _, _ = problem
    with pytest.raises(ValueError, match="one row per pair"):
        train_student(student(), x, t[:-1], epochs=1)
    with pytest.raises(ValueError, match="target must be"):
        train_student(student(), x, t, torch.eye(3), epochs=1)


def test_encode_test_is_cosine_similarity(problem):
    _, _, _, test = problem
    s = student()
    sim = encode_test(s, test.images, test.text_emb, batch_size=5)
    assert sim.shape == (len(test.images), len(test.text_emb))
    with torch.no_grad():
        s.eval()
        want = s(test.images, test.text_emb) / s.scale
    torch.testing.assert_close(sim, want, rtol=1e-5, atol=1e-5)
    assert evaluate_student(s, test) == retrieval_metrics(sim, test.txt2img)


# ---------------------------------------------------------------- protocol


def test_aggregate_mean_std():
    rng = np.random.default_rng(0)
    runs = [{n: float(v) for n, v in zip(METRIC_NAMES, rng.uniform(0, 100, 7))} for _ in range(4)]
    agg = aggregate(runs)
    assert set(agg) == set(METRIC_NAMES)
    for n in METRIC_NAMES:
        vals = np.array([r[n] for r in runs])
        assert agg[n]["mean"] == pytest.approx(vals.mean())
        assert agg[n]["std"] == pytest.approx(vals.std())  # population std (ddof=0)
    assert aggregate([runs[0]])["IR@1"]["std"] == 0.0
    with pytest.raises(ValueError):
        aggregate([])


def test_evaluate_two_phases_two_seeds(problem):
    """Sequential phases, each seed its own student; recall points only on the last phase; the
    aggregate over seeds is the plain mean/std of the per-seed figures."""
    x, t, cls, test = problem
    soft = (cls[:, None] == cls[None, :]).float()
    subsets = [Subset(x[:16], t[:16], soft[:16, :16], lr_img=0.05, lr_txt=0.05), Subset(x[16:], t[16:], None)]
    cfg = EvalConfig(epochs=3, batch_size=16, eval_points=3, seeds=2, seed=100, lr=0.05)
    runs = [evaluate_one_seed(subsets, student(cfg.seed + s), test, cfg, loss="InfoNCE", seed=cfg.seed + s)
            for s in range(cfg.seeds)]
    for run in runs:
        assert set(run["final"]) == set(METRIC_NAMES) and set(run["best"]) == set(METRIC_NAMES)
        points = run["history"][-1]["points"]
        assert [p["epoch"] for p in points] == [1, 2, 3]
        assert run["history"][0]["points"] == []  # evaluation happens on the last subset only
        assert run["final"]["r_mean"] == points[-1]["r_mean"]
        assert run["best"]["r_mean"] >= run["final"]["r_mean"]
    finals = [r["final"]["r_mean"] for r in runs]
    out = aggregate(r["final"] for r in runs)
    assert out["r_mean"]["mean"] == pytest.approx(np.mean(finals))
    assert out["r_mean"]["std"] == pytest.approx(np.std(finals))
    assert out["r_mean"]["std"] > 0  # seeds vary the initialisation


def test_evaluate_one_seed_lr_fallback(problem, monkeypatch):
    x, t, _, test = problem
    seen = []
    real = protocol.train_student

    def spy(*a, **k):
        seen.append((k["lr_img"], k["lr_txt"], k["loss"], k["epochs"]))
        return real(*a, **k)

    monkeypatch.setattr(protocol, "train_student", spy)
    subs = [Subset(x[:8], t[:8], lr_img=torch.tensor(0.3), lr_txt=0.2), Subset(x[8:16], t[8:16])]
    evaluate_one_seed(subs, student(), test, EvalConfig(epochs=1, eval_points=1), None)
    evaluate_one_seed(subs[1:], student(), test, EvalConfig(epochs=1, eval_points=1, lr=0.07, loss="CWCL"), None)
    assert seen[0] == (pytest.approx(0.3), 0.2, "WBCE", 1)
    assert seen[1] == (0.1, 0.1, "WBCE", 1)
    assert seen[2] == (0.07, 0.07, "CWCL", 1)


def test_random_coreset_distinct_images():
    row_image = torch.arange(10).repeat_interleave(5)  # 10 images x 5 captions, 50 rows
    idx = random_coreset(50, 7, seed=0, row_image=row_image)
    assert len(idx) == 7 and len(set(row_image[idx].tolist())) == 7
    assert torch.equal(idx, idx.sort().values)
    assert torch.equal(idx, random_coreset(50, 7, seed=0, row_image=row_image))
    assert not torch.equal(idx, random_coreset(50, 7, seed=1, row_image=row_image))
    more = random_coreset(50, 15, seed=0, row_image=row_image)
    assert len(set(more.tolist())) == 15 and set(row_image[more].tolist()) == set(range(10))
    plain = random_coreset(50, 12, seed=2)
    assert len(set(plain.tolist())) == 12 and plain.max() < 50
    with pytest.raises(ValueError, match="pairs"):
        random_coreset(5, 6, seed=0)
    with pytest.raises(ValueError, match="one entry per train row"):
        random_coreset(5, 2, seed=0, row_image=[0, 1])


def test_coreset_and_full_data_baselines(problem):
    x, t, _, test = problem
    sub = coreset_subset(x, t, random_coreset(len(x), 8, seed=0))
    assert len(sub) == 8 and sub.similarity is None
    cfg = EvalConfig(epochs=5, full_data_epochs=2, eval_points=2, batch_size=16, seeds=1, lr=0.05)
    out = evaluate_one_seed([Subset(x, t)], student(0), test, cfg, epochs=cfg.full_data_epochs)
    assert [p["epoch"] for p in out["history"][-1]["points"]] == [1, 2]


def test_arrange_subsets_modes():
    """sequential keeps the phases; cumulative trains on phases 0..p at stage p; joint on all at once.
    Pairs of different phases are negatives (zero target), each phase keeps its own target block
    (identity for real pairs), and a stage uses its newest phase's step sizes."""
    from ptmst_ray.evaluate.protocol import Subset, arrange_subsets

    g = torch.Generator().manual_seed(0)
    subs = [Subset(images=torch.randn(n, 3, 4, 4, generator=g), text_emb=torch.randn(n, 5, generator=g),
                   similarity=sim, lr_img=0.1 * (i + 1), lr_txt=0.01 * (i + 1))
            for i, (n, sim) in enumerate([(2, torch.tensor([[1.0, 0.2], [0.3, 0.9]])), (3, None), (1, torch.ones(1, 1))])]
    assert arrange_subsets(subs, "sequential") == subs
    cum = arrange_subsets(subs, "cumulative")
    assert [len(s) for s in cum] == [2, 5, 6]
    assert cum[0] is subs[0]
    joint = arrange_subsets(subs, "joint")
    assert len(joint) == 1
    for stage in (cum[2], joint[0]):
        rows = [(p, r) for p, s in enumerate(subs) for r in range(len(s))]  # (phase, row) of each pair
        for a, (pa, ra) in enumerate(rows):
            assert torch.equal(stage.images[a], subs[pa].images[ra]) and torch.equal(stage.text_emb[a], subs[pa].text_emb[ra])
            for b, (pb, rb) in enumerate(rows):
                if pa != pb:
                    expected = 0.0
                elif subs[pa].similarity is None:
                    expected = float(ra == rb)
                else:
                    expected = float(subs[pa].similarity[ra, rb])
                assert float(stage.similarity[a, b]) == expected
        assert (stage.lr_img, stage.lr_txt) == (subs[2].lr_img, subs[2].lr_txt)
    assert (cum[1].lr_img, cum[1].lr_txt) == (subs[1].lr_img, subs[1].lr_txt)
    assert arrange_subsets(subs[:1], "joint") == subs[:1]
    with pytest.raises(ValueError, match="phase training mode"):
        arrange_subsets(subs, "interleaved")


def test_per_seed_difference_over_the_seeds_both_methods_scored():
    a = {0: 30.0, 1: 28.0, 2: 31.0, 5: 40.0}
    b = {0: 25.0, 1: 29.0, 2: 27.0, 3: 20.0}
    d = protocol.per_seed_difference(a, b)
    # seeds 0, 1, 2: +5, -1, +4 -> mean 8 / 3; population variance of the three about it
    mean = 8 / 3
    assert d == {"seeds": 3, "ahead": 2, "mean": pytest.approx(mean),
                 "std": pytest.approx(math.sqrt(((5 - mean) ** 2 + (-1 - mean) ** 2 + (4 - mean) ** 2) / 3))}
    assert protocol.per_seed_difference(a, {7: 1.0}) is None
    assert protocol.per_seed_difference({0: 1.0}, {0: 1.0})["ahead"] == 0  # a tie is not ahead


def test_results_json_pairs_ptm_st_with_each_baseline_by_seed_and_the_cli_prints_it():
    from pathlib import Path

    from ptmst_ray.config import load_config
    from ptmst_ray.stages.score import summarise
    from ptmst_ray_cli.commands import ratio_lines

    cfg = load_config(Path(__file__).resolve().parents[1] / "configs" / "toy.yaml", [])

    def run(method, seed, r):
        m = {"r_mean": r}
        return {"method": method, "seed": seed, "pairs": 50, "best": m, "final": m, "best_on_test": m,
                "selection": "test", "epochs_run": 30}

    runs = [run("ptm_st", s, r) for s, r in enumerate([30.0, 31.0, 29.0])] + \
           [run("random", s, r) for s, r in enumerate([22.0, 32.0, 23.0])] + [run("full", 0, 35.0)]
    res = summarise(runs, cfg)
    assert res["per_seed"]["ptm_st/random"] == {"seeds": 3, "ahead": 2, "mean": pytest.approx(13 / 3),
                                                "std": pytest.approx(np.std([8.0, -1.0, 6.0]))}
    assert res["per_seed"]["ptm_st/full"] == {"seeds": 1, "ahead": 0, "mean": pytest.approx(-5.0),
                                              "std": pytest.approx(0.0)}
    assert "ptm_st/single_phase" not in res["per_seed"]  # not scored
    lines = ratio_lines(res)
    assert lines[0] == f"ptm_st/random: {30 / (77 / 3):.2f}x; ahead in 2 of 3 seeds (+4.3 ± 3.9 r_mean a seed)"
    assert lines[1] == "ptm_st/full: 0.86x; ahead in 0 of 1 seed (-5.0 ± 0.0 r_mean a seed)"
