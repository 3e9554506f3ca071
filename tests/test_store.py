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
    index = store.write_expert(2, snaps, seed=7, config_hash=HASH)
    assert store.url(2, 3).endswith("experts/expert_0002/epoch_0003.safetensors")
    assert storage.read_json(store.index_url(2)) == index == store.index(2)
    assert index["expert_id"] == 2 and index["seed"] == 7 and index["epochs"] == 3 and index["config_hash"] == HASH
    assert [p["name"] for p in index["params"]] == list(snaps[0])
    assert index["params"][0] == {"name": "image.conv.weight", "shape": [4, 3], "dtype": "float32"}
    assert index["snapshot_nbytes"] == sum(t.numel() * 4 for t in snaps[0].values())
    for e in range(4):  # an epoch a file, each described by its own sidecar
        side = storage.read_json(sidecar_url(store.url(2, e)))
        assert (side["epoch"], side["expert_id"], side["seed"], side["config_hash"]) == (e, 2, 7, HASH)
        assert side["sha256"] == storage.hash_file(store.url(2, e))
    assert_same(store.load_expert(2), snaps)
    assert_same([store.load_snapshot(2, e) for e in range(4)], snaps)
    lazy = store.trajectory(2, HASH)
    assert len(lazy) == 4
    assert_same([lazy[-1], lazy[0]] + lazy[1:3], [snaps[3], snaps[0], snaps[1], snaps[2]])
    for bad in (lambda: store.load_snapshot(2, 4), lambda: lazy[4], lambda: lazy[-5]):
        with pytest.raises(IndexError):
            bad()
    assert store.is_complete(2, HASH, 0) and not store.is_complete(2, "other", 0)
    assert store.is_complete(2, HASH, 3) and not store.is_complete(2, HASH, 4)
    assert store.complete_epochs(2, HASH) == 3 and store.complete_epochs(2, "other") == -1
    assert store.complete_ids(HASH, 3) == [2] and store.complete_ids("other", 0) == []
    assert store.missing_ids(4, HASH, 3) == [0, 1, 3]
    with pytest.raises(StorageError, match="expert_0002/trajectory.json.*--rebuild"):
        store.load_expert(2, config_hash="other")


def test_an_expert_is_stored_epoch_by_epoch_and_a_cut_trajectory_counts_its_stored_epochs(root):
    """Epoch k follows epoch k - 1 of the same config; the index counts each epoch once its files are in place, so a
    training cut short leaves the epochs before the cut, and epoch 0 begins a new trajectory of that id."""
    store = TrajectoryStore(layout.Layout(root).experts)
    snaps = trajectory(3)
    for e in range(2):
        store.write_epoch(0, e, snaps[e], seed=3, config_hash=HASH)
        assert store.complete_epochs(0, HASH) == e
    with pytest.raises(StorageError, match="epoch_0003.safetensors: epoch 3 of expert 0 comes after epoch 2"):
        store.write_epoch(0, 3, snaps[3], seed=3, config_hash=HASH)
    with pytest.raises(StorageError, match="epoch 2 of expert 0 comes after epoch 1 of the same config"):
        store.write_epoch(0, 2, snaps[2], seed=3, config_hash="other")
    with pytest.raises(ValueError, match="other parameters"):
        store.write_epoch(0, 2, {"w": torch.zeros(2)}, seed=3, config_hash=HASH)
    assert store.complete_epochs(0, HASH) == 1
    assert_same(store.load_expert(0, HASH), snaps[:2])
    for e in range(2, 4):
        store.write_epoch(0, e, snaps[e], seed=3, config_hash=HASH)
    assert store.complete_epochs(0, HASH) == 3 and store.missing_ids(1, HASH, 3) == []
    assert_same(store.load_expert(0, HASH), snaps)
    other = trajectory(9, epochs=1)  # another config's trajectory of this id: its epoch 0 begins it
    store.write_epoch(0, 0, other[0], seed=9, config_hash="other")
    assert store.complete_epochs(0, HASH) == -1 and store.complete_epochs(0, "other") == 0
    store.write_epoch(0, 1, other[1], seed=9, config_hash="other")
    assert_same(store.load_expert(0, "other"), other)  # the older config's later epochs are not counted
    with pytest.raises(IndexError):
        store.load_snapshot(0, 2)


def test_concurrent_writers(root):
    """Threads write ids 0..5 while four writers race on id 3 with different content."""
    store = TrajectoryStore(layout.Layout(root).experts)
    jobs = [(i, i) for i in range(6)] + [(3, 100 + j) for j in range(4)]
    with ThreadPoolExecutor(max_workers=8) as pool:
        list(pool.map(lambda job: store.write_expert(job[0], trajectory(job[1]), job[1], HASH), jobs))
    assert store.complete_ids(HASH, 3) == list(range(6))
    for i in range(6):
        snaps = store.load_expert(i, config_hash=HASH)  # every epoch's file matches its sidecar
        if i != 3:
            assert_same(snaps, trajectory(i))
        else:  # each epoch one writer's: a retried actor writes the same content, so the mix is one trajectory
            for e, snap in enumerate(snaps):
                assert any(torch.equal(snap["head.fc.weight"], trajectory(seed)[e]["head.fc.weight"])
                           for seed in (3, 100, 101, 102, 103))
    assert storage.listdir(store.root) == [f"expert_{i:04d}" for i in range(6)]
    assert storage.listdir(store.dir(3)) == sorted(
        [f"epoch_{e:04d}.{ext}" for e in range(4) for ext in ("safetensors", "json")] + ["trajectory.json"])


def test_same_id_replaced_between_tensor_and_sidecar(root, monkeypatch):
    """Writer A's tensor file of epoch 0 is replaced by writer B, which writes the whole expert, before A writes that
    epoch's sidecar: A's sidecar describes the file on disk, and the expert ends complete and loadable."""
    store = TrajectoryStore(layout.Layout(root).experts)
    real = store_mod._commit_sidecar
    calls = {"n": 0}

    def interleave(url, sidecar, data, write_id):
        calls["n"] += 1
        if calls["n"] == 1:  # writer A, before its first sidecar: writer B finishes completely
            store.write_expert(0, trajectory(2), 2, HASH)
        return real(url, sidecar, data, write_id)

    monkeypatch.setattr(store_mod, "_commit_sidecar", interleave)
    store.write_expert(0, trajectory(1), 1, HASH)
    assert store.is_complete(0, HASH, 3)
    assert storage.read_json(sidecar_url(store.url(0, 0)))["seed"] == 2  # B's file, described as B's
    assert_same(store.load_expert(0), trajectory(2)[:1] + trajectory(1)[1:])


def test_partial_writes_are_not_complete(root, monkeypatch):
    store = TrajectoryStore(layout.Layout(root).experts)

    def fail(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(store_mod.storage, "write_json", fail)  # crash after the tensors, before the sidecar
    with pytest.raises(OSError):
        store.write_expert(0, trajectory(0), 0, HASH)
    monkeypatch.undo()
    assert storage.exists(store.url(0, 0)) and not storage.exists(sidecar_url(store.url(0, 0)))
    assert not store.is_complete(0, HASH, 0)
    assert store.missing_ids(2, HASH, 0) == [0, 1]
    with pytest.raises(StorageError, match="expert_0000: no complete epoch"):
        store.load_expert(0)

    monkeypatch.setattr(store_mod.safetensors.torch, "save", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError):
        store.write_expert(1, trajectory(1), 1, HASH)
    monkeypatch.undo()
    assert not storage.exists(store.url(1, 0)) and not store.is_complete(1, HASH, 0)
    store.write_expert(0, trajectory(0), 0, HASH)  # a rerun repairs it
    assert store.complete_ids(HASH, 3) == [0]

    snaps, real = trajectory(1), store_mod.write_with_sidecar  # a crash while epoch 2 is written: epochs 0, 1 count

    def killed_at_2(url, *args):
        if "epoch_0002" in url:
            raise OSError("killed")
        return real(url, *args)
    monkeypatch.setattr(store_mod, "write_with_sidecar", killed_at_2)
    with pytest.raises(OSError):
        store.write_expert(1, snaps, 1, HASH)
    monkeypatch.undo()
    assert store.complete_epochs(1, HASH) == 1 and store.missing_ids(2, HASH, 3) == [1]


def test_truncated_file_is_detected(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    store.write_expert(1, trajectory(1), 1, HASH)
    for e in (3, 0):  # the last epoch (checked by every completeness check), then the first (when read)
        data = storage.read_bytes(store.url(1, e))
        storage.write_bytes(store.url(1, e), data[: len(data) // 2])
        calls = [lambda: store.load_expert(1), lambda: store.load_snapshot(1, e), lambda: store.trajectory(1)[e]]
        for call in calls + ([lambda: store.is_complete(1, HASH, 3)] if e == 3 else []):
            with pytest.raises(StorageError, match=rf"expert_0001/epoch_000{e}\.safetensors.*experts --rebuild"):
                call()


def test_same_size_corruption_is_caught_on_load(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    store.write_expert(0, trajectory(0), 0, HASH)
    data = bytearray(storage.read_bytes(store.url(0, 2)))
    data[-1] ^= 0xFF
    storage.write_bytes(store.url(0, 2), bytes(data))
    assert store.is_complete(0, HASH, 3)  # the cheap check (size, write token) cannot see a flipped bit
    with pytest.raises(StorageError, match="expert_0000/epoch_0002.safetensors: content hash"):
        store.load_expert(0)


def test_missing_epoch_files_with_an_index(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    store.write_expert(0, trajectory(0), 0, HASH)
    storage.remove(store.url(0, 3))
    with pytest.raises(StorageError, match="expert_0000: lacks epoch_0003.safetensors, counted by its trajectory"):
        store.is_complete(0, HASH, 3)
    with pytest.raises(StorageError, match="expert_0000/epoch_0003.safetensors: tensor file missing"):
        store.load_snapshot(0, 3)
    storage.remove(sidecar_url(store.url(0, 1)))
    with pytest.raises(StorageError, match="expert_0000: lacks epoch_0001.json, epoch_0003.safetensors, counted by "
                                           "its trajectory.json.*--rebuild"):
        store.is_complete(0, HASH, 3)
    store.remove(0)
    assert store.missing_ids(1, HASH, 0) == [0] and not storage.exists(store.dir(0))


def test_experts_of_the_older_one_file_format_are_named_and_not_read(root):
    store = TrajectoryStore(layout.Layout(root).experts)
    storage.write_json(storage.join(store.root, "expert_0000.json"), {"format": "ptmst-expert/1", "epochs": 3})
    storage.write_bytes(storage.join(store.root, "expert_0000.safetensors"), b"old")
    assert store.legacy_files() == ["expert_0000.json", "expert_0000.safetensors"]
    assert store.missing_ids(1, HASH, 0) == [0] and store.complete_ids(HASH, 0) == []


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
