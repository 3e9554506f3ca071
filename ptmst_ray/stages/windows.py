"""The windows' rule as a run stage (a phase's ``range_end: auto``): each range end picked from expert 0.

Why this file exists: a phase's range end b sets the chord theta_b - theta_a its shortcut moves every target along,
and no phase can choose it on its own: it depends on how the experts move on this data. The rule
(docs/method.md#a-recipe-for-new-data, :func:`~ptmst_ray.trajectories.expert.aligned_range_end`) takes the b in
[start_max + expert_epochs, experts.epochs] whose chord is best aligned with the displacements of the epochs the
phase's targets lie in. It reads expert 0 only (on both built-in themes one expert picks as twenty do), so it runs as
soon as that expert is stored, inside the shortcut worker, before any shortcut is written. Each pick is stored with
its scores, keyed by the experts and the phase's start window (a resumed run reads it), and :func:`resolved` puts
the picks into the config every later stage gets, so the phases, their hashes and the shortcuts are those of a config
that names the ends.
"""

from __future__ import annotations

import dataclasses
import logging

from ptmst_ray import storage
from ptmst_ray.config import Config, PhaseConfig
from ptmst_ray.layout import Layout, StageError, experts_hash

log = logging.getLogger(__name__)

AUTO = "auto"
EXPERT = 0
"""The expert whose trajectory the rule reads."""


def is_auto(cfg: Config) -> bool:
    """Whether some phase's range end is still to be picked."""
    return any(p.range_end == AUTO for p in cfg.phases)


def target_epochs(cfg: Config, phase: PhaseConfig) -> list[int]:
    """The epochs k whose displacement theta_(k+1) - theta_k a phase's targets lie in: a start in [start_min,
    start_max] plus up to ``distill.expert_epochs``."""
    return list(range(phase.start_min, phase.start_max + cfg.distill.expert_epochs))


def _url(cfg: Config, phase: PhaseConfig) -> str:
    name = (f"{experts_hash(cfg)}-e{cfg.experts.epochs}-a{phase.range_start}-s{phase.start_min}-{phase.start_max}"
            f"-m{cfg.distill.expert_epochs}.json")
    return storage.join(Layout.of(cfg).windows, name)


def stored(cfg: Config) -> list[dict | None]:
    """Per phase: the stored pick of an auto range end ({"range_end", "scores", ...}), or None (not auto, or not
    picked yet)."""
    out = []
    for phase in cfg.phases:
        url = _url(cfg, phase) if phase.range_end == AUTO else None
        out.append(storage.read_json(url) if url and storage.exists(url) else None)
    return out


def resolved(cfg: Config) -> Config:
    """``cfg`` with every auto range end the rule has picked under this root as a number; the others unchanged."""
    if not is_auto(cfg):
        return cfg
    phases = [p if pick is None else dataclasses.replace(p, range_end=int(pick["range_end"]))
              for p, pick in zip(cfg.phases, stored(cfg))]
    return cfg.replace(phases=[dataclasses.asdict(p) for p in phases])


def pick(cfg: Config) -> Config:
    """Apply the rule to every auto range end not picked yet (reading expert 0, which must be complete), store each
    pick with its scores, and return :func:`resolved`. Runs where the shortcuts are written (the shortcut worker)."""
    from ptmst_ray.stages.experts import expert_store

    todo = {_url(cfg, p): p for p, s in zip(cfg.phases, stored(cfg)) if p.range_end == AUTO and s is None}
    if todo:
        chash, epochs = experts_hash(cfg), cfg.experts.epochs
        snaps = expert_store(cfg).trajectory(EXPERT, chash)  # read an epoch at a time as the rule indexes it
        if len(snaps) < epochs + 1:
            raise StageError(f"range_end auto: expert {EXPERT} has {len(snaps) - 1} of its {epochs} epochs stored "
                             f"under {Layout.of(cfg).experts}; the windows' rule reads it whole: let the experts "
                             f"stage finish (`ptmst-ray experts`)")
        for (url, phase), (end, scores) in zip(todo.items(), weigh(cfg, [snaps], list(todo.values()))):
            _store(url, cfg, phase, end, scores, chash)
    return resolved(cfg)


def weigh(cfg: Config, trajectories: list, phases: list[PhaseConfig]) -> list[tuple[int, dict[int, float]]]:
    """The rule's (pick, scores by end) for each of ``phases`` over ``trajectories`` (stored experts, read an epoch at
    a time as indexed), in ``phases``' order: the phases of one range start are weighed together, so each
    trajectory is read once per range start."""
    from ptmst_ray.trajectories.expert import aligned_range_ends

    out: dict[int, tuple[int, dict[int, float]]] = {}
    for a in sorted({p.range_start for p in phases}):
        group = [i for i, p in enumerate(phases) if p.range_start == a]
        picked = aligned_range_ends(trajectories, a, [target_epochs(cfg, phases[i]) for i in group],
                                    cfg.experts.epochs)
        out.update(zip(group, picked))
    return [out[i] for i in range(len(phases))]


def _store(url: str, cfg: Config, phase: PhaseConfig, end: int, scores: dict[int, float], chash: str) -> None:
    """One pick and its scores, as :func:`stored` reads them back; logged."""
    targets, epochs = target_epochs(cfg, phase), cfg.experts.epochs
    storage.write_json(url, {"range_end": end, "scores": {str(b): s for b, s in scores.items()},
                             "range_start": phase.range_start, "starts": [phase.start_min, phase.start_max],
                             "target_epochs": targets, "expert": EXPERT, "config_hash": chash})
    log.info("windows' rule: starts %d-%d (target epochs %s) -> range [%d, %d]%s", phase.start_min, phase.start_max,
             targets, phase.range_start, end,
             "; the score still rises at the experts' last epoch: longer experts may pick later" if end == epochs else "")


def picks(cfg: Config) -> list[dict]:
    """What results.json records of the rule (``cfg`` as configured, before :func:`resolved`): per auto phase, its
    index, range and the scores of every end it weighed."""
    return [{"phase": i, "range": [p.range_start, s["range_end"]], "expert": s["expert"],
             "scores": dict(sorted(s["scores"].items(), key=lambda kv: int(kv[0])))}  # by end, whatever the JSON
            for i, (p, s) in enumerate(zip(cfg.phases, stored(cfg))) if s is not None]


def check_resolved(cfg: Config) -> Config:
    """``cfg`` resolved; a StageError naming the command when some auto range end is still unpicked."""
    cfg = resolved(cfg)
    if is_auto(cfg):
        raise StageError(f"{cfg.run.root}: a phase's range_end is auto and the windows' rule has not picked it "
                         f"(under {Layout.of(cfg).windows}); run `ptmst-ray experts` (or `ptmst-ray run`) first")
    return cfg


def union_epochs(cfg: Config) -> int:
    """The most target epochs the rule holds displacements of at once: the auto phases of one range start are
    weighed together (:func:`pick`); 0 when no range end is auto."""
    auto = [p for p in cfg.phases if p.range_end == AUTO]
    return max((len({k for p in auto if p.range_start == a for k in target_epochs(cfg, p)})
                for a in {p.range_start for p in auto}), default=0)


def end_bound(cfg: Config, phase: PhaseConfig) -> int:
    """The largest end a phase's range can take: its range_end, or the experts' epochs when auto (for sizing)."""
    return cfg.experts.epochs if phase.range_end == AUTO else phase.range_end
