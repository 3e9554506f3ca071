"""The `ptmst-ray` command line (installed as the package ptmst_ray_cli)."""
