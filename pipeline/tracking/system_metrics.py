"""System metrics (CPU, memory, disk, network, GPU) sampled with MLflow's monitors into the tracker's queue."""

from __future__ import annotations

import logging
import threading
from typing import Any

__all__ = ["SystemMetricsSampler"]

log = logging.getLogger("pipeline.tracking")


class SystemMetricsSampler:
    """CPU, memory, disk, network and (when NVML finds one) GPU utilisation, sampled with MLflow's own
    monitors and sent through the tracker's queue (MLflow's SystemMetricsMonitor stops for good at
    the first failed request, and logs past our buffer)."""

    def __init__(self, tracker: Any, interval: float) -> None:
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
