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
    """Matching loss against iteration per phase; the phase's own recall against iteration when
    ``distill.recall_every`` was set; r_mean per method."""
    plt = _figure()
    recall = {n: [h for h in hist if "recall/r_mean" in h] for n, hist in histories.items()}
    with_recall = any(recall.values())
    fig, axes = plt.subplots(1, 3 if with_recall else 2, figsize=(16 if with_recall else 11, 4))
    for name, hist in histories.items():
        if hist:
            its = [h["iteration"] for h in hist]
            axes[0].plot(its, [h["loss"] for h in hist], label=name)
    axes[0].set_xlabel("iteration")
    axes[0].set_ylabel("matching loss M")
    axes[0].set_title("distillation per phase")
    axes[0].legend()
    if with_recall:
        for name, hist in recall.items():
            if hist:
                axes[1].plot([h["iteration"] for h in hist], [h["recall/r_mean"] for h in hist], marker="o", label=name)
        axes[1].set_xlabel("iteration")
        axes[1].set_ylabel("r_mean (%) of the phase subset alone")
        axes[1].set_title("recall during distillation (1 seed)")
        axes[1].legend()
    if results:
        ax = axes[-1]
        methods = results["methods"]
        names = list(methods)
        means = [methods[m]["r_mean"]["mean"] for m in names]
        stds = [methods[m]["r_mean"]["std"] for m in names]
        ax.bar(names, means, yerr=stds, capsize=4)
        ax.set_ylabel("r_mean (%)")
        ax.set_title(f"retrieval (best of points, {results['eval']['seeds']} seeds)")
    _save(fig, url)
    plt.close(fig)
