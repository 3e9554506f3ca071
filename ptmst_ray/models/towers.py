"""open_clip towers: the trainable image encoder and the frozen text encoder, with weight loading.

Why this file exists: both towers are chosen by an open_clip model config (a named open_clip
model, or one of ours in model_configs/, e.g. a timm vision tower plus an HF text tower), and
their weights come from an open_clip pretrained tag or from a local/fsspec checkpoint. The
text tower is frozen; its outputs are the caption embeddings that synthetic texts live among.
"""

from __future__ import annotations

import contextlib
import functools
import io
import logging
from pathlib import Path

import open_clip
import torch
from open_clip.constants import OPENAI_DATASET_MEAN, OPENAI_DATASET_STD

from ptmst_ray import storage
from ptmst_ray.config import ModelConfig

log = logging.getLogger(__name__)

MODEL_CONFIG_DIR = Path(__file__).resolve().parent / "model_configs"
open_clip.add_model_config(MODEL_CONFIG_DIR)


class ModelError(ValueError):
    """A model or checkpoint cannot be built or loaded; the message names what to fix."""


def image_transform_stats() -> tuple[tuple[float, ...], tuple[float, ...]]:
    """CLIP normalisation (mean, std) applied to every image the models see."""
    return tuple(OPENAI_DATASET_MEAN), tuple(OPENAI_DATASET_STD)


def is_checkpoint_path(value: str) -> bool:
    """A pretrained value is a checkpoint path/URL (not an open_clip tag) if it looks like one."""
    return "://" in value or "/" in value or value.endswith((".safetensors", ".pt", ".pth", ".bin"))


@functools.lru_cache(maxsize=8)
def _load_state_dict_cached(url: str) -> dict[str, torch.Tensor]:
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
    """A checkpoint's tensors from a local path or fsspec URL (safetensors, or torch weights-only)."""
    return dict(_load_state_dict_cached(url))


def _load_into(module: torch.nn.Module, sd: dict[str, torch.Tensor], url: str, what: str) -> None:
    own = module.state_dict()
    wrong = [f"{k} {tuple(v.shape)} (the {what} has {tuple(own[k].shape)})"
             for k, v in sd.items() if k in own and v.shape != own[k].shape]
    if wrong:
        raise ModelError(
            f"{url}: {len(wrong)} tensors have the wrong shape for the {what}, e.g. {wrong[:2]}; "
            "check model.name matches the checkpoint"
        )
    missing, unexpected = module.load_state_dict(sd, strict=False)
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


@contextlib.contextmanager
def _quiet_root_logger():
    """open_clip warns on the root logger whenever a model is built without a tag; we load weights ourselves."""
    root = logging.getLogger()
    level = root.level
    root.setLevel(max(level, logging.ERROR))
    try:
        yield
    finally:
        root.setLevel(level)


def build_clip(cfg: ModelConfig, seed: int | None = None) -> torch.nn.Module:
    """The open_clip model ``cfg.name`` with weights loaded as configured.

    Parts without pretrained weights keep a random initialisation drawn from ``seed``.
    """
    if cfg.name not in open_clip.list_models():
        raise ModelError(f"model.name {cfg.name!r} is not an open_clip model config; see open_clip.list_models()")
    tag = cfg.pretrained if cfg.pretrained and not is_checkpoint_path(cfg.pretrained) else None
    with torch.random.fork_rng(devices=[]), _quiet_root_logger():
        if seed is not None:
            torch.manual_seed(seed)
        model = open_clip.create_model(cfg.name, pretrained=tag)
    if cfg.pretrained and tag is None:
        _load_into(model, load_state_dict(cfg.pretrained), cfg.pretrained, "CLIP model")
    if cfg.image_pretrained:
        load_image_tower(model.visual, cfg.image_pretrained)
    if cfg.text_pretrained:
        sd = {k: v for k, v in load_state_dict(cfg.text_pretrained).items() if not k.startswith("visual.")}
        text_keys = {k for k in model.state_dict() if not k.startswith("visual.") and k != "logit_scale"}
        missing = sorted(text_keys - set(sd))
        if missing:
            raise ModelError(
                f"{cfg.text_pretrained}: checkpoint does not fit the text tower (missing e.g. {missing[:3]})"
            )
        model.load_state_dict(sd, strict=False)
    return model


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


def image_size_of(model: torch.nn.Module) -> int:
    size = getattr(model.visual, "image_size", 224)
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class TextEncoder:
    """The frozen text tower: captions -> embeddings (d_t floats), computed in batches."""

    def __init__(self, cfg: ModelConfig, device: torch.device | None = None):
        from ptmst_ray.device import pick_device

        self.device = device or pick_device()
        self.model = build_clip(cfg, seed=0).eval().to(self.device)
        text = getattr(self.model, "text", None)
        if text is not None and hasattr(text, "proj"):
            # an HF text tower (e.g. BERT): the caption embedding is its pooled output (BERT CLS,
            # d_t = 768 in the paper), not a freshly initialised projection of it
            text.proj = torch.nn.Identity()
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.tokenizer = open_clip.get_tokenizer(cfg.name)
        self.dim = int(self.model.text_projection.shape[1]) if getattr(self.model, "text_projection", None) is not None \
            else int(self.encode(["a"]).shape[1])
        weights = [t.detach().cpu().contiguous() for k, t in sorted(self.model.state_dict().items()) if not k.startswith("visual.")]
        digest = storage.hash_bytes(b"".join(w.numpy().tobytes() for w in weights))
        self.key = storage.stable_hash({"name": cfg.name, "weights": digest})

    @torch.no_grad()
    def encode(self, captions: list[str], batch_size: int = 256) -> torch.Tensor:
        out = []
        for i in range(0, len(captions), batch_size):
            tokens = self.tokenizer(captions[i:i + batch_size]).to(self.device)
            out.append(self.model.encode_text(tokens, normalize=False).float().cpu())
        return torch.cat(out) if out else torch.empty(0, getattr(self, "dim", 0))


def build_text_encoder(cfg: ModelConfig, device: torch.device | None = None) -> TextEncoder:
    return TextEncoder(cfg, device)
