"""Peak memory, time and output of `ptmst-ray data prepare` vs the number of train images.

Why this file exists: preparation must stream (issue #3): a Flickr30k- or COCO-sized train split
has to fit in a small worker, so the peak resident memory of `data prepare` should not grow with
the number of images. This script builds a Flickr30k-layout folder (``flickr30k_train.json`` with
5 captions per image, ``flickr30k_test.json`` with a fixed 1,000 test images, 224x224 JPEGs of
photo-like texture) on local disk, runs the preparation the CLI runs (``data_stage.prepare``) in a
fresh subprocess per size, and records that child's peak RSS (VmHWM, cross-checked with the
``ru_maxrss`` that ``wait4`` reports), its RSS right after the imports, wall time, and the train
split's shard count and bytes.

Every image is distinct (one of 256 smooth colour fields plus fresh pixel noise, JPEG quality 90,
about 14 KB; re-encoded as PNG by the preparation, about 83 KB, close to a 224x224 photo).
The generated folder and the prepared output are deleted at the end (use --keep to keep them).

It also reports the peak of Arrow's memory pool in that child, and (``--annotation-rows``, in its
own child) what the annotation reader holds for a train file of that many caption rows, measured
with tracemalloc: streamed (what preparation does) and read whole into a list (``read_split``).

    .venv/bin/python bench/bench_prepare.py                        # 2,000 / 5,000 / 20,000 images
    .venv/bin/python bench/bench_prepare.py --sizes 500 2000 --no-write
    .venv/bin/python bench/bench_prepare.py --sizes 2000 --env MALLOC_ARENA_MAX=2 --no-write
    .venv/bin/python bench/bench_prepare.py --workdir /scratch/prep --keep
"""

from __future__ import annotations

import argparse
import io
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from _common import RESULTS, command_line, machine, replace_section, status_kb  # noqa: E402
SECTION = "## Data preparation: peak memory vs dataset size"
SIZES = (2000, 5000, 20000)
TEST_IMAGES = 1000
CAPTIONS = 5
IMAGE_SIZE = 224
POOL = 256
THREADS = {"OMP_NUM_THREADS": "2", "MKL_NUM_THREADS": "2", "ARROW_NUM_THREADS": "2"}
WORDS = ("a man woman child dog girl boy group people two three young old person wearing red blue green "
         "white black shirt jacket hat standing sitting walking running playing on in at near with the "
         "street beach park grass water snow field building crowd ball bike table front of while holding "
         "smiling looking camera outside inside city road stage music guitar").split()


# --------------------------------------------------------------------------- generation (parent)


def _bases(n: int, rng) -> list:
    """``n`` smooth colour fields (224x224x3 int16): the low frequencies of photo-like images."""
    import numpy as np
    from PIL import Image

    out = []
    for _ in range(n):
        base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
        out.append(np.asarray(base.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), dtype=np.int16))
    return out


def _jpeg(base, rng) -> bytes:
    """A distinct 224x224 JPEG: a smooth field plus fresh pixel noise (no two files share bytes, so
    Parquet cannot dictionary-encode repeated images away)."""
    import numpy as np
    from PIL import Image

    noisy = np.clip(base + rng.integers(-10, 11, base.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(noisy).save(buf, format="JPEG", quality=90)
    return buf.getvalue()


def _caption(rng) -> str:
    words = rng.choice(WORDS, size=int(rng.integers(8, 18))).tolist()
    return " ".join(words).capitalize() + " ."


def generate(images_dir: Path, n_train: int, n_test: int, seed: int = 0) -> dict:
    """Write ``n_train + n_test`` image files under ``images_dir/flickr30k-images``; returns their names."""
    import numpy as np

    rng = np.random.default_rng(seed)
    bases = _bases(POOL, rng)
    folder = images_dir / "flickr30k-images"
    folder.mkdir(parents=True, exist_ok=True)
    names = {"train": [f"flickr30k-images/{i:08d}.jpg" for i in range(n_train)],
             "test": [f"flickr30k-images/t{i:07d}.jpg" for i in range(n_test)]}
    total = 0
    for k, name in enumerate(names["train"] + names["test"]):
        data = _jpeg(bases[k % POOL], rng)
        (images_dir / name).write_bytes(data)
        total += len(data)
    names["train_captions"] = [[_caption(rng) for _ in range(CAPTIONS)] for _ in range(n_train)]
    names["test_captions"] = [[_caption(rng) for _ in range(CAPTIONS)] for _ in range(n_test)]
    names["bytes"] = total
    return names


def write_annotations(ann_dir: Path, names: dict, n_train: int) -> None:
    """Karpathy/BLIP files: the first ``n_train`` train images (one row per caption) and the test split."""
    ann_dir.mkdir(parents=True, exist_ok=True)
    train = [{"image": names["train"][i], "caption": c, "image_id": str(i)}
             for i in range(n_train) for c in names["train_captions"][i]]
    test = [{"image": img, "caption": caps} for img, caps in zip(names["test"], names["test_captions"])]
    (ann_dir / "flickr30k_train.json").write_text(json.dumps(train))
    (ann_dir / "flickr30k_test.json").write_text(json.dumps(test))


# --------------------------------------------------------------------------- measurement (child)


def child(ann_dir: str, images_dir: str, root: str) -> None:
    """Run the CLI's preparation (``data_stage.prepare``) and print one JSON line of measurements."""
    from ptmst_ray.config import from_dict
    from ptmst_ray.data import prepare
    from ptmst_ray.stages import data as data_stage

    import pyarrow as pa

    cfg = from_dict({"run": {"root": root},
                     "data": {"dataset": "flickr30k", "annotations": ann_dir, "images": images_dir,
                              "image_size": IMAGE_SIZE}})
    baseline = status_kb("VmRSS")
    started = time.perf_counter()
    manifest = data_stage.prepare(cfg)
    seconds = time.perf_counter() - started
    pool = pa.default_memory_pool()
    print(json.dumps({"baseline_kb": baseline, "hwm_kb": status_kb("VmHWM"), "seconds": seconds,
                      "arrow_peak_kb": pool.max_memory() / 1024, "arrow_backend": pool.backend_name,
                      "shard_rows": cfg.data.shard_rows, "module": prepare.__file__, "splits": manifest["splits"]}))


def annotation_child(ann_dir: str) -> None:
    """tracemalloc of the annotation reader over ``ann_dir``'s train file: streamed, then held in a list."""
    import tracemalloc

    from ptmst_ray.data.annotations import iter_split, read_split

    out = {}
    tracemalloc.start()
    rows = sum(1 for _ in iter_split(ann_dir, "flickr30k", "train"))
    out["stream_peak"] = tracemalloc.get_traced_memory()[1]
    tracemalloc.reset_peak()
    base = tracemalloc.get_traced_memory()[0]
    ann = read_split(ann_dir, "flickr30k", "train")
    held, peak = tracemalloc.get_traced_memory()
    out.update(rows=rows, list_held=held - base, list_peak=peak - base, listed=len(ann.rows))
    print(json.dumps(out))


# --------------------------------------------------------------------------- driver (parent)


def run_child(args: list[str], extra_env: dict[str, str]) -> tuple[dict, object]:
    """Run this script with ``args`` in a fresh process; its last stdout line (JSON) and its rusage."""
    env = {**os.environ, **THREADS, **extra_env}
    cmd = [sys.executable, __file__, *args]
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        proc = subprocess.Popen(cmd, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    if proc.returncode != 0:
        raise RuntimeError(f"child failed ({proc.returncode}):\n{stderr[-3000:]}")
    return json.loads(stdout.strip().splitlines()[-1]), usage


def spawn(ann_dir: Path, images_dir: Path, root: Path, extra_env: dict[str, str]) -> dict:
    """One fresh child; its own VmHWM plus the kernel's ru_maxrss for it (from wait4)."""
    result, usage = run_child(["--child", str(ann_dir), str(images_dir), str(root)], extra_env)
    result["ru_maxrss_kb"] = usage.ru_maxrss
    train = root / "data" / "train"
    shards = sorted(train.glob("*.parquet"))
    result["image_shards"] = sum(1 for s in shards if s.name.startswith("images-"))
    result["caption_shards"] = sum(1 for s in shards if s.name.startswith("captions-"))
    result["train_bytes"] = sum(s.stat().st_size for s in shards)
    result["largest_shard_bytes"] = max(s.stat().st_size for s in shards)
    return result


def annotation_memory(work: Path, n_rows: int, extra_env: dict[str, str]) -> dict:
    """The annotation-reader measurement over a train file of ``n_rows`` caption rows (5 per image)."""
    import numpy as np

    rng = np.random.default_rng(1)
    n_images = -(-n_rows // CAPTIONS)
    names = {"train": [f"flickr30k-images/{i:08d}.jpg" for i in range(n_images)],
             "train_captions": [[_caption(rng) for _ in range(CAPTIONS)] for _ in range(n_images)],
             "test": [], "test_captions": []}
    folder = work / "ann-rows"
    write_annotations(folder, names, n_images)
    result, _ = run_child(["--annotation-child", str(folder)], extra_env)
    print(json.dumps({"annotation_rows": result}), flush=True)
    return result


def mib(kb: float) -> float:
    return kb / 1024


def table(rows: list[dict]) -> str:
    lines = ["| train images | train rows (captions) | peak RSS MiB (VmHWM) | ru_maxrss MiB | RSS after imports MiB "
             "| peak over imports MiB | peak vs smallest | Arrow pool peak MiB | wall s | image shards | caption shards "
             "| train split MB | largest shard MB |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    first = rows[0]["hwm_kb"]
    for r in rows:
        tr = r["splits"]["train"]
        lines.append(
            f"| {tr['images']:,} | {tr['rows']:,} | {mib(r['hwm_kb']):.0f} | {mib(r['ru_maxrss_kb']):.0f} "
            f"| {mib(r['baseline_kb']):.0f} | {mib(r['hwm_kb'] - r['baseline_kb']):.0f} | {r['hwm_kb'] / first:.2f} "
            f"| {mib(r['arrow_peak_kb']):.0f} | {r['seconds']:.0f} | {r['image_shards']} | {r['caption_shards']} | {r['train_bytes'] / 1e6:.0f} "
            f"| {r['largest_shard_bytes'] / 1e6:.0f} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="train image counts")
    ap.add_argument("--test-images", type=int, default=TEST_IMAGES)
    ap.add_argument("--workdir", type=Path, default=None, help="local folder for the generated data (default: a temp dir)")
    ap.add_argument("--keep", action="store_true", help="keep the generated images and prepared output")
    ap.add_argument("--no-write", action="store_true", help="do not update bench/RESULTS.md")
    ap.add_argument("--annotation-rows", type=int, default=100_000,
                    help="caption rows for the annotation-reader measurement (0: skip it)")
    ap.add_argument("--env", nargs="+", default=[], metavar="KEY=VALUE",
                    help="extra environment of the measured children (e.g. MALLOC_ARENA_MAX=2)")
    ap.add_argument("--child", nargs=3, metavar=("ANN", "IMAGES", "ROOT"), help=argparse.SUPPRESS)
    ap.add_argument("--annotation-child", metavar="ANN", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(*args.child)
        return
    if args.annotation_child:
        annotation_child(args.annotation_child)
        return
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    sizes = sorted(args.sizes)
    work = Path(tempfile.mkdtemp(prefix="bench-prepare-", dir=args.workdir))
    try:
        started = time.perf_counter()
        names = generate(work / "images", sizes[-1], args.test_images)
        print(f"generated {sizes[-1] + args.test_images:,} images ({names['bytes'] / 1e6:.0f} MB) "
              f"in {time.perf_counter() - started:.0f}s under {work}", flush=True)
        rows = []
        for n in sizes:
            write_annotations(work / f"ann-{n}", names, n)
            root = work / f"root-{n}"
            r = spawn(work / f"ann-{n}", work / "images", root, extra_env)
            rows.append(r)
            print(json.dumps({"train_images": n, **{k: v for k, v in r.items() if k != "splits"}}), flush=True)
            if not args.keep:
                shutil.rmtree(root, ignore_errors=True)
        ann_rows = annotation_memory(work, args.annotation_rows, extra_env) if args.annotation_rows else None
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
    text = table(rows)
    growth = (rows[-1]["hwm_kb"] - rows[0]["hwm_kb"]) / 1024 / max(1, sizes[-1] - sizes[0]) * 1000
    ratio = rows[-1]["hwm_kb"] / rows[0]["hwm_kb"]
    summary = (f"Peak RSS at {sizes[-1]:,} images is {ratio:.2f}x the peak at {sizes[0]:,} "
               f"({sizes[-1] / sizes[0]:.0f}x the images); {growth:.1f} MiB per extra 1,000 images.")
    if ann_rows:
        summary += (f"\n\nAnnotation reader, {ann_rows['rows']:,} caption rows (tracemalloc, own child): streamed "
                    f"(what preparation does) peak {ann_rows['stream_peak'] / 2**20:.1f} MiB; read whole into a list "
                    f"(`read_split`) {ann_rows['list_held'] / 2**20:.1f} MiB held, {ann_rows['list_peak'] / 2**20:.1f} MiB peak.")
    if extra_env:
        summary += f"\n\nChildren's extra environment: {' '.join(args.env)}."
    print(text + "\n\n" + summary)
    if not args.no_write:
        body = (f"Command: `{command_line()}`\n\nMachine: {machine(load=True)} (2 cores shared with other jobs: wall times are indicative)\n\n"
                f"Setup: Flickr30k layout, {CAPTIONS} captions per train image, {args.test_images:,} test images, "
                f"distinct {IMAGE_SIZE}x{IMAGE_SIZE} JPEG sources (smooth colour field + pixel noise), prepared at "
                f"image_size {IMAGE_SIZE} with shard_rows {rows[0]['shard_rows']} (the default); each size in a fresh "
                f"subprocess running `data_stage.prepare` (what `ptmst-ray data prepare` calls), threads <= 2. "
                f"Peak = the child's VmHWM read right after the preparation; ru_maxrss (from wait4) also covers the interpreter's exit, which can add up to ~80 MiB at small sizes. All sizes measured in one run.\n\n"
                f"{text}\n\n{summary}\n")
        replace_section(SECTION, body)
        print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
