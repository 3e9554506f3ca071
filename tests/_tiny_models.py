"""Tiny stand-ins for the paper's towers, made by the tests themselves (nothing is downloaded).

A tiny BERT saved the way ``hf download bert-base-uncased --local-dir DIR`` leaves a folder (config.json,
model.safetensors, vocab.txt, tokenizer files), and the timm NFNet-L0 state dict the recipes'
``model.image_pretrained`` expects (saved as safetensors).
"""

from __future__ import annotations

import shutil
from pathlib import Path

SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
WORDS = (
    "a an the and with of on in at to from by near under over above below left right top bottom middle "
    "red green blue yellow white black orange purple pink brown gray grey dark light bright "
    "circle square triangle star ring cross dot line shape shapes small big large tiny huge "
    "dog cat man woman boy girl child people person group two three one four many some "
    "is are sits stands runs walks plays holds looks street park water grass field road "
    "photo picture image background house tree car bike sky sun beach city table chair ball hat shirt "
    "running sitting standing playing jumping"
).split()
VOCAB = SPECIALS + WORDS
assert len(VOCAB) >= 100


def make_tiny_bert(folder: Path, seed: int = 0, hidden: int = 32, vocab: list[str] | None = None,
                   head: str = "none") -> Path:
    """A 2-layer, 2-head BERT (hidden 32, intermediate 37) and its tokenizer saved into ``folder``.

    ``head="pretraining"`` saves a ``BertForPreTraining`` instead (keys under ``bert.`` plus the ``cls.``
    heads), the layout of the hub's bert-base-uncased checkpoint.
    """
    import torch
    from transformers import BertConfig, BertForPreTraining, BertModel, BertTokenizer

    vocab = vocab or VOCAB
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    vocab_file = folder / "vocab.txt"
    vocab_file.write_text("\n".join(vocab) + "\n")
    config = BertConfig(vocab_size=len(vocab), hidden_size=hidden, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=37, max_position_embeddings=64)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = BertForPreTraining(config) if head == "pretraining" else BertModel(config)
    model.save_pretrained(folder)
    BertTokenizer(str(vocab_file)).save_pretrained(folder)
    return folder


def copy_without(src: Path, dst: Path, *names: str) -> Path:
    """A copy of folder ``src`` at ``dst`` without the files ``names``."""
    shutil.copytree(src, dst, ignore=lambda _d, files: [f for f in files if f in names])
    return dst


def upload(folder: Path, url: str) -> str:
    """Copy a local folder's files to an fsspec URL (e.g. memory://...)."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url)
    for path in sorted(Path(folder).rglob("*")):
        if path.is_file():
            with fs.open(f"{root}/{path.relative_to(folder).as_posix()}", "wb") as f:
                f.write(path.read_bytes())
    return url


def save_nfnet_l0(path: Path, seed: int = 0) -> Path:
    """A timm NFNet-L0 state dict (pooled 2304-d features, ``num_classes=0``) saved as safetensors."""
    import timm
    import torch
    from safetensors.torch import save_file

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = timm.create_model("nfnet_l0", num_classes=0)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path


def fake_hf_cache(cache: Path, repo_id: str, folder: Path, commit: str = "0" * 40) -> Path:
    """Lay ``folder``'s files out as the Hugging Face hub cache holds a downloaded ``repo_id``."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / commit
    shutil.copytree(folder, snapshot)
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(commit)
    return snapshot
