"""Summarising pipeline runs for a side-by-side comparison: :class:`RunSummary`, :class:`Comparison`.

:func:`compare_runs` reads each pipeline run that :func:`~pipeline.compare.lookup.find_pipeline_runs`
finds -- its flattened config params, its ``final/<k>`` metrics (copied from the evaluate stage) and
the validation curve of its train stage(s) -- into a :class:`RunSummary`. A :class:`Comparison` of
them formats the table (differing params, final metrics) and writes the plot
(:func:`pipeline.plots.plot_comparison`). The validation curve is the train stage's
``valid/reported_bpc`` (character-level data; converted from ``valid/reported_loss`` when only that
was logged) or ``valid/reported_loss`` in nats per token (word-level data). A run without stage
children (one flat run holding everything) is read as its own train and evaluate stage.

``mlflow`` and ``matplotlib`` are imported only when a comparison is made.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Literal

from pipeline.compare.lookup import (
    PARENT_TAG,
    STAGE_TAG,
    find_pipeline_runs,
    search_active_runs,
)

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "FINAL_PREFIX",
    "Comparison",
    "RunSummary",
    "compare_runs",
]

FINAL_PREFIX = "final/"
"""Prefix of the final metrics (``final/valid_bpc``, ...) on the parent and evaluate runs."""
LN2 = math.log(2.0)

# Final metrics in reading order (headline numbers first); others follow alphabetically.
_METRIC_ORDER = (
    "valid_bpc", "test_bpc", "valid_bpc_tuned_temperature", "test_bpc_tuned_temperature",
    "valid_ppl", "test_ppl", "valid_ppl_tuned_temperature", "test_ppl_tuned_temperature",
    "temperature", "valid_nll", "test_nll", "valid_nll_tuned_temperature", "test_nll_tuned_temperature",
)
_MAX_CELL = 48  # longer param values (URLs, paths) are shortened in the table
_MISSING = "-"


@dataclass(frozen=True)
class RunSummary:
    """One pipeline run, as read from its MLflow parent run and stage children.

    ``params``: the flattened config (``train.optimizer.lr`` -> ``"0.002"``; MLflow keeps strings,
    None is ``"null"``). ``final_metrics``: ``final/<k>`` without the prefix (``valid_bpc``,
    ``test_ppl_tuned_temperature``, ``temperature``, ...). ``curve``: ``(step, value)`` of the
    validation loss of the reported weights, sorted by step, in bpc when ``unit == "char"``, else in
    nats per token; ``curve_metric`` is the MLflow metric it came from. ``unit``: ``char`` / ``word``
    (None when nothing tells). ``start_time``: milliseconds since the epoch.
    """

    run_id: str
    name: str
    status: str
    experiment_id: str
    start_time: int | None
    params: dict[str, str] = field(default_factory=dict)
    final_metrics: dict[str, float] = field(default_factory=dict)
    curve: list[tuple[int, float]] = field(default_factory=list)
    curve_metric: str | None = None
    unit: Literal["char", "word"] | None = None
    train_run_ids: tuple[str, ...] = ()
    evaluate_run_id: str | None = None

    @property
    def short_id(self) -> str:
        """The first 8 characters of the run id."""
        return self.run_id[:8]

    @property
    def label(self) -> str:
        """``"<name> (<short id>)"``: the column header and plot legend entry."""
        return f"{self.name} ({self.short_id})"


@dataclass
class Comparison:
    """Pipeline runs side by side (``runs``: in the order given, or newest first for an experiment)."""

    runs: list[RunSummary]
    experiment: str | None = None

    def differing_params(self) -> dict[str, list[str | None]]:
        """Params whose value is not the same in every run, or that only some runs have.

        Returns param name -> its value in each run (in ``runs`` order; None where a run lacks it),
        sorted by name. Empty with fewer than two runs.
        """
        names = sorted({name for run in self.runs for name in run.params})
        out: dict[str, list[str | None]] = {}
        for name in names:
            values = [run.params.get(name) for run in self.runs]
            if len(set(values)) > 1:
                out[name] = values
        return out

    def final_metric_names(self) -> list[str]:
        """Every final metric any run has, headline numbers (bpc / perplexity) first."""
        present = {name for run in self.runs for name in run.final_metrics}
        ordered = [name for name in _METRIC_ORDER if name in present]
        return ordered + sorted(present.difference(ordered))

    def format_table(self) -> str:
        """A plain-text table, one column per run (header ``name (short id)``).

        Rows: ``status``, then the differing config params (``-`` where a run lacks one), then the
        final metrics (``final/<k>``, 4 decimals, ``-`` where missing). Params are left-aligned,
        numbers right-aligned.
        """
        header = ["run", *(run.label for run in self.runs)]
        body: list[tuple[list[str], bool] | None] = []  # (cells, right-align values); None = rule
        body.append((["status", *(run.status for run in self.runs)], False))
        body.append(None)
        differing = self.differing_params()
        if not differing:
            note = "(one run: nothing to compare)" if len(self.runs) < 2 else "(all params identical)"
            body.append(([note, *("" for _ in self.runs)], False))
        for name, values in differing.items():
            body.append(([name, *(_cell(v) for v in values)], False))
        body.append(None)
        metrics = self.final_metric_names()
        if not metrics:
            body.append((["(no final metrics)", *("" for _ in self.runs)], False))
        for name in metrics:
            body.append(([FINAL_PREFIX + name, *(_number(run.final_metrics.get(name)) for run in self.runs)], True))

        rows = [header] + [cells for item in body if item is not None for cells in (item[0],)]
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        rule = "  ".join("-" * w for w in widths)

        def line(cells: Sequence[str], right: bool) -> str:
            parts = [cells[0].ljust(widths[0])]
            parts += [(c.rjust(w) if right else c.ljust(w)) for c, w in zip(cells[1:], widths[1:])]
            return "  ".join(parts).rstrip()

        out = [line(header, False), rule]
        out += [rule if item is None else line(*item) for item in body]
        return "\n".join(out)

    def curve_label(self) -> str:
        """The y label of the overlaid curves (bpc when every run is character-level, else nats)."""
        if self.runs and all(run.unit == "char" for run in self.runs):
            return "validation bpc (reported weights)"
        return "validation loss, nats per token (reported weights)"

    def curves(self) -> dict[str, list[tuple[int, float]]]:
        """Run label -> validation curve, in the unit :meth:`curve_label` names."""
        all_char = bool(self.runs) and all(run.unit == "char" for run in self.runs)
        out = {}
        for run in self.runs:
            scale = LN2 if run.unit == "char" and not all_char else 1.0  # mixed units: back to nats
            out[run.label] = [(step, value * scale) for step, value in run.curve]
        return out

    def headline_finals(self) -> tuple[dict[str, dict[str, float]], str]:
        """Run label -> {"valid <unit>": v, "test <unit>": v} at temperature 1, and the unit's label.

        bpc when every run is character-level, perplexity when every run is word-level, else nll.
        """
        units = {run.unit for run in self.runs}
        suffix, axis = {
            "char": ("bpc", "final bits per character (T=1)"),
            "word": ("ppl", "final perplexity (T=1)"),
        }.get(units.pop() if len(units) == 1 else "", ("nll", "final nats per token (T=1)"))
        out: dict[str, dict[str, float]] = {}
        for run in self.runs:
            out[run.label] = {
                f"{split} {suffix}": run.final_metrics[f"{split}_{suffix}"]
                for split in ("valid", "test")
                if f"{split}_{suffix}" in run.final_metrics
            }
        return out, axis

    def write_plot(self, path: str | Path) -> Path:
        """Write the comparison plot (:func:`pipeline.plots.plot_comparison`) as a PNG; returns the path."""
        from pipeline.plots import plot_comparison

        finals, final_label = self.headline_finals()
        title = f"experiment {self.experiment}" if self.experiment else ""
        return plot_comparison(
            self.curves(), finals, path, metric_label=self.curve_label(), final_label=final_label, title=title
        )


def _cell(value: str | None) -> str:
    if value is None:
        return _MISSING
    return value if len(value) <= _MAX_CELL else value[: _MAX_CELL - 3] + "..."


def _number(value: float | None) -> str:
    if value is None:
        return _MISSING
    return f"{value:.4f}" if math.isfinite(value) else str(value)


# -------------------------------------------------------------------------------------------- reading


def _history(client: MlflowClient, runs: Sequence[Run], key: str, scale: float = 1.0) -> dict[int, float]:
    """``key``'s points over ``runs`` (oldest first; a later value at the same step wins)."""
    points: dict[int, float] = {}
    for run in runs:
        for metric in sorted(client.get_metric_history(run.info.run_id, key), key=lambda m: (m.timestamp, m.step)):
            points[int(metric.step)] = float(metric.value) * scale
    return points


def _detect_unit(finals: Mapping[str, float], train_runs: Sequence[Run], params: Mapping[str, str]
                 ) -> Literal["char", "word"] | None:
    if any(k.endswith(("_bpc", "_bpc_tuned_temperature")) for k in finals):
        return "char"
    if any(k.endswith(("_ppl", "_ppl_tuned_temperature")) for k in finals):
        return "word"
    logged = {k for run in train_runs for k in run.data.metrics}
    if any(k.startswith("valid/") and k.endswith("_bpc") for k in logged):
        return "char"
    if any(k.startswith("valid/") and k.endswith("_loss") for k in logged):
        return "word"  # char-level training always logs the *_bpc twins
    dataset = params.get("data.dataset")
    if dataset is None:
        return None
    return "word" if dataset == "ptb_word" else "char"


def _summarise(client: MlflowClient, parent: Run) -> RunSummary:
    run_id = parent.info.run_id
    children = list(search_active_runs(
        client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'", ["attributes.start_time ASC"]
    ))
    train_runs = [c for c in children if c.data.tags.get(STAGE_TAG) == "train"] or [parent]
    eval_runs = [c for c in children if c.data.tags.get(STAGE_TAG) == "evaluate"]

    params = dict(parent.data.params)
    if not params:  # the params live on the stage runs only
        for child in children:
            params.update(child.data.params)

    def finals_of(run: Run) -> dict[str, float]:
        return {k[len(FINAL_PREFIX):]: float(v) for k, v in run.data.metrics.items() if k.startswith(FINAL_PREFIX)}

    finals = finals_of(parent)
    evaluate_run_id = None
    for child in reversed(eval_runs):  # newest evaluate stage with finals
        if not finals:
            finals = finals_of(child)
        if finals_of(child):
            evaluate_run_id = child.info.run_id
            break

    unit = _detect_unit(finals, train_runs, params)
    curve_metric = "valid/reported_loss"
    points: dict[int, float] = {}
    if unit == "char":
        points = _history(client, train_runs, "valid/reported_bpc")
        curve_metric = "valid/reported_bpc"
        if not points:
            points = _history(client, train_runs, "valid/reported_loss", scale=1 / LN2)
            curve_metric = "valid/reported_loss"
    else:
        points = _history(client, train_runs, "valid/reported_loss")

    return RunSummary(
        run_id=run_id,
        name=parent.data.tags.get("mlflow.runName") or parent.info.run_name or run_id[:8],
        status=parent.info.status,
        experiment_id=parent.info.experiment_id,
        start_time=parent.info.start_time,
        params=params,
        final_metrics=finals,
        curve=sorted(points.items()),
        curve_metric=curve_metric if points else None,
        unit=unit,
        train_run_ids=tuple(r.info.run_id for r in train_runs),
        evaluate_run_id=evaluate_run_id,
    )


def compare_runs(
    client: MlflowClient,
    *,
    experiment: str | None = None,
    run_ids: Sequence[str] = (),
    limit: int | None = None,
) -> Comparison:
    """Read pipeline runs from MLflow for a side-by-side comparison.

    Either ``experiment`` (a name: all its pipeline runs -- active runs tagged
    ``pipeline.kind=pipeline``, top level or nested under a sweep run -- newest first, at most ``limit``) or ``run_ids`` (in that order; the id of
    a stage run stands for its pipeline run; duplicates are dropped). Raises
    :class:`~pipeline.compare.lookup.UnknownExperimentError`, :class:`~pipeline.compare.lookup.UnknownRunError`
    or :class:`~pipeline.compare.lookup.NoRunsError` (all :class:`~pipeline.compare.lookup.ComparisonError`,
    a ``LookupError`` and ``ValueError``) with a message saying how to fix it; errors of the store itself
    (unreachable server) propagate as ``MlflowException``.
    """
    parents = find_pipeline_runs(client, experiment=experiment, run_ids=run_ids, limit=limit)
    return Comparison(runs=[_summarise(client, run) for run in parents], experiment=experiment)
