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
