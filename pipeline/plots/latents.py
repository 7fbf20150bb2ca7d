"""Where a sentence VAE puts its sentences: posterior means projected to 2-D, coloured by label.

For corpora with a label per sentence (``sentences`` with a TAB label column, e.g. the author of a
tweet as in Daly's politicians) the evaluation draws the validation sentences' posterior means
``E_q[z|x]`` in two panels side by side: projected on their first two principal components (linear:
distances along the axes mean something) and embedded by t-SNE (non-linear, as Daly did: clusters
show, but distances between clusters and the axes mean nothing). One colour per label (the most
frequent labels; the rest grouped as "other"); without labels every point has one colour. A model
that ignores its latents puts every sentence in one blob.

t-SNE is O(N^2): at most ``max_points`` sentences, drawn with a seeded generator, are embedded, and
the embedding is seeded too, so the same means give the same plot.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.plots.common import new_figure, no_data, save_figure

__all__ = [
    "LATENT_METHODS",
    "MAX_LABELS",
    "MAX_TSNE_POINTS",
    "MIN_TSNE_POINTS",
    "TSNE_PERPLEXITY",
    "plot_latent_means",
    "plot_latent_means_figure",
    "principal_components",
    "tsne_embedding",
]

MAX_LABELS = 10  # labels with their own colour; the rest are "other"
LATENT_METHODS = ("pca", "tsne")
"""The projections :func:`plot_latent_means` can draw, one panel each."""
MAX_TSNE_POINTS = 2000
"""Default cap on the sentences t-SNE embeds (it is O(N^2) in time and memory)."""
MIN_TSNE_POINTS = 5
"""Below this many points the t-SNE panel says "no data" (:func:`tsne_embedding` refuses them)."""
TSNE_PERPLEXITY = 30.0
"""The t-SNE perplexity (sklearn's default), clipped to ``(N - 1) / 3`` for small N."""

_OTHER = "other"
_OTHER_COLOUR = "0.6"
_UNLABELLED_COLOUR = "tab:blue"
_PANEL_TITLES = {"pca": "PCA", "tsne": "t-SNE"}


def principal_components(points: np.ndarray, k: int = 2) -> np.ndarray:
    """``points`` [N, D] projected on their first ``k`` principal components: [N, k] (zero-padded when D < k)."""
    centred = points - points.mean(axis=0, keepdims=True)
    _, _, vt = np.linalg.svd(centred, full_matrices=False)
    projected = centred @ vt[:k].T
    if projected.shape[1] < k:
        projected = np.pad(projected, ((0, 0), (0, k - projected.shape[1])))
    return projected


def _perplexity(n: int, perplexity: float | None) -> float:
    """``perplexity`` (default :data:`TSNE_PERPLEXITY`) clipped to ``(n - 1) / 3``: each point's
    neighbourhood must fit in the data (sklearn needs perplexity < n)."""
    wanted = TSNE_PERPLEXITY if perplexity is None else float(perplexity)
    if not wanted > 0:
        raise ValueError(f"perplexity must be positive, not {perplexity!r}")
    return min(wanted, (n - 1) / 3)


def tsne_embedding(points: np.ndarray, *, seed: int, perplexity: float | None = None) -> np.ndarray:
    """``points`` [N, D] embedded in 2-D by t-SNE (:class:`sklearn.manifold.TSNE`): [N, 2].

    ``perplexity`` defaults to :data:`TSNE_PERPLEXITY` and is clipped to ``(N - 1) / 3``; the
    embedding starts from the PCA projection (``init="pca"``) with ``random_state=seed``, so the same
    points and seed give the same array. The points are centred and scaled to unit RMS norm first (t-SNE
    does not depend on the scale, but its numerics do: the means of a collapsed VAE differ by ~1e-6).
    All points equal: all zeros (sklearn fails on them). Raises ``ValueError`` for fewer than
    :data:`MIN_TSNE_POINTS` points, points that are not [N, D], or non-finite values.
    """
    from sklearn.manifold import TSNE  # heavy import; only the latent plot needs it
    from threadpoolctl import threadpool_limits  # a dependency of scikit-learn

    points = np.asarray(points, dtype=np.float64)
    if points.ndim != 2:
        raise ValueError(f"points must be [N, D], not of shape {points.shape}")
    n = len(points)
    if n < MIN_TSNE_POINTS:
        raise ValueError(f"t-SNE needs at least {MIN_TSNE_POINTS} points, not {n}")
    if not np.isfinite(points).all():
        raise ValueError("points must be finite")
    centred = points - points.mean(axis=0, keepdims=True)
    scale = float(np.sqrt((centred**2).sum(axis=1).mean()))
    if not scale > 0:
        return np.zeros((n, 2))
    centred /= scale
    if centred.shape[1] < 2:  # init="pca" needs two components
        centred = np.pad(centred, ((0, 0), (0, 2 - centred.shape[1])))
    tsne = TSNE(n_components=2, perplexity=_perplexity(n, perplexity), init="pca", random_state=seed)
    # One OpenMP thread: the Barnes-Hut gradient then sums in one order (the same array every time),
    # and on a busy machine OpenMP threads spinning for a core made it ~20x slower than one thread.
    with threadpool_limits(limits=1, user_api="openmp"):
        return np.asarray(tsne.fit_transform(centred), dtype=np.float64)


def _subsample(n: int, max_points: int, seed: int) -> np.ndarray:
    """Sorted indices of at most ``max_points`` of ``n`` points, drawn without replacement from ``seed``."""
    if n <= max_points:
        return np.arange(n)
    return np.sort(np.random.default_rng(seed).choice(n, size=max_points, replace=False))


def _label_groups(labels: Sequence[str]) -> tuple[np.ndarray, list[str], dict[str, str]]:
    """Each point's shown label (the :data:`MAX_LABELS` most frequent, the rest "other"), the shown
    labels in legend order, and their colours (the same in every panel)."""
    common = [label for label, _ in Counter(labels).most_common(MAX_LABELS)]
    shown = np.array([label if label in common else _OTHER for label in labels], dtype=object)
    order = [label for label in [*common, _OTHER] if (shown == label).any()]
    colours = {label: f"C{i}" for i, label in enumerate(common)}
    colours[_OTHER] = _OTHER_COLOUR
    return shown, order, colours


def _scatter(ax: Axes, xy: np.ndarray, shown: np.ndarray | None, order: Sequence[str], colours: dict[str, str],
             counts: dict[str, int]) -> None:
    """One scatter per label (gid ``label-<label>``), or one for everything (gid ``unlabelled``)."""
    if shown is None:
        ax.scatter(xy[:, 0], xy[:, 1], s=8, alpha=0.7, color=_UNLABELLED_COLOUR, gid="unlabelled")
        return
    for label in order:
        picked = shown == label
        if picked.any():
            ax.scatter(xy[picked, 0], xy[picked, 1], s=8, alpha=0.7, color=colours[label],
                       label=f"{label or '(none)'} ({counts[label]})", gid=f"label-{label}")


def plot_latent_means_figure(means: np.ndarray, labels: Sequence[str] | None, *, title: str = "",
                             methods: Sequence[str] = LATENT_METHODS, seed: int = 0,
                             max_points: int = MAX_TSNE_POINTS) -> Figure:
    """``means`` [N, D] in one panel per method, side by side, one colour per label.

    ``methods``: ``"pca"`` (first two principal components; "no data" below 2 points) and/or
    ``"tsne"`` (:func:`tsne_embedding` of at most ``max_points`` points drawn with ``seed``; "no
    data" below :data:`MIN_TSNE_POINTS`). Each panel has a gid (``latent-pca``, ``latent-tsne``) and
    one scatter per shown label (gid ``label-<label>``; ``label-other`` for the rest). ``labels``
    empty (all ``""``) or ``None``: one colour (gid ``unlabelled``), no legend, and the title says
    "unlabelled". Otherwise the legend (labels with their counts over all ``N`` points) is on the
    first panel. Rows with a non-finite value are left out.
    """
    methods = tuple(methods)
    unknown = [m for m in methods if m not in LATENT_METHODS]
    if not methods or unknown:
        raise ValueError(f"methods must be a non-empty selection of {LATENT_METHODS}, not {methods!r}")
    if max_points < 1:
        raise ValueError(f"max_points must be positive, not {max_points}")
    means = np.asarray(means, dtype=np.float64)
    if means.ndim == 1:
        means = means.reshape(-1, 1)  # one latent dimension
    if means.ndim != 2:
        raise ValueError(f"means must be [N, D], not of shape {means.shape}")
    labels = [""] * len(means) if labels is None else [str(label) for label in labels]
    if len(labels) != len(means):
        raise ValueError(f"{len(means)} means but {len(labels)} labels")
    finite = np.isfinite(means).all(axis=1)
    means = means[finite]
    labels = [label for label, keep in zip(labels, finite) if keep]

    labelled = any(labels)
    shown, order, colours = _label_groups(labels) if labelled else (None, [], {})
    counts = Counter(shown.tolist()) if shown is not None else Counter()
    fig = new_figure(6.0 * len(methods) + 0.4, 5.2)
    default = "posterior means by label" if labelled else "posterior means"
    heading = title or default
    if not labelled and "unlabelled" not in heading:
        heading += " (unlabelled)"
    fig.suptitle(heading)
    legend_on: Axes | None = None
    for index, method in enumerate(methods):
        ax = fig.add_subplot(1, len(methods), index + 1)
        ax.set_gid(f"latent-{method}")
        n = len(means)
        if method == "pca":
            ax.set_title(_PANEL_TITLES[method])
            ax.set_xlabel("principal component 1")
            ax.set_ylabel("principal component 2")
            if n < 2:
                no_data(ax)
                continue
            _scatter(ax, principal_components(means), shown, order, colours, counts)
        else:
            ax.set_xlabel("t-SNE 1")
            ax.set_ylabel("t-SNE 2")
            if n < MIN_TSNE_POINTS:
                ax.set_title(_PANEL_TITLES[method])
                no_data(ax)
                continue
            picked = _subsample(n, max_points, seed)
            perplexity = _perplexity(len(picked), None)
            of = f"{len(picked)} of {n} points, " if len(picked) < n else ""
            ax.set_title(f"{_PANEL_TITLES[method]} ({of}perplexity {perplexity:.3g})")
            xy = tsne_embedding(means[picked], seed=seed)
            _scatter(ax, xy, shown[picked] if shown is not None else None, order, colours, counts)
            ax.set_xticks([])  # t-SNE coordinates mean nothing
            ax.set_yticks([])
        if legend_on is None:
            legend_on = ax
    if labelled and legend_on is not None:
        legend_on.legend(fontsize="small", markerscale=2)
    return fig


def plot_latent_means(means: np.ndarray, labels: Sequence[str] | None, path: str | Path, *, title: str = "",
                      methods: Sequence[str] = LATENT_METHODS, seed: int = 0,
                      max_points: int = MAX_TSNE_POINTS) -> Path:
    """:func:`plot_latent_means_figure` written as a PNG to ``path``."""
    figure = plot_latent_means_figure(means, labels, title=title, methods=methods, seed=seed, max_points=max_points)
    return save_figure(figure, path)
