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
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import torch

from ptmst_ray.data.dataset import (
    decode_batch, image_shards, read_captions, read_image_shard, split_dir, split_manifest,
)

Batch = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""(caption rows (LongTensor), their images (float, CLIP-normalised, b x 3 x H x W), their text rows)."""


class CaptionStream(torch.utils.data.IterableDataset):
    """Batches of caption rows ``(rows, images, text)`` of a pairs split, streamed in a seeded order per epoch.

    ``text`` holds one row per caption (e.g. the frozen tower's embeddings; text only, small) and is
    indexed by the yielded rows. ``rows`` (default all) streams only caption rows below it (the
    loaders' ``data.max_train_rows``). A last batch smaller than ``min_batch`` is dropped (a contrastive
    loss needs two pairs). Call :meth:`set_epoch` (or :meth:`epoch`) so each epoch gets its own order.
    """

    def __init__(self, data_dir: str, split: str, text: torch.Tensor, batch_size: int, seed: int,
                 buffer: int = 4096, rows: int | None = None, min_batch: int = 2):
        super().__init__()
        if batch_size < 1 or buffer < 1:
            raise ValueError(f"batch_size and buffer must be >= 1, got {batch_size} and {buffer}")
        self.dir = split_dir(data_dir, split)
        self.manifest = split_manifest(data_dir, split, verify=False)
        if self.manifest["split_kind"] != "pairs":
            raise ValueError(f"{self.dir}: CaptionStream streams a pairs split (train/pretrain), not {split!r}")
        image_index = read_captions(data_dir, split, self.manifest).image_index
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

    def __len__(self) -> int:
        """Caption rows per epoch."""
        return self.num_rows

    def set_epoch(self, epoch: int) -> None:
        self._epoch = epoch

    def epoch(self, epoch: int) -> Iterator[Batch]:
        """The batches of ``epoch`` (the same for the same seed and epoch, in any process)."""
        self.set_epoch(epoch)
        return iter(self)

    def __iter__(self) -> Iterator[Batch]:
        rng = np.random.default_rng(np.random.SeedSequence([self.seed, self._epoch]))
        buffer: list[tuple[int, bytes]] = []
        batch: list[tuple[int, bytes]] = []
        for pos in rng.permutation(len(self.shards)):
            for row in self._shard_rows(self.shards[int(pos)], rng):
                if len(buffer) < self.buffer:
                    buffer.append(row)
                    continue
                j = int(rng.integers(len(buffer)))
                buffer[j], row = row, buffer[j]
                batch.append(row)
                if len(batch) == self.batch_size:
                    yield self._batch(batch)
                    batch = []
        for j in rng.permutation(len(buffer)):
            batch.append(buffer[int(j)])
            if len(batch) == self.batch_size:
                yield self._batch(batch)
                batch = []
        if len(batch) >= self.min_batch:
            yield self._batch(batch)

    def _shard_rows(self, name: str, rng: np.random.Generator) -> list[tuple[int, bytes]]:
        """(caption row, encoded image) of every streamed caption of one image shard, shuffled."""
        first, pngs = read_image_shard(self.dir, name, self.manifest["files"][name])
        out = []
        for k, png in enumerate(pngs):
            i = first + k
            for row in self._rows_by_image[int(self._start[i]):int(self._start[i + 1])].tolist():
                out.append((row, png))
        return [out[int(j)] for j in rng.permutation(len(out))]

    def _batch(self, rows: list[tuple[int, bytes]]) -> Batch:
        idx = torch.tensor([r for r, _ in rows], dtype=torch.long)
        return idx, decode_batch([p for _, p in rows]), self.text[idx]
