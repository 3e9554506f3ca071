"""Stage `pretrain`: CLIP-style pretraining of the built-in towers on the disjoint pretraining split.

With ``pretrain.towers: separate`` two independent CLIP runs train (different seeds) and the image
tower of one is joined with the text tower of the other, so the towers are not aligned, like the
paper's separately pretrained NFNet and BERT. How the runs are executed is the caller's choice
(:data:`TrainRuns`): in turn here by default, as parallel Ray tasks in the driver.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from ptmst_ray import storage
from ptmst_ray.config import Config, ModelConfig, PretrainConfig
from ptmst_ray.layout import Layout, StageError, pretrain_hash

Progress = Callable[[int, int], None]
TrainRuns = Callable[[Config, list[PretrainConfig]], list[dict]]
"""Trains the given CLIP runs (each with :func:`pretrain_run`) and returns their state dicts, in order."""


def pretrain_runs(cfg: Config) -> list[PretrainConfig]:
    """The CLIP runs of the stage: one (``joint``), or two independent ones (``separate``: the image
    tower of the first, the text tower of the second, seed + 1)."""
    if cfg.pretrain.towers == "joint":
        return [cfg.pretrain]
    return [cfg.pretrain, dataclasses.replace(cfg.pretrain, seed=cfg.pretrain.seed + 1)]


def run_labels(runs: int) -> list[str]:
    """What the log and the progress board call each of :func:`pretrain_runs`' runs."""
    return ["pretrain"] if runs == 1 else ["pretrain image tower", "pretrain text tower"]


def normalised_split(cfg: Config, split: str):
    """(the split, its images as CLIP-normalised rows: ``images[i]`` is image i as float, built per batch)."""
    from ptmst_ray.data.dataset import ImageRows, load_split

    data = load_split(Layout.of(cfg).data, split)
    return data, ImageRows(data.images)


def pretrain_run(cfg: Config, run_cfg: PretrainConfig, on_epoch: Callable[[int, dict], None] | None = None,
                 label: str = "pretrain") -> dict:
    """One CLIP run of :func:`pretrain_runs` on the pretraining split, its epochs logged as ``label``; returns its
    state dict."""
    from ptmst_ray.data.dataset import ImageRows, read_captions
    from ptmst_ray.models.pretrain import pretrain_clip
    from ptmst_ray.stages.embed import stream_split, train_stream

    if stream_split(cfg, "pretrain"):  # the pixels are never held: full batches streamed in a seeded order
        caps = read_captions(Layout.of(cfg).data, "pretrain")
        n = len(caps.captions)
        stream = train_stream(cfg, "pretrain", torch.arange(n), run_cfg.batch_size, run_cfg.seed,
                              min_batch=min(run_cfg.batch_size, n), image_index=caps.image_index)

        def epoch_batches(epoch: int):
            return ((rows, images) for rows, images, _ in stream.epoch(epoch))

        return pretrain_clip(cfg.model, run_cfg, None, list(caps.captions), on_epoch=on_epoch,
                             epoch_batches=epoch_batches, label=label)
    data, _ = normalised_split(cfg, "pretrain")
    # one row per caption -> its image, normalised per batch (no per-caption copy of the pixels)
    return pretrain_clip(cfg.model, run_cfg, ImageRows(data.images, data.image_index), list(data.captions),
                         on_epoch=on_epoch, label=label)


def _runs_in_turn(progress: Progress | None) -> TrainRuns:
    """The default :data:`TrainRuns`: one run after the other in this process, one progress count."""

    def train(cfg: Config, runs: list[PretrainConfig]) -> list[dict]:
        total, done, states = sum(r.epochs for r in runs), 0, []
        for run_cfg, label in zip(runs, run_labels(len(runs))):
            def on_epoch(epoch: int, _metrics: dict, before: int = done) -> None:
                if progress:
                    progress(before + epoch, total)

            states.append(pretrain_run(cfg, run_cfg, on_epoch=on_epoch, label=label))
            done += run_cfg.epochs
        return states

    return train


def pretrain(cfg: Config, progress: Progress | None = None, train: TrainRuns | None = None) -> dict | None:
    """Pretrain the towers (built-in dataset); skip when done. Returns the stage's manifest.

    ``train`` runs the CLIP runs (the driver runs them as parallel Ray tasks); by default they run here
    in turn, reporting ``progress(epochs done, epochs in all)``.
    """
    if not cfg.pretrain.enabled:
        return None
    from ptmst_ray.models.pretrain import save_checkpoint

    if is_done(cfg):
        return storage.read_manifest(Layout.of(cfg).pretrain)
    out, chash = Layout.of(cfg).pretrain, pretrain_hash(cfg)
    states = (train or _runs_in_turn(progress))(cfg, pretrain_runs(cfg))
    state = states[0] if len(states) == 1 else merge_towers(image_state=states[0], text_state=states[1])
    digest = save_checkpoint(cfg.model.pretrained, state)
    manifest = {"config_hash": chash, "checkpoint": cfg.model.pretrained, "sha256": digest,
                "zero_shot": zero_shot_recall(cfg.model, cfg)}
    storage.write_manifest(out, manifest)
    return manifest


def is_done(cfg: Config) -> bool:
    """The towers of this config are pretrained: the manifest matches and the checkpoint exists."""
    done = storage.read_manifest(Layout.of(cfg).pretrain)
    return done is not None and done.get("config_hash") == pretrain_hash(cfg) and storage.exists(cfg.model.pretrained)


def merge_towers(image_state: dict, text_state: dict) -> dict:
    """One CLIP state dict: the image tower (``visual.*``) of one run, everything else of the other."""
    if image_state.keys() != text_state.keys():
        raise StageError("merge_towers: the two pretraining runs have different parameter names")
    return {k: (image_state[k] if k.startswith("visual.") else text_state[k]) for k in image_state}


def zero_shot_recall(model_cfg: ModelConfig, cfg: Config) -> dict:
    """Retrieval of the pretrained CLIP (both towers) on the test split."""
    from ptmst_ray.evaluate.metrics import retrieval_metrics
    from ptmst_ray.models.openclip import open_clip
    from ptmst_ray.models.towers import build_clip

    test, images = normalised_split(cfg, "test")
    model = build_clip(model_cfg).eval()
    tok = open_clip.get_tokenizer(model_cfg.name)
    with torch.no_grad():
        img = torch.nn.functional.normalize(torch.cat([model.encode_image(images[i:i + 512])
                                                       for i in range(0, len(images), 512)]), dim=-1)
        txt = torch.cat([model.encode_text(tok(test.captions[i:i + 512]), normalize=True)
                         for i in range(0, len(test.captions), 512)])
    return retrieval_metrics(img @ txt.T, test.txt2img)
