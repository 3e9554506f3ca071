"""Everything a recipe needs, checked before any work starts (before Ray, before data preparation).

Why this file exists: a run that fails an hour in, on a weights file missing on a worker or an
image size the tower cannot take, wastes the hour and the GPUs. Every command calls :func:`check`
first; each problem is one :class:`~ptmst_ray.config.ConfigError` naming the field, the value and
the fix.
"""

from __future__ import annotations

import logging

from ptmst_ray.config import Config
from ptmst_ray.layout import check_paths
from ptmst_ray.models.requirements import check_model_requirements


def check(cfg: Config, warn=None) -> None:
    """Input paths exist, the run root is writable, and the model can be built as configured.

    ``warn(message)`` receives the checks' warnings (e.g. a CNN image tower at another image size);
    by default they are logged.
    """
    check_paths(cfg)
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
