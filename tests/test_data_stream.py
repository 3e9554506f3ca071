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
