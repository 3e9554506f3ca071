"""The generated scenes (data.builtin.kind: scenes | scenes-alt): determinism, uniqueness, true and varied
captions, a concept space far larger than the distillation budgets, two themes that differ in kind, and the
shapes dataset (kind: shapes, the default) unchanged.

Captions are checked by a parser written here from the themes' word tables only: every object a caption
describes must exist in its scene with those attributes, and every relation it states must hold between
two such objects, computed here from the objects' grid cells and sizes.
"""

from __future__ import annotations

import dataclasses
import random
import re
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from ptmst_ray import storage
from ptmst_ray.config import BuiltinDataConfig, Config, ConfigError, load_config
from ptmst_ray.data import builtin, scenes
from ptmst_ray.data.annotations import iter_split, normalize_caption
from ptmst_ray.data.prepare import data_config_hash
from ptmst_ray import layout

CONFIGS = Path(__file__).resolve().parents[1] / "configs"
KINDS = ("scenes", "scenes-alt")
SMALL = {k: BuiltinDataConfig(seed=3, pretrain_seed=7, train_images=30, test_images=20, pretrain_images=20,
                              captions_per_image=2, kind=k) for k in KINDS}


def _all_bytes(url: str) -> dict[str, bytes]:
    m = storage.read_manifest(url)
    return {name: storage.read_bytes(storage.join(url, name)) for name in m["files"]}


# --------------------------------------------------------------------------- an independent caption parser


def _alternation(words) -> str:
    return "|".join(re.escape(w) for w in sorted(set(words), key=len, reverse=True))


class Parser:
    """Reads a caption back into (attribute -> value) object descriptions, relations and a background, from
    the theme's words alone."""

    def __init__(self, theme: scenes.Theme):
        self.theme = theme
        self.word = {}  # adjective -> (attribute, value)
        for attr, table in (("size", theme.sizes), ("texture", theme.textures)):
            for value, words in table.items():
                for w in words:
                    assert w not in self.word, f"{w!r} means two things in {theme.name}"
                    self.word[w] = (attr, value)
        for colour in theme.colours:
            assert colour not in self.word
            self.word[colour] = ("colour", colour)
        self.noun = {n: kind for kind, nouns in theme.kinds.items() for n in nouns}
        self.cell = {p: i for i, phrases in enumerate(theme.positions) for p in phrases}
        self.relation = {p: r for r, phrases in theme.relations.items() for p in phrases}
        article = r"(?:a|an)" if theme.article is None else re.escape(theme.article)
        self.np = re.compile(rf"\b{article} ((?:(?:{_alternation(self.word)}) )*)({_alternation(self.noun)})\b"
                             rf"(?: ({_alternation(self.cell)})\b)?")
        self.bg = re.compile(rf"\b({_alternation(theme.backgrounds)}) (?:background|backdrop)\b")

    def parse(self, caption: str) -> tuple[list[dict], list[tuple[int, str, int]], list[str]]:
        nps, spans = [], []
        for m in self.np.finditer(caption):
            d = {"kind": self.noun[m.group(2)]}
            for w in m.group(1).split():
                attr, value = self.word[w]
                assert attr not in d, (caption, w)
                d[attr] = value
            if m.group(3):
                d["position"] = self.cell[m.group(3)]
            nps.append(d)
            spans.append(m.span())
        relations = []
        for i in range(len(spans) - 1):
            gap = caption[spans[i][1]:spans[i + 1][0]].strip()
            if gap in self.relation:
                relations.append((i, self.relation[gap], i + 1))
        return nps, relations, self.bg.findall(caption)


def _matches(d: dict, o: scenes.SceneObject) -> bool:
    got = {"kind": o.kind, "colour": o.colour, "size": o.size, "texture": o.texture, "position": o.cell}
    return all(got[k] == v for k, v in d.items())


def _holds(rel: str, a: scenes.SceneObject, b: scenes.SceneObject) -> bool:
    ra, ca, rb, cb = a.cell // 3, a.cell % 3, b.cell // 3, b.cell % 3
    big = {"small": 0, "medium": 1, "large": 2}
    return {"left": ca < cb, "right": ca > cb, "above": ra < rb, "below": ra > rb,
            "bigger": big[a.size] > big[b.size], "next": max(abs(ra - rb), abs(ca - cb)) == 1}[rel]


def check_caption(parser: Parser, scene: scenes.Scene, caption: str) -> list[dict]:
    """Fail unless everything ``caption`` says is true of ``scene`` and it does not say everything."""
    nps, relations, backgrounds = parser.parse(caption)
    nouns = [w for w in caption.replace(",", " ").split() if w in parser.noun]
    assert nps and len(nps) == len(nouns), f"{caption!r}: objects {nps} but nouns {nouns}"  # none left unread
    for d in nps:
        assert any(_matches(d, o) for o in scene.objects), f"{caption!r}: {d} is not in {scene}"
    for i, rel, j in relations:
        assert any(_holds(rel, a, b) for a in scene.objects for b in scene.objects
                   if a is not b and _matches(nps[i], a) and _matches(nps[j], b)), f"{caption!r}: {rel} false: {scene}"
    assert all(bg == scene.background for bg in backgrounds), (caption, scene.background)
    full = [d for d in nps if len(d) == 5]  # kind + all four attributes
    assert len(full) < len(scene.objects), f"{caption!r} names every attribute of every object of {scene}"
    return nps


# --------------------------------------------------------------------------- tests


@pytest.mark.parametrize("kind", KINDS)
def test_same_seed_same_bytes_and_seed_matters(tmp_path, kind):
    a, b, c = (str(tmp_path / x) for x in "abc")
    builtin.generate_builtin(a, SMALL[kind], 32)
    builtin.generate_builtin(b, SMALL[kind], 32)
    fa, fb = _all_bytes(a), _all_bytes(b)
    assert fa == fb and len(fa) == 30 + 20 + 20 + 3
    mc = builtin.generate_builtin(c, dataclasses.replace(SMALL[kind], seed=4), 32)
    assert mc["files"]["builtin_test.json"] != storage.read_manifest(a)["files"]["builtin_test.json"]


@pytest.mark.parametrize("kind", KINDS)
def test_unique_scenes_and_pixels(tmp_path, kind):
    cfg = dataclasses.replace(SMALL[kind], val_images=10)
    plan = scenes.plan_scenes(cfg)
    sets = {s: set(v) for s, v in plan.items()}
    assert {s: len(v) for s, v in sets.items()} == {"train": 30, "test": 20, "pretrain": 20, "val": 10}
    assert not sets["pretrain"] & (sets["train"] | sets["test"] | sets["val"])
    assert not sets["train"] & sets["test"] and not sets["val"] & (sets["train"] | sets["test"])
    for s in plan["train"] + plan["test"]:
        assert 2 <= len(s.objects) <= 5 and len({o.cell for o in s.objects}) == len(s.objects)
    m = builtin.generate_builtin(str(tmp_path / "d"), SMALL[kind], 32)
    pngs = {k: v for k, v in m["files"].items() if k.endswith(".png")}
    assert len(pngs) == 70 and len(set(pngs.values())) == len(pngs)  # no two images share pixels


@pytest.mark.parametrize("kind", KINDS)
def test_karpathy_files_captions_true_of_their_images(tmp_path, kind):
    """The written files read as any benchmark's (iter_split), row i of a split is scene i of the plan, and every
    (normalised) caption describes only what its image has."""
    d = str(tmp_path / "d")
    cfg = dataclasses.replace(SMALL[kind], val_images=6)
    builtin.generate_builtin(d, cfg, 32)
    plan, parser = scenes.plan_scenes(cfg), Parser(scenes.THEMES[kind])
    test = list(iter_split(d, "builtin", "test"))
    train = list(iter_split(d, "builtin", "train"))
    assert len(test) == 20 and len(train) == 60 and len(list(iter_split(d, "builtin", "pretrain"))) == 40
    for split, rows in (("test", test), ("val", list(iter_split(d, "builtin", "val")))):
        assert len(rows) == len(plan[split])
        for i, row in enumerate(rows):
            assert row.image == f"images/{split}/{split}_{i:05d}.png" and len(set(row.captions)) == 5
            for c in row.captions:
                check_caption(parser, plan[split][i], c)
    for row in train:
        check_caption(parser, plan["train"][int(row.image_id.split("_")[1])], row.caption)
    with Image.open(storage.join(d, test[0].image)) as img:
        assert img.size == (32, 32) and img.mode == "RGB"


@pytest.mark.parametrize("kind", KINDS)
def test_captions_of_an_image_differ_and_cover_it(kind):
    theme, parser = scenes.THEMES[kind], Parser(scenes.THEMES[kind])
    cfg = BuiltinDataConfig(kind=kind, test_images=400, train_images=10, pretrain_images=10)
    covered = 0
    for i, scene in enumerate(scenes.plan_scenes(cfg)["test"]):
        caps = scenes.captions_for(theme, scene, 5, random.Random(i))
        assert len(set(caps)) == 5, caps
        said = [check_caption(parser, scene, normalize_caption(c)) for c in caps]
        described = {o for nps in said for d in nps for o in scene.objects if _matches(d, o)}
        covered += len(described) >= min(3, len(scene.objects))
        assert all(len(normalize_caption(c).split()) <= scenes.MAX_CAPTION_WORDS for c in caps)
    assert covered >= 0.95 * 400  # five captions describe different parts of the scene


def test_concept_space_far_larger_than_the_budgets():
    """At the preset's sizes: many more distinct objects than 500 pairs could cover, a real vocabulary,
    Flickr-like caption lengths, and captions that almost never fit two test images."""
    cfg = load_config(CONFIGS / "scenes.yaml").data.builtin
    plan = scenes.plan_scenes(cfg)
    theme = scenes.THEMES["scenes"]
    caps = [scenes.captions_for(theme, s, cfg.captions_per_image, random.Random(i))
            for i, s in enumerate(plan["train"])]
    stats = scenes.concept_stats(plan["train"], caps)
    assert stats["object_combinations"] >= 2000, stats  # of 20 x 11 x 3 x 5 = 3300
    assert stats["vocabulary"] >= 80, stats
    assert 8 <= stats["mean_caption_words"] <= 18, stats
    assert 3.0 <= stats["mean_objects"] <= 4.0, stats
    # a caption is rarely true of more than its own image: shared by two test images in under 2%
    rows = [{"image": str(i), "caption": scenes.captions_for(theme, s, 5, random.Random(i))}
            for i, s in enumerate(plan["test"])]
    st = builtin.caption_stats({"test": rows})["test"]
    assert st["captions_shared_by_images"] <= 0.02 * st["captions"], st


def _vocabulary(kind: str) -> tuple[set[str], set[str]]:
    theme = scenes.THEMES[kind]
    cfg = BuiltinDataConfig(kind=kind, test_images=300, train_images=10, pretrain_images=10)
    captions = [c for i, s in enumerate(scenes.plan_scenes(cfg)["test"])
                for c in scenes.captions_for(theme, s, 5, random.Random(i))]
    words = {w for c in captions for w in normalize_caption(c).replace(",", " ").split()}
    content = ({w for ws in theme.sizes.values() for w in ws} | {w for ws in theme.textures.values() for w in ws}
               | set(theme.colours) | {n for ns in theme.kinds.values() for n in ns})
    return words, content


def test_themes_differ_in_kind():
    (words_a, content_a), (words_b, content_b) = _vocabulary("scenes"), _vocabulary("scenes-alt")
    assert not content_a & words_b and not content_b & words_a  # no object, colour, size or texture word shared
    assert not set(scenes.SCENES.kinds) & set(scenes.SCENES_ALT.kinds)  # other objects
    overlap = len(words_a & words_b) / len(words_a | words_b)
    assert overlap < 0.1, sorted(words_a & words_b)
    # image statistics: the alt theme is darker and noisier
    stats = {}
    for kind in KINDS:
        cfg = BuiltinDataConfig(kind=kind, test_images=40, train_images=10, pretrain_images=10)
        imgs = np.stack([np.asarray(scenes.render(scenes.THEMES[kind], s, 32, random.Random(i)), np.float32)
                         for i, s in enumerate(scenes.plan_scenes(cfg)["test"])])
        stats[kind] = (imgs.mean(), np.abs(np.diff(imgs, axis=2)).mean())  # brightness, pixel-to-pixel change
    assert stats["scenes-alt"][0] < stats["scenes"][0] - 60, stats
    assert stats["scenes-alt"][1] > 1.5 * stats["scenes"][1], stats


def test_shapes_default_unchanged():
    """kind: shapes (the default) keeps every data hash it had before kind existed: the values recorded before, and
    the generator's hash computed by the formula of that time (the six fields it had, asdict). The experts' hash is
    the one recorded since their epochs left it (stored experts serve any number of epochs)."""
    cfg = BuiltinDataConfig()
    before = {"seed": 0, "pretrain_seed": 1000, "train_images": 1000, "test_images": 1000, "pretrain_images": 2000,
              "captions_per_image": 2}
    assert builtin.config_hash(cfg, 32) == "776db8a06f42ef18" == storage.stable_hash(
        {"builtin": before, "image_size": 32, "version": builtin.VERSION})
    default = Config()
    assert data_config_hash(default.data) == "81b6580567f03a56"
    assert layout.experts_hash(default) == "cd7f9ea6c8d94fcf"
    for changed in ({"kind": "scenes"}, {"kind": "scenes-alt"}, {"objects_max": 4}):
        assert builtin.config_hash(dataclasses.replace(cfg, **changed), 32) != builtin.config_hash(cfg, 32)
    small = BuiltinDataConfig(test_images=3, train_images=3, pretrain_images=3)
    assert all(isinstance(s, builtin.Scene) for s in builtin.plan_scenes(small)["test"])  # still the shapes


def test_kind_and_object_counts_checked():
    with pytest.raises(ConfigError, match="objects_max"):
        BuiltinDataConfig(objects_min=4, objects_max=3)
    with pytest.raises(ConfigError, match="kind"):
        load_config(CONFIGS / "scenes.yaml", ["data.builtin.kind=planets"])
    cfg = load_config(CONFIGS / "scenes.yaml")
    assert cfg.data.dataset == "builtin" and cfg.data.builtin.kind == "scenes"
