"""Nested state round trip through safetensors + JSON; corruption is detected."""

from __future__ import annotations

import pytest
import torch

from ptmst_ray import storage, tensorio


def test_round_trip_preserves_structure_dtypes_and_bits(tmp_path):
    gen = torch.Generator().manual_seed(3)
    state = {
        "x": torch.randn(3, 4, dtype=torch.float64),
        "opt": {"state": {0: {"momentum_buffer": torch.ones(2)}}, "param_groups": [{"lr": 0.1, "params": [0]}]},
        "rng": gen.get_state(),
        "it": 7, "name": "p0", "none": None, "pair": (1, torch.arange(3)),
    }
    tensorio.save_state(str(tmp_path / "ck"), state, meta={"phase": 0})
    back, meta = tensorio.load_state(str(tmp_path / "ck"))
    assert meta == {"phase": 0}
    assert torch.equal(back["x"], state["x"]) and back["x"].dtype == torch.float64
    assert back["opt"]["state"][0]["momentum_buffer"].tolist() == [1.0, 1.0]
    assert back["opt"]["param_groups"][0]["lr"] == 0.1 and back["it"] == 7 and back["none"] is None
    assert isinstance(back["pair"], tuple) and torch.equal(back["pair"][1], torch.arange(3))
    g2 = torch.Generator()
    g2.set_state(back["rng"])
    assert torch.equal(torch.rand(4, generator=g2), torch.rand(4, generator=gen))


def test_rejects_unstorable_objects(tmp_path):
    with pytest.raises(TypeError, match="object"):
        tensorio.save_state(str(tmp_path / "ck"), {"bad": object()})


def test_corruption_detected(tmp_path):
    d = str(tmp_path / "ck")
    tensorio.save_state(d, {"x": torch.zeros(10)})
    blob = storage.read_bytes(storage.join(d, tensorio.TENSORS))
    storage.write_bytes(storage.join(d, tensorio.TENSORS), blob[:-8])
    with pytest.raises(storage.StorageError, match="corrupt"):
        tensorio.load_state(d)


def test_load_scalars_reads_the_json_values_without_the_tensor_file(tmp_path):
    d = str(tmp_path / "ck")
    tensorio.save_state(d, {"iteration": 40, "x": torch.ones(3), "opt": [{"lr": 0.5}, torch.zeros(1)]})
    storage.remove(storage.join(d, tensorio.TENSORS))  # not needed: only the skeleton is read
    assert tensorio.load_scalars(d) == {"iteration": 40, "x": None, "opt": [{"lr": 0.5}, None]}
