"""Data fit against latent usage: the runs of each group and their Pareto frontiers (thesis §5.7).

x = mutual information I(X; Z) (nats, higher is better), y = NLL (nats per token, lower is better).
Every run is a point, one colour and marker per group; the points a run of the same group dominates
are faded, the group's frontier (:func:`pipeline.pareto.frontier.frontier_mask`) is opaque and
joined in order of mutual information. :func:`write_frontier_csv` writes the same points as a table.
"""

from __future__ import annotations

import csv
import math
from collections.abc import Iterable
from pathlib import Path

from matplotlib.colors import to_rgba
from matplotlib.figure import Figure

from pipeline.pareto.frontier import FrontierPoint, frontier_mask
from pipeline.plots.common import new_figure, no_data, save_figure

__all__ = [
    "DOMINATED_ALPHA",
    "FRONTIER_CSV_COLUMNS",
    "plot_pareto",
    "plot_pareto_figure",
    "write_frontier_csv",
]

DOMINATED_ALPHA = 0.25
"""Opacity of a dominated point (frontier points are opaque)."""
FRONTIER_CSV_COLUMNS = ("group", "label", "mutual_information", "nll", "on_frontier")
"""The first columns of :func:`write_frontier_csv`; the points' ``extra`` keys follow, sorted."""

_MARKERS = ("o", "s", "^", "D", "v", "P", "X", "*", "<", ">")


def _by_group(points: Iterable[FrontierPoint]) -> dict[str, list[tuple[FrontierPoint, bool]]]:
    """Group -> its points, each with whether it is on the group's frontier; groups sorted, and in
    each group the frontier points first, each part by increasing mutual information (then NLL), and
    points with a non-finite coordinate last."""
    groups: dict[str, list[FrontierPoint]] = {}
    for point in points:
        groups.setdefault(point.group, []).append(point)
    out: dict[str, list[tuple[FrontierPoint, bool]]] = {}
    for name in sorted(groups):
        members = groups[name]
        mask = frontier_mask([p.mutual_information for p in members], [p.nll for p in members])
        flagged = list(zip(members, mask))
        out[name] = sorted(flagged, key=_row_order)
    return out


def _finite(point: FrontierPoint) -> bool:
    return math.isfinite(point.mutual_information) and math.isfinite(point.nll)


def _row_order(flagged: tuple[FrontierPoint, bool]) -> tuple[bool, bool, float, float]:
    """Frontier first, then by mutual information and NLL; points with a non-finite coordinate last,
    in their input order (NaN does not sort)."""
    point, on = flagged
    if not _finite(point):
        return (True, True, 0.0, 0.0)
    return (not on, False, point.mutual_information, point.nll)


def plot_pareto_figure(points: Iterable[FrontierPoint], *, title: str = "", highlight: str | None = None) -> Figure:
    """NLL against mutual information, one colour and marker per group, frontiers joined.

    Each group's points are one scatter (gid ``pareto-group-<group>``; frontier points opaque,
    dominated ones at :data:`DOMINATED_ALPHA`); its frontier, by increasing mutual information, is a
    stepped line through them (gid ``pareto-frontier-<group>``, the group's legend entry: a point
    below and left of the steps would be a new frontier point). ``highlight``: the ``label`` of a run
    whose point(s) get a ring (gid ``pareto-highlight``) and a "this run" annotation. Points with a
    non-finite coordinate are not drawn; nothing to draw says "no data".
    """
    fig = new_figure(8, 6)
    ax = fig.add_subplot()
    ax.set_xlabel("mutual information I(X; Z) (nats)")
    ax.set_ylabel("NLL (nats per token)")
    ax.set_title(title or "NLL vs latent usage: Pareto frontiers per group")
    groups = _by_group(points)
    ringed: list[FrontierPoint] = []
    drawn = False
    for index, (group, flagged) in enumerate(groups.items()):
        shown = [(p, on) for p, on in flagged if _finite(p)]
        if not shown:
            continue
        colour, marker = f"C{index % 10}", _MARKERS[index % len(_MARKERS)]
        rgba = [to_rgba(colour, 1.0 if on else DOMINATED_ALPHA) for _, on in shown]
        ax.scatter([p.mutual_information for p, _ in shown], [p.nll for p, _ in shown], s=36, marker=marker,
                   c=rgba, edgecolors=rgba, label="_nolegend_", gid=f"pareto-group-{group}", zorder=3)
        frontier = sorted((p for p, on in shown if on), key=lambda p: (p.mutual_information, p.nll))
        ax.plot([p.mutual_information for p in frontier], [p.nll for p in frontier], color=colour, marker=marker,
                markersize=6, linewidth=1.2, drawstyle="steps-pre", label=f"{group} ({len(frontier)} of {len(shown)} "
                "on the frontier)", gid=f"pareto-frontier-{group}", zorder=2)
        if highlight:
            ringed += [p for p, _ in shown if p.label == highlight]
        drawn = True
    if not drawn:
        no_data(ax)
        return fig
    if ringed:
        ax.scatter([p.mutual_information for p in ringed], [p.nll for p in ringed], s=260, facecolors="none",
                   edgecolors="black", linewidths=1.5, label="_nolegend_", gid="pareto-highlight", zorder=4)
        first = ringed[0]
        ax.annotate("this run", xy=(first.mutual_information, first.nll), xytext=(14, 14),
                    textcoords="offset points", fontsize=9, arrowprops=dict(arrowstyle="->", color="black"),
                    gid="pareto-highlight-annotation")
    legend = ax.legend(fontsize=8, loc="best", title="group (faded: dominated)", title_fontsize=8)
    legend.set_gid("pareto-legend")
    ax.grid(True, alpha=0.3)
    return fig


def plot_pareto(points: Iterable[FrontierPoint], path: str | Path, *, title: str = "",
                highlight: str | None = None) -> Path:
    """Write :func:`plot_pareto_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_pareto_figure(points, title=title, highlight=highlight), path)


def write_frontier_csv(points: Iterable[FrontierPoint], path: str | Path) -> Path:
    """The points as a CSV table at ``path`` (parent folders created); returns the path.

    Columns: :data:`FRONTIER_CSV_COLUMNS` (``on_frontier`` is ``True`` / ``False``), then the union of
    the points' ``extra`` keys, sorted (empty where a point lacks one; a key named like one of the
    first columns is left out: that column holds the point's own value). One row per point: groups
    sorted, and in each group its frontier points first, each part by increasing mutual information
    (points with a non-finite coordinate last).
    Floats are written exactly (``repr``), so they read back equal. No points: the header only.
    """
    groups = _by_group(points)
    extra_keys = sorted({key for flagged in groups.values() for p, _ in flagged for key in p.extra}
                        - set(FRONTIER_CSV_COLUMNS))
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow([*FRONTIER_CSV_COLUMNS, *extra_keys])
        for group, flagged in groups.items():
            for point, on in flagged:
                writer.writerow([group, point.label, repr(float(point.mutual_information)), repr(float(point.nll)),
                                 str(on), *(point.extra.get(key, "") for key in extra_keys)])
    return path
