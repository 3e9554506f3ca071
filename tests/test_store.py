"""Trajectory and shortcut stores: round trips, completeness, concurrent writers, corruption."""

from __future__ import annotations

import uuid
from concurrent.futures import ThreadPoolExecutor

import pytest
import torch

from ptmst_ray import layout, storage
from ptmst_ray.storage import StorageError
from ptmst_ray.trajectories import store as store_mod
from ptmst_ray.trajectories.shortcut import shortcut_trajectory
from ptmst_ray.trajectories.store import ShortcutStore, TrajectoryStore, sidecar_url

HASH = "cfg0"


def trajectory(seed: int, epochs: int = 3) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    w, b, h = torch.randn(4, 3, generator=g), torch.randn(3, generator=g), torch.randn(5, 4, generator=g)
    out = []
    for e in range(epochs + 1):
        out.append({"image.conv.weight": w + e, "image.conv.bias": b * e, "head.fc.weight": h - e})
    return out


def assert_same(got, want):
    assert len(got) == len(want)
    for g, w in zip(got, want):
        assert list(g) == list(w)
        for n in w:
            assert torch.equal(g[n], w[n])


@pytest.fixture(params=["local", "memory"])
def root(request, tmp_path):
    if request.param == "local":
        yield str(tmp_path / "run")
    else:
        url = f"memory://test-store-{uuid.uuid4().hex}"
        yield url
        storage.remove(url, recursive=True)


def test_expert_round_trip(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    snaps = trajectory(7)
    side = store.write_expert(2, snaps, seed=7, config_hash=HASH)
    assert store.url(2).endswith("experts/expert_0002.safetensors")
    on_disk = storage.read_json(sidecar_url(store.url(2)))
    assert on_disk == side
    assert side["expert_id"] == 2 and side["seed"] == 7 and side["epochs"] == 3 and side["config_hash"] == HASH
    assert [p["name"] for p in side["params"]] == list(snaps[0])
    assert side["params"][0] == {"name": "image.conv.weight", "shape": [4, 3], "dtype": "float32"}
    assert side["sha256"] == storage.hash_file(store.url(2))
    assert_same(store.load_expert(2), snaps)
    assert_same([store.load_snapshot(2, e) for e in range(4)], snaps)
    with pytest.raises(IndexError):
        store.load_snapshot(2, 4)
    assert store.is_complete(2, HASH) and not store.is_complete(2, "other")
    assert store.complete_ids(HASH) == [2] and store.complete_ids("other") == []
    assert store.missing_ids(4, HASH) == [0, 1, 3]
    with pytest.raises(StorageError, match="expert_0002.safetensors.*--rebuild"):
        store.load_expert(2, config_hash="other")


def test_concurrent_writers(root):
    """Threads write ids 0..5 while four writers race on id 3 with different content."""
    store = TrajectoryStore(layout.Layout(root).experts)
    jobs = [(i, i) for i in range(6)] + [(3, 100 + j) for j in range(4)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda job: store.write_expert(job[0], trajectory(job[1]), job[1], HASH), jobs))
    assert store.complete_ids(HASH) == list(range(6))
    for i in range(6):
        snaps = store.load_expert(i, config_hash=HASH)
        seed = store.sidecar(i)["seed"]
        assert_same(snaps, trajectory(seed))
        if i != 3:
            assert seed == i
    names = storage.listdir(store.root)
    assert sorted(names) == sorted([f"expert_{i:04d}.{ext}" for i in range(6) for ext in ("safetensors", "json")])


def test_same_id_replaced_between_tensor_and_sidecar(root, monkeypatch):
    """Writer A's tensor file is replaced by writer B before A writes its sidecar: A must end consistent."""
    store = TrajectoryStore(layout.Layout(root).experts)
    real = store_mod._commit_sidecar
    calls = {"n": 0}

    def interleave(url, sidecar, data, write_id):
        calls["n"] += 1
        if calls["n"] == 1:  # writer A, before its sidecar: writer B finishes completely
            store.write_expert(0, trajectory(2), 2, HASH)
        return real(url, sidecar, data, write_id)

    monkeypatch.setattr(store_mod, "_commit_sidecar", interleave)
    store.write_expert(0, trajectory(1), 1, HASH)
    assert store.is_complete(0, HASH)
    assert store.sidecar(0)["seed"] == 2
    assert_same(store.load_expert(0), trajectory(2))


def test_partial_writes_are_not_complete(root, monkeypatch):
    store = TrajectoryStore(layout.Layout(root).experts)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.storage, "write_json", fail)  # crash after the tensors, before the sidecar
    with pytest.raises(OSError):
        store.write_expert(0, trajectory(0), 0, HASH)
    monkeypatch.undo()
    assert storage.exists(store.url(0)) and not storage.exists(sidecar_url(store.url(0)))
    assert not store.is_complete(0, HASH)
    assert store.missing_ids(2, HASH) == [0, 1]
    with pytest.raises(StorageError, match="expert_0000.safetensors: incomplete"):
        store.load_expert(0)

    monkeypatch.setattr(store_mod.safetensors.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        store.write_expert(1, trajectory(1), 1, HASH)
    monkeypatch.undo()
    assert not storage.exists(store.url(1)) and not store.is_complete(1, HASH)
    store.write_expert(0, trajectory(0), 0, HASH)  # a rerun repairs it
    assert store.complete_ids(HASH) == [0]


def test_truncated_file_is_detected(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    store.write_expert(1, trajectory(1), 1, HASH)
    data = storage.read_bytes(store.url(1))
    storage.write_bytes(store.url(1), data[: len(data) // 2])
    for call in (lambda: store.is_complete(1, HASH), lambda: store.load_expert(1), lambda: store.load_snapshot(1, 0)):
        with pytest.raises(StorageError, match=r"expert_0001\.safetensors.*ptmst-ray experts --rebuild"):
            call()


def test_same_size_corruption_is_caught_on_load(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    store.write_expert(0, trajectory(0), 0, HASH)
    data = bytearray(storage.read_bytes(store.url(0)))
    data[-1] ^= 0xFF
    storage.write_bytes(store.url(0), bytes(data))
    assert store.is_complete(0, HASH)  # the cheap check (size, write token) cannot see a flipped bit
    with pytest.raises(StorageError, match="expert_0000.safetensors: content hash"):
        store.load_expert(0)


def test_missing_tensor_file_with_sidecar(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    store.write_expert(0, trajectory(0), 0, HASH)
    storage.remove(store.url(0))
    with pytest.raises(StorageError, match="expert_0000.safetensors: tensor file missing"):
        store.is_complete(0, HASH)
    store.remove(0)
    assert store.missing_ids(1, HASH) == [0]


def test_shortcut_store(root):
    store = ShortcutStore(layout.Layout(root).shortcuts)
    for i in range(3):
        store.write(0, 6, i, shortcut_trajectory(trajectory(i, epochs=8), 0, 6), HASH)
    store.write(1, 8, 0, shortcut_trajectory(trajectory(0, epochs=8), 1, 8), config_hash=HASH)
    with pytest.raises(ValueError, match="range"):
        store.write(0, 8, 0, shortcut_trajectory(trajectory(0, epochs=8), 1, 8), HASH)
    assert store.url(0, 6, 2).endswith("shortcuts/range_0_6/expert_0002.safetensors")
    assert store.complete_ids(0, 6, HASH) == [0, 1, 2]
    assert store.complete_ids(1, 8, HASH) == [0]
    assert store.complete_ids(0, 6, "other") == []
    assert store.missing_ids(1, 8, 2, HASH) == [1]
    back = store.load(0, 6, 1)
    want = shortcut_trajectory(trajectory(1, epochs=8), 0, 6)
    assert back.start == 0 and back.num_steps == 6
    for k in range(7):
        for n, t in want.snapshot(k).items():
            assert torch.equal(back.snapshot(k)[n], t)
