"""The pipeline's Ray metrics, each named once: what the dashboard's Metrics page and Grafana plot.

Why this file exists: the matching loss, the step sizes, the seconds per iteration and the recall
of a phase, each expert's epoch loss and the stage in progress are otherwise only in worker logs.
Actors, Train workers and the driver set them here through ``ray.util.metrics`` Gauges; Ray's
metrics agent on each node exports them to Prometheus with the ``ray_`` prefix
(``ray_ptmst_matching_loss{phase="phase0",trial=""}``); the Grafana dashboard
``cluster/grafana/ptmst-ray.json`` plots every one of them (tests check both lists agree).
Metrics never fail the work they describe: without ``ray[default]`` (no metrics agent) they are no-ops.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Metric:
    name: str
    description: str
    tags: tuple[str, ...]


PHASE_TAGS = ("phase", "trial")
"""A phase's metrics carry its name and its sweep trial (empty outside a sweep)."""

MATCHING_LOSS = Metric("ptmst_matching_loss", "PTM-ST matching loss of a phase (last reported iteration)", PHASE_TAGS)
ALPHA_IMG = Metric("ptmst_alpha_img", "Learned student step size of the image tower (phase)", PHASE_TAGS)
ALPHA_TXT = Metric("ptmst_alpha_txt", "Learned student step size of the text tower (phase)", PHASE_TAGS)
SEC_PER_ITER = Metric("ptmst_sec_per_iter", "Seconds per distillation iteration (phase)", PHASE_TAGS)
PHASE_ITERATION = Metric("ptmst_phase_iteration", "Distillation iteration reached (phase)", PHASE_TAGS)
PHASE_RECALL = Metric("ptmst_phase_recall_r_mean", "Mean retrieval recall (%) of the phase subset, when measured",
                      PHASE_TAGS)
EXPERT_LOSS = Metric("ptmst_expert_epoch_loss", "Training loss of an expert's last epoch", ("expert",))
EXPERT_EPOCH = Metric("ptmst_expert_epoch", "Epochs an expert has trained", ("expert",))
STAGE = Metric("ptmst_stage", "1 while a pipeline stage runs, 0 once it ended", ("stage", "run"))

ALL = (MATCHING_LOSS, ALPHA_IMG, ALPHA_TXT, SEC_PER_ITER, PHASE_ITERATION, PHASE_RECALL, EXPERT_LOSS, EXPERT_EPOCH,
       STAGE)
"""Every metric the pipeline exports (Prometheus adds the ``ray_`` prefix)."""

PROMETHEUS_PREFIX = "ray_"

_gauges: dict[str, object] = {}


def _gauge(metric: Metric):
    if metric.name not in _gauges:
        try:
            from ray.util.metrics import Gauge

            _gauges[metric.name] = Gauge(metric.name, description=metric.description, tag_keys=metric.tags)
        except Exception as e:  # noqa: BLE001 - metrics export is optional (needs ray[default])
            log.debug("no Ray metrics: %s", e)
            _gauges[metric.name] = None
    return _gauges[metric.name]


def set_metric(metric: Metric, value: float, **tags: str) -> None:
    """Set ``metric`` to ``value`` for ``tags`` (missing tag keys are empty); never raises."""
    gauge = _gauge(metric)
    if gauge is None:
        return
    try:
        gauge.set(float(value), tags={k: str(tags.get(k, "")) for k in metric.tags})
    except Exception as e:  # noqa: BLE001 - a metric must never fail the work it describes
        log.debug("metric %s not set: %s", metric.name, e)


def phase_metrics(metrics: dict, phase: str, trial: str = "") -> None:
    """Export one phase report (the dict ``distill_phase`` reports) as the phase's gauges."""
    for metric, key in ((MATCHING_LOSS, "loss"), (ALPHA_IMG, "alpha_img"), (ALPHA_TXT, "alpha_txt"),
                        (SEC_PER_ITER, "sec_per_iter"), (PHASE_ITERATION, "iteration"),
                        (PHASE_RECALL, "recall/r_mean")):
        value = metrics.get(key)
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            set_metric(metric, value, phase=phase, trial=trial)


def expert_metrics(expert_id: int, epoch: int, stats: dict) -> None:
    """Export an expert's epoch: its loss and the epochs done."""
    tag = expert_tag(expert_id)
    set_metric(EXPERT_EPOCH, epoch, expert=tag)
    if isinstance(stats.get("loss"), (int, float)):
        set_metric(EXPERT_LOSS, stats["loss"], expert=tag)


def expert_tag(expert_id: int) -> str:
    """An expert's name in the dashboard: its task name and its metrics' ``expert`` tag."""
    return f"expert-{expert_id:04d}"


_current_stage: list = [None]


def stage_started(stage: str, run: str) -> None:
    """Mark ``stage`` (a :data:`ptmst_ray.vocab.STAGES` word) as running for ``run`` (its root) and the
    previous one as ended: ``ptmst_stage`` is 1 for exactly the stage in progress. ``stage=""`` ends all."""
    previous = _current_stage[0]
    if previous is not None and previous != (stage, run):
        set_metric(STAGE, 0, stage=previous[0], run=previous[1])
    _current_stage[0] = (stage, run) if stage else None
    if stage:
        set_metric(STAGE, 1, stage=stage, run=run)
