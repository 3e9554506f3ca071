"""Reader of the Karpathy/BLIP annotation files, with BLIP's caption normalisation.

Why this file exists: every benchmark (Flickr30k, COCO, CC3M) and the built-in dataset use one
annotation format, and every later stage depends on the exact caption text (the text cache is
keyed by it). A bad row must stop the run with a message naming the file and row, or, with
``skip_bad``, be skipped and listed so the manifest records what was left out.

Format: ``<name>_train.json`` is a list of ``{"image": relative_path, "caption": str, ...}``
(one row per caption); ``<name>_val.json`` / ``<name>_test.json`` are lists of
``{"image": relative_path, "caption": [str, ...]}`` (one row per image).
"""

from __future__ import annotations

import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Literal

from ptmst_ray import storage

log = logging.getLogger(__name__)

ANNOTATION_FILES = {
    "flickr30k": "flickr30k_{split}.json",
    "coco": "coco_karpathy_{split}.json",
    "cc3m": "cc3m_captions_{split}.json",
    "builtin": "builtin_{split}.json",
}
"""Benchmark file names per dataset; ``{split}`` is train, val, test (or pretrain for builtin)."""

PAIR_SPLITS = ("train", "pretrain")
"""Splits in the train shape (one row per caption); every other split is an evaluation split."""

NORMALIZATION = "blip_pre_caption_v1"
"""Name of the caption normalisation below; part of every cache key that depends on caption text."""

_PUNCT = re.compile(r"([.!\"()*#:;~])")
_SPACES = re.compile(r"\s{2,}")


class DataError(ValueError):
    """Bad input data (annotation row, image file); the message names the file, the row and the fix."""


def normalize_caption(text: str, max_words: int = 30) -> str:
    """BLIP's ``pre_caption``: lower-case, ``.!"()*#:;~`` -> space, collapse space runs, trim, cut words."""
    text = _PUNCT.sub(" ", text.lower())
    text = _SPACES.sub(" ", text)
    text = text.rstrip("\n").strip(" ")
    words = text.split(" ")
    if len(words) > max_words:
        text = " ".join(words[:max_words])
    return text


def annotation_name(dataset: str, split: str) -> str:
    """The benchmark file name of ``split`` (e.g. ``coco_karpathy_test.json``)."""
    if dataset not in ANNOTATION_FILES:
        raise DataError(f"unknown dataset {dataset!r}; expected one of {', '.join(ANNOTATION_FILES)}")
    return ANNOTATION_FILES[dataset].format(split=split)


def split_kind(split: str) -> Literal["pairs", "eval"]:
    """``pairs`` (train shape: caption is a string) or ``eval`` (caption is a list of strings)."""
    return "pairs" if split in PAIR_SPLITS else "eval"


@dataclass(frozen=True)
class PairRow:
    """One train row: an image and one caption."""

    row: int
    image: str
    caption: str
    image_id: str


@dataclass(frozen=True)
class EvalRow:
    """One val/test row: an image and all of its captions."""

    row: int
    image: str
    captions: list[str]
    image_id: str


@dataclass
class Annotations:
    """The rows of one annotation file plus the rows skipped (``{file, row, reason}``)."""

    url: str
    kind: Literal["pairs", "eval"]
    rows: list[PairRow | EvalRow] = field(default_factory=list)
    skipped: list[dict[str, Any]] = field(default_factory=list)

    @property
    def num_captions(self) -> int:
        return sum(1 if isinstance(r, PairRow) else len(r.captions) for r in self.rows)


def _load_list(url: str) -> list:
    try:
        text = storage.read_text(url)
    except storage.StorageError:
        raise DataError(f"{url}: annotation file not found; check data.annotations points at its folder") from None
    except UnicodeDecodeError as e:
        raise DataError(f"{url}: not UTF-8 text ({e}); is this really an annotation JSON file?") from None
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise DataError(f"{url}: malformed JSON at line {e.lineno} column {e.colno} ({e.msg}); fix or re-download the file") from None
    if not isinstance(data, list):
        raise DataError(f"{url}: expected a JSON list of rows, got {type(data).__name__}; is this a Karpathy/BLIP annotation file?")
    return data


def _caption(value: Any, max_words: int, what: str) -> str:
    if not isinstance(value, str):
        raise ValueError(f"{what} is {type(value).__name__}, expected a string")
    text = normalize_caption(value, max_words)
    if not text.strip():
        raise ValueError(f"{what} is empty after normalisation ({value!r}); remove the row or fix its text")
    return text


def _parse_row(item: Any, i: int, kind: str, max_words: int) -> PairRow | EvalRow:
    """One row, or ValueError with the reason (without file/row, added by the caller)."""
    if not isinstance(item, dict):
        raise ValueError(f"expected an object with 'image' and 'caption', got {type(item).__name__}")
    missing = [k for k in ("image", "caption") if k not in item]
    if missing:
        raise ValueError(f"missing key(s) {', '.join(repr(k) for k in missing)}")
    image = item["image"]
    if not isinstance(image, str) or not image:
        raise ValueError(f"'image' must be a non-empty relative path, got {image!r}")
    image_id = str(item.get("image_id", image))
    cap = item["caption"]
    if kind == "pairs":
        if isinstance(cap, list):
            raise ValueError("'caption' is a list (val/test shape) in a train-shape file; "
                             "train files have one caption string per row (did you pass a val/test file?)")
        return PairRow(i, image, _caption(cap, max_words, "'caption'"), image_id)
    if isinstance(cap, str):
        raise ValueError("'caption' is a string (train shape) in a val/test file; "
                         "val/test rows need a list of captions per image (did you pass a train file?)")
    if not isinstance(cap, list) or not cap:
        raise ValueError(f"'caption' must be a non-empty list of strings, got {cap!r}")
    caps = [_caption(c, max_words, f"'caption'[{j}]") for j, c in enumerate(cap)]
    return EvalRow(i, image, caps, image_id)


def read_annotations(
    url: str,
    kind: Literal["pairs", "eval"],
    max_words: int = 30,
    skip_bad: bool = False,
    max_rows: int | None = None,
) -> Annotations:
    """Read one annotation file; captions are normalised. Bad rows raise :class:`DataError`
    (naming file, row and reason) unless ``skip_bad``, which skips and lists them instead."""
    data = _load_list(url)
    if max_rows is not None:
        data = data[:max_rows]
    out = Annotations(url=url, kind=kind)
    for i, item in enumerate(data):
        try:
            out.rows.append(_parse_row(item, i, kind, max_words))
        except ValueError as e:
            if not skip_bad:
                raise DataError(f"{url}: row {i}: {e} (or set data.skip_bad=true to skip bad rows)") from None
            out.skipped.append({"file": url, "row": i, "reason": str(e)})
    if out.skipped:
        log.warning("%s: skipped %d bad row(s), first: row %d: %s",
                    url, len(out.skipped), out.skipped[0]["row"], out.skipped[0]["reason"])
    if not out.rows:
        raise DataError(f"{url}: no usable rows; check that this is a non-empty {kind} annotation file")
    return out


def read_split(folder: str, dataset: str, split: str, max_words: int = 30, skip_bad: bool = False,
               max_rows: int | None = None) -> Annotations:
    """Read ``<folder>/<benchmark name of split>`` with the shape implied by the split name."""
    url = storage.join(folder, annotation_name(dataset, split))
    return read_annotations(url, split_kind(split), max_words, skip_bad, max_rows)
