"""Image decoding for `data prepare` spread over Ray tasks, results back in row order.

Why this file exists: decoding and resizing images is the slow part of preparation and is
independent per image, so it can run on every core of a cluster; the shards must still be written
in row order by one writer (their bytes and the content hash must not depend on the number of
workers). Rows are grouped into batches of images, at most ``2 * workers`` batches are in flight
(memory stays bounded), and batches are collected oldest first. Only ``prepare.with_images`` calls
this, passing its batch decoder; the Ray import stays out of the in-process path. The caller
connects to Ray first (the CLI and the driver do).
"""

from __future__ import annotations

import collections
import contextlib
import functools
from typing import Callable, Iterable, Iterator, TypeVar

import ray

Row = TypeVar("Row")
Result = TypeVar("Result")

BATCH_IMAGES = 32
"""Images per Ray task: large enough to amortise a task's overhead, small enough to keep all workers busy."""

SOURCE_PIXELS = 2**20
"""Source pixels per image a decoding task's memory request allows for (a megapixel: Flickr30k's and COCO's
images are ~0.2-0.3; a larger source only makes the request an underestimate, never a failure)."""


def task_memory(batch_images: int, size: int) -> int:
    """Bytes one decoding task asks Ray for: its batch decoded at source size (RGB, :data:`SOURCE_PIXELS`)
    and resized to ``size``, so Ray never packs more decoding tasks on a node than its memory holds."""
    return batch_images * 3 * (SOURCE_PIXELS + size * size)


@functools.cache
def _remote(load_batch: Callable):
    return ray.remote(num_cpus=1)(load_batch)


def map_images(rows: Iterable[Row], image_url: Callable[[Row], str | None],
               load_batch: Callable[[list[str], int], list[Result]], size: int, workers: int,
               batch_images: int | None = None) -> Iterator[tuple[Row, Result | None]]:
    """``rows`` in order, each with its prepared image when ``image_url(row)`` names one (else None),
    ``load_batch(urls, size)`` run by up to ``workers`` Ray tasks at once (``batch_images`` images each,
    default :data:`BATCH_IMAGES`). Needs a connected Ray."""
    if not ray.is_initialized():
        raise RuntimeError("data.workers > 1 decodes images on Ray: connect first "
                           "(ptmst_ray.orchestration.runtime.connect), or set data.workers: 1")
    batch_images = batch_images or BATCH_IMAGES
    task = _remote(load_batch).options(memory=task_memory(batch_images, size))
    pending: collections.deque = collections.deque()  # (rows with their url or None, ObjectRef)
    batch: list[tuple[Row, str | None]] = []
    n_urls = 0
    try:
        for row in rows:
            url = image_url(row)
            batch.append((row, url))
            n_urls += url is not None
            if n_urls >= batch_images or len(batch) >= 8 * batch_images:
                pending.append((batch, task.remote([u for _, u in batch if u is not None], size)))
                batch, n_urls = [], 0
                while len(pending) >= 2 * workers:
                    yield from _collect(*pending.popleft())
        if batch:
            pending.append((batch, task.remote([u for _, u in batch if u is not None], size)))
        while pending:
            yield from _collect(*pending.popleft())
    finally:
        for _, ref in pending:  # an error or an abandoned iterator: stop the work still queued
            with contextlib.suppress(Exception):
                ray.cancel(ref)


def _collect(batch: list[tuple[Row, str | None]], ref: "ray.ObjectRef") -> Iterator[tuple[Row, Result | None]]:
    results = iter(ray.get(ref))
    for row, url in batch:
        yield row, (None if url is None else next(results))
