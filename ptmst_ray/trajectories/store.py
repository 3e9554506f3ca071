"""Trajectory and shortcut stores: safetensors files, each with a JSON sidecar.

Why this file exists: experts are trained by independent (and retryable) actors, on machines that may be lost
mid-expert, and their trajectories are read by other machines. Each expert therefore lives in its own directory,
``expert_{id:04d}/``, an epoch a file: ``epoch_{k:04d}.safetensors`` (the snapshot after epoch k, keyed by
parameter name) next to its sidecar ``epoch_{k:04d}.json`` (expert id, epoch, seed, config hash, parameter
names/shapes/dtypes, sha256 and size of the tensor file), and an index ``trajectory.json`` (seed, config hash,
parameter table, bytes of a snapshot, and how many epochs are stored). Each file is written atomically (temporary
name, then move); an epoch's tensors first, its sidecar next, the index last, so:

* a crash mid-write leaves the index counting the epochs before it: a successor continues from there (training
  replays nothing but the data order), and an expert whose epoch 0 never landed counts as missing;
* an actor holds one snapshot at a time, not the whole trajectory, and a reader of one epoch (the phases' ablation
  without shortcuts, a shortcut's window) reads only that epoch's file, also on a bucket;
* writers of different ids never touch the same names;
* two writers of the same id (a retried actor) each move complete files into place; every
  writer then checks that the tensor file on disk is the one its sidecar describes (a write
  token in the safetensors header) and, if another writer replaced it in between, rewrites
  the sidecar from that file. The last writer to finish therefore leaves a matching pair; and the index, which
  each writer's last write sets to its last epoch, counts every epoch once they have all finished (while they
  race it may count fewer, which only makes a successor train an epoch again).

A reader trusts an expert only when its index has the config hash, every epoch it counts is there, and an epoch's
tensor file matches its sidecar (size and write token on every check, full sha256 when the tensors are loaded);
a mismatch is a :class:`~ptmst_ray.storage.StorageError` naming the file and saying how to rebuild. Expert ids are
0..E-1 from the config, never counted files.

:class:`ShortcutStore` keeps compact shortcut trajectories the same way, a file and sidecar each, under
``range_{a}_{b}/expert_{id:04d}.safetensors``.
"""

from __future__ import annotations

import collections.abc
import json
import logging
import re
import uuid
from typing import Any, Callable, Mapping, Sequence

import safetensors
import safetensors.torch
from torch import Tensor

from ptmst_ray import storage
from ptmst_ray.storage import StorageError
from ptmst_ray.trajectories.shortcut import ShortcutTrajectory, from_tensors, shortcut_sidecar, to_tensors

log = logging.getLogger(__name__)

Snapshot = dict[str, Tensor]

EXPERT_FORMAT = "ptmst-expert/2"
INDEX = "trajectory.json"
"""An expert's index, written after each epoch's files: the epochs it counts are complete."""
REBUILD_HINT = "rebuild it with `ptmst-ray experts --rebuild`"
SIDECAR_KEY = "ptmst_sidecar"
WRITE_ID_KEY = "ptmst_write_id"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_COMMIT_ROUNDS = 100
_ID_FILE = re.compile(r"^expert_(\d{4,})\.json$")
_ID_DIR = re.compile(r"^expert_(\d{4,})$")
_LEGACY_FILE = re.compile(r"^expert_\d{4,}\.(safetensors|json)$")


# --------------------------------------------------------------------------- one file + sidecar


def sidecar_url(url: str) -> str:
    """``x.safetensors`` -> ``x.json`` (anything else: ``url + '.json'``)."""
    return url[: -len(".safetensors")] + ".json" if url.endswith(".safetensors") else url + ".json"


def _parse_header(url: str, head: bytes, read_rest: Callable[[int], bytes]) -> dict[str, str]:
    size = int.from_bytes(head, "little") if len(head) == 8 else -1
    raw = read_rest(size) if 0 < size <= MAX_HEADER_BYTES else b""
    if size <= 0 or len(raw) != size:
        raise StorageError(f"{url}: not a readable safetensors file (truncated header); {REBUILD_HINT}")
    try:
        return json.loads(raw).get("__metadata__", {}) or {}
    except (json.JSONDecodeError, AttributeError, UnicodeDecodeError):
        raise StorageError(f"{url}: safetensors header is not valid JSON (corrupt); {REBUILD_HINT}") from None


def read_header_metadata(url: str) -> dict[str, str]:
    """The ``__metadata__`` of a safetensors file, reading only its header (cheap on any fsspec URL)."""
    fs, path = storage.filesystem(url)
    try:  # a concurrent writer of the same id may replace the file between the two reads: read it again
        return storage.read_whole(fs, path, url, lambda f: _parse_header(url, f.read(8), f.read))
    except FileNotFoundError:
        raise StorageError(f"{url}: tensor file missing although its sidecar exists; {REBUILD_HINT}") from None


def _metadata_of(url: str, data: bytes) -> dict[str, str]:
    return _parse_header(url, data[:8], lambda n: data[8 : 8 + n])


def _serialise(tensors: Mapping[str, Tensor], sidecar: Mapping[str, Any], write_id: str) -> bytes:
    metadata = {SIDECAR_KEY: json.dumps(sidecar, sort_keys=True), WRITE_ID_KEY: write_id}
    return safetensors.torch.save(dict(tensors), metadata=metadata)


def _commit_sidecar(url: str, sidecar: dict[str, Any], data: bytes, write_id: str) -> dict[str, Any]:
    """Write the sidecar describing ``data``; if a concurrent writer of the same file replaced it
    in between, describe the file that is on disk instead (its header carries its own sidecar).

    Each round that fails means another writer moved a file in after ours; writers are finite,
    so the loop ends once they stop (a retried actor means two writers and one extra round)."""
    for _ in range(MAX_COMMIT_ROUNDS):
        full = {**sidecar, "file": url.rsplit("/", 1)[-1], "sha256": storage.hash_bytes(data),
                "size": len(data), "write_id": write_id}
        storage.write_json(sidecar_url(url), full)
        if read_header_metadata(url).get(WRITE_ID_KEY) == write_id:
            return full
        log.info("%s was replaced by another writer of the same id; describing that file instead", url)
        data = storage.read_bytes(url)
        header = _metadata_of(url, data)
        sidecar, write_id = json.loads(header[SIDECAR_KEY]), header[WRITE_ID_KEY]
    raise StorageError(f"{url}: kept being replaced by concurrent writers; retry the stage")


def write_with_sidecar(url: str, tensors: Mapping[str, Tensor], sidecar: Mapping[str, Any]) -> dict[str, Any]:
    """Atomically write ``tensors`` (safetensors) to ``url``, then its JSON sidecar; returns the sidecar."""
    write_id = uuid.uuid4().hex
    data = _serialise(tensors, sidecar, write_id)
    storage.write_bytes(url, data)
    return _commit_sidecar(url, dict(sidecar), data, write_id)


def read_sidecar(url: str) -> dict[str, Any] | None:
    """The sidecar of tensor file ``url``, or None when the write never finished."""
    side = sidecar_url(url)
    return storage.read_json(side) if storage.exists(side) else None


def check_file(url: str, sidecar: Mapping[str, Any]) -> None:
    """Cheap consistency check of ``url`` against its sidecar: size and write token (no full read)."""
    fs, path = storage.filesystem(url)
    if not fs.exists(path):
        raise StorageError(f"{url}: tensor file missing although its sidecar exists; {REBUILD_HINT}")
    size = fs.size(path)
    if size != sidecar.get("size"):
        raise StorageError(
            f"{url}: {size} bytes but its sidecar records {sidecar.get('size')} (truncated or changed); {REBUILD_HINT}"
        )
    if read_header_metadata(url).get(WRITE_ID_KEY) != sidecar.get("write_id"):
        raise StorageError(f"{url}: does not match its sidecar {sidecar_url(url)} (write token); {REBUILD_HINT}")


def read_with_sidecar(url: str) -> tuple[dict[str, Tensor], dict[str, Any]]:
    """(tensors, sidecar) of a completed file; the sha256 is checked. Never executes code."""
    sidecar = read_sidecar(url)
    if sidecar is None:
        raise StorageError(f"{url}: incomplete (no sidecar {sidecar_url(url)}); {REBUILD_HINT}")
    if not storage.exists(url):
        raise StorageError(f"{url}: tensor file missing although its sidecar exists; {REBUILD_HINT}")
    data = storage.read_bytes(url)
    if storage.hash_bytes(data) != sidecar.get("sha256"):
        raise StorageError(
            f"{url}: content hash does not match its sidecar {sidecar_url(url)} (corrupt or truncated); {REBUILD_HINT}"
        )
    try:
        return safetensors.torch.load(data), sidecar
    except safetensors.SafetensorError as e:
        raise StorageError(f"{url}: not a readable safetensors file ({e}); {REBUILD_HINT}") from None


def save_shortcut(url: str, traj: ShortcutTrajectory, meta: Mapping[str, Any] | None = None) -> None:
    """Write ``traj``'s compact form to ``url`` (safetensors) and its JSON sidecar, both atomically."""
    write_with_sidecar(url, to_tensors(traj), shortcut_sidecar(traj, meta or {}))


def load_shortcut(url: str) -> ShortcutTrajectory:
    """Read a shortcut written by :func:`save_shortcut`; the file hash is checked against the sidecar."""
    tensors, sidecar = read_with_sidecar(url)
    names = [p["name"] for p in sidecar["params"]]
    return from_tensors(tensors, names, int(sidecar["start"]))


def _ids_in(directory: str) -> list[int]:
    return sorted(int(m.group(1)) for name in storage.listdir(directory) if (m := _ID_FILE.match(name)))


# --------------------------------------------------------------------------- experts


def _param_table(snapshot: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for n, t in snapshot.items()
    ]


class TrajectoryStore:
    """Expert trajectories under one directory (``<run root>/experts``), an epoch a file: see the module doc."""

    def __init__(self, root: str):
        self.root = root

    def dir(self, expert_id: int) -> str:
        return storage.join(self.root, f"expert_{expert_id:04d}")

    def url(self, expert_id: int, epoch: int) -> str:
        """The tensor file of one epoch's snapshot."""
        return storage.join(self.dir(expert_id), f"epoch_{epoch:04d}.safetensors")

    def index_url(self, expert_id: int) -> str:
        return storage.join(self.dir(expert_id), INDEX)

    def index(self, expert_id: int) -> dict[str, Any] | None:
        """The expert's index (seed, config hash, epochs stored, parameter table, bytes of a snapshot), or None."""
        url = self.index_url(expert_id)
        return storage.read_json(url) if storage.exists(url) else None

    def write_epoch(self, expert_id: int, epoch: int, snapshot: Mapping[str, Tensor], seed: int,
                    config_hash: str) -> dict[str, Any]:
        """Store the snapshot after epoch ``epoch`` of expert ``expert_id``, then count it in the index; returns the
        index. Epoch k > 0 follows epoch k - 1 of the same config. Epoch 0 begins a trajectory: another config's
        trajectory of this id no longer counts; one of the same config does (the same expert: its writers, e.g. a
        retried actor beside the one it replaces, write the same epochs)."""
        params = _param_table(snapshot)
        if epoch == 0:
            index = self.index(expert_id)
            if index and index.get("config_hash") != config_hash:
                storage.remove(self.index_url(expert_id))
        else:  # the previous epoch's own sidecar, not the index: a racing writer's index may count fewer for a while
            previous = read_sidecar(self.url(expert_id, epoch - 1))
            if not previous or (previous.get("config_hash"), previous.get("epoch")) != (config_hash, epoch - 1):
                raise StorageError(f"{self.url(expert_id, epoch)}: epoch {epoch} of expert {expert_id} comes after "
                                   f"epoch {epoch - 1} of the same config, which is not stored; train it from epoch 0")
            if previous["params"] != params:
                raise ValueError(f"expert {expert_id}: epoch {epoch} has other parameters than its stored epochs")
        tensors = {n: t.detach().to("cpu").contiguous() for n, t in snapshot.items()}
        write_with_sidecar(self.url(expert_id, epoch), tensors, {
            "format": EXPERT_FORMAT, "expert_id": expert_id, "epoch": epoch, "seed": seed,
            "config_hash": config_hash, "params": params})
        current = self.index(expert_id)  # another writer of this id (a retried actor) may be ahead
        ahead = int(current["epochs"]) if current and current.get("config_hash") == config_hash else -1
        index = {"format": EXPERT_FORMAT, "expert_id": expert_id, "seed": seed, "config_hash": config_hash,
                 "epochs": max(ahead, epoch), "params": params,
                 "snapshot_nbytes": sum(t.numel() * t.element_size() for t in tensors.values())}
        storage.write_json(self.index_url(expert_id), index)
        log.debug("expert %d: epoch %d written to %s", expert_id, epoch, self.url(expert_id, epoch))
        return index

    def write_expert(
        self, expert_id: int, snapshots: Sequence[Mapping[str, Tensor]], seed: int, config_hash: str
    ) -> dict[str, Any]:
        """Store snapshots of epochs 0..K of expert ``expert_id``; returns the index written."""
        if not snapshots:
            raise ValueError(f"expert {expert_id}: no snapshots to write")
        for epoch, snap in enumerate(snapshots):
            index = self.write_epoch(expert_id, epoch, snap, seed, config_hash)
        return index

    def complete_epochs(self, expert_id: int, config_hash: str) -> int:
        """The epochs of the expert's stored trajectory when its index exists with ``config_hash`` and every epoch it
        counts is there, the last one matching its sidecar; -1 for none (or an epoch 0 mid-write) or another config.
        StorageError when a counted epoch is missing or does not match its sidecar (corrupt: rebuild)."""
        index = self.index(expert_id)
        if index is None or index.get("config_hash") != config_hash:
            return -1
        if index.get("expert_id") != expert_id:
            raise StorageError(f"{self.index_url(expert_id)}: describes expert {index.get('expert_id')}; "
                               f"{REBUILD_HINT}")
        epochs = int(index["epochs"])
        names = set(storage.listdir(self.dir(expert_id)))
        lacking = [name for e in range(epochs + 1) for name in (f"epoch_{e:04d}.safetensors", f"epoch_{e:04d}.json")
                   if name not in names]
        if lacking:
            raise StorageError(f"{self.dir(expert_id)}: lacks {', '.join(lacking[:4])}"
                               f"{' ...' if len(lacking) > 4 else ''}, counted by its {INDEX}; {REBUILD_HINT}")
        self._epoch_sidecar(expert_id, epochs, index)
        return epochs

    def is_complete(self, expert_id: int, config_hash: str, epochs: int) -> bool:
        """True when the expert is stored for ``config_hash`` with at least ``epochs`` epochs
        (:meth:`complete_epochs`; an expert stores its epoch 0 before it trains, so there is no default)."""
        return self.complete_epochs(expert_id, config_hash) >= epochs

    def complete_ids(self, config_hash: str, epochs: int) -> list[int]:
        ids = sorted(int(m.group(1)) for name in storage.listdir(self.root) if (m := _ID_DIR.match(name)))
        return [i for i in ids if self.is_complete(i, config_hash, epochs)]

    def missing_ids(self, num_experts: int, config_hash: str, epochs: int) -> list[int]:
        """Ids in 0..num_experts-1 that still have to be trained (or trained further, to ``epochs``)."""
        return [i for i in range(num_experts) if not self.is_complete(i, config_hash, epochs)]

    def trajectory(self, expert_id: int, config_hash: str | None = None) -> StoredTrajectory:
        """The stored snapshots (epochs 0..K) as a sequence that reads an epoch when it is indexed (its file's
        sha256 verified), so a reader of a window or of the first and last epochs reads only those."""
        index = self.index(expert_id)
        if index is None:
            raise StorageError(f"{self.dir(expert_id)}: no complete epoch (no {INDEX}); {REBUILD_HINT}")
        if config_hash is not None and index.get("config_hash") != config_hash:
            raise StorageError(f"{self.index_url(expert_id)}: written for config {index.get('config_hash')}, "
                               f"not {config_hash}; {REBUILD_HINT}")
        return StoredTrajectory(self, expert_id, index)

    def load_expert(self, expert_id: int, config_hash: str | None = None) -> list[Snapshot]:
        """All snapshots (epochs 0..K) as CPU tensors; each file's sha256 is verified."""
        return list(self.trajectory(expert_id, config_hash))

    def load_snapshot(self, expert_id: int, epoch: int) -> Snapshot:
        """One epoch's parameters; a local file is read lazily and checked against its sidecar by size and write
        token (a repeated reader's cost), a remote one read whole and its sha256 verified."""
        index = self.index(expert_id)
        if index is None:
            raise StorageError(f"{self.dir(expert_id)}: no complete epoch (no {INDEX}); {REBUILD_HINT}")
        if not 0 <= epoch <= int(index["epochs"]):
            raise IndexError(f"{self.dir(expert_id)}: epoch {epoch} is outside 0..{index['epochs']}")
        local = storage.local_path(self.url(expert_id, epoch))
        if local is None:
            return self._load_epoch(expert_id, epoch, index)
        self._epoch_sidecar(expert_id, epoch, index)
        with safetensors.safe_open(local, framework="pt") as f:
            return {p["name"]: f.get_tensor(p["name"]) for p in index["params"]}

    def _epoch_sidecar(self, expert_id: int, epoch: int, index: Mapping[str, Any]) -> dict[str, Any]:
        """The sidecar of one counted epoch, checked to belong to the index and to match its file."""
        url = self.url(expert_id, epoch)
        sidecar = read_sidecar(url)
        if sidecar is None:
            raise StorageError(f"{url}: no sidecar {sidecar_url(url)}, though {INDEX} counts it; {REBUILD_HINT}")
        if (sidecar.get("config_hash"), sidecar.get("epoch"), sidecar.get("expert_id")) != (
                index.get("config_hash"), epoch, expert_id):
            raise StorageError(f"{sidecar_url(url)}: is epoch {sidecar.get('epoch')} of expert "
                               f"{sidecar.get('expert_id')} for config {sidecar.get('config_hash')}, not what "
                               f"{INDEX} counts; {REBUILD_HINT}")
        check_file(url, sidecar)
        return sidecar

    def _load_epoch(self, expert_id: int, epoch: int, index: Mapping[str, Any]) -> Snapshot:
        url = self.url(expert_id, epoch)
        tensors, sidecar = read_with_sidecar(url)
        if (sidecar.get("config_hash"), sidecar.get("epoch")) != (index.get("config_hash"), epoch):
            raise StorageError(f"{sidecar_url(url)}: is epoch {sidecar.get('epoch')} for config "
                               f"{sidecar.get('config_hash')}, not what {INDEX} counts; {REBUILD_HINT}")
        try:
            return {p["name"]: tensors[p["name"]] for p in index["params"]}
        except KeyError as e:
            raise StorageError(f"{url}: lacks tensor {e.args[0]} listed in {INDEX}; {REBUILD_HINT}") from None

    def legacy_files(self) -> list[str]:
        """Experts of the older one-file format (``expert_NNNN.safetensors``) in this directory: never read."""
        return [name for name in storage.listdir(self.root) if _LEGACY_FILE.match(name)]

    def remove(self, expert_id: int) -> None:
        """Forget an expert (its index first, so it never looks complete half-deleted)."""
        storage.remove(self.index_url(expert_id))
        storage.remove(self.dir(expert_id), recursive=True)


class StoredTrajectory(collections.abc.Sequence):
    """An expert's stored snapshots, epochs 0..K, read one epoch at a time when indexed (not kept)."""

    def __init__(self, store: TrajectoryStore, expert_id: int, index: Mapping[str, Any]):
        self.store, self.expert_id, self.index = store, expert_id, index

    def __len__(self) -> int:
        return int(self.index["epochs"]) + 1

    def __getitem__(self, k):
        if isinstance(k, slice):
            return [self[i] for i in range(*k.indices(len(self)))]
        if not -len(self) <= k < len(self):
            raise IndexError(f"{self.store.dir(self.expert_id)}: epoch {k} is outside 0..{len(self) - 1}")
        return self.store._load_epoch(self.expert_id, k % len(self), self.index)


# --------------------------------------------------------------------------- shortcuts


class ShortcutStore:
    """Compact shortcut trajectories under ``<run root>/shortcuts/range_{a}_{b}/``."""

    def __init__(self, root: str):
        self.root = root

    def range_dir(self, a: int, b: int) -> str:
        return storage.join(self.root, f"range_{a}_{b}")

    def url(self, a: int, b: int, expert_id: int) -> str:
        return storage.join(self.range_dir(a, b), f"expert_{expert_id:04d}.safetensors")

    def write(
        self,
        a: int,
        b: int,
        expert_id: int,
        traj: ShortcutTrajectory,
        config_hash: str,
        meta: Mapping[str, Any] | None = None,
    ) -> None:
        """Store expert ``expert_id``'s shortcut of range [a, b] (must be ``traj``'s own range)."""
        if (traj.start, traj.end) != (a, b):
            raise ValueError(f"shortcut covers [{traj.start}, {traj.end}], not the range [{a}, {b}] it is filed under")
        url = self.url(a, b, expert_id)
        save_shortcut(url, traj, {**(meta or {}), "expert_id": expert_id, "config_hash": config_hash})
        log.info("shortcut [%d, %d] of expert %d written to %s", a, b, expert_id, url)

    def load(self, a: int, b: int, expert_id: int) -> ShortcutTrajectory:
        return load_shortcut(self.url(a, b, expert_id))

    def is_complete(self, a: int, b: int, expert_id: int, config_hash: str) -> bool:
        url = self.url(a, b, expert_id)
        sidecar = read_sidecar(url)
        if sidecar is None or sidecar.get("meta", {}).get("config_hash") != config_hash:
            return False
        check_file(url, sidecar)
        return True

    def complete_ids(self, a: int, b: int, config_hash: str) -> list[int]:
        return [i for i in _ids_in(self.range_dir(a, b)) if self.is_complete(a, b, i, config_hash)]

    def missing_ids(self, a: int, b: int, num_experts: int, config_hash: str) -> list[int]:
        return [i for i in range(num_experts) if not self.is_complete(a, b, i, config_hash)]
