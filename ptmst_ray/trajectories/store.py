"""Trajectory and shortcut stores: one safetensors file per expert, plus a JSON sidecar.

Why this file exists: experts are trained by independent (and retryable) actors and their
trajectories are read by other machines. Each expert therefore lives in its own file,
``expert_{id:04d}.safetensors`` (keys ``e{epoch:03d}/{param name}``), next to a sidecar
``expert_{id:04d}.json`` (id, seed, epochs, parameter names/shapes/dtypes, config hash,
sha256 and size of the tensor file). Both are written atomically (temporary name, then
move) and the sidecar LAST, so:

* a crash mid-write leaves no sidecar, and the expert counts as missing (it is redone);
* writers of different ids never touch the same names;
* two writers of the same id (a retried actor) each move complete files into place; every
  writer then checks that the tensor file on disk is the one its sidecar describes (a write
  token in the safetensors header) and, if another writer replaced it in between, rewrites
  the sidecar from that file. The last writer to finish therefore leaves a matching pair.

A reader trusts an expert only when its sidecar exists, the config hash matches and the
tensor file matches the sidecar (size and write token on every check, full sha256 when the
tensors are loaded); a mismatch is a :class:`~ptmst_ray.storage.StorageError` naming the
file and saying how to rebuild. Expert ids are 0..E-1 from the config, never counted files.

:class:`ShortcutStore` keeps compact shortcut trajectories the same way under
``range_{a}_{b}/expert_{id:04d}.safetensors``.
"""

from __future__ import annotations

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

EXPERT_FORMAT = "ptmst-expert/1"
REBUILD_HINT = "rebuild it with `ptmst-ray experts --rebuild`"
SIDECAR_KEY = "ptmst_sidecar"
WRITE_ID_KEY = "ptmst_write_id"
MAX_HEADER_BYTES = 100 * 1024 * 1024
MAX_COMMIT_ROUNDS = 100
_ID_FILE = re.compile(r"^expert_(\d{4,})\.json$")


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
    try:
        with fs.open(path, "rb") as f:
            return _parse_header(url, f.read(8), f.read)
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


def _snapshot_key(epoch: int, name: str) -> str:
    return f"e{epoch:03d}/{name}"


def _param_table(snapshot: Mapping[str, Tensor]) -> list[dict[str, Any]]:
    return [
        {"name": n, "shape": list(t.shape), "dtype": str(t.dtype).removeprefix("torch.")}
        for n, t in snapshot.items()
    ]


def _flatten_snapshots(snapshots: Sequence[Mapping[str, Tensor]]) -> dict[str, Tensor]:
    names = list(snapshots[0])
    out = {}
    for epoch, snap in enumerate(snapshots):
        if list(snap) != names:
            raise ValueError(f"snapshot {epoch} has different parameter names than snapshot 0")
        for name, t in snap.items():
            out[_snapshot_key(epoch, name)] = t.detach().to("cpu").contiguous()
    return out


class TrajectoryStore:
    """Expert trajectories under one directory (``<run root>/experts``): see the module doc."""

    def __init__(self, root: str):
        self.root = root

    def url(self, expert_id: int) -> str:
        return storage.join(self.root, f"expert_{expert_id:04d}.safetensors")

    def sidecar(self, expert_id: int) -> dict[str, Any] | None:
        return read_sidecar(self.url(expert_id))

    def write_expert(
        self, expert_id: int, snapshots: Sequence[Mapping[str, Tensor]], seed: int, config_hash: str
    ) -> dict[str, Any]:
        """Store snapshots of epochs 0..K of expert ``expert_id``; returns the sidecar written."""
        if not snapshots:
            raise ValueError(f"expert {expert_id}: no snapshots to write")
        tensors = _flatten_snapshots(snapshots)
        sidecar = {
            "format": EXPERT_FORMAT,
            "expert_id": expert_id,
            "seed": seed,
            "epochs": len(snapshots) - 1,
            "params": _param_table(snapshots[0]),
            "config_hash": config_hash,
            "nbytes": sum(t.numel() * t.element_size() for t in tensors.values()),
        }
        out = write_with_sidecar(self.url(expert_id), tensors, sidecar)
        log.info("expert %d: %d snapshots written to %s", expert_id, len(snapshots), self.url(expert_id))
        return out

    def complete_epochs(self, expert_id: int, config_hash: str) -> int:
        """The epochs of the expert's stored trajectory when its sidecar exists with ``config_hash`` and matches its
        tensor file; -1 for a missing or partial write (no sidecar) or another config. StorageError when the sidecar
        exists but the tensor file does not match it (corrupt: rebuild)."""
        url = self.url(expert_id)
        sidecar = read_sidecar(url)
        if sidecar is None or sidecar.get("config_hash") != config_hash:
            return -1
        if sidecar.get("expert_id") != expert_id:
            raise StorageError(f"{sidecar_url(url)}: describes expert {sidecar.get('expert_id')}; {REBUILD_HINT}")
        check_file(url, sidecar)
        return int(sidecar.get("epochs", -1))

    def is_complete(self, expert_id: int, config_hash: str, epochs: int = 0) -> bool:
        """True when the expert is stored for ``config_hash`` with at least ``epochs`` epochs
        (:meth:`complete_epochs`)."""
        return self.complete_epochs(expert_id, config_hash) >= epochs

    def complete_ids(self, config_hash: str, epochs: int = 0) -> list[int]:
        return [i for i in _ids_in(self.root) if self.is_complete(i, config_hash, epochs)]

    def missing_ids(self, num_experts: int, config_hash: str, epochs: int = 0) -> list[int]:
        """Ids in 0..num_experts-1 that still have to be trained (or trained further, to ``epochs``)."""
        return [i for i in range(num_experts) if not self.is_complete(i, config_hash, epochs)]

    def load_expert(self, expert_id: int, config_hash: str | None = None) -> list[Snapshot]:
        """All snapshots (epochs 0..K) as CPU tensors; the file's sha256 is verified."""
        url = self.url(expert_id)
        tensors, sidecar = read_with_sidecar(url)
        self._check_config(url, sidecar, config_hash)
        names = [p["name"] for p in sidecar["params"]]
        try:
            return [{n: tensors[_snapshot_key(e, n)] for n in names} for e in range(sidecar["epochs"] + 1)]
        except KeyError as e:
            raise StorageError(f"{url}: lacks tensor {e.args[0]} listed in its sidecar; {REBUILD_HINT}") from None

    def load_snapshot(self, expert_id: int, epoch: int) -> Snapshot:
        """One epoch's parameters; local files are read lazily (only that epoch's tensors)."""
        url = self.url(expert_id)
        sidecar = read_sidecar(url)
        if sidecar is None:
            raise StorageError(f"{url}: incomplete (no sidecar); {REBUILD_HINT}")
        if not 0 <= epoch <= sidecar["epochs"]:
            raise IndexError(f"{url}: epoch {epoch} is outside 0..{sidecar['epochs']}")
        names = [p["name"] for p in sidecar["params"]]
        local = storage.local_path(url)
        if local is None:
            return self.load_expert(expert_id)[epoch]
        check_file(url, sidecar)
        with safetensors.safe_open(local, framework="pt") as f:
            return {n: f.get_tensor(_snapshot_key(epoch, n)) for n in names}

    def remove(self, expert_id: int) -> None:
        """Forget an expert (sidecar first, so it never looks complete half-deleted)."""
        storage.remove(sidecar_url(self.url(expert_id)))
        storage.remove(self.url(expert_id))

    @staticmethod
    def _check_config(url: str, sidecar: Mapping[str, Any], config_hash: str | None) -> None:
        if config_hash is not None and sidecar.get("config_hash") != config_hash:
            raise StorageError(
                f"{url}: written for config {sidecar.get('config_hash')}, not {config_hash}; {REBUILD_HINT}"
            )


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
