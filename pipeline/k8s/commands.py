"""Kubernetes subcommands: ``drive``, ``k8s-manifest``, ``fetch-data`` and ``create-buckets``.

Registered on ``python -m pipeline`` through :func:`register_commands` (``COMMAND_MODULES`` in
:mod:`pipeline.cli`), and runnable on their own as ``python -m pipeline.k8s <command>`` - which is
what the manifests' containers run.

* ``drive --config FILE``: the in-cluster driver (:mod:`pipeline.k8s.driver`). Exit codes: 0 done,
  3 a stage failed for good, 2 bad config / not inside the driver Job, 1 unexpected (the driver
  Job retries its pod, which adopts the stage Jobs).
* ``k8s-manifest --config NAME [--what pipeline|nightly] | --what namespace|minio|mlflow``: print
  the manifest to ``kubectl apply -f``.
* ``fetch-data --config FILE``: a verified local copy of the dataset (the init container of the
  train and evaluate pods; see :func:`pipeline.prepare_stage.ensure_local_dataset`).
* ``create-buckets URL...``: create missing object-storage buckets (MinIO starts with none).
"""

from __future__ import annotations

import argparse
import logging
import shlex
import sys
from collections.abc import Sequence
from typing import Any


from pipeline.cli_options import schema_overrides
from pipeline.config import ClusterConfig, ConfigError, PipelineConfig, load_config, set_dotted

__all__ = ["build_parser", "main", "manifest_text", "preflight", "register_commands", "render_manifest"]

log = logging.getLogger("pipeline.k8s")

MANIFEST_KINDS = ("pipeline", "nightly", "namespace", "minio", "mlflow")
DEFAULT_SCHEDULE = "0 3 * * *"


# argparse's generated usage would list every schema option (a page long).
_USAGE = "%(prog)s [--config NAME|FILE] [--section.field VALUE ...] [options]"


def _add_config_options(parser: argparse.ArgumentParser, *, required: bool = True) -> None:
    from pipeline.cli_options import add_schema_options  # the same generated options as the stage commands

    parser.add_argument("--config", required=required, help="shipped config name or YAML path")
    parser.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_schema_options(parser)  # grouped by section; the cluster options matter most here, none hidden


def _load(args: argparse.Namespace) -> PipelineConfig:
    return load_config(args.config, schema_overrides(args))


def _config_error(err: ConfigError | ValueError) -> int:
    print(f"error: {err}", file=sys.stderr)
    return 2


# ---------------------------------------------------------------------------------------------
# drive


def _drive(args: argparse.Namespace) -> int:
    from pipeline.k8s.builders import DRIVER_FAILED_EXIT_CODE
    from pipeline.k8s.driver import DriverEnvironmentError, PipelineDriver, StageFailed, driver_ref_from_env

    try:
        config = _load(args)
        driver = driver_ref_from_env()
    except (ConfigError, DriverEnvironmentError) as err:
        return _config_error(err)
    from kubernetes import client
    from kubernetes import config as kube_config

    if args.api_server:
        configuration = client.Configuration()
        configuration.host = args.api_server
        api_client = client.ApiClient(configuration)
    else:
        try:
            kube_config.load_incluster_config()
        except kube_config.ConfigException as err:
            print(f"error: not inside a pod ({err}); give --api-server (e.g. `kubectl proxy`'s URL)", file=sys.stderr)
            return 2
        api_client = client.ApiClient()
    try:
        PipelineDriver(config, driver, api_client).run()
    except StageFailed as err:
        log.error("%s", err)
        return DRIVER_FAILED_EXIT_CODE
    return 0


# ---------------------------------------------------------------------------------------------
# k8s-manifest


def _cluster_only(overrides: dict[str, Any]) -> ClusterConfig:
    """The cluster section from ``--cluster.*`` options alone (manifests that need no experiment)."""
    others = sorted(k for k in overrides if not k.startswith("cluster."))
    if others:
        raise ConfigError(f"{', '.join(others)}: only --cluster.* options apply without --config")
    tree: dict[str, Any] = {}
    for dotted, value in overrides.items():
        set_dotted(tree, dotted, value)
    try:
        return ClusterConfig.model_validate(tree.get("cluster", {}))
    except ValueError as err:
        raise ConfigError(f"invalid cluster options: {err}") from None


def preflight(config: PipelineConfig) -> None:
    """Problems the cluster would only find after pulling images and scheduling GPUs."""
    cluster = config.cluster
    ranks = cluster.nodes * (cluster.nproc_per_node or cluster.train.gpus or 1)
    if config.train.batch_size % ranks:
        raise ConfigError(f"train.batch_size {config.train.batch_size} is not divisible by the {ranks} ranks of "
                          f"cluster.nodes x processes per node; change one of them")
    if (config.train.batch_size // ranks) % config.train.grad_accum_steps:
        raise ConfigError(f"each of the {ranks} ranks gets {config.train.batch_size // ranks} stripes, not divisible "
                          f"by train.grad_accum_steps {config.train.grad_accum_steps}")
    if config.train.device == "cpu" and cluster.train.gpus:
        raise ConfigError("train.device is cpu but cluster.train.gpus > 0 GPUs would sit idle; set cluster.train.gpus 0")


def manifest_text(what: str, config: PipelineConfig | None, cluster: ClusterConfig, *,
                  schedule: str = DEFAULT_SCHEDULE, command: str = "") -> str:
    """The YAML of one manifest kind (see ``MANIFEST_KINDS``)."""
    from pipeline.k8s import builders

    if what in ("pipeline", "nightly"):
        if config is None:
            raise ConfigError(f"--what {what} needs --config (the experiment to run)")
        preflight(config)
        objects = (builders.build_pipeline_manifest(config) if what == "pipeline"
                   else builders.build_nightly_manifest(config, schedule))
    elif what == "namespace":
        objects = builders.build_namespace(cluster)
    elif what == "minio":
        objects = builders.build_minio_manifest(cluster)
    elif what == "mlflow":
        objects = builders.build_mlflow_manifest(cluster)
    else:
        raise ConfigError(f"unknown manifest {what!r}; choose one of {', '.join(MANIFEST_KINDS)}")
    header = ""
    if command:
        header = (f"Generated by: {command}\n"
                  "Do not edit: change the config or pipeline/k8s/builders.py and regenerate the shipped\n"
                  "manifests with `python -m pipeline.k8s.shipped` (tests/test_k8s_manifests.py checks they match).")
    return builders.render_yaml(objects, header)


def _command_line(args: argparse.Namespace) -> str:
    parts = ["python", "-m", "pipeline.k8s", "k8s-manifest"]
    if args.config:
        parts += ["--config", args.config]
    if args.what != "pipeline":
        parts += ["--what", args.what]
    if args.what == "nightly":
        parts += ["--schedule", args.schedule]
    for dotted, value in vars(args).items():
        if dotted.startswith("override:") and value is not None:
            parts += [f"--{dotted.split(':', 1)[1]}", value]
    return " ".join(shlex.quote(p) for p in parts)


def _manifest_from_args(args: argparse.Namespace) -> str:
    overrides = schema_overrides(args)
    config = load_config(args.config, overrides) if args.config else None
    cluster = config.cluster if config is not None else _cluster_only(overrides)
    return manifest_text(args.what, config, cluster, schedule=args.schedule, command=_command_line(args))


def render_manifest(argv: Sequence[str]) -> str:
    """What ``python -m pipeline.k8s k8s-manifest ARGV...`` prints (:class:`ConfigError` on bad input)."""
    return _manifest_from_args(build_parser().parse_args(["k8s-manifest", *argv]))


def _k8s_manifest(args: argparse.Namespace) -> int:
    try:
        text = _manifest_from_args(args)
    except (ConfigError, ValueError) as err:
        return _config_error(err)
    if args.output:
        with open(args.output, "w", encoding="utf-8") as f:
            f.write(text)
    else:
        sys.stdout.write(text)
    return 0


# ---------------------------------------------------------------------------------------------
# fetch-data, create-buckets


def _fetch_data(args: argparse.Namespace) -> int:
    from pipeline.data import DataError
    from pipeline.prepare_stage import ensure_local_dataset

    try:
        config = _load(args)
    except ConfigError as err:
        return _config_error(err)
    try:
        manifest = ensure_local_dataset(config)
    except DataError as err:
        log.error("%s", err)
        return 1
    log.info("dataset %s ready in %s (%s)", manifest.name, config.data_dir,
             ", ".join(f"{k} {v.num_tokens:,} tokens" for k, v in manifest.splits.items()))
    return 0


def _create_buckets(args: argparse.Namespace) -> int:
    from pipeline.data import DataError
    from pipeline.data.store import ensure_bucket

    try:
        for url in args.urls:
            ensure_bucket(url)
            log.info("bucket of %s ready", url)
    except DataError as err:
        log.error("%s", err)
        return 1
    return 0


# ---------------------------------------------------------------------------------------------


def register_commands(subparsers: Any) -> None:
    """Add ``drive``, ``k8s-manifest``, ``fetch-data`` and ``create-buckets`` to ``subparsers``."""
    drive = subparsers.add_parser("drive", allow_abbrev=False, usage=_USAGE, help="run a whole pipeline on Kubernetes (inside the driver Job)")
    _add_config_options(drive)
    drive.add_argument("--api-server", default=None,
                       help="API server URL (e.g. http://127.0.0.1:8001 of `kubectl proxy`); default in-cluster")
    drive.set_defaults(handler=_drive)

    manifest = subparsers.add_parser("k8s-manifest", allow_abbrev=False, usage=_USAGE, help="print a Kubernetes manifest to `kubectl apply -f`")
    _add_config_options(manifest, required=False)
    manifest.add_argument("--what", choices=MANIFEST_KINDS, default="pipeline",
                          help="pipeline: one-apply run of --config; nightly: a CronJob of it; namespace, minio, "
                               "mlflow: the shared services (only --cluster.* options apply)")
    manifest.add_argument("--schedule", default=DEFAULT_SCHEDULE, help="cron schedule (UTC) of --what nightly")
    manifest.add_argument("--output", "-o", default=None, help="write to this file instead of stdout")
    manifest.set_defaults(handler=_k8s_manifest)

    fetch = subparsers.add_parser("fetch-data", allow_abbrev=False, help="a verified local copy of the dataset (local, else from cluster.dataset_url)")
    _add_config_options(fetch)
    fetch.set_defaults(handler=_fetch_data)

    buckets = subparsers.add_parser("create-buckets", allow_abbrev=False, help="create missing object-storage buckets")
    buckets.add_argument("urls", nargs="+", metavar="URL", help="s3://bucket[/prefix]")
    buckets.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    buckets.set_defaults(handler=_create_buckets)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m pipeline.k8s", description=__doc__.split("\n\n")[0])
    register_commands(parser.add_subparsers(dest="command", required=True, metavar="COMMAND"))
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=getattr(logging, args.log_level),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr)
    return int(args.handler(args) or 0)
