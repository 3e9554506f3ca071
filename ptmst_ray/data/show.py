"""Look at prepared data: counts and sample rows, and a contact sheet of images with captions.

Why this file exists: before spending GPU hours, a user should be able to see that the images
and captions line up (`ptmst-ray data show`); the CLI prints :func:`summarize` and saves
:func:`contact_sheet`.
"""

from __future__ import annotations

import io
import logging
import textwrap

from PIL import Image, ImageDraw, ImageFont

from ptmst_ray import storage
from ptmst_ray.data.dataset import PairSet, load_split

log = logging.getLogger(__name__)


def summarize(data_dir: str, samples: int = 3) -> dict:
    """Dataset manifest, per-split counts and the first ``samples`` captions of each split."""
    top = storage.read_manifest(data_dir)
    if top is None:
        raise storage.StorageError(f"{data_dir}: no prepared data (no manifest); run `ptmst-ray data prepare` first")
    out = {"dataset": top["dataset"], "image_size": top["image_size"], "splits": {}}
    for split, info in top["splits"].items():
        data = load_split(data_dir, split, verify=False)
        rows = []
        for j in range(min(samples, len(data.captions))):
            idx = data.image_index[j] if isinstance(data, PairSet) else data.txt2img[j]
            rows.append({"image_id": data.image_ids[int(idx)], "caption": data.captions[j]})
        out["splits"][split] = {"rows": info["rows"], "images": info["images"], "captions": info["captions"],
                                "skipped": info["skipped"], "samples": rows}
    return out


def _first_captions(data, n: int) -> list[tuple[int, str]]:
    """(image index, caption) for the first ``n`` distinct images of a split."""
    index = data.image_index if isinstance(data, PairSet) else data.txt2img
    seen: dict[int, str] = {}
    for j, i in enumerate(index.tolist()):
        if i not in seen:
            seen[i] = data.captions[j]
            if len(seen) == n:
                break
    return list(seen.items())


def contact_sheet(data_dir: str, split: str, out_png: str, n: int = 16, cell: int = 128, cols: int = 4) -> str:
    """Draw the first ``n`` images of ``split`` (upscaled to ``cell`` px) with wrapped captions; return ``out_png``."""
    data = load_split(data_dir, split)
    items = _first_captions(data, n)
    font = ImageFont.load_default()
    text_h = 60
    rows = max(1, (len(items) + cols - 1) // cols)
    sheet = Image.new("RGB", (cols * (cell + 8), rows * (cell + text_h + 8)), "white")
    draw = ImageDraw.Draw(sheet)
    width_chars = max(10, cell // 6)
    for k, (i, caption) in enumerate(items):
        x, y = (k % cols) * (cell + 8) + 4, (k // cols) * (cell + text_h + 8) + 4
        img = Image.fromarray(data.images[i].permute(1, 2, 0).numpy()).resize((cell, cell), Image.Resampling.NEAREST)
        sheet.paste(img, (x, y))
        lines = textwrap.wrap(caption, width_chars)[:5]
        draw.multiline_text((x, y + cell + 2), "\n".join(lines), fill="black", font=font, spacing=1)
    buf = io.BytesIO()
    sheet.save(buf, format="PNG")
    storage.write_bytes(out_png, buf.getvalue())
    log.info("contact sheet of %d %s images written to %s", len(items), split, out_png)
    return out_png
