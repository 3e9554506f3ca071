"""open_clip, imported without transformers until an HF text tower is built.

Why this file exists: importing open_clip imports transformers (its HF text-tower adapter,
``open_clip.hf_model``, and CoCa's text generation), about 0.7 CPU-s in every process that builds
a tower, on top of the torch and torchvision every such process needs anyway. Only HF text towers
(the paper recipes' BERT) use it; a run starts tens of worker processes that build towers (experts,
phases, evaluation students), most of which never touch the frozen text tower. So the package
imports open_clip through :data:`open_clip` here, which hides transformers during that import, and
:func:`enable_hf_text_towers` loads transformers and re-imports the adapter the first time a
process builds an HF text tower. A process that imported transformers or open_clip before
this module gets them unchanged. CoCa's text generation, which this project does not use, stays
without transformers in a process that imported open_clip here.
"""

from __future__ import annotations

import importlib
import sys
import threading

_lock = threading.Lock()


def _import_open_clip():
    if "open_clip" in sys.modules or "transformers" in sys.modules:
        import open_clip

        return open_clip
    with _lock:
        sys.modules["transformers"] = None  # open_clip's `try: import transformers` takes its fallback
        try:
            import open_clip
        except ImportError:
            open_clip = None
        finally:
            if sys.modules.get("transformers", 0) is None:
                del sys.modules["transformers"]
        if open_clip is None:  # a version that cannot be imported without transformers: import both as they are
            for name in [m for m in sys.modules if m == "open_clip" or m.startswith("open_clip.")]:
                del sys.modules[name]
            import open_clip
    return open_clip


open_clip = _import_open_clip()


def enable_hf_text_towers() -> None:
    """Make open_clip able to build HF text towers in this process (a no-op when it already can).

    Raises ImportError naming transformers when it is not installed."""
    with _lock:
        adapter = sys.modules.get("open_clip.hf_model")
        if adapter is None or getattr(adapter, "transformers", None) is not None:
            return
        import transformers  # noqa: F401  (the adapter's own import below finds it loaded)

        adapter = importlib.reload(adapter)
        open_clip.model.HFTextEncoder = adapter.HFTextEncoder  # what open_clip's text-tower builder calls
