"""Caption-embedding cache: only missing captions are encoded, a new encoder key recomputes."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from ptmst_ray import storage
from ptmst_ray.data import text_cache
from ptmst_ray.data.annotations import read_split
from ptmst_ray.data.text_cache import embed_captions
from ptmst_ray.layout import Layout


class FakeEncoder:
    """Hashes characters into a vector; counts what it is asked to encode."""

    def __init__(self, key: str = "fake-1", dim: int = 8):
        self.key, self.dim = key, dim
        self.encoded: list[str] = []
        self.calls = 0

    def encode(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        self.calls += 1
        self.encoded.extend(captions)
        out = torch.zeros(len(captions), self.dim)
        for i, c in enumerate(captions):
            for ch in c:
                out[i, ord(ch) % self.dim] += 1.0
            out[i, 0] += int(hashlib.sha256((self.key + c).encode()).hexdigest()[:4], 16) / 65536
        return out

    def reference(self, captions: list[str]) -> torch.Tensor:
        calls, enc = self.calls, list(self.encoded)
        out = self.encode(captions)
        self.calls, self.encoded = calls, enc
        return out


def test_cache_reuse_and_partial(tmp_path):
    root = Layout(str(tmp_path)).text_cache
    enc = FakeEncoder()
    caps = ["a red circle", "a blue square", "a red circle", "a green star"]
    e1 = embed_captions(caps, enc, root, batch_size=2)
    assert e1.shape == (4, 8) and e1.dtype == torch.float32
    assert torch.equal(e1, enc.reference(caps))
    assert sorted(enc.encoded) == sorted(set(caps))  # duplicates encoded once
    assert enc.calls == 2

    enc2 = FakeEncoder()
    e2 = embed_captions(list(reversed(caps)), enc2, root)
    assert enc2.calls == 0 and torch.equal(e2, e1.flip(0))

    enc3 = FakeEncoder()
    e3 = embed_captions(caps + ["a new one"], enc3, root)
    assert enc3.encoded == ["a new one"] and torch.equal(e3[:4], e1)


def test_new_key_recomputes_in_new_folder(tmp_path):
    root = Layout(str(tmp_path)).text_cache
    caps = ["x y", "z"]
    a = embed_captions(caps, FakeEncoder("k1"), root)
    enc = FakeEncoder("k2")
    b = embed_captions(caps, enc, root)
    assert enc.encoded == caps and not torch.equal(a, b)
    assert len(storage.listdir(root)) == 2
    enc_s = FakeEncoder("k1")
    embed_captions(caps, enc_s, root, settings={"max_words": 5})
    assert enc_s.encoded == caps  # other normalisation settings: another folder
    meta = json.loads((Path(root) / text_cache.cache_key(FakeEncoder("k1")) / "meta.json").read_text())
    assert meta["encoder_key"] == "k1" and meta["dim"] == 8


def test_real_captions_batched_parts(tmp_path, monkeypatch, flickr30k):
    monkeypatch.setattr(text_cache, "PART_CAPTIONS", 1000)
    caps = [c for r in read_split(flickr30k, "flickr30k", "test").rows for c in r.captions]
    enc = FakeEncoder(dim=16)
    progress = []
    e = embed_captions(caps, enc, str(tmp_path), batch_size=256, progress=lambda d, t: progress.append((d, t)))
    n = len(set(caps))
    assert e.shape == (5000, 16) and progress[-1] == (n, n)
    key_dir = tmp_path / text_cache.cache_key(enc)
    assert len([p for p in key_dir.iterdir() if p.name.startswith("part-")]) == -(-n // 1024)  # flushed per 4 batches
    enc2 = FakeEncoder(dim=16)
    assert torch.equal(embed_captions(caps, enc2, str(tmp_path)), e) and enc2.calls == 0


def test_empty_list(tmp_path):
    assert embed_captions([], FakeEncoder(), str(tmp_path)).shape == (0, 8)
