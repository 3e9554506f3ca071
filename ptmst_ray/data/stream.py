"""Streaming the caption rows of a prepared pairs split from its Parquet shards, a batch at a time.

Why this file exists: an expert epoch (or a full-data baseline epoch) visits every caption row of the
train split, and at paper scale the split's pixels do not fit in one worker's memory (COCO train is
~68 GB as uint8 at 224 px). :class:`CaptionStream` reads one image shard at a time (checked against
the manifest as it is read), keeps at most ``buffer`` encoded rows in a seeded shuffle buffer and
decodes and normalises only the batch it yields, so a consumer's memory is bounded by the shard size,
the buffer and the batch, not by the split. Every epoch yields each caption row exactly once, in an
order fixed by (seed, epoch): the image shards in a seeded random order, each shard's rows shuffled,
then mixed through the buffer. It is a plain ``torch.utils.data.IterableDataset`` (no Ray), so it runs
wherever a worker runs; the shards may be local or any fsspec URL.

Three things keep training from waiting on it without changing a single batch: ``prefetch`` batches are read
and decoded ahead in a background thread (a thread, not DataLoader worker processes: it works the same
inside a Ray actor, PNG/JPEG decoding and torch release the GIL, and the order stays that of one iterator);
``decode_workers`` > 1 threads decode several batches at once, while that thread alone decides which rows
form each batch (:func:`decoded_ahead`: results in plan order); and a bounded LRU of decoded uint8 images
(``cache_mb``) serves an image's other captions without decoding it again. Why not Ray Data:
docs/design.md "Streaming the train split".
"""

from __future__ import annotations

import bisect
import collections
import queue
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Callable, Iterable, Iterator, TypeVar

import numpy as np
import torch

from ptmst_ray import storage
from ptmst_ray.data import dataset
from ptmst_ray.data.embedfile import gather
from ptmst_ray.data.dataset import (
    image_shards, normalize_images, read_caption_index, read_image_shard, split_dir, split_manifest,
)

T = TypeVar("T")
R = TypeVar("R")

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(caption rows (LongTensor), their images (float, CLIP-normalised, b x 3 x H x W), their text rows)."""


class CaptionStream(torch.utils.data.IterableDataset):
    """Batches of caption rows ``(rows, images, text)`` of a pairs split, streamed in a seeded order per epoch.

    ``text`` holds one row per caption (e.g. the frozen tower's embeddings; text only, small) and is
    indexed by the yielded rows. ``rows`` (default all) streams only caption rows below it (the
    loaders' ``data.max_train_rows``). A last batch smaller than ``min_batch`` is dropped (a contrastive
    loss needs two pairs). Call :meth:`set_epoch` (or :meth:`epoch`) so each epoch gets its own order.
    :meth:`epoch` decodes ``prefetch`` batches ahead in a background thread, with ``decode_workers`` threads
    decoding batches at once when above 1; ``cache_mb`` bounds the decoded images kept for reuse. None of them
    changes the batches.
    """

    def __init__(self, data_dir: str, split: str, text: torch.Tensor, batch_size: int, seed: int,
                 buffer: int = 4096, rows: int | None = None, min_batch: int = 2, prefetch: int = 0,
                 cache_mb: float = 0.0, image_index: torch.Tensor | None = None, decode_workers: int = 1):
        super().__init__()
        if batch_size < 1 or buffer < 1 or decode_workers < 1:
            raise ValueError(f"batch_size, buffer and decode_workers must be >= 1, got {batch_size}, {buffer} and "
                             f"{decode_workers}")
        if prefetch < 0 or cache_mb < 0:
            raise ValueError(f"prefetch and cache_mb must be >= 0, got {prefetch} and {cache_mb}")
        self.dir = split_dir(data_dir, split)
        self.manifest = split_manifest(data_dir, split, verify=False)
        if self.manifest["split_kind"] != "pairs":
            raise ValueError(f"{self.dir}: CaptionStream streams a pairs split (train/pretrain), not {split!r}")
        if image_index is None:  # the caller may pass it (already read), so the caption shards are read once
            image_index = read_caption_index(data_dir, split, self.manifest)[0]
        n = len(image_index) if rows is None else min(rows, len(image_index))
        if len(text) < n:
            raise ValueError(f"{self.dir}: {n} caption rows but only {len(text)} text rows; they must pair up")
        self.text, self.batch_size, self.seed, self.buffer, self.min_batch = text, batch_size, seed, buffer, min_batch
        self.shards = image_shards(self.manifest)
        self.num_rows = n
        # caption rows grouped by their image: rows_by_image[start[i]:start[i + 1]] are image i's rows
        index = image_index[:n]
        order = torch.argsort(index, stable=True)
        self._rows_by_image = order
        self._start = torch.searchsorted(index[order], torch.arange(int(self.manifest["images"]) + 1))
        self._epoch = 0
        self.prefetch, self.decode_workers = prefetch, decode_workers
        self.cache = ImageCache(int(cache_mb * 2**20))
        self._lock = threading.Lock()  # the cache and the counter, shared by the decoding threads
        self._shard_firsts: list[tuple[int, str]] = []  # (first image, name) of each shard met: names a bad image
        self.decoded = 0
        """Images decoded so far (cache misses)."""

    def __len__(self) -> int:
        """Caption rows per epoch."""
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def epoch(self, epoch: int, seed: int | None = None) -> Iterator[Batch]:
        """The batches of ``epoch`` (the same for the same seed and epoch, in any process), ``prefetch`` ahead;
        ``seed`` replaces the stream's seed from here on (a consumer with a seed per run, e.g. a student)."""
        if seed is not None:
            self.seed = seed
        self.set_epoch(epoch)
        return decoded_ahead(self._plans(), self._batch, self.decode_workers, self.prefetch)

    def __iter__(self) -> Iterator[Batch]:
        for rows in self._plans():
            yield self._batch(rows)

    def _plans(self) -> Iterator[list[Row]]:
        """The rows of each batch of the current epoch, in order (reads and checks the shards; decodes nothing)."""
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._epoch]))
        buffer: list[Row] = []
        batch: list[Row] = []
        for pos in rng.permutation(len(self.shards)):
            for row in self._shard_rows(self.shards[int(pos)], rng):
                if len(buffer) < self.buffer:
                    buffer.append(row)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], row = row, buffer[j]
                batch.append(row)
                if len(batch) == self.batch_size:
                    yield batch
                    batch = []
        for j in rng.permutation(len(buffer)):
            batch.append(buffer[int(j)])
            if len(batch) == self.batch_size:
                yield batch
                batch = []
        if len(batch) >= self.min_batch:
            yield batch

    def shard_images(self, name: str) -> tuple[int, list]:
        """(index of its first image, one entry per image) of the image shard ``name``: its encoded images. A
        subclass may serve another per-image entry in the same order (a frozen tower's cached features,
        ``stages/features.py``): the rows, and so the batches' order, stay the same."""
        return read_image_shard(self.dir, name, self.manifest["files"][name])

    def batch_images(self, rows: list[Row]) -> torch.Tensor:
        """The batch's images from its rows' entries: decoded (or cached) and CLIP-normalised."""
        return normalize_images(torch.stack([self._pixels(i, png) for _, i, png in rows]))

    def _shard_rows(self, name: str, rng: np.random.Generator) -> list[Row]:
        """(caption row, image, encoded image) of every streamed caption of one image shard, shuffled."""
        first, pngs = self.shard_images(name)
        if (first, name) not in self._shard_firsts:
            bisect.insort(self._shard_firsts, (first, name))
        out = []
        for k, png in enumerate(pngs):
            i = first + k
            for row in self._rows_by_image[int(self._start[i]):int(self._start[i + 1])].tolist():
                out.append((row, i, png))
        return [out[int(j)] for j in rng.permutation(len(out))]

    def _batch(self, rows: list[Row]) -> Batch:
        idx = torch.tensor([r for r, _, _ in rows], dtype=torch.long)
        return idx, self.batch_images(rows), gather(self.text, idx)  # a mapped file's rows: read, never mapped

    def _pixels(self, image: int, png: bytes) -> torch.Tensor:
        """Image ``image``'s uint8 pixels (3 x H x W): from the cache, or decoded (and cached). Thread-safe: two
        threads may decode the same image at once (the same pixels), never corrupt the cache."""
        with self._lock:
            pixels = self.cache.get(image)
        if pixels is not None:
            return pixels
        try:
            pixels = torch.from_numpy(dataset.decode_png(png)).permute(2, 0, 1).contiguous()
        except (OSError, ValueError, SyntaxError) as e:  # PIL's errors for bytes that are no image
            url = storage.join(self.dir, self._shard_of(image))
            raise storage.StorageError(f"{url}: image {image} cannot be decoded ({type(e).__name__}: {e}); rebuild "
                                       "the split with `ptmst-ray data prepare`", url) from e
        with self._lock:
            self.decoded += 1
            self.cache.put(image, pixels)
        return pixels

    def _shard_of(self, image: int) -> str:
        """The name of the image shard holding ``image`` (among the shards read so far: its own was)."""
        k = bisect.bisect_right(self._shard_firsts, (image, chr(0x10FFFF))) - 1
        return self._shard_firsts[max(k, 0)][1]


Row = tuple[int, int, bytes]
"""(caption row, its image's index, the image's encoded bytes)."""


class ImageCache:
    """Decoded uint8 images by index, least recently used evicted first, at most ``max_bytes`` in all (0: none).

    Why: a caption stream meets each image once per caption (5 times an epoch on Flickr30k/COCO), mostly while
    its shard is in the buffer; keeping the decoded pixels of recent images saves those repeat decodes with
    memory bounded by this budget, independent of the split.

    Why slots in slabs: kept one allocation each, the cached images (long-lived, ~150 KB at 224 px) sat in the C
    heap among the decoder's short-lived buffers of the same size, and glibc's heap, fragmented, kept memory it
    could neither reuse nor return: it grew with the images decoded (bench/RESULTS.md "Train data path": ~200 MiB
    more freed-but-held heap after 100k caption rows than after 20k). Here they are copied into fixed slots of a
    few large tensors (``SLAB_BYTES`` each, allocated as the cache fills, up to the budget), so every allocation a
    decode makes is freed by it and the heap stays the size of one batch's work. :meth:`get` returns a copy (the
    slot may be reused by another thread as soon as the lock is released). Images of one stream share a shape; an
    image of another shape is not kept.
    """

    SLAB_BYTES = 64 * 2**20

    def __init__(self, max_bytes: int):
        self.max_bytes, self.bytes = max_bytes, 0
        self._items: collections.OrderedDict[int, tuple[int, int]] = collections.OrderedDict()  # key -> slot
        self._slabs: list[torch.Tensor] = []
        self._slots = 0
        self._like: tuple[torch.Size, torch.dtype] | None = None

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: int) -> torch.Tensor | None:
        slot = self._items.get(key)
        if slot is None:
            return None
        self._items.move_to_end(key)
        return self._slabs[slot[0]][slot[1]].clone()

    def put(self, key: int, value: torch.Tensor) -> None:
        size = value.numel() * value.element_size()
        if size > self.max_bytes or key in self._items:
            return
        if self._like is None:
            self._like = (value.shape, value.dtype)
        if (value.shape, value.dtype) != self._like:
            return
        if self.bytes + size <= self.max_bytes and self._slots * size + size <= self.max_bytes:
            slot = self._new_slot(size)
        else:
            _, slot = self._items.popitem(last=False)
            self.bytes -= size
        self._slabs[slot[0]][slot[1]].copy_(value)
        self._items[key] = slot
        self.bytes += size

    def _new_slot(self, size: int) -> tuple[int, int]:
        """A slot never used: the next one of the last slab, or the first of a new slab (as many slots as fit in
        SLAB_BYTES and in what the budget leaves)."""
        if self._slabs and self._slots < sum(len(s) for s in self._slabs):
            used = self._slots - sum(len(s) for s in self._slabs[:-1])
        else:
            n = max(1, min(self.SLAB_BYTES // size, self.max_bytes // size - self._slots))
            shape, dtype = self._like
            self._slabs.append(torch.empty((n, *shape), dtype=dtype))
            used = 0
        self._slots += 1
        return len(self._slabs) - 1, used


_DONE = object()


def decoded_ahead(plans: Iterable[T], decode: Callable[[T], R], workers: int, depth: int) -> Iterator[R]:
    """``decode(plan)`` for every plan, in the plans' order, whatever thread computed it.

    ``workers`` <= 1: one background thread plans and decodes up to ``depth`` ahead (:func:`prefetched`; 0:
    inline). ``workers`` > 1: one background thread walks ``plans`` (reading shards, shuffling: the only code that
    decides what a batch holds) and hands each to a pool of ``workers`` decoding threads; about ``max(depth,
    workers) + 2`` batches are decoding or decoded ahead. An error (a damaged shard met while planning, an image
    that does not decode) is raised at its place in the order, after the batches before it; leaving early stops
    the planning thread and the pool (queued decodes cancelled, running ones finished) before returning.
    """
    if workers <= 1:
        yield from prefetched((decode(p) for p in plans), depth)
        return
    pool = ThreadPoolExecutor(workers, thread_name_prefix="ptmst-decode")
    futures = prefetched((pool.submit(decode, p) for p in plans), max(depth, workers))
    try:
        for future in futures:
            yield future.result()
    finally:
        futures.close()
        pool.shutdown(wait=True, cancel_futures=True)


def prefetched(items: Iterable[T], depth: int) -> Iterator[T]:
    """``items`` in the same order, produced up to ``depth`` ahead by one background thread (0: inline).

    An error in the producer (a damaged shard) is raised here, at the point of the stream it was met, after
    the items before it. Leaving the loop early (or closing the iterator) stops the thread before returning.
    """
    if depth <= 0:
        yield from items
        return
    out: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def offer(item: object) -> bool:
        while not stop.is_set():
            try:
                out.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False

    def produce() -> None:
        try:
            for item in items:
                if not offer(item):
                    return
            offer(_DONE)
        except BaseException as e:  # handed to the consumer, raised there
            offer(e)

    thread = threading.Thread(target=produce, name="ptmst-prefetch", daemon=True)
    thread.start()
    try:
        while True:
            item = out.get()
            if item is _DONE:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()
        thread.join()
