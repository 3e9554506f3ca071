"""ptmst_ray: multimodal dataset distillation with PTM-ST (phased teachers, shortcut trajectories) on Ray."""

import atexit as _atexit
import gc as _gc

__version__ = "0.1.0"

_atexit.register(_gc.freeze)
"""Every process that imports this package skips CPython's last garbage collection at exit.

A process that has imported torch, open_clip and transformers tracks millions of objects, and the collection
the interpreter runs as it exits walks all of them: about a second of CPU in every such process that ends
normally, which here means every Ray worker that leaves on its own (the process of its own that Ray gives a GPU task
and ends after it; actors and Train's workers are ended by ``ray.kill`` and never ran it) and every ``ptmst-ray``
command (bench/RESULTS.md "Process exit"). Freezing them as the first
exit handler runs moves them to the permanent generation, which that collection skips. Reference counting still
frees what it frees, and every exit handler (Ray's shutdown, logging's flush, weakref finalizers) still runs; what
is left uncollected is garbage in reference cycles, which the operating system takes back with the process."""
