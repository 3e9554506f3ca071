"""Preparation to Parquet shards and loading back: round trips, bad images, skip_bad, interruption."""

from __future__ import annotations

import json
import uuid

import fsspec
import pytest
import torch

from ptmst_ray import storage
from ptmst_ray.config import BuiltinDataConfig, DataConfig
from ptmst_ray.data import prepare
from ptmst_ray.data.annotations import DataError
from ptmst_ray.data.dataset import PairSet, TestSet, denormalize_images, load_split, normalize_images
from ptmst_ray.data.show import contact_sheet, summarize


def _flickr_cfg(folder, **kw) -> DataConfig:
    return DataConfig(dataset="flickr30k", annotations=str(folder), image_size=16, shard_rows=5, **kw)


@pytest.fixture
def mem_root():
    root = f"memory://ptmst-data-{uuid.uuid4().hex[:8]}"
    yield root
    fs = fsspec.filesystem("memory")
    if fs.exists(root[len("memory://"):]):
        fs.rm(root[len("memory://"):], recursive=True)


def test_flickr_round_trip_memory(tiny_flickr_dir, mem_root):
    cfg = _flickr_cfg(tiny_flickr_dir)
    m = prepare.prepare_dataset(cfg, mem_root)
    assert set(m["splits"]) == {"train", "test", "val"}
    assert m["splits"]["test"] == {**m["splits"]["test"], "rows": 12, "images": 12, "captions": 60, "skipped": 0}
    assert m["splits"]["train"]["rows"] == 60 and m["splits"]["train"]["images"] == 12

    raw = json.loads((tiny_flickr_dir / "flickr30k_test.json").read_text())
    test = load_split(mem_root, "test")
    assert isinstance(test, TestSet) and test.images.shape == (12, 3, 16, 16) and test.images.dtype == torch.uint8
    assert len(test.captions) == 60 and test.txt2img.tolist() == [i for i in range(12) for _ in range(5)]
    assert test.captions[5] == raw[1]["caption"][0].lower().replace(".", "").strip()
    assert test.image_ids[1] == raw[1]["image"]
    # placeholder k is a solid colour: the pixels survive the resize
    assert test.images[1, :, 3, 3].tolist() == [20, 100, 190]

    train = load_split(mem_root, "train")
    assert isinstance(train, PairSet) and len(train) == 60 and train.images.shape[0] == 12
    assert train.image_index.tolist() == [i for i in range(12) for _ in range(5)]
    man = storage.read_manifest(storage.join(mem_root, "train"))
    assert len([f for f in man["files"] if f.startswith("images-")]) == 3  # 12 images / 5 per shard
    assert len([f for f in man["files"] if f.startswith("captions-")]) == 12



def test_data_of_your_own_reads_train_val_test_json(tiny_flickr_dir, tmp_path):
    """`data.dataset: karpathy`: the same annotation format under the names train.json, val.json (optional) and
    test.json prepares the same splits as the benchmark's own file names."""
    own = tmp_path / "own"
    own.mkdir()
    for split in ("train", "test"):  # no val.json: evaluation then selects on test, as for data without val
        (own / f"{split}.json").write_bytes((tiny_flickr_dir / f"flickr30k_{split}.json").read_bytes())
    bench = prepare.prepare_dataset(_flickr_cfg(tiny_flickr_dir), str(tmp_path / "bench"))
    mine = prepare.prepare_dataset(DataConfig(dataset="karpathy", annotations=str(own), images=str(tiny_flickr_dir),
                                              image_size=16, shard_rows=5), str(tmp_path / "mine"))
    assert set(mine["splits"]) == {"train", "test"}
    for split in ("train", "test"):
        assert ({k: v for k, v in mine["splits"][split].items() if k not in ("dataset", "config_hash")}
                == {k: v for k, v in bench["splits"][split].items() if k not in ("dataset", "config_hash")}), split
        a, b = load_split(str(tmp_path / "bench"), split), load_split(str(tmp_path / "mine"), split)
        assert torch.equal(a.images, b.images) and a.captions == b.captions

def test_karpathy_single_file_prepares_as_the_per_split_files(tiny_flickr_dir, tmp_path):
    """Karpathy's dataset_flickr30k.json (images split test / val / train / restval; paths the file names) prepares
    the same splits as BLIP's per-split files written by hand from the same rows (train = train + restval)."""
    rows = {s: json.loads((tiny_flickr_dir / f"flickr30k_{s}.json").read_text()) for s in ("test", "val")}
    name = lambda r: r["image"].rsplit("/", 1)[1]  # noqa: E731
    splits = [("test", r) for r in rows["test"]] + [
        ("val" if k < 4 else "train" if k < 8 else "restval", r) for k, r in enumerate(rows["val"])]
    karpathy, blip = tmp_path / "karpathy", tmp_path / "blip"
    karpathy.mkdir(), blip.mkdir()
    (karpathy / "dataset_flickr30k.json").write_text(json.dumps({"dataset": "flickr30k", "images": [
        {"filename": name(r), "imgid": j, "split": s, "sentences": [{"raw": c, "tokens": c.split()} for c in r["caption"]]}
        for j, (s, r) in enumerate(splits)]}))
    (blip / "flickr30k_test.json").write_text(json.dumps([{"image": name(r), "caption": r["caption"]}
                                                          for s, r in splits if s == "test"]))
    (blip / "flickr30k_val.json").write_text(json.dumps([{"image": name(r), "caption": r["caption"]}
                                                         for s, r in splits if s == "val"]))
    (blip / "flickr30k_train.json").write_text(json.dumps([{"image": name(r), "caption": c} for s, r in splits
                                                           if s in ("train", "restval") for c in r["caption"]]))
    images = str(tiny_flickr_dir / "flickr30k-images")
    got, ref = (prepare.prepare_dataset(DataConfig(dataset="flickr30k", annotations=str(d), images=images,
                                                   image_size=16, shard_rows=5), str(tmp_path / d.name / "out"))
                for d in (karpathy, blip))
    assert set(got["splits"]) == set(ref["splits"]) == {"train", "val", "test"}
    assert [got["splits"][s]["rows"] for s in ("train", "val", "test")] == [40, 4, 12]
    for split in ("train", "val", "test"):
        a, b = (load_split(str(tmp_path / d.name / "out"), split) for d in (karpathy, blip))
        assert torch.equal(a.images, b.images) and a.captions == b.captions and a.image_ids == b.image_ids, split
        if split == "train":
            assert torch.equal(a.image_index, b.image_index)
        else:
            assert torch.equal(a.txt2img, b.txt2img)
        manifest = storage.read_manifest(str(tmp_path / "karpathy" / "out" / split))
        assert manifest["source"].endswith("dataset_flickr30k.json")


def test_data_of_your_own_in_karpathys_layout_without_val(tiny_flickr_dir, tmp_path):
    """`data.dataset: karpathy` reads a folder's one file in Karpathy's layout (here named as his Flickr8k file);
    without val images it prepares train and test alone, as data of your own without val.json."""
    rows = json.loads((tiny_flickr_dir / "flickr30k_test.json").read_text())
    own = tmp_path / "own"
    own.mkdir()
    (own / "dataset_flickr8k.json").write_text(json.dumps({"images": [
        {"filename": r["image"], "split": "test" if k < 4 else "train", "sentences": [{"raw": c} for c in r["caption"]]}
        for k, r in enumerate(rows)]}))
    m = prepare.prepare_dataset(DataConfig(dataset="karpathy", annotations=str(own), images=str(tiny_flickr_dir),
                                           image_size=16, shard_rows=5), str(tmp_path / "out"))
    assert set(m["splits"]) == {"train", "test"}
    assert [m["splits"][s]["rows"] for s in ("train", "test")] == [5 * (len(rows) - 4), 4]
    assert load_split(str(tmp_path / "out"), "test").image_ids == [r["image"] for r in rows[:4]]


def test_rerun_skips_and_settings_change_redoes(tiny_flickr_dir, tmp_path, monkeypatch):
    cfg = _flickr_cfg(tiny_flickr_dir)
    out = str(tmp_path / "test")
    m1 = prepare.prepare_split(cfg, "test", out)
    monkeypatch.setattr(prepare, "_load_image", lambda *a: (_ for _ in ()).throw(AssertionError("redone")))
    assert prepare.prepare_split(cfg, "test", out) == m1
    monkeypatch.undo()
    m2 = prepare.prepare_split(_flickr_cfg(tiny_flickr_dir, max_words=3), "test", out)
    assert m2["config_hash"] != m1["config_hash"]
    assert all(len(c.split()) <= 3 for c in load_split(str(tmp_path), "test").captions)


def test_interrupted_split_leaves_no_manifest_and_rerun_finishes(tiny_flickr_dir, tmp_path, monkeypatch):
    cfg = _flickr_cfg(tiny_flickr_dir)
    calls = {"n": 0}
    real = prepare._load_image

    def flaky(url, size):
        calls["n"] += 1
        if calls["n"] == 8:
            raise KeyboardInterrupt("simulated crash")
        return real(url, size)

    monkeypatch.setattr(prepare, "_load_image", flaky)
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_dataset(cfg, str(tmp_path))
    assert storage.read_manifest(str(tmp_path / "train")) is None
    assert storage.read_manifest(str(tmp_path)) is None
    assert storage.exists(str(tmp_path / "train" / "images-00000.parquet"))  # a partial output exists
    with pytest.raises(storage.StorageError, match="ptmst-ray data prepare"):
        load_split(str(tmp_path), "train")
    monkeypatch.undo()
    m = prepare.prepare_dataset(cfg, str(tmp_path))
    assert m["splits"]["train"]["rows"] == 60
    assert len(load_split(str(tmp_path), "train")) == 60


def _break_image(folder, split, k, data: bytes | None):
    raw = json.loads((folder / f"flickr30k_{split}.json").read_text())
    path = folder / raw[k]["image"]
    if data is None:
        path.unlink()
    else:
        path.write_bytes(data)
    return raw[k]["image"]


@pytest.mark.parametrize("data,what", [(None, "not found"), (b"\x89PNG\r\n\x1a\nthis is not an image", "not a readable image")])
def test_bad_image_names_file_and_row(tiny_flickr_dir, tmp_path, data, what):
    name = _break_image(tiny_flickr_dir, "test", 4, data)
    with pytest.raises(DataError) as e:
        prepare.prepare_split(_flickr_cfg(tiny_flickr_dir), "test", str(tmp_path / "test"))
    msg = str(e.value)
    assert "flickr30k_test.json: row 4" in msg and name in msg and what in msg
    assert storage.read_manifest(str(tmp_path / "test")) is None


def test_skip_bad_counts(tiny_flickr_dir, tmp_path, caplog):
    _break_image(tiny_flickr_dir, "val", 2, None)  # val image 2 is also train image 2 (5 rows)
    broken = _break_image(tiny_flickr_dir, "test", 7, b"garbage")
    train_ann = json.loads((tiny_flickr_dir / "flickr30k_train.json").read_text())
    train_ann[0]["caption"] = "..."
    (tiny_flickr_dir / "flickr30k_train.json").write_text(json.dumps(train_ann))
    cfg = _flickr_cfg(tiny_flickr_dir, skip_bad=True)
    m = prepare.prepare_dataset(cfg, str(tmp_path))
    assert m["splits"]["test"]["skipped"] == 1 and m["splits"]["test"]["images"] == 11
    assert m["splits"]["val"]["skipped"] == 1
    assert m["splits"]["train"]["skipped"] == 6 and m["splits"]["train"]["rows"] == 54
    man = storage.read_manifest(str(tmp_path / "train"))
    assert sorted(s["row"] for s in man["skipped"]) == [0, 10, 11, 12, 13, 14]
    train = load_split(str(tmp_path), "train")
    assert train.images.shape[0] == 11 and int(train.image_index.max()) == 10
    test = load_split(str(tmp_path), "test")
    assert len(test.captions) == 55 and int(test.txt2img.max()) == 10
    # every skip is said where it happens: the caption row while the annotations are read, the rows whose image
    # is missing or unreadable while the images are
    said = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert any("flickr30k_train.json: skipped 1 bad row(s), first: row 0:" in m for m in said), said
    assert any("flickr30k_train.json: skipped 5 bad row(s), first: row 10:" in m for m in said), said
    assert any("flickr30k_test.json: skipped 1 bad row(s), first: row 7:" in m and broken in m for m in said), said


def test_corrupt_shard_detected(tiny_flickr_dir, tmp_path):
    prepare.prepare_split(_flickr_cfg(tiny_flickr_dir), "test", str(tmp_path / "test"))
    (tmp_path / "test" / "images-00001.parquet").write_bytes(b"tampered")
    with pytest.raises(storage.StorageError, match="content hash does not match"):
        load_split(str(tmp_path), "test")


def test_max_train_rows(tiny_flickr_dir, tmp_path):
    m = prepare.prepare_split(_flickr_cfg(tiny_flickr_dir, max_train_rows=13), "train", str(tmp_path / "train"))
    assert m["rows"] == 13 and m["images"] == 3


def test_builtin_prepare_dataset_and_show(tmp_path, monkeypatch):
    cfg = DataConfig(builtin=BuiltinDataConfig(train_images=30, test_images=10, pretrain_images=20), shard_rows=16)
    seen = []
    m = prepare.prepare_dataset(cfg, str(tmp_path), progress=lambda s, d, t: seen.append(s))
    assert {"source", "train", "test", "pretrain"} <= set(seen)
    assert m["splits"]["train"]["rows"] == 60 and m["splits"]["test"]["captions"] == 50
    assert m["splits"]["pretrain"]["images"] == 20
    train = load_split(str(tmp_path), "train")
    assert train.images.shape == (30, 3, 32, 32)
    x = normalize_images(train.images[:4])
    assert x.dtype == torch.float32 and torch.equal(denormalize_images(x), train.images[:4])
    # `data show` never decodes a whole split: the summary reads captions and ids, the sheet only its images
    from ptmst_ray.data import dataset

    test = load_split(str(tmp_path), "test")
    decoded = []
    decode = dataset.decode_png
    monkeypatch.setattr(dataset, "decode_png", lambda data: decoded.append(1) or decode(data))
    s = summarize(str(tmp_path))
    assert decoded == []
    assert s["splits"]["test"]["images"] == 10 and len(s["splits"]["test"]["samples"]) == 3
    test = load_split(str(tmp_path), "test")
    assert s["splits"]["test"]["samples"][1] == {"image_id": test.image_ids[int(test.txt2img[1])],
                                                 "caption": test.captions[1]}
    assert s["splits"]["train"]["samples"][0]["image_id"] == train.image_ids[int(train.image_index[0])]
    decoded.clear()
    out = contact_sheet(str(tmp_path), "test", str(tmp_path / "sheet.png"), n=8)
    assert len(decoded) == 8  # the 8 images drawn, not the split's 10
    from PIL import Image

    with Image.open(out) as im:
        assert im.size[0] >= 4 * 128
        first = Image.fromarray(test.images[int(test.txt2img[0])].permute(1, 2, 0).numpy()).resize(
            (128, 128), Image.Resampling.NEAREST)
        assert list(im.convert("RGB").crop((4, 4, 132, 132)).getdata()) == list(first.getdata())
    assert prepare.prepare_dataset(cfg, str(tmp_path)) == m


def test_unprepared_split_error(tmp_path):
    with pytest.raises(storage.StorageError, match="run `ptmst-ray data prepare`"):
        load_split(str(tmp_path), "test")


def _noise_flickr(folder, n: int, size: int = 48):
    """A Flickr30k-layout train file over ``n`` distinct noise PNGs (incompressible), 2 captions each."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(n)
    folder.mkdir(parents=True)
    rows = []
    for i in range(n):
        Image.fromarray(rng.integers(0, 256, (size, size, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        rows += [{"image": f"{i}.png", "caption": f"picture {i} view {c}"} for c in range(2)]
    (folder / "flickr30k_train.json").write_text(json.dumps(rows))
    return folder


def test_memory_bounded_by_row_group_not_by_split_size(tmp_path, monkeypatch):
    """Issue #3: what a split's preparation holds (annotation rows, images) does not grow with the split."""
    import tracemalloc

    import pyarrow.parquet as pq

    monkeypatch.setattr(prepare, "ROW_GROUP_BYTES", 64 << 10)  # 2-3 prepared images per row group
    peaks = {}
    for n in (4, 40, 160):  # the first run only warms up (first-use allocations of PIL and pyarrow)
        folder = _noise_flickr(tmp_path / f"src{n}", n, size=96)
        cfg = DataConfig(dataset="flickr30k", annotations=str(folder), image_size=96, shard_rows=100_000)
        out = tmp_path / f"out{n}"
        tracemalloc.start()
        try:
            result = prepare.prepare_split(cfg, "train", str(out))
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert result["images"] == n and result["captions"] == 2 * n
        assert sorted(result["files"]) == ["captions-00000.parquet", "images-00000.parquet"]  # one shard each
        shard = pq.ParquetFile(out / "images-00000.parquet")
        assert shard.num_row_groups >= n // 3
        assert shard.read(columns=["image_index"]).column(0).to_pylist() == list(range(n))
    # noise does not compress: one prepared image is about 27 KB, so both shards are over the 1 MiB
    # that hashing a finished shard reads at a time; holding every image (the old whole-shard
    # buffer) would add 120 images from 40 to 160; allow a tenth of that
    png = 96 * 96 * 3
    assert peaks[160] - peaks[40] < 12 * png, peaks


def test_split_preparation_streams_annotation_rows(tmp_path, monkeypatch):
    """The annotation rows are not held for the whole split: 10x the rows, about the same peak.

    Images are shared by many rows here (the images' name -> index map, which does grow, is small),
    so what would grow is the rows themselves: about 0.3 KB each when held as a list."""
    import tracemalloc

    from ptmst_ray.data import annotations

    monkeypatch.setattr(annotations, "CHUNK_BYTES", 16 << 10)  # several chunks even for the small file
    src = _noise_flickr(tmp_path / "src", 4, size=16)
    peaks = {}
    for n in (200, 2_000, 20_000):  # the first run only warms up
        rows = [{"image": f"{i % 4}.png", "caption": f"caption number {i} of a long and wordy file"} for i in range(n)]
        (src / "flickr30k_train.json").write_text(json.dumps(rows))
        cfg = DataConfig(dataset="flickr30k", annotations=str(src), image_size=16)
        tracemalloc.start()
        try:
            m = prepare.prepare_split(cfg, "train", str(tmp_path / f"out{n}"))
            peaks[n] = tracemalloc.get_traced_memory()[1]
        finally:
            tracemalloc.stop()
        assert m["rows"] == n and m["images"] == 4
    # a list of 18,000 more parsed rows would hold several MB (measured: about 0.3 KB per row)
    assert peaks[20_000] - peaks[2_000] < (1 << 20), peaks


def test_interrupted_mid_shard_leaves_no_partial_or_temporary_file(tmp_path, monkeypatch):
    folder = _noise_flickr(tmp_path / "src", 30)
    cfg = DataConfig(dataset="flickr30k", annotations=str(folder), image_size=48, shard_rows=100_000)
    monkeypatch.setattr(prepare, "ROW_GROUP_BYTES", 16 << 10)
    real, calls = prepare._load_image, {"n": 0}

    def flaky(url, size):
        calls["n"] += 1
        if calls["n"] == 20:  # after several row groups of the still-open shard were written
            raise KeyboardInterrupt("simulated crash")
        return real(url, size)

    monkeypatch.setattr(prepare, "_load_image", flaky)
    out = tmp_path / "train"
    with pytest.raises(KeyboardInterrupt):
        prepare.prepare_split(cfg, "train", str(out))
    assert sorted(p.name for p in out.iterdir()) == []


def _split_files(root) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*.parquet"))}


def _prepare_both(folder, tmp_path, monkeypatch, **kw):
    """The same dataset prepared in this process and by 2 Ray workers (2 images per task: many batches,
    several in flight); returns both dataset manifests and output roots."""
    from ptmst_ray.data import parallel

    monkeypatch.setattr(parallel, "BATCH_IMAGES", 2)
    cfg = _flickr_cfg(folder, **kw)
    one, two = tmp_path / "one", tmp_path / "two"
    m1 = prepare.prepare_dataset(cfg, str(one))
    m2 = prepare.prepare_dataset(_flickr_cfg(folder, workers=2, **kw), str(two))
    return m1, m2, one, two


def test_ray_workers_write_identical_shards(tiny_flickr_dir, tmp_path, monkeypatch, ray_session):
    """Issue #3: decoding spread over Ray workers gives the same manifests, content hashes and shard bytes."""
    m1, m2, one, two = _prepare_both(tiny_flickr_dir, tmp_path, monkeypatch)
    assert m1 == m2 and set(m1["splits"]) == {"train", "test", "val"}
    for split in m1["splits"]:
        assert storage.read_manifest(str(one / split)) == storage.read_manifest(str(two / split))
    files = _split_files(one)
    assert files == _split_files(two) and len(files) == 3 + 12 + 3 + 3
    # the in-process output is itself checked against the annotations in test_flickr_round_trip_memory
    assert load_split(str(two), "test").image_ids == load_split(str(one), "test").image_ids


@pytest.mark.parametrize("data,what", [(None, "not found"), (b"garbage", "not a readable image")])
def test_ray_workers_bad_image_same_error(tiny_flickr_dir, tmp_path, monkeypatch, ray_session, data, what):
    from ptmst_ray.data import parallel

    monkeypatch.setattr(parallel, "BATCH_IMAGES", 2)
    name = _break_image(tiny_flickr_dir, "test", 4, data)
    errors = []
    for workers in (1, 2):
        with pytest.raises(DataError) as e:
            prepare.prepare_split(_flickr_cfg(tiny_flickr_dir, workers=workers), "test", str(tmp_path / f"t{workers}"))
        errors.append(str(e.value))
        assert storage.read_manifest(str(tmp_path / f"t{workers}")) is None
    assert errors[0] == errors[1]
    assert "flickr30k_test.json: row 4" in errors[1] and name in errors[1] and what in errors[1]


def test_ray_workers_skip_bad_same_list(tiny_flickr_dir, tmp_path, monkeypatch, ray_session):
    _break_image(tiny_flickr_dir, "val", 2, None)  # also train image 2 (rows 10-14)
    _break_image(tiny_flickr_dir, "test", 7, b"garbage")
    m1, m2, one, two = _prepare_both(tiny_flickr_dir, tmp_path, monkeypatch, skip_bad=True)
    assert m1 == m2 and m2["splits"]["train"]["skipped"] == 5 and m2["splits"]["test"]["skipped"] == 1
    for split in ("train", "test", "val"):
        assert storage.read_manifest(str(one / split))["skipped"] == storage.read_manifest(str(two / split))["skipped"]
    assert sorted(s["row"] for s in storage.read_manifest(str(two / "train"))["skipped"]) == [10, 11, 12, 13, 14]
    assert _split_files(one) == _split_files(two)


def test_is_prepared_exactly_when_preparing_again_writes_nothing(tiny_flickr_dir, tmp_path):
    """`is_prepared` against what `prepare_dataset` does: True where a second preparation rewrites no split's file
    (only the dataset's manifest, the same), False where it prepares a split (an annotation file changed, a split's
    manifest lost, another setting)."""
    import shutil

    folder = tmp_path / "ann"
    shutil.copytree(tiny_flickr_dir, folder)
    cfg, root = _flickr_cfg(folder), tmp_path / "data"

    def stamps():
        return {str(p): p.stat().st_mtime_ns for p in root.glob("*/*") if p.is_file()}

    assert not prepare.is_prepared(cfg, str(root))
    prepare.prepare_dataset(cfg, str(root))
    before = stamps()
    assert prepare.is_prepared(cfg, str(root))
    prepare.prepare_dataset(cfg, str(root))
    assert stamps() == before  # what True promises
    assert not prepare.is_prepared(_flickr_cfg(folder, max_words=5), str(root))
    (root / "val" / storage.MANIFEST).unlink()
    assert not prepare.is_prepared(cfg, str(root))
    prepare.prepare_dataset(cfg, str(root))
    assert prepare.is_prepared(cfg, str(root))
    test = folder / "flickr30k_test.json"
    test.write_text(test.read_text().replace("}", ', "note": 1}', 1))
    assert not prepare.is_prepared(cfg, str(root))
    before = stamps()
    prepare.prepare_dataset(cfg, str(root))
    assert stamps() != before and prepare.is_prepared(cfg, str(root))


def test_workers_config_is_checked():
    from ptmst_ray.config import ConfigError

    with pytest.raises(ConfigError, match="workers"):
        DataConfig(workers=0)
    assert prepare.data_config_hash(DataConfig(workers=3)) == prepare.data_config_hash(DataConfig())
