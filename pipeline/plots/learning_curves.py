"""Learning curves: the validation loss of the raw weights and of the 2TA averages, and the training loss."""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.plots.common import (
    VALID_SERIES,
    History,
    Unit,
    check_unit,
    new_figure,
    no_data,
    save_figure,
    unit_series,
)

__all__ = [
    "WARMUP_FRACTION",
    "plot_learning_curves",
    "plot_learning_curves_figure",
]

WARMUP_FRACTION = 0.1
"""The training loss logged in the first this fraction of the steps (or before the first evaluation,
if that comes earlier) may run off the top of the learning curves; every later point is shown."""


def _warmup_end(train_steps: Sequence[int], valid_steps: Sequence[int]) -> float:
    """The step from which every training point must be visible (see :data:`WARMUP_FRACTION`).

    Without validation points there is nothing to zoom on: every training point is shown.
    """
    if not train_steps or not valid_steps:
        return -math.inf
    return min(valid_steps[0], WARMUP_FRACTION * train_steps[-1])


def _learning_ylim(ax: Axes, shown: Sequence[float], everything: Sequence[float]) -> None:
    """A y range holding every value in ``shown`` (validation, training after warm-up) and whatever
    else lies below their top (the early training loss, ~log(vocab) nats at step 0, may run off it)."""
    if not shown or not everything:
        return
    low, high = min(everything), max(shown)
    if not high > low:
        return
    margin = 0.08 * (high - low)
    ax.set_ylim(low - margin, high + margin)


def _unit_label(unit: Unit) -> str:
    return "bits per character (bpc)" if unit == "char" else "perplexity (exp of nats per word)"


def plot_learning_curves_figure(history: History, *, unit: Unit, title: str = "") -> Figure:
    """Validation loss of the raw, short-average and long-average (2TA) weights and the training loss
    against the optimizer step, with the loss 2TA reports marked.

    ``history``: metric name -> ``[(step, value), ...]`` as logged by the train stage (names in the
    :mod:`pipeline.plots` docstring). ``unit``: ``"char"`` shows bits per character, ``"word"`` perplexity. The y
    range holds every validation point and every training point from the end of the warm-up on
    (:data:`WARMUP_FRACTION`); earlier training points above that run off the top, and a note (gid
    ``train-clipped``) says up to which step and value. Lines carry a ``gid`` (``train``,
    ``valid/raw``, ``valid/short``, ``valid/long``, ``valid/reported``) and hold the plotted values in
    the display unit.
    """
    check_unit(unit)
    fig = new_figure(9, 5)
    ax = fig.add_subplot()
    plotted: list[float] = []
    validation: list[float] = []
    valid_steps: set[int] = set()
    train_steps, train_values = unit_series(history, "train", unit)
    if train_steps:
        ax.plot(train_steps, train_values, color="tab:green", alpha=0.45, linewidth=1, label="train (with dropout)",
                gid="train")
        plotted += train_values
    for stem, label, colour, style in VALID_SERIES:
        steps, values = unit_series(history, stem, unit)
        if steps:
            ax.plot(steps, values, color=colour, linestyle=style, marker=".", markersize=4, label=label,
                    gid=f"valid/{stem}")
            plotted += values
            validation += values
            valid_steps.update(steps)
    steps, values = unit_series(history, "reported", unit)
    suffix = " bpc" if unit == "char" else " ppl"
    if steps:
        ax.plot(steps, values, linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                markeredgecolor="black", label="valid: reported weights", gid="valid/reported")
        plotted += values
        validation += values
        valid_steps.update(steps)
        last = values[-1]
        ax.annotate(
            f"reported {last:.4g}{suffix}", xy=(steps[-1], last),
            xytext=(-10, 18), textcoords="offset points", ha="right", fontsize=9,
            arrowprops=dict(arrowstyle="->", color="black"), gid="reported-annotation",
        )
    if plotted:
        warmup_end = _warmup_end(train_steps, sorted(valid_steps))
        after_warmup = [v for step, v in zip(train_steps, train_values) if step >= warmup_end]
        _learning_ylim(ax, validation + after_warmup, plotted)
        clipped = [(step, v) for step, v in zip(train_steps, train_values) if v > ax.get_ylim()[1]]
        if clipped:
            # Say what is not shown rather than let the curve silently leave the plot.
            first, last = clipped[0][0], clipped[-1][0]
            ax.text(0.01, 0.99, f"early train loss (step {first}" + (f"-{last}" if last != first else "") +
                    f", up to {max(v for _, v in clipped):.3g}{suffix}) runs off the top", transform=ax.transAxes,
                    ha="left", va="top", fontsize=8, color="tab:green", gid="train-clipped")
        ax.legend(loc="upper right", fontsize=9)
        ax.grid(True, alpha=0.3)
    else:
        no_data(ax)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_unit_label(unit))
    ax.set_title(title or "Learning curves")
    return fig


def plot_learning_curves(history: History, path: str | Path, *, unit: Unit, title: str = "") -> Path:
    """Write :func:`plot_learning_curves_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_learning_curves_figure(history, unit=unit, title=title), path)

