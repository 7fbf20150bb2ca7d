"""The evaluation report of a language model: one table and one plot per run, logged as MLflow artifacts.

:func:`report_rows` reads the final metrics (:meth:`pipeline.tasks.lm_evaluation.EvaluationResult.metrics`)
and gives one row per evaluation method that ran (as thesis Tables 4.1 / 4.2, valid and test side by
side): static (T = 1), static at the tuned softmax temperature, dynamic evaluation at T = 1 and at its
tuned temperature, Monte Carlo dropout with the arithmetic and the geometric mean. Values are shown in
bits per character for character data and perplexity for word data, next to the NLL in nats/token.

:func:`write_report` writes them into a folder (the evaluate stage logs it as the ``evaluation``
artifact folder): ``report.md`` (a markdown table with the settings and notes; MLflow's artifact
viewer shows it as text), ``report.csv`` (the same numbers, one row per method) and ``report.png``
(:func:`pipeline.plots.plot_lm_evaluation`).
"""

from __future__ import annotations

import csv
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from pipeline.plots.lm_evaluation import plot_lm_evaluation

__all__ = ["REPORT_CSV", "REPORT_MARKDOWN", "REPORT_PLOT", "ReportRow", "render_markdown", "report_rows", "write_report"]

REPORT_MARKDOWN = "report.md"
REPORT_CSV = "report.csv"
REPORT_PLOT = "report.png"

# (method, metric suffix after "<split>_nll")
_METHODS: tuple[tuple[str, str], ...] = (
    ("static (T = 1)", ""),
    ("static, tuned T", "_tuned_temperature"),
    ("dynamic (T = 1)", "_dynamic"),
    ("dynamic, tuned T", "_dynamic_tuned_temperature"),
    ("MC dropout, arithmetic mean", "_mc_arithmetic"),
    ("MC dropout, geometric mean", "_mc_geometric"),
)


@dataclass(frozen=True)
class ReportRow:
    """One evaluation method: NLL (nats/token) of valid and test (None when not scored) and its settings."""

    method: str
    valid_nll: float | None
    test_nll: float | None
    settings: str


def display_value(nll: float | None, unit: str) -> float | None:
    """A NLL in nats/token as bits per character (``unit="char"``) or perplexity (``"word"``); NaN stays NaN."""
    if nll is None:
        return None
    if math.isnan(nll):
        return math.nan
    return nll / math.log(2) if unit == "char" else math.exp(min(nll, 700.0))


def unit_name(unit: str) -> str:
    """``bpc`` for character data, ``ppl`` for word data."""
    return "bpc" if unit == "char" else "ppl"


def _g(value: float | None) -> str:
    return "" if value is None else f"{value:.3g}"


def _settings(suffix: str, metrics: Mapping[str, float]) -> str:
    if suffix == "_tuned_temperature":
        return f"T = {_g(metrics.get('temperature'))}"
    if suffix == "_dynamic":
        return (f"lr = {_g(metrics.get('dynamic_lr'))}, decay = {_g(metrics.get('dynamic_decay'))}, "
                f"epsilon = {_g(metrics.get('dynamic_epsilon'))}, window = {_g(metrics.get('dynamic_window'))}")
    if suffix == "_dynamic_tuned_temperature":
        return f"T = {_g(metrics.get('dynamic_temperature'))}"
    if suffix.startswith("_mc"):
        return f"{_g(metrics.get('mc_samples'))} samples, dropout rates x {_g(metrics.get('mc_rate_multiplier'))}"
    return ""


def report_rows(metrics: Mapping[str, float]) -> list[ReportRow]:
    """The methods ``metrics`` holds a valid or test NLL for, in the order of the report."""
    rows = []
    for method, suffix in _METHODS:
        valid, test = metrics.get(f"valid_nll{suffix}"), metrics.get(f"test_nll{suffix}")
        if valid is None and test is None:
            continue
        rows.append(ReportRow(method, None if valid is None else float(valid), None if test is None else float(test),
                              _settings(suffix, metrics)))
    return rows


def _cell(value: float | None, digits: int) -> str:
    if value is None:
        return "–"
    return "NaN (diverged)" if math.isnan(value) else f"{value:.{digits}f}"


def render_markdown(rows: Sequence[ReportRow], *, unit: str, title: str, notes: Sequence[str] = ()) -> str:
    """The report as markdown: a title, the table (display unit and nats), then ``notes`` as bullets."""
    name = unit_name(unit)
    digits = 4 if unit == "char" else 2
    lines = [f"# {title}", "",
             f"Lower is better. {name}: {'bits per character' if unit == 'char' else 'perplexity'}; nll: nats per token.",
             "", f"| method | valid {name} | test {name} | valid nll | test nll | settings |",
             "| --- | ---: | ---: | ---: | ---: | --- |"]
    for row in rows:
        lines.append(
            f"| {row.method} | {_cell(display_value(row.valid_nll, unit), digits)} | "
            f"{_cell(display_value(row.test_nll, unit), digits)} | {_cell(row.valid_nll, 5)} | {_cell(row.test_nll, 5)} | "
            f"{row.settings} |")
    if notes:
        lines += ["", "Notes:", ""] + [f"- {note}" for note in notes]
    return "\n".join(lines) + "\n"


def write_report(metrics: Mapping[str, float], out_dir: str | Path, *, unit: str, title: str,
                 notes: Sequence[str] = ()) -> list[Path]:
    """Write ``report.md``, ``report.csv`` and ``report.png`` for ``metrics`` into ``out_dir`` (created);
    returns their paths."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = report_rows(metrics)
    name = unit_name(unit)
    markdown = out / REPORT_MARKDOWN
    markdown.write_text(render_markdown(rows, unit=unit, title=title, notes=notes))
    table = out / REPORT_CSV
    with open(table, "w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["method", f"valid_{name}", f"test_{name}", "valid_nll", "test_nll", "settings"])
        for row in rows:
            writer.writerow([row.method, *("" if v is None else repr(v) for v in (
                display_value(row.valid_nll, unit), display_value(row.test_nll, unit), row.valid_nll, row.test_nll)),
                row.settings])
    values = {row.method: {"valid": display_value(row.valid_nll, unit), "test": display_value(row.test_nll, unit)}
              for row in rows}
    plot = plot_lm_evaluation(values, out / REPORT_PLOT, unit="char" if unit == "char" else "word", title=title)
    return [markdown, table, plot]
