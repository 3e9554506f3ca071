"""Stage `embed` checks its inputs once: finished caption embeddings of the same text tower (the same weights file
CONTENT) and data are found from their manifest alone, without building the tower or reading an embedding file;
a changed weights file gives another key; the workers' read is the check that names a damaged file."""

from __future__ import annotations

import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file

from conftest import tiny_config
from ptmst_ray import layout, storage
from ptmst_ray.layout import Layout
from ptmst_ray.models import towers
from ptmst_ray.models.towers import build_clip, tower_source
from ptmst_ray.stages import data as data_stage
from ptmst_ray.stages import embed as embed_stage


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """The tiny data, and a CLIP checkpoint of the tiny model (its seed-0 weights) as ``model.pretrained``."""
    root = tmp_path_factory.mktemp("embed")
    cfg = _config(root)
    data_stage.prepare(cfg)
    save_file(build_clip(cfg.replace(**{"model.pretrained": None}).model, seed=0).state_dict(),
              str(root / "clip.safetensors"))
    return root


def _config(root, **overrides):
    return tiny_config(root, **{"pretrain.enabled": False, "model.pretrained": str(root / "clip.safetensors"),
                                **overrides})


class Spy:
    """Counts text-tower builds and reads of the embedding files (whole-file reads and hashes)."""

    def __init__(self, monkeypatch, embedded_root: str):
        self.builds, self.reads = 0, []
        build, read_bytes, hash_file = towers.build_text_encoder, storage.read_bytes, storage.hash_file

        def counted_build(*args, **kwargs):
            self.builds += 1
            return build(*args, **kwargs)

        def seen(fn):
            def wrapper(url, *args, **kwargs):
                if str(url).startswith(embedded_root) and str(url).endswith(".safetensors"):
                    self.reads.append(url)
                return fn(url, *args, **kwargs)
            return wrapper

        monkeypatch.setattr(towers, "build_text_encoder", counted_build)
        monkeypatch.setattr(storage, "read_bytes", seen(read_bytes))
        monkeypatch.setattr(storage, "hash_file", seen(hash_file))


def test_finished_embeddings_cost_no_tower_and_no_file_read(prepared, monkeypatch):
    cfg = _config(prepared)
    lay = Layout.of(cfg)
    spy = Spy(monkeypatch, lay.embedded_root)
    key = embed_stage.embed(cfg)
    assert spy.builds == 1 and storage.read_manifest(lay.embedded(key))["source"] == tower_source(cfg.model, "text")
    writes = storage.writes()
    assert embed_stage.embed(cfg) == key == embed_stage.done_key(cfg)
    assert spy.builds == 1 and spy.reads == [] and storage.writes() == writes  # the skip path: the manifest only
    # the workers' read checks each file's bytes against the manifest (the one check)
    real = embed_stage.load_real(cfg, whole_train=False)
    assert len(spy.reads) == 2 and real.train_text.shape[0] == 120
    # mapped, not read: the rows are the file's; another process on the node (here: the per-process cache
    # cleared) trusts the first reader's check of the same file version and hashes nothing
    assert torch.equal(real.train_text, load_file(f"{lay.embedded(key)}/train.safetensors")["text"])
    embed_stage._load_real_cached.cache_clear()
    assert torch.equal(embed_stage.load_real(cfg, whole_train=False).test_text, real.test_text)
    assert len(spy.reads) == 2


def test_changed_weights_content_gives_another_key(prepared, tmp_path, monkeypatch):
    """The same path with other bytes (one text weight moved): the source differs, so the tower is built again
    and its embeddings get another key; the path, size and name alone decide nothing."""
    weights = tmp_path / "clip.safetensors"
    sd = load_file(str(prepared / "clip.safetensors"))
    save_file(sd, str(weights))
    cfg = tiny_config(prepared, **{"pretrain.enabled": False, "model.pretrained": str(weights)})
    first = embed_stage.embed(cfg)
    name = next(k for k in sd if k.startswith("transformer."))
    sd[name] = sd[name] + 1e-3
    size = weights.stat().st_size
    save_file(sd, str(weights))
    assert weights.stat().st_size == size
    assert embed_stage.done_key(cfg) is None
    spy = Spy(monkeypatch, Layout.of(cfg).embedded_root)
    second = embed_stage.embed(cfg)
    assert spy.builds == 1 and second != first
    assert storage.read_text(Layout.of(cfg).embedded_current).strip() == second
    # the first tower's embeddings stay: going back to its weights finds them (one build to know its key)
    sd[name] = sd[name] - 1e-3
    save_file(sd, str(weights))
    assert embed_stage.embed(cfg) == first


def test_embeddings_from_before_sources_were_recorded(prepared, monkeypatch):
    """A manifest written before the source was recorded: one build to know the key, its files kept (not
    rewritten), the source added; the next run skips without building."""
    cfg = _config(prepared)
    lay = Layout.of(cfg)
    key = embed_stage.embed(cfg)
    out = lay.embedded(key)
    manifest = storage.read_manifest(out)
    storage.write_manifest(out, {k: v for k, v in manifest.items() if k not in ("source", "data")})
    spy = Spy(monkeypatch, lay.embedded_root)
    assert embed_stage.embed(cfg) == key and spy.builds == 1 and spy.reads == []
    assert storage.read_manifest(out) == manifest
    assert embed_stage.embed(cfg) == key and spy.builds == 1


def test_damaged_embeddings_are_named_by_their_first_reader(prepared, tmp_path):
    """The driver no longer hashes finished embeddings: a file changed after it was written is named, with the
    stage that redoes it, by the first worker that reads it (load_real)."""
    from conftest import copy_root

    root = copy_root(prepared, tmp_path / "root", parts=("data",))
    save_file(load_file(str(prepared / "clip.safetensors")), str(root / "clip.safetensors"))
    cfg = _config(root)
    key = embed_stage.embed(cfg)
    path = Layout.of(cfg).embedded(key) + "/train.safetensors"
    blob = bytearray(storage.read_bytes(path))
    blob[-5] ^= 0xFF
    storage.write_bytes(path, bytes(blob))
    assert embed_stage.embed(cfg) == key
    with pytest.raises(storage.StorageError) as e:
        embed_stage.load_real(cfg)
    assert path in str(e.value) and "ptmst-ray run --rebuild embed" in layout.explain(cfg, e.value)


def test_tower_source_reads_content_not_names(tmp_path):
    """tower_source: equal for equal content at another path, different for other content at the same path;
    the image part ignores the text tower's files and the text part the image tower's."""
    a = tmp_path / "a.safetensors"
    save_file({"w": torch.zeros(3)}, str(a))
    cfg = tiny_config(tmp_path, **{"pretrain.enabled": False, "model.pretrained": None, "model.image_pretrained": str(a)})
    text, image = tower_source(cfg.model, "text"), tower_source(cfg.model, "image")
    b = tmp_path / "b.safetensors"
    b.write_bytes(a.read_bytes())
    moved = cfg.replace(**{"model.image_pretrained": str(b)})
    assert tower_source(moved.model, "image") == image and tower_source(moved.model, "text") == text
    save_file({"w": torch.ones(3)}, str(a))
    assert tower_source(cfg.model, "image") != image and tower_source(cfg.model, "text") == text
    assert tower_source(cfg.replace(**{"model.name": "RN50"}).model, "text") != text  # another architecture


def test_finished_embeddings_start_no_gpu_task(prepared, tmp_path, ray_session):
    """When the run targets GPUs the embeddings are computed in a GPU task (the session's Ray has 2 logical GPUs);
    once finished, the next run asks for no GPU and starts no task."""
    from conftest import copy_root
    from ptmst_ray.orchestration.pipeline import embed_captions

    root = copy_root(prepared, tmp_path / "root", parts=("data",))
    save_file(load_file(str(prepared / "clip.safetensors")), str(root / "clip.safetensors"))
    cfg = _config(root, **{"run.accelerator": "gpu"})
    shutil.rmtree(Layout.of(cfg).embedded_root, ignore_errors=True)  # the session's root may hold this tower's already
    first = embed_captions(cfg)
    assert first["ran"] and first["gpu_ids"] and first["node_id"], first
    assert embed_captions(cfg) == {"key": first["key"], "node_id": None, "gpu_ids": [], "ran": False}


def test_workers_read_the_files_rows_cut_to_max_train_rows(prepared):
    """load_real's train rows are the embedding file's first rows (mapped, not copied), paired with the caption
    shards' image index and captions (read on demand), cut to data.max_train_rows as before."""
    from ptmst_ray.data.dataset import read_captions

    cfg = _config(prepared)
    lay = Layout.of(cfg)
    out = lay.embedded(embed_stage.embed(cfg))
    files = tuple(sorted(storage.read_manifest(out)["files"].items()))
    whole = load_file(f"{out}/train.safetensors")["text"]
    caps = read_captions(lay.data, "train")
    for rows in (None, 50):
        real = embed_stage._load_real_cached(lay.data, out, files, rows, False)
        n = len(whole) if rows is None else rows
        assert torch.equal(real.train_text, whole[:n]) and torch.equal(real.train_image_index, caps.image_index[:n])
        assert list(real.train_captions) == caps.captions[:n] and len(real.train_images) == n
        assert real.train_captions.take([n - 1, 3]) == [caps.captions[n - 1], caps.captions[3]]
        assert torch.equal(real.test_text, load_file(f"{out}/test.safetensors")["text"])
