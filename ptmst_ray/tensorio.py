"""Nested state (dicts/lists of tensors and JSON scalars) to safetensors + JSON, never pickle.

Why this file exists: phase checkpoints hold synthetic data, EMA copies, optimiser state and
RNG states. They must resume bit for bit, live on any fsspec URL or in a Ray Train checkpoint
directory, and loading them must never execute code. Tensors go to one safetensors file,
everything else to a JSON skeleton that points at the tensor keys.

torch is imported where tensors are written or read, not with the module: a phase's launcher reads checkpoints'
scalars (:func:`load_scalars`) without it.
"""

from __future__ import annotations

from collections import defaultdict
from typing import TYPE_CHECKING, Any

from ptmst_ray import storage

if TYPE_CHECKING:
    import torch

TENSORS = "state.safetensors"
SKELETON = "state.json"
_REF = "__tensor__"


def _split(obj: Any, path: str, tensors: dict[str, torch.Tensor], tensor_type: type) -> Any:
    if isinstance(obj, tensor_type):
        key = path or "root"
        tensors[key] = obj.detach().cpu().contiguous()
        return {_REF: key}
    if isinstance(obj, dict):
        for k in obj:
            if not isinstance(k, (str, int)):
                raise TypeError(f"state key {k!r} at {path or 'root'} must be str or int")
        return {"__dict__": [[k, _split(v, f"{path}/{k}", tensors, tensor_type)] for k, v in obj.items()]}
    if isinstance(obj, (list, tuple)):
        return {"__list__": [_split(v, f"{path}/{i}", tensors, tensor_type) for i, v in enumerate(obj)],
                "tuple": isinstance(obj, tuple)}
    if obj is None or isinstance(obj, (bool, int, float, str)):
        return obj
    raise TypeError(f"cannot store {type(obj).__name__} at {path or 'root'} (tensors and JSON values only)")


def _join(skel: Any, tensors: dict[str, torch.Tensor]) -> Any:
    if isinstance(skel, dict):
        if _REF in skel:
            return tensors[skel[_REF]]
        if "__dict__" in skel:
            return {k: _join(v, tensors) for k, v in skel["__dict__"]}
        if "__list__" in skel:
            items = [_join(v, tensors) for v in skel["__list__"]]
            return tuple(items) if skel.get("tuple") else items
    return skel


def dumps(state: Any) -> tuple[bytes, dict]:
    import torch
    from safetensors.torch import save as st_save

    tensors: dict[str, torch.Tensor] = {}
    skeleton = _split(state, "", tensors, torch.Tensor)
    return st_save(tensors) if tensors else st_save({"__empty__": torch.zeros(0)}), skeleton


def save_state(directory: str, state: Any, meta: dict | None = None) -> None:
    """Write ``state`` under ``directory`` (tensors first, JSON skeleton last, both atomic)."""
    blob, skeleton = dumps(state)
    storage.write_bytes(storage.join(directory, TENSORS), blob)
    storage.write_json(storage.join(directory, SKELETON),
                       {"skeleton": skeleton, "meta": meta or {}, "sha256": storage.hash_bytes(blob)})


def load_state(directory: str) -> tuple[Any, dict]:
    """(state, meta) written by :func:`save_state`; the tensor file's hash is checked first."""
    from safetensors.torch import load as st_load

    info = storage.read_json(storage.join(directory, SKELETON))
    blob = storage.read_bytes(storage.join(directory, TENSORS))
    if storage.hash_bytes(blob) != info["sha256"]:
        raise storage.StorageError(
            f"{storage.join(directory, TENSORS)}: content hash does not match {SKELETON} (corrupt); "
            "delete the directory to redo this step"
        )
    return _join(info["skeleton"], st_load(blob)), info.get("meta", {})


def load_scalars(directory: str) -> Any:
    """The state written by :func:`save_state` with every tensor as None: reads the JSON skeleton
    only (no tensor file, no hash check), for cheap looks at scalars such as ``iteration``."""
    info = storage.read_json(storage.join(directory, SKELETON))
    return _join(info["skeleton"], defaultdict(lambda: None))
