"""The ``compare`` command: argument parsing, the tracking store to read, where the plot goes.

``python -m pipeline compare --experiment NAME`` or ``--run-ids ID [ID ...]`` prints the
:class:`~pipeline.compare.comparison.Comparison` table and writes its plot (by default under the
work root, see :func:`default_output`). :func:`register_commands` adds the command to the pipeline
CLI (:mod:`pipeline.cli`); ``mlflow`` is imported only when the command runs.
"""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from pipeline.compare.comparison import Comparison, compare_runs
from pipeline.compare.lookup import ComparisonError

__all__ = [
    "DEFAULT_TRACKING_URI",
    "DEFAULT_WORK_ROOT",
    "default_output",
    "add_store_options",
    "missing_sqlite_store",
    "register_commands",
    "resolve_tracking_uri",
    "store_problem",
    "work_root",
]

DEFAULT_TRACKING_URI = "sqlite:///runs/mlflow.db"
"""The pipeline's local default store (``runs/mlflow.db`` under the working directory)."""
DEFAULT_WORK_ROOT = Path("runs")
"""The pipeline's default work root (the runs' folders), relative to the working directory."""


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


def missing_sqlite_store(uri: str) -> Path | None:
    """The database file of a ``sqlite:///`` URI when it does not exist (reading must not create it)."""
    path = _sqlite_path(uri)
    return None if path is None or path.exists() else path


def store_problem(uri: str) -> str | None:
    """Why the runs cannot be read from ``uri`` before asking MLflow (a missing local store: reading must
    not create an empty one), as the ``error:`` line to print; None when there is nothing to say."""
    missing = missing_sqlite_store(uri)
    if missing is None:
        return None
    return (f"no MLflow store at {missing} (tracking URI {uri}); run the pipeline first, or pass "
            "--tracking-uri / set MLFLOW_TRACKING_URI to the store that holds the runs")


def add_store_options(parser: argparse.ArgumentParser) -> None:
    """``--tracking-uri`` and ``--log-level``: the options of every command that reads runs from MLflow."""
    parser.add_argument("--tracking-uri", default=None,
                        help=f"MLflow tracking URI; default $MLFLOW_TRACKING_URI, else {DEFAULT_TRACKING_URI}")
    parser.add_argument("--log-level", default="WARNING", choices=["DEBUG", "INFO", "WARNING", "ERROR"])


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
    p.add_argument("--output", type=Path, default=None,
                   help="where to write the plot (PNG); default <work root>/compare/compare-<what>-<time>.png, the "
                   "work root being the folder of a local SQLite store, else ./runs")
    add_store_options(p)
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    """Run ``compare``: the table to stdout, the plot to ``args.output``; 0, or 2 after ``error: ...``."""
    uri = resolve_tracking_uri(args.tracking_uri)
    problem = store_problem(uri)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
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
