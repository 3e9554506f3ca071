"""Annotation reader and caption normalisation (real Flickr30k files, every bad-input class)."""

from __future__ import annotations

import json
import re

import pytest

from ptmst_ray.data.annotations import (
    DataError, EvalRow, PairRow, iter_json_list, iter_split, normalize_caption, read_annotations, read_split,
)



def blip_pre_caption(caption: str, max_words: int) -> str:
    """BLIP's pre_caption, transcribed independently as the reference."""
    caption = re.sub(r"([.!\"()*#:;~])", " ", caption.lower())
    caption = re.sub(r"\s{2,}", " ", caption)
    caption = caption.rstrip("\n").strip(" ")
    words = caption.split(" ")
    return " ".join(words[:max_words]) if len(words) > max_words else caption


@pytest.mark.parametrize("text,expected", [
    ("A Dog runs.", "a dog runs"),
    ('  "Hi!" (said) *the* #man: yes; ~ok~  ', "hi said the man yes ok"),
    ("Two  men,   one dog", "two men, one dog"),
    ("one two three four five", "one two three"),
])
def test_normalize_caption_examples(text, expected):
    assert normalize_caption(text, max_words=3 if "four" in text else 30) == expected
    assert normalize_caption(text, 3 if "four" in text else 30) == blip_pre_caption(text, 3 if "four" in text else 30)


def test_normalize_matches_blip_on_real_captions(flickr30k):
    rows = json.load(open(f"{flickr30k}/flickr30k_test.json"))
    caps = [c for r in rows[:300] for c in r["caption"]]
    for c in caps:
        for mw in (5, 30):
            assert normalize_caption(c, mw) == blip_pre_caption(c, mw)


@pytest.mark.parametrize("split,images,captions", [("test", 1000, 5000), ("val", 1014, 5070)])
def test_full_flickr_files(split, images, captions, flickr30k):
    ann = read_split(flickr30k, "flickr30k", split)
    assert len(ann.rows) == images and ann.num_captions == captions
    assert all(isinstance(r, EvalRow) and len(r.captions) == 5 for r in ann.rows)
    raw = json.load(open(f"{flickr30k}/flickr30k_{split}.json"))
    assert ann.rows[5].image == raw[5]["image"]
    assert ann.rows[5].captions == [blip_pre_caption(c, 30) for c in raw[5]["caption"]]
    if split == "test":
        assert ann.rows[0].captions[0] == "the man with pierced ears is wearing glasses and an orange hat"
    assert not ann.skipped


def test_train_shape(tiny_flickr_dir):
    ann = read_split(str(tiny_flickr_dir), "flickr30k", "train")
    assert len(ann.rows) == 60 and all(isinstance(r, PairRow) for r in ann.rows)
    ann = read_split(str(tiny_flickr_dir), "flickr30k", "train", max_rows=7)
    assert len(ann.rows) == 7


def _write(tmp_path, name, obj) -> str:
    p = tmp_path / name
    p.write_text(obj if isinstance(obj, str) else json.dumps(obj))
    return str(p)


BAD_TRAIN = [
    ([{"image": "a.png", "caption": "ok"}, {"image": "b.png", "caption": " ..!! "}], 1, "empty"),
    ([{"image": "a.png", "caption": ["x", "y"]}], 0, "val/test shape"),
    ([{"image": "a.png", "caption": "ok"}, {"caption": "no image"}], 1, "missing key"),
    ([{"image": "a.png", "caption": "ok"}, {"image": "b.png"}], 1, "missing key"),
]


@pytest.mark.parametrize("rows,bad_row,reason", BAD_TRAIN)
def test_bad_train_rows_name_file_and_row(tmp_path, rows, bad_row, reason):
    url = _write(tmp_path, "x_train.json", rows)
    with pytest.raises(DataError) as e:
        read_annotations(url, "pairs")
    msg = str(e.value)
    assert url in msg and f"row {bad_row}" in msg and reason in msg and "skip_bad" in msg


def test_eval_file_with_train_shape(tmp_path):
    url = _write(tmp_path, "x_test.json", [{"image": "a.png", "caption": ["a", "b"]}, {"image": "b.png", "caption": "one"}])
    with pytest.raises(DataError, match=r"x_test\.json: row 1: .*train shape"):
        read_annotations(url, "eval")


def test_eval_empty_caption_in_list(tmp_path):
    url = _write(tmp_path, "x_test.json", [{"image": "a.png", "caption": ["fine", "~~~"]}])
    with pytest.raises(DataError, match=r"row 0: 'caption'\[1\] is empty"):
        read_annotations(url, "eval")


def test_malformed_json(tmp_path):
    url = _write(tmp_path, "x_train.json", '[{"image": "a.png", "caption": "x"},')
    with pytest.raises(DataError, match=r"x_train\.json: malformed JSON at line 1"):
        read_annotations(url, "pairs")


def test_missing_file(tmp_path):
    with pytest.raises(DataError, match="annotation file not found"):
        read_annotations(str(tmp_path / "nope.json"), "pairs")


def test_skip_bad_lists_rows(tmp_path):
    rows = [{"image": "a.png", "caption": "ok"}, {"image": "b.png", "caption": ""},
            {"image": "c.png", "caption": ["l"]}, {"image": "d.png", "caption": "fine too"}]
    url = _write(tmp_path, "x_train.json", rows)
    ann = read_annotations(url, "pairs", skip_bad=True)
    assert [r.row for r in ann.rows] == [0, 3]
    assert [(s["file"], s["row"]) for s in ann.skipped] == [(url, 1), (url, 2)]
    assert all(s["reason"] for s in ann.skipped)


def test_memory_url(tmp_path, flickr30k):
    import fsspec

    fs = fsspec.filesystem("memory")
    with fs.open("/ann/flickr30k_test.json", "wb") as f:
        f.write(open(f"{flickr30k}/flickr30k_test.json", "rb").read())
    ann = read_split("memory://ann", "flickr30k", "test")
    assert len(ann.rows) == 1000
    fs.rm("/ann", recursive=True)


# ---------------------------------------------------------------- incremental JSON reader vs json.loads

GOOD_JSON = [
    "[]", " [ ] \n",
    '[1, 2.5e3, -7, true, false, null, "a\\"b\\u00e9c\\\\", {"k": [1, {"z": "é漢"}]}]\n',
    '[\n {"image": "a.png", "caption": "x"},\n {"image": "b.png",\n "caption": ["1", "2"]}\n]\n',
    "[12345678901234567890, 0.000001, 1E+2]", '["\\ud83d\\ude00 😀", ""]',
]
BAD_JSON = [
    '[{"a": 1},', '[{"a": 1}', "[1 2]", "[1,]", "", "hello", "[1] x", "[1]\n]", '[\n{"a":\n 1}\n,\n{"b" 2}]',
    '[{"a": "unterminated}]', '[\n\n  {"a": 1},  {"b": tru}]', '[{"a": "x\\q"}]', '[{"a": 1}}]', "[\n1,\n2\n3]",
    "\ufeff[1]",
]


def _mem_json(text: str) -> str:
    import fsspec

    url = f"memory://json-{abs(hash(text))}/x.json"
    with fsspec.open(url, "wb") as f:
        f.write(text.encode())
    return url


@pytest.mark.parametrize("text", GOOD_JSON)
@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 64])
def test_streamed_json_matches_json_loads(text, chunk):
    """Chunks of 1-5 bytes cut numbers, escapes and multi-byte UTF-8 characters at every place."""
    assert list(iter_json_list(_mem_json(text), chunk_bytes=chunk)) == json.loads(text)


@pytest.mark.parametrize("text", BAD_JSON)
@pytest.mark.parametrize("chunk", [1, 3, 64])
def test_malformed_json_position_matches_json_loads(text, chunk):
    with pytest.raises(json.JSONDecodeError) as ref:
        json.loads(text)
    url = _mem_json(text)
    with pytest.raises(DataError, match=rf"{re.escape(url)}: malformed JSON at line {ref.value.lineno} "
                                        rf"column {ref.value.colno} "):
        list(iter_json_list(url, chunk_bytes=chunk))


@pytest.mark.parametrize("text,got", [('{"image": "a.png"}', "dict"), ('"rows"', "str"), ("12", "number")])
def test_json_that_is_not_a_list(text, got):
    with pytest.raises(DataError, match=f"expected a JSON list of rows, got {got}"):
        list(iter_json_list(_mem_json(text)))


def test_not_utf8(tmp_path):
    url = _write(tmp_path, "x_train.json", "[]")
    (tmp_path / "x_train.json").write_bytes(b'[{"image": "a.png", "caption": "caf\xe9"}]')
    with pytest.raises(DataError, match="not UTF-8 text"):
        read_annotations(url, "pairs")


def test_real_file_streamed_in_small_chunks(flickr30k):
    url = f"{flickr30k}/flickr30k_val.json"
    assert list(iter_json_list(url, chunk_bytes=4096)) == json.load(open(url))


def test_iter_split_streams_rows_and_collects_skipped(tmp_path):
    rows = [{"image": "a.png", "caption": "ok"}, {"image": "b.png", "caption": ""}, {"image": "d.png", "caption": "x"}]
    _write(tmp_path, "flickr30k_train.json", rows)
    skipped: list = []
    stream = iter_split(str(tmp_path), "flickr30k", "train", skip_bad=True, skipped=skipped)
    assert not isinstance(stream, list) and next(stream).image == "a.png"
    assert [r.row for r in stream] == [2] and [s["row"] for s in skipped] == [1]


# ---------------------------------------------------------------- Karpathy's single file (dataset_*.json)

@pytest.mark.parametrize("text", [
    '{"images": [{"a": 1}, {"b": [2, "x"]}], "dataset": "coco"}',
    '{"dataset": "flickr30k", "info": {"images": [9]}, "images": [], "n": 12.5}',
    ' {\n "images" : [ 1 , 2 ]\n}\n', '{"images": ["\\ud83d\\ude00 😀", "é"]}',
])
@pytest.mark.parametrize("chunk", [1, 2, 5, 64])
def test_streamed_member_list_matches_json_loads(text, chunk):
    """``key``: the list under that member of the top-level object, the other members read past (a nested
    object's own "images" is not it), however the chunks cut the file."""
    assert list(iter_json_list(_mem_json(text), chunk_bytes=chunk, key="images")) == json.loads(text)["images"]


@pytest.mark.parametrize("text,error", [
    ('[{"image": "a.png"}]', "expected a JSON object with an 'images' list, got list"),
    ('{"dataset": "coco"}', "no 'images' list in its object"),
    ('{"images": {"a": 1}}', "'images' is not a list"),
    ('{"images": [1, 2] "dataset": "coco"}', None), ('{"images": [1, 2]} x', None), ('{images: [1]}', None),
    ('{"images": [1], "n": }', None),
])
def test_member_list_errors_name_the_file(text, error):
    """The malformed ones at json.loads's line and column."""
    url = _mem_json(text)
    if error is None:
        with pytest.raises(json.JSONDecodeError) as ref:
            json.loads(text)
        error = f"malformed JSON at line {ref.value.lineno} column {ref.value.colno} "
    with pytest.raises(DataError, match=re.escape(f"{url}: {error}")):
        list(iter_json_list(url, chunk_bytes=3, key="images"))


def _karpathy_image(row: dict, split: str, filepath: str | None = None) -> dict:
    """A Karpathy entry (its layout in dataset_flickr30k.json / dataset_coco.json) of a BLIP val/test row."""
    folder, name = row["image"].rsplit("/", 1)
    image = {"filename": name, "imgid": 0, "split": split, "sentids": [0],
             "sentences": [{"tokens": c.lower().split(), "raw": c, "imgid": 0, "sentid": 0} for c in row["caption"]]}
    if filepath is not None:
        image["filepath"] = filepath
    return image


def test_karpathy_file_gives_blip_rows(flickr30k, tmp_path):
    """Karpathy's file split as BLIP's per-split files are: train = train + restval, a caption a row; val and test
    an image a row with its captions; the path filepath/filename; captions normalised as BLIP's."""
    test = json.load(open(f"{flickr30k}/flickr30k_test.json"))[:5]
    val = json.load(open(f"{flickr30k}/flickr30k_val.json"))[:6]
    images = ([_karpathy_image(r, "test", "test2014") for r in test] + [_karpathy_image(val[0], "val")]
              + [_karpathy_image(r, s) for r, s in zip(val[1:], ["train", "restval", "train", "restval", "val"])])
    folder = tmp_path / "ann"
    folder.mkdir()
    (folder / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    d = str(folder)

    got = read_split(d, "coco", "test")
    assert got.url.endswith("dataset_coco.json") and not got.skipped
    assert [(r.row, r.image, r.captions) for r in got.rows] == [
        (j, "test2014/" + r["image"].rsplit("/", 1)[1], [blip_pre_caption(c, 30) for c in r["caption"]])
        for j, r in enumerate(test)]
    assert [(r.row, r.image) for r in read_split(d, "coco", "val").rows] == [
        (5, val[0]["image"].rsplit("/", 1)[1]), (10, val[5]["image"].rsplit("/", 1)[1])]
    train = read_split(d, "coco", "train")
    assert all(isinstance(r, PairRow) for r in train.rows)
    assert [(r.row, r.image, r.caption) for r in train.rows] == [
        (6 + k, val[1 + k]["image"].rsplit("/", 1)[1], blip_pre_caption(c, 30))
        for k in range(4) for c in val[1 + k]["caption"]]
    assert len(list(iter_split(d, "coco", "train", max_rows=7))) == 7  # caption rows, as a per-split file's
    # a per-split file beside it is read, not Karpathy's
    (folder / "coco_karpathy_test.json").write_text(json.dumps(test[:2]))
    assert len(read_split(d, "coco", "test").rows) == 2


def test_karpathy_bad_entries_named_by_their_index(tmp_path):
    good = {"filename": "a.jpg", "split": "train", "sentences": [{"raw": "A dog."}]}
    images = [good, {"filename": "b.jpg", "split": "train", "sentences": []}, "c.jpg",
              {"filename": "d.jpg", "sentences": [{"raw": "x"}]}, {**good, "sentences": [{"tokens": ["x"]}]},
              {**good, "split": "test"}, {**good, "filename": "e.jpg"}]
    url = _write(tmp_path, "dataset_flickr30k.json", {"images": images})
    with pytest.raises(DataError, match=re.escape(f"{url}: row 1 (images[1]): 'sentences' must be a non-empty")):
        read_split(str(tmp_path), "flickr30k", "train")
    ann = read_split(str(tmp_path), "flickr30k", "train", skip_bad=True)
    assert [(r.row, r.image, r.caption) for r in ann.rows] == [(0, "a.jpg", "a dog"), (6, "e.jpg", "a dog")]
    assert [s["row"] for s in ann.skipped] == [1, 2, 3, 4]
    assert [s["reason"].split(" ")[0] for s in ann.skipped] == ["'sentences'", "expected", "missing", "'sentences'[0]"]
    with pytest.raises(DataError, match=r"no usable rows of split val \(images whose 'split' is val\)"):
        read_split(str(tmp_path), "flickr30k", "val", skip_bad=True)


def test_missing_annotations_takes_karpathy_file_and_names_the_other_dataset(tmp_path):
    from ptmst_ray.data.annotations import missing_annotations

    (tmp_path / "dataset_flickr30k.json").write_text('{"images": []}')
    assert missing_annotations("flickr30k", str(tmp_path)) is None
    coco = missing_annotations("coco", str(tmp_path))
    assert "no coco_karpathy_train.json or coco_karpathy_test.json" in coco and "dataset_coco.json" in coco
    assert "dataset_flickr30k.json, which is flickr30k's: set data.dataset=flickr30k" in coco
    assert missing_annotations("karpathy", str(tmp_path)) is None  # data of your own in Karpathy's layout
    (tmp_path / "dataset_flickr8k.json").write_text('{"images": []}')
    own = missing_annotations("karpathy", str(tmp_path))
    assert "no train.json or test.json" in own, own
    assert "it holds dataset_flickr30k.json, dataset_flickr8k.json: data.dataset karpathy reads such a file when it " \
           "is the only one" in own, own
    assert missing_annotations("flickr30k", str(tmp_path)) is None
    (tmp_path / "dataset_flickr30k.json").unlink()
    assert "dataset_flickr8k.json, which data.dataset=karpathy reads" in missing_annotations("flickr30k", str(tmp_path))
