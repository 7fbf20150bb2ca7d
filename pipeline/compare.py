"""Compare pipeline runs tracked in MLflow: a side-by-side table and a plot.

``python -m pipeline compare --experiment NAME`` (every pipeline run of an experiment, newest first)
or ``python -m pipeline compare --run-ids ID [ID ...]`` (full ids or unique prefixes, such as the
8-character ids the table shows) prints one column per run -- the config params that differ between
the runs, then the final metrics -- and writes a PNG with the validation curves overlaid and the final
bpc (or perplexity) per run as dots on a zoomed axis, by default under the work root
(``runs/compare/...``, see :func:`default_output`), and prints its path.

The MLflow layout read here is the tracker's (:mod:`pipeline.tracking`): one *parent* run per
pipeline run (tag ``pipeline.kind=pipeline``; params = the flattened resolved config, see
:func:`pipeline.config.flatten_config`; metrics ``final/<k>`` copied from the evaluate stage) and one
nested *stage* run per stage (tags ``pipeline.kind=stage``, ``pipeline.stage`` in prepare / train /
evaluate, ``mlflow.parentRunId``). The validation curve is the train stage's ``valid/reported_bpc``
(character-level data; converted from ``valid/reported_loss`` when only that was logged) or
``valid/reported_loss`` in nats per token (word-level data). A run without stage children (one flat
run holding everything) is read as its own train and evaluate stage.

``mlflow`` and ``matplotlib`` are imported only when a comparison is made, so registering the
command costs nothing to the other CLI stages.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import re
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

if TYPE_CHECKING:
    from mlflow.entities import Run
    from mlflow.tracking import MlflowClient

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_WORK_ROOT",
    "Comparison",
    "ComparisonError",
    "NoRunsError",
    "RunSummary",
    "UnknownExperimentError",
    "UnknownRunError",
    "compare_runs",
    "default_output",
    "register_commands",
    "resolve_run_id",
    "resolve_tracking_uri",
    "work_root",
]

log = logging.getLogger(__name__)

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
"""The pipeline's local default store (``runs/mlflow.db`` under the working directory)."""
DEFAULT_WORK_ROOT = Path("runs")
"""The pipeline's default work root (the runs' folders), relative to the working directory."""

PARENT_TAG = "mlflow.parentRunId"
KIND_TAG = "pipeline.kind"
STAGE_TAG = "pipeline.stage"
FINAL_PREFIX = "final/"
LN2 = math.log(2.0)

# Final metrics in reading order (headline numbers first); others follow alphabetically.
_METRIC_ORDER = (
    "valid_bpc", "test_bpc", "valid_bpc_tuned_temperature", "test_bpc_tuned_temperature",
    "valid_ppl", "test_ppl", "valid_ppl_tuned_temperature", "test_ppl_tuned_temperature",
    "temperature", "valid_nll", "test_nll", "valid_nll_tuned_temperature", "test_nll_tuned_temperature",
)
_MAX_CELL = 48  # longer param values (URLs, paths) are shortened in the table
_MISSING = "-"


class ComparisonError(LookupError, ValueError):
    """Nothing to compare; the message names the problem and the fix (the CLI prints it, exit code 2)."""


class UnknownExperimentError(ComparisonError):
    """No (active) MLflow experiment has the given name."""


class UnknownRunError(ComparisonError):
    """A given run id is not in the tracking store (or was deleted)."""


class NoRunsError(ComparisonError):
    """The experiment holds no pipeline runs, or no experiment / run ids were given."""


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


def _not_found(err: Exception) -> bool:
    return getattr(err, "error_code", None) in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE")


def _search(client: MlflowClient, experiment_ids: list[str], filter_string: str, order_by: list[str]) -> Iterator[Run]:
    """Every active run matching, page by page."""
    from mlflow.entities import ViewType

    token = None
    while True:
        page = client.search_runs(
            experiment_ids, filter_string, run_view_type=ViewType.ACTIVE_ONLY, max_results=500,
            order_by=order_by, page_token=token,
        )
        yield from page
        token = page.token
        if not token:
            return


def _is_parent(run: Run) -> bool:
    tags = run.data.tags
    return PARENT_TAG not in tags and tags.get(KIND_TAG) != "stage"


def _experiment_names(client: MlflowClient) -> list[str]:
    try:
        return sorted(e.name for e in client.search_experiments())
    except Exception:  # only used to word an error message
        return []


def _unknown_experiment(client: MlflowClient, name: str, deleted: bool = False) -> UnknownExperimentError:
    names = _experiment_names(client)
    known = f"experiments in this store: {', '.join(names)}" if names else "this store has no experiments"
    why = "is deleted (restore it with `mlflow experiments restore`)" if deleted else "does not exist"
    return UnknownExperimentError(
        f"experiment {name!r} {why} in the tracking store ({client.tracking_uri}); {known}. "
        "Pass one of them with --experiment, or point --tracking-uri / MLFLOW_TRACKING_URI at the right store"
    )


def _parent_runs(client: MlflowClient, experiment: str, limit: int | None) -> list[Run]:
    exp = client.get_experiment_by_name(experiment)
    if exp is None or exp.lifecycle_stage != "active":
        raise _unknown_experiment(client, experiment, deleted=exp is not None)
    runs: list[Run] = []
    for run in _search(client, [exp.experiment_id], "", ["attributes.start_time DESC"]):
        if _is_parent(run):
            runs.append(run)
            if limit is not None and len(runs) >= limit:
                break
    if not runs:
        raise NoRunsError(
            f"experiment {experiment!r} has no pipeline runs (active runs without {PARENT_TAG}); "
            "run the pipeline first (`python -m pipeline run --config ...`) or pass --run-ids"
        )
    return runs


def _get_run(client: MlflowClient, run_id: str, *, given: str) -> Run:
    from mlflow.exceptions import MlflowException

    try:
        run = client.get_run(run_id)
    except MlflowException as err:
        if not _not_found(err):
            raise
        what = "run" if run_id == given else f"parent run {run_id} of run"
        raise UnknownRunError(
            f"{what} {given!r} is not in the tracking store ({client.tracking_uri}); check the id "
            "(`mlflow runs list --experiment-id ...`) or point --tracking-uri / MLFLOW_TRACKING_URI at the right store"
        ) from None
    if run.info.lifecycle_stage != "active":
        raise UnknownRunError(
            f"run {run_id!r} is deleted; restore it (`mlflow runs restore --run-id {run_id}`) or leave it out"
        )
    return run


_FULL_ID = re.compile(r"[0-9a-f]{32}")
# A prefix is searched with SQL LIKE: wildcard and quote characters cannot be part of an MLflow run id
# (uuid4 hex) anyway, and would otherwise match other runs or break the filter.
_NOT_IN_ID = re.compile(r"[%_'\"\\\s]")
_MAX_LISTED = 10  # matching ids named in an ambiguity error


def _active_experiments(client: MlflowClient) -> list[Any]:
    from mlflow.entities import ViewType

    experiments: list[Any] = []
    token = None
    while True:
        page = client.search_experiments(view_type=ViewType.ACTIVE_ONLY, max_results=1000, page_token=token)
        experiments += page
        token = page.token
        if not token:
            return experiments


def _pipeline_id(run: Run) -> str:
    """The id of the pipeline run ``run`` belongs to (its parent for a stage run, else itself)."""
    return run.data.tags.get(PARENT_TAG) or run.info.run_id


def _describe(run: Run) -> str:
    """``"<id> (<run name>, stage <stage> of <parent id>)"`` for an error message."""
    tags = run.data.tags
    parts = [tags.get("mlflow.runName") or run.info.run_name or ""]
    if PARENT_TAG in tags:
        parts.append(f"stage {tags.get(STAGE_TAG, '?')} of {tags[PARENT_TAG][:8]}")
    return f"{run.info.run_id} ({', '.join(p for p in parts if p)})"


def resolve_run_id(client: MlflowClient, given: str) -> str:
    """The full run id that ``given`` names: the id itself, or the one run id it is a prefix of.

    A full 32-character id is looked up directly. Anything else is taken as a prefix (such as the
    8-character ids ``compare`` prints) and searched for in every active experiment; prefixes of
    several runs are accepted when the runs are one pipeline run and its stages (they stand for the same
    pipeline run, whose id is returned). Raises :class:`UnknownRunError` when no active run matches
    (naming the experiments searched, or the deleted runs that match) or when the runs that match belong
    to different pipeline runs (listing them).
    """
    from mlflow.entities import ViewType

    given = given.strip()
    if re.fullmatch(r"[0-9A-Fa-f]+", given):
        given = given.lower()  # MLflow writes run ids in lower-case hex; LIKE compares case-sensitively
    if _FULL_ID.fullmatch(given) or not given:
        return given  # looked up (and reported when missing) by _get_run
    experiments = _active_experiments(client)
    names = ", ".join(sorted(repr(e.name) for e in experiments)) or "none"
    not_found = UnknownRunError(
        f"run {given!r} is not in the tracking store ({client.tracking_uri}): no run id starts with it in the "
        f"experiments searched ({names}); check the id (`mlflow runs list --experiment-id ...`) or point "
        "--tracking-uri / MLFLOW_TRACKING_URI at the right store"
    )
    if _NOT_IN_ID.search(given) or not experiments:
        return _only_if_exact(client, given, not_found)
    page = client.search_runs(
        [e.experiment_id for e in experiments], f"attributes.run_id LIKE '{given}%'", run_view_type=ViewType.ALL,
        max_results=100,
    )
    matches = [run for run in page if run.info.lifecycle_stage == "active"]
    if not matches:
        deleted = [run.info.run_id for run in page]
        if deleted:
            raise UnknownRunError(
                f"run {given!r} matches only deleted runs ({', '.join(deleted[:_MAX_LISTED])}); restore one "
                "(`mlflow runs restore --run-id ID`) or leave it out"
            )
        return _only_if_exact(client, given, not_found)
    pipelines = {_pipeline_id(run) for run in matches}
    if len(pipelines) == 1 and not page.token:
        (only,) = pipelines
        return only if len(matches) > 1 else matches[0].info.run_id
    listed = [_describe(run) for run in matches[:_MAX_LISTED]]
    more = " and more" if page.token or len(matches) > _MAX_LISTED else ""
    raise UnknownRunError(
        f"run id prefix {given!r} is ambiguous: it matches {'; '.join(listed)}{more}; give more characters"
    )


def _only_if_exact(client: MlflowClient, given: str, not_found: UnknownRunError) -> str:
    """``given`` when it is itself a run id (ids outside the uuid form, runs in deleted experiments)."""
    from mlflow.exceptions import MlflowException

    try:
        client.get_run(given)
    except MlflowException as err:
        if not _not_found(err):
            raise
        raise not_found from None
    return given


def _given_parents(client: MlflowClient, run_ids: Sequence[str]) -> list[Run]:
    """The pipeline (parent) run of each id or unique id prefix, in order, without duplicates; a stage id
    gives its parent."""
    runs: list[Run] = []
    seen: set[str] = set()
    for given in run_ids:
        run_id = resolve_run_id(client, given)
        run = _get_run(client, run_id, given=run_id)
        parent_id = run.data.tags.get(PARENT_TAG)
        if parent_id:
            run = _get_run(client, parent_id, given=given)
        if run.info.run_id not in seen:
            seen.add(run.info.run_id)
            runs.append(run)
    return runs


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
    children = list(
        _search(client, [parent.info.experiment_id], f"tags.`{PARENT_TAG}` = '{run_id}'", ["attributes.start_time ASC"])
    )
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

    Either ``experiment`` (a name: all its pipeline runs -- active runs without
    ``mlflow.parentRunId`` -- newest first, at most ``limit``) or ``run_ids`` (in that order; the id of
    a stage run stands for its pipeline run; duplicates are dropped). Raises
    :class:`UnknownExperimentError`, :class:`UnknownRunError` or :class:`NoRunsError` (all
    :class:`ComparisonError`, a ``LookupError`` and ``ValueError``) with a message saying how to fix it;
    errors of the store itself (unreachable server) propagate as ``MlflowException``.
    """
    if experiment is not None and run_ids:
        raise ComparisonError("give either an experiment or run ids, not both")
    if experiment is not None:
        parents = _parent_runs(client, experiment, limit)
    elif run_ids:
        parents = _given_parents(client, run_ids)
    else:
        names = _experiment_names(client)
        known = f" (experiments in this store: {', '.join(names)})" if names else ""
        raise NoRunsError(f"nothing to compare: give --experiment NAME{known} or --run-ids ID [ID ...]")
    return Comparison(runs=[_summarise(client, run) for run in parents], experiment=experiment)


# ------------------------------------------------------------------------------------------------ CLI


def resolve_tracking_uri(uri: str | None = None) -> str:
    """``uri``, else ``$MLFLOW_TRACKING_URI``, else :data:`DEFAULT_TRACKING_URI`."""
    return uri or os.environ.get("MLFLOW_TRACKING_URI") or DEFAULT_TRACKING_URI


def _sqlite_path(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI (None for other stores and in-memory databases)."""
    prefix = "sqlite:///"
    if not uri.startswith(prefix):
        return None
    path = uri[len(prefix):].split("?", 1)[0]
    return Path(path) if path and path != ":memory:" else None


def _missing_sqlite_store(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI when it does not exist (reading must not create it)."""
    path = _sqlite_path(uri)
    return None if path is None or path.exists() else path


def work_root(uri: str) -> Path:
    """Where ``compare`` writes its plots by default: the work root of the runs in the store ``uri``.

    The pipeline keeps its local store next to the runs' folders (``sqlite:///<work root>/mlflow.db``,
    :func:`pipeline.tracking.runs.default_tracking_uri`), so a local SQLite store's folder is the work
    root; for any other store (a tracking server) it is :data:`DEFAULT_WORK_ROOT` under the current
    directory. Both are git-ignored, unlike the current directory (the repository, often).
    """
    store = _sqlite_path(uri)
    return store.parent if store is not None else DEFAULT_WORK_ROOT


def default_output(uri: str, comparison: Comparison, now: float | None = None) -> Path:
    """``<work root>/compare/compare-<experiment or short ids>-<UTC time>.png`` (see :func:`work_root`).

    The time stamp keeps earlier comparisons; the name says what was compared.
    """
    if comparison.experiment is not None:
        what = comparison.experiment
    else:
        what = "-".join(run.short_id for run in comparison.runs[:4]) + ("-etc" if len(comparison.runs) > 4 else "")
    what = re.sub(r"[^A-Za-z0-9._-]+", "_", what).strip("._") or "runs"
    stamp = time.strftime("%Y%m%d-%H%M%S", time.gmtime(now))
    return work_root(uri) / "compare" / f"compare-{what}-{stamp}.png"


def register_commands(subparsers: Any) -> None:
    """Add the ``compare`` subcommand (its ``handler`` default is :func:`_main`) to an argparse subparsers."""
    p = subparsers.add_parser(
        "compare",
        help="compare tracked pipeline runs: differing params, final metrics, validation curves",
        description="Print the config params that differ between pipeline runs and their final metrics side by "
        "side, and plot their validation curves and final bpc / perplexity.",
    )
    which = p.add_mutually_exclusive_group()
    which.add_argument("--experiment", metavar="NAME", help="every pipeline run of this MLflow experiment, newest first")
    which.add_argument("--run-ids", nargs="+", metavar="ID", default=[],
                       help="these runs, by id or any unique prefix of one (such as the 8 characters the table "
                       "shows); a stage run's id stands for its pipeline run")
    p.add_argument("--limit", type=int, default=None, metavar="N", help="with --experiment: only the newest N runs")
    p.add_argument("--tracking-uri", default=None,
                   help=f"MLflow tracking URI; default $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI}")
    p.add_argument("--output", type=Path, default=None,
                   help="where to write the plot (PNG); default <work root>/compare/compare-<what>-<time>.png, the "
                   "work root being the folder of a local SQLite store, else ./runs")
    p.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    """Run ``compare``: the table to stdout, the plot to ``args.output``; 0, or 2 after ``error: ...``."""
    uri = resolve_tracking_uri(args.tracking_uri)
    missing = _missing_sqlite_store(uri)
    if missing is not None:
        print(
            f"error: no MLflow store at {missing} (tracking URI {uri}); run the pipeline first, or pass "
            "--tracking-uri / set MLFLOW_TRACKING_URI to the store that holds the runs",
            file=sys.stderr,
        )
        return 2
    if args.limit is not None and args.limit < 1:
        print("error: --limit must be at least 1", file=sys.stderr)
        return 2

    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    try:
        client = MlflowClient(tracking_uri=uri)
        comparison = compare_runs(client, experiment=args.experiment, run_ids=args.run_ids or (), limit=args.limit)
    except ComparisonError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: cannot read the MLflow store {uri}: {err.message}", file=sys.stderr)
        return 1
    print(comparison.format_table())
    path = comparison.write_plot(args.output or default_output(uri, comparison))
    print(f"plot written to {path}", file=sys.stderr)
    return 0
