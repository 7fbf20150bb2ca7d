"""Command-line interface: ``python -m pipeline <stage> --config <name-or-yaml> [--section.field value ...]``.

Stages: ``prepare``, ``train``, ``evaluate`` and ``run`` (all three in sequence); ``configs``
lists the shipped experiment configs. Every field of :class:`pipeline.config.PipelineConfig` is
also a command-line option (``--train.optimizer.lr 0.003``, ``--model.chrono_t_max null``): the
options are generated from the schema, values are parsed as YAML scalars and validated by it.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib
import os
import logging
import signal
import sys
import threading
import time
import typing
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import ConfigError, PipelineConfig, load_config, shipped_config_names
from pipeline.errors import STORAGE_ERRNOS, PipelineError, WorkDirError, unwritable, writing

__all__ = ["build_parser", "main"]

log = logging.getLogger("pipeline")

STAGES = ("prepare", "train", "evaluate", "run")
# Modules that register further subcommands through ``register_commands(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = ("pipeline.compare", "pipeline.k8s.commands")


def _is_section(annotation: Any) -> bool:
    return isinstance(annotation, type) and issubclass(annotation, BaseModel)


def schema_options(model: type[BaseModel] = PipelineConfig, prefix: str = "") -> Iterator[tuple[str, str]]:
    """(dotted field name, help text) for every leaf field of the schema, depth first."""
    for name, field in model.model_fields.items():
        dotted = f"{prefix}{name}"
        annotation = field.annotation
        if _is_section(annotation):
            yield from schema_options(annotation, prefix=f"{dotted}.")
            continue
        type_name = getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")
        if typing.get_origin(annotation) is typing.Literal:
            type_name = "|".join(str(a) for a in typing.get_args(annotation))
        default = "required" if field.is_required() else f"default {field.get_default(call_default_factory=True)!r}"
        yield dotted, f"{field.description or ''} [{type_name}; {default}]".strip()


def _parse_value(text: str) -> Any:
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        return text


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m pipeline",
        description="Recurrent LM pipeline: prepare data, train with Two-Tailed Averaging, evaluate.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="COMMAND")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage" if stage != "run" else "prepare, train and evaluate")
        p.add_argument("--config", required=True, help=f"shipped config name ({', '.join(shipped_config_names())}) or a YAML path")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if stage in ("prepare", "run"):
            p.add_argument("--force", action="store_true", help="rebuild the tokenised data even if it verifies")
        group = p.add_argument_group("config overrides (generated from the schema)")
        for dotted, help_text in schema_options():
            group.add_argument(f"--{dotted}", dest=f"override:{dotted}", metavar="VALUE", help=help_text.replace("%", "%%"))
    flush = sub.add_parser("flush", help="send MLflow calls left unsent (server down) by earlier stages of a run")
    flush.add_argument("--config", required=True, help="the run's config (name or YAML path) with its overrides")
    flush.add_argument("--timeout", type=float, default=60.0, help="seconds to keep trying [default 60]")
    flush.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    for dotted, help_text in schema_options():
        flush.add_argument(f"--{dotted}", dest=f"override:{dotted}", metavar="VALUE", help=argparse.SUPPRESS)
    sub.add_parser("configs", help="list the shipped experiment configs")
    for module_name in COMMAND_MODULES:
        # Each module adds its own subcommands (with a ``handler`` default taking the parsed args).
        importlib.import_module(module_name).register_commands(sub)
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key.split(":", 1)[1]: _parse_value(value)
        for key, value in vars(args).items()
        if key.startswith("override:") and value is not None
    }


def _save_resolved(config: PipelineConfig) -> None:
    path = config.run_dir / "resolved_config.yaml"
    with writing(path):
        config.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_yaml())


def run_stage(stage: str, config: PipelineConfig, *, force: bool = False) -> None:
    """Run one stage (or ``run`` = all) on a validated config, on this rank of the job.

    Under ``torchrun`` every rank calls this: data is prepared by the first rank of each node (the
    others wait), every rank trains, only rank 0 talks to MLflow and evaluates. Each stage is a
    nested MLflow run under the pipeline's parent run (see :mod:`pipeline.tracking`).
    """
    from pipeline.distributed import barrier, init_distributed, shutdown
    from pipeline.tracking import dataset_tags, open_tracker

    ctx = init_distributed(config.train.device) if stage in ("train", "run") else init_distributed("cpu")
    check_work_dir(config, ctx)
    tracker = open_tracker(config, command=stage, enabled=ctx.is_main)
    failed = True
    pipeline_status: str | None = None
    try:
        if ctx.is_main:
            _save_resolved(config)
        if stage in ("prepare", "run"):
            from pipeline.prepare_stage import run_prepare

            tracker.start_stage("prepare")
            started = time.perf_counter()
            manifest = run_prepare(config, force=force) if ctx.local_rank == 0 else None
            barrier(ctx)
            if manifest is not None:
                tracker.set_tags(dataset_tags(manifest))
                tracker.log_dict(manifest.model_dump(mode="json"), "dataset_manifest.json")
                tracker.log_metrics(
                    {**{f"data/{k}_tokens": v.num_tokens for k, v in manifest.splits.items()},
                     "data/vocab_size": manifest.vocab_size, "data/prepare_seconds": time.perf_counter() - started}
                )
            tracker.end_stage("FINISHED")
        if stage in ("train", "evaluate"):
            # Data prepared elsewhere (another pod, another machine): a verified local copy, fetched from
            # cluster.dataset_url when missing; one download per node.
            from pipeline.prepare_stage import ensure_local_dataset

            if ctx.local_rank == 0:
                ensure_local_dataset(config)
            barrier(ctx)
        if stage in ("train", "run"):
            from pipeline.train import run_train

            tracker.start_stage("train")
            tracker.set_tags({"pipeline.world_size": ctx.world_size, "pipeline.engine": config.train.engine,
                              "pipeline.device": config.train.device})
            run_train(config, tracker, ctx)
            tracker.end_stage("FINISHED")
        if stage in ("evaluate", "run") and ctx.is_main:
            from pipeline.evaluate import run_evaluate

            tracker.start_stage("evaluate")
            run_evaluate(config, tracker)
            tracker.end_stage("FINISHED")
            pipeline_status = "FINISHED"  # the last stage: the pipeline run is complete
        failed = False
    except BaseException as err:
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit)) else "FAILED"
        tracker.end_stage(status)
        raise
    finally:
        tracker.close(pipeline_status)
        shutdown(ctx, failed=failed)


def check_work_dir(config: PipelineConfig, ctx) -> None:
    """Fail at once, with one line and on every rank, when the work dir cannot be written."""
    from pipeline.distributed import on_main

    on_main(ctx, lambda: ensure_writable(config.run_dir))


def ensure_writable(folder: Path) -> None:
    """Create ``folder`` and write (then remove) a probe file in it; :class:`WorkDirError` if that fails."""
    probe = folder / f".write-probe-{os.getpid()}"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe.write_bytes(b"probe")
    except OSError as err:
        raise WorkDirError(unwritable(err, folder)) from None
    finally:
        with contextlib.suppress(OSError):
            probe.unlink()


def flush_pending(config: PipelineConfig, timeout: float) -> int:
    """Send the MLflow calls an earlier stage had to leave in ``<work_dir>/mlflow_pending.jsonl``."""
    from pipeline.tracking import open_tracker

    tracker = open_tracker(config, command="flush")
    pending = tracker.pending
    done = tracker.flush(timeout)
    tracker.close(timeout=0)
    if pending:
        print(f"{'sent' if done else 'could not send all of'} {pending} pending MLflow calls to {config.tracking.uri or 'the tracking server'}")
    else:
        print("nothing to send")
    return 0 if done else 1


def _terminate_on_sigterm() -> None:
    """Turn SIGTERM (pod eviction, preemption, torchrun stopping its workers) into SystemExit, so that
    stages close their MLflow runs as KILLED and spool unsent calls instead of vanishing mid-call."""

    def handler(signum, frame):  # noqa: ARG001 - signal handler signature
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    handler = getattr(args, "handler", None)
    if handler is not None:
        logging.basicConfig(
            level=getattr(logging, getattr(args, "log_level", "INFO")),
            format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr,
        )
        return int(handler(args) or 0)
    if args.stage == "configs":
        for name in shipped_config_names():
            print(name)
        return 0
    logging.basicConfig(
        level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s", stream=sys.stderr
    )
    try:
        config = load_config(args.config, _overrides(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage == "flush":
        return flush_pending(config, args.timeout)
    _terminate_on_sigterm()
    try:
        run_stage(args.stage, config, force=getattr(args, "force", False))
    except PipelineError as err:  # says what is wrong and what to do: no traceback
        log.error("%s", err)
        return err.exit_code
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:  # a full or read-only disk mid-run (work dir, caches)
            log.error("%s", unwritable(err))
            return WorkDirError.exit_code
        if isinstance(err, FileNotFoundError):
            log.error("%s", err)
            return 1
        raise
    except ValueError as err:
        log.error("%s", err)
        return 1
    return 0
