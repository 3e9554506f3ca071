"""Stage `aggregate`: the phase subsets, in phase order, as one exported distilled dataset.

Why this file exists: users take the distilled set away. It is written as Parquet that pyarrow
and Ray Data read directly (images as PNG bytes, text embeddings, nearest real captions, each
pair's row of its phase's similarity matrix, the learned step sizes), plus the exact float
tensors (safetensors) that evaluation uses, an image-grid PNG and a JSON card. No Ray here.
"""

from __future__ import annotations

import dataclasses
import io
import logging
import math

import pyarrow as pa
import pyarrow.parquet as pq
import torch
from PIL import Image
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from ptmst_ray import storage
from ptmst_ray.config import Config
from ptmst_ray.evaluate.protocol import Subset
from ptmst_ray.layout import Layout, StageError, distilled_hash, phase_jobs, phase_name, phase_outcome

log = logging.getLogger(__name__)

TENSORS = "distilled.safetensors"
PARQUET = "distilled.parquet"
GRID = "grid.png"
CARD = "card.json"


def phase_subset_dirs(cfg: Config) -> list[tuple[str, str]]:
    """(status, directory) of each phase's subset: "done" (finished) or "diverged" (its last finite EMA state).

    Raises StageError when a phase has neither (it has not run, or failed).
    """
    out = []
    for i, job in enumerate(phase_jobs(cfg, with_baseline=False)):
        outcome = phase_outcome(cfg, job)
        if outcome.status == "none":
            raise StageError(f"{Layout.of(cfg).subset(job.name)}: phase {i} has not finished; "
                             "run `ptmst-ray run` to distil it")
        out.append((outcome.status, outcome.dir))
    return out


def check_usable(directory: str, sub) -> None:
    """Raise a StageError naming ``directory`` unless the stored subset can train a student: finite tensors
    and positive learned step sizes (SGD refuses a negative lr; nothing clamps it without distill.min_alpha)."""
    bad = [k for k in ("images", "text", "similarity") if not bool(torch.isfinite(getattr(sub, k)).all())]
    bad += [k for k in ("alpha_img", "alpha_txt") if not math.isfinite(getattr(sub, k))]
    if bad:
        raise StageError(f"{directory}: {', '.join(bad)} not finite; the phase diverged before its EMA state "
                         "settled. Lower distill.lr_img / lr_txt / lr_sim (or the phase's similarity alpha), then "
                         "`ptmst-ray run --rebuild phases`")
    negative = [f"{k} = {getattr(sub, k):.4g}" for k in ("alpha_img", "alpha_txt") if getattr(sub, k) <= 0]
    if negative:
        raise StageError(f"{directory}: learned step size {', '.join(negative)} is not positive, so no student can "
                         "train with it. Set distill.min_alpha (a floor, e.g. 1e-4) or lower distill.lr_lr, then "
                         "`ptmst-ray run --rebuild phases`")


def _png(img_uint8: torch.Tensor) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(img_uint8.permute(1, 2, 0).numpy()).save(buf, format="PNG")
    return buf.getvalue()


def aggregate(cfg: Config) -> dict:
    """Join the phase subsets into ``<root>/distilled`` (skipped when up to date); returns the manifest."""
    from ptmst_ray.data.dataset import denormalize_images
    from ptmst_ray.distill.export import image_grid_png, load_subset

    layout = Layout.of(cfg)
    sources = phase_subset_dirs(cfg)
    statuses = [status for status, _ in sources]
    chash = distilled_hash(cfg, statuses)
    done = storage.read_manifest(layout.distilled)
    if done is not None and done.get("config_hash") == chash:
        storage.verify_files(layout.distilled, done["files"])
        return done
    subsets = []
    for status, d in sources:
        sub = load_subset(d)
        check_usable(d, sub)
        if status == "diverged":
            log.warning("%s diverged (%s); the distilled set uses its last finite EMA state (iteration %s)",
                        sub.meta.get("name"), sub.meta["diverged"].get("detail"), sub.meta.get("iterations"))
        subsets.append(sub)
    rows: dict[str, list] = {k: [] for k in ("phase", "index", "image_png", "text_embedding", "nearest_caption",
                                             "similarity_row", "alpha_img", "alpha_txt")}
    tensors, captions = {}, []
    for p, sub in enumerate(subsets):
        images_u8 = denormalize_images(sub.images.float())
        caps = sub.meta.get("nearest_captions") or [""] * sub.images.shape[0]
        captions += caps
        for j in range(sub.images.shape[0]):
            rows["phase"].append(p)
            rows["index"].append(j)
            rows["image_png"].append(_png(images_u8[j]))
            rows["text_embedding"].append(sub.text[j].float().tolist())
            rows["nearest_caption"].append(caps[j])
            rows["similarity_row"].append(sub.similarity[j].float().tolist())
            rows["alpha_img"].append(sub.alpha_img)
            rows["alpha_txt"].append(sub.alpha_txt)
        tensors.update({f"phase{p}/images": sub.images.contiguous(), f"phase{p}/text": sub.text.contiguous(),
                        f"phase{p}/similarity": sub.similarity.contiguous(),
                        f"phase{p}/alphas": torch.tensor([sub.alpha_img, sub.alpha_txt])})
    buf = io.BytesIO()
    pq.write_table(pa.table(rows), buf)
    out = layout.distilled
    storage.write_bytes(storage.join(out, PARQUET), buf.getvalue())
    storage.write_bytes(storage.join(out, TENSORS), st_save(tensors))
    image_grid_png(torch.cat([s.images.float() for s in subsets]), captions, storage.join(out, GRID))
    card = {
        "method": "PTM-ST (phased teachers + shortcut trajectories)" if cfg.shortcut.enabled else "PTM (raw trajectories)",
        "pairs": sum(s.images.shape[0] for s in subsets),
        "phases": [{**dataclasses.asdict(cfg.phases[i]), "alpha_img": s.alpha_img, "alpha_txt": s.alpha_txt,
                    "iterations_run": s.meta.get("iterations"), "status": statuses[i],
                    **({"diverged": s.meta["diverged"]} if statuses[i] == "diverged" else {})}
                   for i, s in enumerate(subsets)],
        "distill": dataclasses.asdict(cfg.distill), "experts": dataclasses.asdict(cfg.experts),
        "model": dataclasses.asdict(cfg.model), "data": dataclasses.asdict(cfg.data),
        "files": {"parquet": PARQUET, "tensors": TENSORS, "grid": GRID},
    }
    storage.write_json(storage.join(out, CARD), card)
    files = {n: storage.hash_file(storage.join(out, n)) for n in (PARQUET, TENSORS, CARD)}
    manifest = {"config_hash": chash, "files": files, "pairs": card["pairs"], "phases": len(subsets),
                "diverged": [phase_name(i) for i, s in enumerate(statuses) if s == "diverged"]}
    storage.write_manifest(out, manifest)
    log.info("distilled set: %d pairs in %d phases at %s", card["pairs"], len(subsets), out)
    return manifest


def load_distilled(directory: str) -> list[Subset]:
    """The subsets of an exported distilled set, in phase order, ready for evaluation."""
    manifest = storage.read_manifest(directory)
    if manifest is None:
        raise StageError(f"{directory}: no distilled set here (no manifest); run `ptmst-ray run` first")
    storage.verify_files(directory, manifest["files"])
    t = st_load(storage.read_bytes(storage.join(directory, TENSORS)))
    subsets = []
    for p in range(int(manifest["phases"])):
        a_img, a_txt = t[f"phase{p}/alphas"].tolist()
        subsets.append(Subset(images=t[f"phase{p}/images"].float(), text_emb=t[f"phase{p}/text"].float(),
                              similarity=t[f"phase{p}/similarity"].float(), lr_img=a_img, lr_txt=a_txt))
    return subsets
