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


def _split_file(tmp_path, name, captions, enc, cache_dir, chunk=7, **kw) -> tuple[bytes, str]:
    url = str(tmp_path / "embedded" / f"{name}.safetensors")
    digest = text_cache.embed_split(url, lambda: iter([captions[i:i + chunk] for i in range(0, len(captions), chunk)]),
                                    enc, cache_dir, **kw)
    return Path(url).read_bytes(), digest


def test_split_file_has_the_bytes_of_the_whole_tensor_path(tmp_path, monkeypatch):
    """embed_split (a shard of captions, a cache part and a batch at a time) writes byte for byte the file that
    safetensors writes for embed_captions' tensor, encodes the same captions in the same batches and leaves the
    same cache entries: from an empty cache, from a partial one, with captions repeated in the split, over
    several parts; its digest is the file's sha256; no scratch file is left."""
    from safetensors.torch import save

    monkeypatch.setattr(text_cache, "PART_CAPTIONS", 5)
    caps = [f"caption {i % 23}" if i % 4 else f"a photo of {i % 9}" for i in range(61)]
    for cached in (0, 17):  # nothing cached; the first 17 captions' embeddings cached beforehand
        old, new = FakeEncoder(), FakeEncoder()
        old_root, new_root = str(tmp_path / f"old{cached}"), str(tmp_path / f"new{cached}")
        for enc, root in ((old, old_root), (new, new_root)):
            embed_captions(caps[:cached], enc, root, batch_size=3)
        want = save({"text": embed_captions(caps, old, old_root, batch_size=3)})
        progress: list = []
        got, digest = _split_file(tmp_path, f"train{cached}", caps, new, new_root, batch_size=3,
                                  progress=lambda d, t: progress.append((d, t)))
        assert got == want and digest == storage.hash_bytes(want)
        assert new.encoded == old.encoded and new.calls == old.calls and progress[-1][0] == progress[-1][1]
        key = text_cache.cache_key(old)
        assert {c: v.tolist() for c, v in text_cache.load_cache(f"{new_root}/{key}", 8).items()} == \
               {c: v.tolist() for c, v in text_cache.load_cache(f"{old_root}/{key}", 8).items()}
    assert sorted(p.name for p in (tmp_path / "embedded").iterdir()) == ["train0.safetensors", "train17.safetensors"]
    empty, _ = _split_file(tmp_path, "val", [], FakeEncoder(), str(tmp_path / "old0"))
    assert empty == save({"text": torch.empty(0, 8)})


def test_split_file_takes_a_captions_first_cached_embedding(tmp_path):
    """Two parts holding one caption with different embeddings: the first part (listing order) wins in both paths."""
    enc = FakeEncoder()
    root = str(tmp_path / "cache")
    key_dir = f"{root}/{text_cache.cache_key(enc)}"
    storage.makedirs(key_dir)
    import numpy as np

    for k in range(3):
        text_cache._write_part(key_dir, ["same", f"other {k}"], np.full((2, 8), float(k), dtype=np.float32))
    caps = ["other 2", "same", "other 0", "same", "other 1"]
    want = embed_captions(caps, enc, root)
    got, _ = _split_file(tmp_path, "train", caps, enc, root, chunk=2)
    from safetensors.torch import save

    assert enc.calls == 0 and got == save({"text": want})
