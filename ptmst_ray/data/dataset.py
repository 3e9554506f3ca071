"""Readers of prepared splits: decoded images (once per image, uint8), captions and their image indices.

Why this file exists: experts, distillation and evaluation all need the same view of a prepared
split, and must refuse to use data that was never completely prepared or was changed since. Each
file is checked against the manifest's sha256 in the same pass that reads it (never hashed and then
fetched a second time). Pixels stay uint8, one copy per distinct image (:class:`ShardImages`);
:class:`ImageRows` hands consumers CLIP-normalised float batches of caption rows, so no per-caption
or float copy of a split ever exists. Reading captions (:func:`read_captions`) touches no pixel.
"""

from __future__ import annotations

import bisect
import contextlib
import io
import logging
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Iterator

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image

from ptmst_ray import storage

log = logging.getLogger(__name__)


@dataclass
class PairSet:
    """A train-shape split: ``images`` (N x 3 x H x W uint8, one per distinct image), and per
    caption row its ``caption`` and ``image_index`` (into ``images``)."""

    images: torch.Tensor
    captions: list[str]
    image_index: torch.Tensor
    image_ids: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.captions)


@dataclass
class TestSet:
    """An evaluation split: ``images`` (N x 3 x H x W uint8), all captions flattened, and
    ``txt2img[j]`` = the image of caption j (LongTensor)."""

    images: torch.Tensor
    captions: list[str]
    txt2img: torch.Tensor
    image_ids: list[str] = field(default_factory=list)
    manifest: dict = field(default_factory=dict)

    __test__ = False  # not a pytest class


def split_dir(data_dir: str, split: str) -> str:
    return storage.join(data_dir, split)


def split_manifest(data_dir: str, split: str, verify: bool = True) -> dict:
    """The split's manifest; raises StorageError (saying what to run) when it is missing or its files changed.

    Readers pass ``verify=False`` and check each file while they read it
    (:func:`ptmst_ray.storage.read_verified`), so a file is fetched once, not hashed in one pass and read in
    a second."""
    d = split_dir(data_dir, split)
    m = storage.read_manifest(d)
    if m is None:
        raise storage.StorageError(
            f"{d}: split {split!r} is not prepared (no manifest); run `ptmst-ray data prepare` first"
        )
    if verify:
        storage.verify_files(d, m["files"])
    return m


def decode_png(data: bytes) -> np.ndarray:
    """PNG bytes -> H x W x 3 uint8 array."""
    with Image.open(io.BytesIO(data)) as im:
        return np.array(im.convert("RGB"), dtype=np.uint8)


@contextlib.contextmanager
def _shard_errors(url: str) -> Iterator[None]:
    """Turn a damaged shard's Arrow / IO error into a StorageError that names the shard and the fix."""
    try:
        yield
    except (pa.ArrowException, OSError) as e:
        raise storage.StorageError(f"{url}: unreadable Parquet shard ({type(e).__name__}: {e}); rebuild it with "
                                   "`ptmst-ray data prepare`", url) from e


def _read_shard(d: str, name: str, columns: list[str], digest: str | None) -> pa.Table:
    """``columns`` of one shard. With ``digest`` the whole file is read once and checked; without it only
    the columns' bytes are fetched (unchecked: a column subset cannot be hashed against the file's sha256)."""
    if digest is not None:
        blob = storage.read_verified(d, name, digest)
        with _shard_errors(storage.join(d, name)):
            return storage.parquet_table(pa.BufferReader(blob), columns, name=storage.join(d, name))
    with _shard_errors(storage.join(d, name)):
        return storage.read_parquet(storage.join(d, name), columns)


def _read_table(d: str, names: list[str], columns: list[str], files: dict | None) -> dict[str, list]:
    out: dict[str, list] = {c: [] for c in columns}
    for name in names:
        table = _read_shard(d, name, columns, files[name] if files is not None else None)
        for c in columns:
            out[c].extend(table.column(c).to_pylist())
    return out


def _shards(m: dict, prefix: str) -> list[str]:
    return sorted(n for n in m["files"] if n.startswith(prefix + "-"))


def image_shards(manifest: dict) -> list[str]:
    """The image shards of a split's manifest, in image order."""
    return _shards(manifest, "images")


def read_image_shard(d: str, name: str, digest: str) -> tuple[int, list[bytes]]:
    """(index of its first image, its encoded images) of one image shard, checked against ``digest`` as read."""
    t = _read_shard(d, name, ["image_index", "png"], digest)
    index = t.column("image_index").to_pylist()
    first = index[0] if index else 0
    _check_order(d, name, index, first)
    return first, t.column("png").to_pylist()


def _decode_into(out: torch.Tensor, start: int, pngs: list[bytes]) -> None:
    for i, data in enumerate(pngs):
        out[start + i] = torch.from_numpy(decode_png(data)).permute(2, 0, 1)


def _check_order(d: str, name: str, got: list[int], want_start: int) -> None:
    if got != list(range(want_start, want_start + len(got))):
        raise storage.StorageError(f"{storage.join(d, name)}: image shards are out of order; rebuild with "
                                   "`ptmst-ray data prepare`")


@dataclass
class SplitCaptions:
    """A split's captions and, per caption, the index of its image (``image_index`` of a pairs split,
    ``txt2img`` of an evaluation split): text only, no pixels."""

    captions: list[str]
    image_index: torch.Tensor


def read_captions(data_dir: str, split: str, manifest: dict | None = None) -> SplitCaptions:
    """The captions of a prepared split without reading a pixel: a pairs split's caption shards (checked
    while read), or the ``captions`` column alone of an evaluation split's image shards."""
    m = manifest if manifest is not None else split_manifest(data_dir, split, verify=False)
    d = split_dir(data_dir, split)
    if m["split_kind"] == "pairs":
        caps = _read_table(d, _shards(m, "captions"), ["image_index", "caption"], m["files"])
        return SplitCaptions(caps["caption"], torch.tensor(caps["image_index"], dtype=torch.long))
    per_image = _read_table(d, _shards(m, "images"), ["captions"], None)["captions"]
    return SplitCaptions([c for cs in per_image for c in cs],
                         torch.tensor([i for i, cs in enumerate(per_image) for _ in cs], dtype=torch.long))


class PairCaptions(Sequence[str]):
    """The first ``n`` captions of a pairs split, read from its caption shards only when asked for.

    Why: a worker needs a split's caption strings only for a few rows (a diverged phase's nearest real
    captions); holding all of them (COCO: 566k Python strings) in every worker would grow with the split.
    ``captions[i]`` and :meth:`take` read the caption column of just the shards holding the rows asked for.
    """

    def __init__(self, d: str, names: list[str], starts: list[int], n: int):
        self.dir, self.names, self.starts, self.n = d, names, starts, n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i):  # type: ignore[override]
        if isinstance(i, slice):
            return self.take(range(*i.indices(self.n)))
        return self.take([i])[0]

    def __iter__(self) -> Iterator[str]:
        for s, name in enumerate(self.names):
            if self.starts[s] >= self.n:
                return
            column = _read_shard(self.dir, name, ["caption"], None).column("caption").to_pylist()
            yield from column[: self.n - self.starts[s]]

    def take(self, rows) -> list[str]:
        """The captions of ``rows`` (in their order), each shard holding some read once."""
        rows = [int(r) for r in rows]
        by_shard: dict[int, list[tuple[int, int]]] = {}
        for k, r in enumerate(rows):
            r = r + self.n if r < 0 else r
            if not 0 <= r < self.n:
                raise IndexError(f"caption row {rows[k]} out of range for {self.n} captions of {self.dir}")
            s = bisect.bisect_right(self.starts, r) - 1
            by_shard.setdefault(s, []).append((k, r - self.starts[s]))
        out: list[str] = [""] * len(rows)
        for s, wanted in by_shard.items():
            column = _read_shard(self.dir, self.names[s], ["caption"], None).column("caption")
            for k, j in wanted:
                out[k] = column[j].as_py()
        return out


def read_caption_index(data_dir: str, split: str, manifest: dict | None = None,
                       rows: int | None = None) -> tuple[torch.Tensor, PairCaptions]:
    """(image index of every caption row, the first ``rows`` (default all) captions read on demand) of a pairs
    split: each caption shard read once and checked against the manifest, its caption strings left unbuilt."""
    m = manifest if manifest is not None else split_manifest(data_dir, split, verify=False)
    d = split_dir(data_dir, split)
    names = _shards(m, "captions")
    index, starts = [], []
    for name in names:
        starts.append(len(index))
        index.extend(_read_shard(d, name, ["image_index"], m["files"][name]).column("image_index").to_pylist())
    n = len(index) if rows is None else min(rows, len(index))
    return torch.tensor(index, dtype=torch.long), PairCaptions(d, names, starts, n)


def iter_captions(data_dir: str, split: str, manifest: dict | None = None) -> Iterator[list[str]]:
    """The captions of a prepared split in order, one shard's at a time (those of :func:`read_captions`, checked
    the same way), so that a reader of every caption holds one shard's strings, not the split's."""
    m = manifest if manifest is not None else split_manifest(data_dir, split, verify=False)
    d = split_dir(data_dir, split)
    if m["split_kind"] == "pairs":
        for name in _shards(m, "captions"):
            yield _read_shard(d, name, ["caption"], m["files"][name]).column("caption").to_pylist()
        return
    for name in _shards(m, "images"):
        yield [c for cs in _read_shard(d, name, ["captions"], None).column("captions").to_pylist() for c in cs]


def read_image_ids(data_dir: str, split: str, manifest: dict | None = None) -> list[str]:
    """Every image's id in order, from the ``image_id`` column alone of the image shards (no pixel read)."""
    m = manifest if manifest is not None else split_manifest(data_dir, split, verify=False)
    return _read_table(split_dir(data_dir, split), _shards(m, "images"), ["image_id"], None)["image_id"]


def load_split(data_dir: str, split: str, verify: bool = True) -> PairSet | TestSet:
    """A prepared split, decoded: :class:`PairSet` for train/pretrain, :class:`TestSet` for val/test.
    Each file is read once (and, with ``verify``, checked against the manifest as it is read)."""
    m = split_manifest(data_dir, split, verify=False)
    d = split_dir(data_dir, split)
    is_pairs = m["split_kind"] == "pairs"
    files = m["files"] if verify else None
    cols = ["image_index", "image_id", "png"] + ([] if is_pairs else ["captions"])
    size = m["image_size"]
    images = torch.empty((m["images"], 3, size, size), dtype=torch.uint8)
    ids: list[str] = []
    per_image: list[list[str]] = []
    for name in _shards(m, "images"):
        t = _read_shard(d, name, cols, files[name] if files is not None else None)
        _check_order(d, name, t.column("image_index").to_pylist(), len(ids))
        if len(ids) + t.num_rows > len(images):
            raise storage.StorageError(f"{storage.join(d, name)}: more images than the manifest's {len(images)}; "
                                       "rebuild with `ptmst-ray data prepare`")
        _decode_into(images, len(ids), t.column("png").to_pylist())
        ids.extend(t.column("image_id").to_pylist())
        if not is_pairs:
            per_image.extend(t.column("captions").to_pylist())
    images = images[: len(ids)]
    if is_pairs:
        caps = _read_table(d, _shards(m, "captions"), ["image_index", "caption"], files)
        return PairSet(images, caps["caption"], torch.tensor(caps["image_index"], dtype=torch.long), ids, m)
    captions = [c for cs in per_image for c in cs]
    txt2img = torch.tensor([i for i, cs in enumerate(per_image) for _ in cs], dtype=torch.long)
    return TestSet(images, captions, txt2img, ids, m)


class ShardImages:
    """A prepared split's images (uint8, N x 3 x H x W) served from its Parquet shards.

    Why: a consumer that needs a few images (a phase's initial real pairs) must not decode the whole split,
    and one that needs all of them (an expert's epochs, the test split's scoring) must decode each image
    once and keep it as uint8 (one copy per image, never per caption, never as float). With ``keep`` the
    first access decodes the whole split once (every shard checked as it is read) and serves from memory;
    without it each access reads just the row groups that hold the requested images.
    """

    def __init__(self, data_dir: str, split: str, manifest: dict | None = None, keep: bool = True):
        m = manifest if manifest is not None else split_manifest(data_dir, split, verify=False)
        self.dir, self.names, self.files, self.keep = split_dir(data_dir, split), _shards(m, "images"), m["files"], keep
        size = int(m["image_size"])
        self.shape = torch.Size((int(m["images"]), 3, size, size))
        self._all: torch.Tensor | None = None
        self._groups: list[tuple[int, str, int, int]] | None = None  # (first image, shard, row group, rows)
        self.decoded = 0
        """Images decoded so far (how much work the reads did: a test checks a phase decodes only n)."""

    def __len__(self) -> int:
        return int(self.shape[0])

    def __getitem__(self, indices: torch.Tensor | slice | int) -> torch.Tensor:
        if self._all is None and self.keep:
            self._all = self.decode_all()
        if self._all is not None:
            return self._all[indices]
        ids = torch.arange(len(self))[indices]
        if ids.dim() == 0:
            return self.read(ids.view(1))[0]
        return self.read(ids)

    def decode_all(self) -> torch.Tensor:
        """Every image, decoded once into one uint8 tensor; each shard is checked against the manifest as read."""
        out = torch.empty(self.shape, dtype=torch.uint8)
        done = 0
        for name in self.names:
            t = _read_shard(self.dir, name, ["image_index", "png"], self.files[name])
            _check_order(self.dir, name, t.column("image_index").to_pylist(), done)
            if done + t.num_rows > len(out):
                raise storage.StorageError(f"{storage.join(self.dir, name)}: more images than the manifest's "
                                           f"{len(out)}; rebuild with `ptmst-ray data prepare`")
            _decode_into(out, done, t.column("png").to_pylist())
            done += t.num_rows
        if done != len(out):
            raise storage.StorageError(f"{self.dir}: {done} images in the shards but {len(out)} in the manifest; "
                                       "rebuild with `ptmst-ray data prepare`")
        self.decoded += done
        return out

    def _row_groups(self) -> list[tuple[int, str, int, int]]:
        """(first image index, shard, row group, rows) of every row group, from the shards' footers."""
        if self._groups is None:
            groups, start = [], 0
            for name in self.names:
                url = storage.join(self.dir, name)
                fs, path = storage.filesystem(url)
                with _shard_errors(url), fs.open(path, "rb") as f:
                    meta = pq.ParquetFile(f).metadata
                for g in range(meta.num_row_groups):
                    rows = meta.row_group(g).num_rows
                    groups.append((start, name, g, rows))
                    start += rows
            self._groups = groups
        return self._groups

    def read(self, ids: torch.Tensor) -> torch.Tensor:
        """The images ``ids`` (any order, repeats allowed), reading only the row groups that hold them."""
        unique, inverse = torch.unique(ids, return_inverse=True)
        groups = self._row_groups()
        starts = [g[0] for g in groups]
        out = torch.empty((len(unique), *self.shape[1:]), dtype=torch.uint8)
        wanted: dict[int, list[tuple[int, int]]] = {}  # group position -> [(row in group, position in unique)]
        for pos, i in enumerate(unique.tolist()):
            if not 0 <= i < len(self):
                raise IndexError(f"{self.dir}: image {i} is out of range (the split has {len(self)} images)")
            g = bisect.bisect_right(starts, i) - 1
            wanted.setdefault(g, []).append((i - starts[g], pos))
        for g, rows in wanted.items():
            first, name, group, _ = groups[g]
            url = storage.join(self.dir, name)
            with _shard_errors(url):
                t = storage.read_parquet(url, ["image_index", "png"], row_group=group)
            index, png = t.column("image_index"), t.column("png")
            for r, pos in rows:
                if index[r].as_py() != first + r:
                    raise storage.StorageError(f"{url}: image shards are out of order; rebuild with "
                                               "`ptmst-ray data prepare`", url)
                out[pos] = torch.from_numpy(decode_png(png[r].as_py())).permute(2, 0, 1)
        self.decoded += len(unique)
        return out[inverse]


class ImageRows:
    """Rows of image pixels as CLIP-normalised float batches, the pixels held once per image as uint8.

    ``images`` (uint8 N_img x 3 x H x W: a tensor or a :class:`ShardImages`) holds each image once;
    ``index`` maps each row (a caption) to its image (None: row i is image i). Indexing with rows
    (a LongTensor, a slice or an int) returns exactly ``normalize_images(images[index[rows]])``: the
    same values as normalising the whole split and then indexing, since normalisation is elementwise,
    but only the batch ever exists as float.
    """

    dtype = torch.float32

    def __init__(self, images: torch.Tensor | ShardImages, index: torch.Tensor | None = None):
        if index is not None and len(index) and (int(index.min()) < 0 or int(index.max()) >= len(images)):
            raise ValueError(f"image index out of range: rows refer to images up to {int(index.max())} but there "
                             f"are {len(images)}")
        self.images, self.index = images, index

    def __len__(self) -> int:
        return len(self.index) if self.index is not None else len(self.images)

    @property
    def shape(self) -> torch.Size:
        """(rows, 3, H, W): the shape of the float tensor the rows would be (never built)."""
        return torch.Size((len(self), *self.images.shape[1:]))

    def pixels(self, rows: torch.Tensor | slice | int) -> torch.Tensor:
        """The rows' uint8 pixels."""
        return self.images[rows] if self.index is None else self.images[self.index[rows]]

    def __getitem__(self, rows: torch.Tensor | slice | int) -> torch.Tensor:
        return normalize_images(self.pixels(rows))


def _mean_std(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP's mean/std shaped for ``x`` (batch or single image). open_clip is imported here, not at the
    top: importing it costs ~280 MiB of RSS, which `data prepare` (it only reads manifests here) need not pay."""
    from ptmst_ray.models.openclip import open_clip

    shape = (3, 1, 1) if x.dim() == 3 else (1, 3, 1, 1)
    return (torch.tensor(open_clip.constants.OPENAI_DATASET_MEAN, device=x.device).view(shape),
            torch.tensor(open_clip.constants.OPENAI_DATASET_STD, device=x.device).view(shape))


def normalize_images(images: torch.Tensor) -> torch.Tensor:
    """uint8 (N x 3 x H x W or 3 x H x W) -> float32 scaled to [0, 1] with CLIP mean/std normalisation."""
    x = images.to(torch.float32, copy=True).div_(255.0)  # one float copy of the batch; in place after it
    mean, std = _mean_std(x)
    return x.sub_(mean).div_(std)


def denormalize_images(x: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`normalize_images` (float in, uint8 out, clamped)."""
    mean, std = _mean_std(x)
    return ((x * std + mean).clamp(0, 1) * 255).round().to(torch.uint8)
