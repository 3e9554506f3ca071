"""Stage `data`: annotations and images (any fsspec URL) to Parquet shards with split manifests."""

from __future__ import annotations

from typing import Callable

from ptmst_ray import storage
from ptmst_ray.config import Config
from ptmst_ray.data.dataset import split_manifest
from ptmst_ray.data.prepare import prepare_dataset
from ptmst_ray.layout import Layout


VAL = "val"
"""The split evaluation chooses its best point on (and the full-data baseline stops by), when the data has one."""


def has_val(data_dir: str) -> bool:
    """Whether the prepared data at ``data_dir`` has a val split (its dataset manifest lists one; a val folder
    left over from an earlier preparation does not count)."""
    manifest = storage.read_manifest(data_dir)
    return manifest is not None and VAL in manifest.get("splits", {})


def eval_splits(data_dir: str) -> tuple[str, ...]:
    """The prepared evaluation splits: test, and val when the data has one."""
    return ("test", VAL) if has_val(data_dir) else ("test",)


def prepare(cfg: Config, progress: Callable[[str, int, int], None] | None = None) -> dict:
    """Prepared Parquet shards for every split under ``<shared root>/data`` (skipped when up to date).

    ``progress(split, done, total)``; split is "source" while the built-in dataset is generated.
    """
    data_dir = Layout.of(cfg).data
    manifest = prepare_dataset(cfg.data, data_dir, progress=progress)
    for split in manifest["splits"]:  # cheap check before anything uses them; loaders verify hashes
        m = split_manifest(data_dir, split, verify=False)
        for name in m["files"]:
            url = storage.join(data_dir, split, name)
            if not storage.exists(url):
                raise storage.StorageError(f"{url}: listed in the split's manifest but missing", url)
    return manifest
