"""What a model config needs before any work starts: packages, weights, and an image size the towers take.

Why this file exists: the paper's recipes need a timm image tower, a Hugging Face text tower and weights
that runs never download; a missing package, folder, tokenizer or a checkpoint of the wrong model used to
surface minutes later as a traceback inside a Ray worker. :func:`check_model_requirements` finds these
up front and raises :class:`~ptmst_ray.config.ConfigError` naming the field, the value and the fix.

It stays cheap: checkpoints are judged by their safetensors header (tensor names and shapes, no tensor
data), an HF folder by its file list and config.json, and an image tower by a copy built on PyTorch's
``meta`` device (no memory, no weights). torch/open_clip are imported only when a check needs a tower's
shapes (an image checkpoint, or a timm tower at another image size); the toy recipe needs neither.
The helpers here (HF folder layout, text weights kinds, header shapes) are plain Python, shared with
:mod:`ptmst_ray.models.towers`.
"""

from __future__ import annotations

import contextlib
import functools
import importlib.util
import json
import logging
import os
import re
import struct
from pathlib import Path
from typing import Any

from ptmst_ray import storage
from ptmst_ray.config import Config, ConfigError

log = logging.getLogger(__name__)


@contextlib.contextmanager
def quiet_root_logger():
    """open_clip warns on the root logger whenever a model is built without a tag; we load weights ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"

CHECKPOINT_SUFFIXES = (".safetensors", ".pt", ".pth", ".bin")
"""A weights value ending like this is one checkpoint file (never an HF folder)."""

HF_CONFIG_FILE = "config.json"
HF_WEIGHT_FILES = ("model.safetensors", "model.safetensors.index.json", "pytorch_model.bin",
                   "pytorch_model.bin.index.json")
"""Weights of a saved HF model (``save_pretrained``), one file or an index of shards; first found wins."""
HF_TOKENIZER_FILES = ("tokenizer.json", "vocab.txt", "vocab.json", "spiece.model", "sentencepiece.bpe.model",
                      "tokenizer.model")
"""Any of these makes a saved tokenizer (BERT's: vocab.txt and/or tokenizer.json)."""

FETCH_BERT_HINT = ("on a machine with hub access run `hf download {name} --include '*.json' --include '*.txt' "
                   "--include '*.model' --include model.safetensors --local-dir DIR` (huggingface_hub's CLI; before "
                   "1.0: `huggingface-cli download {name} --include '*.json' '*.txt' '*.model' model.safetensors "
                   "--local-dir DIR`), copy DIR here or to a bucket and set model.text_pretrained: DIR")
"""How to fetch an HF text tower once (the check and the towers never download it mid-run)."""


# --------------------------------------------------------------------------- model configs


def model_config(name: str) -> dict[str, Any] | None:
    """The open_clip model config ``name``: one of ours (read as JSON, no imports) or open_clip's own."""
    ours = MODEL_CONFIG_DIR / f"{name}.json"
    if ours.is_file():
        return json.loads(ours.read_text())
    if not importable("open_clip"):
        return None
    from ptmst_ray.models.openclip import open_clip

    cfg = open_clip.get_model_config(name)
    return dict(cfg) if cfg else None


def hf_text_name(mcfg: dict[str, Any]) -> str | None:
    """The HF model name of an HF text tower (``text_cfg.hf_model_name``), None for open_clip's own tower."""
    return mcfg.get("text_cfg", {}).get("hf_model_name") or None


def timm_image_name(mcfg: dict[str, Any]) -> str | None:
    return mcfg.get("vision_cfg", {}).get("timm_model_name") or None


def config_image_size(mcfg: dict[str, Any]) -> int:
    size = mcfg.get("vision_cfg", {}).get("image_size", 224)
    return int(size[0] if isinstance(size, (list, tuple)) else size)


def importable(module: str) -> bool:
    """The package can be imported (found without importing it; ``sys.modules[name] = None`` hides it)."""
    try:
        return importlib.util.find_spec(module) is not None
    except (ImportError, ValueError):
        return False


# --------------------------------------------------------------------------- weights: kinds and files


def is_checkpoint_path(value: str) -> bool:
    """A pretrained value is a checkpoint path/URL (not an open_clip tag) if it looks like one."""
    return "://" in value or "/" in value or value.endswith(CHECKPOINT_SUFFIXES)


def text_weights_kind(value: str) -> str:
    """What ``model.text_pretrained`` names: ``"checkpoint"`` (one file of our CLIP's tensors),
    ``"hf_dir"`` (a folder saved by HF ``save_pretrained``) or ``"missing"`` (nothing there)."""
    if value.endswith(CHECKPOINT_SUFFIXES):
        return "checkpoint" if storage.exists(value) else "missing"
    if storage.isdir(value):
        return "hf_dir"
    return "checkpoint" if storage.exists(value) else "missing"


def _first_present(names: set[str], candidates: tuple[str, ...]) -> str | None:
    return next((c for c in candidates if c in names), None)


def hf_dir_files(url: str) -> set[str]:
    """Base names of the files directly in an HF folder (local path or fsspec URL)."""
    return set(storage.listdir(url))


def hf_dir_problem(url: str) -> str | None:
    """What a saved HF model folder lacks (config, weights, tokenizer), or None when it is complete."""
    names = hf_dir_files(url)
    lacks = []
    if HF_CONFIG_FILE not in names:
        lacks.append("config.json")
    if _first_present(names, HF_WEIGHT_FILES) is None:
        lacks.append("weights (model.safetensors or pytorch_model.bin)")
    if _first_present(names, HF_TOKENIZER_FILES) is None:
        lacks.append("tokenizer (vocab.txt or tokenizer.json)")
    if not lacks:
        return None
    return (f"has no {' and no '.join(lacks)} (found: {', '.join(sorted(names)) or 'nothing'}); it must hold a model "
            "and its tokenizer saved by save_pretrained (`hf download NAME --local-dir DIR` writes both)")


def hf_cached_dir(name: str) -> str | None:
    """The local HF-cache snapshot folder of hub model ``name`` when its config, weights and tokenizer are all
    cached (no network: only the cache is read), else None."""
    if not importable("huggingface_hub"):
        return None
    from huggingface_hub import constants, try_to_load_from_cache

    config = try_to_load_from_cache(name, HF_CONFIG_FILE, cache_dir=constants.HF_HUB_CACHE)  # HF_HUB_CACHE / HF_HOME
    if not isinstance(config, str):
        return None
    snapshot = os.path.dirname(config)
    names = set(os.listdir(snapshot))
    if _first_present(names, HF_WEIGHT_FILES) is None or _first_present(names, HF_TOKENIZER_FILES) is None:
        return None
    return snapshot


# --------------------------------------------------------------------------- tensor shapes without tensors


class ShapeReadError(ValueError):
    pass


def safetensors_shapes(url: str) -> dict[str, tuple[int, ...]]:
    """Tensor name -> shape from a safetensors file's header alone (the first bytes: no tensor is read)."""
    fs, path = storage.filesystem(url)
    try:
        with fs.open(path, "rb") as f:
            head = f.read(8)
            if len(head) != 8:
                raise ShapeReadError("shorter than a safetensors header")
            (n,) = struct.unpack("<Q", head)
            if n > 100 << 20:
                raise ShapeReadError(f"header size {n} is not plausible")
            header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShapeReadError(f"header is not JSON ({e})") from None
    if not isinstance(header, dict):
        raise ShapeReadError("header is not a table of tensors")
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def checkpoint_shapes(url: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of a checkpoint file, cheaply: a safetensors header (any URL) or a local torch file opened
    memory-mapped (no tensor data read). None when that cannot be done cheaply (a remote torch file)."""
    if url.endswith(".safetensors"):
        return safetensors_shapes(url)
    local = storage.local_path(url)
    if local is None:
        return None
    import torch

    try:
        sd = torch.load(local, map_location="cpu", weights_only=True, mmap=True)
    except Exception:
        try:  # a legacy (non-zip) torch file cannot be memory-mapped: read it whole
            sd = torch.load(local, map_location="cpu", weights_only=True)
        except Exception as e:
            raise ShapeReadError(f"not a readable weights-only torch checkpoint ({str(e).splitlines()[0]})") from None
    for key in ("state_dict", "model"):
        if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
            sd = sd[key]
    if not isinstance(sd, dict):
        raise ShapeReadError("holds no table of tensors")
    return {k: tuple(v.shape) for k, v in sd.items() if hasattr(v, "shape")}


def normalise_keys(shapes: dict[str, Any]) -> dict[str, Any]:
    """Drop a DataParallel ``module.`` prefix (as :func:`ptmst_ray.models.towers.load_state_dict` does)."""
    return {k[len("module."):] if k.startswith("module.") else k: v for k, v in shapes.items()}


def strip_prefix(shapes: dict[str, Any], prefix: str) -> dict[str, Any]:
    """Keys under ``prefix`` without it, when any key has it; otherwise all keys unchanged."""
    if any(k.startswith(prefix) for k in shapes):
        return {k[len(prefix):]: v for k, v in shapes.items() if k.startswith(prefix)}
    return shapes


def image_tower_keys(shapes: dict[str, Any], has_trunk: bool) -> dict[str, Any]:
    """A checkpoint's keys as the image tower sees them: ``visual.`` dropped; a plain timm state dict gains
    open_clip's ``trunk.`` prefix (the rule of :func:`ptmst_ray.models.towers.load_image_tower`)."""
    shapes = strip_prefix(shapes, "visual.")
    if has_trunk and not any(k.startswith("trunk.") for k in shapes):
        shapes = {f"trunk.{k}": v for k, v in shapes.items()}
    return shapes


def fit_problems(own: dict[str, tuple[int, ...]], theirs: dict[str, tuple[int, ...]]
                 ) -> tuple[list[str], list[str], list[str]]:
    """(wrong shapes, missing keys, unused keys) of checkpoint ``theirs`` for a module with shapes ``own``."""
    wrong = [f"{k} {tuple(v)} (the tower has {tuple(own[k])})" for k, v in theirs.items()
             if k in own and tuple(v) != tuple(own[k])]
    missing = sorted(set(own) - set(theirs))
    unused = sorted(set(theirs) - set(own))
    return wrong, missing, unused


def hf_weight_shapes(url: str) -> dict[str, tuple[int, ...]] | None:
    """Tensor shapes of an HF folder's weights (one safetensors file or its shards, headers only); None for
    torch ``.bin`` weights that are not on the local disk."""
    names = hf_dir_files(url)
    found = _first_present(names, HF_WEIGHT_FILES)
    if found is None:
        return None
    if found.endswith(".index.json"):
        index = storage.read_json(storage.join(url, found))
        shards = sorted(set(index.get("weight_map", {}).values()))
        shapes: dict[str, tuple[int, ...]] = {}
        for shard in shards:
            part = checkpoint_shapes(storage.join(url, shard))
            if part is None:
                return None
            shapes.update(part)
        return shapes
    return checkpoint_shapes(storage.join(url, found))


_BERT_LIKE = ("bert", "roberta", "xlm-roberta")


def bert_shape_problems(config: dict[str, Any], shapes: dict[str, tuple[int, ...]]) -> list[str]:
    """Where a BERT-family folder's weights disagree with its config.json (a shape description from the
    config, no model built): embeddings, per-layer attention and MLP sizes, the number of layers."""
    prefix = f"{config.get('model_type')}."
    shapes = {re.sub(r"\.gamma$", ".weight", re.sub(r"\.beta$", ".bias", k)): v
              for k, v in strip_prefix(shapes, prefix).items()}
    h, inter = config.get("hidden_size"), config.get("intermediate_size")
    layers = config.get("num_hidden_layers")
    expected = {
        "embeddings.word_embeddings.weight": (config.get("vocab_size"), h),
        "embeddings.position_embeddings.weight": (config.get("max_position_embeddings"), h),
    }
    for i in range(int(layers or 0)):
        expected[f"encoder.layer.{i}.attention.self.query.weight"] = (h, h)
        expected[f"encoder.layer.{i}.intermediate.dense.weight"] = (inter, h)
        expected[f"encoder.layer.{i}.output.dense.weight"] = (h, inter)
    problems = [f"{k} {shapes[k]} (config.json says {v})" for k, v in expected.items()
                if None not in v and k in shapes and tuple(shapes[k]) != tuple(v)]
    missing = [k for k in expected if k not in shapes]
    if missing:
        problems.append(f"no tensor {missing[0]} ({len(missing)} of the {len(expected)} checked are missing)")
    extra = sorted({int(m.group(1)) for k in shapes if (m := re.match(r"encoder\.layer\.(\d+)\.", k))} - set(range(int(layers or 0))))
    if extra:
        problems.append(f"layers {extra[:3]} beyond num_hidden_layers {layers}")
    return problems


def hf_dir_fit_problem(url: str) -> str | None:
    """Why an HF folder's weights or tokenizer do not fit its own config.json (None if they do, or if that
    cannot be told cheaply)."""
    config = storage.read_json(storage.join(url, HF_CONFIG_FILE))
    if not isinstance(config, dict):
        return "config.json is not a JSON object"
    model_type = config.get("model_type")
    arches = open_clip_hf_arches()
    if arches is not None and model_type not in arches:
        return (f"config.json model_type {model_type!r} is not a text tower open_clip can wrap "
                f"(it takes {', '.join(sorted(arches))})")
    if model_type in _BERT_LIKE:
        try:
            shapes = hf_weight_shapes(url)
        except ShapeReadError as e:
            return f"its weights cannot be read ({e})"
        if shapes is not None:
            problems = bert_shape_problems(config, shapes)
            if problems:
                return (f"its weights do not fit its config.json ({len(problems)} problems, e.g. {problems[:2]}); "
                        "the folder mixes two models or a download was cut: fetch it again")
    vocab = storage.join(url, "vocab.txt")
    if model_type in _BERT_LIKE and "vocab.txt" in hf_dir_files(url) and config.get("vocab_size"):
        words = len(storage.read_text(vocab).splitlines())
        if words > int(config["vocab_size"]):
            return (f"vocab.txt has {words} tokens but config.json vocab_size is {config['vocab_size']}: the tokenizer "
                    "is not this model's; save both from one model")
    return None


@functools.lru_cache(maxsize=1)
def open_clip_hf_arches() -> frozenset[str] | None:
    """The HF ``model_type`` values open_clip's HF text tower knows (its hf_configs table, read without
    importing open_clip and therefore torch); None if open_clip is not installed."""
    spec = importlib.util.find_spec("open_clip") if importable("open_clip") else None
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / "hf_configs.py"
    try:
        module_spec = importlib.util.spec_from_file_location("_ptmst_open_clip_hf_configs", path)
        module = importlib.util.module_from_spec(module_spec)
        module_spec.loader.exec_module(module)
        return frozenset(module.arch_dict)
    except Exception:  # a future layout: skip this check rather than fail a good config
        return None


# --------------------------------------------------------------------------- meta-device image tower


def _meta_image_tower(mcfg: dict[str, Any]):
    """The model config's image tower built on the meta device: shapes and forward shapes, no memory."""
    import torch
    from ptmst_ray.models.openclip import open_clip

    with torch.device("meta"), quiet_root_logger():
        return open_clip.model._build_vision_tower(mcfg["embed_dim"], mcfg["vision_cfg"])


_POSITION_PARAM = re.compile(r"pos_?embed|positional_embedding|position")


def _fixed_size(visual) -> bool:
    """The tower takes one input size only: it has position embeddings (ViT, attention pooling, Swin's
    relative position tables)."""
    return any(_POSITION_PARAM.search(name) for name, _ in visual.named_parameters())


# --------------------------------------------------------------------------- the check


def check_model_requirements(cfg: Config) -> None:
    """Check, cheaply and before any work, that the model section can be built as configured.

    Raises :class:`~ptmst_ray.config.ConfigError` (field path + one line: the value, what is wrong, the fix) for:
    a package a tower needs that is not installed (timm, transformers); weights named by
    ``model.pretrained`` / ``image_pretrained`` / ``text_pretrained`` that are missing or do not fit the
    towers (shapes from headers, compared against a meta-device tower); an HF text folder without config,
    weights or tokenizer; an HF tower with no folder and no copy in the local HF cache (runs never download);
    ``data.image_size`` that the image tower cannot take; a frozen image tower without weights.
    A CNN image tower (a timm model without position embeddings, such as NFNet) takes any size; a size
    other than the model config's is allowed with a warning on this module's logger.
    The run root is not checked here.
    """
    m = cfg.model
    mcfg = model_config(m.name)
    if mcfg is None:
        raise ConfigError("model.name", f"{m.name!r} is not a model config (neither in {MODEL_CONFIG_DIR} nor "
                                        "open_clip's; see open_clip.list_models())")
    hf_name, timm_name = hf_text_name(mcfg), timm_image_name(mcfg)
    _check_packages(m.name, hf_name, timm_name)
    visual = None  # the meta-device image tower, built once when a check needs it

    def meta_visual():
        nonlocal visual
        if visual is None:
            visual = _meta_image_tower(mcfg)
        return visual

    made_by_pretrain = cfg.pretrain.enabled  # model.pretrained is the pretraining stage's output
    if m.pretrained and not made_by_pretrain:
        _check_full_checkpoint(m.name, m.pretrained, mcfg, meta_visual)
    if m.image_pretrained:
        _check_image_weights(m.image_pretrained, meta_visual, timm_name)
    _check_text_weights(m.text_pretrained, hf_name, mcfg)
    if not m.image_trainable and not (m.pretrained or m.image_pretrained):
        raise ConfigError("model.image_trainable", "false (a frozen image tower) needs its weights: set "
                                                   "model.image_pretrained (or model.pretrained), or set it to true")
    _check_image_size(cfg.data.image_size, m.name, mcfg, timm_name, meta_visual)


def _check_packages(name: str, hf_name: str | None, timm_name: str | None) -> None:
    if timm_name and not importable("timm"):
        raise ConfigError("model.name", f"{name!r} has a timm image tower ({timm_name}), which needs the timm "
                                        "package: pip install timm (it comes with open_clip_torch)")
    if hf_name and not importable("transformers"):
        raise ConfigError("model.name", f"{name!r} has a Hugging Face text tower ({hf_name}), which needs the "
                                        "transformers package: pip install 'transformers>=4.40' (a dependency of "
                                        "this project: pip install -e . installs it)")


def _exists(field: str, value: str) -> bool:
    try:
        return storage.exists(value)
    except ImportError as e:  # fsspec: no filesystem package for this URL scheme (s3fs, gcsfs, ...)
        raise ConfigError(field, f"{value}: {e} (for s3:// URLs: pip install -e '.[s3]')") from None


def _require_file(field: str, value: str) -> None:
    if not _exists(field, value):
        raise ConfigError(field, f"{value} does not exist; fix the path (or --set {field}=...)")
    if storage.isdir(value):
        raise ConfigError(field, f"{value} is a folder; this field takes one checkpoint file (.safetensors or a "
                                 "weights-only .pt)")


def _shapes_or_error(field: str, value: str) -> dict[str, tuple[int, ...]] | None:
    try:
        shapes = checkpoint_shapes(value)
    except ShapeReadError as e:
        raise ConfigError(field, f"{value}: {e}; rewrite or re-download it") from None
    if shapes is not None and not shapes:
        raise ConfigError(field, f"{value}: holds no tensors")
    return normalise_keys(shapes) if shapes is not None else None


def _meta_shapes(module) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in module.state_dict().items()}


def _check_image_weights(value: str, meta_visual, timm_name: str | None) -> None:
    field = "model.image_pretrained"
    _require_file(field, value)
    shapes = _shapes_or_error(field, value)
    if shapes is None:
        return
    visual = meta_visual()
    theirs = image_tower_keys(shapes, hasattr(visual, "trunk"))
    wrong, missing, _ = fit_problems(_meta_shapes(visual), theirs)
    what = f"the timm {timm_name} state dict (num_classes=0 or with its classifier)" if timm_name else \
        "an image-tower checkpoint of this model.name"
    if wrong:
        raise ConfigError(field, f"{value}: {len(wrong)} tensors have the wrong shape for the image tower, e.g. "
                                 f"{wrong[:2]}; use {what}, or change model.name")
    if missing:
        raise ConfigError(field, f"{value}: does not fit the image tower (missing {len(missing)} of its tensors, "
                                 f"e.g. {missing[:3]}); use {what}, or change model.name")


def _check_full_checkpoint(name: str, value: str, mcfg: dict[str, Any], meta_visual) -> None:
    field = "model.pretrained"
    if not is_checkpoint_path(value):  # an open_clip pretrained tag
        from ptmst_ray.models.openclip import open_clip

        tags = open_clip.list_pretrained_tags_by_model(name)
        if value not in tags:
            raise ConfigError(field, f"{value!r} is neither a checkpoint path nor an open_clip tag of {name!r} "
                                     f"(its tags: {tags or 'none'})")
        return
    _require_file(field, value)
    shapes = _shapes_or_error(field, value)
    if shapes is None:
        return
    visual = meta_visual()
    theirs = {k[len("visual."):]: v for k, v in shapes.items() if k.startswith("visual.")}
    wrong, missing, _ = fit_problems(_meta_shapes(visual), theirs)
    if wrong or missing:
        detail = f"wrong shapes, e.g. {wrong[:2]}" if wrong else f"missing e.g. {['visual.' + k for k in missing[:3]]}"
        raise ConfigError(field, f"{value}: not a checkpoint of {name!r}'s CLIP model ({detail}); check model.name "
                                 "matches the checkpoint")


def _check_text_weights(value: str | None, hf_name: str | None, mcfg: dict[str, Any]) -> None:
    field = "model.text_pretrained"
    if value is None:
        if hf_name and hf_cached_dir(hf_name) is None:
            raise ConfigError(field, f"null: the text tower would load {hf_name!r} from the local Hugging Face "
                                     "cache, which does not hold it (a run does not download it); "
                                     + FETCH_BERT_HINT.format(name=hf_name))
        return
    kind = _text_kind(field, value)
    if kind == "missing":
        raise ConfigError(field, f"{value} does not exist; fix the path (a folder saved by HF save_pretrained, or "
                                 "a .safetensors checkpoint of this CLIP model)")
    if kind == "hf_dir":
        if not hf_name:
            raise ConfigError(field, f"{value} is a folder (a Hugging Face model), but this model.name has "
                                     "open_clip's own text tower; give a .safetensors checkpoint of it instead")
        problem = hf_dir_problem(value) or hf_dir_fit_problem(value)
        if problem:
            raise ConfigError(field, f"{value} {problem}" if problem.startswith("has no") else f"{value}: {problem}")
        return
    shapes = _shapes_or_error(field, value)
    if hf_name:
        if hf_cached_dir(hf_name) is None:
            raise ConfigError(field, f"{value} is a checkpoint file, but the Hugging Face text tower's architecture "
                                     f"({hf_name}) would come from the local HF cache, which does not hold it; give "
                                     "the model's save_pretrained folder instead: " + FETCH_BERT_HINT.format(name=hf_name))
        return  # its keys depend on the HF config; checked when the tower loads
    if shapes is None:
        return
    import torch
    from ptmst_ray.models.openclip import open_clip

    try:
        with torch.device("meta"), quiet_root_logger():
            own = _meta_shapes(open_clip.model.CLIP(**mcfg))
    except Exception:  # a model config this cheap copy cannot express: the tower checks when it loads
        return
    own = {k: v for k, v in own.items() if not k.startswith("visual.") and k != "logit_scale"}
    theirs = {k: v for k, v in shapes.items() if not k.startswith("visual.")}
    wrong, missing, _ = fit_problems(own, theirs)
    if wrong or missing:
        detail = f"wrong shapes, e.g. {wrong[:2]}" if wrong else f"missing e.g. {missing[:3]}"
        raise ConfigError(field, f"{value}: does not fit the text tower ({detail}); check model.name matches the "
                                 "checkpoint")


def _text_kind(field: str, value: str) -> str:
    try:
        return text_weights_kind(value)
    except ImportError as e:
        raise ConfigError(field, f"{value}: {e} (for s3:// URLs: pip install -e '.[s3]')") from None


def _check_image_size(size: int, name: str, mcfg: dict[str, Any], timm_name: str | None, meta_visual) -> None:
    own = config_image_size(mcfg)
    if size == own:
        return
    fix = f"set data.image_size: {own}, or choose a model config made for {size}x{size} images"
    if not timm_name:  # open_clip's ViT / ModifiedResNet: position embeddings of one grid size
        raise ConfigError("data.image_size", f"{size} differs from the input size {own} of model {name!r}, whose "
                                             f"image tower (open_clip's own, with position embeddings for "
                                             f"{own}x{own} images) takes no other size; {fix}")
    visual = meta_visual()
    if _fixed_size(visual):
        raise ConfigError("data.image_size", f"{size} differs from the input size {own} of model {name!r}, whose "
                                             f"image tower ({timm_name}, with position embeddings) takes no other "
                                             f"size; {fix}")
    import torch

    try:
        with torch.no_grad():
            visual(torch.empty(1, 3, size, size, device="meta"))
    except Exception as e:  # too small for the CNN's downsampling
        raise ConfigError("data.image_size", f"{size}x{size} images do not pass through model {name!r}'s image "
                                             f"tower ({timm_name}: {str(e).splitlines()[0][:120]}); "
                                             f"use a larger size, e.g. {own}") from None
    log.warning("data.image_size %d differs from the input size %d of model %r: its image tower (%s) is a CNN and "
                "takes %dx%d images, but its features differ from those at %d, the size its weights were trained "
                "at and the paper uses", size, own, name, timm_name, size, size, own)
