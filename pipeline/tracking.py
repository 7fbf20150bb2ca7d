"""Experiment tracking in MLflow: one parent run per pipeline run, one nested run per stage.

The run tree (what the MLflow UI shows)::

    <config name>                      tags pipeline.kind=pipeline, pipeline.run_key, git commit, image,
    │                                  dataset checksum, world size; params = the resolved config;
    │                                  final/* metrics; plots/; the registered model's source run
    ├── prepare                        tags pipeline.kind=stage, pipeline.stage, mlflow.parentRunId
    ├── train                          per-step and per-evaluation metrics, system/*, plots/, model/
    └── evaluate                       final/* metrics, eval_results.json, plots/final_summary.png

How a stage finds its parent, so that stages started separately, in other containers or on
other pods log into the same tree (first match wins):

1. ``$MLFLOW_RUN_ID`` names the parent run;
2. ``tracking.run_key`` / ``$PIPELINE_RUN_KEY``: the parent tagged ``pipeline.run_key=<key>``
   (created by whichever stage comes first; the Kubernetes driver sets one key per pipeline run);
3. the parent id kept in ``<work_dir>/mlflow_run_id`` (a laptop re-running stages in one folder);
   ``run`` and ``prepare`` start a new parent once the old one has FINISHED;
4. otherwise a new parent run.

A stage run is reused when its parent already has one for that stage (a restarted ``train``
continues its curves).

Tracking never stops training. Every call is queued and sent by a background thread; when the
server or network fails the thread warns once, keeps the calls in order, retries with backoff and
says when it has flushed them. At the end of a process it waits ``tracking.flush_timeout`` seconds;
what is still unsent is written to ``<work_dir>/mlflow_pending.jsonl`` and sent by the next stage
(or ``python -m pipeline flush --config ...``).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import getpass
import hashlib
import json
import logging
import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, PipelineConfig, flatten_config

__all__ = [
    "PENDING_FILE",
    "RUN_ID_FILE",
    "TrackingOp",
    "Tracker",
    "dataset_checksum",
    "dataset_tags",
    "git_commit",
    "open_tracker",
]

log = logging.getLogger(__name__)

RUN_ID_FILE = "mlflow_run_id"
PENDING_FILE = "mlflow_pending.jsonl"
PARENT = "parent"
PLOTS_DIR = "plots"
# MLflow's REST limits per log_batch call.
_MAX_METRICS_PER_BATCH = 1000
_MAX_PARAMS_PER_BATCH = 100
# Tries of one call that keeps failing while the server is reachable before it is dropped.
_ATTEMPTS_WHILE_REACHABLE = 3
# Errors the server will give again however often we retry: drop the call, warn.
_PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


def _default_tracking_uri(run_dir: Path) -> str:
    return f"sqlite:///{(run_dir.parent / 'mlflow.db').resolve()}"


def git_commit() -> str | None:
    """The source commit: ``$GIT_COMMIT`` (baked into images at build time), else ``git rev-parse``."""
    commit = os.environ.get("GIT_COMMIT")
    if commit and commit != "unknown":  # "unknown": an image built without --build-arg GIT_COMMIT
        return commit
    repo = Path(__file__).resolve().parents[1]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dataset_checksum(manifest: Any) -> str:
    """One sha256 over the prepared splits' sha256s (sorted by split name): equal iff the token arrays are."""
    digest = hashlib.sha256()
    for name in sorted(manifest.splits):
        digest.update(f"{name}:{manifest.splits[name].sha256}\n".encode())
    return digest.hexdigest()


def dataset_tags(manifest: Any) -> dict[str, str]:
    """Tags that identify the prepared data a run used (compare runs on equal data)."""
    return {
        "dataset.name": manifest.name,
        "dataset.unit": manifest.unit,
        "dataset.checksum": dataset_checksum(manifest),
        "dataset.source_sha256": manifest.source_sha256 or "none",
        "dataset.vocab_size": str(manifest.vocab_size),
    }


@dataclasses.dataclass
class TrackingOp:
    """One queued call to the tracking server.

    ``run`` is ``"parent"`` or ``"stage:<name>"``; the background thread resolves it to a run id
    (creating the run if needed) when it sends the call, so calls can be queued, and spooled to
    disk, before the server was ever reached.
    """

    kind: str
    run: str
    payload: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> TrackingOp:
        data = json.loads(line)
        return cls(kind=data["kind"], run=data["run"], payload=data["payload"])


class _PermanentError(Exception):
    """A call that cannot succeed however often it is retried."""


def _is_transient(err: BaseException) -> bool:
    """Network and server-side failures (worth retrying); anything else -- a refused call, a bug -- is not."""
    if isinstance(err, _PermanentError):
        return False
    if isinstance(err, (OSError, TimeoutError)):  # ConnectionError, socket timeouts, ...
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    if isinstance(err, requests.RequestException):
        return True
    return isinstance(err, MlflowException) and err.error_code not in _PERMANENT_ERROR_CODES


class Tracker:
    """Buffered MLflow logging for the stages of one pipeline run (one per process, rank 0 only).

    Usage (what :mod:`pipeline.cli` does)::

        tracker = open_tracker(config, command="run")
        tracker.start_stage("train")
        tracker.log_metrics({"train/loss": 1.2}, step=100)     # queued, returns at once
        tracker.end_stage("FINISHED")
        tracker.close(pipeline_status="FINISHED")              # flush (or spool) and finish the parent

    A disabled tracker (``enabled=False``; non-zero ranks; ``tracking.enabled: false``) accepts every
    call and does nothing.
    """

    def __init__(self, config: PipelineConfig, *, command: str = "run", enabled: bool | None = None) -> None:
        self.config = config
        self.enabled = config.tracking.enabled if enabled is None else enabled
        self.command = command
        self.stage: str | None = None
        self.run_ids: dict[str, str] = {}
        self._last_step = 0
        self._system_metrics: _SystemMetricsSampler | None = None
        if not self.enabled:
            return
        tracking = config.tracking
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or _default_tracking_uri(self.run_dir)
        self.experiment_name = tracking.experiment or config.name
        self.run_key = tracking.run_key or os.environ.get("PIPELINE_RUN_KEY") or None
        # One HTTP attempt per call, bounded in time: our own thread retries (MLflow's default of 7
        # retries with exponential backoff would hold one call for minutes). Explicit settings win.
        # Applied only around our own calls, so that the process's other MLflow use is unchanged.
        self._http_env = {
            k: v
            for k, v in {
                "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0",
                "MLFLOW_HTTP_REQUEST_TIMEOUT": str(int(max(1, tracking.request_timeout))),
            }.items()
            if k not in os.environ
        }
        from mlflow.tracking import MlflowClient

        try:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as err:  # an unsupported scheme or malformed URI: a config error, not an outage
            raise ConfigError(
                f"tracking.uri {self.tracking_uri!r} is not a usable MLflow tracking URI ({err}); use "
                "http(s)://host:port of an MLflow server, sqlite:///path.db, or set tracking.enabled: false"
            ) from None
        self._experiment_id: str | None = None
        self._queue: collections.deque[TrackingOp] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._abandon = threading.Event()
        self._outage_since: float | None = None
        self._spooled_pending = 0  # ops loaded from the spool file and not sent yet
        self._config_logged = False
        self.sent = 0
        self.dropped = 0
        self._load_spool()
        self._worker = threading.Thread(target=self._run_worker, name="mlflow-tracker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------
    # public API (called by the stages; never blocks on the network)

    def start_stage(self, stage: str) -> None:
        """Open (or reopen) the nested run of ``stage`` and log the config, tags and system metrics into it."""
        self.stage = stage
        if not self.enabled:
            return
        params = {k: "null" if v is None else str(v) for k, v in flatten_config(self.config).items()}
        tags = self._common_tags()
        for run in (PARENT, self._stage_run()):
            self._enqueue("set_status", run, {"status": "RUNNING"})
            self._enqueue("log_params", run, {"params": params})
            self._enqueue("log_batch", run, {"metrics": [], "tags": tags})
        if not self._config_logged:  # one config per process: `run` has three stages, one config
            self._enqueue("log_text", PARENT, {"text": self.config.to_yaml(), "artifact_file": "config.yaml"})
            self._config_logged = True
        if self.config.tracking.system_metrics:
            self._system_metrics = _SystemMetricsSampler(self, self.config.tracking.system_metrics_interval)
            self._system_metrics.start()

    def end_stage(self, status: str = "FINISHED") -> None:
        """Close the current stage's run with ``status`` (FINISHED, FAILED or KILLED)."""
        if self._system_metrics is not None:
            self._system_metrics.stop()
            self._system_metrics = None
        if self.enabled and self.stage is not None:
            self._enqueue("set_status", self._stage_run(), {"status": status})
            if status != "FINISHED":
                self._enqueue("set_status", PARENT, {"status": status})
        self.stage = None

    def log_metrics(self, metrics: Mapping[str, float | None], step: int | None = None, *, parent: bool = False) -> None:
        """Queue metrics for the current stage's run (or the parent); ``None`` values are skipped."""
        if step is not None:
            self._last_step = step
        if not self.enabled:
            return
        now = int(time.time() * 1000)
        step = self._last_step if step is None else step
        rows = [[k, float(v), now, int(step)] for k, v in metrics.items() if v is not None]
        if rows:
            self._enqueue("log_batch", PARENT if parent else self._stage_run(), {"metrics": rows, "tags": {}})

    def set_tags(self, tags: Mapping[str, Any], *, parent: bool = True) -> None:
        """Tag the current stage's run and, by default, the parent run."""
        if not self.enabled:
            return
        payload = {"metrics": [], "tags": {k: str(v) for k, v in tags.items()}}
        self._enqueue("log_batch", self._stage_run(), payload)
        if parent:
            self._enqueue("log_batch", PARENT, payload)

    def log_artifact(self, path: str | os.PathLike, artifact_path: str | None = None, *, parent: bool = False) -> None:
        """Queue the upload of a local file (it must still exist when the call is sent)."""
        if self.enabled:
            run = PARENT if parent else self._stage_run()
            self._enqueue("log_artifact", run, {"path": str(Path(path).resolve()), "artifact_path": artifact_path})

    def log_dict(self, data: Mapping[str, Any], artifact_file: str, *, parent: bool = False) -> None:
        self.log_text(json.dumps(data, indent=2, default=str), artifact_file, parent=parent)

    def log_text(self, text: str, artifact_file: str, *, parent: bool = False) -> None:
        if self.enabled:
            self._enqueue("log_text", PARENT if parent else self._stage_run(), {"text": text, "artifact_file": artifact_file})

    def log_model(self, final_model_path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Log the model saved by :func:`pipeline.evaluate.save_final_model` with ``mlflow.pytorch.log_model``
        into the current stage's run and register it under the experiment's name (``tracking.register_model``);
        without registration the file is logged as the artifact ``model/``."""
        if not self.enabled:
            return
        path = str(Path(final_model_path).resolve())
        if self.config.tracking.register_model:
            payload = {"path": path, "registered_name": self.experiment_name, "metadata": dict(metadata or {})}
            self._enqueue("log_model", self._stage_run(), payload)
        else:
            self.log_artifact(path, "model")

    def log_training_plots(self, unit: str) -> None:
        """Plot the train run's curves (raw vs 2TA losses, averaging lengths) from the server's metric
        history, which spans restarts, and log them into the train run and the parent."""
        if self.enabled and self.config.tracking.plots:
            self._enqueue("training_plots", self._stage_run(), {"unit": unit, "plot_dir": str(self.run_dir / PLOTS_DIR)})

    def log_summary_plot(self, final_metrics: Mapping[str, float], unit: str) -> None:
        """A bar chart of the final bpc / perplexity, into the current stage's run and the parent."""
        if self.enabled and self.config.tracking.plots:
            payload = {"metrics": dict(final_metrics), "unit": unit, "plot_dir": str(self.run_dir / PLOTS_DIR)}
            self._enqueue("summary_plot", self._stage_run(), payload)

    def flush(self, timeout: float | None = None) -> bool:
        """Wait until every queued call was sent; False if ``timeout`` seconds passed first."""
        if not self.enabled:
            return True
        deadline = None if timeout is None else time.monotonic() + timeout
        with self._cond:
            while self._queue:
                remaining = None if deadline is None else deadline - time.monotonic()
                if remaining is not None and remaining <= 0:
                    return False
                self._cond.wait(remaining if remaining is not None else 1.0)
        return True

    def close(self, pipeline_status: str | None = None, timeout: float | None = None) -> None:
        """Finish: optionally set the parent's status, flush for up to ``tracking.flush_timeout`` seconds,
        spool what is still unsent to ``<work_dir>/mlflow_pending.jsonl``, stop the thread."""
        if self._system_metrics is not None:
            self._system_metrics.stop()
            self._system_metrics = None
        if not self.enabled:
            return
        if pipeline_status is not None:
            self._enqueue("set_status", PARENT, {"status": pipeline_status})
        timeout = self.config.tracking.flush_timeout if timeout is None else timeout
        if not self.flush(timeout):
            log.warning("MLflow still unreachable after %.0fs; spooling the unsent calls", timeout)
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        self._abandon.set()
        self._worker.join()
        self._write_spool()
        self.enabled = False

    @property
    def pending(self) -> int:
        """Calls queued and not yet sent."""
        if not self.enabled:
            return 0
        with self._cond:
            return len(self._queue)

    @property
    def parent_run_id(self) -> str | None:
        """The parent run's id once resolved (after the first successful call)."""
        return self.run_ids.get(PARENT)

    # ------------------------------------------------------------------------------------------
    # queue and spool

    def _stage_run(self) -> str:
        return f"stage:{self.stage}" if self.stage else PARENT

    def _enqueue(self, kind: str, run: str, payload: dict[str, Any]) -> None:
        with self._cond:
            self._queue.append(TrackingOp(kind, run, payload))
            self._cond.notify_all()

    def _spool_path(self) -> Path:
        return self.run_dir / PENDING_FILE

    def _load_spool(self) -> None:
        # Older calls go first; the file stays until they are sent (rewritten at close()).
        ops = list(iter_pending(self.run_dir))
        self._queue.extend(ops)
        self._spooled_pending = len(ops)
        if ops:
            log.info("sending %d MLflow calls left unsent by an earlier stage (%s)", len(ops), self._spool_path())

    def _write_spool(self) -> None:
        path = self._spool_path()
        with self._cond:
            remaining = list(self._queue)
        if not remaining:
            if path.exists():
                path.unlink()
            return
        tmp = path.with_suffix(".tmp")
        try:
            tmp.write_text("".join(op.to_json() + "\n" for op in remaining))
            tmp.replace(path)
        finally:
            tmp.unlink(missing_ok=True)
        log.warning(
            "%d MLflow calls could not be sent to %s; kept in %s. They are sent by the next stage, or now with: "
            "python -m pipeline flush --config <config>", len(remaining), self.tracking_uri, path,
        )

    # ------------------------------------------------------------------------------------------
    # the background thread

    def _run_worker(self) -> None:
        delay = 1.0
        failures, last_failed = 0, None
        while True:
            with self._cond:
                while not self._queue and not self._stopping:
                    self._cond.wait()
                if not self._queue or self._abandon.is_set() and self._outage_since is not None:
                    return
                if self._queue[0] is not last_failed:
                    batch = self._take_batch()
            try:
                self._execute(batch)
            except Exception as err:  # tracking must never kill training
                head = self._queue[0]  # only this thread removes calls, so the head is stable
                failures = failures + 1 if head is last_failed else 1
                last_failed = head
                transient = _is_transient(err)
                if transient and not self._server_reachable():
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning(
                            "MLflow at %s unreachable (%s); buffering tracking calls and retrying, training continues",
                            self.tracking_uri, _short(err),
                        )
                    if self._abandon.wait(delay):
                        return
                    delay = min(delay * 2, self.config.tracking.retry_max_delay)
                    continue
                if transient and failures < _ATTEMPTS_WHILE_REACHABLE:
                    # The server answers, so this is a hiccup: a short pause and another try.
                    if self._abandon.wait(1.0):
                        return
                    continue
                # Refused by the server, a bug, or failing repeatedly while the server is fine: drop it
                # rather than hold up everything queued behind it.
                log.warning("MLflow %s on %s dropped: %s", batch.kind, batch.run, _short(err),
                            exc_info=not isinstance(err, _PermanentError) and log.isEnabledFor(logging.DEBUG))
                self.dropped += 1
            else:
                self.sent += 1
            self._done(batch)
            failures, last_failed = 0, None
            if self._outage_since is not None:
                log.warning(
                    "MLflow at %s reachable again after %.0fs; sending %d buffered calls",
                    self.tracking_uri, time.monotonic() - self._outage_since, self.pending,
                )
                self._outage_since = None
            delay = 1.0

    def _server_reachable(self) -> bool:
        """Does the tracking server answer (``/health`` of an HTTP server; a query for other stores)?"""
        try:
            if self.tracking_uri.startswith(("http://", "https://")):
                import requests

                response = requests.get(f"{self.tracking_uri.rstrip('/')}/health", timeout=self.config.tracking.request_timeout)
                return response.status_code == 200
            self._client.search_experiments(max_results=1)
            return True
        except Exception:
            return False

    def _take_batch(self) -> TrackingOp:
        """The head of the queue; consecutive metric/tag batches of one run merged into one call."""
        head = self._queue[0]
        self._batch_size = 1
        if head.kind != "log_batch":
            return head
        metrics = list(head.payload["metrics"])
        tags = dict(head.payload["tags"])
        for op in list(self._queue)[1:]:
            if op.kind != "log_batch" or op.run != head.run or len(metrics) + len(op.payload["metrics"]) > _MAX_METRICS_PER_BATCH:
                break
            if len(tags) + len(op.payload["tags"]) > _MAX_PARAMS_PER_BATCH:
                break
            metrics.extend(op.payload["metrics"])
            tags.update(op.payload["tags"])
            self._batch_size += 1
        return TrackingOp("log_batch", head.run, {"metrics": metrics, "tags": tags})

    def _done(self, batch: TrackingOp) -> None:
        with self._cond:
            for _ in range(self._batch_size):
                self._queue.popleft()
                if self._spooled_pending:
                    self._spooled_pending -= 1
                    if not self._spooled_pending and self._spool_path().exists():
                        self._spool_path().unlink()  # every spooled call has been sent
            self._cond.notify_all()

    def _execute(self, op: TrackingOp) -> None:
        with _scoped_env(self._http_env):
            self._execute_call(op)

    def _execute_call(self, op: TrackingOp) -> None:
        from mlflow.entities import Metric, RunTag

        run_id = self._resolve(op.run)
        client = self._client
        payload = op.payload
        if op.kind == "log_batch":
            metrics = [Metric(k, v, ts, step) for k, v, ts, step in payload["metrics"]]
            tags = [RunTag(k, v) for k, v in payload["tags"].items()]
            client.log_batch(run_id, metrics=metrics, tags=tags)
        elif op.kind == "log_params":
            self._log_params(run_id, payload["params"])
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
                raise _PermanentError(f"{payload['path']} no longer exists")
            client.log_artifact(run_id, payload["path"], payload["artifact_path"])
        elif op.kind == "log_model":
            self._log_model(run_id, payload)
        elif op.kind == "training_plots":
            self._training_plots(run_id, payload)
        elif op.kind == "summary_plot":
            self._summary_plot(run_id, payload)
        else:
            raise _PermanentError(f"unknown tracking call {op.kind!r}")

    def _log_params(self, run_id: str, params: Mapping[str, str]) -> None:
        from mlflow.entities import Param

        existing = self._client.get_run(run_id).data.params
        changed = {k: (existing[k], v) for k, v in params.items() if k in existing and existing[k] != v}
        if changed:
            # MLflow params are immutable; a stage with a different config belongs in another run.
            log.warning(
                "MLflow run %s already has different values for %d params (kept): %s", run_id, len(changed),
                ", ".join(f"{k}: {old!r} -> {new!r}" for k, (old, new) in list(changed.items())[:5]),
            )
        todo = [Param(k, v) for k, v in params.items() if k not in existing]
        for start in range(0, len(todo), _MAX_PARAMS_PER_BATCH):
            self._client.log_batch(run_id, params=todo[start : start + _MAX_PARAMS_PER_BATCH])

    def _log_model(self, run_id: str, payload: Mapping[str, Any]) -> None:
        import mlflow.pytorch
        import torch
        from mlflow.tracking._tracking_service.utils import _use_tracking_uri

        from pipeline.evaluate import load_final_model

        if not Path(payload["path"]).exists():
            raise _PermanentError(f"{payload['path']} no longer exists")
        model, saved = load_final_model(payload["path"])
        models_dir = Path(__file__).resolve().parents[1] / "models"
        # mlflow.pytorch.log_model and the registry use the process-wide URI: ours, for this call only.
        with _use_tracking_uri(self.tracking_uri):
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
            log.info("registered model %s version %s", payload["registered_name"], info.registered_model_version)

    def _training_plots(self, run_id: str, payload: Mapping[str, Any]) -> None:
        from pipeline import plots

        keys = [
            "train/loss", "valid/raw_loss", "valid/short_loss", "valid/long_loss", "valid/reported_loss",
            "averaging/short_length", "averaging/long_length",
        ]
        history = {k: [(m.step, m.value) for m in self._client.get_metric_history(run_id, k)] for k in keys}
        plot_dir = Path(payload["plot_dir"])
        plot_dir.mkdir(parents=True, exist_ok=True)
        title = self.config.name
        paths = [
            plots.plot_learning_curves(history, plot_dir / "learning_curves.png", unit=payload["unit"], title=title),
            plots.plot_averaging_lengths(history, plot_dir / "averaging_lengths.png", title=title),
        ]
        for target in (run_id, self._resolve(PARENT)):
            for path in paths:
                self._client.log_artifact(target, str(path), PLOTS_DIR)

    def _summary_plot(self, run_id: str, payload: Mapping[str, Any]) -> None:
        from pipeline import plots

        plot_dir = Path(payload["plot_dir"])
        plot_dir.mkdir(parents=True, exist_ok=True)
        path = plots.plot_final_summary(payload["metrics"], plot_dir / "final_summary.png", unit=payload["unit"],
                                        title=self.config.name)
        for target in (run_id, self._resolve(PARENT)):
            self._client.log_artifact(target, str(path), PLOTS_DIR)

    # ------------------------------------------------------------------------------------------
    # run tree

    def _resolve(self, run: str) -> str:
        if run not in self.run_ids:
            self.run_ids[run] = self._find_or_create_parent() if run == PARENT else self._find_or_create_stage(run)
        return self.run_ids[run]

    def _experiment(self) -> str:
        if self._experiment_id is None:
            experiment = self._client.get_experiment_by_name(self.experiment_name)
            if experiment is not None:
                self._experiment_id = experiment.experiment_id
            else:
                artifact_location = None
                if self.tracking_uri.startswith("sqlite:"):
                    # A local store keeps artifacts next to it; a server decides (proxied or its default root).
                    artifact_location = (Path(self.tracking_uri[len("sqlite:///"):]).parent / "mlartifacts").resolve().as_uri()
                self._experiment_id = self._client.create_experiment(self.experiment_name, artifact_location=artifact_location)
        return self._experiment_id

    def _oldest_run(self, experiment_id: str, filter_string: str) -> str | None:
        """The id of the first-created run matching ``filter_string`` (stable if a race made two)."""
        found = self._client.search_runs(
            [experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"], max_results=1
        )
        return found[0].info.run_id if found else None

    def _find_or_create_parent(self) -> str:
        client = self._client
        experiment_id = self._experiment()
        explicit = os.environ.get("MLFLOW_RUN_ID")
        if explicit:
            client.get_run(explicit)  # RESOURCE_DOES_NOT_EXIST -> dropped with a clear warning
            return explicit
        if self.run_key:
            found = self._oldest_run(
                experiment_id, f"tags.`pipeline.run_key` = '{self.run_key}' and tags.`pipeline.kind` = 'pipeline'"
            )
            if found:
                return found
        else:
            id_file = self.run_dir / RUN_ID_FILE
            if id_file.exists():
                run_id = id_file.read_text().strip()
                try:
                    run = client.get_run(run_id)
                except Exception:
                    run = None
                if run is None or run.info.lifecycle_stage != "active" or run.info.experiment_id != experiment_id:
                    log.warning("MLflow run %s from %s not found in %s; starting a new run", run_id, id_file, self.tracking_uri)
                elif run.info.status == "FINISHED" and self.command in ("run", "prepare"):
                    log.info("previous pipeline run %s has finished; starting a new one", run_id)
                else:
                    return run_id
        tags = {"pipeline.kind": "pipeline", "mlflow.runName": self.config.name, **self._common_tags()}
        if self.run_key:
            tags["pipeline.run_key"] = self.run_key
        run = client.create_run(experiment_id, run_name=self.config.name, tags=tags)
        if not self.run_key:
            (self.run_dir / RUN_ID_FILE).write_text(run.info.run_id)
        log.info("MLflow parent run %s in experiment %r at %s", run.info.run_id, self.experiment_name, self.tracking_uri)
        return run.info.run_id

    def _find_or_create_stage(self, run: str) -> str:
        stage = run.split(":", 1)[1]
        parent_id = self._resolve(PARENT)
        experiment_id = self._client.get_run(parent_id).info.experiment_id
        found = self._oldest_run(
            experiment_id, f"tags.`mlflow.parentRunId` = '{parent_id}' and tags.`pipeline.stage` = '{stage}'"
        )
        if found:
            return found
        tags = {"pipeline.kind": "stage", "pipeline.stage": stage, "mlflow.parentRunId": parent_id, **self._common_tags()}
        return self._client.create_run(experiment_id, run_name=stage, tags=tags).info.run_id

    def _common_tags(self) -> dict[str, str]:
        tags = {
            "mlflow.source.type": "JOB",
            "mlflow.source.name": f"python -m pipeline {self.command}",
            "mlflow.user": _user(),
            "pipeline.config": self.config.name,
            "pipeline.image": os.environ.get("PIPELINE_IMAGE", "local"),
            "pipeline.host": socket.gethostname(),
        }
        commit = git_commit()
        if commit:
            tags["mlflow.source.git.commit"] = commit
        return tags


@contextlib.contextmanager
def _scoped_env(values: Mapping[str, str]):
    """Set environment variables for the duration of a block, then restore them."""
    saved = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no passwd entry for the uid (containers)
        return str(os.getuid())


def _short(err: BaseException, limit: int = 300) -> str:
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + "..."


class _SystemMetricsSampler:
    """CPU, memory, disk, network and (when NVML finds one) GPU utilisation, sampled with MLflow's own
    monitors and sent through the tracker's queue (MLflow's SystemMetricsMonitor stops for good at
    the first failed request, and logs past our buffer)."""

    def __init__(self, tracker: Tracker, interval: float) -> None:
        from mlflow.system_metrics.metrics.cpu_monitor import CPUMonitor
        from mlflow.system_metrics.metrics.disk_monitor import DiskMonitor
        from mlflow.system_metrics.metrics.network_monitor import NetworkMonitor

        self.tracker = tracker
        self.interval = interval
        self.monitors: list[Any] = [CPUMonitor(), DiskMonitor(), NetworkMonitor()]
        try:
            from mlflow.system_metrics.metrics.gpu_monitor import GPUMonitor

            self.monitors.append(GPUMonitor())
        except Exception:  # no NVML (CPU machine) or no GPU
            pass
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="system-metrics", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def sample(self) -> dict[str, float]:
        metrics: dict[str, float] = {}
        for monitor in self.monitors:
            monitor.collect_metrics()
            metrics.update(monitor.aggregate_metrics())
            monitor.clear_metrics()
        return {f"system/{k}": float(v) for k, v in metrics.items()}

    def _loop(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.tracker.log_metrics(self.sample())
            except Exception as err:  # sampling must never kill training
                log.debug("system metrics sample failed: %s", err)


def open_tracker(config: PipelineConfig, *, command: str = "run", enabled: bool = True) -> Tracker:
    """The tracker of this process: enabled on rank 0 when ``tracking.enabled``; never touches the network."""
    return Tracker(config, command=command, enabled=enabled and config.tracking.enabled)


def iter_pending(run_dir: Path) -> Iterable[TrackingOp]:
    """The calls spooled in ``<run_dir>/mlflow_pending.jsonl``, oldest first; a damaged line is skipped
    with a warning."""
    path = Path(run_dir) / PENDING_FILE
    if not path.exists():
        return
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield TrackingOp.from_json(line)
        except (ValueError, KeyError) as err:
            log.warning("%s line %d is not a tracking call (%s); skipped", path, number, err)
