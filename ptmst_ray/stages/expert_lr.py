"""Stage `expert_lr` (``experts.lr_img: auto``): the experts' learning rate picked by the recipe's rule.

Why this file exists: the experts' learning rate is the one setting of a recipe that depends on the data and that
no phase can derive on its own (the step sizes follow it: ``distill.rel_alpha``). The rule
(docs/method.md#a-recipe-for-new-data): one probe expert per candidate in ``experts.lr_candidates`` (expert 0's
seed and data order) trains ``ALIGNED_EPOCHS`` epochs; the pick is the largest candidate whose consecutive epoch
displacements all keep a cosine >= ``ALIGNED_COSINE``, for both towers. Each candidate's cosines are stored as it
finishes (keyed like an expert: a resumed run trains only the missing ones; its trajectory is not kept), and
:func:`resolved` puts the pick into the config every later stage gets, so the experts, their hash and the step
sizes are those of a config that names the rate.
"""

from __future__ import annotations

import dataclasses
from typing import Callable

from ptmst_ray import storage
from ptmst_ray.config import Config, ExpertsConfig
from ptmst_ray.layout import Layout, StageError, experts_hash

AUTO = "auto"


def is_auto(cfg: Config) -> bool:
    return cfg.experts.lr_img == AUTO


def probe_experts(cfg: Config, lr: float) -> ExpertsConfig:
    """The expert settings of the probe at ``lr``: both towers at lr, the rule's epochs (not a config of its own:
    the phases' ranges may run past those epochs)."""
    from ptmst_ray.trajectories.expert import ALIGNED_EPOCHS

    return dataclasses.replace(cfg.experts, lr_img=lr, lr_txt=lr, epochs=ALIGNED_EPOCHS)


def _result_url(cfg: Config, lr: float) -> str:
    probe = probe_experts(cfg, lr)
    return storage.join(Layout.of(cfg).expert_lr, f"{experts_hash(cfg, probe)}-e{probe.epochs}.json")


def stored(cfg: Config) -> dict[float, list[float]]:
    """The candidates tried so far under this run root: lr -> its probe expert's displacement cosines."""
    out = {}
    for lr in cfg.experts.lr_candidates:
        url = _result_url(cfg, lr)
        if storage.exists(url):
            out[lr] = storage.read_json(url)["cosines"]
    return out


def missing(cfg: Config) -> list[float]:
    """The candidates still to try, largest first (none unless lr is auto)."""
    if not is_auto(cfg):
        return []
    done = stored(cfg)
    return sorted((lr for lr in set(cfg.experts.lr_candidates) if lr not in done), reverse=True)


def try_candidate(cfg: Config, lr: float, on_epoch: Callable[[int, dict], None] | None = None) -> list[float]:
    """Train the probe expert at ``lr`` (unless tried already) and store its displacement cosines."""
    from ptmst_ray.stages.experts import expert_trajectory
    from ptmst_ray.trajectories.expert import displacement_cosines

    url = _result_url(cfg, lr)
    if storage.exists(url):
        return storage.read_json(url)["cosines"]
    probe = probe_experts(cfg, lr)
    cosines = displacement_cosines(expert_trajectory(cfg, 0, on_epoch, experts=probe))
    storage.write_json(url, {"lr": lr, "cosines": cosines, "config_hash": experts_hash(cfg, probe)})
    return cosines


def pick(cfg: Config) -> float | None:
    """The rule's pick once every candidate is tried (None before). A StageError when none passes."""
    from ptmst_ray.trajectories.expert import ALIGNED_COSINE, ALIGNED_EPOCHS, aligned_lr

    done = stored(cfg)
    if set(done) != set(cfg.experts.lr_candidates):
        return None
    lr = aligned_lr(done)
    if lr is None:
        tried = "; ".join(f"lr {c:g}: " + ", ".join(f"{x:+.2f}" for x in cos[:ALIGNED_EPOCHS - 1])
                          for c, cos in sorted(done.items(), reverse=True))
        raise StageError(f"experts.lr_img auto: no candidate of experts.lr_candidates keeps its first {ALIGNED_EPOCHS} "
                         f"epochs' displacements aligned (cosine >= {ALIGNED_COSINE}) ({tried}); add smaller "
                         f"learning rates to experts.lr_candidates, or set experts.lr_img and lr_txt")
    return lr


def resolved(cfg: Config) -> Config:
    """``cfg`` with the rule's pick as experts.lr_img and lr_txt once every candidate is tried; else unchanged."""
    if not is_auto(cfg):
        return cfg
    lr = pick(cfg)
    return cfg if lr is None else cfg.replace(**{"experts.lr_img": lr, "experts.lr_txt": lr})


def run_in_turn(cfg: Config, progress: Callable[[str, int, int], None] | None = None) -> Config:
    """The stage in this process: every missing candidate in turn, then :func:`resolved` (which is then numeric)."""
    from ptmst_ray.trajectories.expert import ALIGNED_EPOCHS

    for lr in missing(cfg):
        try_candidate(cfg, lr, None if progress is None else
                      lambda epoch, _m, lr=lr: progress(f"expert lr {lr:g}", epoch, ALIGNED_EPOCHS))
    return resolved(cfg)
