"""Where a sentence VAE puts its sentences: posterior means projected to 2-D, coloured by label.

For corpora with a label per sentence (``sentences`` with a TAB label column, e.g. the author of a
tweet as in Daly's politicians) the evaluation draws the validation sentences' posterior means
``E_q[z|x]`` projected on their first two principal components, one colour per label (the most
frequent labels; the rest grouped as "other"). A model that ignores its latents puts every sentence
in one blob.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.figure import Figure

from pipeline.plots.common import new_figure, no_data, save_figure

__all__ = ["MAX_LABELS", "plot_latent_means", "plot_latent_means_figure", "principal_components"]

MAX_LABELS = 10  # labels with their own colour; the rest are "other"


def principal_components(points: np.ndarray, k: int = 2) -> np.ndarray:
    """``points`` [N, D] projected on their first ``k`` principal components: [N, k] (zero-padded when D < k)."""
    centred = points - points.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:k].T
    if projected.shape[1] < k:
        projected = np.pad(projected, ((0, 0), (0, k - projected.shape[1])))
    return projected


def plot_latent_means_figure(means: np.ndarray, labels: Sequence[str], *, title: str = "") -> Figure:
    """Scatter of ``means`` [N, D] on their first two principal components, one colour per label."""
    fig = new_figure(6.4, 5.2)
    ax = fig.add_subplot()
    ax.set_xlabel("principal component 1")
    ax.set_ylabel("principal component 2")
    ax.set_title(title or "posterior means by label")
    if len(means) < 2:
        no_data(ax)
        return fig
    xy = principal_components(np.asarray(means, dtype=np.float64))
    common = [label for label, _ in Counter(labels).most_common(MAX_LABELS)]
    shown = np.array([label if label in common else "other" for label in labels])
    for label in [*common, "other"]:
        picked = shown == label
        if picked.any():
            ax.scatter(xy[picked, 0], xy[picked, 1], s=8, alpha=0.7, label=f"{label or '(none)'} ({int(picked.sum())})",
                       gid=f"label-{label}")
    ax.legend(fontsize="small", markerscale=2)
    return fig


def plot_latent_means(means: np.ndarray, labels: Sequence[str], path: str | Path, *, title: str = "") -> Path:
    """:func:`plot_latent_means_figure` written as a PNG to ``path``."""
    return save_figure(plot_latent_means_figure(means, labels, title=title), path)
