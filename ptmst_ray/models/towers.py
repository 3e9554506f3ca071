"""open_clip towers: the trainable image encoder and the frozen text encoder, with weight loading.

Why this file exists: both towers are chosen by an open_clip model config (a named open_clip
model, or one of ours in model_configs/, e.g. a timm vision tower plus an HF text tower), and
their weights come from an open_clip pretrained tag or from a local/fsspec checkpoint. The
text tower is frozen; its outputs are the caption embeddings that synthetic texts live among.

Nothing here downloads: an HF text tower (BERT in the paper's recipes) loads from the folder that
``model.text_pretrained`` names (a local path or fsspec URL of a ``save_pretrained`` folder: config,
weights, tokenizer; a URL is copied once into a local cache), or else from the local Hugging Face cache,
with the hub switched off while it loads; a timm image tower never fetches its ImageNet weights itself
(``model.image_pretrained`` gives them). Only an open_clip pretrained *tag* or an HF tower found neither
in a folder nor in the cache reach the network.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import hashlib
import inspect
import io
import json
import logging
import os
import shutil
import sys
import threading
import uuid
from pathlib import Path

import torch

from ptmst_ray import storage
from ptmst_ray.config import ModelConfig
from ptmst_ray.models.openclip import enable_hf_text_towers, open_clip
from ptmst_ray.models.requirements import (
    HF_CONFIG_FILE,
    FETCH_BERT_HINT,
    hf_cached_dir,
    hf_dir_problem,
    hf_text_name,
    is_checkpoint_path,
    quiet_root_logger,
    text_weights_kind,
)

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


class ModelError(ValueError):
    """A model or checkpoint cannot be built or loaded; the message names what to fix."""


def image_transform_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP normalisation (mean, std) applied to every image the models see."""
    return tuple(open_clip.constants.OPENAI_DATASET_MEAN), tuple(open_clip.constants.OPENAI_DATASET_STD)


@functools.lru_cache(maxsize=8)
def _load_state_dict_cached(url: str, version: str) -> dict[str, torch.Tensor]:
    data = storage.read_bytes(url)
    if url.endswith(".safetensors"):
        from safetensors.torch import load as load_safetensors

        try:
            sd = load_safetensors(data)
        except Exception as e:  # safetensors raises its own error types
            raise ModelError(f"{url}: not a readable safetensors checkpoint ({e}); rewrite or re-download it") from e
    else:
        try:
            sd = torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)
        except Exception as e:
            raise ModelError(f"{url}: not a readable torch checkpoint ({e}); only weights-only files load") from e
        for key in ("state_dict", "model"):
            if isinstance(sd, dict) and key in sd and isinstance(sd[key], dict):
                sd = sd[key]
    if not isinstance(sd, dict) or not sd:
        raise ModelError(f"{url}: holds no tensors")
    sd = {k[len("module."):] if k.startswith("module.") else k: v for k, v in sd.items()}
    return sd


def load_state_dict(url: str) -> dict[str, torch.Tensor]:
    """A checkpoint's tensors from a local path or fsspec URL (safetensors, or torch weights-only). A process
    reads a file once while it stays the same: the cache is keyed by the URL and :func:`_file_version`, so a file
    rewritten in place is read again."""
    return dict(_load_state_dict_cached(url, _file_version(url)))


def _file_version(url: str) -> str:
    """What the file system says changes when the file at ``url`` is rewritten (size, modification time, inode,
    ETag: whichever it reports), from one metadata call; "" when it cannot say (the read then names the error)."""
    fs, path = storage.filesystem(url)
    try:
        info = fs.info(path)
    except (OSError, ValueError):
        return ""
    return json.dumps({k: str(info[k]) for k in ("size", "mtime", "ino", "LastModified", "ETag", "last_modified")
                       if k in info}, sort_keys=True)


def _load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], url: str, what: str,
               loaded_elsewhere: tuple[str, ...] = ()) -> None:
    """Load ``sd`` into ``module``: every tensor must fit and be present, except those under the
    ``loaded_elsewhere`` prefixes (filled from another source)."""
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the {what} has {tuple(own[k].shape)})"
             for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ModelError(
            f"{url}: {len(wrong)} tensors have the wrong shape for the {what}, e.g. {wrong[:2]}; "
            "check model.name matches the checkpoint"
        )
    missing, unexpected = module.load_state_dict(sd, strict=False)
    missing = [k for k in missing if not k.startswith(loaded_elsewhere)] if loaded_elsewhere else missing
    if missing:
        raise ModelError(
            f"{url}: checkpoint does not fit the {what} (missing {len(missing)} tensors, e.g. {missing[:3]}); "
            "check model.name matches the checkpoint"
        )
    if unexpected:
        log.warning("%s: %d tensors not used by the %s (e.g. %s)", url, len(unexpected), what, unexpected[:3])


def _strip(sd: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    if any(k.startswith(prefix) for k in sd):
        return {k[len(prefix):]: v for k, v in sd.items() if k.startswith(prefix)}
    return sd


def build_clip(cfg: ModelConfig, seed: int | None = None) -> torch.nn.Module:
    """The open_clip model ``cfg.name`` with weights loaded as configured.

    Parts without pretrained weights keep a random initialisation drawn from ``seed``. Weights, in order:
    ``model.pretrained`` (an open_clip tag or a checkpoint of the whole CLIP model), ``image_pretrained``
    (the image tower), ``text_pretrained`` (the text tower: a checkpoint of this CLIP model, or for an HF
    text tower a ``save_pretrained`` folder, whose config then also decides the tower's architecture, e.g.
    its width, and whose weights take precedence over ``pretrained``'s text tensors; the projection to
    ``embed_dim`` after it is sized to the folder's width and drawn from ``seed``).
    """
    if cfg.name not in open_clip.list_models():
        raise ModelError(f"model.name {cfg.name!r} is not an open_clip model config; see open_clip.list_models()")
    tag = cfg.pretrained if cfg.pretrained and not is_checkpoint_path(cfg.pretrained) else None
    mcfg = open_clip.get_model_config(cfg.name)
    hf_name = hf_text_name(mcfg)
    if hf_name:
        enable_hf_text_towers()
    text_kind = _text_kind(cfg, hf_name)
    hf_dir = hf_text_dir(cfg)
    kwargs = {}
    if hf_dir is not None:
        # open_clip builds the HF tower from text_cfg.hf_model_name: point it at the folder. Its weights load
        # when they are used: a folder always; the cache's copy unless a checkpoint overwrites them
        kwargs["text_cfg"] = dict(mcfg["text_cfg"], hf_model_name=hf_dir, hf_tokenizer_name=hf_dir,
                                  hf_model_pretrained=text_kind == "hf_dir" or not (cfg.pretrained or text_kind))
    # the hub is reached only for an open_clip tag or an HF tower in neither a folder nor the HF cache
    offline = tag is None and (hf_name is None or hf_dir is not None)
    try:
        with torch.random.fork_rng(devices=[]), quiet_root_logger(), hub_offline() if offline else contextlib.nullcontext():
            if seed is not None:
                torch.manual_seed(seed)
            model = open_clip.create_model(cfg.name, pretrained=tag, pretrained_image=False,
                                           pretrained_hf=not (cfg.pretrained or text_kind), **kwargs)
    except (OSError, RuntimeError, ValueError) as e:
        if not hf_name or not _raised_by_hf(e):
            raise
        source = hf_dir or hf_name
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"the text tower {source!r} of {cfg.name} cannot be loaded ({first}); "
                         + (FETCH_BERT_HINT.format(name=hf_name) if hf_dir is None else
                            "check the folder holds a model and tokenizer saved by save_pretrained")) from e
    if cfg.pretrained and tag is None:
        sd = load_state_dict(cfg.pretrained)
        if text_kind == "hf_dir":  # the folder's text tower overrides the checkpoint's
            sd = {k: v for k, v in sd.items() if not k.startswith("text.")}
        _load_into(model, sd, cfg.pretrained, "CLIP model", loaded_elsewhere=("text.",) if text_kind == "hf_dir" else ())
    if cfg.image_pretrained:
        load_image_tower(model.visual, cfg.image_pretrained)
    if text_kind == "checkpoint":
        sd = {k: v for k, v in load_state_dict(cfg.text_pretrained).items() if not k.startswith("visual.")}
        text_keys = {k for k in model.state_dict() if not k.startswith("visual.") and k != "logit_scale"}
        missing = sorted(text_keys - set(sd))
        if missing:
            raise ModelError(
                f"{cfg.text_pretrained}: checkpoint does not fit the text tower (missing e.g. {missing[:3]})"
            )
        model.load_state_dict(sd, strict=False)
    return model


def build_image_tower(cfg: ModelConfig, seed: int | None = None) -> torch.nn.Module:
    """``build_clip(cfg, seed).visual`` (the same weights, the same random draws) without building the text tower.

    The students (experts, phases, evaluation) and the frozen-tower features need the image tower only; building
    the whole model built the paper recipes' BERT (110M parameters, and transformers imported) in every such
    process to drop it. open_clip builds a model's image tower first, from the same seed. An open_clip pretrained
    tag, a model name open_clip does not know and a multimodal (CoCa) config go through :func:`build_clip`.
    """
    tag = cfg.pretrained and not is_checkpoint_path(cfg.pretrained)
    mcfg = open_clip.get_model_config(cfg.name) if cfg.name in open_clip.list_models() else None
    if tag or mcfg is None or "multimodal_cfg" in mcfg:
        return build_clip(cfg, seed).visual
    vision_cfg = dict(mcfg["vision_cfg"])
    if "timm_model_name" in vision_cfg:
        vision_cfg["timm_model_pretrained"] = False  # as build_clip's pretrained_image=False: nothing fetched
    with torch.random.fork_rng(devices=[]), quiet_root_logger():
        if seed is not None:
            torch.manual_seed(seed)
        visual = open_clip.model._build_vision_tower(mcfg["embed_dim"], vision_cfg, mcfg.get("quick_gelu", False))
    if cfg.pretrained:
        load_image_tower(visual, cfg.pretrained)
    if cfg.image_pretrained:
        load_image_tower(visual, cfg.image_pretrained)
    return visual


def _raised_by_hf(error: BaseException) -> bool:
    """The error comes from loading the HF text tower (transformers, the hub client, open_clip's HF adapter)."""
    tb = error.__traceback__
    while tb is not None:
        filename = tb.tb_frame.f_code.co_filename.replace(os.sep, "/")
        if "/transformers/" in filename or "/huggingface_hub/" in filename or filename.endswith("/hf_model.py"):
            return True
        tb = tb.tb_next
    return False


def _text_kind(cfg: ModelConfig, hf_name: str | None) -> str | None:
    """What ``cfg.text_pretrained`` names (None, "checkpoint" or "hf_dir"); a ModelError if it cannot be used."""
    if not cfg.text_pretrained:
        return None
    kind = text_weights_kind(cfg.text_pretrained)
    if kind == "missing":
        raise ModelError(f"model.text_pretrained {cfg.text_pretrained}: does not exist (a folder saved by HF "
                         "save_pretrained, or a checkpoint file of this CLIP model)")
    if kind == "hf_dir" and not hf_name:
        raise ModelError(f"model.text_pretrained {cfg.text_pretrained}: a folder (a Hugging Face model), but "
                         f"{cfg.name} has open_clip's own text tower; give a checkpoint file of it instead")
    return kind


# --------------------------------------------------------------------------- HF text towers, offline


HF_OFFLINE_ENV = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE")
_OFFLINE_LOCK = threading.RLock()  # one switch-over at a time, so each restores exactly what it found


@contextlib.contextmanager
def hub_offline():
    """While open: Hugging Face hub requests fail instead of reaching the network (HF_HUB_OFFLINE for this
    process, also for code that read the setting at import), and transformers draws no progress bars.
    Loads in other threads wait for it (the setting is process-wide). transformers is switched only when it is
    loaded: code that loads an HF tower imports it first (:func:`enable_hf_text_towers`), as transformers
    imported inside would keep the offline flag it reads at import for the rest of the process."""
    with _OFFLINE_LOCK, _hub_offline():
        yield


def _transformers_offline(patched: list[tuple[object, str, object]]):
    """Switch loaded transformers offline (its cached flag appended to ``patched``) and its progress bars off;
    returns its logging module when the bars were on (to switch them on again), else None."""
    try:
        import transformers.utils.hub as tf_hub
        import transformers.utils.logging as tf_logging
    except ImportError:
        return None
    if hasattr(tf_hub, "_is_offline_mode"):  # transformers 4.x caches the flag at import
        patched.append((tf_hub, "_is_offline_mode", tf_hub._is_offline_mode))
        tf_hub._is_offline_mode = True
    if not tf_logging.is_progress_bar_enabled():
        return None
    tf_logging.disable_progress_bar()
    return tf_logging


@contextlib.contextmanager
def _hub_offline():
    saved_env = {k: os.environ.get(k) for k in HF_OFFLINE_ENV}
    patched: list[tuple[object, str, object]] = []
    for k in HF_OFFLINE_ENV:
        os.environ[k] = "1"
    try:
        import huggingface_hub.constants as hub_constants

        patched.append((hub_constants, "HF_HUB_OFFLINE", hub_constants.HF_HUB_OFFLINE))
        hub_constants.HF_HUB_OFFLINE = True
    except ImportError:
        pass
    # transformers only when loaded: the towers that need it load it first
    bars = _transformers_offline(patched) if sys.modules.get("transformers") is not None else None
    try:
        yield
    finally:
        if bars is not None:
            bars.enable_progress_bar()
        for obj, name, value in reversed(patched):
            setattr(obj, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def hf_text_dir(cfg: ModelConfig) -> str | None:
    """The local folder an HF text tower loads from: ``model.text_pretrained`` when it names a folder (a URL
    copied to the local cache first), else the HF cache's copy of the config's ``hf_model_name``; None for
    open_clip's own text tower or an HF model that is in neither place."""
    mcfg = open_clip.get_model_config(cfg.name)
    hf_name = hf_text_name(mcfg) if mcfg else None
    if not hf_name:
        return None
    if cfg.text_pretrained and text_weights_kind(cfg.text_pretrained) == "hf_dir":
        problem = hf_dir_problem(cfg.text_pretrained)
        if problem:
            raise ModelError(f"model.text_pretrained {cfg.text_pretrained} {problem}")
        return local_hf_dir(cfg.text_pretrained)
    return hf_cached_dir(hf_name)


def model_cache_dir() -> Path:
    """Where folders from fsspec URLs are copied: $PTMST_RAY_CACHE/hf-models (default ~/.cache/ptmst-ray)."""
    return Path(storage.cache_root()) / "hf-models"


_VERSION_FIELDS = ("ETag", "etag", "md5Hash", "crc32c", "generation", "LastModified", "last_modified", "mtime",
                   "updated", "created")
"""fsspec info fields that change when a remote file's content changes (first present is used)."""
COMPLETE_MARK = ".ptmst-complete.json"


def local_hf_dir(url: str) -> str:
    """A local folder with the files of folder ``url``: the folder itself if it is local; otherwise a copy in
    :func:`model_cache_dir`, keyed by the URL and every file's size and version (ETag, mtime, ...) so a
    changed folder is fetched again, or by the files' content hash where the filesystem reports no version."""
    local = storage.local_path(url)
    if local is not None:
        return local
    fs, root = storage.filesystem(url)
    root = root.rstrip("/")
    found = {path[len(root):].lstrip("/"): info for path, info in fs.find(root, detail=True).items()}
    listing = []
    versioned = True
    for rel, info in sorted(found.items()):
        if not _needed_from_hf_dir(rel, set(found)):
            continue
        version = next((str(info[k]) for k in _VERSION_FIELDS if info.get(k) is not None), None)
        versioned = versioned and version is not None
        listing.append((rel, info.get("size"), version))
    cache = model_cache_dir()
    if versioned:
        dest = cache / storage.stable_hash({"url": url, "files": listing})
        if (dest / COMPLETE_MARK).exists():
            return str(dest)
    cache.mkdir(parents=True, exist_ok=True)
    tmp = cache / f".tmp-{uuid.uuid4().hex}"
    digests = {}
    try:
        for rel, _, _ in listing:
            target = tmp / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            h = hashlib.sha256()
            with fs.open(f"{root}/{rel}", "rb") as src, open(target, "wb") as out:
                for chunk in iter(lambda: src.read(1 << 22), b""):
                    h.update(chunk)
                    out.write(chunk)
            digests[rel] = h.hexdigest()
        (tmp / COMPLETE_MARK).write_text(json.dumps({"url": url, "files": digests}, indent=1, sort_keys=True))
        if not versioned:
            dest = cache / f"c{storage.stable_hash(digests)}"
            if (dest / COMPLETE_MARK).exists():
                return str(dest)
        try:
            os.rename(tmp, dest)
        except OSError:  # another process put the same folder there first
            if not (dest / COMPLETE_MARK).exists():
                raise
        log.info("%s: copied to %s", url, dest)
        return str(dest)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


_OTHER_FRAMEWORKS = (".h5", ".msgpack", ".ot", ".onnx", ".tflite", ".mlmodel")


def _needed_from_hf_dir(rel: str, files: set[str]) -> bool:
    """A file of a downloaded HF folder that loading in PyTorch uses: not TF/Flax/Rust/ONNX/CoreML weights, and
    no pytorch_model*.bin beside safetensors weights (transformers prefers those)."""
    if rel.endswith(_OTHER_FRAMEWORKS) or rel.startswith(("onnx/", "coreml/", ".git/", ".cache/")):
        return False
    if rel.startswith("pytorch_model") and any(f.startswith("model") and ".safetensors" in f for f in files):
        return False
    return True


_TOKENIZER_PARTS = ("token", "vocab", "merges", "spiece", "sentencepiece")


def hf_dir_tokenizer_digest(folder: str) -> str:
    """Hash of what decides a local HF folder's tokens: its tokenizer files (vocab, merges, tokenizer
    configs, special tokens) and config.json."""
    parts = {}
    for path in sorted(Path(folder).iterdir()):
        if path.is_file() and (path.name == HF_CONFIG_FILE or any(w in path.name for w in _TOKENIZER_PARTS)):
            parts[path.name] = hashlib.sha256(path.read_bytes()).hexdigest()
    return storage.stable_hash(parts)


def build_tokenizer(cfg: ModelConfig):
    """The text tower's tokenizer: for an HF tower the folder's own (no hub), else open_clip's for ``cfg.name``."""
    folder = hf_text_dir(cfg)
    if folder is None:
        return open_clip.get_tokenizer(cfg.name)
    from open_clip.tokenizer import DEFAULT_CONTEXT_LENGTH, HFTokenizer

    text_cfg = open_clip.get_model_config(cfg.name)["text_cfg"]
    context = int(text_cfg.get("context_length") or DEFAULT_CONTEXT_LENGTH)
    max_positions = json.loads((Path(folder) / HF_CONFIG_FILE).read_text()).get("max_position_embeddings")
    if max_positions:
        context = min(context, int(max_positions))
    kwargs = dict(text_cfg.get("tokenizer_kwargs", {}))
    enable_hf_text_towers()  # transformers loaded before hub_offline switches it
    params = inspect.signature(HFTokenizer.__init__).parameters
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):  # passed on to AutoTokenizer
        kwargs["local_files_only"] = True
    if "tokenizer_mode" in params:
        kwargs["tokenizer_mode"] = text_cfg.get("tokenizer_mode")
    with hub_offline():
        return HFTokenizer(folder, context_length=context, **kwargs)


def load_image_tower(visual: torch.nn.Module, url: str) -> None:
    """Image-tower weights from ``url``: an open_clip checkpoint (``visual.`` keys) or a plain timm one.

    A timm checkpoint's keys gain open_clip's ``trunk.`` prefix. Every tower tensor must come from the
    checkpoint (a frozen tower with random parts would differ per seed); tensors the tower has no
    place for, such as an ImageNet classifier (``head.fc``), are left out with a warning.
    """
    sd = _strip(load_state_dict(url), "visual.")
    if hasattr(visual, "trunk") and not any(k.startswith("trunk.") for k in sd):
        sd = {f"trunk.{k}": v for k, v in sd.items()}
    _load_into(visual, sd, url, "image tower")


SOURCE_VERSION = 1
"""Bumped when how a tower is built from its inputs changes in this package (part of :func:`tower_source`)."""
_BUILDERS = ("torch", "open_clip_torch", "timm", "transformers")
"""The packages whose code turns a model config and weights files into a tower."""


def tower_source(cfg: ModelConfig, part: str) -> str:
    """A digest of everything :func:`build_clip` makes the ``part`` ("image" or "text") tower from, computed
    without building it: the open_clip model config (the architecture), the versions of the packages that build
    it, and the CONTENT (sha256, read in 1 MiB chunks) of every weights file or HF folder it loads; an open_clip
    tag by name. Equal sources give equal towers, so a stage records it beside the key it computed from the built
    tower (``TextEncoder.key``, ``tower_digest``) and a later run whose source matches skips the build; another
    file content (not only another path, size or mtime) gives another source."""
    from importlib import metadata

    if part not in ("image", "text"):
        raise ValueError(f"part must be image or text, not {part!r}")

    def version(dist: str) -> str | None:
        try:
            return metadata.version(dist)
        except metadata.PackageNotFoundError:
            return None

    weights: dict[str, str | None] = {}
    if cfg.pretrained:
        weights["pretrained"] = storage.hash_file(cfg.pretrained) if is_checkpoint_path(cfg.pretrained) \
            else f"tag:{cfg.pretrained}"
    if part == "image" and cfg.image_pretrained:
        weights["image_pretrained"] = storage.hash_file(cfg.image_pretrained)
    if part == "text":
        if cfg.text_pretrained and text_weights_kind(cfg.text_pretrained) == "checkpoint":
            weights["text_pretrained"] = storage.hash_file(cfg.text_pretrained)
        folder = hf_text_dir(cfg)  # model.text_pretrained's folder, or the HF cache's copy of the tower
        if folder is not None:
            names = {p.name for p in Path(folder).iterdir() if p.is_file()}
            weights["hf_folder"] = storage.stable_hash({n: storage.hash_file(str(Path(folder) / n))
                                                        for n in sorted(names) if _needed_from_hf_dir(n, names)})
    return storage.stable_hash({"version": SOURCE_VERSION, "part": part, "name": cfg.name,
                                "arch": open_clip.get_model_config(cfg.name), "weights": weights,
                                "packages": {d: version(d) for d in _BUILDERS}})


class TextEncoder:
    """The frozen text tower: captions -> embeddings (d_t floats), computed in batches."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None):
        from ptmst_ray.device import pick_device

        self.device = device or pick_device()
        # the image tower's own weights (model.image_pretrained: NFNet-L0's 159 MB in the paper recipes) are not
        # read, and the tower open_clip builds beside the text tower is dropped before the model moves
        model = build_clip(dataclasses.replace(cfg, image_pretrained=None), seed=0)
        model.visual = torch.nn.Identity()
        self.model = model.eval().to(self.device)
        text = getattr(self.model, "text", None)
        if text is not None and hasattr(text, "proj"):
            # an HF text tower (e.g. BERT): the caption embedding is its pooled output (BERT CLS,
            # d_t = 768 in the paper), not a freshly initialised projection of it
            text.proj = torch.nn.Identity()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = build_tokenizer(cfg)
        self.dim = int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.encode(["a"]).shape[1])
        # the cache key: the text tower's weights themselves (whatever file or folder they came from) ...
        h = hashlib.sha256()
        for k, t in sorted(self.model.state_dict().items()):
            if not k.startswith("visual."):
                h.update(t.detach().cpu().contiguous().numpy().tobytes())
        identity = {"name": cfg.name, "weights": h.hexdigest()}
        folder = hf_text_dir(cfg)
        if folder is not None:  # ... and, for an HF tower, its tokenizer files and context length
            identity.update(tokenizer=hf_dir_tokenizer_digest(folder), context_length=self.tokenizer.context_length)
        self.key = storage.stable_hash(identity)

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(captions[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=False).float().cpu())
        return torch.cat(out) if out else torch.empty(0, getattr(self, "dim", 0))


def build_text_encoder(cfg: ModelConfig, device: torch.device | None = None) -> TextEncoder:
    return TextEncoder(cfg, device)
