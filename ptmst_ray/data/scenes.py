"""Generated scenes: several objects with many attributes and relations, each caption naming a part.

Why this file exists: the shapes dataset (builtin.py) is too easy to tell distillation methods apart:
its concept space is small (one or two shapes, each caption naming every attribute), so 50 random
pairs already reach two thirds of full-data recall and experts converge in one epoch. Real
benchmarks (Flickr30k) sit elsewhere: images show several things, each caption mentions some of
them, and a few hundred random pairs score a quarter of full data. Scenes of 2-5 objects (kind,
colour, size, texture, grid cell) with relations between them, described by captions that each
pick 1-3 objects, a random subset of their attributes and sometimes a relation, give a concept
space far larger than any distillation budget.

Two themes come from one parameterised generator: ``scenes`` (the tuning set) and
``scenes-alt`` (other objects, other words for every attribute and relation, darker and noisier
backgrounds, objects drawn with a shadow and a rim), kept out of tuning to check that a recipe
carries over. builtin.py dispatches here on ``data.builtin.kind`` and writes the files through its
own Karpathy-format path, so the rest of the pipeline cannot tell the difference.
"""

from __future__ import annotations

import hashlib
import math
import random
from dataclasses import dataclass
from typing import Callable, TypeVar

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from ptmst_ray.config import BuiltinDataConfig

VERSION = 1
"""Bump when the scenes' output changes (part of the builtin manifest's config hash for these kinds)."""

GRID = 3
"""Objects sit in distinct cells of a GRID x GRID grid (row-major cell index)."""
RENDER_SCALE = 4
"""Scenes are drawn at this multiple of the output size, then downsampled (anti-aliasing)."""
SIZE_ORDER = ("small", "medium", "large")
"""Object sizes, smallest first ("bigger than" compares positions in this order)."""
SIZE_RADIUS = {"small": 0.55, "medium": 0.78, "large": 1.0}
"""An object's radius as a fraction of half a cell's side."""
RELATIONS = ("left", "right", "above", "below", "bigger", "next")
"""Relations a caption may state between two objects (each theme has its own words for them)."""
ATTRIBUTES = ("size", "colour", "texture", "position")
"""What a caption may say about an object besides its kind."""
MAX_CAPTION_WORDS = 28
"""Captions stay under data.max_words' default (30) so normalisation never cuts one."""

Mask = Callable[[ImageDraw.ImageDraw, float, float, float], None]
"""Draws a kind's silhouette (fill 255) centred at (cx, cy) with radius r onto a mask."""


# --------------------------------------------------------------------------- silhouettes


def _poly(points: list[tuple[float, float]]) -> Mask:
    """A polygon given in unit coordinates (-1..1 around the centre)."""
    def draw(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
        d.polygon([(cx + x * r, cy + y * r) for x, y in points], fill=255)
    return draw


def _regular(n: int, turn: float = -math.pi / 2, inner: float | None = None) -> Mask:
    """A regular n-gon (or an n-pointed star with ``inner`` radius)."""
    k = 2 * n if inner else n
    pts = [((inner if inner and i % 2 else 1.0) * math.cos(turn + 2 * math.pi * i / k),
            (inner if inner and i % 2 else 1.0) * math.sin(turn + 2 * math.pi * i / k)) for i in range(k)]
    return _poly(pts)


def _parts(*parts: tuple[str, tuple[float, ...]]) -> Mask:
    """A union of ellipses, rectangles and polygons in unit coordinates; ("hole", box) clears an ellipse."""
    def draw(d: ImageDraw.ImageDraw, cx: float, cy: float, r: float) -> None:
        for kind, c in parts:
            box = [cx + c[0] * r, cy + c[1] * r, cx + c[2] * r, cy + c[3] * r] if kind != "poly" else None
            if kind == "ellipse":
                d.ellipse(box, fill=255)
            elif kind == "hole":
                d.ellipse(box, fill=0)
            elif kind == "rect":
                d.rectangle(box, fill=255)
            elif kind == "pie":
                d.pieslice(box, c[4], c[5], fill=255)
            else:
                d.polygon([(cx + c[i] * r, cy + c[i + 1] * r) for i in range(0, len(c), 2)], fill=255)
    return draw


SHAPES: dict[str, Mask] = {
    # the scenes theme: geometric figures and simple icons
    "circle": _parts(("ellipse", (-1, -1, 1, 1))),
    "square": _parts(("rect", (-0.85, -0.85, 0.85, 0.85))),
    "triangle": _poly([(0, -1), (0.95, 0.75), (-0.95, 0.75)]),
    "diamond": _poly([(0, -1), (0.75, 0), (0, 1), (-0.75, 0)]),
    "cross": _poly([(-0.33, -1), (0.33, -1), (0.33, -0.33), (1, -0.33), (1, 0.33), (0.33, 0.33), (0.33, 1),
                    (-0.33, 1), (-0.33, 0.33), (-1, 0.33), (-1, -0.33), (-0.33, -0.33)]),
    "star": _regular(5, inner=0.42),
    "ring": _parts(("ellipse", (-1, -1, 1, 1)), ("hole", (-0.55, -0.55, 0.55, 0.55))),
    "hexagon": _regular(6, turn=0.0),
    "pentagon": _regular(5),
    "octagon": _regular(8, turn=math.pi / 8),
    "heart": _parts(("ellipse", (-1, -0.8, 0.05, 0.25)), ("ellipse", (-0.05, -0.8, 1, 0.25)),
                    ("poly", (-0.97, -0.1, 0.97, -0.1, 0, 1))),
    "arrow": _poly([(-1, -0.3), (0.2, -0.3), (0.2, -0.8), (1, 0), (0.2, 0.8), (0.2, 0.3), (-1, 0.3)]),
    "moon": _parts(("ellipse", (-1, -1, 1, 1)), ("hole", (-0.45, -1.1, 1.35, 0.8))),
    "house": _parts(("rect", (-0.75, -0.1, 0.75, 0.95)), ("poly", (-1, -0.05, 0, -1, 1, -0.05))),
    "tree": _parts(("poly", (0, -1, 0.85, 0.45, -0.85, 0.45)), ("rect", (-0.2, 0.4, 0.2, 1))),
    "bar": _parts(("rect", (-1, -0.35, 1, 0.35))),
    "pillar": _parts(("rect", (-0.35, -1, 0.35, 1))),
    "egg": _parts(("ellipse", (-0.65, -1, 0.65, 1))),
    "trapezoid": _poly([(-0.5, -0.7), (0.5, -0.7), (1, 0.7), (-1, 0.7)]),
    "bowtie": _poly([(-1, -0.8), (0, -0.15), (1, -0.8), (1, 0.8), (0, 0.15), (-1, 0.8)]),
    # the scenes-alt theme: objects
    "cup": _parts(("poly", (-0.7, -0.7, 0.5, -0.7, 0.35, 0.9, -0.55, 0.9)), ("ellipse", (0.25, -0.4, 1, 0.4)),
                  ("hole", (0.45, -0.2, 0.8, 0.2))),
    "kite": _parts(("poly", (0, -1, 0.6, -0.2, 0, 0.7, -0.6, -0.2)), ("rect", (-0.05, 0.6, 0.05, 1))),
    "fish": _parts(("ellipse", (-0.9, -0.5, 0.5, 0.5)), ("poly", (0.3, 0, 1, -0.6, 1, 0.6))),
    "boat": _parts(("poly", (-1, 0.3, 1, 0.3, 0.6, 0.9, -0.6, 0.9)), ("poly", (-0.05, -1, -0.05, 0.25, -0.8, 0.25)),
                   ("rect", (-0.05, -1, 0.05, 0.3))),
    "flag": _parts(("rect", (-0.8, -1, -0.62, 1)), ("rect", (-0.62, -1, 0.9, -0.1))),
    "lamp": _parts(("poly", (-0.4, -1, 0.4, -1, 0.8, -0.2, -0.8, -0.2)), ("rect", (-0.08, -0.2, 0.08, 0.75)),
                   ("rect", (-0.55, 0.75, 0.55, 0.95))),
    "mushroom": _parts(("pie", (-1, -0.9, 1, 0.5, 180, 360)), ("rect", (-0.3, -0.2, 0.3, 0.95))),
    "bell": _parts(("poly", (-0.3, -0.9, 0.3, -0.9, 0.6, 0.2, 0.95, 0.65, -0.95, 0.65, -0.6, 0.2)),
                   ("ellipse", (-0.2, 0.6, 0.2, 1))),
    "bottle": _parts(("rect", (-0.5, -0.2, 0.5, 1)), ("rect", (-0.2, -1, 0.2, -0.1))),
    "leaf": _poly([(0, -1), (0.55, -0.5), (0.6, 0.2), (0, 1), (-0.6, 0.2), (-0.55, -0.5)]),
    "cloud": _parts(("ellipse", (-1, -0.2, 0, 0.6)), ("ellipse", (-0.5, -0.7, 0.5, 0.4)),
                    ("ellipse", (0, -0.2, 1, 0.6))),
    "drop": _parts(("ellipse", (-0.65, -0.2, 0.65, 1)), ("poly", (0, -1, 0.6, 0.25, -0.6, 0.25))),
    "crown": _poly([(-1, 0.7), (-1, -0.7), (-0.5, 0), (0, -0.9), (0.5, 0), (1, -0.7), (1, 0.7)]),
    "shield": _poly([(-0.85, -0.9), (0.85, -0.9), (0.85, 0.1), (0, 1), (-0.85, 0.1)]),
    "ladder": _parts(("rect", (-0.7, -1, -0.5, 1)), ("rect", (0.5, -1, 0.7, 1)), ("rect", (-0.6, -0.6, 0.6, -0.45)),
                     ("rect", (-0.6, -0.05, 0.6, 0.1)), ("rect", (-0.6, 0.5, 0.6, 0.65))),
    "umbrella": _parts(("pie", (-1, -0.9, 1, 0.5, 180, 360)), ("rect", (-0.06, -0.2, 0.06, 0.85)),
                       ("rect", (-0.35, 0.75, 0.06, 0.9))),
    "candle": _parts(("rect", (-0.35, -0.3, 0.35, 1)), ("ellipse", (-0.2, -1, 0.2, -0.4))),
    "tent": _poly([(0, -1), (1, 0.9), (0.2, 0.9), (0, 0.3), (-0.2, 0.9), (-1, 0.9)]),
}


# --------------------------------------------------------------------------- themes


@dataclass(frozen=True)
class Theme:
    """Everything that differs between the two generated datasets: objects, words and image statistics."""

    name: str
    kinds: dict[str, tuple[str, ...]]  # kind (a SHAPES key) -> its nouns
    colours: dict[str, tuple[int, int, int]]  # colour word -> RGB
    sizes: dict[str, tuple[str, ...]]  # SIZE_ORDER name -> adjectives
    textures: dict[str, tuple[str, ...]]  # texture (a pattern of _pattern) -> adjectives
    relations: dict[str, tuple[str, ...]]  # RELATIONS name -> phrases ("A <phrase> B")
    positions: tuple[tuple[str, ...], ...]  # per cell (row-major) -> phrases following a noun
    backgrounds: dict[str, tuple[int, int, int]]  # background word(s) -> RGB
    article: str | None  # None: English "a"/"an"; else this word before every object
    joiner: str  # between the last two listed objects
    templates: tuple[str, ...]  # the caption around the listed objects ("{}")
    background_phrases: tuple[str, ...]  # appended sometimes ("{}" = the background word)
    noise: float  # per-pixel background noise std (0-255 scale)
    gradient: float  # top-to-bottom background brightness change (0-255 scale)
    shadow: bool  # objects cast a dark offset shadow and carry a light rim


SCENES = Theme(
    name="scenes",
    kinds={k: (k,) for k in ("circle", "square", "triangle", "diamond", "cross", "star", "ring", "hexagon", "pentagon",
                             "octagon", "heart", "arrow", "moon", "house", "tree", "bar", "pillar", "egg",
                             "trapezoid", "bowtie")} | {"circle": ("circle", "disc"), "square": ("square", "box")},
    colours={"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 230), "yellow": (240, 210, 40),
             "purple": (140, 60, 190), "orange": (245, 140, 30), "pink": (245, 130, 190), "cyan": (50, 200, 220),
             "brown": (120, 75, 40), "black": (25, 25, 25), "white": (250, 250, 250)},
    sizes={"small": ("small", "little", "tiny"), "medium": ("medium", "medium-sized"), "large": ("large", "big")},
    textures={"solid": ("solid", "filled"), "striped": ("striped", "stripy"), "dotted": ("dotted", "spotted"),
              "checkered": ("checkered", "checked"), "outline": ("outlined", "empty")},
    relations={"left": ("to the left of", "left of"), "right": ("to the right of", "right of"),
               "above": ("above", "higher than"), "below": ("below", "lower than"),
               "bigger": ("bigger than", "larger than"), "next": ("next to", "beside")},
    positions=(("in the top left corner", "at the upper left"), ("at the top", "at the top center"),
               ("in the top right corner", "at the upper right"), ("on the left", "at the left side"),
               ("in the center", "in the middle"), ("on the right", "at the right side"),
               ("in the bottom left corner", "at the lower left"), ("at the bottom", "at the bottom center"),
               ("in the bottom right corner", "at the lower right")),
    backgrounds={"gray": (150, 150, 150), "beige": (225, 210, 180), "pale blue": (190, 210, 235),
                 "pale green": (195, 225, 195), "lavender": (215, 200, 235)},
    article=None,
    joiner=" and ",
    templates=("{}", "there is {}", "a picture of {}", "an image with {}", "{} can be seen", "this shows {}",
               "we see {}"),
    background_phrases=(" on a {} background", " over a {} background"),
    noise=6.0,
    gradient=0.0,
    shadow=False,
)

SCENES_ALT = Theme(
    name="scenes-alt",
    kinds={k: (k,) for k in ("cup", "kite", "fish", "boat", "flag", "lamp", "mushroom", "bell", "bottle", "leaf",
                             "cloud", "drop", "crown", "shield", "ladder", "umbrella", "candle", "tent")}
    | {"cup": ("cup", "mug"), "drop": ("drop", "droplet")},
    colours={"crimson": (200, 20, 60), "emerald": (20, 190, 110), "azure": (60, 150, 255), "gold": (255, 200, 0),
             "violet": (190, 110, 255), "coral": (255, 120, 100), "magenta": (255, 0, 200),
             "turquoise": (60, 230, 200), "lime": (160, 255, 60), "ivory": (255, 250, 225),
             "silver": (190, 195, 205), "tan": (210, 180, 140)},
    sizes={"small": ("petite", "miniature"), "medium": ("average", "moderate"), "large": ("giant", "enormous", "huge")},
    textures={"plain": ("uniform", "flat"), "banded": ("banded", "ribbed"), "speckled": ("speckled", "freckled"),
              "gridded": ("gridded", "latticed"), "hollow": ("hollow", "rimmed"), "shaded": ("shaded", "fading")},
    relations={"left": ("west of",), "right": ("east of",), "above": ("north of", "over"),
               "below": ("south of", "beneath"), "bigger": ("more massive than", "outsizing"),
               "next": ("adjacent to", "neighbouring")},
    positions=(("in the northwest",), ("in the north", "up north"), ("in the northeast",),
               ("in the west", "out west"), ("at the core", "dead centre"), ("in the east", "out east"),
               ("in the southwest",), ("in the south", "down south"), ("in the southeast",)),
    backgrounds={"charcoal": (45, 45, 50), "midnight": (20, 25, 60), "moss": (35, 60, 35), "wine": (70, 20, 35),
                 "slate": (60, 70, 80), "umber": (70, 50, 30)},
    article="one",
    joiner=" plus ",
    templates=("{}", "look, {}", "a drawing featuring {}", "somewhere here: {}", "{} appears", "the scene holds {}"),
    background_phrases=(" against a {} backdrop", " before a {} backdrop"),
    noise=22.0,
    gradient=40.0,
    shadow=True,
)

THEMES = {t.name: t for t in (SCENES, SCENES_ALT)}
"""``data.builtin.kind`` -> its theme (``shapes`` is builtin.py's own generator)."""


def theme_of(cfg: BuiltinDataConfig) -> Theme:
    if cfg.kind not in THEMES:
        raise ValueError(f"data.builtin.kind {cfg.kind!r} is not a scenes theme; choose from {', '.join(THEMES)}")
    return THEMES[cfg.kind]


# --------------------------------------------------------------------------- scenes


@dataclass(frozen=True, order=True)
class SceneObject:
    cell: int  # row-major index in the GRID x GRID grid (first: objects sort by cell)
    kind: str
    colour: str
    size: str
    texture: str

    @property
    def row(self) -> int:
        return self.cell // GRID

    @property
    def col(self) -> int:
        return self.cell % GRID


@dataclass(frozen=True)
class Scene:
    """What an image shows; also its identity (unique across every split)."""

    objects: tuple[SceneObject, ...]  # sorted by cell
    background: str


def relations_between(a: SceneObject, b: SceneObject) -> list[str]:
    """The RELATIONS that hold for "a <relation> b" (from cells and sizes)."""
    holds = {"left": a.col < b.col, "right": a.col > b.col, "above": a.row < b.row, "below": a.row > b.row,
             "bigger": SIZE_ORDER.index(a.size) > SIZE_ORDER.index(b.size),
             "next": max(abs(a.row - b.row), abs(a.col - b.col)) == 1}
    return [r for r in RELATIONS if holds[r]]


def sample_scene(theme: Theme, rng: random.Random, objects_min: int, objects_max: int) -> Scene:
    n = rng.randint(objects_min, objects_max)
    cells = rng.sample(range(GRID * GRID), n)
    objs = tuple(sorted(SceneObject(c, rng.choice(list(theme.kinds)), rng.choice(list(theme.colours)),
                                    rng.choice(SIZE_ORDER), rng.choice(list(theme.textures))) for c in cells))
    return Scene(objs, rng.choice(list(theme.backgrounds)))


T = TypeVar("T")


def draw_distinct(n: int, draw: Callable[[], T], exclude: set, counts: str) -> list[T]:
    """``n`` distinct draws not in ``exclude`` (which is extended with them); ``counts`` names the settings to
    lower when the space runs out."""
    out: list = []
    tries = 0
    while len(out) < n:
        tries += 1
        if tries > 100 * n + 10_000:
            raise ValueError(f"cannot draw {n} distinct scenes; lower {counts}")
        s = draw()
        if s not in exclude:
            exclude.add(s)
            out.append(s)
    return out


def sample_scenes(n: int, theme: Theme, rng: random.Random, exclude: set[Scene], objects_min: int,
                  objects_max: int) -> list[Scene]:
    """``n`` distinct scenes not in ``exclude`` (which is extended with them)."""
    return draw_distinct(n, lambda: sample_scene(theme, rng, objects_min, objects_max), exclude,
                         "the data.builtin image counts")


def rng_of(*parts: object) -> random.Random:
    digest = hashlib.sha256(":".join(str(p) for p in parts).encode()).digest()
    return random.Random(int.from_bytes(digest[:8], "big"))


def plan_scenes(cfg: BuiltinDataConfig) -> dict[str, list[Scene]]:
    """Scenes per split, as builtin.plan_scenes: test, train (and val when ``val_images`` > 0) from ``seed``;
    pretrain from ``pretrain_seed``, excluding all of them."""
    theme, used = theme_of(cfg), set()
    lo, hi = cfg.objects_min, cfg.objects_max
    rng = rng_of(theme.name, VERSION, cfg.seed)
    test = sample_scenes(cfg.test_images, theme, rng, used, lo, hi)
    train = sample_scenes(cfg.train_images, theme, rng, used, lo, hi)
    val = {"val": sample_scenes(cfg.val_images, theme, rng, used, lo, hi)} if cfg.val_images > 0 else {}
    pretrain = sample_scenes(cfg.pretrain_images, theme, rng_of(theme.name + "-pretrain", VERSION, cfg.pretrain_seed),
                             used, lo, hi)
    return {"train": train, "test": test, "pretrain": pretrain, **val}


# --------------------------------------------------------------------------- captions


def _noun_phrase(theme: Theme, o: SceneObject, attrs: set[str], rng: random.Random) -> str:
    words = []
    if "size" in attrs:
        words.append(rng.choice(theme.sizes[o.size]))
    if "colour" in attrs:
        words.append(o.colour)
    if "texture" in attrs:
        words.append(rng.choice(theme.textures[o.texture]))
    words.append(rng.choice(theme.kinds[o.kind]))
    text = " ".join(words)
    article = theme.article or ("an" if text[0] in "aeiou" else "a")
    if "position" in attrs:
        text += " " + rng.choice(theme.positions[o.cell])
    return f"{article} {text}"


def _listed(theme: Theme, parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + theme.joiner + parts[-1]


def _attributes(rng: random.Random, in_relation: bool) -> set[str]:
    odds = {"size": 0.5, "colour": 0.75, "texture": 0.5, "position": 0.0 if in_relation else 0.35}
    return {a for a, p in odds.items() if rng.random() < p}


def one_caption(theme: Theme, scene: Scene, chosen: list[SceneObject], rng: random.Random) -> str:
    """A caption about ``chosen`` (1-3 objects of ``scene``): a random subset of each one's attributes, a relation
    between the first two when one holds (half the time), the background sometimes. It never names every
    attribute of every object of the scene, and says at least two things besides the kinds."""
    relation = None
    if len(chosen) >= 2 and rng.random() < 0.5:
        holds = relations_between(chosen[0], chosen[1])
        relation = rng.choice(holds) if holds else None
    attrs = [_attributes(rng, relation is not None and i < 2) for i in range(len(chosen))]
    said = sum(len(a) for a in attrs) + (relation is not None)
    if said < 2:  # too vague to pick an image out: add colours (never in conflict with a relation)
        for a in attrs:
            a.add("colour")
    if len(chosen) == len(scene.objects) and all(a == set(ATTRIBUTES) for a in attrs):
        attrs[0].discard(rng.choice(sorted(attrs[0])))  # never everything
    phrases = [_noun_phrase(theme, o, a, rng) for o, a in zip(chosen, attrs)]
    if relation is not None:
        phrases = [f"{phrases[0]} {rng.choice(theme.relations[relation])} {phrases[1]}", *phrases[2:]]
    text = rng.choice(theme.templates).format(_listed(theme, phrases))
    if rng.random() < 0.25:
        text += rng.choice(theme.background_phrases).format(scene.background)
    return text


def captions_for(theme: Theme, scene: Scene, n: int, rng: random.Random) -> list[str]:
    """``n`` distinct captions (while the draws allow), each about a different part of ``scene``: successive
    captions start at successive objects of a shuffled order, so together they cover the scene."""
    order = list(scene.objects)
    rng.shuffle(order)
    out: list[str] = []
    start = 0
    for _ in range(n):
        for _attempt in range(50):
            k = min(len(order), rng.choices((1, 2, 3), weights=(0.3, 0.45, 0.25))[0])
            chosen = [order[(start + t) % len(order)] for t in range(k)]
            text = one_caption(theme, scene, chosen, rng)
            if text not in out and len(text.split()) <= MAX_CAPTION_WORDS:
                break
        out.append(text)
        start += k
    return out


# --------------------------------------------------------------------------- rendering


def _pattern(texture: str, side: int, rng: random.Random) -> np.ndarray:
    """Where an object's fill takes its colour (True) or the contrast colour (False): side x side bools."""
    yy, xx = np.mgrid[0:side, 0:side]
    p = max(4, side // 10)  # pattern period: about 3 output pixels at 32 px
    ox, oy = rng.randrange(p), rng.randrange(p)
    if texture == "striped":
        return ((xx + yy + ox) // (p // 2)) % 2 == 0
    if texture == "banded":
        return ((yy + oy) // (p // 2)) % 2 == 0
    if texture in ("dotted", "speckled"):
        if texture == "speckled":
            gen = np.random.default_rng(rng.randrange(2**32))
            return gen.random((side, side)) > 0.12
        return ((xx + ox) % p - p / 2) ** 2 + ((yy + oy) % p - p / 2) ** 2 > (0.3 * p) ** 2
    if texture == "checkered":
        return (((xx + ox) // p) + ((yy + oy) // p)) % 2 == 0
    if texture == "gridded":
        return ((xx + ox) % p > p // 5) & ((yy + oy) % p > p // 5)
    return np.ones((side, side), dtype=bool)  # solid, plain, outline, hollow, shaded (shaded: see _paint)


def _contrast(rgb: tuple[int, int, int]) -> np.ndarray:
    """A pattern's second colour: a dark shade of the object's colour (a lighter one for near-black objects),
    never close to a pale background, so a patterned object keeps its silhouette."""
    c = np.array(rgb, dtype=np.float32)
    return c * 0.4 if c.mean() > 60 else c * 0.5 + 100


def _erode(mask: Image.Image, width: int) -> Image.Image:
    return mask.filter(ImageFilter.MinFilter(2 * width + 1))


def _paint(canvas: np.ndarray, theme: Theme, o: SceneObject, cx: float, cy: float, r: float,
           rng: random.Random) -> None:
    """Draw one object onto ``canvas`` (side x side x 3 floats) in place."""
    side = canvas.shape[0]
    mask_img = Image.new("L", (side, side), 0)
    SHAPES[o.kind](ImageDraw.Draw(mask_img), cx, cy, r)
    rim = max(1, round(0.22 * r))
    if o.texture in ("outline", "hollow"):
        mask_img = Image.fromarray(np.minimum(np.array(mask_img), 255 - np.array(_erode(mask_img, rim))))
    mask = np.array(mask_img) > 127
    if theme.shadow:  # a dark shadow down and to the right, under the object
        s = max(1, round(0.15 * r))
        shadow = np.zeros_like(mask)
        shadow[s:, s:] = mask[:-s, :-s]
        canvas[shadow] *= 0.45
    colour = np.array([min(255, max(0, c + rng.randint(-12, 12))) for c in theme.colours[o.colour]], np.float32)
    fill = np.where(_pattern(o.texture, side, rng)[..., None], colour, _contrast(theme.colours[o.colour]))
    if o.texture == "shaded":  # a top-to-bottom fade into the contrast colour
        t = np.clip((np.arange(side)[:, None, None] - (cy - r)) / (2 * r), 0, 1)
        fill = np.broadcast_to(colour * (1 - t) + _contrast(theme.colours[o.colour]) * t, (side, side, 3))
    canvas[mask] = fill[mask]
    if theme.shadow and o.texture not in ("outline", "hollow"):  # a light rim along the silhouette
        inner = np.array(_erode(mask_img, max(1, rim // 2))) > 127
        edge = mask & ~inner
        canvas[edge] = canvas[edge] * 0.4 + 255 * 0.6


def render(theme: Theme, scene: Scene, image_size: int, rng: random.Random) -> Image.Image:
    """The scene drawn at RENDER_SCALE x ``image_size`` (background colour, gradient; objects with jitter in
    position, size and colour), downsampled, then per-pixel background noise."""
    side = image_size * RENDER_SCALE
    base = np.array([c + rng.randint(-12, 12) for c in theme.backgrounds[scene.background]], np.float32)
    ramp = (np.linspace(-0.5, 0.5, side, dtype=np.float32) * theme.gradient * rng.choice((-1, 1)))[:, None, None]
    canvas = np.broadcast_to(base, (side, side, 3)) + ramp
    canvas = np.array(canvas, dtype=np.float32)
    cell = side / GRID
    for o in scene.objects:
        cx = (o.col + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        cy = (o.row + 0.5 + rng.uniform(-0.06, 0.06)) * cell
        r = cell / 2 * SIZE_RADIUS[o.size] * rng.uniform(0.92, 1.05)
        _paint(canvas, theme, o, cx, cy, r, rng)
    img = Image.fromarray(np.clip(canvas, 0, 255).astype(np.uint8)).resize((image_size, image_size),
                                                                          Image.Resampling.BOX)
    noise = np.random.default_rng(rng.randrange(2**32)).normal(0, theme.noise, (image_size, image_size, 3))
    return Image.fromarray(np.clip(np.array(img, np.float32) + noise, 0, 255).round().astype(np.uint8))


# --------------------------------------------------------------------------- statistics


def concept_stats(scenes: list[Scene], captions: list[list[str]]) -> dict[str, float]:
    """How large the concept space is: distinct object attribute combinations, distinct caption words,
    mean caption length (words) and mean objects per scene."""
    combos = {(o.kind, o.colour, o.size, o.texture) for s in scenes for o in s.objects}
    flat = [c for caps in captions for c in caps]
    words = {w.strip(",:") for c in flat for w in c.split()}
    return {"object_combinations": len(combos), "vocabulary": len(words),
            "mean_caption_words": sum(len(c.split()) for c in flat) / max(1, len(flat)),
            "mean_objects": sum(len(s.objects) for s in scenes) / max(1, len(scenes))}
