"""ptmst_ray: multimodal dataset distillation with PTM-ST (phased teachers, shortcut trajectories) on Ray."""

__version__ = "0.1.0"
