"""Running a sweep's points on this machine: one ``python -m pipeline run`` process per point.

Each point's resolved config is written to ``<sweep dir>/point-<i>.yaml`` and run as its own process
(its log in ``point-<i>.log``), at most ``parallel`` at a time, each with ``cores / parallel`` torch
threads (``OMP_NUM_THREADS``, unless set already); the dataset is prepared once before.
Starting the same sweep again continues it: finished points have nothing to do (their ``run`` says
so and logs nothing), interrupted ones resume from their last checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from pipeline.config import PipelineConfig
from pipeline.pareto.frontier import FrontierPoint
from pipeline.pareto.runs import frontier_point

__all__ = ["PointOutcome", "PointRunner", "final_metrics", "local_points", "run_points"]

log = logging.getLogger("pipeline.sweep")

RESULTS_FILE = "eval_results.json"  # pipeline.evaluate.RESULTS_FILE, not imported: that pulls in torch


@dataclass
class PointOutcome:
    """How one point's process ended: its exit code, log file and final metrics (if evaluated)."""

    index: int
    name: str
    returncode: int
    log_path: Path
    metrics: dict[str, float] = field(default_factory=dict)

    @property
    def ok(self) -> bool:
        return self.returncode == 0


def _command(config_path: Path, extra_args: Sequence[str]) -> list[str]:
    return [sys.executable, "-m", "pipeline", "run", "--config", str(config_path), *extra_args]


def final_metrics(config: PipelineConfig) -> dict[str, float]:
    """The final metrics a finished run wrote to ``<run dir>/eval_results.json`` ({} when it has none)."""
    try:
        saved = json.loads((config.run_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    metrics = saved.get("metrics", {}) if isinstance(saved, dict) else {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


class PointRunner:
    """Point processes started one at a time and reaped as they end: a sweep starts a fixed list
    (:func:`run_points`), a study (:mod:`pipeline.tune`) asks for its next trial whenever one ends.

    Each point's resolved config is written to ``<directory>/<prefix>-<index>.yaml`` and its output to
    ``<prefix>-<index>.log`` (appended: a resumed point keeps its earlier attempts). With ``parallel`` > 1
    each process gets ``cores / parallel`` torch threads (``OMP_NUM_THREADS``, unless set already).
    """

    def __init__(self, directory: Path, *, parallel: int = 1, prefix: str = "point",
                 extra_args: Sequence[str] = ()) -> None:
        self.directory = directory
        self.parallel = max(1, parallel)
        self.prefix = prefix
        self.extra_args = tuple(extra_args)
        self._running: dict[int, tuple[subprocess.Popen, object, PipelineConfig]] = {}
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1"}
        if self.parallel > 1 and "OMP_NUM_THREADS" not in self.env:
            # Points side by side share the cores: each gets its share of torch's threads instead of all of them.
            self.env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // self.parallel))

    @property
    def running(self) -> int:
        """Processes started and not yet reaped."""
        return len(self._running)

    @property
    def has_room(self) -> bool:
        """Whether fewer than ``parallel`` processes run."""
        return len(self._running) < self.parallel

    def log_path(self, index: int) -> Path:
        return self.directory / f"{self.prefix}-{index}.log"

    def start(self, index: int, config: PipelineConfig) -> Path:
        """Start ``python -m pipeline run`` of ``config`` as point ``index``; returns its log file."""
        if index in self._running:
            raise ValueError(f"{self.prefix} {index} is running already")
        self.directory.mkdir(parents=True, exist_ok=True)
        config_path = self.directory / f"{self.prefix}-{index}.yaml"
        config_path.write_text(config.to_yaml())
        log_path = self.log_path(index)
        handle = open(log_path, "ab")
        log.info("%s %d (%s) started; log %s", self.prefix, index, config.name, log_path)
        proc = subprocess.Popen(_command(config_path, self.extra_args), stdout=handle, stderr=subprocess.STDOUT,
                                env=self.env)
        self._running[index] = (proc, handle, config)
        return log_path

    def poll(self) -> list[PointOutcome]:
        """The points that ended since the last call (their final metrics read when they succeeded)."""
        done = []
        for index, (proc, handle, config) in list(self._running.items()):
            if proc.poll() is None:
                continue
            handle.close()
            del self._running[index]
            outcome = PointOutcome(index, config.name, proc.returncode, self.log_path(index),
                                   final_metrics(config) if proc.returncode == 0 else {})
            log.info("%s %d (%s) %s", self.prefix, index, config.name,
                     "finished" if outcome.ok else f"ended with exit code {proc.returncode}; see {outcome.log_path}")
            done.append(outcome)
        return done

    def terminate(self, timeout: float = 60.0) -> None:
        """Stop every running point (SIGTERM: it closes its MLflow runs and resumes when started again)."""
        for proc, _, _ in self._running.values():
            proc.terminate()
        for proc, handle, _ in self._running.values():
            try:
                proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
        self._running.clear()


def run_points(configs: Sequence[PipelineConfig], directory: Path, *, parallel: int = 1,
               extra_args: Sequence[str] = (), poll_seconds: float = 0.5) -> list[PointOutcome]:
    """Run every point's pipeline as a subprocess, ``parallel`` at a time; wait for all; outcomes in order.

    A point that fails does not stop the others (its outcome has the exit code and the log to read).
    Interrupting the sweep (Ctrl-C, SIGTERM) terminates the running points, which save what they can.
    """
    runner = PointRunner(directory, parallel=parallel, extra_args=extra_args)
    waiting = list(enumerate(configs))
    outcomes: dict[int, PointOutcome] = {}
    try:
        while waiting or runner.running:
            while waiting and runner.has_room:
                index, config = waiting.pop(0)
                runner.start(index, config)
            for outcome in runner.poll():
                outcomes[outcome.index] = outcome
            time.sleep(poll_seconds if runner.running else 0)
    finally:
        runner.terminate()
    return [outcomes[i] for i in sorted(outcomes)]


def local_points(configs: Sequence[PipelineConfig], outcomes: Sequence[PointOutcome], *,
                 split: str = "valid") -> list[FrontierPoint]:
    """The Pareto points of the evaluated points, from their ``eval_results.json`` (no MLflow needed)."""
    points = []
    for outcome in outcomes:
        config = configs[outcome.index]
        point = frontier_point(outcome.metrics, config.mlflow_params(), split=split, label=config.name,
                               extra={"run_name": config.name})
        if point is not None:
            points.append(point)
    return points
