"""A language model's final evaluation by method: valid and test for static (T = 1), the tuned softmax
temperature, dynamic evaluation and Monte Carlo dropout, side by side.

One column per method, a dot per split (valid, test) annotated with its value, on a y axis zoomed to
the values (not bars from 0: 1.115 and 1.073 bpc must look different), in bits per character
(character data) or perplexity (word data).
"""

from __future__ import annotations

import math
import textwrap
from collections.abc import Mapping
from pathlib import Path

from matplotlib.figure import Figure

from pipeline.plots.common import Unit, check_unit, new_figure, no_data, save_figure

__all__ = ["SPLIT_STYLE", "plot_lm_evaluation", "plot_lm_evaluation_figure"]

SPLIT_STYLE: dict[str, tuple[float, str, str]] = {"valid": (-0.14, "tab:blue", "o"), "test": (0.14, "tab:orange", "D")}
"""split -> (x offset in its method's column, colour, marker)."""


def _value_text(value: float) -> str:
    return f"{value:.4f}" if abs(value) < 10 else f"{value:.2f}"


def plot_lm_evaluation_figure(values: Mapping[str, Mapping[str, float | None]], *, unit: Unit, title: str = "") -> Figure:
    """Dots of ``values``: method label -> {"valid": value, "test": value} in the display unit (bpc for
    ``unit="char"``, perplexity for ``"word"``), methods in the mapping's order. Each dot is a one-point
    line with gid ``"<method>|<split>"`` and a text with gid ``"<method>|<split>|value"``; missing and
    non-finite values are left out."""
    check_unit(unit)
    methods = list(values)
    fig = new_figure(max(6.0, 1.6 * len(methods) + 2.0), 4.8)
    ax = fig.add_subplot()
    shown: list[float] = []
    for split, (offset, colour, marker) in SPLIT_STYLE.items():
        labelled = False
        for i, method in enumerate(methods):
            value = values[method].get(split)
            if value is None or not math.isfinite(float(value)):
                continue
            value = float(value)
            ax.plot([i + offset], [value], linestyle="none", marker=marker, markersize=8, color=colour,
                    label=split if not labelled else "_nolegend_", gid=f"{method}|{split}")
            ax.annotate(_value_text(value), xy=(i + offset, value), xytext=(0, 8), textcoords="offset points",
                        ha="center", va="bottom", fontsize=8, color=colour, gid=f"{method}|{split}|value")
            shown.append(value)
            labelled = True
    ax.set_xticks(range(len(methods)), ["\n".join(textwrap.wrap(m, 16)) for m in methods], fontsize=8)
    ax.set_xlim(-0.6, max(len(methods), 1) - 0.4)
    ax.set_ylabel("bits per character (bpc)" if unit == "char" else "perplexity")
    ax.set_title(title or "Final evaluation by method (lower is better)")
    if shown:
        low, high = min(shown), max(shown)
        spread = high - low
        margin = 0.3 * spread if spread > 0 else max(abs(high) * 0.01, 1e-3)
        ax.set_ylim(low - margin * 0.6, high + margin)
        ax.grid(True, axis="y", alpha=0.3)
        ax.legend(loc="upper right", fontsize=9)
    else:
        no_data(ax)
    return fig


def plot_lm_evaluation(values: Mapping[str, Mapping[str, float | None]], path: str | Path, *, unit: Unit,
                       title: str = "") -> Path:
    """Write :func:`plot_lm_evaluation_figure` as a PNG to ``path``; returns the path."""
    return save_figure(plot_lm_evaluation_figure(values, unit=unit, title=title), path)
