"""The ``pareto`` command: NLL against mutual information for the VAE runs of an experiment.

``python -m pipeline pareto --experiment NAME [--sweep KEY] [--split valid|test]`` reads the finished
VAE pipeline runs from MLflow (:func:`~pipeline.pareto.runs.collect_points`), prints each group's
frontier, and writes the plot (dominated points faded) and a CSV of every point with its frontier flag,
by default under ``<work root>/pareto/``.
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path
from typing import Any

from pipeline.compare.command import add_store_options, resolve_tracking_uri, store_problem, work_root
from pipeline.compare.lookup import ComparisonError
from pipeline.pareto.frontier import FrontierPoint, group_frontiers

__all__ = ["format_frontiers", "register_commands", "write_pareto"]


def format_frontiers(points: list[FrontierPoint]) -> str:
    """Each group's frontier as text: one line per frontier point (MI, NLL, λ, run), groups in order."""
    lines = []
    for group, frontier in group_frontiers(points).items():
        total = sum(p.group == group for p in points)
        lines.append(f"{group}: {len(frontier)} of {total} runs on the frontier")
        for p in frontier:
            lam = p.extra.get("lambda", "?")
            name = str(p.extra.get("run_name", ""))
            who = f"{name} ({p.label[:8]})" if name and name != p.label else p.label
            lines.append(f"  MI {p.mutual_information:8.4f}  NLL {p.nll:8.4f}  λ {lam!s:<6}  {who}")
    return "\n".join(lines)


def write_pareto(points: list[FrontierPoint], directory: Path, stem: str, *, title: str,
                 highlight: str | None = None) -> tuple[Path, Path]:
    """The plot ``<directory>/<stem>.png`` and the CSV ``<directory>/<stem>.csv`` of ``points``."""
    from pipeline.plots.pareto import plot_pareto, write_frontier_csv

    directory.mkdir(parents=True, exist_ok=True)
    png = plot_pareto(points, directory / f"{stem}.png", title=title, highlight=highlight)
    csv = write_frontier_csv(points, directory / f"{stem}.csv")
    return png, csv


def register_commands(subparsers: Any) -> None:
    """Add the ``pareto`` subcommand to an argparse subparsers."""
    p = subparsers.add_parser(
        "pareto", help="NLL vs mutual information of an experiment's VAE runs, with each group's Pareto frontier",
        description="Plot NLL against mutual information for the finished sentence-VAE runs of an MLflow experiment, "
        "grouped by estimator and objective, each group's Pareto frontier drawn and the dominated runs faded; "
        "write a CSV of the points beside it and print the frontiers.")
    p.add_argument("--experiment", required=True, metavar="NAME", help="the MLflow experiment (a config's name by default)")
    p.add_argument("--sweep", default=None, metavar="KEY", help="only the runs of this sweep (its pipeline.sweep_key)")
    p.add_argument("--split", choices=("valid", "test"), default="valid", help="which final metrics [default valid]")
    p.add_argument("--output-dir", type=Path, default=None,
                   help="where the PNG and CSV go; default <work root>/pareto (the folder of a local SQLite store, "
                   "else ./runs)")
    add_store_options(p)
    p.set_defaults(handler=_main)


def _main(args: argparse.Namespace) -> int:
    uri = resolve_tracking_uri(args.tracking_uri)
    problem = store_problem(uri)
    if problem is not None:
        print(f"error: {problem}", file=sys.stderr)
        return 2
    from mlflow.exceptions import MlflowException
    from mlflow.tracking import MlflowClient

    from pipeline.pareto.runs import collect_points

    try:
        found = collect_points(MlflowClient(tracking_uri=uri), args.experiment, split=args.split, sweep_key=args.sweep)
    except ComparisonError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except MlflowException as err:
        print(f"error: cannot read the MLflow store {uri}: {err.message}", file=sys.stderr)
        return 1
    if found.unevaluated:
        print(f"{len(found.unevaluated)} run(s) left out, not evaluated yet: "
              f"{', '.join(r[:8] for r in found.unevaluated)}", file=sys.stderr)
    if not found.points:
        print(f"error: no run of experiment {args.experiment!r} has final {args.split} NLL and mutual information "
              "yet; wait for their evaluate stage (or run `python -m pipeline evaluate`)", file=sys.stderr)
        return 2
    print(format_frontiers(found.points))
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", f"pareto-{args.experiment}" + (f"-{args.sweep}" if args.sweep else ""))
    png, csv = write_pareto(found.points, args.output_dir or work_root(uri) / "pareto", f"{stem}-{args.split}",
                            title=f"{args.experiment}: {args.split} NLL vs mutual information")
    print(f"plot written to {png}\nfrontier CSV written to {csv}", file=sys.stderr)
    return 0
