"""The averaging lengths of Two-Tailed Averaging over the evaluations (thesis Figs. 3.1 and 3.4).

:class:`TwoTailedLengths` reconstructs, from the logged ``averaging/short_length`` and
``averaging/long_length``, the lengths each evaluation measured and how it adapted them;
:func:`plot_averaging_lengths_figure` draws them above the averages' validation losses.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.figure import Figure

from pipeline.plots.common import (
    VALID_SERIES,
    History,
    new_figure,
    no_data,
    save_figure,
    series_points,
    unit_series,
)

__all__ = [
    "Method",
    "TwoTailedLengths",
    "plot_averaging_lengths",
    "plot_averaging_lengths_figure",
]

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
        short = dict(zip(*series_points(history.get("averaging/short_length"))))
        long = dict(zip(*series_points(history.get("averaging/long_length"))))
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
    fig = new_figure(9, 6)
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
            steps, values = series_points(history.get(f"averaging/{which}_length"))
            if steps:
                top.plot(steps, values, color=colour, marker="o", markersize=4, label=label, gid=f"{which}_length")
                any_length = True
        short = series_points(history.get("averaging/short_length"))[1]
        long = series_points(history.get("averaging/long_length"))[1]
        if short and long and not any(short) and not any(long):
            top.set_title("S = L = 0 at every evaluation: nothing averaged (averaging off, tail averaging not "
                          "started yet, or 2TA re-initialising while the raw weights are better)",
                          fontsize=7.5, loc="left")
    top.set_ylabel("averaging length\n(iterates)")
    _finish_panel(top, any_length)

    use_bpc = any(series_points(history.get(f"valid/{stem}_bpc"))[0] for stem in ("raw", "short", "long"))
    any_loss = False
    for stem, label, colour, style in VALID_SERIES:
        if use_bpc:
            steps, values = unit_series(history, stem, "char")
        else:
            steps, values = series_points(history.get(f"valid/{stem}_loss"))
        if steps:
            bottom.plot(steps, values, color=colour, linestyle=style, marker=".", markersize=4, label=label,
                        gid=f"valid/{stem}")
            any_loss = True
    bottom.set_ylabel("validation loss\n" + ("(bpc)" if use_bpc else "(nats per token)"))
    bottom.set_xlabel("optimizer step")
    _finish_panel(bottom, any_loss)
    return fig


def _finish_panel(ax: Axes, has_data: bool) -> None:
    """A legend outside the axes (the sawtooth fills the panel from corner to corner) and a grid; or "no data"."""
    if has_data:
        ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
        ax.grid(True, alpha=0.3)
    else:
        no_data(ax)


def plot_averaging_lengths(history: History, path: str | Path, title: str = "", *,
                           method: Method | None = None) -> Path:
    """Write :func:`plot_averaging_lengths_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_averaging_lengths_figure(history, title=title, method=method), path)

