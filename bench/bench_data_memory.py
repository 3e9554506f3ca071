"""Peak memory and throughput of the train data path of one expert epoch vs the number of caption rows.

Why this file exists: issue #26 asks that a consumer's memory not grow with the split. This script writes
pairs splits of 2,000 / 20,000 / 100,000 caption rows (5 captions per image, 224x224 JPEGs by default, or the
PNGs `data prepare` stores with ``--format png``, in the prepared layout `data prepare` writes: image and
caption Parquet shards + manifest; kept in ``--cache`` and reused by later runs) and, in a fresh child process
per (size, path), runs one epoch of 128-row minibatches through the data path and records the child's
peak RSS (VmHWM), its RSS after the imports, wall time and caption rows (and distinct PNG decodes) per
second, its peak private (RssAnon) and file-backed (RssFile) memory sampled apart, and glibc's and Arrow's heap
figures at the end. The caption embeddings are 768-d float32 (``TEXT_DIM``) in a file next to the split, memory-mapped
as workers map them. The minibatches are consumed by a trivial reduction, not a model: the figures are the data
path's own (what a worker holds and how fast it feeds), not an expert's compute.

Paths: ``rows`` = the held loader (``data.stream: off``; :class:`ImageRows` over :class:`ShardImages`:
every image decoded once, kept as uint8; a seeded permutation of the rows; float only per batch);
``stream`` = :class:`ptmst_ray.data.stream.CaptionStream` bare (one shard at a time, a 1,024-row shuffle
buffer, each batch decoded and normalised on its own, no prefetch, no cache); ``stream+`` = the same with
what ``data.stream: on`` configures by default (a prefetch thread 2 batches deep, a 256 MiB decoded-image
LRU); ``decode`` = prefetch without the cache (every caption row decoded: the decoding rate itself);
``full`` = a full-data baseline epoch: ``evaluate.student.train_student`` fed ``stream+`` batches
(``min_batch`` 1, the student's seed), its student a stand-in of a few hundred parameters so the figures
stay the data path's. ``--model-rate`` times training steps of the toy student (ptmst-toy-vit, 32 px),
the rate a data path has to keep up with. ``--decode-workers 1 2`` runs the streaming paths once per number of
decoding threads (``data.decode_workers``; the batches are the same, only the rate may differ).

    .venv/bin/python bench/bench_data_memory.py                 # 2,000 / 20,000 / 100,000 captions
    .venv/bin/python bench/bench_data_memory.py --sizes 2000 --no-write
    .venv/bin/python bench/bench_data_memory.py --sizes 2000 20000 --paths stream+ full --model-rate
    .venv/bin/python bench/bench_data_memory.py --sizes 2000 --paths stream stream+ --decode-workers 1 2 --format png
"""

from __future__ import annotations

import argparse
import io
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import command_line, machine, replace_section, status_kb  # noqa: E402

SECTION = "## Train data path: peak memory and rate of an expert and a full-data epoch vs split size"
SIZES = (2000, 20000, 100000)
CAPTIONS = 5
IMAGE_SIZE = 224
BATCH = 128
BUFFER = 1024
PREFETCH = 2
CACHE_MB = 256.0
PATHS = ("rows", "stream", "stream+", "decode", "full", "raydata")
THREADS = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "ARROW_NUM_THREADS": "1"}
FORMATS = {"jpeg": ("JPEG", {"quality": 90}, "jpg"), "png": ("PNG", {"compress_level": 1}, "png")}
"""Encoded image formats: JPEG (what real datasets hold; ~4x cheaper to write than PNG) or PNG (what `data
prepare` stores in the shards; compress level 1, for speed). The loaders decode either (PIL)."""
SPLIT_VERSION = 1
"""Bumped when what write_split writes changes (part of a cached split's folder name)."""
TEXT_DIM = 768
"""Width of the stand-in caption embeddings (BERT's, the paper recipes' text tower): written once per split as
``embedded/train.safetensors`` and read by every child as production reads them (memory-mapped, data/embedfile.py)."""


def _image(rng, fmt: str) -> bytes:
    """A distinct 224x224 image: a smooth colour field plus pixel noise, encoded as ``fmt``."""
    import numpy as np
    from PIL import Image

    base = Image.fromarray(rng.integers(0, 256, (6, 6, 3), dtype=np.uint8))
    field = np.asarray(base.resize((IMAGE_SIZE, IMAGE_SIZE), Image.Resampling.BICUBIC), dtype=np.int16)
    noisy = np.clip(field + rng.integers(-6, 7, field.shape, dtype=np.int16), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    name, options, _ = FORMATS[fmt]
    Image.fromarray(noisy).save(buf, format=name, **options)
    return buf.getvalue()


def cached_split(cache: Path, captions: int, fmt: str) -> tuple[Path, dict]:
    """The split of ``captions`` rows in ``fmt`` under ``cache``: written once (with progress), then reused."""
    from ptmst_ray import storage

    d = cache / f"c{captions}-{fmt}-v{SPLIT_VERSION}"
    info_file = d / "info.json"
    if info_file.exists() and storage.read_manifest(str(d / "train")) is not None:
        info = json.loads(info_file.read_text())
        print(f"reusing {d} ({info['images']:,} images)", flush=True)
        if info.get("text_dim") != TEXT_DIM:  # a split cached before the stand-in embeddings were added
            info.update(write_text(d, captions))
            info_file.write_text(json.dumps(info))
        return d, info
    if d.exists():  # an interrupted write: start again
        import shutil

        shutil.rmtree(d)
    t0 = time.perf_counter()
    info = {**write_split(d, captions, fmt), **write_text(d, captions)}
    info["write_s"] = round(time.perf_counter() - t0, 1)
    info_file.write_text(json.dumps(info))
    print(f"wrote {captions:,} captions / {info['images']:,} images ({info['bytes'] / 1e6:.0f} MB, "
          f"{info['shards']} image shards) in {info['write_s']:.0f} s", flush=True)
    return d, info


def write_split(data_dir: Path, captions: int, fmt: str = "jpeg", seed: int = 0) -> dict:
    """A prepared pairs split ``data_dir/train`` of ``captions`` rows (the layout and manifest of `data prepare`)."""
    import numpy as np

    from ptmst_ray import storage
    from ptmst_ray.data.prepare import CAPTION_SCHEMA, IMAGE_SCHEMA_PAIRS, ShardWriter

    out = data_dir / "train"
    out.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    images = captions // CAPTIONS
    suffix = FORMATS[fmt][2]
    with ShardWriter(str(out), "images", IMAGE_SCHEMA_PAIRS, 2048) as imgs, \
            ShardWriter(str(out), "captions", CAPTION_SCHEMA, 2048) as caps:
        for i in range(images):
            imgs.add({"image_index": i, "image": f"{i}.{suffix}", "image_id": str(i), "row": i,
                      "png": _image(rng, fmt)})  # the shards' image column (named for what `data prepare` stores)
            for c in range(CAPTIONS):
                caps.add({"row": i * CAPTIONS + c, "image_index": i, "caption": f"image {i} caption {c}"})
            if (i + 1) % 5000 == 0:
                print(f"  {i + 1:,} / {images:,} images written", flush=True)
    manifest = {"kind": "data_split", "split": "train", "split_kind": "pairs", "rows": caps.rows,
                "images": imgs.rows, "captions": caps.rows, "image_size": IMAGE_SIZE,
                "files": {**imgs.files, **caps.files}, "skipped": []}
    storage.write_manifest(str(out), manifest)
    return {"images": imgs.rows, "bytes": sum(p.stat().st_size for p in out.glob("*.parquet")),
            "shards": len(imgs.files), "format": fmt}


def write_text(data_dir: Path, captions: int, seed: int = 0) -> dict:
    """Stand-in caption embeddings (``captions`` x TEXT_DIM float32, seeded normal) as ``data_dir/embedded/
    train.safetensors``, written as the embed stage writes them (a chunk at a time); their sha256."""
    import torch

    from ptmst_ray import storage
    from ptmst_ray.data.embedfile import EmbeddingWriter

    g = torch.Generator().manual_seed(seed)
    with storage.atomic_open(str(data_dir / "embedded" / "train.safetensors"), "wb") as f:
        w = EmbeddingWriter(f, captions, TEXT_DIM)
        for start in range(0, captions, 8192):
            w.add(torch.randn(min(8192, captions - start), TEXT_DIM, generator=g))
    return {"text_dim": TEXT_DIM, "text_sha256": w.finish()}


def open_text(data_dir: str):
    """The split's stand-in caption embeddings, mapped and checked as a worker reads the real ones."""
    from ptmst_ray.data.embedfile import open_embeddings

    info = json.loads((Path(data_dir) / "info.json").read_text())
    return open_embeddings(f"{data_dir}/embedded", "train.safetensors", info["text_sha256"])


class PeakSampler:
    """The peak of this process's private (anonymous) resident memory, sampled every ``every`` s by a thread:
    VmHWM also counts the pages of mapped files (the caption embeddings' page cache, shared by the node's
    processes and reclaimable), which /proc reports apart only as current values (RssAnon, RssFile)."""

    def __init__(self, every: float = 0.01):
        import threading

        self.peak_anon, self.peak_file, self._stop = 0, 0, threading.Event()
        self._thread = threading.Thread(target=self._run, args=(every,), daemon=True)
        self._thread.start()

    def _run(self, every: float) -> None:
        while True:
            self.sample()
            if self._stop.wait(every):
                return

    def sample(self) -> None:
        self.peak_anon = max(self.peak_anon, status_kb("RssAnon"))
        self.peak_file = max(self.peak_file, status_kb("RssFile"))

    def stop(self) -> "PeakSampler":
        self._stop.set()
        self._thread.join()
        self.sample()
        return self


def child(data_dir: str, path: str, workers: int = 1) -> None:
    """One epoch of the data path ``path`` over ``data_dir/train`` (streaming paths: ``workers`` decoding threads);
    prints a JSON line of figures."""
    import torch

    from ptmst_ray.data import dataset
    from ptmst_ray.data.dataset import ImageRows, ShardImages, read_caption_index

    decodes = {"n": 0}
    real = dataset.decode_png

    def counting(data: bytes):
        decodes["n"] += 1
        return real(data)

    dataset.decode_png = counting
    dataset.normalize_images(torch.zeros(1, 3, 2, 2, dtype=torch.uint8))  # imports open_clip (~280 MiB) up front
    after_imports, anon_after_imports = status_kb("VmRSS"), status_kb("RssAnon")
    sampler = PeakSampler()
    start_usage = resource.getrusage(resource.RUSAGE_SELF)
    cpu_at_start = start_usage.ru_utime + start_usage.ru_stime
    started = time.perf_counter()
    image_index = read_caption_index(data_dir, "train")[0]
    text = open_text(data_dir)  # mapped, as load_real maps the caption embeddings
    total, rows = 0.0, 0
    if path == "rows":
        images = ImageRows(ShardImages(data_dir, "train", keep=True), image_index)
        for idx in torch.randperm(len(images), generator=torch.Generator().manual_seed(0)).split(BATCH):
            x, t = images[idx], text[idx]
            total += float(x.mean()) + float(t.sum())
            rows += len(idx)
    elif path in ("stream", "stream+", "decode"):
        from ptmst_ray.data.stream import CaptionStream

        fast = {"stream+": {"prefetch": PREFETCH, "cache_mb": CACHE_MB}, "decode": {"prefetch": PREFETCH}}.get(path, {})
        for idx, x, t in CaptionStream(data_dir, "train", text, BATCH, seed=0, buffer=BUFFER, decode_workers=workers,
                                       **fast).epoch(1):
            total += float(x.mean()) + float(t.sum())
            rows += len(idx)
    elif path == "full":
        rows = full_data_epoch(data_dir, text, image_index, workers)
    else:
        return ray_data_epoch(data_dir, after_imports)
    seconds = time.perf_counter() - started
    usage = resource.getrusage(resource.RUSAGE_SELF)  # every thread's CPU time, imports included (subtracted)
    sampler.stop()
    print(json.dumps({"path": path, "workers": workers, "rows": rows, "seconds": seconds, "decodes": decodes["n"],
                      "cpu_s": usage.ru_utime + usage.ru_stime - cpu_at_start,
                      "rss_after_imports_kb": after_imports, "peak_kb": status_kb("VmHWM"),
                      "anon_after_imports_kb": anon_after_imports, "peak_anon_kb": sampler.peak_anon, "peak_file_kb": sampler.peak_file, **arrow_stats(), **malloc_stats()}),
          flush=True)


def malloc_stats() -> dict:
    """glibc's view of the heap (mallinfo2, summed over its arenas, and the arena count): bytes in use, bytes free
    but kept, bytes in mmap'd chunks; empty off glibc."""
    import ctypes
    import re

    try:
        libc = ctypes.CDLL("libc.so.6")
        fields = ("arena", "ordblks", "smblks", "hblks", "hblkhd", "usmblks", "fsmblks", "uordblks", "fordblks",
                  "keepcost")

        class MallInfo2(ctypes.Structure):
            _fields_ = [(f, ctypes.c_size_t) for f in fields]

        libc.mallinfo2.restype = MallInfo2
        info = libc.mallinfo2()
        buf, size = ctypes.c_char_p(), ctypes.c_size_t()
        libc.open_memstream.restype = ctypes.c_void_p
        stream = libc.open_memstream(ctypes.byref(buf), ctypes.byref(size))
        libc.malloc_info(0, ctypes.c_void_p(stream))
        libc.fclose(ctypes.c_void_p(stream))
        arenas = len(re.findall(rb"<heap nr=", ctypes.string_at(buf, size.value)))
    except (OSError, AttributeError):
        return {}
    return {"malloc_heap_kb": info.arena // 1024, "malloc_in_use_kb": info.uordblks // 1024,
            "malloc_free_kb": info.fordblks // 1024, "malloc_mmap_kb": info.hblkhd // 1024, "malloc_arenas": arenas}


def arrow_stats() -> dict:
    """Arrow's default memory pool: its allocator, the bytes it holds now and its peak."""
    import pyarrow as pa

    pool = pa.default_memory_pool()
    return {"arrow_pool": pool.backend_name, "arrow_allocated_kb": pa.total_allocated_bytes() // 1024,
            "arrow_peak_kb": pool.max_memory() // 1024}


def stand_in_student(text_dim: int):
    """A student of a few hundred parameters (pooled pixels -> 16-d; a linear text head): what ``train_student``
    trains, at next to no compute, so a full-data epoch measures its data path."""
    import torch
    from torch import nn

    class Student(nn.Module):
        def __init__(self):
            super().__init__()
            self.image = nn.Sequential(nn.AdaptiveAvgPool2d(4), nn.Flatten(), nn.Linear(48, 16))
            self.head = nn.Linear(text_dim, 16)

        def forward(self, x, t):
            img, txt = (nn.functional.normalize(v, dim=-1) for v in (self.image(x), self.head(t)))
            return img @ txt.T / 0.07

    torch.manual_seed(0)
    return Student()


def full_data_epoch(data_dir: str, text, image_index, workers: int = 1) -> int:
    """One epoch of the full-data baseline's training loop over the streamed split; returns the rows trained."""
    from ptmst_ray.data.stream import CaptionStream
    from ptmst_ray.evaluate.student import train_student

    stream = CaptionStream(data_dir, "train", text, BATCH, seed=0, buffer=BUFFER, min_batch=1, prefetch=PREFETCH,
                           cache_mb=CACHE_MB, image_index=image_index, decode_workers=workers)
    seen = {"rows": 0}

    def batches(epoch: int):
        for idx, x, t in stream.epoch(epoch, seed=7):
            seen["rows"] += len(idx)
            yield idx, x, t

    rows = _Rows(len(text), (3, IMAGE_SIZE, IMAGE_SIZE))
    train_student(stand_in_student(text.shape[1]), rows, text, None, epochs=1, batch_size=BATCH, epoch_batches=batches)
    return seen["rows"]


class _Rows:
    """The shape of the train rows (all ``train_student`` reads of them when it is fed batches)."""

    def __init__(self, n: int, image: tuple):
        import torch

        self.shape = torch.Size((n, *image))


def ray_data_epoch(data_dir: str, after_imports: int) -> None:
    """Ray Data's path over the same image shards: ``read_parquet`` -> decode + normalise in ``map_batches`` ->
    ``iter_torch_batches`` (128 images, prefetch 2), on a local Ray of one CPU bound to 127.0.0.1. Images, not
    caption rows (Ray Data would need a join for those); the Ray start-up is not timed."""
    import glob

    import numpy as np
    import ray

    from ptmst_ray.data import dataset

    def decode(batch: dict) -> dict:
        import torch

        pixels = np.stack([dataset.decode_png(p) for p in batch["png"]]).transpose(0, 3, 1, 2)
        return {"image_index": batch["image_index"],
                "image": dataset.normalize_images(torch.from_numpy(np.ascontiguousarray(pixels))).numpy()}

    ray.init(num_cpus=1, include_dashboard=False, _node_ip_address="127.0.0.1", log_to_driver=False,
             configure_logging=False)
    try:
        files = sorted(glob.glob(f"{data_dir}/train/images-*.parquet"))
        started = time.perf_counter()
        ds = ray.data.read_parquet(files, columns=["image_index", "png"]).map_batches(decode, batch_size=BATCH)
        images, total = 0, 0.0
        for batch in ds.iter_torch_batches(batch_size=BATCH, prefetch_batches=PREFETCH, local_shuffle_buffer_size=BUFFER,
                                           local_shuffle_seed=0):
            total += float(batch["image"].mean())
            images += len(batch["image_index"])
        seconds = time.perf_counter() - started
    finally:
        ray.shutdown()
    print(json.dumps({"path": "raydata", "workers": 1, "rows": images, "seconds": seconds, "decodes": images,
                      "rss_after_imports_kb": after_imports, "peak_kb": status_kb("VmHWM")}), flush=True)


def model_rate(steps: int = 5) -> dict:
    """Training steps per second of the toy student (ptmst-toy-vit, 32 px, batch 128) on this process's threads."""
    import torch

    from ptmst_ray.config import ExpertsConfig, ModelConfig
    from ptmst_ray.models.student import build_student
    from ptmst_ray.trajectories.expert import make_optimizer, train_batches

    model = build_student(ModelConfig(), text_dim=64, seed=0)
    opt = make_optimizer(model, ExpertsConfig())
    x, t = torch.randn(BATCH, 3, 32, 32), torch.randn(BATCH, 64)
    train_batches(model, opt, [(x, t)], "InfoNCE", torch.device("cpu"))  # warm-up
    started = time.perf_counter()
    train_batches(model, opt, [(x, t)] * steps, "InfoNCE", torch.device("cpu"))
    seconds = time.perf_counter() - started
    return {"model": "ptmst-toy-vit", "image_size": 32, "batch": BATCH, "images_per_s": steps * BATCH / seconds,
            "threads": torch.get_num_threads()}


def spawn(data_dir: Path, path: str, workers: int = 1, extra_env: dict | None = None) -> dict:
    env = {**os.environ, **THREADS, **(extra_env or {})}
    out = subprocess.run([sys.executable, __file__, "--child", str(data_dir), path, str(workers)], env=env,
                         capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def mib(kb: float) -> str:
    return f"{kb / 1024:,.0f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", type=int, nargs="+", default=list(SIZES), help="caption rows per split")
    p.add_argument("--paths", nargs="+", default=list(PATHS), choices=list(PATHS))
    p.add_argument("--model-rate", action="store_true", help="also time the toy student's training steps")
    p.add_argument("--decode-workers", type=int, nargs="+", default=[1],
                   help="decoding threads of the streaming paths (each value one run of each)")
    p.add_argument("--format", choices=list(FORMATS), default="jpeg", help="the generated images' encoding")
    p.add_argument("--cache", default=os.path.expanduser("~/.cache/ptmst-ray/bench_data_memory"),
                   help="where the generated splits are kept and reused (default: %(default)s)")
    p.add_argument("--env", nargs="+", default=[], metavar="NAME=VALUE",
                   help="extra environment of the children (e.g. MALLOC_ARENA_MAX=2 ARROW_DEFAULT_MEMORY_POOL=system)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        if args.child[1] == "model":
            print(json.dumps(model_rate()), flush=True)
        else:
            child(args.child[0], args.child[1], int(args.child[2]))
        return
    rate = spawn(Path("."), "model") if args.model_rate else None
    if rate:
        print(json.dumps(rate), flush=True)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    # the node's cache of the children (the embeddings' verification mark): the parent checks each split's file
    # once, as the first worker on a node does, and every child trusts that check
    os.environ["PTMST_RAY_CACHE"] = str(cache / "node-cache")
    extra_env = dict(kv.split("=", 1) for kv in args.env)
    lines = ["| captions | images | split MB | path | decode workers | peak RSS MiB | RSS after imports MiB "
             "| peak over imports MiB | peak private MiB | peak file-backed MiB | decodes | wall s | caption rows/s | load |",
             "|---:|---:|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for n in args.sizes:
        d, info = cached_split(cache, n, args.format)
        open_text(str(d))
        for path in args.paths:
            for workers in (args.decode_workers if path in ("stream", "stream+", "decode", "full") else [1]):
                r = spawn(d, path, workers, extra_env)
                load = os.getloadavg()[0]
                print(json.dumps({"captions": n, "load": load, "env": extra_env, **r}), flush=True)
                lines.append(f"| {n:,} | {info['images']:,} | {info['bytes'] / 1e6:,.0f} | {path} | {workers} "
                             f"| {mib(r['peak_kb'])} | {mib(r['rss_after_imports_kb'])} "
                             f"| {mib(r['peak_kb'] - r['rss_after_imports_kb'])} | {mib(r.get('peak_anon_kb', 0))} "
                             f"| {mib(r.get('peak_file_kb', 0))} | {r['decodes']:,} "
                             f"| {r['seconds']:.1f} | {r['rows'] / r['seconds']:,.0f} | {load:.1f} |")
    table = "\n".join(lines)
    print(table)
    if not args.no_write:
        body = (f"Command: `{command_line()}`\n\nMachine: {machine(load=True)}\n\n"
                f"One epoch, minibatch {BATCH}, {CAPTIONS} captions per image, {IMAGE_SIZE} px {args.format.upper()}s, "
                f"shards of 2,048 "
                f"rows, one thread per child; batches consumed by a reduction (no model). `rows`: every image "
                f"decoded once and held as uint8 (the loader experts use); `stream`: CaptionStream, buffer "
                f"{BUFFER} rows; `stream+`: with prefetch {PREFETCH} and a {CACHE_MB:.0f} MiB image cache; `full`: a "
                f"full-data baseline epoch (train_student on `stream+` batches, a stand-in student).\n\n{table}\n")
        if rate:
            body += (f"\nModel consumption: {rate['model']} training steps at {rate['image_size']} px, batch "
                     f"{rate['batch']}, {rate['threads']} thread: {rate['images_per_s']:,.0f} images/s.\n")
        replace_section(SECTION, body)


if __name__ == "__main__":
    main()
