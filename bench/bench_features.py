"""Frozen-tower feature cache (issue #27 item 5): what an expert costs with and without it, and what it saves.

Runs in one process, on the CPU, one torch thread: the tiny frozen-tower config (the toy ViT pretrained by the
pipeline, frozen, a 16-d projection; 300 train images x 2 captions at 32 px), the feature pass once, then one
expert (3 epochs) trained ``--repeats`` times with ``model.cache_frozen_features`` off and on; then NFNet-L0's
forward per image at 224 px (the CC3M recipes' frozen tower) against the cached path's step (the 2304 -> 2048
projection, forward and backward, on a 128-row batch of features). Prints the figures; RESULTS.md has them.

    .venv/bin/python bench/bench_features.py [--repeats 3]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.set_num_threads(1)
    from conftest import tiny_config

    from ptmst_ray import storage
    from ptmst_ray.layout import Layout
    from ptmst_ray.stages import data as data_stage
    from ptmst_ray.stages import embed as embed_stage
    from ptmst_ray.stages import features
    from ptmst_ray.stages import pretrain as pretrain_stage
    from ptmst_ray.stages.experts import train_and_store_expert

    root = tempfile.mkdtemp()
    try:
        cfg = tiny_config(root, **{"model.image_trainable": False, "model.image_proj_dim": 16,
                                   "data.builtin.train_images": 300})
        data_stage.prepare(cfg)
        pretrain_stage.pretrain(cfg)
        embed_stage.embed(cfg)
        t = time.perf_counter()
        features.compute(cfg)
        print(f"feature pass (300 train + 20 test images): {time.perf_counter() - t:.2f} s")
        times: dict[bool, list[float]] = {False: [], True: []}
        for _ in range(args.repeats):
            for on in (False, True):
                c = cfg.replace(**{"model.cache_frozen_features": on})
                if storage.exists(Layout.of(c).experts):
                    storage.remove(Layout.of(c).experts, recursive=True)
                t = time.perf_counter()
                train_and_store_expert(c, 0)
                times[on].append(time.perf_counter() - t)
        for on, ts in times.items():
            print(f"expert, {cfg.experts.epochs} epochs, cache {'on' if on else 'off'}: "
                  f"median {statistics.median(ts):.2f} s ({', '.join(f'{x:.2f}' for x in ts)})")
    finally:
        shutil.rmtree(root, ignore_errors=True)

    import timm

    model = timm.create_model("nfnet_l0", num_classes=0).eval()
    x = torch.randn(4, 3, 224, 224)
    with torch.no_grad():
        model(x)
        t = time.perf_counter()
        y = model(x)
        forward = (time.perf_counter() - t) / len(x)
    proj = torch.nn.Linear(int(y.shape[1]), 2048, bias=False)
    batch = torch.randn(128, int(y.shape[1]))
    proj(batch).sum().backward()
    t = time.perf_counter()
    proj(batch).sum().backward()
    step = time.perf_counter() - t
    print(f"NFNet-L0 forward at 224 px: {forward * 1000:.0f} ms an image ({tuple(y.shape[1:])} features); "
          f"the cached path's projection step on 128 rows: {step * 1000:.1f} ms ({step / 128 * 1000:.2f} ms a row)")


if __name__ == "__main__":
    main()
