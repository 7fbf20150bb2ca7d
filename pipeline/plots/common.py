"""What every plot shares: the data types, display units, figure creation, saving, "no data".

Figures are created with :class:`~matplotlib.figure.Figure` on an Agg canvas (:func:`new_figure`),
never through :mod:`matplotlib.pyplot`, and written by :func:`save_figure`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Literal

from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

__all__ = [
    "DPI",
    "LN2",
    "VALID_SERIES",
    "History",
    "Series",
    "Unit",
    "check_unit",
    "nats_to_ppl",
    "new_figure",
    "no_data",
    "save_figure",
    "series_points",
    "unit_series",
]

Series = Sequence[tuple[int, float]]
"""``(step, value)`` points of one metric."""
History = Mapping[str, Series]
"""Metric name (``valid/raw_loss``, ``averaging/long_length``, ...) -> its points."""
Unit = Literal["char", "word"]
"""``char``: losses shown as bits per character; ``word``: as perplexity."""

LN2 = math.log(2.0)
"""Nats per bit."""
DPI = 100
"""Resolution of every figure and PNG."""
_NO_DATA = "no data"

VALID_SERIES = (
    ("raw", "valid: raw weights", "tab:gray", "-"),
    ("short", "valid: short average (S)", "tab:orange", "-"),
    ("long", "valid: long average (L, 2TA)", "tab:blue", "-"),
)
"""(gid / metric stem, legend label, colour, line style) of the validation curves."""


def series_points(series: Iterable[tuple[int, float]] | None) -> tuple[list[int], list[float]]:
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


def nats_to_ppl(nats: float) -> float:
    """Perplexity of a loss in nats per token (capped where ``exp`` would overflow)."""
    return math.exp(min(nats, 700.0))  # exp(>709) overflows a float


def unit_series(history: History, stem: str, unit: Unit) -> tuple[list[int], list[float]]:
    """``valid/<stem>`` (or ``train/loss``) in the display unit: bpc for char, perplexity for word.

    For char the logged ``*_bpc`` series is used when present, else the ``*_loss`` one is converted.
    """
    if stem == "train":
        loss_key, bpc_key = "train/loss", "train/bpc"
    else:
        loss_key, bpc_key = f"valid/{stem}_loss", f"valid/{stem}_bpc"
    if unit == "char":
        steps, values = series_points(history.get(bpc_key))
        if steps:
            return steps, values
        steps, values = series_points(history.get(loss_key))
        return steps, [v / LN2 for v in values]
    steps, values = series_points(history.get(loss_key))
    return steps, [nats_to_ppl(v) for v in values]


def check_unit(unit: str) -> None:
    """Raise ``ValueError`` unless ``unit`` is ``"char"`` or ``"word"``."""
    if unit not in ("char", "word"):
        raise ValueError(f"unit must be 'char' (bits per character) or 'word' (perplexity), not {unit!r}")


def new_figure(width: float, height: float) -> Figure:
    """A constrained-layout :class:`~matplotlib.figure.Figure` of ``width`` x ``height`` inches on its own Agg
    canvas (no :mod:`matplotlib.pyplot`, nothing registered globally)."""
    fig = Figure(figsize=(width, height), dpi=DPI, layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def no_data(ax: Axes) -> None:
    """Write "no data" (a text with gid ``no-data``) in the middle of ``ax``."""
    ax.text(0.5, 0.5, _NO_DATA, transform=ax.transAxes, ha="center", va="center", color="0.4", gid="no-data")


def save_figure(fig: Figure, path: str | Path) -> Path:
    """Write ``fig`` as a PNG to ``path`` (parent folders created) and return the path."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png", dpi=DPI)
    return path
