"""Shortcut trajectories against the formula of docs/method.md#shortcut-trajectories, computed independently here."""

from __future__ import annotations

import math
import uuid

import pytest
import torch

from ptmst_ray import storage
from ptmst_ray.storage import StorageError
from ptmst_ray.trajectories.shortcut import (
    RawTrajectory,
    raw_trajectory,
    shortcut_trajectory,
    storage_figures,
)
from ptmst_ray.trajectories.store import load_shortcut, save_shortcut
from ptmst_ray.trajectories.store import sidecar_url

SHAPES = {"image.w": (4, 3), "image.b": (5,), "head.w": (3, 3), "head.frozen": (2, 2)}


def random_trajectory(epochs: int = 6, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A noisy random walk per tensor; "head.frozen" never moves (zero-motion tensor)."""
    g = torch.Generator().manual_seed(seed)
    current = {n: torch.randn(s, generator=g) for n, s in SHAPES.items()}
    snaps = [{n: t.clone() for n, t in current.items()}]
    for _ in range(epochs):
        for n, t in current.items():
            if n != "head.frozen":
                t.add_(torch.randn(t.shape, generator=g) * torch.rand(1, generator=g))
        snaps.append({n: t.clone() for n, t in current.items()})
    return snaps


def reference_betas(snaps, start: int, end: int, name: str) -> list[float]:
    """beta_l(k) with explicit loops over steps and elements (float64 Python arithmetic)."""
    dists = []
    for p in range(start, end):
        x, y = snaps[p + 1][name].flatten().tolist(), snaps[p][name].flatten().tolist()
        dists.append(math.sqrt(sum((u - v) ** 2 for u, v in zip(x, y))))
    total = sum(dists)
    betas, running = [0.0], 0.0
    for d in dists:
        running += d
        betas.append(running / total if total > 0 else 0.0)
    return betas


def reference_snapshot(snaps, start: int, end: int, k: int) -> dict[str, torch.Tensor]:
    out = {}
    for name in SHAPES:
        beta = reference_betas(snaps, start, end, name)[k]
        a, b = snaps[start][name].flatten().tolist(), snaps[end][name].flatten().tolist()
        vals = [(1 - beta) * u + beta * v for u, v in zip(a, b)]
        out[name] = torch.tensor(vals, dtype=torch.float64).reshape(SHAPES[name])
    return out


@pytest.mark.parametrize("start,end", [(0, 6), (1, 5), (2, 3)])
def test_snapshots_match_formula(start, end):
    snaps = random_trajectory()
    traj = shortcut_trajectory(snaps, start, end)
    assert traj.num_steps == end - start and traj.start == start and traj.end == end
    for k in range(end - start + 1):
        got, want = traj.snapshot(k), reference_snapshot(snaps, start, end, k)
        for name in SHAPES:
            assert got[name].dtype == torch.float32
            torch.testing.assert_close(got[name].double(), want[name], rtol=1e-6, atol=1e-6)
    for name in SHAPES:
        ref = torch.tensor(reference_betas(snaps, start, end, name), dtype=torch.float64)
        torch.testing.assert_close(traj.beta[name], ref, rtol=1e-12, atol=1e-12)


def test_endpoints_exact_and_beta_monotone():
    snaps = random_trajectory()
    traj = shortcut_trajectory(snaps, 1, 5)
    for name in SHAPES:
        assert torch.equal(traj.snapshot(0)[name], snaps[1][name])
        assert torch.equal(traj.snapshot(4)[name], snaps[5][name])
        beta = traj.beta[name]
        assert beta.shape == (5,) and beta[0] == 0
        assert torch.all(beta[1:] >= beta[:-1])
    for name in ("image.w", "image.b", "head.w"):
        assert traj.beta[name][-1] == 1.0


def test_zero_motion_tensor_has_no_nan():
    traj = shortcut_trajectory(random_trajectory(), 0, 6)
    assert torch.equal(traj.beta["head.frozen"], torch.zeros(7, dtype=torch.float64))
    for k in range(7):
        snap = traj.snapshot(k)
        assert all(torch.isfinite(t).all() for t in snap.values())
        assert torch.equal(snap["head.frozen"], traj.theta_a["head.frozen"])


def test_straight_monotone_path_is_its_own_shortcut():
    """A trajectory already on a straight line (any pace per tensor) is unchanged by the shortcut."""
    a, b = torch.randn(3, 4), torch.randn(3, 4)
    pace = [0.0, 0.1, 0.15, 0.6, 1.0]
    snaps = [{"image.w": a + s * (b - a), "head.w": a * (1 - s**2) + b * s**2} for s in pace]
    traj = shortcut_trajectory(snaps, 0, 4)
    for k in range(5):
        for name in ("image.w", "head.w"):
            torch.testing.assert_close(traj.snapshot(k)[name], snaps[k][name], rtol=1e-5, atol=1e-5)


def test_index_and_range_errors():
    snaps = random_trajectory()
    traj = shortcut_trajectory(snaps, 1, 5)
    for bad in (-1, 5):
        with pytest.raises(IndexError, match="relative to the range start"):
            traj.snapshot(bad)
    for start, end in ((3, 3), (5, 2), (0, 7), (-1, 2)):
        with pytest.raises(ValueError, match="range"):
            shortcut_trajectory(snaps, start, end)
    broken = [dict(s) for s in snaps]
    broken[3] = {**broken[3], "image.w": torch.zeros(2, 2)}
    with pytest.raises(ValueError, match="image.w"):
        shortcut_trajectory(broken, 0, 6)


def test_nbytes_compact_vs_materialised():
    snaps = random_trajectory()
    traj = shortcut_trajectory(snaps, 0, 6)
    p = sum(math.prod(s) for s in SHAPES.values())
    assert traj.materialised_nbytes == 7 * p * 4
    assert traj.nbytes == 2 * p * 4 + 7 * len(SHAPES) * 8
    materialised = traj.materialise()
    assert len(materialised) == 7
    assert sum(t.numel() * t.element_size() for s in materialised for t in s.values()) == traj.materialised_nbytes
    for k, snap in enumerate(materialised):
        for name in SHAPES:
            assert torch.equal(snap[name], traj.snapshot(k)[name])


def test_raw_trajectory_same_interface():
    snaps = random_trajectory()
    raw = raw_trajectory(snaps, 2, 5)
    assert isinstance(raw, RawTrajectory) and raw.num_steps == 3 and raw.end == 5
    for k in range(4):
        for name in SHAPES:
            assert torch.equal(raw.snapshot(k)[name], snaps[2 + k][name])
    with pytest.raises(IndexError):
        raw.snapshot(4)
    assert raw.nbytes == raw.materialised_nbytes == 4 * sum(math.prod(s) for s in SHAPES.values()) * 4


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path)
    else:
        url = f"memory://test-shortcut-{uuid.uuid4().hex}"
        yield url
        storage.remove(url, recursive=True)


def test_save_load_round_trip(root):
    snaps = random_trajectory()
    traj = shortcut_trajectory(snaps, 1, 5)
    url = storage.join(root, "range_1_5", "expert_0003.safetensors")
    save_shortcut(url, traj, {"expert_id": 3})
    side = storage.read_json(sidecar_url(url))
    assert side["meta"]["expert_id"] == 3 and side["start"] == 1 and side["end"] == 5
    assert side["sha256"] == storage.hash_file(url)
    back = load_shortcut(url)
    assert back.start == 1 and back.num_steps == 4 and list(back.theta_a) == list(traj.theta_a)
    for name in SHAPES:
        assert torch.equal(back.beta[name], traj.beta[name])
        for k in range(5):
            assert torch.equal(back.snapshot(k)[name], traj.snapshot(k)[name])


def test_load_detects_corruption(root):
    traj = shortcut_trajectory(random_trajectory(), 0, 3)
    url = storage.join(root, "s.safetensors")
    save_shortcut(url, traj, {})
    storage.write_bytes(url, storage.read_bytes(url)[:-10])
    with pytest.raises(StorageError, match="s.safetensors"):
        load_shortcut(url)
    storage.remove(sidecar_url(url))
    with pytest.raises(StorageError, match="incomplete"):
        load_shortcut(url)


def test_storage_figures():
    fig = storage_figures(1000, [(0, 6), (0, 8)], num_experts=20, num_tensors=10)
    r0, r1 = fig["ranges"]
    assert r0["materialised_bytes_per_expert"] == 7 * 1000 * 4
    assert r0["compact_bytes_per_expert"] == 2 * 1000 * 4 + 7 * 10 * 8
    assert r1["materialised_bytes"] == 20 * 9 * 1000 * 4
    assert r1["ratio"] == pytest.approx(9 * 4000 / (8000 + 9 * 80))
    assert fig["compact_bytes"] == r0["compact_bytes"] + r1["compact_bytes"]
