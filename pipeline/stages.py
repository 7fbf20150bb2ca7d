"""Running the stages of a pipeline run on this rank: prepare, train, evaluate, or all three (``run``).

Each stage is a nested MLflow run under the pipeline's parent run (see :mod:`pipeline.tracking`). A
stage that finds nothing to do (data already prepared, checkpoints already at ``train.max_steps``,
this model already evaluated) says so and logs nothing: a finished run stays as it was. The process
ends its parent run when its last stage ends, and prints a short summary (stdout, rank 0): what each
stage did, the final metrics, where the checkpoints, plots and model are, and how to open MLflow.
"""

from __future__ import annotations

import contextlib
import logging
import os
import time
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.console import RunSummary, StageOutcome, mlflow_ui_hint, print_summary
from pipeline.errors import TrialPruned, WorkDirError, unwritable, writing

__all__ = ["check_work_dir", "ensure_writable", "run_stage"]

log = logging.getLogger("pipeline")

_VAE_SUMMARY = ("ppl", "kl_per_sentence", "mutual_information", "active_units")  # final VAE metrics the summary shows


def run_stage(stage: str, config: PipelineConfig, *, force: bool = False, config_source: str | None = None) -> RunSummary:
    """Run one stage (or ``run`` = all) on a validated config, on this rank of the job.

    Under ``torchrun`` every rank calls this: data is prepared by the first rank of each node (the
    others wait), every rank trains, only rank 0 talks to MLflow, evaluates and prints the summary.
    ``force`` rebuilds the data (prepare) and evaluates again (evaluate) even when nothing changed.
    ``config_source``: the ``--config`` given (a name or a path), for the next command in the summary.
    """
    from pipeline.distributed import barrier, init_distributed, shutdown
    from pipeline.tracking import dataset_tags, open_tracker

    started = time.monotonic()
    ctx = init_distributed(config.train.device) if stage in ("train", "run") else init_distributed("cpu")
    check_work_dir(config, ctx)
    tracker = open_tracker(config, command=stage, enabled=ctx.is_main)
    summary = RunSummary(config.name)
    failed = True
    try:
        if ctx.is_main:
            _save_resolved(config)
        if stage in ("prepare", "run"):
            from pipeline.prepare_stage import run_prepare_outcome

            tracker.start_stage("prepare", tentative=True)
            prepare_started = time.perf_counter()
            manifest, rebuilt = run_prepare_outcome(config, force=force) if ctx.local_rank == 0 else (None, False)
            barrier(ctx)
            if manifest is not None:
                if rebuilt:
                    tracker.confirm_stage()
                tracker.set_tags(dataset_tags(manifest))
                tracker.log_dict(manifest.model_dump(mode="json"), "dataset_manifest.json")
                tracker.log_metrics(
                    {**{f"data/{k}_tokens": v.num_tokens for k, v in manifest.splits.items()},
                     "data/vocab_size": manifest.vocab_size, "data/prepare_seconds": time.perf_counter() - prepare_started}
                )
                tokens = ", ".join(f"{k} {v.num_tokens:,}" for k, v in manifest.splits.items())
                summary.outcomes.append(StageOutcome(
                    "prepare", rebuilt, f"{'prepared' if rebuilt else 'already prepared'} {manifest.name} ({tokens} tokens)"))
                summary.paths["data"] = str(config.data_dir)
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

            if config.tune.storage is not None:
                # An Optuna trial its study no longer runs (a re-created pod of a pruned trial): stop at once.
                from pipeline.tune.reporting import ensure_trial_running

                ensure_trial_running(config, ctx)
            tracker.start_stage("train", tentative=True)
            tracker.set_tags({"pipeline.world_size": ctx.world_size, "pipeline.engine": config.train.engine,
                              "pipeline.device": config.train.device})
            result = run_train(config, tracker, ctx)
            tracker.end_stage("FINISHED")
            summary.outcomes.append(_train_outcome(config, result))
            summary.paths["checkpoints"] = config.checkpoint_url
            summary.paths["final model"] = str(result.model_path)
        if stage in ("evaluate", "run") and ctx.is_main:
            from pipeline.evaluate import RESULTS_FILE, run_evaluate

            tracker.start_stage("evaluate", tentative=True)
            evaluation, evaluated = run_evaluate(config, tracker, force=force)
            tracker.end_stage("FINISHED")
            metrics = evaluation.metrics()
            if config.task == "vae":  # perplexity (importance-sampled), latent usage
                shown = {k: v for k, v in metrics.items() if k.partition("_")[2] in _VAE_SUMMARY}
            else:
                shown = {k: v for k, v in metrics.items() if k.startswith(("valid_", "test_")) and "tuned" not in k
                         and not k.endswith("_nll")}
            summary.outcomes.append(StageOutcome(
                "evaluate", evaluated, "evaluated the final model" if evaluated
                else "this final model was evaluated already (--force evaluates again)", shown))
            summary.paths["results"] = str(config.run_dir / RESULTS_FILE)
        failed = False
    except BaseException as err:
        # A trial pruned by its study (TrialPruned) stopped on purpose: KILLED like an interrupted run, tagged
        # tune.pruned; its later stages (evaluate) are skipped.
        status = "KILLED" if isinstance(err, (KeyboardInterrupt, SystemExit, TrialPruned)) else "FAILED"
        tracker.end_stage(status)
        raise
    finally:
        # The last stage this process ran ends the pipeline run (a parent this process did not reopen
        # is left as it was).
        tracker.close(None if failed else "FINISHED")
        shutdown(ctx, failed=failed)
    if ctx.is_main:
        summary.elapsed = time.monotonic() - started
        following = {"prepare": "train", "train": "evaluate"}.get(stage)
        if following and any(o.did_work for o in summary.outcomes):
            summary.next_command = f"python -m pipeline {following} --config {config_source or config.name}"
        _add_tracking(summary, config, tracker)
        print_summary(summary)
    return summary


def _train_outcome(config: PipelineConfig, result) -> StageOutcome:
    if not result.trained:
        return StageOutcome("train", False, f"nothing to do: checkpoints are at step {result.step}, train.max_steps is "
                                            f"{config.train.max_steps} (raise --train.max_steps to train further)")
    loss = "" if result.reported_loss is None else f", reported valid loss {result.reported_loss:.4f} ({result.reported_source})"
    restarts = f", {result.divergence_restarts} divergence restarts" if result.divergence_restarts else ""
    return StageOutcome("train", True, f"trained to step {result.step}{loss}{restarts}")


def _add_tracking(summary: RunSummary, config: PipelineConfig, tracker) -> None:
    plots = config.run_dir / "plots"
    if plots.is_dir():
        summary.paths["plots"] = str(plots)
    if tracker.tree is None:
        return
    for name, version in tracker.registered_models.items():
        summary.paths["registered"] = f"model {name!r} version {version}"
    parent = tracker.parent_run_id
    if parent is None:  # every stage had nothing to do: point at the run they found finished
        with contextlib.suppress(Exception):
            parent = tracker.tree.existing_parent()
    summary.tracking = mlflow_ui_hint(tracker.tracking_uri, tracker.tree.experiment_id, parent)


def _save_resolved(config: PipelineConfig) -> None:
    path = config.run_dir / "resolved_config.yaml"
    with writing(path):
        config.run_dir.mkdir(parents=True, exist_ok=True)
        path.write_text(config.to_yaml())


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
