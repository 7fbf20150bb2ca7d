"""Sending one queued call: the MLflow client calls behind each :class:`~pipeline.tracking.ops.TrackingOp` kind.

Runs on the tracker's background thread; raises on failure (the thread decides whether to retry).
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.tracking.ops import PARENT, PermanentError, TrackingOp
from pipeline.tracking.runs import RunTree

__all__ = ["PLOTS_DIR", "TRAINING_CURVES", "CallSender", "scoped_env"]

log = logging.getLogger("pipeline.tracking")

PLOTS_DIR = "plots"
# MLflow's REST limit on params per log_batch call.
_MAX_PARAMS_PER_BATCH = 100
# The metric histories the training plots are drawn from.
TRAINING_CURVES = (
    "train/loss", "valid/raw_loss", "valid/short_loss", "valid/long_loss", "valid/reported_loss",
    "averaging/short_length", "averaging/long_length",
)


class CallSender:
    """Executes queued calls against one tracking store, resolving ``parent`` / ``stage:<name>`` through
    the :class:`RunTree`."""

    def __init__(self, client: Any, tree: RunTree, config: PipelineConfig, *, quiet: bool = True) -> None:
        self.client = client
        self.tree = tree
        self.config = config
        self.quiet = quiet
        self.registered: dict[str, str] = {}  # the model versions this process registered: name -> version

    def send(self, op: TrackingOp) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self.tree.resolve(op.run)
        client = self.client
        payload = op.payload
        if op.kind == "log_batch":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in payload["metrics"]]
            tags = [RunTag(k, v) for k, v in payload["tags"].items()]
            client.log_batch(run_id, metrics=metrics, tags=tags)
        elif op.kind == "log_params":
            self._log_params(run_id, payload["params"], quiet=op.run == PARENT)
        elif op.kind == "set_status":
            if payload["status"] == "RUNNING":
                if client.get_run(run_id).info.status != "RUNNING":
                    client.update_run(run_id, status="RUNNING")
            else:
                client.set_terminated(run_id, payload["status"])
        elif op.kind == "log_text":
            client.log_text(run_id, payload["text"], payload["artifact_file"])
        elif op.kind == "log_artifact":
            if not Path(payload["path"]).exists():
                raise PermanentError(f"{payload['path']} no longer exists")
            client.log_artifact(run_id, payload["path"], payload["artifact_path"])
        elif op.kind == "log_model":
            self._log_model(run_id, payload)
        elif op.kind == "training_plots":
            self._training_plots(run_id, op.run, payload)
        elif op.kind == "summary_plot":
            self._summary_plot(run_id, payload)
        elif op.kind == "pareto_plot":
            self._pareto_plot(run_id, payload)
        else:
            raise PermanentError(f"unknown tracking call {op.kind!r}")

    def _log_params(self, run_id: str, params: Mapping[str, str], *, quiet: bool) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(run_id).data.params
        changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            # MLflow params are immutable. The parent keeps the values it started with; a continuation's
            # stage run (a new run) holds the new ones, so only a reused stage run is worth a warning.
            (log.info if quiet else log.warning)(
                "MLflow run %s keeps its values of %d params that changed: %s", run_id, len(changed),
                ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:5]),
            )
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(todo), _MAX_PARAMS_PER_BATCH):
            self.client.log_batch(run_id, params=todo[start : start + _MAX_PARAMS_PER_BATCH])

    def _log_model(self, run_id: str, payload: Mapping[str, Any]) -> None:
        import mlflow.pytorch
        import torch
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from pipeline.evaluate import load_final_model

        if not Path(payload["path"]).exists():
            raise PermanentError(f"{payload['path']} no longer exists")
        model, saved = load_final_model(payload["path"])
        models_dir = Path(__file__).resolve().parents[2] / "models"
        experiment_id = self.client.get_run(run_id).info.experiment_id
        # mlflow.pytorch.log_model creates the logged model in the process's *active* experiment (the
        # Default one, with artifacts in ./mlruns/0, unless told otherwise) and registers through the
        # process-wide tracking URI: both are pointed at this run's store and experiment for this call only.
        with _use_tracking_uri(self.tracking_uri), scoped_env({"MLFLOW_EXPERIMENT_ID": experiment_id,
                                                                 "MLFLOW_EXPERIMENT_NAME": None}), \
                _mlflow_output_hidden(self.quiet):
            info = mlflow.pytorch.log_model(
                model,
                name="model",
                run_id=run_id,
                registered_model_name=payload["registered_name"],
                # The package the pickled module refers to travels with the model, so mlflow.pytorch.load_model
                # works without this project installed; requirements pinned rather than inferred (inference
                # imports and runs the model in a subprocess).
                code_paths=[str(models_dir)],
                pip_requirements=[f"torch=={torch.__version__.split('+')[0]}", "pydantic>=2.6,<3"],
                tags={k: str(v) for k, v in {**payload.get("metadata", {}), "weights": saved.get("weights")}.items()},
                await_registration_for=60,
                # torch.export ("pt2") needs a traceable forward and example inputs; with the recurrent state
                # pickling the module (plus code_paths) is the dependable choice.
                serialization_format="pickle",
            )
        if info.registered_model_version is not None:
            self.registered[payload["registered_name"]] = str(info.registered_model_version)
            log.info("registered model %s version %s", payload["registered_name"], info.registered_model_version)

    @property
    def tracking_uri(self) -> str:
        return self.tree.tracking_uri

    def _training_plots(self, run_id: str, run: str, payload: Mapping[str, Any]) -> None:
        from pipeline import plots

        # The curves of every run of this stage under the parent (continuations included), in order;
        # a later run's value wins at a step both have (a restart re-logs from its checkpoint).
        stage = run.split(":", 1)[1] if run.startswith("stage:") else None
        runs = [r.info.run_id for r in self.tree.stage_runs(self.tree.resolve(PARENT), stage)] if stage else [run_id]
        if run_id not in runs:
            runs.append(run_id)
        vae = self.config.task == "vae"
        history: dict[str, list[tuple[int, float]]] = {}
        for key in (*TRAINING_CURVES, *(plots.VAE_CURVES if vae else ())):
            merged: dict[int, float] = {}
            for source in runs:
                merged.update((m.step, m.value) for m in self.client.get_metric_history(source, key))
            history[key] = sorted(merged.items())
        plot_dir = Path(payload["plot_dir"])
        plot_dir.mkdir(parents=True, exist_ok=True)
        title = self.config.name
        paths = [
            plots.plot_learning_curves(history, plot_dir / "learning_curves.png", unit=payload["unit"], title=title),
            plots.plot_averaging_lengths(history, plot_dir / "averaging_lengths.png", title=title,
                                         method=self.config.train.averaging.method),
        ]
        if vae:
            objective = self.config.vae.objective
            paths.append(plots.plot_vae_training_curves(history, plot_dir / "vae_training_curves.png", title=title,
                                                        mi_weight=objective.mi_weight, alpha=objective.alpha))
        for target in (run_id, self.tree.resolve(PARENT)):
            for path in paths:
                self.client.log_artifact(target, str(path), PLOTS_DIR)

    def _pareto_plot(self, run_id: str, payload: Mapping[str, Any]) -> None:
        """This VAE run among its experiment's finished VAE runs: NLL vs MI with each group's frontier.

        Sent after the run's final metrics (the queue keeps order), so the run is one of the points."""
        from pipeline.compare.lookup import ComparisonError
        from pipeline.pareto.command import write_pareto
        from pipeline.pareto.runs import collect_points

        parent = self.tree.resolve(PARENT)
        try:
            found = collect_points(self.client, self.tree.experiment_name, split=payload.get("split", "valid"))
        except ComparisonError as err:
            log.warning("no Pareto plot: %s", err)
            return
        if not found.points:
            return
        paths = write_pareto(found.points, Path(payload["plot_dir"]), "pareto", highlight=parent,
                             title=f"{self.tree.experiment_name}: valid NLL vs mutual information")
        for target in (run_id, parent):
            for path in paths:
                self.client.log_artifact(target, str(path), PLOTS_DIR)

    def _summary_plot(self, run_id: str, payload: Mapping[str, Any]) -> None:
        from pipeline import plots

        plot_dir = Path(payload["plot_dir"])
        plot_dir.mkdir(parents=True, exist_ok=True)
        path = plots.plot_final_summary(payload["metrics"], plot_dir / "final_summary.png", unit=payload["unit"],
                                        title=self.config.name)
        for target in (run_id, self.tree.resolve(PARENT)):
            self.client.log_artifact(target, str(path), PLOTS_DIR)


@contextlib.contextmanager
def scoped_env(values: Mapping[str, str | None]) -> Iterator[None]:
    """Set (or, for None, unset) environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    for key, value in values.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


@contextlib.contextmanager
def _mlflow_output_hidden(hidden: bool) -> Iterator[None]:
    """Keep MLflow's own prints ("Successfully registered model ...", "Created version ...") out of the
    output during a call; we log one line of our own instead. MLflow prints them to whatever
    ``sys.stderr`` is at the time (and re-enables its own stream switch inside ``log_model``), so
    stderr is swapped for the call; what was printed goes to the debug log."""
    if not hidden:
        yield
        return
    import io

    captured = io.StringIO()
    with contextlib.redirect_stderr(captured):
        yield
    if captured.getvalue().strip():
        log.debug("MLflow said: %s", captured.getvalue().strip())
