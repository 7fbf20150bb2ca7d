"""Final metrics: one run's final summary, and runs compared side by side (curves and final values).

Final values are dots on a y axis zoomed to them (not bars from 0), each annotated with its value, so
that close values look different.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.plots.common import (
    LN2,
    Series,
    Unit,
    check_unit,
    nats_to_ppl,
    new_figure,
    no_data,
    save_figure,
    series_points,
)

__all__ = [
    "plot_comparison",
    "plot_comparison_figure",
    "plot_final_summary",
    "plot_final_summary_figure",
]


def _value_text(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def _zoom_y(ax: Axes, values: Sequence[float]) -> None:
    """Fit the y range to ``values`` with a quarter of their spread as margin, not from 0: final bpc of
    2.3554 and 2.3511 must look different (on bars from 0 they look equal)."""
    if not values:
        return
    low, high = min(values), max(values)
    spread = high - low
    margin = 0.25 * spread if spread > 0 else max(abs(high) * 0.01, 1e-3)
    ax.set_ylim(low - margin, high + margin)


def _dot(ax: Axes, x: float, value: float, *, gid: str, colour: str | None = None, marker: str = "o",
         label: str = "_nolegend_", text_side: Literal["left", "right"] = "right") -> None:
    """One final value as a dot (a Line2D with ``gid``) with its value written beside it."""
    (line,) = ax.plot([x], [value], linestyle="none", marker=marker, markersize=8, color=colour, label=label, gid=gid)
    ax.annotate(_value_text(value), xy=(x, value), xytext=(7 if text_side == "right" else -7, 0),
                textcoords="offset points", ha="left" if text_side == "right" else "right", va="center",
                fontsize=8, color=line.get_color(), gid=f"{gid}|value")


# ---------------------------------------------------------------------------------------- final summary


def _final_value(final_metrics: Mapping[str, float], split: str, unit: Unit, tuned: bool) -> float | None:
    """``<split>_bpc[_tuned_temperature]`` (char) / ``<split>_ppl[...]`` (word), else converted from the nll."""
    suffix = "_tuned_temperature" if tuned else ""
    name = "bpc" if unit == "char" else "ppl"
    convert: Callable[[float], float] = (lambda v: v / LN2) if unit == "char" else nats_to_ppl
    for key, fn in ((f"{split}_{name}{suffix}", float), (f"{split}_nll{suffix}", convert)):
        value = final_metrics.get(key)
        if value is not None and math.isfinite(float(value)):
            return fn(float(value))
    return None


def plot_final_summary_figure(final_metrics: Mapping[str, float], *, unit: Unit, title: str = "") -> Figure:
    """Dot plot of valid and test bpc (char) or perplexity (word) at temperature 1 and at the tuned
    softmax temperature, each dot annotated with its value, on a y axis zoomed to the values (not from
    0, so that close values look different).

    ``final_metrics``: :meth:`pipeline.evaluate.EvaluationResult.metrics` (``final/`` prefix
    stripped); ``*_bpc`` / ``*_ppl`` keys are used, or converted from ``*_nll`` when missing. Dots are
    one-point lines with gids ``valid/T=1``, ``valid/tuned``, ``test/T=1``, ``test/tuned``; missing
    values are left out.
    """
    check_unit(unit)
    fig = new_figure(7, 4.5)
    ax = fig.add_subplot()
    temperature = final_metrics.get("temperature")
    tuned_label = "tuned temperature" + (f" (T={float(temperature):.3g})" if temperature is not None else "")
    values: list[float] = []
    for offset, tuned, label, colour, marker in ((-0.12, False, "temperature 1", "tab:blue", "o"),
                                                 (0.12, True, tuned_label, "tab:orange", "D")):
        first = True
        for i, split in enumerate(("valid", "test")):
            value = _final_value(final_metrics, split, unit, tuned)
            if value is not None:
                _dot(ax, i + offset, value, gid=f"{split}/{'tuned' if tuned else 'T=1'}", colour=colour,
                     marker=marker, label=label if first else "_nolegend_", text_side="right" if tuned else "left")
                values.append(value)
                first = False
    ax.set_xticks([0, 1], ["valid", "test"])
    ax.set_xlim(-0.6, 1.6)
    ax.set_ylabel("bits per character (bpc)" if unit == "char" else "perplexity")
    ax.set_title(title or "Final evaluation (reported weights)")
    if values:
        _zoom_y(ax, values)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=9, frameon=False)
    else:
        no_data(ax)
    return fig


def plot_final_summary(final_metrics: Mapping[str, float], path: str | Path, *, unit: Unit, title: str = "") -> Path:
    """Write :func:`plot_final_summary_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_final_summary_figure(final_metrics, unit=unit, title=title), path)


# ------------------------------------------------------------------------------------------- comparison


def plot_comparison_figure(
    curves: Mapping[str, Series],
    finals: Mapping[str, Mapping[str, float]],
    *,
    metric_label: str,
    final_label: str | None = None,
    title: str = "",
) -> Figure:
    """Runs side by side: validation curves overlaid (left) and final metrics as dots (right).

    ``curves``: run label -> ``[(step, value), ...]`` of its validation curve (already in the unit
    ``metric_label`` names, e.g. ``"validation bpc"``); one line per run, labelled and gid'd with the
    run label. ``finals``: run label -> {metric label -> value} (e.g. ``{"valid bpc": 1.41, "test bpc":
    1.38}``): one column of dots per run, one dot per metric (a one-point line with gid
    ``"<run>|<metric>"``), annotated with its value, on a y axis zoomed to the values (not from 0, so
    that close values look different). ``final_label`` is the y label of the dots (default ``metric_label``).
    """
    fig = new_figure(13, 5)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    any_curve = False
    for label, series in curves.items():
        steps, values = series_points(series)
        if steps:
            left.plot(steps, values, marker=".", markersize=4, label=label, gid=label)
            any_curve = True
    left.set_xlabel("optimizer step")
    left.set_ylabel(metric_label)
    left.set_title("Validation curves")
    if any_curve:
        left.legend(fontsize=8)
        left.grid(True, alpha=0.3)
    else:
        no_data(left)

    runs = list(finals)
    metrics: list[str] = []
    for values in finals.values():
        metrics += [m for m in values if m not in metrics]
    width = 0.6 / max(len(metrics), 1)
    markers = "oDs^v<>"
    shown: list[float] = []
    for j, metric in enumerate(metrics):
        first = True
        for i, run in enumerate(runs):
            value = finals[run].get(metric)
            if value is not None and math.isfinite(float(value)):
                _dot(right, i - 0.3 + width * (j + 0.5), float(value), gid=f"{run}|{metric}", colour=f"C{j % 10}",
                     marker=markers[j % len(markers)], label=metric if first else "_nolegend_",
                     text_side="left" if j < len(metrics) / 2 and len(metrics) > 1 else "right")
                shown.append(float(value))
                first = False
    right.set_xticks(range(len(runs)), runs, rotation=15, ha="right", rotation_mode="anchor",
                      fontsize=8)
    right.set_xlim(-0.7, len(runs) - 0.3)
    right.set_ylabel(final_label or metric_label)
    right.set_title("Final metrics")
    if shown:
        _zoom_y(right, shown)
        right.grid(True, axis="y", alpha=0.3)
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=min(len(metrics), 4), fontsize=8,
                     frameon=False)
    else:
        no_data(right)
    if title:
        fig.suptitle(title)
    return fig


def plot_comparison(
    curves: Mapping[str, Series],
    finals: Mapping[str, Mapping[str, float]],
    path: str | Path,
    *,
    metric_label: str,
    final_label: str | None = None,
    title: str = "",
) -> Path:
    """Write :func:`plot_comparison_figure` as a PNG to ``path``; returns the path."""
    fig = plot_comparison_figure(curves, finals, metric_label=metric_label, final_label=final_label, title=title)
    return save_figure(fig, path)
