"""The ``sweep`` command: a grid of λ / α (or any config fields) of one config, locally or on Kubernetes.

``python -m pipeline sweep --config ptb_vae --lambda 0 0.25 0.5 0.75 [--alpha ...] [--grid FIELD=V1,V2]``
runs every point as its own pipeline run (prepare -> train -> evaluate), nested under one MLflow sweep
run, and ends with the sweep's Pareto frontier (plot + CSV, logged to the sweep run). ``--on kubernetes``
submits one driver Job per point instead (``--manifest FILE`` writes them for ``kubectl apply -f``); the
frontier then comes from ``python -m pipeline pareto --experiment NAME --sweep KEY`` once they finish.
Config overrides (``--section.field VALUE``) apply to every point.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Any

from pipeline.cli_options import schema_overrides
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.sweep.grid import SweepAxis, expand_grid, parse_axis, point_config, sweep_dir, sweep_key

__all__ = ["local_tracking_uri", "open_sweep_run", "register_commands", "render_sweep_manifest", "sweep_objects"]

log = logging.getLogger("pipeline.sweep")

_USAGE = ("%(prog)s --config NAME|FILE [--lambda V ...] [--alpha V ...] [--grid FIELD=V1,V2 ...] "
          "[--on local|kubernetes] [--section.field VALUE ...] [options]")


def register_commands(subparsers: Any) -> None:
    """Add the ``sweep`` subcommand to an argparse subparsers."""
    from pipeline.cli_options import add_schema_options

    p = subparsers.add_parser(
        "sweep", usage=_USAGE, allow_abbrev=False,
        help="run a grid of λ / α (or any fields) of one config, each point a nested run; ends with its Pareto plot",
        description=__doc__.split("\n\n")[1].replace("\n", " "))
    p.add_argument("--config", required=True, metavar="NAME|FILE", help="the base config (shipped name or YAML file)")
    p.add_argument("--lambda", dest="lambdas", nargs="+", default=[], metavar="V",
                   help="values of λ, the mutual-information weight (vae.objective.mi_weight)")
    p.add_argument("--alpha", dest="alphas", nargs="+", default=[], metavar="V",
                   help="values of α, the Rényi / power order (vae.objective.alpha)")
    p.add_argument("--grid", action="append", default=[], metavar="FIELD=V1,V2",
                   help="any other config field and its values (repeatable)")
    p.add_argument("--on", choices=("local", "kubernetes"), default="local",
                   help="local: one process per point on this machine; kubernetes: one driver Job per point")
    p.add_argument("--parallel", type=int, default=1, metavar="N", help="local: points run at once [default 1]")
    p.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="kubernetes: write the manifest here (for `kubectl apply -f`) instead of submitting it")
    p.add_argument("--api-server", default=None, metavar="URL",
                   help="kubernetes: API server URL (e.g. `kubectl proxy`'s); default the kubeconfig, else in-cluster")
    p.add_argument("--dry-run", action="store_true", help="print the points and their settings, run nothing")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_schema_options(p, hidden=("*",))
    p.set_defaults(handler=_main)


def _axes(args: argparse.Namespace) -> list[SweepAxis]:
    axes = []
    if args.lambdas:
        axes.append(parse_axis("lambda=" + ",".join(args.lambdas)))
    if args.alphas:
        axes.append(parse_axis("alpha=" + ",".join(args.alphas)))
    return axes + [parse_axis(text) for text in args.grid]


def local_tracking_uri(base: PipelineConfig) -> str:
    """The MLflow store of local runs of ``base``: ``tracking.uri``, else ``$MLFLOW_TRACKING_URI``, else the
    SQLite store next to the runs' folders (which the points' own work dirs, one level down, would not find)."""
    from pipeline.tracking.runs import default_tracking_uri

    return base.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(base.run_dir)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    if args.parallel < 1:
        print("error: --parallel must be at least 1", file=sys.stderr)
        return 2
    if args.manifest is not None and args.on != "kubernetes":
        print("error: --manifest writes a Kubernetes manifest; add --on kubernetes", file=sys.stderr)
        return 2
    try:
        base = load_config(args.config, schema_overrides(args))
        axes = _axes(args)
        points = expand_grid(axes)
        key = sweep_key(base, axes)
        uri = local_tracking_uri(base) if args.on == "local" and base.tracking.enabled else None
        configs = [point_config(base, point, key, tracking_uri=uri) for point in points]
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    experiment = base.tracking.experiment or base.name
    print(f"sweep {key} of {base.name}: {len(points)} points, experiment {experiment!r}, on {args.on}")
    for point, config in zip(points, configs):
        print(f"  {point.index}: {point.describe()}  ->  {config.name}")
    if args.dry_run:
        return 0
    if args.on == "kubernetes":
        return _kubernetes(args, base, configs, key, experiment)
    return _local(args, base, configs, axes, key, experiment, uri)


def sweep_objects(base: PipelineConfig, configs: list[PipelineConfig], key: str) -> list[dict[str, Any]]:
    """The Kubernetes objects of a sweep (checked as ``k8s-manifest`` checks one pipeline)."""
    from pipeline.k8s.builders import build_sweep_manifest
    from pipeline.k8s.commands import preflight

    for config in configs:
        preflight(config)
    return build_sweep_manifest(configs, f"{base.cluster.run_name or base.name}-sweep-{key[:6]}", key)


def render_sweep_manifest(argv: list[str] | tuple[str, ...]) -> str:
    """The manifest ``python -m pipeline sweep ARGV... --on kubernetes --manifest FILE`` writes (the shipped
    ``k8s/*_sweep.yaml`` come from here); raises :class:`~pipeline.config.ConfigError` on bad input."""
    import shlex

    from pipeline.k8s.builders import render_yaml

    parser = argparse.ArgumentParser(prog="python -m pipeline")
    register_commands(parser.add_subparsers(dest="stage"))
    args = parser.parse_args(["sweep", *argv])
    base = load_config(args.config, schema_overrides(args))
    axes = _axes(args)
    key = sweep_key(base, axes)
    configs = [point_config(base, point, key) for point in expand_grid(axes)]
    return render_yaml(sweep_objects(base, configs, key), header=_manifest_header(base, key, len(configs), shlex.join(argv)))


def _manifest_header(base: PipelineConfig, key: str, points: int, command: str) -> str:
    experiment = base.tracking.experiment or base.name
    return (f"Sweep {key} of {base.name}: {points} pipeline runs (one driver Job each), nested under one MLflow sweep run.\n"
            f"Generated by: python -m pipeline sweep {command} --on kubernetes --manifest FILE\n"
            f"The frontier once they finish: python -m pipeline pareto --experiment {experiment} --sweep {key}\n")


def _kubernetes(args: argparse.Namespace, base: PipelineConfig, configs: list[PipelineConfig], key: str,
                experiment: str) -> int:
    from pipeline.k8s.builders import render_yaml

    try:
        objects = sweep_objects(base, configs, key)
    except (ConfigError, ValueError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    follow = f"python -m pipeline pareto --experiment {experiment} --sweep {key}"
    if args.manifest is not None:
        args.manifest.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(sys.argv[2:]) if len(sys.argv) > 2 else f"--config {args.config} ..."
        args.manifest.write_text(render_yaml(objects, header=_manifest_header(base, key, len(configs), command)))
        print(f"manifest written to {args.manifest}: `kubectl apply -f {args.manifest}`; then `{follow}`")
        return 0
    from pipeline.sweep.kubernetes import api_client, submit_objects

    for what, state in submit_objects(objects, api_client(args.api_server)):
        print(f"  {what}: {state}")
    print(f"submitted; follow with `kubectl get jobs -n {base.cluster.namespace} -l app.kubernetes.io/part-of` "
          f"or MLflow, and draw the frontier with `{follow}`")
    return 0


def open_sweep_run(uri: str, experiment: str, key: str, *, name: str, tags: dict[str, str],
                   params: dict[str, str]) -> tuple[Any, str | None]:
    """The MLflow client and the sweep (or study) run of ``key`` in ``experiment``, created or reopened (set
    RUNNING, ``tags`` set, ``params`` logged unless logged before); (None, None) when the store cannot be
    reached: the points still run, and their own trackers keep their calls."""
    from mlflow.tracking import MlflowClient

    from pipeline.tracking.runs import find_or_create_sweep_run

    try:
        client = MlflowClient(tracking_uri=uri)
        found = client.get_experiment_by_name(experiment)
        experiment_id = found.experiment_id if found is not None else client.create_experiment(experiment)
        run_id = find_or_create_sweep_run(client, experiment_id, key, name=name, tags=tags)
        client.update_run(run_id, status="RUNNING")
        run = client.get_run(run_id)
        for tag, value in tags.items():
            if run.data.tags.get(tag) != value:
                client.set_tag(run_id, tag, value)
        for param, value in params.items():
            if param not in run.data.params:
                client.log_param(run_id, param, value)
        return client, run_id
    except Exception as err:  # an unreachable store must not stop the sweep
        log.warning("MLflow store %s not reachable (%s): the %s run is not recorded; its runs keep their calls",
                    uri, err, "study" if "pipeline.study" in tags else "sweep")
        return None, None


def _open_sweep_run(uri: str, experiment: str, key: str, base: PipelineConfig, axes_params: dict[str, str]):
    from pipeline.tracking.runs import sweep_run_name

    return open_sweep_run(uri, experiment, key, name=sweep_run_name(experiment, key), params=axes_params,
                          tags={"pipeline.config": base.name, "mlflow.source.name": "python -m pipeline sweep"})


def _local(args: argparse.Namespace, base: PipelineConfig, configs: list[PipelineConfig], axes: list[SweepAxis],
           key: str, experiment: str, uri: str | None) -> int:
    from pipeline.pareto.command import format_frontiers, write_pareto
    from pipeline.prepare_stage import run_prepare_outcome
    from pipeline.sweep.local import local_points, run_points

    directory = sweep_dir(base, key)
    point_params = [config.tracked_params() for config in configs]
    axes_params = {"sweep.config": base.name, "sweep.points": str(len(configs)),
                   "sweep.grid": json.dumps({a.field: [params.get(a.field) for params in point_params] for a in axes})}
    client, run_id = _open_sweep_run(uri, experiment, key, base, axes_params) if uri else (None, None)
    run_prepare_outcome(configs[0])  # once, before the points (which would otherwise race to build it)
    outcomes = run_points(configs, directory, parallel=args.parallel)
    failed = [o for o in outcomes if not o.ok]
    for outcome in outcomes:
        nll = outcome.metrics.get("valid_nll")
        mi = outcome.metrics.get("valid_mutual_information")
        figures = f"valid NLL {nll:.4f}, MI {mi:.4f}" if nll is not None and mi is not None else "no final metrics"
        print(f"  point {outcome.index} {outcome.name}: {'ok' if outcome.ok else 'FAILED'} ({figures}); log {outcome.log_path}")
    points = local_points(configs, outcomes)
    paths: tuple[Path, ...] = ()
    if points:
        print(format_frontiers(points))
        paths = write_pareto(points, directory, "pareto-valid", title=f"sweep {key} of {base.name}: valid NLL vs MI")
        print(f"Pareto plot {paths[0]}, frontier CSV {paths[1]}")
    if client is not None:
        try:
            for path in paths:
                client.log_artifact(run_id, str(path), "pareto")
            client.set_terminated(run_id, "FAILED" if failed else "FINISHED")
        except Exception as err:
            log.warning("could not record the sweep's results in MLflow (%s); they are in %s", err, directory)
    if failed:
        print(f"error: {len(failed)} of {len(outcomes)} points failed: {', '.join(str(o.log_path) for o in failed)}; "
              "fix and run the same command again (finished points are not repeated)", file=sys.stderr)
        return 1
    return 0

