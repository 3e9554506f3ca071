"""Reading Karpathy's single `dataset_coco.json` against BLIP's per-split files: time and memory per split.

Why this file exists: where a COCO or Flickr30k folder has Karpathy's single file instead of BLIP's per-split
files, preparation streams that file once per split and pass (a counting pass, then the writing pass), so a COCO
train split reads all 123,287 images' entries (with their tokenised sentences) to keep 113,287. This script writes a
COCO-sized `dataset_coco.json` (Karpathy's split sizes: 82,783 train, 30,504 restval, 5,000 val, 5,000 test images,
5 sentences each, raw text and tokens as in the real file) and BLIP's per-split files of the same rows, then times
one streamed pass over each split from each (`annotations.iter_split`, what preparation calls per pass) and, in a
second pass under tracemalloc, the reader's peak memory. Both folders are deleted at the end.

    .venv/bin/python bench/bench_karpathy.py            # COCO's sizes
    .venv/bin/python bench/bench_karpathy.py --scale 0.1 --no-write
"""

from __future__ import annotations

import argparse
import json
import random
import shutil
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, replace_section  # noqa: E402

SECTION = "## Annotations: Karpathy's single file vs the per-split files"
SPLITS = {"train": 82_783, "restval": 30_504, "val": 5_000, "test": 5_000}
WORDS = ("a man woman child dog cat girl boy group people two three young old person wearing red blue green white "
         "black shirt jacket hat standing sitting walking running playing on in at near with the street beach park "
         "grass water snow field building crowd ball bike table front of while holding kitchen train bus").split()


def _sentence(rng: random.Random) -> str:
    words = [rng.choice(WORDS) for _ in range(rng.randint(8, 14))]
    return " ".join(words).capitalize() + "."


def write_folders(root: Path, scale: float, seed: int = 0) -> dict[str, int]:
    """``root/karpathy/dataset_coco.json`` and ``root/blip/coco_karpathy_{train,val,test}.json`` of the same
    rows; returns the images per Karpathy split."""
    rng = random.Random(seed)
    sizes = {s: max(1, round(n * scale)) for s, n in SPLITS.items()}
    images, blip = [], {"train": [], "val": [], "test": []}
    sentid = 0
    for split, n in sizes.items():
        for _ in range(n):
            k = len(images)
            folder = "train2014" if split == "train" else "val2014"
            name = f"COCO_{folder}_{k:012d}.jpg"
            raws = [_sentence(rng) for _ in range(5)]
            images.append({"filepath": folder, "sentids": list(range(sentid, sentid + 5)), "filename": name,
                           "imgid": k, "split": split, "cocoid": k,
                           "sentences": [{"tokens": r.lower().rstrip(".").split(), "raw": r, "imgid": k,
                                          "sentid": sentid + j} for j, r in enumerate(raws)]})
            sentid += 5
            path = f"{folder}/{name}"
            if split in ("train", "restval"):
                blip["train"].extend({"image": path, "caption": r, "image_id": str(k)} for r in raws)
            else:
                blip[split].append({"image": path, "caption": raws})
    (root / "karpathy").mkdir(parents=True)
    (root / "blip").mkdir()
    (root / "karpathy" / "dataset_coco.json").write_text(json.dumps({"images": images, "dataset": "coco"}))
    for split, rows in blip.items():
        (root / "blip" / f"coco_karpathy_{split}.json").write_text(json.dumps(rows))
    return sizes


def measure(folder: str, split: str) -> dict:
    """One streamed pass (rows, seconds), then one under tracemalloc (the reader's peak)."""
    from ptmst_ray.data.annotations import iter_split

    started = time.perf_counter()
    rows = sum(1 for _ in iter_split(folder, "coco", split))
    seconds = time.perf_counter() - started
    tracemalloc.start()
    for _ in iter_split(folder, "coco", split):
        pass
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {"rows": rows, "seconds": seconds, "peak_mib": peak / 2**20}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of COCO's split sizes (default 1)")
    ap.add_argument("--workdir", default=None, help="where the folders are written (default: a temporary folder)")
    ap.add_argument("--no-write", action="store_true", help="print the table, leave RESULTS.md alone")
    args = ap.parse_args()

    root = Path(tempfile.mkdtemp(prefix="bench-karpathy-", dir=args.workdir))
    try:
        print(f"writing the annotation files under {root} ...", flush=True)
        sizes = write_folders(root, args.scale)
        file_mb = {name: (root / name / f).stat().st_size / 1e6 for name, f in
                   (("karpathy", "dataset_coco.json"), ("blip", "coco_karpathy_train.json"))}
        lines = ["| split | rows | Karpathy's file: s a pass | peak MiB | per-split file: s a pass | peak MiB | "
                 "ratio (s) |", "|---|---:|---:|---:|---:|---:|---:|"]
        for split in ("train", "val", "test"):
            k = measure(str(root / "karpathy"), split)
            b = measure(str(root / "blip"), split)
            assert k["rows"] == b["rows"], (split, k, b)
            lines.append(f"| {split} | {k['rows']:,} | {k['seconds']:.2f} | {k['peak_mib']:.1f} | {b['seconds']:.2f} "
                         f"| {b['peak_mib']:.1f} | {k['seconds'] / b['seconds']:.1f} |")
            print(lines[-1], flush=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    body = "\n".join([
        f"Command: `{command_line()}`. Machine: {machine(load=True)}.",
        f"Setup: a generated `dataset_coco.json` of {sum(sizes.values()):,} images "
        f"({', '.join(f'{n:,} {s}' for s, n in sizes.items())}; 5 sentences each, raw and tokens; "
        f"{file_mb['karpathy']:.0f} MB) and BLIP's per-split files of the same rows (train "
        f"{file_mb['blip']:.0f} MB); one streamed pass per split and file (`annotations.iter_split`; preparation "
        "makes two per split), then one under tracemalloc for the reader's peak.", "", *lines])
    print(body)
    if not args.no_write:
        replace_section(SECTION, body)


if __name__ == "__main__":
    main()
