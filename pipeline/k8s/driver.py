"""The in-cluster driver: creates the stage Jobs of one pipeline run in order and waits on them.

``prepare`` -> ``train`` -> ``evaluate``, each a Job built by :mod:`pipeline.k8s.builders`. The
driver watches each Job (a ``watch`` on the Job's name, re-opened every ``cluster.poll_seconds``;
each wake-up re-reads the Job with ``get``) until its conditions say ``Complete`` or ``Failed``, and
decides:

* ``prepare`` / ``evaluate`` failed: the pipeline fails (their Jobs already retried their pods).
* ``train`` failed because a pod was preempted (a ``DisruptionTarget`` condition, reported by the
  ``podFailurePolicy`` or seen on a pod): the Job is deleted and re-created - it resumes from the
  last committed checkpoint - without using up ``cluster.max_train_restarts``
  (``cluster.max_preemption_restarts`` bounds these separately).
* ``train`` failed with a non-retriable exit code (``podFailurePolicy`` ``FailJob``): the pipeline fails.
* ``train`` failed otherwise: re-created while ``cluster.max_train_restarts`` allows.

A driver pod that is itself replaced (node failure, preemption) finds its stage Jobs by name,
adopts those it owns (same driver Job uid) and continues; the restart counts live in the train
Job's annotations. Stage Jobs left by an earlier driver of the same name are deleted first.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

from pipeline.config import PipelineConfig
from pipeline.k8s.builders import (
    LABEL,
    DriverRef,
    Stage,
    build_stage_job,
    build_train_service,
    stage_job_name,
)

__all__ = [
    "DriverEnvironmentError",
    "JobState",
    "PipelineDriver",
    "StageFailed",
    "classify_failure",
    "driver_ref_from_env",
    "job_state",
]

log = logging.getLogger(__name__)

FailureKind = Literal["preempted", "fatal", "retriable"]


class StageFailed(RuntimeError):
    """A stage failed for good; the message names the stage, the cause and where to look."""


class DriverEnvironmentError(ValueError):
    """The driver cannot tell which Job it is (it runs outside its Job); the message names the fix."""


def driver_ref_from_env(environ: Mapping[str, str] = os.environ) -> DriverRef:
    """The driver's own Job, from the variables the driver Job sets through the downward API."""
    missing = [key for key in ("RLM_DRIVER_NAME", "RLM_NAMESPACE", "RLM_CONFIGMAP") if not environ.get(key)]
    if missing:
        raise DriverEnvironmentError(
            f"{', '.join(missing)} not set: the driver runs inside the driver Job that "
            "`python -m pipeline k8s-manifest` builds, which sets them; to run it elsewhere (e.g. through "
            "`kubectl proxy`), set RLM_DRIVER_NAME, RLM_NAMESPACE and RLM_CONFIGMAP yourself"
        )
    return DriverRef(
        name=environ["RLM_DRIVER_NAME"],
        namespace=environ["RLM_NAMESPACE"],
        uid=environ.get("RLM_DRIVER_UID") or None,
        configmap=environ["RLM_CONFIGMAP"],
    )


@dataclass(frozen=True)
class JobState:
    """Where a Job is: ``running`` until a ``Complete`` or ``Failed`` condition is true."""

    phase: Literal["running", "succeeded", "failed"]
    reason: str = ""
    message: str = ""


def job_state(job: Mapping[str, Any]) -> JobState:
    """The state of a Job object (a dict as the API returns it)."""
    for condition in (job.get("status") or {}).get("conditions") or []:
        if condition.get("status") != "True":
            continue
        if condition.get("type") == "Complete":
            return JobState("succeeded", condition.get("reason") or "", condition.get("message") or "")
        if condition.get("type") == "Failed":
            return JobState("failed", condition.get("reason") or "", condition.get("message") or "")
    return JobState("running")


def _preempted_pod(pod: Mapping[str, Any]) -> bool:
    return any(
        c.get("type") == "DisruptionTarget" and c.get("status") == "True"
        for c in (pod.get("status") or {}).get("conditions") or []
    )


def classify_failure(state: JobState, pods: list[Mapping[str, Any]]) -> FailureKind:
    """Why a train Job failed.

    ``preempted``: the podFailurePolicy matched a ``DisruptionTarget`` condition (the Job controller
    says so in the condition's message), or one of its pods carries that condition.
    ``fatal``: another podFailurePolicy ``FailJob`` rule matched (a non-retriable exit code).
    ``retriable``: anything else (``BackoffLimitExceeded``, a deleted Job, ...).
    """
    if "DisruptionTarget" in state.message or any(_preempted_pod(p) for p in pods):
        return "preempted"
    if state.reason == "PodFailurePolicy":
        return "fatal"
    return "retriable"


@dataclass
class _TrainCounts:
    attempt: int = 1
    restarts_used: int = 0
    preemptions: int = 0

    @classmethod
    def of(cls, job: Mapping[str, Any]) -> _TrainCounts:
        notes = (job.get("metadata") or {}).get("annotations") or {}
        return cls(*(int(notes.get(f"{LABEL}/{key}", default))
                     for key, default in (("attempt", 1), ("restarts-used", 0), ("preemptions", 0))))


def _is_timeout(err: BaseException) -> bool:
    """A read timeout of the watch request (a quiet Job), as opposed to an error."""
    text = f"{type(err).__name__} {err}".lower()
    return "timeout" in text or "timed out" in text


class PipelineDriver:
    """Runs ``prepare``, ``train`` and ``evaluate`` of ``config`` as Jobs of the run ``driver``.

    ``api_client``: a ``kubernetes.client.ApiClient`` (in-cluster, or any API server: the tests use
    an emulator). ``watch``: wait for Job changes with a watch (the default; reacts at once, one
    long request per ``poll_seconds``) or, with False, by sleeping ``poll_seconds`` between reads.
    ``sleep`` is injectable so that tests need not wait.
    """

    def __init__(self, config: PipelineConfig, driver: DriverRef, api_client: Any, *,
                 sleep: Callable[[float], None] = time.sleep, log_tail_lines: int = 50,
                 delete_timeout: float = 900.0, watch: bool = True) -> None:
        from kubernetes import client

        self.config = config
        self.driver = driver
        self.batch = client.BatchV1Api(api_client)
        self.core = client.CoreV1Api(api_client)
        self._to_dict = api_client.sanitize_for_serialization
        self._sleep = sleep
        self._poll = config.cluster.poll_seconds
        self._log_tail_lines = log_tail_lines
        self._delete_timeout = delete_timeout
        self._watch = watch

    # -- the pipeline -----------------------------------------------------------------------

    def run(self) -> None:
        """All stages in order; :class:`StageFailed` when one fails for good."""
        log.info("pipeline %s (run %s) in namespace %s", self.config.name, self.driver.name, self.driver.namespace)
        self.run_stage("prepare")
        self.run_train()
        self.run_stage("evaluate")
        log.info("pipeline %s finished", self.driver.name)

    def run_stage(self, stage: Stage) -> None:
        """A stage whose retries are its Job's own (``prepare``, ``evaluate``)."""
        name = stage_job_name(self.driver.name, stage)
        existing = self._submit(build_stage_job(self.config, stage, self.driver))
        if existing is not None:
            log.info("%s: adopting Job %s created earlier by this run", stage, name)
        state = self._wait(name)
        if state.phase == "failed":
            self._report_failed_pods(stage)
            raise StageFailed(f"stage {stage} failed ({state.reason}: {state.message}); "
                              f"see the pod logs above or `kubectl -n {self.driver.namespace} logs job/{name}`")
        log.info("%s: done", stage)

    def run_train(self) -> None:
        """The train Job, re-created after failures as the budgets allow (each resumes from the last checkpoint)."""
        cluster = self.config.cluster
        name = stage_job_name(self.driver.name, "train")
        self._ensure_service()
        existing = self._submit(build_stage_job(self.config, "train", self.driver))
        counts = _TrainCounts.of(existing) if existing is not None else _TrainCounts()
        if existing is not None:
            log.info("train: adopting Job %s (attempt %d) created earlier by this run", name, counts.attempt)
        while True:
            state = self._wait(name)
            if state.phase == "succeeded":
                log.info("train: done (attempt %d, %d restarts after failures, %d after preemption)",
                         counts.attempt, counts.restarts_used, counts.preemptions)
                return
            pods = self._stage_pods("train")
            self._report_failed_pods("train", pods)
            kind = classify_failure(state, pods)
            cause = f"{state.reason}: {state.message}"
            if kind == "fatal":
                raise StageFailed(f"stage train failed with a non-retriable error ({cause}); fix the cause and "
                                  "re-apply the pipeline (it resumes from the last committed checkpoint)")
            if kind == "preempted":
                if counts.preemptions >= cluster.max_preemption_restarts:
                    raise StageFailed(f"stage train was preempted {counts.preemptions + 1} times, more than "
                                      f"cluster.max_preemption_restarts={cluster.max_preemption_restarts} ({cause})")
                counts.preemptions += 1
                why = "preempted (does not count against cluster.max_train_restarts)"
            else:
                if counts.restarts_used >= cluster.max_train_restarts:
                    raise StageFailed(f"stage train failed {counts.restarts_used + 1} times; "
                                      f"cluster.max_train_restarts={cluster.max_train_restarts} is used up ({cause})")
                counts.restarts_used += 1
                why = f"failed, restart {counts.restarts_used}/{cluster.max_train_restarts}"
            counts.attempt += 1
            log.warning("train: attempt %d %s (%s); re-creating the Job, it resumes from the last committed "
                        "checkpoint", counts.attempt - 1, why, cause)
            self._delete_job(name)
            self.batch.create_namespaced_job(self.driver.namespace, build_stage_job(
                self.config, "train", self.driver, attempt=counts.attempt,
                restarts_used=counts.restarts_used, preemptions=counts.preemptions))

    # -- API helpers ------------------------------------------------------------------------

    def _owned(self, obj: Mapping[str, Any]) -> bool:
        """Whether ``obj`` belongs to this driver run (not to an earlier driver of the same name)."""
        meta = obj.get("metadata") or {}
        if self.driver.uid is not None:
            return any(ref.get("uid") == self.driver.uid for ref in meta.get("ownerReferences") or [])
        return (meta.get("labels") or {}).get(f"{LABEL}/run") == self.driver.name

    def _get_job(self, name: str) -> dict[str, Any] | None:
        from kubernetes.client.exceptions import ApiException

        try:
            return self._to_dict(self.batch.read_namespaced_job(name, self.driver.namespace))
        except ApiException as err:
            if err.status == 404:
                return None
            raise

    def _submit(self, job: dict[str, Any]) -> dict[str, Any] | None:
        """Create ``job``; if a Job of that name exists, return it when it is ours (adopted), else
        delete it (left by an earlier run of the same name) and create ours. None when created."""
        name = job["metadata"]["name"]
        existing = self._get_job(name)
        if existing is not None:
            if self._owned(existing):
                return existing
            log.warning("Job %s belongs to an earlier run of %s; deleting it", name, self.driver.name)
            self._delete_job(name)
        self.batch.create_namespaced_job(self.driver.namespace, job)
        log.info("created Job %s", name)
        return None

    def _ensure_service(self) -> None:
        from kubernetes.client.exceptions import ApiException

        service = build_train_service(self.config, self.driver)
        name, ns = service["metadata"]["name"], self.driver.namespace
        try:
            existing = self._to_dict(self.core.read_namespaced_service(name, ns))
        except ApiException as err:
            if err.status != 404:
                raise
            existing = None
        if existing is not None:
            if self._owned(existing):
                return
            log.warning("Service %s belongs to an earlier run of %s; replacing it", name, self.driver.name)
            self.core.delete_namespaced_service(name, ns)
        self.core.create_namespaced_service(ns, service)

    def _delete_job(self, name: str) -> None:
        """Delete a Job and its pods (foreground) and wait until it is gone, so that a new Job of the
        same name never runs next to the old pods."""
        from kubernetes.client.exceptions import ApiException

        try:
            self.batch.delete_namespaced_job(name, self.driver.namespace, propagation_policy="Foreground")
        except ApiException as err:
            if err.status != 404:
                raise
        waited = 0.0
        while self._get_job(name) is not None:
            if waited >= self._delete_timeout:
                raise RuntimeError(f"Job {name} is still being deleted after {waited:.0f}s; check its pods' finalizers")
            self._sleep(self._poll)
            waited += self._poll

    def _wait(self, name: str) -> JobState:
        last = None
        while True:
            job = self._get_job(name)
            if job is None:
                return JobState("failed", "Deleted", f"Job {name} was deleted while the driver waited on it")
            state = job_state(job)
            status = job.get("status") or {}
            progress = (status.get("active"), status.get("succeeded"), status.get("failed"))
            if progress != last:
                log.info("%s: active %s, succeeded %s, failed %s", name, *(v or 0 for v in progress))
                last = progress
            if state.phase != "running":
                return state
            self._await_change(name, job)

    def _await_change(self, name: str, seen: Mapping[str, Any]) -> None:
        """Return once the Job ``name`` differs from ``seen`` (a watch event) or ``poll_seconds`` passed."""
        if not self._watch:
            self._sleep(self._poll)
            return
        from kubernetes import watch

        stream = watch.Watch()
        seen_status = seen.get("status") or {}
        try:
            for event in stream.stream(
                self.batch.list_namespaced_job, self.driver.namespace,
                field_selector=f"metadata.name={name}",
                resource_version=(seen.get("metadata") or {}).get("resourceVersion"),
                timeout_seconds=max(1, int(self._poll)),  # the API server ends the watch: re-read, re-watch
                _request_timeout=(30, self._poll + 30),  # and if it does not, the client does
            ):
                job = self._to_dict(event["object"])
                if (job.get("metadata") or {}).get("name") != name:
                    continue  # a server that ignores the field selector
                if event["type"] == "DELETED" or (job.get("status") or {}) != seen_status:
                    return
        except Exception as err:  # 410 Gone (old resourceVersion), timeouts, dropped connections
            log.debug("watch on Job %s ended (%s); reading it again", name, err)
            if not _is_timeout(err):
                self._sleep(self._poll)  # a failing watch must not turn into a busy loop
        finally:
            stream.stop()

    def _stage_pods(self, stage: Stage) -> list[dict[str, Any]]:
        selector = {f"{LABEL}/run": self.driver.name, f"{LABEL}/stage": stage}
        pods = self._to_dict(self.core.list_namespaced_pod(
            self.driver.namespace, label_selector=",".join(f"{k}={v}" for k, v in selector.items()))).get("items") or []
        # Filter here too: the selector is the API server's job, but nothing else may slip through.
        return [p for p in pods if all(((p.get("metadata") or {}).get("labels") or {}).get(k) == v
                                       for k, v in selector.items())]

    def _report_failed_pods(self, stage: Stage, pods: list[dict[str, Any]] | None = None) -> None:
        """Log the tail of each failed pod's log (the driver's log then tells the whole story)."""
        from kubernetes.client.exceptions import ApiException

        for pod in self._stage_pods(stage) if pods is None else pods:
            if (pod.get("status") or {}).get("phase") != "Failed":
                continue
            name = pod["metadata"]["name"]
            try:
                tail = self.core.read_namespaced_pod_log(name, self.driver.namespace, container=stage,
                                                         tail_lines=self._log_tail_lines)
            except ApiException as err:
                tail = f"(log not available: {err.status} {err.reason})"
            log.error("%s: pod %s failed; last log lines:\n%s", stage, name, tail)
