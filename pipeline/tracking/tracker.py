"""The :class:`Tracker`: buffered MLflow logging for the stages of one pipeline run.

Tracking never stops training. Every call is queued and sent by a background thread; when the
server or network fails the thread warns once, keeps the calls in order, retries with backoff and
says when it has flushed them. At the end of a process it waits ``tracking.flush_timeout`` seconds;
what is still unsent is written to ``<work_dir>/mlflow_pending.jsonl`` and sent by the next stage
(or ``python -m pipeline flush --config ...``).

A stage that may find nothing to do (a re-run of a finished stage) is opened *tentatively*: its calls
wait behind a gate until the stage either confirms it has work (:meth:`Tracker.confirm_stage`) or
ends without. A stage that did nothing logs nothing -- the finished run stays as it was -- unless
its parent has no run of that stage yet (a new pipeline run on data prepared earlier still shows
its ``prepare`` stage).
"""

from __future__ import annotations

import collections
import itertools
import logging
import os
import threading
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from pipeline.config import ConfigError, PipelineConfig
from pipeline.tracking.calls import PLOTS_DIR, CallSender, scoped_env
from pipeline.tracking.ops import (
    PARENT,
    PENDING_FILE,
    PermanentError,
    TrackingOp,
    is_transient,
    iter_pending,
    short_error,
    write_spool,
)
from pipeline.tracking.runs import RunTree, default_tracking_uri
from pipeline.tracking.system_metrics import SystemMetricsSampler

__all__ = ["Tracker", "open_tracker"]

log = logging.getLogger("pipeline.tracking")

# MLflow's REST limits per log_batch call.
_MAX_METRICS_PER_BATCH = 1000
_MAX_TAGS_PER_BATCH = 100
# Tries of one call that keeps failing while the server is reachable before it is dropped.
_ATTEMPTS_WHILE_REACHABLE = 3
# Queue entries that are bookkeeping, not calls: a tentative stage's gate and the end of its calls.
_GATE, _GATE_END = "stage_gate", "stage_end"


class Tracker:
    """Buffered MLflow logging for the stages of one pipeline run (one per process, rank 0 only).

    Usage (what :mod:`pipeline.cli` does)::

        tracker = open_tracker(config, command="run")
        tracker.start_stage("train", tentative=True)   # calls wait until the stage knows it has work
        tracker.confirm_stage()                         # ... it has: they are sent
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
        self._gate: TrackingOp | None = None
        self._last_step = 0
        self._system_metrics: SystemMetricsSampler | None = None
        self.tree: RunTree | None = None  # set when enabled
        self._sender: CallSender | None = None
        if not self.enabled:
            return
        tracking = config.tracking
        self.run_dir = config.run_dir
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.tracking_uri = tracking.uri or os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri(self.run_dir)
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

        from pipeline.console import is_verbose

        try:
            self._client = MlflowClient(tracking_uri=self.tracking_uri)
        except Exception as err:  # an unsupported scheme or malformed URI: a config error, not an outage
            raise ConfigError(
                f"tracking.uri {self.tracking_uri!r} is not a usable MLflow tracking URI ({err}); use "
                "http(s)://host:port of an MLflow server, sqlite:///path.db, or set tracking.enabled: false"
            ) from None
        self.tree = RunTree(self._client, config, tracking_uri=self.tracking_uri, experiment_name=self.experiment_name,
                            run_key=self.run_key, command=command)
        self._sender = CallSender(self._client, self.tree, config, quiet=not is_verbose())
        self._queue: collections.deque[TrackingOp] = collections.deque()
        self._cond = threading.Condition()
        self._stopping = False
        self._abandon = threading.Event()
        self._outage_since: float | None = None
        self._spooled_pending = 0  # ops loaded from the spool file and not sent yet
        self._config_logged = False
        self._parent_opened = False  # this process set the parent RUNNING: it sets its final status
        self.sent = 0
        self.dropped = 0
        self._load_spool()
        self._worker = threading.Thread(target=self._run_worker, name="mlflow-tracker", daemon=True)
        self._worker.start()

    # ------------------------------------------------------------------------------------------
    # public API (called by the stages; never blocks on the network)

    def start_stage(self, stage: str, *, tentative: bool = False) -> None:
        """Open (or reopen) the nested run of ``stage`` and log the config, tags and system metrics into it.

        ``tentative``: the stage may have nothing to do; its calls are held until :meth:`confirm_stage`
        (or dropped by :meth:`end_stage` when it never confirms and its run exists already).
        """
        self.stage = stage
        if not self.enabled:
            return
        if tentative:
            self._gate = TrackingOp(_GATE, self._stage_run(), {"stage": stage, "id": uuid.uuid4().hex, "state": "open"})
            self._enqueue_op(self._gate)
        params = self.config.mlflow_params()
        for run in (PARENT, self._stage_run()):
            self._enqueue("set_status", run, {"status": "RUNNING"})
            self._enqueue("log_params", run, {"params": params})
        # Where the stage came from; the parent keeps the tags it was created with (a later stage does
        # not rewrite its source).
        self._enqueue("log_batch", self._stage_run(), {"metrics": [], "tags": self.tree.common_tags()})
        if not self._config_logged:  # one config per process: `run` has three stages, one config
            self._enqueue("log_text", PARENT, {"text": self.config.to_yaml(), "artifact_file": "config.yaml"})
            self._config_logged = True
        if self.config.tracking.system_metrics:
            self._system_metrics = SystemMetricsSampler(self, self.config.tracking.system_metrics_interval)
            self._system_metrics.start()

    def confirm_stage(self, *, fresh_start: bool = False) -> None:
        """The current (tentative) stage has work: send its calls. ``fresh_start``: training starts from
        step 0, so under a parent that finished a training already it belongs to a new pipeline run."""
        if self.enabled and self._gate is not None:
            self._resolve_gate("work", fresh_start=fresh_start)

    def end_stage(self, status: str = "FINISHED") -> None:
        """Close the current stage's run with ``status`` (FINISHED, FAILED or KILLED).

        A tentative stage that never confirmed and FINISHED did nothing: its calls are dropped when its
        run exists already. A failure always shows.
        """
        if self._system_metrics is not None:
            self._system_metrics.stop()
            self._system_metrics = None
        if self.enabled and self.stage is not None:
            gate = self._gate
            if gate is not None and gate.payload["state"] == "open":
                self._resolve_gate("no_work" if status == "FINISHED" else "work")
            self._enqueue("set_status", self._stage_run(), {"status": status})
            if status != "FINISHED":
                self._enqueue("set_status", PARENT, {"status": status})
            if gate is not None:
                self._enqueue(_GATE_END, self._stage_run(), {"id": gate.payload["id"]})
        self._gate = None
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
        import json

        self.log_text(json.dumps(data, indent=2, default=str), artifact_file, parent=parent)

    def log_text(self, text: str, artifact_file: str, *, parent: bool = False) -> None:
        if self.enabled:
            self._enqueue("log_text", PARENT if parent else self._stage_run(), {"text": text, "artifact_file": artifact_file})

    def log_model(self, final_model_path: str | os.PathLike, *, metadata: Mapping[str, Any] | None = None) -> None:
        """Log the model saved by :func:`pipeline.evaluate.save_final_model` with ``mlflow.pytorch.log_model``
        into the current stage's run -- in the run's own experiment and artifact store -- and register it
        under the experiment's name (``tracking.register_model``); without registration the file is
        logged as the artifact ``model/``."""
        if not self.enabled:
            return
        path = str(Path(final_model_path).resolve())
        if self.config.tracking.register_model:
            payload = {"path": path, "registered_name": self.experiment_name, "metadata": dict(metadata or {})}
            self._enqueue("log_model", self._stage_run(), payload)
        else:
            self.log_artifact(path, "model")

    def log_training_plots(self, unit: str) -> None:
        """Plot the train stage's curves (raw vs 2TA losses, averaging lengths) from the server's metric
        history, which spans restarts and continuations, and log them into the train run and the parent."""
        if self.enabled and self.config.tracking.plots:
            self._enqueue("training_plots", self._stage_run(), {"unit": unit, "plot_dir": str(self.run_dir / PLOTS_DIR)})

    def log_summary_plot(self, final_metrics: Mapping[str, float], unit: str) -> None:
        """A chart of the final bpc / perplexity, into the current stage's run and the parent."""
        if self.enabled and self.config.tracking.plots:
            payload = {"metrics": dict(final_metrics), "unit": unit, "plot_dir": str(self.run_dir / PLOTS_DIR)}
            self._enqueue("summary_plot", self._stage_run(), payload)

    def log_pareto_plot(self) -> None:
        """A sentence VAE's place among its experiment's VAE runs (NLL vs MI, each group's Pareto frontier),
        with the points as CSV, into the current stage's run and the parent; call after the final metrics."""
        if self.enabled and self.config.tracking.plots:
            self._enqueue("pareto_plot", self._stage_run(), {"plot_dir": str(self.run_dir / PLOTS_DIR), "split": "valid"})

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
        """Finish: set the parent's status (when this process reopened it), flush for up to
        ``tracking.flush_timeout`` seconds, spool what is still unsent to
        ``<work_dir>/mlflow_pending.jsonl``, stop the thread."""
        if self._system_metrics is not None:
            self._system_metrics.stop()
            self._system_metrics = None
        if not self.enabled:
            return
        if self._gate is not None and self._gate.payload["state"] == "open":
            self._resolve_gate("work")  # closed mid-stage: whatever it queued is worth keeping
        if pipeline_status is not None:
            self._enqueue("set_status", PARENT, {"status": pipeline_status, "if_opened": True})
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
        return self.tree.run_ids.get(PARENT) if self.tree is not None else None

    @property
    def run_ids(self) -> dict[str, str]:
        """``parent`` / ``stage:<name>`` -> run id, for the runs this process has resolved."""
        return self.tree.run_ids if self.tree is not None else {}

    @property
    def experiment_id(self) -> str | None:
        return self.tree.experiment_id if self.tree is not None else None

    @property
    def registered_models(self) -> dict[str, str]:
        """Model name -> version registered by this process."""
        return dict(self._sender.registered) if self._sender is not None else {}

    # ------------------------------------------------------------------------------------------
    # queue and spool

    def _stage_run(self) -> str:
        return f"stage:{self.stage}" if self.stage else PARENT

    def _enqueue(self, kind: str, run: str, payload: dict[str, Any]) -> None:
        self._enqueue_op(TrackingOp(kind, run, payload))

    def _enqueue_op(self, op: TrackingOp) -> None:
        with self._cond:
            self._queue.append(op)
            self._cond.notify_all()

    def _resolve_gate(self, state: str, *, fresh_start: bool = False) -> None:
        with self._cond:
            assert self._gate is not None
            self._gate.payload["state"] = state
            if fresh_start:
                self._gate.payload["fresh_start"] = True
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
        with self._cond:
            remaining = list(self._queue)
        path = write_spool(self.run_dir, remaining)
        if path is not None:
            log.warning(
                "%d MLflow calls could not be sent to %s; kept in %s. They are sent by the next stage, or now "
                "with: python -m pipeline flush --config <config>", len(remaining), self.tracking_uri, path,
            )

    # ------------------------------------------------------------------------------------------
    # the background thread

    def _head_ready(self) -> bool:
        """Is there a call to send (not a gate still waiting for its stage to decide)?"""
        if not self._queue:
            return False
        head = self._queue[0]
        return not (head.kind == _GATE and head.payload["state"] == "open") or self._stopping

    def _run_worker(self) -> None:
        delay = 1.0
        failures, last_failed = 0, None
        while True:
            with self._cond:
                while not self._head_ready() and not self._stopping:
                    self._cond.wait()
                if not self._head_ready() or self._abandon.is_set() and self._outage_since is not None:
                    return
                if self._queue[0] is not last_failed:
                    batch, size = self._take_batch()
            try:
                consumed = self._execute(batch, size)
            except Exception as err:  # tracking must never kill training
                head = self._queue[0]  # only this thread removes calls, so the head is stable
                failures = failures + 1 if head is last_failed else 1
                last_failed = head
                transient = is_transient(err)
                if transient and not self._server_reachable():
                    if self._outage_since is None:
                        self._outage_since = time.monotonic()
                        log.warning(
                            "MLflow at %s unreachable (%s); buffering tracking calls and retrying, training continues",
                            self.tracking_uri, short_error(err),
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
                log.warning("MLflow %s on %s dropped: %s", batch.kind, batch.run, short_error(err),
                            exc_info=not isinstance(err, PermanentError) and log.isEnabledFor(logging.DEBUG))
                self.dropped += 1
                consumed = size
            else:
                self.sent += 1
            self._done(consumed)
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

    def _take_batch(self) -> tuple[TrackingOp, int]:
        """The head of the queue, and how many queue entries it stands for: consecutive metric/tag
        batches of one run merged into one call."""
        head = self._queue[0]
        if head.kind != "log_batch":
            return head, 1
        metrics = list(head.payload["metrics"])
        tags = dict(head.payload["tags"])
        size = 1
        for op in itertools.islice(self._queue, 1, None):
            if op.kind != "log_batch" or op.run != head.run or len(metrics) + len(op.payload["metrics"]) > _MAX_METRICS_PER_BATCH:
                break
            if len(tags) + len(op.payload["tags"]) > _MAX_TAGS_PER_BATCH:
                break
            metrics.extend(op.payload["metrics"])
            tags.update(op.payload["tags"])
            size += 1
        return TrackingOp("log_batch", head.run, {"metrics": metrics, "tags": tags}), size

    def _done(self, count: int) -> None:
        with self._cond:
            for _ in range(count):
                self._queue.popleft()
                if self._spooled_pending:
                    self._spooled_pending -= 1
                    if not self._spooled_pending and self._spool_path().exists():
                        self._spool_path().unlink()  # every spooled call has been sent
            self._cond.notify_all()

    def _execute(self, op: TrackingOp, size: int) -> int:
        """Send ``op``; returns how many queue entries it consumed."""
        with scoped_env(self._http_env):
            if op.kind == _GATE:
                return self._pass_gate(op)
            if op.kind == _GATE_END:
                return 1
            if op.kind == "set_status" and op.run == PARENT:
                if op.payload["status"] == "RUNNING":
                    self._parent_opened = True
                elif op.payload.get("if_opened") and not self._parent_opened:
                    return 1  # nothing this process did reopened the parent: it stays as it was
            self._sender.send(op)
            return size

    def _pass_gate(self, gate: TrackingOp) -> int:
        """A tentative stage has decided: let its calls through, or drop them up to its end marker."""
        state, stage = gate.payload["state"], gate.payload["stage"]
        if state != "no_work":
            if gate.payload.get("fresh_start"):
                self.tree.start_new_parent_if_trained(stage)
            return 1
        if not self.tree.has_stage_run(stage):
            return 1  # the first time this parent sees the stage: show it, even though it had nothing to do
        with self._cond:
            for index, op in enumerate(self._queue):
                if op.kind == _GATE_END and op.payload["id"] == gate.payload["id"]:
                    log.debug("%s had nothing to do: %d MLflow calls not sent", stage, index - 1)
                    return index + 1
        return 1  # the end marker is not queued yet (cannot happen: the gate resolves in end_stage)


def open_tracker(config: PipelineConfig, *, command: str = "run", enabled: bool = True) -> Tracker:
    """The tracker of this process: enabled on rank 0 when ``tracking.enabled``; never touches the network."""
    return Tracker(config, command=command, enabled=enabled and config.tracking.enabled)
