"""Experiment tracking in MLflow, behind a small interface the stages call.

Default store: a local SQLite database ``runs/mlflow.db`` next to the run folders, artifacts in
``runs/mlartifacts`` (so ``mlflow ui --backend-store-uri sqlite:///runs/mlflow.db`` shows every
local run side by side). ``$MLFLOW_TRACKING_URI`` or ``tracking.uri`` override it.

All stages of one pipeline run log into one MLflow run: its id is kept in
``<run_dir>/mlflow_run_id`` (or taken from ``$MLFLOW_RUN_ID``) so a stage started on its own,
or in another container, finds the run again. Tracking problems never stop training: failed calls
are logged as warnings.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig, flatten_config

__all__ = ["Tracker", "open_tracker"]

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"


def _default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


class Tracker:
    """Logs params, metrics and artifacts of one pipeline run; a no-op when disabled."""

    def __init__(self, config: PipelineConfig, *, enabled: bool | None = None) -> None:
        self.config = config
        self.enabled = config.tracking.enabled if enabled is None else enabled
        self.run_id: str | None = None
        self._client = None
        if not self.enabled:
            return
        import mlflow
        from mlflow.tracking import MlflowClient

        run_dir = config.run_dir
        run_dir.mkdir(parents=True, exist_ok=True)
        uri = config.tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_tracking_uri(run_dir)
        self.tracking_uri = uri
        mlflow.set_tracking_uri(uri)
        self._client = MlflowClient(tracking_uri=uri)
        experiment_name = config.tracking.experiment or config.name
        experiment = self._client.get_experiment_by_name(experiment_name)
        if experiment is None:
            artifact_location = None
            if uri.startswith("sqlite:"):
                artifact_location = (run_dir.parent / "mlartifacts").resolve().as_uri()
            experiment_id = self._client.create_experiment(experiment_name, artifact_location=artifact_location)
        else:
            experiment_id = experiment.experiment_id
        self.experiment_id = experiment_id
        self.run_id = self._find_or_create_run(run_dir, experiment_id)

    def _find_or_create_run(self, run_dir: Path, experiment_id: str) -> str:
        assert self._client is not None
        run_id = os.environ.get("MLFLOW_RUN_ID")
        id_file = run_dir / RUN_ID_FILE
        if not run_id and id_file.exists():
            run_id = id_file.read_text().strip()
        if run_id:
            try:
                run = self._client.get_run(run_id)
                if run.info.lifecycle_stage == "active":
                    if run.info.status != "RUNNING":
                        self._client.update_run(run_id, status="RUNNING")
                    return run_id
            except Exception:  # the store was reset: start a fresh run below
                log.warning("MLflow run %s not found in %s; starting a new run", run_id, self.tracking_uri)
        run = self._client.create_run(experiment_id, run_name=self.config.name)
        id_file.write_text(run.info.run_id)
        return run.info.run_id

    def _call(self, what: str, method: str, *args, **kwargs) -> None:
        """Call ``MlflowClient.<method>(*args)``; failures are warnings, never errors."""
        if not self.enabled or self._client is None:
            return
        try:
            getattr(self._client, method)(*args, **kwargs)
        except Exception as err:  # tracking must never kill training
            log.warning("MLflow %s failed (training continues): %s", what, err)

    def log_config(self, config: PipelineConfig) -> None:
        """The full resolved config as params (dotted names) and as ``config.yaml``."""
        if not self.enabled:
            return
        from mlflow.entities import Param

        params = [Param(k, "null" if v is None else str(v)) for k, v in flatten_config(config).items()]
        existing: dict[str, str] = {}
        if self.enabled and self._client is not None:
            try:
                existing = self._client.get_run(self.run_id).data.params
            except Exception:
                existing = {}
        # MLflow params are immutable: only log the ones not logged yet by an earlier stage.
        params = [p for p in params if p.key not in existing]
        for start in range(0, len(params), 100):
            self._call("log params", "log_batch", self.run_id, params=params[start : start + 100])
        self._call("log config", "log_text", self.run_id, config.to_yaml(), "config.yaml")

    def log_metrics(self, metrics: Mapping[str, float], step: int | None = None) -> None:
        if not self.enabled:
            return
        from mlflow.entities import Metric

        now = int(time.time() * 1000)
        batch = [Metric(k, float(v), now, step or 0) for k, v in metrics.items() if v is not None]
        self._call("log metrics", "log_batch", self.run_id, metrics=batch)

    def set_tags(self, tags: Mapping[str, Any]) -> None:
        if not self.enabled:
            return
        from mlflow.entities import RunTag

        self._call("set tags", "log_batch", self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None) -> None:
        self._call("log artifact", "log_artifact", self.run_id, str(path), artifact_path)

    def log_dict(self, data: dict[str, Any], artifact_file: str) -> None:
        self._call("log dict", "log_dict", self.run_id, data, artifact_file)

    def finish(self, status: str = "FINISHED") -> None:
        self._call("end run", "set_terminated", self.run_id, status)


def open_tracker(config: PipelineConfig) -> Tracker:
    """A tracker for ``config``; falls back to a disabled one (with a warning) if MLflow cannot be reached."""
    if not config.tracking.enabled:
        return Tracker(config, enabled=False)
    try:
        return Tracker(config)
    except Exception as err:
        log.warning("MLflow tracking unavailable (%s); continuing without tracking", err)
        return Tracker(config, enabled=False)
