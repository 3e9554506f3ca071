"""The built-in dataset: seeded coloured shapes with compositional, paraphrased captions.

Why this file exists: the pipeline must run end to end on a laptop without downloading a
benchmark, and the result must still mean something: a caption names every attribute of its
image (shapes, colours, sizes, positions, background), so different images get different
captions and retrieval recall measures real image-text alignment. The files are written in the
same annotation format as the benchmarks (``builtin_{train,test,pretrain}.json`` + PNGs), so the
rest of the pipeline cannot tell the difference.

Every image has a unique attribute combination across all splits (train and test, and val when
``val_images`` > 0, come from ``seed``; pretrain from ``pretrain_seed`` with those combinations
excluded), and the generator checks that no two images have the same pixels.

``data.builtin.kind`` scenes / scenes-alt: data/scenes.py plans, draws and captions the scenes; this
file writes them through the same path (files, manifest, pixel check).
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import random
from dataclasses import dataclass
from typing import Callable

from PIL import Image, ImageDraw

from ptmst_ray import storage
from ptmst_ray.config import BuiltinDataConfig
from ptmst_ray.data import scenes as scene_kinds

log = logging.getLogger(__name__)

VERSION = 1
"""Bump when the generator's output changes (part of the manifest's config hash)."""

SHAPES = ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon")
COLOURS = {
    "red": (220, 35, 35), "green": (35, 170, 60), "blue": (40, 80, 235), "yellow": (245, 215, 30),
    "purple": (140, 50, 190), "orange": (250, 135, 20), "pink": (250, 125, 195), "cyan": (40, 210, 225),
}
BACKGROUNDS = {"black": (10, 10, 10), "white": (245, 245, 245), "gray": (128, 128, 128), "brown": (105, 70, 40)}
SIZES = {"small": 0.26, "large": 0.42}
"""Object size as a fraction of the image side (single object); two objects use 0.85 of it."""
CELLS = {  # single-object positions: name -> centre (fraction of the side)
    "top left": (0.25, 0.25), "top": (0.5, 0.25), "top right": (0.75, 0.25),
    "left": (0.25, 0.5), "center": (0.5, 0.5), "right": (0.75, 0.5),
    "bottom left": (0.25, 0.75), "bottom": (0.5, 0.75), "bottom right": (0.75, 0.75),
}
SIZE_WORDS = {"small": ("small", "little", "tiny"), "large": ("large", "big")}
POSITION_WORDS = {
    "top left": ("in the top left corner", "at the upper left"), "top": ("at the top", "near the top edge"),
    "top right": ("in the top right corner", "at the upper right"), "left": ("on the left", "at the left side"),
    "center": ("in the center", "in the middle"), "right": ("on the right", "at the right side"),
    "bottom left": ("in the bottom left corner", "at the lower left"), "bottom": ("at the bottom", "near the bottom edge"),
    "bottom right": ("in the bottom right corner", "at the lower right"),
}
RENDER_SCALE = 4
"""Shapes are drawn at this multiple of the output size, then downsampled (anti-aliasing)."""


@dataclass(frozen=True)
class Obj:
    shape: str
    colour: str
    size: str


@dataclass(frozen=True)
class Scene:
    """What an image shows; also its identity (unique across every split)."""

    objects: tuple[Obj, ...]
    layout: str  # a CELLS name for one object; "horizontal" (first left) or "vertical" (first on top)
    background: str


# --------------------------------------------------------------------------- sampling


def _sample_obj(rng: random.Random) -> Obj:
    return Obj(rng.choice(SHAPES), rng.choice(list(COLOURS)), rng.choice(list(SIZES)))


def _sample_scene(rng: random.Random) -> Scene:
    bg = rng.choice(list(BACKGROUNDS))
    if rng.random() < 0.5:
        return Scene((_sample_obj(rng),), rng.choice(list(CELLS)), bg)
    a, b = _sample_obj(rng), _sample_obj(rng)
    while b == a:
        b = _sample_obj(rng)
    return Scene((a, b), rng.choice(("horizontal", "vertical")), bg)


def sample_scenes(n: int, rng: random.Random, exclude: set[Scene]) -> list[Scene]:
    """``n`` distinct scenes not in ``exclude`` (which is extended with them)."""
    return scene_kinds.draw_distinct(n, lambda: _sample_scene(rng), exclude, "the builtin image counts")


# --------------------------------------------------------------------------- captions


def _obj_phrase(o: Obj, rng: random.Random) -> str:
    size = rng.choice(SIZE_WORDS[o.size])
    return f"a {size} {o.colour} {o.shape}"


def _single_captions(s: Scene, rng: random.Random) -> list[str]:
    o, bg = s.objects[0], s.background
    pos = POSITION_WORDS[s.layout]
    return [
        f"{_obj_phrase(o, rng)} {pos[0]} on a {bg} background",
        f"a {bg} background with {_obj_phrase(o, rng)} {pos[1]}",
        f"there is {_obj_phrase(o, rng)} {pos[1]} of a {bg} picture",
        f"{_obj_phrase(o, rng)} sits {pos[0]}, the background is {bg}",
        f"an image with a {bg} background showing {_obj_phrase(o, rng)} {pos[0]}",
        f"{pos[1]} of the {bg} image is {_obj_phrase(o, rng)}",
    ]


def _pair_captions(s: Scene, rng: random.Random) -> list[str]:
    a, b = s.objects
    bg = s.background
    A, B = _obj_phrase(a, rng), _obj_phrase(b, rng)
    A2, B2 = _obj_phrase(a, rng), _obj_phrase(b, rng)
    if s.layout == "horizontal":
        return [
            f"{A} to the left of {B} on a {bg} background",
            f"{B2} to the right of {A2}, {bg} background",
            f"{A} on the left and {B2} on the right over {bg}",
            f"a {bg} picture with {B} on the right side and {A2} on the left side",
            f"{A2} left of {B2} on {bg}",
            f"two shapes on a {bg} background, {A} at left and {B} at right",
        ]
    return [
        f"{A} above {B} on a {bg} background",
        f"{B2} below {A2}, {bg} background",
        f"{A} at the top and {B2} at the bottom over {bg}",
        f"a {bg} picture with {B} underneath and {A2} on top",
        f"{A2} over {B2} on {bg}",
        f"two shapes on a {bg} background, {A} at top and {B} at bottom",
    ]


def captions_for(scene: Scene, n: int, rng: random.Random) -> list[str]:
    """``n`` paraphrases of ``scene``, distinct while the templates allow (each names every attribute)."""
    make = _single_captions if len(scene.objects) == 1 else _pair_captions
    pool = list(dict.fromkeys(make(scene, rng)))
    rng.shuffle(pool)
    for _ in range(20):  # more captions than templates: the same templates with fresh synonyms
        if len(pool) >= n:
            break
        pool.extend(c for c in dict.fromkeys(make(scene, rng)) if c not in pool)
    if len(pool) < n:  # the paraphrase space is exhausted: repeat
        pool = (pool * (n // len(pool) + 1))[:n]
    return pool[:n]


# --------------------------------------------------------------------------- rendering


def _polygon(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]]:
    if shape == "triangle":
        return [(cx, cy - r), (cx + 0.95 * r, cy + 0.75 * r), (cx - 0.95 * r, cy + 0.75 * r)]
    if shape == "diamond":
        return [(cx, cy - r), (cx + 0.8 * r, cy), (cx, cy + r), (cx - 0.8 * r, cy)]
    if shape == "hexagon":
        return [(cx + r * math.cos(math.pi / 3 * k), cy + r * math.sin(math.pi / 3 * k)) for k in range(6)]
    if shape == "star":
        pts = []
        for k in range(10):
            rad = r if k % 2 == 0 else 0.42 * r
            ang = -math.pi / 2 + math.pi / 5 * k
            pts.append((cx + rad * math.cos(ang), cy + rad * math.sin(ang)))
        return pts
    if shape == "cross":
        t = 0.34 * r
        return [(cx - t, cy - r), (cx + t, cy - r), (cx + t, cy - t), (cx + r, cy - t), (cx + r, cy + t),
                (cx + t, cy + t), (cx + t, cy + r), (cx - t, cy + r), (cx - t, cy + t), (cx - r, cy + t),
                (cx - r, cy - t), (cx - t, cy - t)]
    raise ValueError(shape)


def _draw_obj(draw: ImageDraw.ImageDraw, o: Obj, cx: float, cy: float, r: float, rgb: tuple[int, int, int]) -> None:
    box = (cx - r, cy - r, cx + r, cy + r)
    if o.shape == "circle":
        draw.ellipse(box, fill=rgb)
    elif o.shape == "ring":
        draw.ellipse(box, outline=rgb, width=max(1, round(0.38 * r)))
    elif o.shape == "square":
        s = 0.85 * r
        draw.rectangle((cx - s, cy - s, cx + s, cy + s), fill=rgb)
    else:
        draw.polygon(_polygon(o.shape, cx, cy, r), fill=rgb)


def _jitter_rgb(rgb: tuple[int, int, int], rng: random.Random, amount: int) -> tuple[int, int, int]:
    return tuple(min(255, max(0, c + rng.randint(-amount, amount))) for c in rgb)  # type: ignore[return-value]


def _centres(scene: Scene) -> list[tuple[float, float]]:
    if len(scene.objects) == 1:
        return [CELLS[scene.layout]]
    if scene.layout == "horizontal":
        return [(0.27, 0.5), (0.73, 0.5)]
    return [(0.5, 0.27), (0.5, 0.73)]


def render(scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """The scene drawn at RENDER_SCALE x ``image_size`` with small random jitter, then downsampled."""
    side = image_size * RENDER_SCALE
    img = Image.new("RGB", (side, side), _jitter_rgb(BACKGROUNDS[scene.background], rng, 10))
    draw = ImageDraw.Draw(img)
    shrink = 1.0 if len(scene.objects) == 1 else 0.85
    for o, (fx, fy) in zip(scene.objects, _centres(scene)):
        r = side * SIZES[o.size] * shrink / 2 * rng.uniform(0.9, 1.1)
        cx = side * (fx + rng.uniform(-0.04, 0.04))
        cy = side * (fy + rng.uniform(-0.04, 0.04))
        _draw_obj(draw, o, cx, cy, r, _jitter_rgb(COLOURS[o.colour], rng, 14))
    return img.resize((image_size, image_size), Image.Resampling.BOX)


def png_bytes(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG", optimize=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- splits and files


def _rng(*parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def plan_scenes(cfg: BuiltinDataConfig) -> dict[str, list[Scene]]:
    """Scenes per split: test then train from ``seed``; pretrain from ``pretrain_seed``, excluding both.
    The scenes kinds (``data.builtin.kind``) draw theirs in data/scenes.py, the same way."""
    if cfg.kind != "shapes":
        return scene_kinds.plan_scenes(cfg)  # type: ignore[return-value]
    used: set[Scene] = set()
    rng = _rng("builtin", VERSION, cfg.seed)
    test = sample_scenes(cfg.test_images, rng, used)
    train = sample_scenes(cfg.train_images, rng, used)
    # val (val_images > 0) is drawn after train and test, so they do not depend on it
    val = {"val": sample_scenes(cfg.val_images, rng, used)} if cfg.val_images > 0 else {}
    pretrain = sample_scenes(cfg.pretrain_images, _rng("builtin-pretrain", VERSION, cfg.pretrain_seed), used)
    return {"train": train, "test": test, "pretrain": pretrain, **val}


def config_hash(cfg: BuiltinDataConfig, image_size: int) -> str:
    version = VERSION if cfg.kind == "shapes" else [VERSION, scene_kinds.VERSION]
    return storage.stable_hash({"builtin": cfg.identity(), "image_size": image_size, "version": version})


EVAL_SPLITS = ("test", "val")
"""Splits written in the val/test shape: one row per image with its 5 captions."""


def _split_rows(split: str, scenes: list[Scene], cfg: BuiltinDataConfig, image_size: int,
                seed: int, images: dict[str, bytes]) -> list[dict]:
    """Render ``scenes`` into ``images`` (path -> PNG) and return the split's annotation rows."""
    rows: list[dict] = []
    n_caps = 5 if split in EVAL_SPLITS else cfg.captions_per_image
    for i, scene in enumerate(scenes):
        rng = _rng(split, seed, i, VERSION)
        path = f"images/{split}/{split}_{i:05d}.png"
        if cfg.kind == "shapes":
            images[path] = png_bytes(render(scene, image_size, rng))
            caps = captions_for(scene, n_caps, rng)
        else:  # the scenes kinds: their theme's drawing and captions, the same rows and files
            theme = scene_kinds.theme_of(cfg)
            images[path] = png_bytes(scene_kinds.render(theme, scene, image_size, rng))
            caps = scene_kinds.captions_for(theme, scene, n_caps, rng)
        image_id = f"{split}_{i:05d}"
        if split in EVAL_SPLITS:
            rows.append({"image": path, "caption": caps, "image_id": image_id})
        else:
            rows.extend({"image": path, "caption": c, "image_id": image_id} for c in caps)
    return rows


def _check_unique_pixels(images: dict[str, bytes]) -> None:
    seen: dict[str, str] = {}
    for path, data in images.items():
        digest = storage.hash_bytes(data)
        if digest in seen:
            raise ValueError(f"builtin generator produced identical images {seen[digest]} and {path}")
        seen[digest] = path


def caption_stats(rows_by_split: dict[str, list[dict]]) -> dict[str, dict]:
    """Per split: images, captions, distinct captions, and captions shared by more than one image."""
    out = {}
    for split, rows in rows_by_split.items():
        owners: dict[str, set[str]] = {}
        for r in rows:
            caps = r["caption"] if isinstance(r["caption"], list) else [r["caption"]]
            for c in caps:
                owners.setdefault(c, set()).add(r["image"])
        out[split] = {
            "images": len({r["image"] for r in rows}),
            "captions": sum(len(r["caption"]) if isinstance(r["caption"], list) else 1 for r in rows),
            "distinct_captions": len(owners),
            "captions_shared_by_images": sum(1 for o in owners.values() if len(o) > 1),
        }
    return out


def generate_builtin(out_url: str, cfg: BuiltinDataConfig, image_size: int = 32,
                     progress: Callable[[int, int], None] | None = None) -> dict:
    """Write builtin_{train,test,pretrain}.json (and builtin_val.json with ``val_images``) and
    images/<split>/*.png under ``out_url``.

    Idempotent: a manifest (written last) with the same config hash means the files are there.
    Returns the manifest.
    """
    chash = config_hash(cfg, image_size)
    old = storage.read_manifest(out_url)
    if old is not None and old.get("config_hash") == chash:
        log.info("builtin dataset at %s is up to date", out_url)
        return old
    plan = plan_scenes(cfg)
    total, done = sum(len(v) for v in plan.values()), 0
    files: dict[str, str] = {}
    rows_by_split: dict[str, list[dict]] = {}
    all_hashes: dict[str, bytes] = {}
    for split, scenes in plan.items():
        seed = cfg.pretrain_seed if split == "pretrain" else cfg.seed
        images: dict[str, bytes] = {}
        rows_by_split[split] = _split_rows(split, scenes, cfg, image_size, seed, images)
        storage.write_all({storage.join(out_url, path): data for path, data in images.items()})
        files.update({path: storage.hash_bytes(data) for path, data in images.items()})
        all_hashes.update(images)
        done += len(scenes)
        if progress:
            progress(done, total)
    _check_unique_pixels(all_hashes)
    for split, rows in rows_by_split.items():
        name = f"builtin_{split}.json"
        text = json.dumps(rows, indent=0)
        storage.write_text(storage.join(out_url, name), text)
        files[name] = storage.hash_bytes(text.encode("utf-8"))
    stats = caption_stats(rows_by_split)
    manifest = {"kind": "builtin_source", "config_hash": chash, "image_size": image_size,
                "version": VERSION, "stats": stats, "files": files}
    storage.write_manifest(out_url, manifest)
    log.info("builtin dataset written to %s: %s", out_url, stats)
    return manifest
