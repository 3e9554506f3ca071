"""`python -m ptmst_ray_cli` runs the CLI (used by tests and by Ray Jobs without the console script)."""

from ptmst_ray_cli.main import app

app(prog_name="ptmst-ray")
