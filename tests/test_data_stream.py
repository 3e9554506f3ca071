"""The real data as consumers read it: pixels once per image (uint8), float only per batch, read only what is used.

References are independent of the code under test: the per-caption float copy the loaders used to build
(``normalize_images(images[image_index])``, indexed afterwards), the split decoded by :func:`load_split`,
and counts of the PNG decodes and file reads the loaders actually did.
"""

from __future__ import annotations

import collections

import pyarrow.parquet as pq
import pytest
import torch
from safetensors.torch import save as st_save

from ptmst_ray import storage
from ptmst_ray.config import BuiltinDataConfig, DataConfig
from ptmst_ray.data import dataset, prepare
from ptmst_ray.data.dataset import ImageRows, ShardImages, load_split, normalize_images, read_captions

SMALL = DataConfig(builtin=BuiltinDataConfig(train_images=30, test_images=10, pretrain_images=20), shard_rows=16)


@pytest.fixture
def data_dir(tmp_path, monkeypatch) -> str:
    """A built-in dataset whose splits span several shards, each of several row groups."""
    with monkeypatch.context() as m:
        m.setattr(prepare, "ROW_GROUP_BYTES", 3000)
        prepare.prepare_dataset(SMALL, str(tmp_path))
    return str(tmp_path)


@pytest.fixture
def decodes(monkeypatch) -> list[int]:
    """Records one entry per PNG decoded by the readers."""
    seen: list[int] = []
    real = dataset.decode_png

    def counting(data: bytes):
        seen.append(1)
        return real(data)

    monkeypatch.setattr(dataset, "decode_png", counting)
    return seen


def _row_groups(d: str, split: str) -> list[int]:
    m = storage.read_manifest(storage.join(d, split))
    return [pq.ParquetFile(storage.join(d, split, n)).metadata.num_row_groups for n in sorted(m["files"])
            if n.startswith("images-")]


def _reference_normalize(images: torch.Tensor) -> torch.Tensor:
    """CLIP normalisation written out (the formula the loaders used before per-batch, in-place normalising)."""
    from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (OPENAI_DATASET_MEAN, OPENAI_DATASET_STD))
    return (images.float() / 255.0 - mean) / std


def test_rows_equal_the_per_caption_float_copy_bit_for_bit(data_dir):
    train = load_split(data_dir, "train")
    assert len(_row_groups(data_dir, "train")) == 2 and min(_row_groups(data_dir, "train")) > 1
    old = _reference_normalize(train.images[train.image_index])  # what RealData.train_images used to hold
    assert torch.equal(normalize_images(train.images), _reference_normalize(train.images))
    gen = torch.Generator().manual_seed(0)
    for source in (train.images, ShardImages(data_dir, "train", keep=True), ShardImages(data_dir, "train", keep=False)):
        rows = ImageRows(source, train.image_index)
        assert rows.shape == old.shape and len(rows) == len(old) == 60
        for batch in torch.randperm(len(old), generator=gen).split(7):
            x = rows[batch]
            assert x.dtype == torch.float32 and torch.equal(x, old[batch])
        assert torch.equal(rows[3:40], old[3:40]) and torch.equal(rows[5], old[5])
    test = load_split(data_dir, "test")
    rows = ImageRows(ShardImages(data_dir, "test"))
    assert torch.equal(rows[0:len(rows)], normalize_images(test.images)) and rows.shape == test.images.shape


def test_lazy_images_decode_only_the_requested_ones(data_dir, decodes):
    everything = load_split(data_dir, "train").images
    decodes.clear()
    lazy = ShardImages(data_dir, "train", keep=False)
    ids = torch.tensor([29, 0, 15, 16, 15, 29])  # across the shard boundary (16 rows a shard), repeats
    assert torch.equal(lazy[ids], everything[ids])
    assert len(decodes) == 4  # the distinct images, nothing else
    with pytest.raises(IndexError, match="out of (range|bounds)"):
        lazy[torch.tensor([30])]


def test_kept_images_are_decoded_once(data_dir, decodes):
    kept = ShardImages(data_dir, "train", keep=True)
    assert not decodes  # nothing is read before the first access
    a, b = kept[torch.tensor([1, 2])], kept[torch.arange(30)]
    assert len(decodes) == 30 and torch.equal(a, b[1:3])


def test_captions_are_read_without_pixels(data_dir, decodes, monkeypatch):
    refs = {s: load_split(data_dir, s) for s in ("train", "test")}
    decodes.clear()
    whole: collections.Counter = collections.Counter()
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: (whole.update([url.rsplit("/", 1)[-1]]), real_read(url))[1])
    train, test = read_captions(data_dir, "train"), read_captions(data_dir, "test")
    assert train.captions == refs["train"].captions and torch.equal(train.image_index, refs["train"].image_index)
    assert test.captions == refs["test"].captions and torch.equal(test.image_index, refs["test"].txt2img)
    assert not decodes
    assert sorted(n for n in whole if n.endswith(".parquet")) == ["captions-00000.parquet", "captions-00001.parquet", "captions-00002.parquet",
                             "captions-00003.parquet"]  # train's caption shards; no image shard fetched whole


def test_each_file_is_read_once_and_checked_in_that_read(data_dir, monkeypatch):
    reads: collections.Counter = collections.Counter()
    real_read = storage.read_bytes
    monkeypatch.setattr(storage, "read_bytes", lambda url: (reads.update([url]), real_read(url))[1])
    monkeypatch.setattr(storage, "hash_file", lambda url: pytest.fail(f"{url} hashed in a pass of its own"))
    load_split(data_dir, "train")
    m = storage.read_manifest(storage.join(data_dir, "train"))
    shards = collections.Counter({u: c for u, c in reads.items() if u.endswith(".parquet")})
    assert shards == collections.Counter({storage.join(data_dir, "train", n): 1 for n in m["files"]})


def test_a_changed_shard_is_named(data_dir):
    shard = storage.join(data_dir, "train", "images-00001.parquet")
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF  # same size, other content: only the hash can tell
    open(shard, "wb").write(bytes(blob))
    with pytest.raises(storage.StorageError, match="images-00001.parquet: content hash does not match"):
        ShardImages(data_dir, "train", keep=True)[torch.tensor([0])]
    open(shard, "wb").write(bytes(blob[:100]))  # truncated: a lazy read names it too
    with pytest.raises(storage.StorageError, match="images-00001.parquet"):
        ShardImages(data_dir, "train", keep=False)[torch.tensor([20])]


def _fake_embeddings(cfg) -> None:
    """Caption embeddings (row i = [i, i]) written where `embed` writes them, without a text tower."""
    from ptmst_ray.layout import Layout

    layout = Layout.of(cfg)
    key, files = "fake", {}
    for split in ("train", "test"):
        n = len(read_captions(layout.data, split).captions)
        blob = st_save({"text": torch.arange(n, dtype=torch.float32)[:, None].repeat(1, 2)})
        storage.write_bytes(storage.join(layout.embedded(key), f"{split}.safetensors"), blob)
        files[f"{split}.safetensors"] = storage.hash_bytes(blob)
    storage.write_manifest(layout.embedded(key), {"config_hash": key, "files": files, "dim": 2})
    storage.write_text(layout.embedded_current, key)


def test_a_phase_decodes_only_its_initial_pairs(tmp_path, decodes):
    from conftest import tiny_config

    from ptmst_ray.config import SimilarityConfig
    from ptmst_ray.distill.synthetic import SyntheticSet
    from ptmst_ray.layout import Layout
    from ptmst_ray.stages import data as data_stage
    from ptmst_ray.stages.embed import load_real

    cfg = tiny_config(tmp_path / "run")
    data_stage.prepare(cfg)
    _fake_embeddings(cfg)
    train = load_split(Layout.of(cfg).data, "train")
    decodes.clear()
    real = load_real(cfg, whole_train=False)
    assert not decodes and len(real.train_images) == len(train) == 120
    syn = SyntheticSet.from_real(real.train_images, real.train_text, 6, SimilarityConfig(), 0.1,
                                 torch.Generator().manual_seed(0))
    chosen = train.image_index[syn.init_indices]
    assert len(decodes) == len(chosen.unique()) <= 6
    assert torch.equal(syn.images.detach(), normalize_images(train.images[chosen]))
    assert torch.equal(syn.text.detach(), real.train_text[syn.init_indices])
    decodes.clear()
    whole = load_real(cfg)  # experts and the full-data baseline: every image decoded once, on first use
    old = normalize_images(train.images[train.image_index])
    rows = torch.tensor([119, 0, 64, 3])
    assert torch.equal(whole.train_images[rows], old[rows]) and torch.equal(whole.train_images[rows], old[rows])
    assert len(decodes) == 60
    assert whole.test_images is real.test_images  # one test copy per process, shared by both modes


# ---------------------------------------------------------------- the streaming path (data/stream.py)


def _stream(d: str, **kw):
    from ptmst_ray.data.stream import CaptionStream

    text = torch.arange(60, dtype=torch.float32)[:, None].repeat(1, 2)  # row r's text is [r, r]
    return CaptionStream(d, "train", text, **{"batch_size": 7, "seed": 3, "buffer": 10, "min_batch": 1, **kw})


@pytest.mark.parametrize("buffer", [1, 10, 1000])  # no mixing, less than a shard, the whole split
def test_stream_yields_every_row_once_per_epoch_in_a_seeded_order(data_dir, buffer):
    train = load_split(data_dir, "train")
    old = normalize_images(train.images[train.image_index])
    stream = _stream(data_dir, buffer=buffer)
    orders = []
    for epoch in (1, 2):
        got = list(stream.epoch(epoch))
        rows = torch.cat([r for r, _, _ in got])
        assert sorted(rows.tolist()) == list(range(60))  # every caption row exactly once, across 2 shards
        assert all(len(r) == 7 for r, _, _ in got[:-1])
        for r, x, t in got:
            assert torch.equal(x, old[r]) and torch.equal(t[:, 0], r.float())
        again = list(_stream(data_dir, buffer=buffer).epoch(epoch))  # a fresh stream: the same batches
        assert all(torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(got, again, strict=True))
        orders.append(rows)
    assert not torch.equal(orders[0], orders[1])  # each epoch its own order
    assert not torch.equal(torch.cat([r for r, _, _ in _stream(data_dir, seed=4).epoch(1)]), orders[0])


def test_stream_limits_rows_and_drops_a_last_batch_of_one(data_dir):
    rows = torch.cat([r for r, _, _ in _stream(data_dir, rows=43).epoch(1)])
    assert sorted(rows.tolist()) == list(range(43))
    sizes = [len(r) for r, _, _ in _stream(data_dir, rows=43, min_batch=2).epoch(1)]
    assert sizes == [7] * 6  # 43 = 6 x 7 + 1: the single last row is dropped


def test_stream_stops_at_a_damaged_shard_naming_it(data_dir):
    shard = storage.join(data_dir, "train", "images-00001.parquet")
    blob = bytearray(open(shard, "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(shard, "wb").write(bytes(blob))
    for seed in range(20):  # a seed whose order reads the good shard first: batches come, then the error
        stream = _stream(data_dir, seed=seed, buffer=1)
        got = []
        with pytest.raises(storage.StorageError, match="images-00001.parquet: content hash does not match"):
            for batch in stream.epoch(1):
                got.append(batch)
        if got:
            break
    assert got and all(int(r.max()) < 32 for r, _, _ in got)  # what came before is intact, from shard 0 only


def test_expert_trains_from_a_stream_as_from_rows(data_dir):
    """The stream hook of train_expert is the same training: fed the batches of the row path's own
    permutation, it gives the identical trajectory; fed a CaptionStream, it trains on every row."""
    from ptmst_ray.config import ExpertsConfig, ModelConfig
    from ptmst_ray.trajectories.expert import batches, expert_seed, train_expert

    train = load_split(data_dir, "train")
    images = ImageRows(train.images, train.image_index)
    text = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    cfg, model = ExpertsConfig(num_experts=1, epochs=2, batch_size=16), ModelConfig(name="ptmst-toy-vit")
    ref = train_expert(cfg, model, images, text, 0, device=torch.device("cpu"))
    gen = torch.Generator().manual_seed(expert_seed(cfg, 0))
    orders = {e: batches(60, cfg.batch_size, gen) for e in (1, 2)}
    fed = train_expert(cfg, model, images, text, 0, device=torch.device("cpu"),
                       epoch_batches=lambda e: ((images[i], text[i]) for i in orders[e]))
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ref, fed, strict=True) for k in a)
    seen: list[int] = []
    stream = _stream(data_dir, batch_size=16, min_batch=2)
    stream.text = text

    def streamed(epoch):
        for r, x, t in stream.epoch(epoch):
            seen.extend(r.tolist())
            yield x, t

    out = train_expert(cfg, model, images, text, 0, device=torch.device("cpu"), epoch_batches=streamed)
    assert len(out) == 3 and sorted(seen) == sorted(list(range(60)) * 2)
    assert any(not torch.equal(out[0][k], out[2][k]) for k in out[0])


def test_prefetch_and_image_cache_keep_every_batch(data_dir, decodes):
    """Decoding ahead in a thread and reusing decoded images change neither a batch nor its order; the cache
    saves the repeat decodes (2 captions an image) and never holds more than its budget."""
    plain = list(_stream(data_dir).epoch(1))
    decodes.clear()
    fast = _stream(data_dir, prefetch=2, cache_mb=1.0)
    got = list(fast.epoch(1))
    assert len(got) == len(plain) and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) and torch.equal(a[2], b[2]) for a, b in zip(plain, got))
    assert len(decodes) == fast.decoded == 30  # each image once: its second caption came from the cache
    small = _stream(data_dir, prefetch=1, cache_mb=3 * 3072 / 2**20)  # room for 3 images (3 x 32 x 32 bytes each)
    assert all(torch.equal(a[1], b[1]) for a, b in zip(plain, small.epoch(1), strict=True))
    assert len(small.cache) == 3 and small.cache.bytes == 3 * 3072 and small.decoded > 30


def test_image_cache_evicts_the_least_recently_used():
    from ptmst_ray.data.stream import ImageCache

    cache = ImageCache(max_bytes=30)
    for k in range(3):
        cache.put(k, torch.full((10,), k, dtype=torch.uint8))
    assert cache.get(0) is not None  # 0 is now the most recent: 1 goes first
    cache.put(3, torch.zeros(10, dtype=torch.uint8))
    assert cache.get(1) is None and all(cache.get(k) is not None for k in (0, 2, 3)) and cache.bytes == 30
    cache.put(9, torch.zeros(31, dtype=torch.uint8))  # larger than the whole budget: not kept, nothing evicted
    assert cache.get(9) is None and len(cache) == 3


def test_image_cache_keeps_images_in_its_slabs_within_the_budget(monkeypatch):
    """The cached images are copies in a few preallocated slabs (no allocation kept per image), never more slots
    than the budget holds; a slot reused after an eviction holds the new image; what get returns is a copy."""
    from ptmst_ray.data.stream import ImageCache

    monkeypatch.setattr(ImageCache, "SLAB_BYTES", 4 * 12)  # 4 images of 12 bytes a slab
    cache = ImageCache(max_bytes=10 * 12)  # 10 images: slabs of 4, 4 and 2
    images = {k: torch.full((3, 2, 2), k, dtype=torch.uint8) for k in range(25)}
    for k, img in images.items():
        cache.put(k, img)
        img.fill_(255)  # the cache kept a copy
        assert len(cache) == min(k + 1, 10) and cache.bytes == 12 * len(cache)
    assert [len(s) for s in cache._slabs] == [4, 4, 2]
    for k in range(25):
        got = cache.get(k)
        assert (got is None) == (k < 15) and (got is None or torch.equal(got, torch.full((3, 2, 2), k, dtype=torch.uint8)))
    got = cache.get(20)
    got.zero_()
    assert torch.equal(cache.get(20), torch.full((3, 2, 2), 20, dtype=torch.uint8))
    cache.put(99, torch.zeros(3, 2, 3, dtype=torch.uint8))  # another shape: not kept
    assert cache.get(99) is None and len(cache) == 10


def test_prefetch_thread_stops_when_the_consumer_leaves_early():
    import threading

    from ptmst_ray.data.stream import prefetched

    made: list[int] = []

    def items():
        for i in range(1000):
            made.append(i)
            yield i

    it = prefetched(items(), 3)
    assert [next(it) for _ in range(5)] == [0, 1, 2, 3, 4]
    it.close()
    assert not any(t.name == "ptmst-prefetch" and t.is_alive() for t in threading.enumerate())
    assert len(made) <= 5 + 3 + 2  # bounded: the queue's depth ahead, no more

    def failing():
        yield 1
        raise storage.StorageError("images-00007.parquet: damaged")

    got = []
    with pytest.raises(storage.StorageError, match="images-00007"):
        for x in prefetched(failing(), 2):
            got.append(x)
    assert got == [1]


@pytest.mark.parametrize("prefetch", [0, 2])
def test_decode_workers_keep_every_batch_bit_for_bit(data_dir, prefetch, monkeypatch):
    """Several decoding threads (which really overlap: a decode is slowed so they must) give the batches of one,
    bit for bit, in the same order, for two epochs; without the cache (every caption decodes) and with it (threads
    race for the same images)."""
    import threading
    import time

    real = dataset.decode_png
    threads: set[str] = set()

    def slow(data: bytes):
        threads.add(threading.current_thread().name)
        time.sleep(0.002)
        return real(data)

    monkeypatch.setattr(dataset, "decode_png", slow)
    for cache_mb in (0.0, 1.0):
        one = _stream(data_dir, cache_mb=cache_mb, buffer=10, decode_workers=1, prefetch=prefetch)
        three = _stream(data_dir, cache_mb=cache_mb, buffer=10, decode_workers=3, prefetch=prefetch)
        for epoch in (1, 2):
            threads.clear()
            a, b = list(one.epoch(epoch)), list(three.epoch(epoch))
            if epoch == 1 or not cache_mb:  # (a second epoch with the cache finds every image decoded)
                assert len({n for n in threads if n.startswith("ptmst-decode")}) > 1  # decoded by several threads
            assert len(a) == len(b) == 9 and all(torch.equal(x, y) for p, q in zip(a, b) for x, y in zip(p, q))
        assert three.decoded >= 30 and (cache_mb or three.decoded == 120)  # no cache: 60 rows x 2 epochs
    assert not any(t.name.startswith(("ptmst-decode", "ptmst-prefetch")) and t.is_alive() for t in threading.enumerate())


def test_decode_workers_stop_when_the_consumer_leaves_early(data_dir):
    import threading

    stream = _stream(data_dir, decode_workers=3, prefetch=1, batch_size=2)
    it = stream.epoch(1)
    first = [next(it) for _ in range(3)]
    it.close()
    assert len(first) == 3 and not any(t.name.startswith(("ptmst-decode", "ptmst-prefetch")) and t.is_alive()
                                       for t in threading.enumerate())
    assert stream.decoded <= 2 * (3 + 3 + 2)  # bounded: the batches asked for and those in flight, no more


def test_an_image_that_does_not_decode_names_its_shard(data_dir, monkeypatch):
    """A shard whose bytes match its manifest but hold an image that does not decode (written so by a faulty
    writer): the error names the shard and the fix, after the batches before it, with several decoding threads."""
    from ptmst_ray.data.dataset import read_image_shard

    m = storage.read_manifest(storage.join(data_dir, "train"))
    _, pngs = read_image_shard(storage.join(data_dir, "train"), "images-00001.parquet", m["files"]["images-00001.parquet"])
    bad = set(pngs[:4])  # the first 4 images of shard 1 (16-31)
    real = dataset.decode_png

    def broken(data: bytes):
        if data in bad:
            return real(data[: len(data) // 3])  # PIL's own error for a truncated image
        return real(data)

    for seed in range(20):  # an order whose first batches hold none of the bad images
        rows = [r for r, _, _ in _stream(data_dir, seed=seed, buffer=1).epoch(1)]  # the order, all images fine
        first_bad = next(k for k, r in enumerate(rows) if ((r >= 32) & (r < 40)).any())  # images 16-19: rows 32-39
        if first_bad:
            break
    got = []
    with monkeypatch.context() as m, pytest.raises(
            storage.StorageError, match=r"images-00001\.parquet: image (1[6-9]) cannot be decoded") as e:
        m.setattr(dataset, "decode_png", broken)
        for batch in _stream(data_dir, seed=seed, buffer=1, decode_workers=3, prefetch=2).epoch(1):
            got.append(batch)
    assert len(got) == first_bad and all(torch.equal(a[0], b) for a, b in zip(got, rows))  # every batch before it
    assert "ptmst-ray data prepare" in str(e.value)


def test_decode_workers_setting_is_checked():
    from ptmst_ray.config import ConfigError
    from ptmst_ray.device import decode_threads

    assert DataConfig().decode_workers == 0 and decode_threads(0) == 1 and decode_threads(3) == 3  # a CPU-only worker
    with pytest.raises(ConfigError, match="decode_workers"):
        DataConfig(decode_workers=-1)


# ---------------------------------------------------------------- the stream in use (data.stream)


def _run(tmp_path, **overrides):
    """A tiny run with prepared data (4 train shards of 16 images) and fake caption embeddings; no pretraining."""
    from conftest import tiny_config

    from ptmst_ray.stages import data as data_stage

    cfg = tiny_config(tmp_path, **{"model.pretrained": None, "pretrain.enabled": False,
                                           "data.shard_rows": 16, **overrides})
    data_stage.prepare(cfg)
    _fake_embeddings(cfg)
    return cfg


@pytest.fixture
def no_whole_decode(monkeypatch) -> None:
    """Fails a test that decodes a whole pairs split (train, pretrain) into memory; the test split may be."""
    real_decode_all, real_load_split = ShardImages.decode_all, dataset.load_split

    def decode_all(self):
        if not self.dir.endswith("/test"):
            pytest.fail(f"{self.dir}: whole split decoded")
        return real_decode_all(self)

    def load_split(data_dir, split, *a, **k):
        if split != "test":
            pytest.fail(f"{split}: whole split loaded")
        return real_load_split(data_dir, split, *a, **k)

    monkeypatch.setattr(ShardImages, "decode_all", decode_all)
    monkeypatch.setattr(dataset, "load_split", load_split)


def test_the_run_streams_as_the_switch_says(tmp_path):
    from ptmst_ray.stages.embed import stream_split

    cfg = _run(tmp_path)
    assert not stream_split(cfg)  # auto, the toy default: 60 x 3 x 32 x 32 bytes fit; held as before
    assert stream_split(cfg.replace(**{"data.hold_images_mb": 0.1}))  # 0.18 MiB of pixels > 0.1: streamed
    assert not stream_split(cfg.replace(**{"data.hold_images_mb": 0.2}))
    assert stream_split(cfg.replace(**{"data.stream": "on"})) and not stream_split(cfg.replace(**{"data.stream": "off"}))
    assert stream_split(cfg.replace(**{"data.hold_images_mb": 0}), "pretrain")


def test_data_order_settings_make_other_experts_and_only_when_set(tmp_path):
    from ptmst_ray.layout import data_hash, experts_hash, pretrain_hash

    cfg = _run(tmp_path)
    base = (data_hash(cfg), experts_hash(cfg), pretrain_hash(cfg))
    for same in ({"data.stream": "auto"}, {"data.prefetch": 0}, {"data.image_cache_mb": 1.0}):
        assert (data_hash(cfg.replace(**same)), experts_hash(cfg.replace(**same)),
                pretrain_hash(cfg.replace(**same))) == base
    for other in ({"data.stream": "on"}, {"data.stream_buffer": 7}, {"data.hold_images_mb": 1.0}):
        changed = cfg.replace(**other)
        assert data_hash(changed) == base[0]  # the prepared data is the same
        assert experts_hash(changed) != base[1] and pretrain_hash(changed) != base[2]


def test_a_streamed_expert_is_the_same_expert_again(tmp_path, no_whole_decode):
    """Streamed (auto, over the budget), an expert never decodes the whole split; trained again from scratch (a
    fresh root, the per-process caches cleared, no prefetch or image cache) it is bit-identical, and it trained."""
    from ptmst_ray.layout import experts_hash
    from ptmst_ray.stages import embed
    from ptmst_ray.stages.experts import expert_store, train_and_store_expert

    over = {"data.hold_images_mb": 0.05, "data.max_train_rows": 64}  # 32 images (0.09 MiB): streamed
    cfg = _run(tmp_path / "a", **over, **{"data.prefetch": 2, "data.image_cache_mb": 0.05})
    train_and_store_expert(cfg, 0)
    first = expert_store(cfg).load_expert(0, experts_hash(cfg))
    embed._load_real_cached.cache_clear()
    embed._stream_decision.cache_clear()
    other = _run(tmp_path / "b", **over, **{"data.prefetch": 0, "data.image_cache_mb": 0})
    train_and_store_expert(other, 0)
    again = expert_store(other).load_expert(0, experts_hash(other))
    assert experts_hash(other) == experts_hash(cfg)  # prefetch and the cache are not part of what an expert is
    assert len(first) == 4 and all(torch.equal(a[k], b[k]) for a, b in zip(first, again, strict=True) for k in a)
    assert any(not torch.equal(first[0][k], first[2][k]) for k in first[0])


def test_a_held_expert_is_unchanged_by_the_switch(tmp_path):
    """The toy default holds its images: the expert equals train_expert on the rows' own permutation (today's)."""
    from ptmst_ray.layout import Layout, experts_hash
    from ptmst_ray.stages.embed import load_real
    from ptmst_ray.stages.experts import expert_store, train_and_store_expert
    from ptmst_ray.trajectories.expert import train_expert

    cfg = _run(tmp_path, **{"data.max_train_rows": 48})
    train_and_store_expert(cfg, 1)
    got = expert_store(cfg).load_expert(1, experts_hash(cfg))
    train = load_split(Layout.of(cfg).data, "train")
    text = load_real(cfg).train_text
    ref = train_expert(cfg.experts, cfg.model, ImageRows(train.images, train.image_index[:48]), text, 1)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(ref, got, strict=True) for k in a)


def test_a_damaged_shard_stops_a_streamed_expert_and_keeps_the_finished_ones(tmp_path, decodes):
    import numpy as np

    from ptmst_ray.layout import Layout, experts_hash
    from ptmst_ray.stages.experts import expert_store, train_and_store_expert
    from ptmst_ray.trajectories.expert import expert_seed

    # a small buffer, so batches train while shards are still to come; no prefetch or cache, so decodes = batches
    cfg = _run(tmp_path, **{"data.stream": "on", "data.stream_buffer": 8, "data.prefetch": 0, "data.image_cache_mb": 0})
    train_and_store_expert(cfg, 0)
    store, chash = expert_store(cfg), experts_hash(cfg)
    before = store.load_expert(0, chash)
    d = storage.join(Layout.of(cfg).data, "train")
    shards = sorted(n for n in storage.read_manifest(d)["files"] if n.startswith("images-"))
    rng = np.random.default_rng(np.random.SeedSequence([expert_seed(cfg.experts, 1), 1]))
    last = shards[int(rng.permutation(len(shards))[-1])]  # expert 1's epoch 1 meets it after the other shards
    blob = bytearray(open(storage.join(d, last), "rb").read())
    blob[len(blob) // 2] ^= 0xFF
    open(storage.join(d, last), "wb").write(bytes(blob))
    decodes.clear()
    with pytest.raises(storage.StorageError, match=f"{last}: content hash does not match"):
        train_and_store_expert(cfg, 1)
    # the three good shards' 96 rows, less 8 in the buffer: two full batches of 32 came (and trained) first
    assert len(decodes) == 64
    # expert 1 keeps its epoch 0 (stored before it trained), expert 0 all its epochs
    assert store.complete_epochs(1, chash) == 0 and store.is_complete(0, chash, cfg.experts.epochs)
    after = store.load_expert(0, chash)
    assert all(torch.equal(a[k], b[k]) for a, b in zip(before, after, strict=True) for k in a)


def _uint8_bytes_alive() -> int:
    """Bytes of every uint8 tensor storage alive in this process (decoded pixels), each storage counted once."""
    import gc
    import warnings

    storages = {}
    with warnings.catch_warnings():  # isinstance on torch's deprecated module attributes warns
        warnings.simplefilter("ignore")
        tensors = [o for o in gc.get_objects() if isinstance(o, torch.Tensor) and o.dtype == torch.uint8]
    for t in tensors:
        storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(storages.values())


def test_a_consumers_decoded_pixels_do_not_grow_with_the_split(tmp_path, monkeypatch):
    """Streamed, the decoded images alive at any batch stay within the cache + the batches in flight, for a split
    of 30 and of 150 images (several times the buffer and the cache); held, all of a split's images are."""
    import gc

    from ptmst_ray.data.stream import CaptionStream

    image = 3 * 32 * 32
    peaks = {}
    try:
        for n in (30, 150):
            d = str(tmp_path / str(n))
            with monkeypatch.context() as m:
                m.setattr(prepare, "ROW_GROUP_BYTES", 3000)
                prepare.prepare_dataset(DataConfig(builtin=BuiltinDataConfig(train_images=n, test_images=2,
                                                                             pretrain_images=2), shard_rows=16), d)
            text = torch.zeros(2 * n, 2)
            gc.freeze()  # objects alive now are left out of the scans (each then sees only what is new: fast)
            base = _uint8_bytes_alive()
            stream = CaptionStream(d, "train", text, batch_size=7, seed=0, buffer=10, prefetch=2,
                                   cache_mb=4 * image / 2**20)
            peak, rows = 0, 0
            for r, _, _ in stream.epoch(1):
                peak, rows = max(peak, _uint8_bytes_alive() - base), rows + len(r)
            assert rows == 2 * n
            peaks[n] = peak
            held = ImageRows(ShardImages(d, "train", keep=True), read_captions(d, "train").image_index)
            held[torch.tensor([0])]
            assert _uint8_bytes_alive() - base >= n * image  # the held path: the whole split (the check can fail)
            del held, stream
    finally:
        gc.unfreeze()
    # 4 cached images + at most the uint8 of batches being built (prefetch 2 + 1 in hand + 1 being built)
    assert all(4 * image <= peaks[n] <= (4 + 4 * 7) * image for n in peaks), peaks


def test_the_full_data_baseline_streams_every_row_in_the_students_order(tmp_path, no_whole_decode):
    """Streamed, the full-data baseline's student trains on every train row each epoch, in an order fixed by its
    seed, and is scored, without the train split decoded whole."""
    from ptmst_ray.stages import score

    cfg = _run(tmp_path, **{"data.stream": "on", "eval.full_data_epochs": 2})
    [full] = score.method_subsets(cfg, "full", 0)
    assert full.stream is not None and len(full) == 120
    orders = {s: [torch.cat([r for r, _, _ in full.stream(s, e)]) for e in (1, 2)] for s in (0, 1)}
    assert all(sorted(o.tolist()) == list(range(120)) for os in orders.values() for o in os)
    assert not torch.equal(orders[0][0], orders[0][1]) and not torch.equal(orders[0][0], orders[1][0])
    assert torch.equal(torch.cat([r for r, _, _ in full.stream(0, 1)]), orders[0][0])  # the same seed: the same
    losses: list = []
    out = score.score_one_seed(cfg, "full", 0, progress=losses.append)
    assert out["pairs"] == 120 and out["final"]["r_mean"] >= 0 and len(losses) == 2


def test_a_student_fed_its_own_permutation_trains_as_before(data_dir):
    """train_student's stream hook is the same training: fed the held path's batches it gives identical weights."""
    from ptmst_ray.config import ModelConfig
    from ptmst_ray.models.student import build_student

    train = load_split(data_dir, "train")
    images = ImageRows(train.images, train.image_index)
    text = torch.randn(60, 8, generator=torch.Generator().manual_seed(0))
    from ptmst_ray.evaluate.student import train_student

    common = dict(epochs=2, batch_size=16, seed=5)
    a, b = (build_student(ModelConfig(), text_dim=8, seed=0) for _ in range(2))
    train_student(a, images, text, None, **common)
    gen = torch.Generator().manual_seed(5)
    orders = {e: torch.randperm(60, generator=gen).split(16) for e in (1, 2)}
    train_student(b, images, text, None, **common,
                  epoch_batches=lambda e: ((i, images[i], text[i]) for i in orders[e]))
    assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))


def test_pretraining_streams_the_pretrain_split(tmp_path, no_whole_decode, monkeypatch):
    """Streamed, a pretraining run sees every full batch of the pretrain split without decoding it whole."""
    from ptmst_ray.models import pretrain as model_pretrain
    from ptmst_ray.stages.pretrain import pretrain_run

    cfg = _run(tmp_path, **{"data.stream": "on", "pretrain.enabled": True, "pretrain.batch_size": 16,
                            "model.pretrained": str(tmp_path / "clip.safetensors")})
    seen: list = []
    real = model_pretrain.pretrain_clip

    def recording(model_cfg, run_cfg, images, captions, **kw):
        batches = kw["epoch_batches"]
        kw["epoch_batches"] = lambda e: ((seen.append(r) or r, x) for r, x in batches(e))
        return real(model_cfg, run_cfg, images, captions, **kw)

    monkeypatch.setattr(model_pretrain, "pretrain_clip", recording)
    state = pretrain_run(cfg, cfg.pretrain)
    assert state and all(len(r) == 16 for r in seen) and len(seen) == 120 // 16
    assert len(torch.cat(seen).unique()) == len(seen) * 16  # distinct rows, full batches only (the schedule's steps)


def test_a_gpu_worker_decodes_with_at_least_three_threads(monkeypatch):
    """On a GPU worker (CUDA picked) auto decodes with its torch threads but never fewer than 3: one CPU decodes
    ~300 rows/s at 224 px, NFNet-L0 trains ~720 images/s on an RTX 3090 (bench/RESULTS.md "Train data path")."""
    import torch

    from ptmst_ray import device

    monkeypatch.setattr(device, "pick_device", lambda *a, **k: torch.device("cuda"))
    threads = torch.get_num_threads()
    try:
        for n, expected in ((1, 3), (2, 3), (4, 4)):
            torch.set_num_threads(n)
            assert device.decode_threads(0) == expected, n
        assert device.decode_threads(2) == 2  # a setting wins
    finally:
        torch.set_num_threads(threads)
