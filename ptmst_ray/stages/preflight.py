"""Everything a recipe needs, checked before any work starts (before Ray, before data preparation).

Why this file exists: a run that fails an hour in, on a weights file missing on a worker or an
image size the tower cannot take, wastes the hour and the GPUs. Every command calls :func:`check`
first; each problem is one :class:`~ptmst_ray.config.ConfigError` naming the field, the value and
the fix.
"""

from __future__ import annotations

import logging

from ptmst_ray.config import Config, ConfigError
from ptmst_ray.data.annotations import missing_annotations
from ptmst_ray.layout import check_paths
from ptmst_ray.models.requirements import check_model_requirements


def check_inputs_shared(cfg: Config, models: bool = True) -> None:
    """On a cluster every node reads the inputs and writes the run root: each must be a URL all of them reach.

    A local path (``~/weights/nfnet_l0.safetensors``) passes the driver's own check and then fails on
    every GPU node; this names the field instead, before any work.
    """
    fields = [("run.root", cfg.run.root)]
    if models:  # not for the data commands
        fields += [("model.pretrained", None if cfg.pretrain.enabled else cfg.model.pretrained),
                   ("model.image_pretrained", cfg.model.image_pretrained),
                   ("model.text_pretrained", cfg.model.text_pretrained)]
    if cfg.data.dataset != "builtin":
        fields += [("data.annotations", cfg.data.annotations), ("data.images", cfg.data.images)]
    for name, value in fields:
        if value and "://" not in value and ("/" in value or name.startswith(("run.", "data."))):
            raise ConfigError(name, f"{value} is a path on this machine, but on a cluster every node reads it; "
                                    f"use a URL all nodes reach (--set {name}=s3://BUCKET/...), or a shared "
                                    "file system mounted at the same path with file://")


def check(cfg: Config, warn=None, shared_inputs: bool = False, data_only: bool = False) -> None:
    """Input paths exist, the run root is writable, the model can be built as configured, and, with
    ``shared_inputs`` (the run goes to another machine's cluster), every input is a URL all nodes read.
    With ``data_only`` (`data prepare`) only the data's inputs and the run root: the weights and
    the model may not be there yet when the data is prepared.

    ``warn(message)`` receives the checks' warnings (e.g. a CNN image tower at another image size);
    by default they are logged.
    """
    if shared_inputs:
        check_inputs_shared(cfg, models=not data_only)
    check_paths(cfg, models=not data_only)
    if cfg.data.dataset != "builtin" and cfg.data.annotations:
        problem = missing_annotations(cfg.data.dataset, cfg.data.annotations)
        if problem:
            raise ConfigError("data.annotations", problem)
    if data_only:
        return
    if warn is None:
        check_model_requirements(cfg)
        return
    handler = _Forward(warn)
    logger = logging.getLogger("ptmst_ray.models.requirements")
    logger.addHandler(handler)
    try:
        check_model_requirements(cfg)
    finally:
        logger.removeHandler(handler)


class _Forward(logging.Handler):
    def __init__(self, warn):
        super().__init__(logging.WARNING)
        self.warn = warn

    def emit(self, record: logging.LogRecord) -> None:
        self.warn(record.getMessage())
