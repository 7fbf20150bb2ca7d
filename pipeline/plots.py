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
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "History",
    "Method",
    "Series",
    "TwoTailedLengths",
    "Unit",
    "plot_averaging_lengths",
    "plot_averaging_lengths_figure",
    "plot_comparison",
    "plot_comparison_figure",
    "plot_final_summary",
    "plot_final_summary_figure",
    "plot_learning_curves",
    "plot_learning_curves_figure",
    "WARMUP_FRACTION",
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
    range holds every validation point and every training point from the end of the warm-up on
    (:data:`WARMUP_FRACTION`); earlier training points above that run off the top, and a note (gid
    ``train-clipped``) says up to which step and value. Lines carry a ``gid`` (``train``,
    ``valid/raw``, ``valid/short``, ``valid/long``, ``valid/reported``) and hold the plotted values in
    the display unit.
    """
    _check_unit(unit)
    fig = _new_figure(9, 5)
    ax = fig.add_subplot()
    plotted: list[float] = []
    validation: list[float] = []
    valid_steps: set[int] = set()
    train_steps, train_values = _unit_series(history, "train", unit)
    if train_steps:
        ax.plot(train_steps, train_values, color="tab:green", alpha=0.45, linewidth=1, label="train (with dropout)",
                gid="train")
        plotted += train_values
    for stem, label, colour, style in _VALID_SERIES:
        steps, values = _unit_series(history, stem, unit)
        if steps:
            ax.plot(steps, values, color=colour, linestyle=style, marker=".", markersize=4, label=label,
                    gid=f"valid/{stem}")
            plotted += values
            validation += values
            valid_steps.update(steps)
    steps, values = _unit_series(history, "reported", unit)
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
        _no_data(ax)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel(_unit_label(unit))
    ax.set_title(title or "Learning curves")
    return fig


def plot_learning_curves(history: History, path: str | Path, *, unit: Unit, title: str = "") -> Path:
    """Write :func:`plot_learning_curves_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_learning_curves_figure(history, unit=unit, title=title), path)


# ------------------------------------------------------------------------------------ averaging lengths


Method = Literal["two_tailed", "tail", "ema", "none"]
"""``train.averaging.method`` of the run (:class:`pipeline.config.AveragingConfig`)."""


@dataclass(frozen=True)
class TwoTailedLengths:
    """2TA's averaging lengths at each evaluation, before and after it adapted (thesis S', L' and S, L).

    ``short`` / ``long``: S and L as logged (``averaging/*_length``: after the evaluation's switch,
    reset or reinitialisation). ``short_evaluated`` / ``long_evaluated``: S' and L', the lengths the
    evaluation measured -- the logged lengths of the previous evaluation (0 before the first, Algorithm 1
    line 1) plus the optimizer steps since, both averages taking one iterate per step -- or None where
    the logged lengths cannot have come from that (a gap in the history). ``events``: per evaluation
    ``"switch"`` (F^S <= F^L or a stagnating long average: L <- S', S <- 0), ``"short_reset"`` (S <- 0),
    ``"reinit"`` (S, L <- 0, 0: the raw weights were better), ``"none"`` or ``"unknown"``.
    """

    steps: list[int]
    short: list[float]
    long: list[float]
    short_evaluated: list[float | None]
    long_evaluated: list[float | None]
    events: list[str]

    @classmethod
    def from_history(cls, history: History) -> TwoTailedLengths:
        """From ``averaging/short_length`` and ``averaging/long_length`` (evaluations logging both)."""
        short = dict(zip(*_points(history.get("averaging/short_length"))))
        long = dict(zip(*_points(history.get("averaging/long_length"))))
        steps = sorted(set(short) & set(long))
        out = cls(steps, [short[n] for n in steps], [long[n] for n in steps], [], [], [])
        prev_step, prev_s, prev_l = 0, 0.0, 0.0
        # Evaluations come every E steps from step E on; a history starting later (a continuation
        # without its predecessors) does not say what the first evaluation measured.
        from_start = len(steps) < 2 or steps[0] == steps[1] - steps[0]
        for i, (n, s_after, l_after) in enumerate(zip(steps, out.short, out.long)):
            grown = n - prev_step
            s_before, l_before = prev_s + grown, prev_l + grown
            # After adapting, S is S' or 0 and L is L', S' or 0 (Algorithms 1 and 2); anything else means
            # evaluations are missing from the history, and the lengths measured are unknown.
            if (i > 0 or from_start) and grown > 0 and s_after in (s_before, 0) and l_after in (l_before, s_before, 0):
                out.short_evaluated.append(s_before)
                out.long_evaluated.append(l_before)
                if s_after == s_before and l_after == l_before:
                    event = "none"
                elif l_after == 0:
                    event = "reinit"
                elif l_after == s_before:
                    event = "switch"
                else:
                    event = "short_reset"
            else:
                out.short_evaluated.append(None)
                out.long_evaluated.append(None)
                event = "unknown"
            out.events.append(event)
            prev_step, prev_s, prev_l = n, s_after, l_after
        return out

    def looks_two_tailed(self) -> bool:
        """Whether only 2TA can have logged these lengths: S > 0 somewhere, or a switch that shortened L.

        TA and EMA log S = 0 and an L that grows by the steps between evaluations, averaging off logs
        S = L = 0 -- as does 2TA while it reinitialises; those are not taken for 2TA.
        """
        return any(s > 0 for s in self.short) or any(
            event == "switch" and 0 < after < (before or 0)
            for event, after, before in zip(self.events, self.long, self.long_evaluated)
        )

    def path(self, which: Literal["short", "long"]) -> tuple[list[float], list[float]]:
        """The length against the step as a sawtooth (thesis Fig. 3.1): growing by one per step from
        the logged value, up to the evaluated one at the next evaluation, then down to the logged one.
        NaN breaks the line where the growth is unknown."""
        after = self.short if which == "short" else self.long
        before = self.short_evaluated if which == "short" else self.long_evaluated
        xs: list[float] = [0.0]
        ys: list[float] = [0.0]
        for n, b, a in zip(self.steps, before, after):
            if b is None:
                xs += [math.nan, n]
                ys += [math.nan, a]
            else:
                xs += [n, n]
                ys += [b, a]
        return xs, ys


# (event, line style, colour, legend label) of the adaptations marked on the averaging-length plot.
_EVENT_LINES = (
    ("switch", ":", "0.5", "switch (L \u2190 S', S \u2190 0)"),
    ("short_reset", "--", "tab:orange", "short reset (S \u2190 0)"),
    ("reinit", "-.", "tab:red", "reinit (S, L \u2190 0: raw weights better)"),
)


def _event_lines(axes: Sequence[Axes], lengths: TwoTailedLengths) -> None:
    """A vertical line (gid = the event) in every panel at each evaluation that switched, reset or reinitialised."""
    for event, style, colour, label in _EVENT_LINES:
        steps = [n for n, e in zip(lengths.steps, lengths.events) if e == event]
        for ax in axes:
            for i, n in enumerate(steps):
                ax.axvline(n, color=colour, linestyle=style, linewidth=0.8, alpha=0.7, zorder=0, gid=event,
                           label=label if i == 0 and ax is axes[0] else "_nolegend_")


def _lengths_note(lengths: TwoTailedLengths) -> str:
    """Why S drops to 0: the logged lengths are those after each evaluation adapted."""
    lines = [
        "Dots: S and L as logged, after each evaluation adapts; hollow: the lengths it evaluated (S', L').",
        "Between evaluations both grow by one iterate per step; at a switch (F^S \u2264 F^L, dotted line)",
        "the short average becomes the long one and S restarts at 0.",
    ]
    if lengths.short and all(s == 0 for s in lengths.short):
        known = sorted({b for b in lengths.short_evaluated if b is not None})
        at = "" if not known else f" after evaluating S' = {known[0]:.0f}" + (
            f"..{known[-1]:.0f}" if known[-1] != known[0] else "")
        lines.append(f"Here S = 0 at every evaluation: each one switched or reset{at}.")
    return "\n".join(lines)


def plot_averaging_lengths_figure(history: History, title: str = "", *, method: Method | None = None) -> Figure:
    """The 2TA averaging lengths over the evaluations (thesis Figs. 3.1 and 3.4), with the averages' losses.

    Top panel: L (``averaging/long_length``) and S (``averaging/short_length``), in iterates, against
    the optimizer step. The logged values are the lengths *after* each evaluation adapted, so with 2TA
    S is 0 after every switch; the plot therefore also shows the lengths the evaluation measured
    (hollow markers, gids ``long_length_evaluated`` / ``short_length_evaluated``), the growth between
    evaluations (sawtooth lines, gids ``long_length_path`` / ``short_length_path``), the adaptations
    (vertical lines in both panels, gids ``switch``, ``short_reset``, ``reinit``) and a note saying so
    (the panel's title; the figure's title is ``title``). The logged values are markers with gids ``long_length`` / ``short_length``.
    ``method``: the run's ``train.averaging.method``; None infers 2TA from the lengths
    (:meth:`TwoTailedLengths.looks_two_tailed`). For other methods the logged lengths are joined by
    straight lines (TA and EMA grow by one iterate per step).
    Bottom panel, same x axis: validation loss of the long and short averages and of the raw weights
    (gids ``valid/long`` ...), in bpc when ``valid/*_bpc`` is logged, else in nats per token.
    """
    fig = _new_figure(9, 6)
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(1, 1))
    fig.suptitle(title or "Two-Tailed Averaging: averaging lengths")
    lengths = TwoTailedLengths.from_history(history)
    two_tailed = method == "two_tailed" or (method is None and lengths.looks_two_tailed())
    series = (("long", "L (long average)", "tab:blue"), ("short", "S (short average)", "tab:orange"))
    any_length = False
    if two_tailed and lengths.steps:
        for which, label, colour in series:
            xs, ys = lengths.path(which)
            top.plot(xs, ys, color=colour, linewidth=1.2, label=label, gid=f"{which}_length_path")
            after = lengths.short if which == "short" else lengths.long
            before = lengths.short_evaluated if which == "short" else lengths.long_evaluated
            top.plot(lengths.steps, after, linestyle="none", marker="o", markersize=4, color=colour,
                     gid=f"{which}_length")
            known = [(n, b) for n, b in zip(lengths.steps, before) if b is not None]
            top.plot([n for n, _ in known], [b for _, b in known], linestyle="none", marker="o", markersize=6,
                     markerfacecolor="none", markeredgecolor=colour, gid=f"{which}_length_evaluated",
                     label=f"{label.split()[0]}' evaluated (before adapting)")
        _event_lines([top, bottom], lengths)
        top.set_title(_lengths_note(lengths), fontsize=7.5, loc="left")
        any_length = True
    else:
        for which, label, colour in series:
            if which == "short" and method not in (None, "two_tailed"):
                continue  # TA and EMA have no short average (they log S = 0)
            steps, values = _points(history.get(f"averaging/{which}_length"))
            if steps:
                top.plot(steps, values, color=colour, marker="o", markersize=4, label=label, gid=f"{which}_length")
                any_length = True
        short = _points(history.get("averaging/short_length"))[1]
        long = _points(history.get("averaging/long_length"))[1]
        if short and long and not any(short) and not any(long):
            top.set_title("S = L = 0 at every evaluation: nothing averaged (averaging off, tail averaging not "
                          "started yet, or 2TA re-initialising while the raw weights are better)",
                          fontsize=7.5, loc="left")
    top.set_ylabel("averaging length\n(iterates)")
    if any_length:
        # Outside the axes: the sawtooth fills the panel from corner to corner.
        top.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
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
        bottom.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        bottom.grid(True, alpha=0.3)
    else:
        _no_data(bottom)
    return fig


def plot_averaging_lengths(history: History, path: str | Path, title: str = "", *,
                           method: Method | None = None) -> Path:
    """Write :func:`plot_averaging_lengths_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_averaging_lengths_figure(history, title=title, method=method), path)


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
    """Dot plot of valid and test bpc (char) or perplexity (word) at temperature 1 and at the tuned
    softmax temperature, each dot annotated with its value, on a y axis zoomed to the values (not from
    0, so that close values look different).

    ``final_metrics``: :meth:`pipeline.evaluate.EvaluationResult.metrics` (``final/`` prefix
    stripped); ``*_bpc`` / ``*_ppl`` keys are used, or converted from ``*_nll`` when missing. Dots are
    one-point lines with gids ``valid/T=1``, ``valid/tuned``, ``test/T=1``, ``test/tuned``; missing
    values are left out.
    """
    _check_unit(unit)
    fig = _new_figure(7, 4.5)
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
    """Runs side by side: validation curves overlaid (left) and final metrics as dots (right).

    ``curves``: run label -> ``[(step, value), ...]`` of its validation curve (already in the unit
    ``metric_label`` names, e.g. ``"validation bpc"``); one line per run, labelled and gid'd with the
    run label. ``finals``: run label -> {metric label -> value} (e.g. ``{"valid bpc": 1.41, "test bpc":
    1.38}``): one column of dots per run, one dot per metric (a one-point line with gid
    ``"<run>|<metric>"``), annotated with its value, on a y axis zoomed to the values (not from 0, so
    that close values look different). ``final_label`` is the y label of the dots (default ``metric_label``).
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
