"""Bytes of a shortcut trajectory: materialised snapshots vs the compact form ptmst_ray stores.

Why this file exists: docs/method.md#shortcut-trajectories claims the compact shortcut (theta_a, theta_b and
a (K+1) x tensors beta table) costs about 2P floats instead of the (K+1)P the paper's code
writes. This script puts numbers on it with ``trajectories.shortcut.storage_figures`` for

* the toy config (configs/toy.yaml: its phases' ranges, experts.num_experts, the toy student);
* the paper's setting (NFNet-L0 image encoder + the LoRS projection head 768 -> 2304,
  20 experts, ranges [0, 6] and [0, 8]);

and checks the formula against real files: a random 7-snapshot toy trajectory written once
with ``save_shortcut`` (compact) and once as its materialised snapshots in the expert store's
format (both safetensors with the same kind of JSON header metadata).

    .venv/bin/python bench/bench_storage.py
    .venv/bin/python bench/bench_storage.py --no-paper   # skip building NFNet-L0 (timm)
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

from ptmst_ray.config import ModelConfig, load_config
from ptmst_ray.models.student import ProjectionHead, build_student
from ptmst_ray.trajectories.expert import trainable_params
from ptmst_ray.trajectories.shortcut import shortcut_trajectory, storage_figures
from ptmst_ray.trajectories.store import save_shortcut
from ptmst_ray.trajectories.store import TrajectoryStore

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_matching import command_line, machine, replace_section  # noqa: E402  (shared RESULTS.md helpers)

SECTION = "## Shortcut storage: materialised vs compact"
REPO = Path(__file__).resolve().parents[1]
TEXT_DIM = 64
PAPER_EXPERTS, PAPER_RANGES = 20, [(0, 6), (0, 8)]
TOY_SNAPSHOTS = 7


def mb(n: float) -> str:
    return f"{n / 1e6:,.2f}"


def toy_tensors(model_cfg: ModelConfig) -> dict[str, torch.Tensor]:
    """The tensors a toy expert trajectory records (trainable image.* and head.*), random init."""
    student = build_student(dataclasses.replace(model_cfg, pretrained=None), text_dim=TEXT_DIM, seed=0)
    return {n: p.detach() for n, p in trainable_params(student).items()}


def paper_tensors() -> dict[str, torch.Tensor]:
    """NFNet-L0 (timm, random weights, no download) as "image.*" + ProjectionHead(768, 2304) as "head.*"."""
    import timm

    image = timm.create_model("nfnet_l0", pretrained=False, num_classes=0, global_pool="avg")
    head = ProjectionHead(768, 2304)
    out = {f"image.{n}": p.detach() for n, p in image.named_parameters()}
    out.update({f"head.{n}": p.detach() for n, p in head.named_parameters()})
    return out


def figure_rows(label: str, tensors: dict[str, torch.Tensor], ranges, experts: int) -> tuple[list[str], dict]:
    params = sum(t.numel() for t in tensors.values())
    fig = storage_figures(params, ranges, experts, itemsize=4, num_tensors=len(tensors))
    rows = []
    for r in fig["ranges"]:
        a, b = r["range"]
        rows.append(f"| {label} | [{a}, {b}] | {r['steps']} | {mb(r['materialised_bytes_per_expert'])} | "
                    f"{mb(r['compact_bytes_per_expert'])} | {experts} | {mb(r['materialised_bytes'])} | "
                    f"{mb(r['compact_bytes'])} | {r['ratio']:.2f} |")
    rows.append(f"| {label}, all ranges | | | | | {experts} | {mb(fig['materialised_bytes'])} | "
                f"{mb(fig['compact_bytes'])} | {fig['materialised_bytes'] / fig['compact_bytes']:.2f} |")
    return rows, fig


def random_trajectory(base: dict[str, torch.Tensor], snapshots: int, seed: int = 0) -> list[dict[str, torch.Tensor]]:
    """A random walk from ``base``: each epoch adds Gaussian noise of 1% of each tensor's scale."""
    gen = torch.Generator().manual_seed(seed)
    out = [{n: t.clone() for n, t in base.items()}]
    for _ in range(snapshots - 1):
        prev = out[-1]
        out.append({n: t + 0.01 * (t.std() if t.numel() > 1 else 1.0) * torch.randn(t.shape, generator=gen)
                    for n, t in prev.items()})
    return out


def on_disk(tensors: dict[str, torch.Tensor]) -> dict[str, int]:
    """File sizes of one random toy trajectory: compact shortcut vs its materialised snapshots."""
    snaps = random_trajectory(tensors, TOY_SNAPSHOTS)
    traj = shortcut_trajectory(snaps, 0, TOY_SNAPSHOTS - 1)
    with tempfile.TemporaryDirectory() as tmp:
        compact_url = os.path.join(tmp, "shortcut.safetensors")
        save_shortcut(compact_url, traj, {"bench": "bench_storage"})
        store = TrajectoryStore(os.path.join(tmp, "materialised"))
        store.write_expert(0, traj.materialise(), seed=0, config_hash="bench")
        return {"compact_file": os.path.getsize(compact_url),
                "materialised_file": sum(os.path.getsize(store.url(0, e)) for e in range(TOY_SNAPSHOTS)),
                "compact_nbytes": traj.nbytes, "materialised_nbytes": traj.materialised_nbytes,
                "params": sum(t.numel() for t in tensors.values()), "tensors": len(tensors)}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default=str(REPO / "configs" / "toy.yaml"))
    p.add_argument("--no-paper", action="store_true", help="skip the NFNet-L0 figures")
    p.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    args = p.parse_args()
    t0 = time.perf_counter()
    cfg = load_config(args.config)
    toy = toy_tensors(cfg.model)
    toy_ranges = [(ph.range_start, ph.range_end) for ph in cfg.phases]
    header = ["| setting | range | K | materialised MB / expert | compact MB / expert | experts | "
              "materialised MB, all experts | compact MB, all experts | ratio |",
              "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    rows, toy_fig = figure_rows("toy", toy, toy_ranges, cfg.experts.num_experts)
    notes = [f"toy: {toy_fig['param_count']:,} parameters in {toy_fig['num_tensors']} tensors "
             f"(`build_student({Path(args.config).name} model, pretrained=None, text_dim={TEXT_DIM})`)"]
    if not args.no_paper:
        paper_rows, paper_fig = figure_rows("paper", paper_tensors(), PAPER_RANGES, PAPER_EXPERTS)
        rows += paper_rows
        notes.append(f"paper: {paper_fig['param_count']:,} parameters in {paper_fig['num_tensors']} tensors "
                     "(timm `nfnet_l0`, num_classes=0, avg pool, + `ProjectionHead(768, 2304)`)")
    disk = on_disk(toy)
    disk_table = [
        "| form | formula bytes | file bytes on disk | file / formula |",
        "|---|---:|---:|---:|",
        f"| materialised ({TOY_SNAPSHOTS} snapshots in the expert store: a file each) | "
        f"{disk['materialised_nbytes']:,} | "
        f"{disk['materialised_file']:,} | {disk['materialised_file'] / disk['materialised_nbytes']:.3f} |",
        f"| compact (`save_shortcut`) | {disk['compact_nbytes']:,} | {disk['compact_file']:,} | "
        f"{disk['compact_file'] / disk['compact_nbytes']:.3f} |",
        f"| ratio materialised / compact | {disk['materialised_nbytes'] / disk['compact_nbytes']:.2f} | "
        f"{disk['materialised_file'] / disk['compact_file']:.2f} | |",
    ]
    text = "\n".join(header + rows) + "\n\n" + "\n".join(disk_table)
    print("\n".join(notes))
    print(text)
    print(f"total {time.perf_counter() - t0:.0f} s")
    if not args.no_write:
        body = (f"Command: `{command_line()}`\n\nMachine: {machine()}\n\n"
                "Figures from `trajectories.shortcut.storage_figures` (float32 end points, float64 beta table; "
                "MB = 10^6 bytes): materialised = (K+1) P x 4 bytes, compact = 2 P x 4 + (K+1) x tensors x 8.\n"
                + "".join(f"\n* {n}" for n in notes) + "\n\n" + "\n".join(header + rows)
                + "\n\nThe saving is against materialised shortcuts; the expert trajectories themselves (epochs "
                "0..K_e, (K_e+1) P floats each) are kept by `TrajectoryStore` either way. Ranges that share a start "
                "(all of the above start at 0) store theta_a once per range."
                + f"\n\nOn disk: one random {TOY_SNAPSHOTS}-snapshot toy trajectory (range [0, {TOY_SNAPSHOTS - 1}]), "
                "its shortcut written with `save_shortcut` and the shortcut's materialised snapshots written with "
                "`TrajectoryStore.write_expert` (an epoch a file; every file a safetensors carrying its JSON sidecar "
                "in the header).\n\n"
                + "\n".join(disk_table) + "\n")
        replace_section(SECTION, body)


if __name__ == "__main__":
    main()
