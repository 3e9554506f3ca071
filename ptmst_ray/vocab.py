"""The project's vocabularies, each defined once: stage names, evaluation methods, metric names,
gradient rules, loss names and the dashboard port.

Why this file exists: these words are shared by the config checks, the stages, the Ray layer, the
CLI's tables and the benchmarks. Each list lives here and everything else imports it, so adding a
method or a metric is a one-line change. Nothing here imports the rest of the project.
"""

from __future__ import annotations

STAGES = ("data", "pretrain", "embed", "experts", "shortcut", "phases", "aggregate", "eval")
"""The pipeline's stages in order; ``ptmst-ray run --rebuild STAGE`` takes one of these."""

PTM_ST = "ptm_st"
"""The distilled set itself (all phase subsets), as an evaluation method."""
SINGLE_PHASE = "single_phase"
"""The single-phase (LoRS-style) baseline: one subset of the same total budget over one teacher range."""
BASELINES = ("random", SINGLE_PHASE, "full")
"""Baselines ``eval.baselines`` may list: a random real coreset, single-phase distillation, full data."""
METHODS = (PTM_ST, *BASELINES)
"""Everything `ptmst-ray eval -m` can score."""

RECALLS = ("IR@1", "IR@5", "IR@10", "TR@1", "TR@5", "TR@10")
"""Image retrieval (caption -> image) and text retrieval (image -> caption) recall at 1/5/10, in percent."""
METRICS = (*RECALLS, "r_mean")
"""The six recalls and their mean, as every results table reports them."""

GRAD_METHODS = ("first_order", "exact", "unrolled")
"""Meta-gradient rules of the matching step (docs/method.md#gradient-rules)."""

LOSS_NAMES = ("WBCE", "InfoNCE", "BCE", "KL", "MSE", "CWCL")
"""Contrastive losses (docs/method.md#losses)."""

DASHBOARD_PORT = 8265
"""Ray's default dashboard port; `ray dashboard CLUSTER_YAML` forwards a cluster's to it."""
