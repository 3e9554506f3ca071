"""Retrieval recall against a brute-force, sort-based Python reference (ties included)."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch

from ptmst_ray.evaluate import metrics
from ptmst_ray.evaluate.metrics import METRIC_NAMES, retrieval_metrics


def brute_force(sim: np.ndarray, txt2img: list[int], ks=(1, 5, 10)) -> dict[str, float]:
    """Stable sort with the wrong items first among equals (= ties counted against the truth)."""
    n_img, n_cap = sim.shape
    tr_ranks = []
    for i in range(n_img):
        true = {c for c in range(n_cap) if txt2img[c] == i}
        order = sorted(range(n_cap), key=lambda c: (-sim[i, c], c in true))
        tr_ranks.append(min(order.index(c) for c in true))
    ir_ranks = []
    for c in range(n_cap):
        t = txt2img[c]
        order = sorted(range(n_img), key=lambda i: (-sim[i, c], i == t))
        ir_ranks.append(order.index(t))
    out = {}
    for k in ks:
        out[f"IR@{k}"] = 100.0 * sum(r < k for r in ir_ranks) / n_cap
    for k in ks:
        out[f"TR@{k}"] = 100.0 * sum(r < k for r in tr_ranks) / n_img
    out["r_mean"] = sum(out[n] for n in METRIC_NAMES[:-1]) / 6
    return out


def _case(n_img: int, per_img: int, seed: int, integer: bool):
    rng = np.random.default_rng(seed)
    txt2img = list(np.repeat(np.arange(n_img), per_img))
    rng.shuffle(txt2img)
    n_cap = len(txt2img)
    sim = rng.integers(0, 4, size=(n_img, n_cap)).astype(np.float32) if integer else rng.normal(size=(n_img, n_cap))
    # make the true pairs somewhat better so recalls are not all near chance
    for c, i in enumerate(txt2img):
        sim[i, c] += rng.integers(0, 3) if integer else rng.normal() + 1.0
    return sim, [int(v) for v in txt2img]


@pytest.mark.parametrize("n_img,per_img", [(3, 1), (7, 5), (23, 2), (40, 3)])
@pytest.mark.parametrize("integer", [False, True])
@pytest.mark.parametrize("seed", [0, 1])
def test_matches_brute_force(n_img, per_img, integer, seed):
    sim, t2i = _case(n_img, per_img, seed, integer)
    got = retrieval_metrics(torch.as_tensor(sim), torch.as_tensor(t2i))
    want = brute_force(sim, t2i)
    assert set(got) == set(METRIC_NAMES)
    for name in METRIC_NAMES:
        assert isinstance(got[name], float)
        assert got[name] == pytest.approx(want[name], abs=1e-9), name


def test_numpy_inputs_and_chunking(monkeypatch):
    sim, t2i = _case(30, 4, 3, integer=True)
    want = retrieval_metrics(sim, t2i)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 50)  # several rows / columns per chunk
    assert retrieval_metrics(sim, np.asarray(t2i)) == want
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 1)  # one row / column per chunk
    assert retrieval_metrics(sim, t2i) == want


def test_explicit_ties_count_against_true_item():
    # 2 images, 2 captions, everything tied: the true item goes last -> rank 1
    sim = torch.zeros(2, 2)
    m = retrieval_metrics(sim, [0, 1])
    assert m["IR@1"] == 0.0 and m["TR@1"] == 0.0
    assert m["IR@5"] == 100.0 and m["TR@5"] == 100.0
    # a tie between two true captions of the same image does not hurt: rank 0
    sim = torch.tensor([[1.0, 1.0, 0.0], [0.0, 0.0, 1.0]])
    m = retrieval_metrics(sim, [0, 0, 1])
    assert m["TR@1"] == 100.0 and m["IR@1"] == 100.0
    # a wrong caption tied with the best true caption pushes it to rank 1
    sim = torch.tensor([[1.0, 0.5, 1.0], [0.0, 0.0, 2.0]])
    m = retrieval_metrics(sim, [0, 0, 1])
    assert m["TR@1"] == 50.0  # image 0 has rank 1, image 1 rank 0
    # caption 0: image 0 scores 1 vs image 1 scores 0 -> rank 0; caption 1 rank 0; caption 2 rank 0
    assert m["IR@1"] == 100.0


def test_constant_scores_give_zero_recall_at_one():
    sim = torch.ones(10, 50)
    m = retrieval_metrics(sim, np.repeat(np.arange(10), 5))
    assert m["IR@1"] == 0.0 and m["TR@1"] == 0.0 and m["IR@5"] == 0.0


def test_nan_scores_never_help():
    sim = torch.full((4, 4), float("nan"))
    m = retrieval_metrics(sim, [0, 1, 2, 3])
    assert m["IR@1"] == 0.0 and m["TR@1"] == 0.0


def test_perfect_and_k_larger_than_n():
    sim = torch.eye(3)
    m = retrieval_metrics(sim, [0, 1, 2])
    assert all(v == 100.0 for v in m.values())
    sim = -torch.eye(3)  # worst possible, but K=5,10 > n=3
    m = retrieval_metrics(sim, [0, 1, 2])
    assert m["IR@1"] == 0.0 and m["IR@5"] == 100.0 and m["TR@10"] == 100.0


def test_bad_inputs_raise():
    with pytest.raises(ValueError, match="one entry per caption"):
        retrieval_metrics(torch.zeros(2, 3), [0, 1])
    with pytest.raises(ValueError, match="image indices"):
        retrieval_metrics(torch.zeros(2, 2), [0, 2])
    with pytest.raises(ValueError, match="no caption"):
        retrieval_metrics(torch.zeros(2, 2), [0, 0])


def test_full_test_split_size_is_fast():
    g = torch.Generator().manual_seed(0)
    sim = torch.randn(1000, 5000, generator=g)
    t2i = torch.arange(1000).repeat_interleave(5)
    start = time.perf_counter()
    m = retrieval_metrics(sim, t2i)
    assert time.perf_counter() - start < 5.0
    assert 0.0 <= m["r_mean"] <= 100.0
