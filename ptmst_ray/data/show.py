"""Look at prepared data: counts and sample rows, and a contact sheet of images with captions.

Why this file exists: before spending GPU hours, a user should be able to see that the images
and captions line up (`ptmst-ray data show`); the CLI prints :func:`summarize` and saves
:func:`contact_sheet`. Neither holds a split's pixels: the summary reads captions and ids, the sheet decodes
only the images it draws.
"""

from __future__ import annotations

import io
import logging
import textwrap

import torch

from PIL import Image, ImageDraw, ImageFont

from ptmst_ray import storage
from ptmst_ray.data.dataset import ShardImages, read_captions, read_image_ids, split_manifest

log = logging.getLogger(__name__)


class UnknownSplit(ValueError):
    """A split the prepared data does not have; the message names those it has."""


def summarize(data_dir: str, samples: int = 3, split: str | None = None) -> dict:
    """Dataset manifest, per-split counts and the first ``samples`` captions of each split (of ``split`` alone
    when given: a split the data does not have is :class:`UnknownSplit`)."""
    top = storage.read_manifest(data_dir)
    if top is None:
        raise storage.StorageError(f"{data_dir}: no prepared data (no manifest); run `ptmst-ray data prepare` first")
    if split is not None and split not in top["splits"]:
        raise UnknownSplit(f"no split {split!r} in the data prepared at {data_dir}; it has "
                           f"{', '.join(sorted(top['splits']))}")
    out = {"dataset": top["dataset"], "image_size": top["image_size"], "splits": {}}
    for name, info in top["splits"].items():  # captions and image ids only: no pixel is read
        if split is not None and name != split:
            continue
        caps, ids = read_captions(data_dir, name), read_image_ids(data_dir, name)
        rows = [{"image_id": ids[int(caps.image_index[j])], "caption": caps.captions[j]}
                for j in range(min(samples, len(caps.captions)))]
        out["splits"][name] = {"rows": info["rows"], "images": info["images"], "captions": info["captions"],
                                "skipped": info["skipped"], "samples": rows}
    return out


def _first_captions(caps, n: int) -> list[tuple[int, str]]:
    """(image index, caption) for the first ``n`` distinct images of a split's captions."""
    seen: dict[int, str] = {}
    for j, i in enumerate(caps.image_index.tolist()):
        if i not in seen:
            seen[i] = caps.captions[j]
            if len(seen) == n:
                break
    return list(seen.items())


def contact_sheet(data_dir: str, split: str, out_png: str, n: int = 16, cell: int = 128, cols: int = 4) -> str:
    """Draw the first ``n`` images of ``split`` (upscaled to ``cell`` px) with wrapped captions; return ``out_png``."""
    m = split_manifest(data_dir, split, verify=False)
    items = _first_captions(read_captions(data_dir, split, m), n)
    # only these images' row groups are read and decoded (each checked against the manifest), not the split
    images = ShardImages(data_dir, split, m, keep=False)[torch.tensor([i for i, _ in items], dtype=torch.long)]
    font = ImageFont.load_default()
    text_h = 60
    rows = max(1, (len(items) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * (cell + 8), rows * (cell + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    width_chars = max(10, cell // 6)
    for k, (i, caption) in enumerate(items):
        x, y = (k % cols) * (cell + 8) + 4, (k // cols) * (cell + text_h + 8) + 4
        img = Image.fromarray(images[k].permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(img, (x, y))
        lines = textwrap.wrap(caption, width_chars)[:5]
        draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(out_png, buf.getvalue())
    log.info("contact sheet of %d %s images written to %s", len(items), split, out_png)
    return out_png
