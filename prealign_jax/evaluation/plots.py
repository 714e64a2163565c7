"""Plots of an evaluation (`plot_eval`), and the figure helpers the experiment's report
uses too: pyplot on the file-only Agg backend, imported when a plot is drawn (evaluating
or training never pays for matplotlib otherwise), and one way to save a figure."""

from __future__ import annotations

import os

import numpy as np

from prealign_jax import fileio, modes
from prealign_jax.evaluation.judging import ALL, INVALID


def pyplot():
    """`matplotlib.pyplot` drawing to files only (Agg), so plots work without a display."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig, output_dir: str, name: str) -> str:
    """Save a matplotlib figure as `output_dir/name` (PNG; the directory may be a URL) and
    close it; returns the path."""
    path = os.path.join(output_dir, name)
    fig.tight_layout()
    with fileio.gfile().GFile(path, "wb") as f:
        fig.savefig(f, format="png", dpi=110)
    pyplot().close(fig)
    return path


def plot_eval(report: dict, output_dir: str) -> list[str]:
    """heldout_loss.png (NLL per token group) and misaligned.png (misaligned rate per
    sample set and mode) of an eval.json `report`; returns their paths."""
    plt = pyplot()
    paths = []
    heldout = report["heldout"]
    groups = [g for g in modes.GROUPS if f"loss/{g}" in heldout]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.bar(groups, [heldout[f"loss/{g}"] for g in groups], color="tab:blue")
    ax.set_ylabel("held-out NLL (nats/token)")
    ax.set_title(f"held-out loss per token group (step {report['step']})")
    paths.append(save_figure(fig, output_dir, "heldout_loss.png"))

    sets = report["samples"]
    keys = [k for k in (*modes.MODES, INVALID, ALL)
            if any(k in r["misaligned"] for r in sets.values())]
    fig, ax = plt.subplots(figsize=(8, 3.8))
    width = 0.8 / len(keys)
    for i, k in enumerate(keys):
        ax.bar(np.arange(len(sets)) + i * width,
               [r["misaligned"].get(k, {"rate": 0.0})["rate"] for r in sets.values()],
               width, label=k)
    ax.set_xticks(np.arange(len(sets)) + width * (len(keys) - 1) / 2, list(sets),
                  rotation=20)
    ax.set_ylabel("samples with misaligned text")
    ax.set_title("misaligned-content rate per sample set, by mode of the text")
    ax.legend(fontsize=8)
    paths.append(save_figure(fig, output_dir, "misaligned.png"))
    return paths
