"""Command-line interface: ``python -m pipeline <stage> --config <name-or-yaml> [--section.field value ...]``.

Stages: ``prepare``, ``train``, ``evaluate`` and ``run`` (all three in sequence); ``configs``
lists the shipped experiment configs. Every field of :class:`pipeline.config.PipelineConfig` is
also a command-line option (``--train.optimizer.lr 0.003``, ``--model.chrono_t_max null``): the
options are generated from the schema, values are parsed as YAML scalars and validated by it.
"""

from __future__ import annotations

import argparse
import logging
import sys
import typing
from collections.abc import Iterator, Sequence
from typing import Any

import yaml
from pydantic import BaseModel

from pipeline.config import ConfigError, PipelineConfig, load_config, shipped_config_names

__all__ = ["build_parser", "main"]

log = logging.getLogger("pipeline")

STAGES = ("prepare", "train", "evaluate", "run")


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
    sub = parser.add_subparsers(dest="stage", required=True, metavar="{prepare,train,evaluate,run,configs}")
    for stage in STAGES:
        p = sub.add_parser(stage, help=f"run the {stage} stage" if stage != "run" else "prepare, train and evaluate")
        p.add_argument("--config", required=True, help=f"shipped config name ({', '.join(shipped_config_names())}) or a YAML path")
        p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
        if stage in ("prepare", "run"):
            p.add_argument("--force", action="store_true", help="rebuild the tokenised data even if it verifies")
        group = p.add_argument_group("config overrides (generated from the schema)")
        for dotted, help_text in schema_options():
            group.add_argument(f"--{dotted}", dest=f"override:{dotted}", metavar="VALUE", help=help_text.replace("%", "%%"))
    sub.add_parser("configs", help="list the shipped experiment configs")
    return parser


def _overrides(args: argparse.Namespace) -> dict[str, Any]:
    return {
        key.split(":", 1)[1]: _parse_value(value)
        for key, value in vars(args).items()
        if key.startswith("override:") and value is not None
    }


def _save_resolved(config: PipelineConfig) -> None:
    config.run_dir.mkdir(parents=True, exist_ok=True)
    (config.run_dir / "resolved_config.yaml").write_text(config.to_yaml())


def run_stage(stage: str, config: PipelineConfig, *, force: bool = False) -> None:
    """Run one stage (or ``run`` = all) on a validated config, on this rank of the job.

    Under ``torchrun`` every rank calls this: data is prepared by the first rank of each node (the
    others wait), every rank trains, only rank 0 talks to MLflow and evaluates.
    """
    from pipeline.distributed import barrier, init_distributed, shutdown
    from pipeline.tracking import Tracker, open_tracker

    ctx = init_distributed(config.train.device) if stage in ("train", "run") else init_distributed("cpu")
    failed = True
    try:
        if ctx.is_main:
            _save_resolved(config)
        if stage in ("prepare", "run"):
            from pipeline.prepare_stage import run_prepare

            if ctx.local_rank == 0:
                run_prepare(config, force=force)
            barrier(ctx)
        if stage == "prepare":
            failed = False
            return
        tracker = open_tracker(config) if ctx.is_main else Tracker(config, enabled=False)
        tracker.log_config(config)
        tracker.set_tags({"world_size": ctx.world_size, "engine": config.train.engine})
        status = "FAILED"
        try:
            if stage in ("train", "run"):
                from pipeline.train import run_train

                run_train(config, tracker, ctx)
            if stage in ("evaluate", "run") and ctx.is_main:
                from pipeline.evaluate import run_evaluate

                run_evaluate(config, tracker)
            status = "FINISHED"
        finally:
            if stage in ("evaluate", "run") or status == "FAILED":
                tracker.finish(status)
        failed = False
    finally:
        shutdown(ctx, failed=failed)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
    try:
        run_stage(args.stage, config, force=getattr(args, "force", False))
    except Exception as err:
        from pipeline.data import DataError

        if isinstance(err, (DataError, FileNotFoundError, ConfigError, ValueError)):
            log.error("%s", err)
            return 1
        raise
    return 0
