"""PNG plots of a run: matching loss per phase against iteration, and recall per method."""

from __future__ import annotations

import io
import logging

from ptmst_ray import storage

log = logging.getLogger(__name__)


def _figure():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, url: str) -> None:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110, bbox_inches="tight")
    storage.write_bytes(url, buf.getvalue())


def plot_run(histories: dict[str, list[dict]], results: dict | None, url: str) -> None:
    """Left: matching loss and step size against iteration per phase. Right: r_mean per method."""
    plt = _figure()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, hist in histories.items():
        if hist:
            its = [h["iteration"] for h in hist]
            axes[0].plot(its, [h["loss"] for h in hist], label=name)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("matching loss M")
    axes[0].set_title("distillation per phase")
    axes[0].legend()
    if results:
        methods = results["methods"]
        names = list(methods)
        means = [methods[m]["r_mean"]["mean"] for m in names]
        stds = [methods[m]["r_mean"]["std"] for m in names]
        axes[1].bar(names, means, yerr=stds, capsize=4)
        axes[1].set_ylabel("r_mean (%)")
        axes[1].set_title(f"retrieval (best of points, {results['eval']['seeds']} seeds)")
    _save(fig, url)
    plt.close(fig)
