"""Peak memory of training and storing one expert against its epochs: an epoch a file vs one file at the end.

Why this file exists: an expert actor used to keep every snapshot of its trajectory and write them as one file
when the expert ended, so its memory grew with the epochs (at the paper's NFNet-L0, 159 MB a snapshot: E + 1 of
them, and the file's bytes again while writing it). The store now takes each epoch as it ends
(``TrajectoryStore.write_epoch``, ``train_expert(keep=False, on_snapshot=...)``). This script trains one expert of
the Flickr30k recipe's student (NFNet-L0 from timm with random weights, no download, + the projection head; 4
random 224 px images and caption embeddings, one minibatch an epoch) for E epochs in a fresh process per
(way, E) and reads the process's peak resident memory (VmHWM):

* ``epoch files``: what ``stages.experts.train_and_store_expert`` does: each snapshot written and dropped;
* ``one file``: the trajectory kept (``keep=True``) and written at the end as one safetensors file of all
  epochs, as the store did before (every snapshot flattened into one ``safetensors.torch.save`` bytes object,
  then written atomically).

    .venv/bin/python bench/bench_expert_memory.py                # E = 2, 5, 10; writes bench/RESULTS.md
    .venv/bin/python bench/bench_expert_memory.py --epochs 2 10 --no-write
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).resolve().parent))
from _common import KEEP, command_line, machine, replace_section, status_kb  # noqa: E402

SECTION = "## Expert actor memory: an epoch a file vs one file (`bench/bench_expert_memory.py`)"
WAYS = ("epoch files", "one file")
PAIRS, TEXT_DIM = 4, 768


def child(way: str, epochs: int, root: str) -> dict:
    """One expert trained and stored ``way``; this process's figures."""
    import safetensors.torch
    import torch

    from ptmst_ray import storage
    from ptmst_ray.config import load_config
    from ptmst_ray.trajectories.expert import train_expert
    from ptmst_ray.trajectories.store import TrajectoryStore

    torch.set_num_threads(2)
    cfg = load_config(str(REPO / "configs" / "flickr30k_500.yaml"))
    model = dataclasses.replace(cfg.model, pretrained=None, image_pretrained=None)  # random weights
    experts = dataclasses.replace(cfg.experts, epochs=epochs)
    g = torch.Generator().manual_seed(0)
    images = torch.randn(PAIRS, 3, cfg.data.image_size, cfg.data.image_size, generator=g)
    text = torch.randn(PAIRS, TEXT_DIM, generator=g)
    base_kb = status_kb("VmRSS")
    started = time.perf_counter()
    store = TrajectoryStore(root)
    if way == "epoch files":
        def write(epoch: int, snapshot: dict) -> None:
            store.write_epoch(0, epoch, snapshot, seed=0, config_hash="bench")

        train_expert(experts, model, images, text, 0, on_snapshot=write, keep=False, device=torch.device("cpu"))
        files = [store.url(0, e) for e in range(epochs + 1)]
        snapshot_bytes = store.index(0)["snapshot_nbytes"]
    else:
        trajectory = train_expert(experts, model, images, text, 0, device=torch.device("cpu"))
        flat = {f"e{e:03d}/{n}": t.contiguous() for e, snap in enumerate(trajectory) for n, t in snap.items()}
        url = storage.join(root, "expert_0000.safetensors")
        storage.write_bytes(url, safetensors.torch.save(flat))
        files = [url]
        snapshot_bytes = sum(t.numel() * t.element_size() for t in trajectory[0].values())
    seconds, peak_kb = time.perf_counter() - started, status_kb("VmHWM")
    return {"way": way, "epochs": epochs, "seconds": seconds, "peak_mb": peak_kb / 1024,
            "base_mb": base_kb / 1024, "snapshot_mb": snapshot_bytes / 2**20,
            "file_mb": sum(Path(f).stat().st_size for f in files) / 2**20}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--epochs", type=int, nargs="+", default=[2, 5, 10])
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    p.add_argument("--child", nargs=2, metavar=("WAY", "EPOCHS"), help=argparse.SUPPRESS)
    p.add_argument("--root", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(child(args.child[0], int(args.child[1]), args.root)))
        return
    rows = []
    for epochs in args.epochs:
        for way in WAYS:
            with tempfile.TemporaryDirectory(prefix="bench-expert-memory-") as tmp:
                out = subprocess.run([sys.executable, __file__, "--child", way, str(epochs), "--root", tmp],
                                     check=True, capture_output=True, text=True, cwd=REPO)
            row = json.loads(out.stdout.strip().splitlines()[-1])
            print(f"{way:12s} E={epochs:2d}: peak {row['peak_mb']:7.0f} MB (before training {row['base_mb']:.0f}), "
                  f"{row['seconds']:.1f} s, files {row['file_mb']:.0f} MB", flush=True)
            rows.append(row)
    if args.no_write:
        return
    snap = rows[0]["snapshot_mb"]
    table = ["| E | way | peak RSS MB | above the process before training, MB | in snapshots | wall s | "
             "files MB |", "|---:|---|---:|---:|---:|---:|---:|"]
    for r in rows:
        above = r["peak_mb"] - r["base_mb"]
        table.append(f"| {r['epochs']} | {r['way']} | {r['peak_mb']:,.0f} | {above:,.0f} | {above / snap:.1f} | "
                     f"{r['seconds']:.1f} | {r['file_mb']:,.0f} |")
    body = (f"Command: `{command_line()}`. Machine: {machine(load=True)}. One snapshot of the Flickr30k recipe's "
            "student: "
            f"{snap:.1f} MiB. Each row a fresh process; \"above\" is its peak minus its resident memory before "
            "training (torch, the config, the 4 images; the model is built by training), also in snapshots of the "
            "student (the model's parameters, gradients and activations are in both ways).\n\n" + "\n".join(table)
            + f"\n\n{KEEP}\n")
    replace_section(SECTION, body)


if __name__ == "__main__":
    main()
