"""Reader of the Karpathy/BLIP annotation files, with BLIP's caption normalisation.

Why this file exists: every benchmark (Flickr30k, COCO, CC3M) and the built-in dataset use one
annotation format, and every later stage depends on the exact caption text (the text cache is
keyed by it). A bad row must stop the run with a message naming the file and row, or, with
``skip_bad``, be skipped and listed so the manifest records what was left out. Files are parsed
incrementally (:func:`iter_annotations`), so a reader's memory does not grow with the number of rows
(COCO's train file has 566k).

Format: ``<name>_train.json`` is a list of ``{"image": relative_path, "caption": str, ...}``
(one row per caption); ``<name>_val.json`` / ``<name>_test.json`` are lists of
``{"image": relative_path, "caption": [str, ...]}`` (one row per image). Where a Flickr30k or COCO folder has
no per-split file, Karpathy's single file of the dataset (``dataset_flickr30k.json``, ``dataset_coco.json``) is
read instead, split by its images' ``split`` field into the same rows (:data:`KARPATHY_FILES`).
"""

from __future__ import annotations

import codecs
import json
import logging
import re
from dataclasses import dataclass, field
from typing import Any, Iterator, Literal

from ptmst_ray import storage

log = logging.getLogger(__name__)

ANNOTATION_FILES = {
    "flickr30k": "flickr30k_{split}.json",
    "coco": "coco_karpathy_{split}.json",
    "cc3m": "cc3m_captions_{split}.json",
    "builtin": "builtin_{split}.json",
    "karpathy": "{split}.json",
}
"""Annotation file names per dataset; ``{split}`` is train, val, test (or pretrain for builtin). ``karpathy`` is
data of the user's own in the same format: train.json, test.json and, optionally, val.json."""

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


BLIP_ANNOTATIONS = "https://storage.googleapis.com/sfr-vision-language-research/datasets/"
"""Where BLIP publishes the per-split files of Flickr30k's and COCO's Karpathy splits that this reader (and the
paper's code) takes: ``flickr30k_{train,val,test}.json``, ``coco_karpathy_{train,val,test}.json``."""

REQUIRED_SPLITS = ("train", "test")
"""The annotation files a run needs (val is used where present; pretrain is the built-in data's)."""

KARPATHY_FILES = {"flickr30k": "dataset_flickr30k.json", "coco": "dataset_coco.json"}
"""Karpathy's single file of each split set, ``{"images": [{"filepath"?, "filename", "split", "sentences":
[{"raw": caption}, ...]}, ...]}``: read when the folder has no per-split file. A split's rows are its images'
(train: Karpathy's ``train`` and ``restval``, as in BLIP's train files), the image path ``filepath/filename``
(COCO: ``val2014/COCO_val2014_....jpg``; Flickr30k: the file name), the captions the sentences' ``raw`` text; a
row number in an error is the image's index in ``images``."""

KARPATHY_SPLITS = {"train": ("train", "restval"), "val": ("val",), "test": ("test",)}

_KARPATHY_NAME = re.compile(r"dataset_[^/]*\.json")
"""A file in Karpathy's single-file layout: his ``dataset_flickr8k.json`` and the like, read for data of your own
(``data.dataset: karpathy``) when it is the only one in the folder."""


def _karpathy_files(folder: str) -> list[str]:
    """The names in ``folder`` of Karpathy's single-file layout (none when the folder cannot be listed)."""
    try:
        return sorted(n for n in storage.listdir(folder) if _KARPATHY_NAME.fullmatch(n))
    except (OSError, storage.StorageError):
        return []


def annotation_source(folder: str, dataset: str, split: str) -> str | None:
    """The file ``split`` is read from: its per-split file when ``folder`` has it, else the dataset's Karpathy
    file (:data:`KARPATHY_FILES`; for ``karpathy``, the folder's one ``dataset_*.json``) when the folder has that;
    None when neither is there."""
    url = storage.join(folder, annotation_name(dataset, split))
    if storage.exists(url):
        return url
    if split not in KARPATHY_SPLITS:
        return None
    if dataset in KARPATHY_FILES:
        url = storage.join(folder, KARPATHY_FILES[dataset])
        return url if storage.exists(url) else None
    if dataset == "karpathy" and len(names := _karpathy_files(folder)) == 1:
        return storage.join(folder, names[0])
    return None


def is_karpathy_file(url: str) -> bool:
    """True for a file in Karpathy's single-file layout (read by its images' split field)."""
    return bool(_KARPATHY_NAME.fullmatch(url.rstrip("/").rsplit("/", 1)[-1]))


def has_split(url: str, split: str) -> bool:
    """Whether the annotation file at ``url`` has rows of ``split``: a per-split file has; Karpathy's single file
    when an image's split is one of the split's (read up to the first such image)."""
    if not is_karpathy_file(url):
        return True
    wanted = KARPATHY_SPLITS.get(split, ())
    return any(isinstance(image, dict) and image.get("split") in wanted
               for image in iter_json_list(url, key="images"))


def missing_annotations(dataset: str, folder: str, splits: tuple[str, ...] = REQUIRED_SPLITS) -> str | None:
    """What is wrong with ``folder`` as ``dataset``'s annotation folder (the file of one of ``splits`` missing),
    with where the files come from; None when every one is there."""
    names = [annotation_name(dataset, split) for split in splits]
    missing = [n for n, split in zip(names, splits) if annotation_source(folder, dataset, split) is None]
    if not missing:
        return None
    where = {"flickr30k": f"BLIP's files of the Karpathy splits, {BLIP_ANNOTATIONS}flickr30k_{{train,val,test}}.json"
                          f", or Karpathy's {KARPATHY_FILES['flickr30k']}",
             "coco": f"BLIP's files of the Karpathy splits, {BLIP_ANNOTATIONS}coco_karpathy_{{train,val,test}}.json"
                     f", or Karpathy's {KARPATHY_FILES['coco']}",
             "karpathy": "train.json and test.json of your own, or one file in Karpathy's layout, dataset_*.json "
                         "(README, 'Data of your own')"}.get(dataset)
    text = f"{folder} has no {' or '.join(missing)}"
    if where:
        text += f" ({where})"
    karpathy = _karpathy_files(folder)
    if karpathy and dataset == "karpathy":
        text += f"; it holds {', '.join(karpathy)}: data.dataset karpathy reads such a file when it is the only one"
    elif karpathy:
        other = [d for d, n in KARPATHY_FILES.items() if n == karpathy[0]]
        text += (f"; it holds Karpathy's {karpathy[0]}, " + (f"which is {other[0]}'s: set data.dataset={other[0]}"
                 if other else "which data.dataset=karpathy reads (data of your own)"))
    return text


def split_kind(split: str) -> Literal["pairs", "eval"]:
    """``pairs`` (train shape: caption is a string) or ``eval`` (caption is a list of strings)."""
    return "pairs" if split in PAIR_SPLITS else "eval"


@dataclass(frozen=True, slots=True)
class PairRow:
    """One train row: an image and one caption."""

    row: int
    image: str
    caption: str
    image_id: str


@dataclass(frozen=True, slots=True)
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


CHUNK_BYTES = 1 << 20
"""Annotation files are read this many bytes at a time; only the unparsed tail of a chunk is kept."""

_WS = " \t\n\r"
_NUMBER_CHARS = "0123456789+-.eE"
_FIRST_CHAR_TYPES = {"{": "dict", '"': "str", "t": "bool", "f": "bool", "n": "NoneType"}


class _JsonListReader:
    """Yields the items of the JSON list in a file one at a time (``json.JSONDecoder.raw_decode`` over a
    sliding text buffer), so the file is never held whole; with ``key``, the list is that member of the file's
    top-level object (the object's other members are read and dropped). Errors are :class:`DataError` naming the
    file, with the line and column of the problem as ``json.loads`` would report them."""

    def __init__(self, url: str, chunk_bytes: int, key: str | None = None):
        self.url, self.chunk_bytes, self.key = url, chunk_bytes, key
        self.buf, self.pos, self.eof = "", 0, False
        self.line, self.col = 1, 0  # line of buf[0] and characters before buf[0] on that line
        self._decoder = json.JSONDecoder()
        self._utf8 = codecs.getincrementaldecoder("utf-8")()

    def __iter__(self) -> Iterator[Any]:
        fs, path = storage.filesystem(self.url)
        try:
            f = fs.open(path, "rb")
        except FileNotFoundError:
            raise DataError(f"{self.url}: annotation file not found; check data.annotations points at its folder") from None
        with f:
            self._file = f
            yield from self._items()

    def _more(self) -> bool:
        """Append the next chunk to the buffer (dropping the parsed prefix); False at the end of the file."""
        if self.eof:
            return False
        data = self._file.read(self.chunk_bytes)
        self.eof = not data
        try:
            text = self._utf8.decode(data, final=self.eof)
        except UnicodeDecodeError as e:
            raise DataError(f"{self.url}: not UTF-8 text ({e}); is this really an annotation JSON file?") from None
        newlines = self.buf.count("\n", 0, self.pos)  # position bookkeeping for the parsed prefix
        self.col = self.pos - self.buf.rfind("\n", 0, self.pos) - 1 if newlines else self.col + self.pos
        self.line += newlines
        self.buf, self.pos = self.buf[self.pos:] + text, 0
        return bool(text) or not self.eof

    def _peek(self) -> str:
        """The next non-whitespace character ('' at the end of the file), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf) or not self._more():
                return self.buf[self.pos:self.pos + 1]

    def _malformed(self, msg: str, pos: int) -> DataError:
        newlines = self.buf.count("\n", 0, pos)
        line = self.line + newlines
        col = pos - self.buf.rfind("\n", 0, pos) if newlines else self.col + pos + 1
        return DataError(f"{self.url}: malformed JSON at line {line} column {col} ({msg}); fix or re-download the file")

    def _value(self) -> Any:
        """Decode the value at the cursor, reading more of the file while it may be cut by the chunk end."""
        while True:
            try:
                value, end = self._decoder.raw_decode(self.buf, self.pos)
            except json.JSONDecodeError as e:
                offset = e.pos - self.pos  # reading more moves the item to the buffer's start
                cut = e.msg.startswith("Unterminated string") or e.pos >= len(self.buf) - 6
                if cut and self._more():
                    continue
                raise self._malformed(e.msg, self.pos + offset) from None
            number = isinstance(value, (int, float)) and not isinstance(value, bool)
            if number and not self.buf[end:].strip(_NUMBER_CHARS) and self._more():
                continue  # "12" or "2." at the end of the buffer may continue in the next chunk
            self.pos = end
            return value

    def _items(self) -> Iterator[Any]:
        first = self._peek()
        if first == "\ufeff":
            raise self._malformed("Unexpected UTF-8 BOM; save the file as UTF-8 without a BOM", self.pos)
        want = "[" if self.key is None else "{"
        if first != want:
            if first and (first in _FIRST_CHAR_TYPES or first in "[-" or first.isdigit()):
                kind = "list" if first == "[" else _FIRST_CHAR_TYPES.get(first, "number")
                raise DataError(f"{self.url}: expected " + ("a JSON list of rows" if self.key is None else
                                f"a JSON object with an {self.key!r} list") + f", got {kind}; "
                                "is this a Karpathy/BLIP annotation file?")
            raise self._malformed("Expecting value", self.pos)
        if self.key is None:
            yield from self._list()
        else:
            yield from self._member_list()
        if self._peek() != "":
            raise self._malformed("Extra data", self.pos)

    def _member_list(self) -> Iterator[Any]:
        """The items of the top-level object's ``key`` list (the cursor on the object's ``{``)."""
        found, more = False, not self._open("}")
        while more:
            if self._peek() != '"':
                raise self._malformed("Expecting property name enclosed in double quotes", self.pos)
            name = self._value()
            if self._peek() != ":":
                raise self._malformed("Expecting ':' delimiter", self.pos)
            self.pos += 1
            if name == self.key and not found:
                if self._peek() != "[":
                    raise DataError(f"{self.url}: {self.key!r} is not a list; is this Karpathy's dataset file?")
                found = True
                yield from self._list()
            else:
                self._peek()  # past the whitespace before the value
                self._value()
            more = self._next("}")
        if not found:
            raise DataError(f"{self.url}: no {self.key!r} list in its object; is this Karpathy's dataset file?")

    def _list(self) -> Iterator[Any]:
        """The items of the list whose ``[`` is at the cursor; the cursor ends after its ``]``."""
        more = not self._open("]")
        while more:
            if self._peek() == "":
                raise self._malformed("Expecting value", self.pos)
            yield self._value()
            more = self._next("]")

    def _open(self, close: str) -> bool:
        """Step past a list's or object's opening character; True when it is empty (its ``close`` passed too)."""
        self.pos += 1
        if self._peek() == close:
            self.pos += 1
            return True
        return False

    def _next(self, close: str) -> bool:
        """Step past the separator after an item; False at the end of the list or object (``close``)."""
        sep = self._peek()
        self.pos += 1
        if sep == close:
            return False
        if sep != ",":
            raise self._malformed("Expecting ',' delimiter", self.pos - 1)
        return True


def iter_json_list(url: str, chunk_bytes: int | None = None, key: str | None = None) -> Iterator[Any]:
    """The items of the JSON list stored at ``url`` (with ``key``: of the list that is that member of the stored
    object), parsed incrementally (memory: about two chunks of ``chunk_bytes``, default :data:`CHUNK_BYTES`, plus
    one item)."""
    return iter(_JsonListReader(url, chunk_bytes or CHUNK_BYTES, key))


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


def iter_annotations(
    url: str,
    kind: Literal["pairs", "eval"],
    max_words: int = 30,
    skip_bad: bool = False,
    max_rows: int | None = None,
    skipped: list[dict[str, Any]] | None = None,
) -> Iterator[PairRow | EvalRow]:
    """Stream the rows of one annotation file (captions normalised), parsing the file incrementally:
    memory does not grow with the number of rows. Bad rows raise :class:`DataError` (naming file, row
    and reason) unless ``skip_bad``, which appends ``{file, row, reason}`` to ``skipped`` instead.
    A file without a usable row raises once the stream ends."""
    skipped = [] if skipped is None else skipped
    used = 0
    for i, item in enumerate(iter_json_list(url)):
        if max_rows is not None and i >= max_rows:
            break
        try:
            row = _parse_row(item, i, kind, max_words)
        except ValueError as e:
            if not skip_bad:
                raise DataError(f"{url}: row {i}: {e} (or set data.skip_bad=true to skip bad rows)") from None
            skipped.append({"file": url, "row": i, "reason": str(e)})
            continue
        used += 1
        yield row
    if not used:
        raise DataError(f"{url}: no usable rows; check that this is a non-empty {kind} annotation file")


def _karpathy_rows(image: Any, j: int, kind: str, max_words: int) -> list[PairRow] | list[EvalRow]:
    """The rows of one entry of a Karpathy file's ``images`` (a row per sentence in train, one in val/test), or
    ValueError with the reason."""
    path = image.get("filename")
    if not isinstance(path, str) or not path:
        raise ValueError(f"'filename' must be a non-empty file name, got {path!r}")
    folder = image.get("filepath", "")
    if not isinstance(folder, str):
        raise ValueError(f"'filepath' must be a folder name, got {folder!r}")
    if folder.strip("/"):
        path = f"{folder.strip('/')}/{path}"
    sentences = image.get("sentences")
    if not isinstance(sentences, list) or not sentences:
        raise ValueError(f"'sentences' must be a non-empty list of {{'raw': caption}}, got {sentences!r}")
    caps = []
    for k, sentence in enumerate(sentences):
        if not isinstance(sentence, dict) or "raw" not in sentence:
            raise ValueError(f"'sentences'[{k}] has no 'raw' caption: {sentence!r}")
        caps.append(_caption(sentence["raw"], max_words, f"'sentences'[{k}]['raw']"))
    if kind == "pairs":
        return [PairRow(j, path, c, path) for c in caps]
    return [EvalRow(j, path, caps, path)]


def iter_karpathy(url: str, split: str, max_words: int = 30, skip_bad: bool = False, max_rows: int | None = None,
                  skipped: list[dict[str, Any]] | None = None) -> Iterator[PairRow | EvalRow]:
    """Stream ``split``'s rows out of Karpathy's single file at ``url`` (:data:`KARPATHY_FILES`), in the shape
    the split's per-split file has, parsing the file incrementally. ``max_rows`` counts the rows yielded (a
    caption each in train); a row number (in errors and ``skipped``) is the image's index in ``images``."""
    if split not in KARPATHY_SPLITS:
        raise DataError(f"{url}: Karpathy's file has no split {split!r}; it has {', '.join(KARPATHY_SPLITS)}")
    skipped = [] if skipped is None else skipped
    wanted, kind = KARPATHY_SPLITS[split], split_kind(split)
    used = 0
    for j, image in enumerate(iter_json_list(url, key="images")):
        try:
            if not isinstance(image, dict):
                raise ValueError(f"expected an object with 'filename', 'split' and 'sentences', "
                                 f"got {type(image).__name__}")
            if "split" not in image:
                raise ValueError("missing key 'split' (train, restval, val or test)")
            if image["split"] not in wanted:
                continue
            rows = _karpathy_rows(image, j, kind, max_words)
        except ValueError as e:
            if not skip_bad:
                raise DataError(f"{url}: row {j} (images[{j}]): {e} (or set data.skip_bad=true to skip bad rows)"
                                ) from None
            skipped.append({"file": url, "row": j, "reason": str(e)})
            continue
        for row in rows:
            if max_rows is not None and used >= max_rows:
                return
            used += 1
            yield row
    if not used:
        raise DataError(f"{url}: no usable rows of split {split} (images whose 'split' is "
                        f"{' or '.join(wanted)}); check that this is Karpathy's file of the dataset")


def iter_file(url: str, split: str, max_words: int = 30, skip_bad: bool = False, max_rows: int | None = None,
              skipped: list[dict[str, Any]] | None = None) -> Iterator[PairRow | EvalRow]:
    """Stream ``split``'s rows out of the annotation file at ``url``: a per-split file, or Karpathy's single file
    (:func:`is_karpathy_file`)."""
    if is_karpathy_file(url):
        return iter_karpathy(url, split, max_words, skip_bad, max_rows, skipped)
    return iter_annotations(url, split_kind(split), max_words, skip_bad, max_rows, skipped)


def split_url(folder: str, dataset: str, split: str) -> str:
    """:func:`annotation_source`, or the per-split file's URL when there is none (reading it then says so)."""
    return annotation_source(folder, dataset, split) or storage.join(folder, annotation_name(dataset, split))


def iter_split(folder: str, dataset: str, split: str, max_words: int = 30, skip_bad: bool = False,
               max_rows: int | None = None, skipped: list[dict[str, Any]] | None = None) -> Iterator[PairRow | EvalRow]:
    """Stream ``split``'s rows out of ``folder`` (its per-split file, or the dataset's Karpathy file)."""
    return iter_file(split_url(folder, dataset, split), split, max_words, skip_bad, max_rows, skipped)


def read_annotations(url: str, kind: Literal["pairs", "eval"], max_words: int = 30, skip_bad: bool = False,
                     max_rows: int | None = None) -> Annotations:
    """All rows of one annotation file in memory (small files, tests, inspection); see :func:`iter_annotations`,
    which preparation uses so that memory does not grow with the file."""
    out = Annotations(url=url, kind=kind)
    out.rows.extend(iter_annotations(url, kind, max_words, skip_bad, max_rows, out.skipped))
    warn_skipped(url, out.skipped)
    return out


def warn_skipped(url: str, skipped: list[dict[str, Any]]) -> None:
    """Log how many rows of ``url`` were skipped as bad, and the first reason."""
    if skipped:
        log.warning("%s: skipped %d bad row(s), first: row %d: %s",
                    url, len(skipped), skipped[0]["row"], skipped[0]["reason"])


def read_split(folder: str, dataset: str, split: str, max_words: int = 30, skip_bad: bool = False,
               max_rows: int | None = None) -> Annotations:
    """Read ``split``'s rows out of ``folder`` whole (small files, tests, inspection; see :func:`iter_split`)."""
    url = split_url(folder, dataset, split)
    out = Annotations(url=url, kind=split_kind(split))
    out.rows.extend(iter_file(url, split, max_words, skip_bad, max_rows, out.skipped))
    warn_skipped(url, out.skipped)
    return out
