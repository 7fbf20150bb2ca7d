"""The ``tune`` command: an Optuna study over any config fields, each trial a pipeline run.

``python -m pipeline tune --config NAME --space SPACE --trials N [--parallel P] [--on local|kubernetes]``
samples N trials from the search space (a shipped space by name, see ``pipeline/configs/spaces``, or a
YAML file), runs each as its own pipeline run nested under one MLflow study run, prunes the unpromising
ones on 2TA's reported validation loss while they train, and ends with the study's plots (optimisation
history, parameter importances, the best trial's neighbourhood; a VAE study's Pareto front). Running the
same command again continues the study: only the remaining trials run, and trials a killed driver left
behind are re-queued and resume from their checkpoints. Config overrides (``--section.field VALUE``)
apply to every trial.
"""

from __future__ import annotations

import argparse
import csv
import logging
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Any

from pipeline.cli_options import schema_overrides
from pipeline.config import ConfigError, PipelineConfig, load_config
from pipeline.tune_config import PRUNERS, storage_has_password

__all__ = ["register_commands"]

log = logging.getLogger("pipeline.tune")

_USAGE = ("%(prog)s --config NAME|FILE --space NAME|FILE --trials N [--parallel P] [--on local|kubernetes] "
          "[--storage URL] [--study NAME] [--prune reported|raw|none] [--section.field VALUE ...] [options]")


def register_commands(subparsers: Any) -> None:
    """Add the ``tune`` subcommand to an argparse subparsers."""
    from pipeline.cli_options import add_schema_options
    from pipeline.tune.space import shipped_space_names

    p = subparsers.add_parser(
        "tune", usage=_USAGE, allow_abbrev=False,
        help="an Optuna study over any config fields, each trial a nested run, pruned on 2TA's reported loss",
        description=__doc__.split("\n\n")[1].replace("\n", " ").replace("``", ""))
    p.add_argument("--config", required=True, metavar="NAME|FILE", help="the base config (shipped name or YAML file)")
    p.add_argument("--space", required=True, metavar="NAME|FILE",
                   help=f"the search space: a shipped one ({', '.join(shipped_space_names())}) or a YAML file")
    p.add_argument("--trials", type=int, required=True, metavar="N",
                   help="finished trials (complete or pruned) the study should have; again with a larger N continues it")
    p.add_argument("--parallel", type=int, default=1, metavar="P", help="trials run at once [default 1]")
    p.add_argument("--on", choices=("local", "kubernetes"), default="local",
                   help="local: one process per trial; kubernetes: one driver Job per trial, watched from here")
    p.add_argument("--storage", default=None, metavar="URL",
                   help="Optuna RDB storage; default sqlite:///<run dir>/tune-<key>/study.db")
    p.add_argument("--study", default=None, metavar="NAME", help="study name; default <config name>-<key>")
    p.add_argument("--objective", nargs="+", default=None, metavar="METRIC",
                   help="final metrics to optimise: one (valid_nll) or two (valid_nll valid_mutual_information); "
                   "default the space's, else valid_nll for a language model and both for a sentence VAE")
    p.add_argument("--prune", choices=("reported", "raw", "none"), default="reported",
                   help="the loss trials report at each evaluation and are pruned on: 2TA's reported weights "
                   "[default], the raw weights, or none (reported, never pruned)")
    p.add_argument("--pruner", choices=[k for k in PRUNERS if k != "none"], default="median",
                   help="the Optuna pruner [default median]")
    p.add_argument("--pruner-startup", type=int, default=5, metavar="N",
                   help="median / percentile: no pruning before N trials finished [default 5]")
    p.add_argument("--pruner-warmup", type=int, default=0, metavar="STEPS",
                   help="median / percentile: no pruning before this optimizer step [default 0]")
    p.add_argument("--pruner-percentile", type=float, default=25.0, metavar="P", help="percentile pruner's P [25]")
    p.add_argument("--seed", type=int, default=0, help="the sampler's seed [default 0]")
    p.add_argument("--max-failures", type=int, default=3, metavar="N",
                   help="stop asking for trials after N failed ones in this run [default 3]")
    p.add_argument("--manifest", type=Path, default=None, metavar="FILE",
                   help="kubernetes: write the Jobs of the first --parallel trials (a preview, told to no study) "
                   "for `kubectl apply -f` instead of running the study")
    p.add_argument("--api-server", default=None, metavar="URL",
                   help="kubernetes: API server URL (e.g. `kubectl proxy`'s); default the kubeconfig, else in-cluster")
    p.add_argument("--dry-run", action="store_true",
                   help="check the space against the config and show the first trials' settings; run nothing")
    p.add_argument("--log-level", default="INFO", choices=["DEBUG", "INFO", "WARNING", "ERROR"])
    add_schema_options(p, hidden=("*",))
    p.set_defaults(handler=_main)


def _error(message: str, code: int = 2) -> int:
    print(f"error: {message}", file=sys.stderr)
    return code


def _settings(args: argparse.Namespace, base: PipelineConfig, space: Any, notes: list[str]) -> Any:
    from pipeline.tune.space import default_objectives, direction_of
    from pipeline.tune.study import StudySettings

    objectives = tuple(args.objective) if args.objective else (space.objectives or default_objectives(base.task))
    if len(objectives) > 2:
        raise ConfigError("--objective takes one or two metrics (e.g. valid_nll valid_mutual_information)")
    directions = tuple(direction_of(m) for m in objectives)
    pruner = "none" if args.prune == "none" else args.pruner
    if len(objectives) > 1 and pruner != "none":
        notes.append("Optuna cannot prune a multi-objective study: pruning is off (trials run to the end)")
        pruner = "none"
    return StudySettings(objectives=objectives, directions=directions,
                         prune_on="reported" if args.prune == "none" else args.prune, pruner=pruner,
                         startup_trials=args.pruner_startup, warmup_steps=args.pruner_warmup,
                         percentile=args.pruner_percentile, seed=args.seed)


def _plan(args: argparse.Namespace) -> tuple[Any, list[str]]:
    """The study plan from the command line; :class:`ConfigError` on a bad config, space or objective."""
    from pipeline.sweep.command import local_tracking_uri
    from pipeline.tune.driver import StudyPlan
    from pipeline.tune.space import load_space, validate_space
    from pipeline.tune.study import default_storage, study_key, tune_dir

    base = load_config(args.config, schema_overrides(args))
    space = load_space(args.space)
    validate_space(space, base)
    notes: list[str] = []
    settings = _settings(args, base, space, notes)
    key = study_key(base, space, settings)
    directory = tune_dir(base, key)
    storage = args.storage or default_storage(directory)
    if args.storage and storage_has_password(storage):
        raise ConfigError("--storage holds a password, which the trials' configs would log: give it to the database "
                          "client through the environment (e.g. PGPASSWORD) instead")
    trial_storage: str | None = storage
    if settings.multi_objective:
        trial_storage = None
    elif args.on == "kubernetes" and storage.startswith("sqlite:"):
        notes.append(f"the trials' pods cannot reach the SQLite storage {storage}: they report nothing and are not "
                     "pruned; pass --storage with a database the pods reach (postgresql://user@host/optuna)")
        trial_storage = None
    uri = local_tracking_uri(base) if args.on == "local" and base.tracking.enabled else None
    plan = StudyPlan(base=base, space=space, settings=settings, key=key, study_name=args.study or f"{base.name}-{key}",
                     directory=directory, trial_storage=trial_storage, tracking_uri=uri)
    return plan, notes


def _describe(plan: Any, args: argparse.Namespace, notes: list[str]) -> None:
    s = plan.settings
    experiment = plan.base.tracking.experiment or plan.base.name
    goal = ", ".join(f"{d} {m}" for m, d in zip(s.objectives, s.directions))
    pruning = "off" if s.pruner == "none" else f"{s.pruner} pruner on the {s.prune_on} validation loss"
    print(f"study {plan.study_name} (key {plan.key}) of {plan.base.name}: {args.trials} trials, {goal}; pruning "
          f"{pruning}; experiment {experiment!r}, on {args.on}")
    print(f"  space {plan.space.name}: " + "; ".join(f"{p.name} {p.describe()}" for p in plan.space.params))
    if plan.space.fixed:
        print("  fixed: " + ", ".join(f"{k}={v}" for k, v in plan.space.fixed.items()))
    for note in notes:
        print(f"  note: {note}")


def _preview(plan: Any, count: int) -> list[tuple[dict[str, Any], PipelineConfig]]:
    """The first ``count`` trials a fresh study would run (sampled in memory; no storage is touched)."""
    import optuna

    from pipeline.tune.space import distributions
    from pipeline.tune.study import _quiet_optuna, build_sampler

    _quiet_optuna()
    study = optuna.create_study(directions=list(plan.settings.directions), sampler=build_sampler(plan.settings, 0))
    dists = distributions(plan.space)
    out = []
    for slot in range(count):
        trial = study.ask(dists)
        out.append((trial.params, plan.config(slot, trial.params)))
    return out


def _manifest_header(plan: Any, count: int, command: str) -> str:
    return (f"A preview of study {plan.study_name} (key {plan.key}) of {plan.base.name}: its first {count} trials as "
            "driver Jobs, nested under one MLflow study run.\n"
            f"Generated by: python -m pipeline tune {command} --on kubernetes --manifest FILE\n"
            "Applied by hand these trials are told to no study: run the study itself with `python -m pipeline tune "
            "... --on kubernetes` (it submits, watches and tells each trial).\n")


def _terminate_on_sigterm() -> None:
    def handler(signum: int, frame: Any) -> None:  # noqa: ARG001 - signal handler signature
        raise SystemExit(128 + signum)

    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGTERM, handler)


def _main(args: argparse.Namespace) -> int:
    logging.basicConfig(level=getattr(logging, args.log_level), format="%(asctime)s %(levelname)s %(name)s: %(message)s",
                        stream=sys.stderr)
    for flag, value in (("--trials", args.trials), ("--parallel", args.parallel), ("--max-failures", args.max_failures)):
        if value < 1:
            return _error(f"{flag} must be at least 1")
    if args.manifest is not None and args.on != "kubernetes":
        return _error("--manifest writes a Kubernetes manifest; add --on kubernetes")
    try:
        plan, notes = _plan(args)
    except ConfigError as err:
        return _error(str(err))
    _describe(plan, args, notes)
    if args.dry_run or args.manifest is not None:
        return _dry_run(plan, args)
    from pipeline.tune.study import DriverLock, StudyError

    _terminate_on_sigterm()
    try:
        with DriverLock(plan.directory):
            return _drive(plan, args)
    except StudyError as err:
        return _error(str(err), err.exit_code)
    except (KeyboardInterrupt, SystemExit) as err:  # Ctrl-C, SIGTERM: the running trials were stopped
        code = err.code if isinstance(err, SystemExit) and isinstance(err.code, int) else 130
        print(f"interrupted: the running trials stopped and stay RUNNING in study {plan.study_name}; the same command "
              "again re-queues them (they resume from their checkpoints) and runs the rest", file=sys.stderr)
        return code


def _dry_run(plan: Any, args: argparse.Namespace) -> int:
    count = max(1, min(args.trials, args.parallel)) if args.manifest is not None else min(args.trials, 3)
    try:
        preview = _preview(plan, count)
    except ConfigError as err:
        return _error(str(err))
    print(f"  the first {count} trials of a fresh study (seed {plan.settings.seed}):")
    for slot, (params, config) in enumerate(preview):
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())
        print(f"    trial {slot}: {shown}  ->  {config.name} in {config.run_dir}")
    if args.on != "kubernetes":
        return 0
    from pipeline.k8s.builders import build_sweep_manifest, render_yaml
    from pipeline.k8s.commands import preflight

    configs = [config for _, config in preview]
    try:
        for config in configs:
            preflight(config)
        objects = build_sweep_manifest(configs, f"{plan.study_name}-study", plan.key)
    except (ConfigError, ValueError) as err:
        return _error(str(err))
    if args.manifest is not None:
        args.manifest.parent.mkdir(parents=True, exist_ok=True)
        command = " ".join(sys.argv[2:]) if len(sys.argv) > 2 else f"--config {args.config} --space {args.space} ..."
        args.manifest.write_text(render_yaml(objects, header=_manifest_header(plan, len(configs), command)))
        print(f"manifest of {len(configs)} trial(s) written to {args.manifest}")
    else:
        print(f"  {len(objects)} Kubernetes objects of these trials checked (a driver account, a ConfigMap and a Job "
              "per trial)")
    return 0


def _open_mlflow(plan: Any, uri: str | None, args: argparse.Namespace, storage: str) -> Any:
    from pipeline.sweep.command import open_sweep_run
    from pipeline.tracking.runs import STUDY_TAG, study_run_name
    from pipeline.tune.driver import StudyRun

    experiment = plan.base.tracking.experiment or plan.base.name
    if uri is None:
        return StudyRun(None, None, experiment=experiment, key=plan.key, study_name=plan.study_name)
    s = plan.settings
    params = {"tune.study": plan.study_name, "tune.space": plan.space.name, "tune.config": plan.base.name,
              "tune.storage": storage, "tune.objectives": ",".join(s.objectives),
              "tune.directions": ",".join(s.directions), "tune.pruner": s.pruner, "tune.prune_on": s.prune_on,
              "tune.seed": str(s.seed), **{f"tune.space.{p.name}": p.describe() for p in plan.space.params}}
    tags = {"pipeline.config": plan.base.name, "mlflow.source.name": "python -m pipeline tune", STUDY_TAG: plan.study_name,
            "tune.trials_target": str(args.trials), "tune.on": args.on}
    client, run_id = open_sweep_run(uri, experiment, plan.key, name=study_run_name(experiment, plan.key), tags=tags,
                                    params=params)
    return StudyRun(client, run_id, experiment=experiment, key=plan.key, study_name=plan.study_name)


def _executor(plan: Any, args: argparse.Namespace, uri: str | None) -> Any:
    from pipeline.tune.trials import KubernetesTrials, LocalTrials

    if args.on == "local":
        return LocalTrials(plan.directory, parallel=args.parallel)
    from pipeline.sweep.kubernetes import api_client

    return KubernetesTrials(api_client(args.api_server), study_name=plan.study_name, key=plan.key, tracking_uri=uri,
                            experiment=plan.base.tracking.experiment or plan.base.name, parallel=args.parallel)


def _drive(plan: Any, args: argparse.Namespace) -> int:
    from pipeline.tune.driver import run_study
    from pipeline.tune.study import default_storage, finished_count, open_study, requeue_stale_trials

    storage = args.storage or default_storage(plan.directory)
    uri = plan.tracking_uri
    if args.on == "kubernetes":
        uri = plan.base.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI")
        if uri is None:
            return _error("a study on Kubernetes reads its trials' final metrics from MLflow: set MLFLOW_TRACKING_URI "
                          "(or --tracking.uri) to the cluster's tracking server as reached from here, e.g. "
                          "`kubectl -n rlm-pipeline port-forward svc/mlflow 5000` and http://127.0.0.1:5000")
    study = open_study(plan.study_name, storage, plan.settings, parallel=args.parallel)
    for number, slot in requeue_stale_trials(study):
        print(f"  trial {number} was left running by a driver that stopped: failed, re-queued in slot {slot} "
              "(it resumes from its checkpoints)")
    done = finished_count(study)
    if done >= args.trials:
        print(f"nothing to do: the study has {done} finished trials (--trials {args.trials}); raise --trials to "
              "continue it")
        return _finish(study, plan, args, _open_mlflow(plan, uri if plan.base.tracking.enabled else None, args, storage),
                       storage, aborted=False)
    mlflow = _open_mlflow(plan, uri if plan.base.tracking.enabled else None, args, storage)
    if args.on == "local":
        from pipeline.prepare_stage import run_prepare_outcome

        run_prepare_outcome(plan.base)  # once, before the trials (which would otherwise race to build it)
    print(f"  {done} of {args.trials} trials finished; running {args.trials - done} more, {args.parallel} at a time; "
          f"logs and work dirs in {plan.directory}")
    try:
        outcome = run_study(study, plan, _executor(plan, args, uri), args.trials, max_failures=args.max_failures,
                            mlflow=mlflow)
    except BaseException:
        mlflow.end("KILLED")
        raise
    return _finish(study, plan, args, mlflow, storage, aborted=outcome.aborted, failures=outcome.failures)


def _finish(study: Any, plan: Any, args: argparse.Namespace, mlflow: Any, storage: str, *, aborted: bool,
            failures: list[str] | None = None) -> int:
    from pipeline.tune.plots import pareto_points, write_study_plots
    from pipeline.tune.study import finished_count, trials_table

    objectives = plan.settings.objectives
    rows = trials_table(study, objectives)
    csv_path = plan.directory / "trials.csv"
    csv_path.parent.mkdir(parents=True, exist_ok=True)
    columns = list(dict.fromkeys(k for row in rows for k in row))
    with csv_path.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plots, notes = write_study_plots(study, plan.space, objectives, plan.directory / "plots")
    artifacts = [(p, "plots") for p in plots] + [(csv_path, "tune")]
    for note in notes:
        print(f"  note: {note}")
    states = [row["state"] for row in rows]
    print(f"study {plan.study_name}: {states.count('COMPLETE')} complete, {states.count('PRUNED')} pruned, "
          f"{states.count('FAIL')} failed of {len(rows)} trials (target {args.trials} finished)")
    tags: dict[str, str] = {}
    if len(objectives) == 1 and states.count("COMPLETE"):
        best = study.best_trial
        shown = ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in best.params.items())
        print(f"  best: trial {best.number}, {objectives[0]} {best.value:.4f} ({shown})")
        tags = {"tune.best_trial": str(best.number), "tune.best_value": repr(best.value)}
    elif len(objectives) > 1 and states.count("COMPLETE"):
        front = sorted(t.number for t in study.best_trials)
        print(f"  Pareto front (study.best_trials): trials {', '.join(map(str, front))}")
        tags = {"tune.pareto_trials": ",".join(map(str, front))}
        points = pareto_points(study, plan)
        if points:
            from pipeline.pareto.command import format_frontiers, write_pareto

            print(format_frontiers(points))
            png, pcsv = write_pareto(points, plan.directory, "pareto-valid",
                                     title=f"study {plan.study_name}: valid NLL vs mutual information")
            artifacts += [(png, "pareto"), (pcsv, "pareto")]
    print(f"  plots {plan.directory / 'plots'}, trials {csv_path}, storage {storage}")
    mlflow.set_tags(tags)
    mlflow.log_artifacts(artifacts)
    reached = finished_count(study) >= args.trials
    mlflow.end("FINISHED" if reached else "FAILED")
    if aborted or not reached:
        where = "; ".join(failures or []) or "the trial logs"
        return _error(f"the study stopped before {args.trials} finished trials ({len(failures or [])} failed in this "
                      f"run: {where}); fix the cause and run the same command again (finished trials are kept)", 1)
    return 0
