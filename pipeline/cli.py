"""Command-line interface: ``python -m pipeline <stage> --config <name-or-yaml> [--section.field value ...]``.

Stages: ``prepare``, ``train``, ``evaluate`` and ``run`` (all three in sequence); ``configs``
lists the shipped experiment configs; ``compare``, ``pareto`` (sentence VAEs' NLL-MI frontiers) and
``sweep`` (a grid of one config, locally or on Kubernetes) and ``tune`` (an Optuna study: trials sampled
from a search space, pruned on 2TA's reported loss) read or make several runs; the Kubernetes
commands are ``drive``, ``k8s-manifest``, ``fetch-data`` and ``create-buckets``. Every field of :class:`pipeline.config.PipelineConfig` is
also a command-line option (``--train.optimizer.lr 0.003``, ``--model.chrono_t_max null``): the
options are generated from the schema, values are parsed as YAML scalars and validated by it.
"""

from __future__ import annotations

import argparse
import importlib
import logging
import signal
import sys
import threading
from collections.abc import Sequence


from pipeline.cli_options import HELP_ALL, OptionParser, add_schema_options, schema_options, schema_overrides
from pipeline.config import ConfigError, PipelineConfig, load_config, shipped_config_purposes
from pipeline.errors import STORAGE_ERRNOS, PipelineError, TrialPruned, WorkDirError, unwritable
from pipeline.stages import run_stage

__all__ = ["build_parser", "main", "schema_options"]

log = logging.getLogger("pipeline")

STAGES = ("prepare", "train", "evaluate", "run")
# Modules that register further subcommands through ``register_commands(subparsers)``.
COMMAND_MODULES: tuple[str, ...] = ("pipeline.compare", "pipeline.pareto", "pipeline.sweep", "pipeline.tune",
                                     "pipeline.k8s.commands")


# Each stage's line in the command list, and the description its --help starts with.
_STAGE_HELP = {
    "prepare": ("download, verify and tokenise the dataset", "Download, verify and tokenise the dataset of a config."),
    "train": ("train with Two-Tailed Averaging", "Train the model of a config with Two-Tailed Averaging, resuming from its "
              "latest checkpoint."),
    "evaluate": ("score the trained model on valid and test", "Score the trained model on the validation and test "
                 "splits: a language model with and without a tuned softmax temperature, a sentence VAE by its "
                 "importance-sampled NLL, KL, mutual information and active units."),
    "run": ("prepare, train and evaluate", "Prepare, train and evaluate in one go."),
}
_OVERRIDES_HELP = "Any config field is an option: --section.field VALUE (a YAML value; null for none)."
# Kubernetes settings: no local stage reads them, so their --help leaves them out (they are still accepted);
# nor does it show the other model family's section (an LM's help leaves out vae.*, a VAE's model.*).
# The tune.* options are set by `python -m pipeline tune` on its trials' configs: accepted, not shown either.
_HIDDEN_LOCALLY = ("cluster", "tune")
_EVALUATION_ONLY = ("evaluate.dynamic", "evaluate.mc_dropout")  # shown by evaluate and run only
_OTHER_TASK_SECTION = {"lm": "vae", "vae": "model"}
_LOG_LEVELS = ["DEBUG", "INFO", "WARNING", "ERROR"]
_VERBOSE_HELP = "show third-party logs and warnings and the pipeline's debug lines"


def _add_common_options(parser: argparse.ArgumentParser, config_help: str) -> None:
    parser.add_argument("--config", required=True, metavar="NAME|FILE", help=config_help)
    parser.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    parser.add_argument("--log-level", default="INFO", choices=_LOG_LEVELS, help="level of the log lines [default INFO]")


def build_parser(task: str = "lm") -> argparse.ArgumentParser:
    """The ``python -m pipeline`` parser: the stages, ``flush``, ``configs`` and the registered commands.

    A stage's ``--help`` shows its options grouped by config section, one line each, without the
    ``--cluster.*`` ones and those of the other model family than ``task`` (``--help-all`` shows every
    option); an unknown option is an error of the subcommand that names the closest real one
    (:class:`pipeline.cli_options.OptionParser`).
    """
    other = _OTHER_TASK_SECTION[task]
    parser = OptionParser(
        prog="python -m pipeline",
        description="Recurrent LM and sentence VAE pipeline: prepare data, train with Two-Tailed Averaging, evaluate.",
    )
    sub = parser.add_subparsers(dest="stage", required=True, metavar="COMMAND")
    usage = "%(prog)s --config NAME|FILE [--section.field VALUE ...] [options]"
    for stage in STAGES:
        short, description = _STAGE_HELP[stage]
        p = sub.add_parser(stage, help=short, usage=usage, allow_abbrev=False, description=f"{description} {_OVERRIDES_HELP}",
                           epilog=f"The --cluster.* options (Kubernetes runs) are accepted but not shown: {HELP_ALL} shows "
                                  f"them. So are the --{other}.* options (task {'vae' if other == 'vae' else 'lm'}) and the "
                                  "--tune.* ones (`tune` sets them on its trials)"
                                  + ("." if stage in ("evaluate", "run") else
                                     ", and the --evaluate.dynamic.* and --evaluate.mc_dropout.* ones (shown by evaluate "
                                     "and run)."))
        _add_common_options(p, "a shipped config (`python -m pipeline configs` lists them) or a YAML file")
        if stage in ("prepare", "run", "evaluate"):
            p.add_argument("--force", action="store_true", help={
                "prepare": "rebuild the tokenised data even if it verifies",
                "evaluate": "evaluate again even if this final model was evaluated with these settings",
                "run": "rebuild the data even if it verifies, and evaluate again"}[stage])
        # Dynamic / MC-dropout evaluation settings matter to the stages that evaluate; elsewhere --help-all.
        evaluation_only = () if stage in ("evaluate", "run") or other == "model" else _EVALUATION_ONLY
        add_schema_options(p, hidden=(*_HIDDEN_LOCALLY, other, *evaluation_only))
    flush = sub.add_parser("flush", help="send MLflow calls left unsent (server down) by earlier stages of a run",
                           usage=usage, allow_abbrev=False,
                           epilog=f"The config overrides of the run (--section.field VALUE) are accepted: {HELP_ALL} shows them.")
    _add_common_options(flush, "the run's config (name or YAML file), given with the run's overrides")
    flush.add_argument("--timeout", type=float, default=60.0, metavar="SECONDS", help="how long to keep trying [default 60]")
    add_schema_options(flush, hidden=("*",))
    sub.add_parser("configs", help="list the shipped experiment configs with their purpose")
    for module_name in COMMAND_MODULES:
        # Each module adds its own subcommands (with a ``handler`` default taking the parsed args).
        importlib.import_module(module_name).register_commands(sub)
    for name, command in sub.choices.items():
        # The registered commands too: quiet by default everywhere.
        if name != "configs" and "--verbose" not in command._option_string_actions:
            command.add_argument("--verbose", action="store_true", help=_VERBOSE_HELP)
    return parser


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


def _print_configs() -> None:
    purposes = shipped_config_purposes()
    width = max(map(len, purposes), default=0)
    for name, purpose in purposes.items():
        print(f"{name:<{width}}  {purpose}".rstrip())


def _task_of(argv: Sequence[str] | None) -> str:
    """The task of the ``--config`` on the command line (for which options ``--help`` shows); lm if unknown."""
    args = list(sys.argv[1:] if argv is None else argv)
    task = "lm"
    for i, arg in enumerate(args[:-1]):
        value = args[i + 1]
        if arg == "--task" and value in _OTHER_TASK_SECTION:
            return value
        if arg == "--config":
            try:
                task = load_config(value).task
            except (ConfigError, OSError):
                pass
    return task


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``python -m pipeline`` with ``argv``; the exit code (argparse exits 2 itself on a bad command line)."""
    from pipeline.console import configure_output

    parser = build_parser(_task_of(argv))
    args = parser.parse_args(argv)
    if args.stage == "configs":
        _print_configs()
        return 0
    # Before anything imports MLflow: it quiets third-party output unless --verbose.
    configure_output(verbose=getattr(args, "verbose", False), log_level=getattr(args, "log_level", None))
    handler = getattr(args, "handler", None)
    if handler is not None:
        return int(handler(args) or 0)
    try:
        config = load_config(args.config, schema_overrides(args))
    except ConfigError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if args.stage == "flush":
        return flush_pending(config, args.timeout)
    _terminate_on_sigterm()
    try:
        run_stage(args.stage, config, force=getattr(args, "force", False), config_source=args.config)
    except TrialPruned as err:  # an Optuna trial stopped by its study's pruner: a decision, not an error
        log.info("%s", err)
        return err.exit_code
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
