"""Pipeline stage commands of `ptmst-ray` (each: load config, call the library, show progress)."""

from __future__ import annotations

from ptmst_ray_cli.main import app  # noqa: F401
