"""Caption embeddings are memory-mapped, never read whole (issue #26): the mapped rows are the file's tensor, the
tensor's memory is the file's mapping, the file is checked once per node (a URL's through a verified node-local
copy that a damaged source never leaves behind), and a worker's caption strings are read only when asked for."""

from __future__ import annotations

import os

import fsspec
import pytest
import torch
from safetensors.torch import load_file, save, save_file

from ptmst_ray import storage
from ptmst_ray.config import BuiltinDataConfig, DataConfig
from ptmst_ray.data import embedfile, prepare
from ptmst_ray.data.dataset import load_split, read_caption_index


@pytest.fixture()
def cache(tmp_path, monkeypatch):
    root = tmp_path / "node-cache"
    monkeypatch.setenv("PTMST_RAY_CACHE", str(root))
    return root


def _emb(n=37, d=24, seed=0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed))


def _mappings_of(path: str) -> list[tuple[int, int]]:
    """(start, end) of this process's memory mappings of the file ``path`` (/proc/self/maps)."""
    real, out = os.path.realpath(path), []
    with open("/proc/self/maps") as f:
        for line in f:
            fields = line.split(maxsplit=5)
            if len(fields) == 6 and fields[5].strip() == real:
                start, end = (int(v, 16) for v in fields[0].split("-"))
                out.append((start, end))
    return out


@pytest.mark.parametrize("shape", [(37, 24), (1, 768), (5, 1)])
def test_mapped_rows_are_the_files_tensor(tmp_path, shape):
    path = str(tmp_path / "train.safetensors")
    save_file({"text": _emb(*shape)}, path)
    want = load_file(path)["text"]
    got = embedfile.map_embeddings(path)
    assert got.dtype == torch.float32 and got.shape == want.shape and torch.equal(got, want)
    rows = torch.tensor([shape[0] - 1, 0, shape[0] // 2, 0])
    assert torch.equal(got[rows], want[rows]) and torch.equal(got[: shape[0] // 2], want[: shape[0] // 2])


def test_empty_embeddings_map_to_an_empty_tensor(tmp_path):
    path = str(tmp_path / "val.safetensors")
    save_file({"text": torch.empty(0, 16)}, path)
    assert embedfile.map_embeddings(path).shape == (0, 16)


@pytest.mark.skipif(not os.path.exists("/proc/self/maps"), reason="needs /proc/self/maps (Linux)")
def test_mapped_tensor_memory_is_the_files_mapping(tmp_path):
    """The tensor's bytes live in a mapping of the file (the page cache, shared by the node's processes), not in
    memory this process allocated; a write to it stays private and never reaches the file."""
    path = str(tmp_path / "train.safetensors")
    save_file({"text": _emb(512, 64)}, path)
    before = open(path, "rb").read()
    t = embedfile.map_embeddings(path)
    first, last = t.data_ptr(), t.data_ptr() + t.numel() * 4 - 1
    maps = _mappings_of(path)
    assert any(s <= first and last < e for s, e in maps), (hex(first), maps)
    t[0, 0] = 12345.0  # copy-on-write
    assert open(path, "rb").read() == before and float(embedfile.map_embeddings(path)[0, 0]) != 12345.0


def _resident_kb(path: str) -> int:
    """Resident kB of this process's mappings of the file ``path`` (/proc/self/smaps)."""
    real, total, inside = os.path.realpath(path), 0, False
    with open("/proc/self/smaps") as f:
        for line in f:
            fields = line.split()
            if "-" in fields[0] and ":" not in fields[0]:  # a mapping's header line
                inside = len(fields) >= 6 and fields[5] == real
            elif inside and fields[0] == "Rss:":
                total += int(fields[1])
    return total


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
def test_released_pages_leave_the_process_and_read_back_the_same(tmp_path):
    """release_pages drops the mapped rows this process read (RSS of the mapping back near 0), for the tensor or
    any view of it; the rows read again are the file's."""
    path = str(tmp_path / "train.safetensors")
    want = _emb(8192, 256)  # 8 MiB
    save_file({"text": want}, path)
    t = embedfile.map_embeddings(path)
    assert torch.equal(t, want) and _resident_kb(path) > 7000  # every row read: every page resident
    embedfile.release_pages(t[100:200])  # a view is enough
    assert _resident_kb(path) < 200
    rows = torch.tensor([8191, 3, 4000])
    assert torch.equal(t[rows], want[rows]) and torch.equal(t, want)
    embedfile.release_pages(torch.zeros(3))  # not a mapping: nothing happens


def test_gather_reads_a_mapped_files_rows_as_indexing_would(tmp_path):
    path = str(tmp_path / "train.safetensors")
    want = _emb(300, 40)
    save_file({"text": want}, path)
    t = embedfile.map_embeddings(path)
    rows = torch.tensor([299, 0, 7, 7, 150])
    assert torch.equal(embedfile.gather(t, rows), want[rows])
    assert torch.equal(embedfile.gather(t[100:250], torch.tensor([0, 149, 3])), want[100:250][[0, 149, 3]])  # a view
    assert torch.equal(embedfile.gather(want, rows), want[rows])  # not a mapping: indexed
    with pytest.raises(IndexError, match="row 150 of 150"):
        embedfile.gather(t[:150], torch.tensor([150]))


@pytest.mark.skipif(not os.path.exists("/proc/self/smaps"), reason="needs /proc/self/smaps (Linux)")
def test_a_streamed_epoch_leaves_no_text_resident(tmp_path):
    """CaptionStream gathers a mapped text's rows by reading them (embedfile.gather): after an epoch over every
    row, none of the file is resident in the process (through the mapping, every touched page-cache folio would
    be: up to the whole file); the batches' text rows are the file's."""
    from ptmst_ray.data import stream

    data_dir = str(tmp_path / "data")
    prepare.prepare_dataset(DataConfig(builtin=BuiltinDataConfig(train_images=400, test_images=4, pretrain_images=4,
                                                                 captions_per_image=2), shard_rows=128), data_dir)
    n = len(read_caption_index(data_dir, "train")[0])
    path = str(tmp_path / "train.safetensors")
    want = _emb(n, 4096)  # 16 KiB a row, 12.5 MiB in all
    save_file({"text": want}, path)
    text = embedfile.map_embeddings(path)
    seen = 0
    for idx, _, t in stream.CaptionStream(data_dir, "train", text, batch_size=16, seed=0, buffer=64):
        assert torch.equal(t, want[idx])
        seen += len(idx)
    assert seen == n and _resident_kb(path) < 64
    _ = text[torch.arange(0, n, 7)]  # indexing through the mapping, as other consumers do ...
    assert _resident_kb(path) > 1000  # ... does make the file's pages resident: what the test above would see


@pytest.mark.parametrize("damage, says", [
    (lambda b: b[:5], "shorter than"),
    (lambda b: b[:8], "header of 64 bytes in a file of 8"),  # header cut away
    (lambda b: b[:-4], "does not fill"),  # a truncated tensor
    (lambda b: save({"text": torch.zeros(3, 4, dtype=torch.float16)}), "F16"),
    (lambda b: save({"text": torch.zeros(12)}), r"F32 of shape \(captions, dim\)"),
    (lambda b: save({"text": torch.zeros(3, 4), "other": torch.zeros(1)}), "expected only 'text'"),
])
def test_a_file_that_is_no_caption_embedding_file_is_named(tmp_path, damage, says):
    path = tmp_path / "train.safetensors"
    path.write_bytes(damage(save({"text": _emb(3, 4)})))
    with pytest.raises(storage.StorageError, match=says) as e:
        embedfile.map_embeddings(str(path), url="s3://bucket/run/data/embedded/k/train.safetensors")
    assert e.value.url == "s3://bucket/run/data/embedded/k/train.safetensors" and "rebuild this stage" in str(e.value)


def _count_hashes(monkeypatch) -> list[str]:
    hashed, real = [], storage.hash_file

    def counted(url):
        hashed.append(url)
        return real(url)

    monkeypatch.setattr(storage, "hash_file", counted)
    return hashed


def test_a_local_file_is_mapped_in_place_and_hashed_once_per_version(tmp_path, cache, monkeypatch):
    """A local run root's file is mapped where it is; the first reader on the node hashes it, later ones (other
    processes: the mark is a file) trust the mark while the file is the same version; a rewritten file (same
    size, other bytes) is hashed again and named."""
    d = tmp_path / "embedded"
    d.mkdir()
    blob = save({"text": _emb()})
    (d / "train.safetensors").write_bytes(blob)
    digest = storage.hash_bytes(blob)
    hashed = _count_hashes(monkeypatch)
    for _ in range(3):
        path = storage.verified_local_file(str(d), "train.safetensors", digest)
        assert path == str(d / "train.safetensors")
    assert len(hashed) == 1 and len(os.listdir(cache / "verified")) == 1
    assert torch.equal(embedfile.open_embeddings(str(d), "train.safetensors", digest), load_file(path)["text"])
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    (d / "train.safetensors").write_bytes(bytes(damaged))
    with pytest.raises(storage.StorageError, match="content hash does not match") as e:
        storage.verified_local_file(str(d), "train.safetensors", digest)
    assert e.value.url == f"{d}/train.safetensors" and len(hashed) == 2
    (d / "train.safetensors").unlink()
    with pytest.raises(storage.StorageError, match="listed in .* but missing"):
        storage.verified_local_file(str(d), "train.safetensors", digest)


def test_a_url_is_copied_to_the_node_verified_and_atomically(cache):
    """A URL's file is copied once into this node's cache, checked while copied: a damaged source fails naming
    the URL and the fix and leaves nothing in the cache that counts (nor a temporary file); the good one is then
    copied, and mapped from the copy without reading the source again."""
    fs = fsspec.filesystem("memory")
    base = "memory://h-mem-test/embedded/k"
    blob = save({"text": _emb()})
    digest = storage.hash_bytes(blob)
    damaged = bytearray(blob)
    damaged[-5] ^= 0xFF
    fs.pipe(f"{base}/train.safetensors", bytes(damaged))
    try:
        with pytest.raises(storage.StorageError, match="content hash does not match.*rebuild this stage") as e:
            embedfile.open_embeddings(base, "train.safetensors", digest)
        assert e.value.url == f"{base}/train.safetensors"
        assert [n for n in os.listdir(cache / "files") if not n.endswith(".lock")] == []
        fs.pipe(f"{base}/train.safetensors", blob)
        t = embedfile.open_embeddings(base, "train.safetensors", digest)
        assert torch.equal(t, _emb())
        copy = cache / "files" / f"{digest}.safetensors"
        assert copy.read_bytes() == blob
        fs.rm(f"{base}/train.safetensors")  # the copy counts: the source is not read again
        assert torch.equal(embedfile.open_embeddings(base, "train.safetensors", digest), _emb())
        with pytest.raises(storage.StorageError, match="listed in .* but missing"):
            storage.verified_local_file(base, "val.safetensors", "0" * 64)
    finally:
        if fs.exists("memory://h-mem-test"):
            fs.rm("memory://h-mem-test", recursive=True)


def test_captions_are_read_only_for_the_rows_asked(tmp_path, monkeypatch):
    """read_caption_index: the image index of every row and the captions read on demand, equal to what the whole
    split's reader (load_split) gives, across shard boundaries and cut to ``rows``."""
    with monkeypatch.context() as m:
        m.setattr(prepare, "ROW_GROUP_BYTES", 3000)
        prepare.prepare_dataset(DataConfig(builtin=BuiltinDataConfig(train_images=30, test_images=10,
                                                                     pretrain_images=20), shard_rows=16), str(tmp_path))
    whole = load_split(str(tmp_path), "train")
    index, caps = read_caption_index(str(tmp_path), "train")
    n = len(whole.captions)
    assert torch.equal(index, whole.image_index) and len(caps) == n and len(caps.names) > 2
    rows = [n - 1, 0, 16, 15, 17, 5, n - 1]
    assert caps.take(rows) == [whole.captions[r] for r in rows] and caps[-1] == whole.captions[-1]
    assert list(caps) == whole.captions and caps[14:18] == whole.captions[14:18]
    _, cut = read_caption_index(str(tmp_path), "train", rows=20)
    assert len(cut) == 20 and list(cut) == whole.captions[:20]
    with pytest.raises(IndexError):
        cut.take([20])


@pytest.mark.parametrize("shape, chunk", [((37, 24), 10), ((120, 64), 120), ((1, 1), 1), ((0, 8), 4), ((5, 3), 2)])
def test_the_writer_writes_safetensors_bytes_chunk_by_chunk(shape, chunk):
    """The file written a chunk at a time is byte for byte what safetensors writes for the whole tensor, and its
    sha256 is that of those bytes."""
    import io

    emb = _emb(*shape) if shape[0] else torch.empty(shape)
    buf = io.BytesIO()
    w = embedfile.EmbeddingWriter(buf, *shape)
    for start in range(0, shape[0], chunk):
        w.add(emb[start:start + chunk] if start % 2 else emb[start:start + chunk].numpy())
    digest = w.finish()
    assert buf.getvalue() == save({"text": emb}) and digest == storage.hash_bytes(buf.getvalue())
    with pytest.raises(ValueError):
        embedfile.EmbeddingWriter(io.BytesIO(), *shape).add(torch.zeros(1, shape[1] + 1))
