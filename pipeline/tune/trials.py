"""A study's trials as pipeline runs: each trial's config, and the executors that run them.

Each trial is one pipeline run (prepare -> train -> evaluate), laid out like a sweep's points
(:func:`pipeline.sweep.grid.point_config` with :data:`TUNE_LAYOUT`): named ``<config>-trial<slot>``, work dir
``<run dir>/tune-<key>/trial-<slot>``, checkpoints ``<checkpoint.url>/tune-<key>/trial-<slot>``, MLflow run
key ``<key>-<slot>`` nested under the study run (``tracking.sweep_key`` = the study key), and a ``tune``
section that makes its training report to the study (:mod:`pipeline.tune.reporting`).

Executors (what :func:`pipeline.tune.driver.run_study` drives; only these start or watch anything):

* :class:`LocalTrials` -- ``python -m pipeline run`` processes on this machine, ``parallel`` at a time
  (:class:`pipeline.sweep.local.PointRunner`); final metrics from the trial's ``eval_results.json``.
* :class:`KubernetesTrials` -- one driver Job per trial (:func:`pipeline.k8s.builders.build_sweep_manifest`,
  submitted by :func:`pipeline.sweep.kubernetes.submit_objects`), polled through the API server; final
  metrics read from MLflow (the trial's pipeline run, found by its run key).
* :class:`InlineTrials` -- in this process, one at a time (benchmarks, tests: no process start-up).
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from pipeline.config import PipelineConfig
from pipeline.errors import EXIT_PRUNED, PipelineError, TrialPruned
from pipeline.sweep.grid import PointLayout, SweepPoint, point_config
from pipeline.tune.space import SearchSpace, config_values
from pipeline.tune.study import StudySettings

__all__ = [
    "TUNE_LAYOUT",
    "InlineTrials",
    "KubernetesTrials",
    "LocalTrials",
    "TrialExecutor",
    "TrialResult",
    "mlflow_final_metrics",
    "trial_config",
]

log = logging.getLogger("pipeline.tune")

TUNE_LAYOUT = PointLayout(folder="tune", prefix="trial", short="t", what="trial")


def trial_config(base: PipelineConfig, space: SearchSpace, params: Mapping[str, Any], *, key: str, slot: int,
                 study: str, settings: StudySettings, storage: str | None,
                 tracking_uri: str | None = None) -> PipelineConfig:
    """The validated config of the trial in ``slot`` with sampled ``params``.

    ``storage``: the Optuna storage the trial's training reports to (None: it reports nothing, e.g. a
    multi-objective study, which Optuna cannot prune). ``tracking_uri`` pins the MLflow store (local
    trials); None leaves the base's (Kubernetes: the pods' env). Raises
    :class:`~pipeline.config.ConfigError` naming the trial and the offending value.
    """
    overrides = config_values(space, params)
    overrides.update({
        "tune.storage": storage, "tune.study": study, "tune.trial": slot, "tune.prune_on": settings.prune_on,
        "tune.pruner": settings.pruner, "tune.startup_trials": settings.startup_trials,
        "tune.warmup_steps": settings.warmup_steps, "tune.percentile": settings.percentile,
    })
    point = SweepPoint(index=slot, overrides=overrides, slug=f"trial{slot}")
    return point_config(base, point, key, tracking_uri=tracking_uri, layout=TUNE_LAYOUT)


@dataclass
class TrialResult:
    """How one trial's run ended: its exit code (0 done, 8 pruned, None unknown), final metrics, where to look."""

    slot: int
    returncode: int | None
    metrics: dict[str, float] = field(default_factory=dict)
    where: str = ""

    @property
    def pruned(self) -> bool:
        return self.returncode == EXIT_PRUNED


class TrialExecutor(Protocol):
    """Runs trials' pipelines; :func:`pipeline.tune.driver.run_study` starts them and polls for their ends."""

    @property
    def has_room(self) -> bool: ...

    @property
    def running(self) -> int: ...

    def start(self, slot: int, config: PipelineConfig) -> str:
        """Start the trial; returns where to follow it (a log file, a Job)."""
        ...

    def poll(self) -> list[TrialResult]:
        """The trials that ended since the last call."""
        ...

    def stop(self, slot: int) -> None:
        """Stop a trial the study has ended already (its own process stops itself; a Job's pods may not)."""
        ...

    def close(self) -> None:
        """The driver stops: stop local trials (they resume when the study runs again), leave Jobs running."""
        ...


class LocalTrials:
    """Trials as ``python -m pipeline run`` processes, ``parallel`` at a time (logs ``trial-<slot>.log``)."""

    def __init__(self, directory: Path, *, parallel: int = 1) -> None:
        from pipeline.sweep.local import PointRunner

        self.runner = PointRunner(directory, parallel=parallel, prefix="trial")

    @property
    def has_room(self) -> bool:
        return self.runner.has_room

    @property
    def running(self) -> int:
        return self.runner.running

    def start(self, slot: int, config: PipelineConfig) -> str:
        return str(self.runner.start(slot, config))

    def poll(self) -> list[TrialResult]:
        return [TrialResult(o.index, o.returncode, o.metrics, str(o.log_path)) for o in self.runner.poll()]

    def stop(self, slot: int) -> None:  # noqa: ARG002 - a local trial stops itself at its next evaluation
        return None

    def close(self) -> None:
        self.runner.terminate()


class InlineTrials:
    """Trials run in this process, one at a time, as ``python -m pipeline run`` would (benchmarks and tests:
    no process start-up); each trial's printed summary goes to ``<directory>/trial-<slot>.log``."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._done: list[TrialResult] = []

    @property
    def has_room(self) -> bool:
        return not self._done

    @property
    def running(self) -> int:
        return 0  # a trial runs inside start(): nothing runs between calls

    def start(self, slot: int, config: PipelineConfig) -> str:
        from pipeline.stages import run_stage
        from pipeline.sweep.local import final_metrics

        self.directory.mkdir(parents=True, exist_ok=True)
        log_path = self.directory / f"trial-{slot}.log"
        code = 0
        with open(log_path, "a") as handle, contextlib.redirect_stdout(handle):
            try:
                run_stage("run", config)
            except TrialPruned as err:
                log.info("%s", err)
                code = EXIT_PRUNED
            except PipelineError as err:
                log.error("trial %d: %s", slot, err)
                code = err.exit_code
            except Exception:
                log.exception("trial %d failed", slot)
                code = 1
        self._done.append(TrialResult(slot, code, final_metrics(config) if code == 0 else {}, str(log_path)))
        return str(log_path)

    def poll(self) -> list[TrialResult]:
        done, self._done = self._done, []
        return done

    def stop(self, slot: int) -> None:  # noqa: ARG002 - nothing runs between calls
        return None

    def close(self) -> None:
        return None


def mlflow_final_metrics(client: Any, experiment: str, run_key: str) -> dict[str, float]:
    """The ``final/*`` metrics of the pipeline run tagged ``pipeline.run_key=<run_key>`` ({} when none yet)."""
    found = client.get_experiment_by_name(experiment)
    if found is None:
        return {}
    runs = client.search_runs([found.experiment_id], max_results=1, order_by=["attributes.start_time ASC"],
                              filter_string=f"tags.`pipeline.run_key` = '{run_key}' and tags.`pipeline.kind` = 'pipeline'")
    if not runs:
        return {}
    return {k[len("final/"):]: float(v) for k, v in runs[0].data.metrics.items() if k.startswith("final/")}


class KubernetesTrials:
    """Trials as driver Jobs (one per trial, sharing one driver ServiceAccount), watched by polling the API
    server; a finished trial's final metrics are read from MLflow (``tracking_uri``: the store the pods log
    to, reached from here). Closing leaves the Jobs running: the study continues them when it runs again
    (a re-queued trial keeps its slot, so its Job and checkpoints)."""

    def __init__(self, api: Any, *, study_name: str, key: str, tracking_uri: str | None, experiment: str,
                 parallel: int = 1) -> None:
        self.api = api
        self.study_name = study_name
        self.key = key
        self.tracking_uri = tracking_uri
        self.experiment = experiment
        self.parallel = max(1, parallel)
        self._jobs: dict[int, tuple[str, str, PipelineConfig]] = {}  # slot -> (namespace, job, config)

    @property
    def has_room(self) -> bool:
        return len(self._jobs) < self.parallel

    @property
    def running(self) -> int:
        return len(self._jobs)

    def objects(self, config: PipelineConfig) -> list[dict[str, Any]]:
        """The trial's objects: the shared driver account, its ConfigMap and driver Job (labelled with the key)."""
        from pipeline.k8s.builders import build_sweep_manifest

        return build_sweep_manifest([config], f"{self.study_name}-study", self.key)

    def start(self, slot: int, config: PipelineConfig) -> str:
        from pipeline.k8s.builders import ManifestNames
        from pipeline.sweep.kubernetes import submit_objects

        states = dict(submit_objects(self.objects(config), self.api))
        names = ManifestNames.of(config)
        job = f"Job/{names.base}"
        if states.get(job) == "exists":
            log.info("trial %d: adopting its driver Job %s (submitted earlier)", slot, names.base)
        self._jobs[slot] = (names.namespace, names.base, config)
        return f"job/{names.base} in namespace {names.namespace}"

    def poll(self) -> list[TrialResult]:
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        from pipeline.k8s.driver import job_state

        batch = client.BatchV1Api(self.api)
        done = []
        for slot, (namespace, name, config) in list(self._jobs.items()):
            try:
                job = self.api.sanitize_for_serialization(batch.read_namespaced_job(name, namespace))
            except ApiException as err:
                if err.status != 404:
                    log.warning("trial %d: cannot read Job %s (%s); trying again", slot, name, err.reason)
                    continue
                job = {"status": {"conditions": [{"type": "Failed", "status": "True", "reason": "Deleted"}]}}
            state = job_state(job)
            if state.phase == "running":
                continue
            del self._jobs[slot]
            metrics = self._metrics(config) if state.phase == "succeeded" else {}
            done.append(TrialResult(slot, 0 if state.phase == "succeeded" else 1, metrics,
                                    f"job/{name} in namespace {namespace} ({state.reason or state.phase})"))
        return done

    def _metrics(self, config: PipelineConfig) -> dict[str, float]:
        if self.tracking_uri is None:
            return {}
        from mlflow.tracking import MlflowClient

        try:
            return mlflow_final_metrics(MlflowClient(tracking_uri=self.tracking_uri), self.experiment,
                                        str(config.tracking.run_key))
        except Exception as err:
            log.warning("cannot read the final metrics of %s from MLflow at %s (%s)", config.name, self.tracking_uri, err)
            return {}

    def stop(self, slot: int) -> None:
        """Delete the trial's driver Job (its stage Jobs go with it): the study pruned it already."""
        from kubernetes import client
        from kubernetes.client.exceptions import ApiException

        if slot not in self._jobs:
            return
        namespace, name, _ = self._jobs[slot]
        try:
            client.BatchV1Api(self.api).delete_namespaced_job(name, namespace, propagation_policy="Background")
        except ApiException as err:
            if err.status != 404:
                log.warning("trial %d: could not delete Job %s (%s)", slot, name, err.reason)

    def close(self) -> None:
        return None
