"""Similarity generators against their formulas; the synthetic set's init; the EMA recurrence."""

from __future__ import annotations

import pytest
import torch

from ptmst_ray.config import SimilarityConfig
from ptmst_ray.distill.ema import EMA
from ptmst_ray.distill.similarity import FullSimilarity, LowRankSimilarity, build_similarity
from ptmst_ray.distill.synthetic import SyntheticSet


def test_full_similarity_is_identity_and_indexes_blocks():
    sim = FullSimilarity(6)
    assert torch.equal(sim.matrix(), torch.eye(6))
    with torch.no_grad():
        sim.sim.copy_(torch.arange(36.0).view(6, 6))
    idx = torch.tensor([4, 1, 3])
    assert torch.equal(sim.matrix(idx), sim.sim[idx][:, idx])


def test_lowrank_similarity_formula_and_minibatch():
    gen = torch.Generator().manual_seed(0)
    sim = LowRankSimilarity(7, rank=3, alpha=2.0, generator=gen)
    assert torch.equal(sim.matrix(), torch.eye(7))  # R = 0, w = 1 at init
    expected_left = torch.randn(7, 3, generator=torch.Generator().manual_seed(0))
    assert torch.equal(sim.left, expected_left)
    with torch.no_grad():
        sim.diag.copy_(torch.linspace(0.5, 1.5, 7))
        sim.right.normal_(generator=torch.Generator().manual_seed(1))
    # the formula in float64: float32's rounding of the module's own order of operations stays within 1e-6 of it
    # (a float32 reference in another order differs by a rounding step, more than allclose's default tolerance)
    full = torch.diag(sim.diag.double()) + (2.0 / 3) * sim.left.double() @ sim.right.double().T
    assert torch.allclose(sim.matrix().double(), full, rtol=0, atol=1e-6)
    idx = torch.tensor([6, 0, 2, 5])
    assert torch.allclose(sim.matrix(idx).double(), full[idx][:, idx], rtol=0, atol=1e-6)


def test_build_similarity_by_config():
    gen = torch.Generator().manual_seed(1)
    assert isinstance(build_similarity(SimilarityConfig(kind="full"), 5, gen), FullSimilarity)
    low = build_similarity(SimilarityConfig(kind="lowrank", rank=2, alpha=1.0), 5, gen, dtype=torch.float64)
    assert isinstance(low, LowRankSimilarity) and low.rank == 2 and low.left.dtype == torch.float64


def test_synthetic_real_init_records_indices():
    real_images = torch.randn(30, 3, 4, 4)
    real_text = torch.randn(30, 5)
    syn = SyntheticSet.from_real(real_images, real_text, 8, SimilarityConfig(), 0.1, torch.Generator().manual_seed(2))
    idx = syn.init_indices
    assert len(idx) == 8 and len(set(idx.tolist())) == 8
    assert torch.equal(syn.images.detach(), real_images[idx]) and torch.equal(syn.text.detach(), real_text[idx])
    assert syn.alpha_img.item() == pytest.approx(0.1) and syn.alpha_txt.item() == pytest.approx(0.1)
    again = SyntheticSet.from_real(real_images, real_text, 8, SimilarityConfig(), 0.1, torch.Generator().manual_seed(2))
    assert torch.equal(again.init_indices, idx)
    clone = SyntheticSet.from_noise(8, (3, 4, 4), 5, SimilarityConfig(), 0.5, torch.Generator().manual_seed(9))
    clone.load_state_dict(syn.state_dict())
    assert torch.equal(clone.images, syn.images) and torch.equal(clone.init_indices, idx)


def _blobs(k: int, per: int, dim: int = 12, noise: float = 0.02, seed: int = 0) -> torch.Tensor:
    """``k`` tight clusters of ``per`` rows around orthogonal directions (row r belongs to cluster r // per), the
    clusters of unequal norms (cosine k-means must not care)."""
    gen = torch.Generator().manual_seed(seed)
    centres = torch.eye(dim)[:k] * torch.arange(1, k + 1).unsqueeze(1)
    rows = centres.repeat_interleave(per, dim=0)
    return rows + noise * torch.randn(rows.shape, generator=gen) * rows.norm(dim=1, keepdim=True)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_kmeans_init_takes_one_row_of_each_cluster_and_the_phases_split_one_clustering(seed):
    from ptmst_ray.distill.synthetic import kmeans_init_indices

    text = _blobs(6, 10)
    rows = kmeans_init_indices(text, 6, 0, 6, seed)
    assert sorted((rows // 10).tolist()) == list(range(6))  # every cluster once, by construction of the data
    assert torch.equal(rows, rows.sort().values) and torch.equal(kmeans_init_indices(text, 6, 0, 6, seed), rows)
    first, second = kmeans_init_indices(text, 6, 0, 2, seed), kmeans_init_indices(text, 6, 2, 4, seed)
    assert not set(first.tolist()) & set(second.tolist())
    assert sorted(first.tolist() + second.tolist()) == rows.tolist()  # the phases' pairs are the single set's
    # each chosen row is its cluster's nearest to the cluster's mean direction (the medoid), checked by brute force
    unit = torch.nn.functional.normalize(text, dim=1)
    for r in rows.tolist():
        members = unit[r // 10 * 10:(r // 10 + 1) * 10]
        mean = torch.nn.functional.normalize(members.mean(0), dim=0)
        assert r == r // 10 * 10 + int((members @ mean).argmax())


def test_kmeans_init_clusters_a_bounded_pool_and_says_what_is_wrong():
    from ptmst_ray.distill.synthetic import kmeans_init_indices

    text = _blobs(4, 50)
    rows = kmeans_init_indices(text, 4, 0, 4, seed=5, pool=40)  # 40 of the 200 rows are clustered
    assert sorted((rows // 50).tolist()) == [0, 1, 2, 3] and len(set(rows.tolist())) == 4
    with pytest.raises(ValueError, match="at least 8 candidate rows, got 6 \\(pool 6\\)"):
        kmeans_init_indices(text, 8, 0, 8, seed=0, pool=6)
    with pytest.raises(ValueError, match="cannot initialise 300 synthetic pairs from 200 real train rows"):
        kmeans_init_indices(text, 300, 0, 300, seed=0)
    with pytest.raises(ValueError, match="rows 3..6 are not within the 4"):
        kmeans_init_indices(text, 4, 3, 3, seed=0)
    images = torch.randn(200, 3, 2, 2)
    syn = SyntheticSet.from_real(images, text, 4, SimilarityConfig(), 0.1, torch.Generator(), indices=rows)
    assert torch.equal(syn.init_indices, rows) and torch.equal(syn.images.detach(), images[rows])
    with pytest.raises(ValueError, match="3 initial rows for 4 synthetic pairs"):
        SyntheticSet.from_real(images, text, 4, SimilarityConfig(), 0.1, torch.Generator(), indices=rows[:3])


def test_synthetic_real_init_rejects_too_many_pairs():
    with pytest.raises(ValueError, match="lower the phase's pairs"):
        SyntheticSet.from_real(torch.zeros(3, 3, 2, 2), torch.zeros(3, 4), 5, SimilarityConfig(), 0.1,
                               torch.Generator())


@pytest.mark.parametrize("decay", [0.0, 0.9])
def test_ema_matches_recurrence(decay):
    gen = torch.Generator().manual_seed(3)
    xs = [{"a": torch.randn(4, generator=gen, dtype=torch.float64), "b": torch.randn((), generator=gen, dtype=torch.float64)}
          for _ in range(6)]
    ema = EMA(xs[0], decay)
    ref = {k: v.clone() for k, v in xs[0].items()}
    for x in xs[1:]:
        ema.update(x)
        ref = {k: decay * ref[k] + (1 - decay) * x[k] for k in ref}
    for k in ref:
        assert torch.allclose(ema.shadow[k], ref[k], rtol=0, atol=1e-15)
    if decay == 0.0:
        assert torch.equal(ema.shadow["a"], xs[-1]["a"])
    restored = EMA({k: torch.zeros_like(v) for k, v in xs[0].items()}, 0.5)
    restored.load_state_dict(ema.state_dict())
    assert restored.decay == decay and torch.equal(restored.shadow["a"], ema.shadow["a"])
