"""Plots of a pipeline run and of a comparison of runs, as PNG files.

Pure functions of plain data (no MLflow, no torch): each ``plot_*`` writes one PNG and returns its
path; each has a ``plot_*_figure`` twin that only builds the :class:`matplotlib.figure.Figure`
(tests and notebooks inspect its Axes). Figures are created with :class:`~matplotlib.figure.Figure`
on an Agg canvas, never through :mod:`matplotlib.pyplot`: no global figure registry, no backend
switch, nothing left open after a call.

The data is what the pipeline logs to MLflow (see :mod:`pipeline.train` and :mod:`pipeline.evaluate`):

* a *history* maps a metric name to its ``(step, value)`` points, ``step`` being the optimizer
  step: ``train/loss`` (nats per token, with dropout) at every log step; at every evaluation
  ``valid/raw_loss``, ``valid/short_loss``, ``valid/long_loss`` (nats per token of the raw weights
  and of the short and long Two-Tailed Averaging averages; short / long may be missing at an
  evaluation), ``valid/reported_loss`` (the loss of the weights 2TA reports), their ``*_bpc`` twins
  for character-level data, and ``averaging/short_length`` (S) / ``averaging/long_length`` (L);
* *final metrics* are the keys of :meth:`pipeline.evaluate.EvaluationResult.metrics` without the
  ``final/`` prefix: ``valid_bpc``, ``test_bpc_tuned_temperature``, ``valid_ppl``, ``temperature``, ...

Any series may be missing or empty, and non-finite values are skipped: the plot shows what there is
(an empty plot says "no data").
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "History",
    "Series",
    "Unit",
    "plot_averaging_lengths",
    "plot_averaging_lengths_figure",
    "plot_comparison",
    "plot_comparison_figure",
    "plot_final_summary",
    "plot_final_summary_figure",
    "plot_learning_curves",
    "plot_learning_curves_figure",
    "save_figure",
]

Series = Sequence[tuple[int, float]]
"""``(step, value)`` points of one metric."""
History = Mapping[str, Series]
"""Metric name (``valid/raw_loss``, ``averaging/long_length``, ...) -> its points."""
Unit = Literal["char", "word"]
"""``char``: losses shown as bits per character; ``word``: as perplexity."""

LN2 = math.log(2.0)
DPI = 100
_NO_DATA = "no data"

# (gid / metric stem, legend label, colour, line style) of the validation curves.
_VALID_SERIES = (
    ("raw", "valid: raw weights", "tab:gray", "-"),
    ("short", "valid: short average (S)", "tab:orange", "-"),
    ("long", "valid: long average (L, 2TA)", "tab:blue", "-"),
)


def _points(series: Iterable[tuple[int, float]] | None) -> tuple[list[int], list[float]]:
    """Steps and values sorted by step, the last value kept per step, non-finite values dropped."""
    by_step: dict[int, float] = {}
    for step, value in series or ():
        try:
            value = float(value)
        except (TypeError, ValueError):
            continue
        if math.isfinite(value):
            by_step[int(step)] = value
    steps = sorted(by_step)
    return steps, [by_step[s] for s in steps]


def _nats_to_ppl(nats: float) -> float:
    return math.exp(min(nats, 700.0))  # exp(>709) overflows a float


def _unit_series(history: History, stem: str, unit: Unit) -> tuple[list[int], list[float]]:
    """``valid/<stem>`` (or ``train/loss``) in the display unit: bpc for char, perplexity for word.

    For char the logged ``*_bpc`` series is used when present, else the ``*_loss`` one is converted.
    """
    if stem == "train":
        loss_key, bpc_key = "train/loss", "train/bpc"
    else:
        loss_key, bpc_key = f"valid/{stem}_loss", f"valid/{stem}_bpc"
    if unit == "char":
        steps, values = _points(history.get(bpc_key))
        if steps:
            return steps, values
        steps, values = _points(history.get(loss_key))
        return steps, [v / LN2 for v in values]
    steps, values = _points(history.get(loss_key))
    return steps, [_nats_to_ppl(v) for v in values]


def _unit_label(unit: Unit) -> str:
    return "bits per character (bpc)" if unit == "char" else "perplexity (exp of nats per word)"


def _check_unit(unit: str) -> None:
    if unit not in ("char", "word"):
        raise ValueError(f"unit must be 'char' (bits per character) or 'word' (perplexity), not {unit!r}")


def _new_figure(width: float, height: float) -> Figure:
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _no_data(ax: Axes) -> None:
    ax.text(0.5, 0.5, _NO_DATA, transform=ax.transAxes, ha="center", va="center", color="0.4", gid="no-data")


def _focus_ylim(ax: Axes, focus: Sequence[float], everything: Sequence[float]) -> None:
    """Fit the y range to the ``focus`` values (validation) plus whatever else lies below them.

    The early training loss (~log(vocab) nats at step 0) would otherwise flatten the validation
    curves that matter; it simply runs off the top of the plot.
    """
    if not focus or not everything:
        return
    low, high = min(everything), max(focus)
    if not high > low:
        return
    margin = 0.08 * (high - low)
    ax.set_ylim(low - margin, high + margin)


def _bar_value(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path


# --------------------------------------------------------------------------------------- learning curves


def plot_learning_curves_figure(history: History, *, unit: Unit, title: str = "") -> Figure:
    """Validation loss of the raw, short-average and long-average (2TA) weights and the training loss
    against the optimizer step, with the loss 2TA reports marked.

    ``history``: metric name -> ``[(step, value), ...]`` as logged by the train stage (names in the
    module docstring). ``unit``: ``"char"`` shows bits per character, ``"word"`` perplexity. The y
    range fits the validation curves (the early training loss runs off the top). Lines carry a ``gid`` (``train``, ``valid/raw``, ``valid/short``, ``valid/long``,
    ``valid/reported``) and hold the plotted values in the display unit.
    """
    _check_unit(unit)
    fig = _new_figure(9, 5)
    ax = fig.add_subplot()
    plotted: list[float] = []
    validation: list[float] = []
    steps, values = _unit_series(history, "train", unit)
    if steps:
        ax.plot(steps, values, color="tab:green", alpha=0.45, linewidth=1, label="train (with dropout)", gid="train")
        plotted += values
    for stem, label, colour, style in _VALID_SERIES:
        steps, values = _unit_series(history, stem, unit)
        if steps:
            ax.plot(steps, values, color=colour, linestyle=style, marker=".", markersize=4, label=label,
                    gid=f"valid/{stem}")
            plotted += values
            validation += values
    steps, values = _unit_series(history, "reported", unit)
    if steps:
        ax.plot(steps, values, linestyle="none", marker="o", markersize=7, markerfacecolor="none",
                markeredgecolor="black", label="valid: reported weights", gid="valid/reported")
        plotted += values
        validation += values
        last = values[-1]
        ax.annotate(
            f"reported {last:.4g}" + (" bpc" if unit == "char" else " ppl"), xy=(steps[-1], last),
            xytext=(-10, 18), textcoords="offset points", ha="right", fontsize=9,
            arrowprops=dict(arrowstyle="->", color="black"), gid="reported-annotation",
        )
    if plotted:
        _focus_ylim(ax, validation, plotted)
        ax.legend(loc="upper right", fontsize=9)
        ax.grid(True, alpha=0.3)
    else:
        _no_data(ax)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_unit_label(unit))
    ax.set_title(title or "Learning curves")
    return fig


def plot_learning_curves(history: History, path: str | Path, *, unit: Unit, title: str = "") -> Path:
    """Write :func:`plot_learning_curves_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_learning_curves_figure(history, unit=unit, title=title), path)


# ------------------------------------------------------------------------------------ averaging lengths


def plot_averaging_lengths_figure(history: History, title: str = "") -> Figure:
    """The 2TA averaging lengths over the evaluations (thesis Fig. 3.4), with the averages' losses.

    Top panel: L (``averaging/long_length``) and S (``averaging/short_length``), in iterates, as step
    plots against the optimizer step (gids ``long_length`` / ``short_length``). Bottom panel, same x
    axis: validation loss of the long and short averages and of the raw weights (gids
    ``valid/long`` ...), in bpc when ``valid/*_bpc`` is logged, else in nats per token.
    """
    fig = _new_figure(9, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    any_length = False
    for key, label, colour in (
        ("averaging/long_length", "L (long average)", "tab:blue"),
        ("averaging/short_length", "S (short average)", "tab:orange"),
    ):
        steps, values = _points(history.get(key))
        if steps:
            top.step(steps, values, where="post", color=colour, label=label, gid=key.split("/", 1)[1])
            any_length = True
    top.set_ylabel("averaging length\n(iterates)")
    top.set_title(title or "Two-Tailed Averaging: averaging lengths")
    if any_length:
        top.legend(loc="upper left", fontsize=9)
        top.grid(True, alpha=0.3)
    else:
        _no_data(top)

    use_bpc = any(_points(history.get(f"valid/{stem}_bpc"))[0] for stem in ("raw", "short", "long"))
    any_loss = False
    for stem, label, colour, style in _VALID_SERIES:
        if use_bpc:
            steps, values = _unit_series(history, stem, "char")
        else:
            steps, values = _points(history.get(f"valid/{stem}_loss"))
        if steps:
            bottom.plot(steps, values, color=colour, linestyle=style, marker=".", markersize=4, label=label,
                        gid=f"valid/{stem}")
            any_loss = True
    bottom.set_ylabel("validation loss\n" + ("(bpc)" if use_bpc else "(nats per token)"))
    bottom.set_xlabel("optimizer step")
    if any_loss:
        bottom.legend(loc="upper right", fontsize=9)
        bottom.grid(True, alpha=0.3)
    else:
        _no_data(bottom)
    return fig


def plot_averaging_lengths(history: History, path: str | Path, title: str = "") -> Path:
    """Write :func:`plot_averaging_lengths_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_averaging_lengths_figure(history, title=title), path)


# ---------------------------------------------------------------------------------------- final summary


def _final_value(final_metrics: Mapping[str, float], split: str, unit: Unit, tuned: bool) -> float | None:
    """``<split>_bpc[_tuned_temperature]`` (char) / ``<split>_ppl[...]`` (word), else converted from the nll."""
    suffix = "_tuned_temperature" if tuned else ""
    name = "bpc" if unit == "char" else "ppl"
    convert: Callable[[float], float] = (lambda v: v / LN2) if unit == "char" else _nats_to_ppl
    for key, fn in ((f"{split}_{name}{suffix}", float), (f"{split}_nll{suffix}", convert)):
        value = final_metrics.get(key)
        if value is not None and math.isfinite(float(value)):
            return fn(float(value))
    return None


def plot_final_summary_figure(final_metrics: Mapping[str, float], *, unit: Unit, title: str = "") -> Figure:
    """Bar chart of valid and test bpc (char) or perplexity (word) at temperature 1 and at the tuned
    softmax temperature, each bar annotated with its value.

    ``final_metrics``: :meth:`pipeline.evaluate.EvaluationResult.metrics` (``final/`` prefix
    stripped); ``*_bpc`` / ``*_ppl`` keys are used, or converted from ``*_nll`` when missing. Bars
    carry gids ``valid/T=1``, ``valid/tuned``, ``test/T=1``, ``test/tuned``; missing values are left out.
    """
    _check_unit(unit)
    fig = _new_figure(7, 4.5)
    ax = fig.add_subplot()
    temperature = final_metrics.get("temperature")
    tuned_label = "tuned temperature" + (f" (T={float(temperature):.3g})" if temperature is not None else "")
    width = 0.38
    any_bar = False
    for offset, tuned, label, colour in ((-width / 2, False, "temperature 1", "tab:blue"),
                                         (width / 2, True, tuned_label, "tab:orange")):
        xs, heights, gids = [], [], []
        for i, split in enumerate(("valid", "test")):
            value = _final_value(final_metrics, split, unit, tuned)
            if value is not None:
                xs.append(i + offset)
                heights.append(value)
                gids.append(f"{split}/{'tuned' if tuned else 'T=1'}")
        if xs:
            bars = ax.bar(xs, heights, width, label=label, color=colour)
            for bar, gid in zip(bars, gids):
                bar.set_gid(gid)
            ax.bar_label(bars, fmt="%.4f" if unit == "char" else "%.2f", padding=2, fontsize=9)
            any_bar = True
    ax.set_xticks([0, 1], ["valid", "test"])
    ax.set_ylabel("bits per character (bpc)" if unit == "char" else "perplexity")
    ax.set_title(title or "Final evaluation (reported weights)")
    if any_bar:
        ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.1), ncols=2, fontsize=9, frameon=False)
        ax.margins(y=0.12)
    else:
        _no_data(ax)
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
    """Runs side by side: validation curves overlaid (left) and final metrics as bars (right).

    ``curves``: run label -> ``[(step, value), ...]`` of its validation curve (already in the unit
    ``metric_label`` names, e.g. ``"validation bpc"``); one line per run, labelled and gid'd with the
    run label. ``finals``: run label -> {metric label -> value} (e.g. ``{"valid bpc": 1.41, "test bpc":
    1.38}``): one group of bars per run, one bar per metric (gid ``"<run>|<metric>"``), annotated.
    ``final_label`` is the y label of the bars (default ``metric_label``).
    """
    fig = _new_figure(13, 5)
    left, right = fig.subplots(1, 2, width_ratios=(3, 2))
    any_curve = False
    for label, series in curves.items():
        steps, values = _points(series)
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
        _no_data(left)

    runs = list(finals)
    metrics: list[str] = []
    for values in finals.values():
        metrics += [m for m in values if m not in metrics]
    width = 0.8 / max(len(metrics), 1)
    any_bar = False
    for j, metric in enumerate(metrics):
        xs, heights, gids = [], [], []
        for i, run in enumerate(runs):
            value = finals[run].get(metric)
            if value is not None and math.isfinite(float(value)):
                xs.append(i - 0.4 + width * (j + 0.5))
                heights.append(float(value))
                gids.append(f"{run}|{metric}")
        if xs:
            bars = right.bar(xs, heights, width, label=metric)
            for bar, gid in zip(bars, gids):
                bar.set_gid(gid)
            right.bar_label(bars, fmt=_bar_value, padding=2, fontsize=8)
            any_bar = True
    right.set_xticks(range(len(runs)), runs, rotation=15, ha="right", rotation_mode="anchor",
                      fontsize=8)
    right.set_ylabel(final_label or metric_label)
    right.set_title("Final metrics")
    if any_bar:
        right.margins(y=0.12)
        right.legend(loc="upper center", bbox_to_anchor=(0.5, -0.2), ncols=min(len(metrics), 4), fontsize=8,
                     frameon=False)
    else:
        _no_data(right)
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
