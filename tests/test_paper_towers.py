"""The paper recipes' towers without a hub: BERT from a saved folder (local or fsspec URL), NFNet-L0 from a timm
state dict, and the up-front requirement checks (models/requirements.py), on tiny models made here."""

from __future__ import annotations

import dataclasses
import logging
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import pytest
import torch

from _tiny_models import VOCAB, copy_without, fake_hf_cache, make_tiny_bert, upload
from ptmst_ray.config import ConfigError, ModelConfig, load_config
from ptmst_ray.models.requirements import check_model_requirements
from ptmst_ray.models.towers import ModelError, build_clip, build_text_encoder

ROOT = Path(__file__).resolve().parents[1]
PAPER = "ptmst-nfnet_l0-bert"
CAPTIONS = ["a red circle on the left", "two dogs play in the park", "a small blue square"]


@pytest.fixture
def no_network(monkeypatch):
    """Any connection or name lookup fails, and fails the test even if a library swallows the error."""
    attempts = []

    def refuse(*args, **kwargs):
        attempts.append(args or kwargs)
        raise OSError(f"network access attempted in a test: {args or kwargs}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)
    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    yield
    assert not attempts, f"network access attempted: {attempts[:3]}"


@pytest.fixture
def model_cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("PTMST_RAY_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache" / "hf-models"


def recipe(*sets: str, name: str = "flickr30k_500"):
    return load_config(ROOT / "configs" / f"{name}.yaml", list(sets))


def bert_cls(folder: Path, tokens: torch.Tensor) -> torch.Tensor:
    """The reference: HF's own BertModel from the folder, CLS pooled output (the cls_pooler's choice)."""
    from transformers import BertModel

    bert = BertModel.from_pretrained(str(folder), local_files_only=True).eval()
    with torch.no_grad():
        return bert(input_ids=tokens, attention_mask=(tokens != bert.config.pad_token_id).long()).pooler_output


# --------------------------------------------------------------------------- BERT offline


def test_bert_folder_loads_offline_and_embeds_its_cls_output(tiny_bert, no_network, monkeypatch):
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    cfg = ModelConfig(name=PAPER, text_pretrained=str(tiny_bert))
    enc = build_text_encoder(cfg)
    assert enc.dim == 32 and enc.tokenizer.context_length == 64  # the folder's width; its 64 positions
    emb = enc.encode(CAPTIONS)
    torch.testing.assert_close(emb, bert_cls(tiny_bert, enc.tokenizer(CAPTIONS)))
    assert "HF_HUB_OFFLINE" not in os.environ  # the offline switch is only on while loading
    # the CLIP text tower: the folder's BERT (32-d, not bert-base's 768) and a projection sized to fit
    clip = build_clip(cfg, seed=0).eval()
    assert clip.text.proj.in_features == 32 and clip.text.proj.out_features == 2304
    with torch.no_grad():
        torch.testing.assert_close(clip.encode_text(enc.tokenizer(CAPTIONS)), clip.text.proj(emb))


def test_transformers_loads_only_for_an_hf_tower_and_the_tower_is_the_same(tiny_bert, nfnet, tmp_path):
    """The package imports open_clip without transformers (models/openclip.py): a fresh process that builds the toy
    tower and the paper student (whose BERT it does not build) never loads it; the same process then builds the
    BERT tower, which embeds as HF's BertModel does and
    equals the tower built where transformers was loaded first (this process)."""
    out = tmp_path / "out.pt"
    code = f"""
import dataclasses, sys, torch
from ptmst_ray.config import ModelConfig, load_config
from ptmst_ray.models.towers import build_clip, build_text_encoder
from ptmst_ray.models.student import build_student
build_clip(dataclasses.replace(load_config({str(ROOT / 'configs' / 'toy.yaml')!r}).model, pretrained=None), seed=0)
cfg = ModelConfig(name={PAPER!r}, text_pretrained={str(tiny_bert)!r}, image_pretrained={str(nfnet)!r})
build_student(cfg, text_dim=32, seed=0)  # the paper student: NFNet-L0, and no BERT built for it
toy_loaded = sorted(m for m in sys.modules if m == 'transformers' or m.startswith('transformers.'))
enc = build_text_encoder(cfg)
clip = build_clip(cfg, seed=0).eval()
tokens = enc.tokenizer({CAPTIONS!r})
with torch.no_grad():
    torch.save(dict(toy_loaded=toy_loaded, tokens=tokens, emb=enc.encode({CAPTIONS!r}),
                    text=clip.encode_text(tokens)), {str(out)!r})
"""
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT, timeout=300)
    got = torch.load(out)
    assert got["toy_loaded"] == []
    torch.testing.assert_close(got["emb"], bert_cls(tiny_bert, got["tokens"]))
    ref = build_clip(ModelConfig(name=PAPER, text_pretrained=str(tiny_bert), image_pretrained=str(nfnet)),
                     seed=0).eval()
    assert "transformers" in sys.modules and sys.modules["transformers"] is not None
    with torch.no_grad():
        torch.testing.assert_close(got["text"], ref.encode_text(got["tokens"]))


def test_text_encoder_reads_no_image_weights(tiny_bert, nfnet, no_network, monkeypatch):
    """The caption embeddings need the text tower only: the image tower's weights file (NFNet-L0's 159 MB in the
    paper recipes) is never read, and the embeddings and cache key are those of the text tower alone."""
    from ptmst_ray.models import towers

    read = []
    load = towers.load_state_dict
    monkeypatch.setattr(towers, "load_state_dict", lambda url: read.append(url) or load(url))
    enc = build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(tiny_bert), image_pretrained=str(nfnet)))
    assert read == [] and not any(True for _ in enc.model.visual.parameters())
    torch.testing.assert_close(enc.encode(CAPTIONS), bert_cls(tiny_bert, enc.tokenizer(CAPTIONS)))
    assert enc.key == build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(tiny_bert))).key


def test_hub_layout_bert_checkpoint_loads(tmp_path, no_network):
    """A folder like the hub's bert-base-uncased: BertForPreTraining tensors under ``bert.`` plus the ``cls.``
    heads; the tower takes the encoder and pooler, the check accepts it."""
    folder = make_tiny_bert(tmp_path / "pretraining-layout", seed=3, head="pretraining")
    check_model_requirements(recipe("model.image_pretrained=null", f"model.text_pretrained={folder}",
                                    "data.image_size=64"))
    enc = build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(folder)))
    torch.testing.assert_close(enc.encode(CAPTIONS), bert_cls(folder, enc.tokenizer(CAPTIONS)))


def test_bert_folder_through_an_fsspec_url_is_copied_once(tiny_bert, model_cache, no_network):
    url = upload(tiny_bert, f"memory://ptmst-test-{uuid.uuid4().hex}/tiny-bert")
    local = build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(tiny_bert)))
    remote = build_text_encoder(ModelConfig(name=PAPER, text_pretrained=url))
    torch.testing.assert_close(remote.encode(CAPTIONS), local.encode(CAPTIONS))
    assert remote.key == local.key  # the same weights and tokenizer, wherever they are stored
    copies = [p for p in model_cache.iterdir() if not p.name.startswith(".tmp-")]
    assert len(copies) == 1 and (copies[0] / "model.safetensors").is_file()
    build_text_encoder(ModelConfig(name=PAPER, text_pretrained=url))
    assert len(list(model_cache.iterdir())) == 1  # reused, not copied again
    # new weights at the same URL: a new copy and a new cache key
    upload(make_tiny_bert(model_cache.parent.parent / "other", seed=1), url)
    changed = build_text_encoder(ModelConfig(name=PAPER, text_pretrained=url))
    assert changed.key != local.key and len(list(model_cache.iterdir())) == 2


def test_text_cache_key_follows_weights_and_tokenizer(tiny_bert, tmp_path):
    key = build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(tiny_bert))).key
    same = copy_without(tiny_bert, tmp_path / "same")
    assert build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(same))).key == key  # not the path
    reseeded = make_tiny_bert(tmp_path / "reseeded", seed=1)
    assert build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(reseeded))).key != key
    # the same weights with another vocabulary (same size, two words swapped) embed differently: a new key
    swapped = VOCAB[:5] + [VOCAB[6], VOCAB[5]] + VOCAB[7:]
    retokenised = copy_without(tiny_bert, tmp_path / "retokenised", "vocab.txt", "tokenizer.json",
                               "tokenizer_config.json")
    from transformers import BertTokenizer

    (retokenised / "vocab.txt").write_text("\n".join(swapped) + "\n")
    BertTokenizer(str(retokenised / "vocab.txt")).save_pretrained(retokenised)
    assert build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(retokenised))).key != key


def test_null_text_weights_come_from_the_hf_cache_offline(tiny_bert, tmp_path, monkeypatch, no_network, nfnet):
    """text_pretrained null: bert-base-uncased from the local HF cache (here: the tiny BERT under that name);
    not cached: the check says how to fetch it, before any work."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    cfg = recipe(f"model.image_pretrained={nfnet}", "data.image_size=64")
    assert cfg.model.text_pretrained is None
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: null: .*'bert-base-uncased'.*hf download "
                                          r"bert-base-uncased.*set model\.text_pretrained: DIR"):
        check_model_requirements(cfg)
    fake_hf_cache(tmp_path / "hub", "bert-base-uncased", tiny_bert)
    check_model_requirements(cfg)
    enc = build_text_encoder(cfg.model)
    torch.testing.assert_close(enc.encode(CAPTIONS), bert_cls(tiny_bert, enc.tokenizer(CAPTIONS)))


# --------------------------------------------------------------------------- NFNet-L0


def test_paper_student_from_timm_nfnet_state_dict_and_tiny_bert(nfnet, tiny_bert, no_network):
    """The CC3M recipe's student (frozen NFNet-L0 + 2048-d projection) over the tiny BERT, no hub: the tower
    is exactly timm's pooled feature at a small image size."""
    import timm
    from safetensors.torch import load_file

    from ptmst_ray.models.student import build_student

    cfg = recipe(f"model.image_pretrained={nfnet}", f"model.text_pretrained={tiny_bert}", "data.image_size=64",
                 name="cc3m_500")
    check_model_requirements(cfg)
    student = build_student(cfg.model, text_dim=32, seed=0).eval()
    ref = timm.create_model("nfnet_l0", num_classes=0).eval()
    ref.load_state_dict(load_file(str(nfnet)))
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        feats = student.image.tower(x)
        torch.testing.assert_close(feats, ref(x))
        assert feats.shape == (2, 2304) and student(x, torch.randn(3, 32)).shape == (2, 3)
    assert not any(p.requires_grad for p in student.image.tower.parameters())


# --------------------------------------------------------------------------- requirement checks


def complete(tiny_bert: Path, nfnet: Path, *more: str):
    return recipe(f"model.image_pretrained={nfnet}", f"model.text_pretrained={tiny_bert}", "data.image_size=64",
                  *more)


def test_paper_image_tower_alone_equals_the_whole_models(nfnet, tiny_bert, no_network):
    from ptmst_ray.models.towers import build_image_tower

    for cfg in (ModelConfig(name=PAPER, text_pretrained=str(tiny_bert), image_pretrained=str(nfnet)),
                ModelConfig(name=PAPER, text_pretrained=str(tiny_bert))):
        ref, got = build_clip(cfg, seed=3).visual.state_dict(), build_image_tower(cfg, seed=3).state_dict()
        assert ref.keys() == got.keys() and all(torch.equal(ref[k], got[k]) for k in ref)


def test_complete_paper_setup_passes_and_a_cnn_takes_another_size(tiny_bert, nfnet, caplog, no_network):
    with caplog.at_level(logging.WARNING, logger="ptmst_ray.models.requirements"):
        check_model_requirements(complete(tiny_bert, nfnet))
    assert "data.image_size 64 differs from the input size 224" in caplog.text and "CNN" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING, logger="ptmst_ray.models.requirements"):
        check_model_requirements(complete(tiny_bert, nfnet, "data.image_size=224"))
    assert caplog.text == ""
    check_model_requirements(load_config(ROOT / "configs" / "toy.yaml"))


def test_paper_weights_through_fsspec_urls_pass(tiny_bert, nfnet, tmp_path):
    import fsspec

    prefix = f"memory://ptmst-test-{uuid.uuid4().hex}"
    bert_url = upload(tiny_bert, f"{prefix}/tiny-bert")
    upload(nfnet.parent, f"{prefix}/nfnet")
    try:
        check_model_requirements(complete(bert_url, f"{prefix}/nfnet/{nfnet.name}"))
        absent = f"{prefix}/nothing-here"
        with pytest.raises(ConfigError, match=rf"^model\.text_pretrained: {absent} does not exist"):
            check_model_requirements(complete(absent, f"{prefix}/nfnet/{nfnet.name}"))
    finally:
        fsspec.filesystem("memory").rm(prefix.removeprefix("memory://"), recursive=True)


def test_missing_packages_are_named(tiny_bert, nfnet, monkeypatch):
    cfg = complete(tiny_bert, nfnet)
    monkeypatch.setitem(sys.modules, "transformers", None)  # `import transformers` fails
    with pytest.raises(ConfigError, match=r"^model\.name: 'ptmst-nfnet_l0-bert' has a Hugging Face text tower "
                                          r"\(bert-base-uncased\), which needs the transformers package: pip install"):
        check_model_requirements(cfg)
    monkeypatch.setitem(sys.modules, "timm", None)
    with pytest.raises(ConfigError, match=r"^model\.name: .*timm image tower \(nfnet_l0\).*pip install timm"):
        check_model_requirements(cfg)


def test_missing_or_incomplete_bert_folders_are_named(tiny_bert, nfnet, tmp_path):
    absent = tmp_path / "no-such-bert"
    with pytest.raises(ConfigError, match=rf"^model\.text_pretrained: {absent} does not exist"):
        check_model_requirements(complete(absent, nfnet))
    no_tok = copy_without(tiny_bert, tmp_path / "no-tokenizer", "vocab.txt", "tokenizer.json")
    with pytest.raises(ConfigError, match=rf"^model\.text_pretrained: {no_tok} has no tokenizer \(vocab.txt or "
                                          r"tokenizer.json\) \(found: config.json, model.safetensors, "
                                          r"[a-z_.,\s]*tokenizer_config.json\); it must hold a model and its "
                                          r"tokenizer saved by save_pretrained"):
        check_model_requirements(complete(no_tok, nfnet))
    with pytest.raises(ModelError, match="has no tokenizer"):  # the tower says the same if nothing checked first
        build_text_encoder(ModelConfig(name=PAPER, text_pretrained=str(no_tok)))
    no_weights = copy_without(tiny_bert, tmp_path / "no-weights", "model.safetensors")
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .* has no weights \(model.safetensors"):
        check_model_requirements(complete(no_weights, nfnet))
    no_config = copy_without(tiny_bert, tmp_path / "no-config", "config.json")
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .* has no config.json "):
        check_model_requirements(complete(no_config, nfnet))


def test_bert_weights_that_do_not_fit_their_config_are_named(tiny_bert, nfnet, tmp_path):
    mixed = copy_without(tiny_bert, tmp_path / "mixed", "config.json")
    wide = make_tiny_bert(tmp_path / "wide", hidden=48)
    (mixed / "config.json").write_bytes((wide / "config.json").read_bytes())
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .*mixed: its weights do not fit its "
                                          r"config\.json .*word_embeddings\.weight \(\d+, 32\) \(config\.json says "
                                          r"\(\d+, 48\)\)"):
        check_model_requirements(complete(mixed, nfnet))


def test_image_weights_missing_or_of_the_wrong_shape_are_named(tiny_bert, nfnet, tmp_path):
    from safetensors.torch import save_file

    absent = tmp_path / "no-nfnet.safetensors"
    with pytest.raises(ConfigError, match=rf"^model\.image_pretrained: {absent} does not exist"):
        check_model_requirements(complete(tiny_bert, absent))
    wrong = tmp_path / "wrong.safetensors"
    save_file({"stem.conv1.weight": torch.zeros(17, 3, 3, 3)}, str(wrong))  # NFNet-L0's stem has 16 filters
    with pytest.raises(ConfigError, match=r"^model\.image_pretrained: .*wrong.safetensors: 1 tensors have the wrong "
                                          r"shape for the image tower, e\.g\. \['trunk\.stem\.conv1\.weight "
                                          r"\(17, 3, 3, 3\) \(the tower has \(16, 3, 3, 3\)\)'\]; use the timm "
                                          r"nfnet_l0 state dict"):
        check_model_requirements(complete(tiny_bert, wrong))
    other = tmp_path / "bert-not-nfnet.safetensors"
    (other).write_bytes((tiny_bert / "model.safetensors").read_bytes())
    with pytest.raises(ConfigError, match=r"^model\.image_pretrained: .*does not fit the image tower \(missing 219 "):
        check_model_requirements(complete(tiny_bert, other))
    text_garbage = tmp_path / "garbage.safetensors"
    text_garbage.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00nope!")
    with pytest.raises(ConfigError, match=r"^model\.image_pretrained: .*garbage.safetensors: header is not JSON"):
        check_model_requirements(complete(tiny_bert, text_garbage))


def test_toy_text_weights_of_the_wrong_kind_or_shape_are_named(tiny_bert, tmp_path):
    from safetensors.torch import save_file

    wrong = tmp_path / "text.safetensors"
    save_file({"token_embedding.weight": torch.zeros(100, 64)}, str(wrong))  # the toy's vocabulary is 49408
    toy = ROOT / "configs" / "toy.yaml"
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .*text.safetensors: does not fit the text tower "
                                          r"\(wrong shapes, e\.g\. \['token_embedding\.weight \(100, 64\) \(the "
                                          r"tower has \(49408, 64\)\)'\]\)"):
        check_model_requirements(load_config(toy, [f"model.text_pretrained={wrong}"]))
    with pytest.raises(ConfigError, match=r"^model\.text_pretrained: .* is a folder \(a Hugging Face model\), but "
                                          r"this model\.name has open_clip's own text tower"):
        check_model_requirements(load_config(toy, [f"model.text_pretrained={tiny_bert}"]))


def test_vit_image_size_mismatch_is_named_before_any_work():
    """configs/toy.yaml with data.image_size=64 used to end in a Ray traceback (257 vs 65 positions)."""
    cfg = load_config(ROOT / "configs" / "toy.yaml", ["data.image_size=64"])
    with pytest.raises(ConfigError, match=r"^data\.image_size: 64 differs from the input size 32 of model "
                                          r"'ptmst-toy-vit', whose image tower .*position embeddings.* takes no "
                                          r"other size; set data\.image_size: 32"):
        check_model_requirements(cfg)


def test_frozen_image_tower_without_weights_is_named(tiny_bert):
    cfg = recipe(f"model.text_pretrained={tiny_bert}", "model.image_pretrained=null", "model.image_trainable=true",
                 "data.image_size=64")
    check_model_requirements(cfg)  # a trainable tower may start from scratch
    frozen = dataclasses.replace(cfg.model, image_trainable=False)
    object.__setattr__(cfg, "model", frozen)  # Config itself refuses this too; the check must not rely on it
    with pytest.raises(ConfigError, match=r"^model\.image_trainable: false \(a frozen image tower\) needs its "
                                          r"weights: set model\.image_pretrained"):
        check_model_requirements(cfg)


def test_shipped_recipes_name_their_missing_weights():
    for name in ("flickr30k_100", "coco_200", "cc3m_500"):
        with pytest.raises(ConfigError, match=r"^model\.image_pretrained: .*nfnet_l0\.safetensors does not exist"):
            check_model_requirements(recipe(name=name))


def test_toy_check_imports_no_torch():
    """The check is cheap: for the toy recipe it builds nothing and needs neither torch nor open_clip."""
    code = ("import sys; from ptmst_ray.config import load_config; "
            "from ptmst_ray.models.requirements import check_model_requirements as c; "
            f"c(load_config({str(ROOT / 'configs' / 'toy.yaml')!r})); "
            "print(sorted(m for m in ('torch', 'open_clip', 'timm', 'transformers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip() == "[]"
