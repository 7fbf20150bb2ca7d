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

__all__ = ["PointOutcome", "local_points", "run_points"]

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


def _final_metrics(config: PipelineConfig) -> dict[str, float]:
    try:
        saved = json.loads((config.run_dir / RESULTS_FILE).read_text())
    except (OSError, ValueError):
        return {}
    metrics = saved.get("metrics", {}) if isinstance(saved, dict) else {}
    return {k: float(v) for k, v in metrics.items() if isinstance(v, (int, float))}


def run_points(configs: Sequence[PipelineConfig], directory: Path, *, parallel: int = 1,
               extra_args: Sequence[str] = (), poll_seconds: float = 0.5) -> list[PointOutcome]:
    """Run every point's pipeline as a subprocess, ``parallel`` at a time; wait for all; outcomes in order.

    A point that fails does not stop the others (its outcome has the exit code and the log to read).
    Interrupting the sweep (Ctrl-C, SIGTERM) terminates the running points, which save what they can.
    """
    directory.mkdir(parents=True, exist_ok=True)
    waiting = list(enumerate(configs))
    running: dict[int, tuple[subprocess.Popen, object]] = {}
    outcomes: dict[int, PointOutcome] = {}
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    if parallel > 1 and "OMP_NUM_THREADS" not in env:
        # Points side by side share the cores: each gets its share of torch's threads instead of all of them.
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // parallel))
    try:
        while waiting or running:
            while waiting and len(running) < max(1, parallel):
                index, config = waiting.pop(0)
                config_path = directory / f"point-{index}.yaml"
                config_path.write_text(config.to_yaml())
                log_path = directory / f"point-{index}.log"
                handle = open(log_path, "ab")
                log.info("sweep point %d (%s) started; log %s", index, config.name, log_path)
                running[index] = (subprocess.Popen(_command(config_path, extra_args), stdout=handle,
                                                   stderr=subprocess.STDOUT, env=env), handle)
            for index, (proc, handle) in list(running.items()):
                if proc.poll() is None:
                    continue
                handle.close()
                del running[index]
                config = configs[index]
                outcome = PointOutcome(index, config.name, proc.returncode, directory / f"point-{index}.log",
                                       _final_metrics(config) if proc.returncode == 0 else {})
                outcomes[index] = outcome
                log.info("sweep point %d (%s) %s", index, config.name,
                         "finished" if outcome.ok else f"FAILED (exit {proc.returncode}); see {outcome.log_path}")
            time.sleep(poll_seconds if running else 0)
    finally:
        for proc, handle in running.values():
            proc.terminate()
        for proc, handle in running.values():
            try:
                proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                proc.kill()
            handle.close()
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
