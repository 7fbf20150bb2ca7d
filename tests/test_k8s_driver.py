"""The driver's sequencing, waiting, adoption, restart and preemption logic, against kmock's
in-memory Kubernetes API emulator (a real HTTP server; the driver uses the real ``kubernetes``
client). The test plays the Job controller: it flips the conditions of the Jobs the driver creates
and leaves pods behind as the real controller would."""

from __future__ import annotations

import argparse
import threading
import time

import pytest
from kubernetes import client

from kmock_emulator import Emulator

from pipeline.config import load_config
from pipeline.k8s import builders
from pipeline.k8s.builders import LABEL, DriverRef, build_stage_job, stage_job_name
from pipeline.k8s.commands import register_commands
from pipeline.k8s.driver import JobState, PipelineDriver, StageFailed, classify_failure, job_state

NS = "ml"
DRIVER = DriverRef(name="demo", namespace=NS, uid="uid-of-this-driver", configmap="demo-config")
DRIVER_AGENT = "rlm-pipeline-driver"


class FakeJobController:
    """Plays the Job controller: each new Job (per name and attempt) gets the next scripted outcome
    of its stage; failed attempts leave failed pods, as the real controller does.

    Outcomes: ``complete``; ``running`` (stays running one more tick); ``fail`` (BackoffLimitExceeded);
    ``fatal`` (a FailJob exit-code rule); ``preempt`` (the FailJob DisruptionTarget rule of a gang);
    ``preempt-pod`` (BackoffLimitExceeded, but one pod carries DisruptionTarget: a preempted peer).
    """

    def __init__(self, emulator: Emulator, script: dict[str, list[str]]) -> None:
        api = emulator.api_client("fake-job-controller")
        self.to_dict = api.sanitize_for_serialization
        self.batch, self.core = client.BatchV1Api(api), client.CoreV1Api(api)
        self.script = {stage: list(outcomes) for stage, outcomes in script.items()}
        self.handled: set[tuple[str, str]] = set()
        self.seen: list[tuple[str, str]] = []  # (stage, attempt) in the order the driver created them
        self.ticks = 0

    def tick(self, _seconds: float = 0.0) -> None:
        self.ticks += 1
        if self.ticks > 200:
            raise AssertionError(f"the driver is still polling after {self.ticks} ticks; script left: {self.script}")
        jobs = {j["metadata"]["name"]: j for j in self.to_dict(self.batch.list_namespaced_job(NS))["items"]}
        self._collect_garbage(jobs)
        for name, job in jobs.items():
            attempt = job["metadata"].get("annotations", {}).get(f"{LABEL}/attempt", "1")
            if (name, attempt) in self.handled or job_state(job).phase != "running":
                continue
            stage = job["metadata"]["labels"][f"{LABEL}/stage"]
            if (stage, attempt) not in self.seen:
                self.seen.append((stage, attempt))
            outcome = self.script[stage].pop(0)
            if outcome == "running":
                continue
            self.handled.add((name, attempt))
            self._apply(job, stage, attempt, outcome)

    def _apply(self, job: dict, stage: str, attempt: str, outcome: str) -> None:
        name = job["metadata"]["name"]
        if outcome == "complete":
            status = {"succeeded": 1, "conditions": [{"type": "Complete", "status": "True"}]}
        else:
            reason, message, preempted = {
                "fail": ("BackoffLimitExceeded", "Job has reached the specified backoff limit", False),
                "fatal": ("PodFailurePolicy", f"Container {stage} for pod {NS}/{name}-0 failed with exit code 2 "
                          "matching FailJob rule at index 1", False),
                "preempt": ("PodFailurePolicy", f"Pod {NS}/{name}-1 has condition DisruptionTarget matching FailJob "
                            "rule at index 0", True),
                "preempt-pod": ("BackoffLimitExceeded", "Job has reached the specified backoff limit", True),
            }[outcome]
            status = {"failed": 1, "conditions": [{"type": "Failed", "status": "True", "reason": reason,
                                                   "message": message}]}
            self._leave_pod(job, stage, attempt, index=0, preempted=False)
            if preempted:
                self._leave_pod(job, stage, attempt, index=1, preempted=outcome == "preempt-pod")
        self.batch.patch_namespaced_job_status(name, NS, {"status": status})

    def _leave_pod(self, job: dict, stage: str, attempt: str, *, index: int, preempted: bool) -> None:
        labels = {**job["spec"]["template"]["metadata"]["labels"], "attempt": attempt,
                  "batch.kubernetes.io/job-name": job["metadata"]["name"]}
        conditions = [{"type": "DisruptionTarget", "status": "True", "reason": "PreemptionByScheduler"}] if preempted else []
        self.core.create_namespaced_pod(NS, {
            "apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": f"{job['metadata']['name']}-{attempt}-{index}", "namespace": NS, "labels": labels},
            "spec": {"containers": [{"name": stage, "image": "rlm-pipeline:test"}]},
            "status": {"phase": "Failed", "conditions": conditions},
        })

    def _collect_garbage(self, jobs: dict[str, dict]) -> None:
        """Pods of deleted Jobs go away (the real garbage collector; foreground deletion)."""
        for pod in self.to_dict(self.core.list_namespaced_pod(NS))["items"]:
            labels = pod["metadata"]["labels"]
            job = jobs.get(labels.get("batch.kubernetes.io/job-name", ""))
            current = job and job["metadata"].get("annotations", {}).get(f"{LABEL}/attempt", "1")
            if labels.get(f"{LABEL}/run") == DRIVER.name and labels.get("attempt") != current:
                self.core.delete_namespaced_pod(pod["metadata"]["name"], NS)


@pytest.fixture
def emulator():
    emu = Emulator()
    try:
        yield emu
    finally:
        emu.close()


def demo_config(**cluster):
    overrides = {"cluster.namespace": NS, "cluster.poll_seconds": 0.01,
                 **{f"cluster.{k}": v for k, v in cluster.items()}}
    return load_config("demo", overrides)


def run_driver(emulator: Emulator, script: dict[str, list[str]], **cluster) -> tuple[FakeJobController, BaseException | None]:
    controller = FakeJobController(emulator, script)
    # Polling mode: the controller moves on each time the driver sleeps, so every run is deterministic.
    driver = PipelineDriver(demo_config(**cluster), DRIVER, emulator.api_client(DRIVER_AGENT), sleep=controller.tick,
                            watch=False)
    try:
        driver.run()
    except StageFailed as err:
        return controller, err
    return controller, None


def driver_calls(emulator: Emulator) -> list[tuple[str, str, str | None, str | None]]:
    """(verb, resource, name, subresource) of every request the driver made, in order."""
    verbs = {"CREATE": "create", "FETCH": "get", "LIST": "list", "DELETE": "delete", "UPDATE": "patch", "WATCH": "watch"}
    return [(verbs[r.action.name], r.resource.plural, r.name, r.subresource) for r in emulator.requests_from(DRIVER_AGENT)]


def assert_role_allows_every_call(emulator: Emulator) -> None:
    allowed = {(res, verb) for rule in builders.driver_role_rules() for res in rule["resources"] for verb in rule["verbs"]}
    calls = driver_calls(emulator)
    assert calls, "the driver made no API call"
    for verb, resource, name, subresource in calls:
        full = f"{resource}/{subresource}" if subresource else resource
        assert (full, verb) in allowed, f"the driver's Role does not allow {verb} {full} ({name})"


def changes(emulator: Emulator) -> list[tuple[str, str, str]]:
    """(verb, kind, name) of every create and delete by the driver, in order."""
    return [("create" if r.action.name == "CREATE" else "delete", r.resource.plural,
             r.data["metadata"]["name"] if r.action.name == "CREATE" else r.name)
            for r in emulator.requests_from(DRIVER_AGENT) if r.action.name in ("CREATE", "DELETE")]


def creations(emulator: Emulator) -> list[tuple[str, str]]:
    """(kind, name) of every object the driver created, in order."""
    return [(r.resource.plural, r.data["metadata"]["name"]) for r in emulator.requests_from(DRIVER_AGENT)
            if r.action.name == "CREATE"]


def stored_job(emulator: Emulator, stage: str) -> dict:
    api = emulator.api_client("test")
    return api.sanitize_for_serialization(client.BatchV1Api(api).read_namespaced_job(stage_job_name(DRIVER.name, stage), NS))


# ---------------------------------------------------------------------------------------------


def test_stages_run_in_order_each_after_the_previous_completed(emulator):
    controller, error = run_driver(emulator, {"prepare": ["running", "complete"], "train": ["running", "complete"],
                                              "evaluate": ["complete"]})
    assert error is None
    assert creations(emulator) == [("jobs", "demo-prepare"), ("services", "demo-train"), ("jobs", "demo-train"),
                                   ("jobs", "demo-evaluate")]
    assert controller.seen == [("prepare", "1"), ("train", "1"), ("evaluate", "1")]
    # every stage Job is owned by the driver Job (deleting the driver garbage-collects them)
    for stage in builders.STAGES:
        job = stored_job(emulator, stage)
        assert job["metadata"]["ownerReferences"][0]["uid"] == DRIVER.uid
        assert job["spec"]["ttlSecondsAfterFinished"] > 0
    # the driver waited: it polled while a stage was running
    assert controller.ticks >= 5
    assert_role_allows_every_call(emulator)


def test_a_failed_train_job_is_recreated_until_it_succeeds_within_the_budget(emulator):
    _, error = run_driver(emulator, {"prepare": ["complete"], "train": ["fail", "running", "fail", "complete"],
                                     "evaluate": ["complete"]}, max_train_restarts=2)
    assert error is None
    train_changes = [verb for verb, kind, name in changes(emulator) if (kind, name) == ("jobs", "demo-train")]
    assert train_changes == ["create", "delete", "create", "delete", "create"]
    deletes = [r for r in emulator.requests_from(DRIVER_AGENT) if r.action.name == "DELETE"]
    assert deletes and all(r.params.get("propagationPolicy") == "Foreground" for r in deletes)
    notes = stored_job(emulator, "train")["metadata"]["annotations"]
    assert (notes[f"{LABEL}/attempt"], notes[f"{LABEL}/restarts-used"], notes[f"{LABEL}/preemptions"]) == ("3", "2", "0")
    assert stored_job(emulator, "evaluate")  # the pipeline went on
    assert_role_allows_every_call(emulator)


def test_the_pipeline_fails_when_the_restart_budget_is_used_up(emulator):
    _, error = run_driver(emulator, {"prepare": ["complete"], "train": ["fail", "fail"], "evaluate": []},
                          max_train_restarts=1)
    assert isinstance(error, StageFailed)
    assert "failed 2 times; cluster.max_train_restarts=1 is used up" in str(error)
    assert "BackoffLimitExceeded" in str(error)
    assert ("jobs", "demo-evaluate") not in creations(emulator)


def test_preemption_does_not_use_up_the_restart_budget(emulator):
    controller, error = run_driver(
        emulator, {"prepare": ["complete"], "train": ["preempt", "preempt-pod", "complete"], "evaluate": ["complete"]},
        max_train_restarts=0, nodes=2)
    assert error is None
    assert [a for s, a in controller.seen if s == "train"] == ["1", "2", "3"]
    notes = stored_job(emulator, "train")["metadata"]["annotations"]
    assert (notes[f"{LABEL}/restarts-used"], notes[f"{LABEL}/preemptions"]) == ("0", "2")


def test_preemptions_are_bounded_separately(emulator):
    _, error = run_driver(emulator, {"prepare": ["complete"], "train": ["preempt", "preempt"], "evaluate": []},
                          max_train_restarts=5, max_preemption_restarts=1, nodes=2)
    assert isinstance(error, StageFailed) and "max_preemption_restarts=1" in str(error)


def test_a_non_retriable_failure_stops_at_once_and_reports_the_pod_logs(emulator):
    _, error = run_driver(emulator, {"prepare": ["complete"], "train": ["fatal"], "evaluate": []}, max_train_restarts=3)
    assert isinstance(error, StageFailed) and "non-retriable" in str(error) and "exit code 2" in str(error)
    assert [c for c in creations(emulator) if c[0] == "jobs"] == [("jobs", "demo-prepare"), ("jobs", "demo-train")]
    logs = [(name, sub) for verb, res, name, sub in driver_calls(emulator) if sub == "log"]
    assert logs == [("demo-train-1-0", "log")]
    assert_role_allows_every_call(emulator)


def test_a_failed_prepare_stops_the_pipeline_before_training(emulator):
    _, error = run_driver(emulator, {"prepare": ["fail"], "train": [], "evaluate": []})
    assert isinstance(error, StageFailed) and "stage prepare failed" in str(error)
    assert creations(emulator) == [("jobs", "demo-prepare")]
    assert [name for verb, res, name, sub in driver_calls(emulator) if sub == "log"] == ["demo-prepare-1-0"]


def test_a_restarted_driver_adopts_its_own_jobs_and_replaces_those_of_an_earlier_run(emulator):
    config = demo_config(max_train_restarts=1)
    setup = emulator.api_client("test-setup")
    batch, core = client.BatchV1Api(setup), client.CoreV1Api(setup)
    done = {"conditions": [{"type": "Complete", "status": "True"}]}
    # This driver (same uid) had finished prepare and was on train attempt 2 (one restart used) ...
    prepare = build_stage_job(config, "prepare", DRIVER)
    batch.create_namespaced_job(NS, prepare)
    batch.patch_namespaced_job_status(prepare["metadata"]["name"], NS, {"status": done})
    core.create_namespaced_service(NS, builders.build_train_service(config, DRIVER))
    batch.create_namespaced_job(NS, build_stage_job(config, "train", DRIVER, attempt=2, restarts_used=1))
    # ... and an earlier driver of the same name (another uid) left a finished evaluate Job.
    earlier = DriverRef(name=DRIVER.name, namespace=NS, uid="uid-of-an-earlier-driver", configmap="demo-config")
    stale = build_stage_job(config, "evaluate", earlier)
    batch.create_namespaced_job(NS, stale)
    batch.patch_namespaced_job_status(stale["metadata"]["name"], NS, {"status": done})

    controller = FakeJobController(emulator, {"prepare": [], "train": ["fail"], "evaluate": ["complete"]})
    with pytest.raises(StageFailed, match="failed 2 times; cluster.max_train_restarts=1 is used up"):
        PipelineDriver(config, DRIVER, emulator.api_client(DRIVER_AGENT), sleep=controller.tick, watch=False).run()
    # nothing of its own was created again; the budget continued from the annotations
    assert creations(emulator) == []

    # With budget left, the same situation ends with the earlier run's evaluate Job replaced by ours.
    batch.delete_namespaced_job(stage_job_name(DRIVER.name, "train"), NS)
    batch.create_namespaced_job(NS, build_stage_job(config, "train", DRIVER, attempt=2, restarts_used=1))
    controller = FakeJobController(emulator, {"prepare": [], "train": ["complete"], "evaluate": ["complete"]})
    PipelineDriver(config, DRIVER, emulator.api_client(DRIVER_AGENT), sleep=controller.tick, watch=False).run()
    evaluate = stored_job(emulator, "evaluate")
    assert evaluate["metadata"]["ownerReferences"][0]["uid"] == DRIVER.uid
    assert ("delete", "jobs", "demo-evaluate", None) in driver_calls(emulator)
    assert_role_allows_every_call(emulator)


def test_the_driver_watches_jobs_while_the_controller_works_on_its_own_time(emulator):
    """Watch mode (the default): the driver reacts to Job changes from a watch stream, not by sleeping."""
    controller = FakeJobController(emulator, {"prepare": ["running", "complete"], "train": ["fail", "complete"],
                                              "evaluate": ["complete"]})
    stop = threading.Event()
    errors: list[BaseException] = []

    def control() -> None:
        while not stop.is_set():
            try:
                controller.tick()
            except Exception as err:  # noqa: BLE001 - reported below
                errors.append(err)
                return
            time.sleep(0.02)

    def no_sleep(seconds: float) -> None:
        raise AssertionError("the driver slept instead of watching")

    thread = threading.Thread(target=control, daemon=True)
    thread.start()
    try:
        PipelineDriver(demo_config(max_train_restarts=1, poll_seconds=5), DRIVER, emulator.api_client(DRIVER_AGENT),
                       sleep=no_sleep).run()
    finally:
        stop.set()
        thread.join(5)
    assert not errors
    assert controller.seen == [("prepare", "1"), ("train", "1"), ("train", "2"), ("evaluate", "1")]
    watched = [name for verb, resource, name, _ in driver_calls(emulator) if verb == "watch"]
    assert watched and all(resource == "jobs" for verb, resource, _, _ in driver_calls(emulator) if verb == "watch")
    assert_role_allows_every_call(emulator)


def test_failure_classification():
    preempted_pod = {"status": {"conditions": [{"type": "DisruptionTarget", "status": "True"}]}}
    quiet_pod = {"status": {"conditions": [{"type": "Ready", "status": "False"}]}}
    by_policy = JobState("failed", "PodFailurePolicy", "Pod ns/p has condition DisruptionTarget matching FailJob rule at index 0")
    exit_code = JobState("failed", "PodFailurePolicy", "Container train for pod ns/p failed with exit code 2 matching FailJob rule at index 1")
    backoff = JobState("failed", "BackoffLimitExceeded", "Job has reached the specified backoff limit")
    assert classify_failure(by_policy, []) == "preempted"
    assert classify_failure(backoff, [quiet_pod, preempted_pod]) == "preempted"
    assert classify_failure(exit_code, [quiet_pod]) == "fatal"
    assert classify_failure(backoff, [quiet_pod]) == "retriable"
    assert job_state({"status": {"conditions": [{"type": "Failed", "status": "False"}]}}).phase == "running"
    assert job_state({}).phase == "running"


def drive_command(emulator: Emulator, config_path, monkeypatch, env: dict[str, str]) -> int:
    parser = argparse.ArgumentParser()
    register_commands(parser.add_subparsers(dest="command"))
    for key in ("RLM_DRIVER_NAME", "RLM_DRIVER_UID", "RLM_NAMESPACE", "RLM_CONFIGMAP"):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    args = parser.parse_args(["drive", "--config", str(config_path), "--api-server", emulator.url])
    return args.handler(args)


def test_drive_command_runs_the_pipeline_and_maps_outcomes_to_exit_codes(emulator, tmp_path, monkeypatch):
    config_path = tmp_path / "config.yaml"
    config_path.write_text(demo_config().to_yaml())
    env = {"RLM_DRIVER_NAME": DRIVER.name, "RLM_DRIVER_UID": DRIVER.uid, "RLM_NAMESPACE": NS, "RLM_CONFIGMAP": "demo-config"}
    controller = FakeJobController(emulator, {"prepare": ["complete"], "train": ["complete"], "evaluate": ["fatal"]})
    stop = threading.Event()
    errors: list[BaseException] = []

    def control() -> None:  # the real Job controller works on its own time, not the driver's
        while not stop.is_set():
            try:
                controller.tick()
            except Exception as err:  # noqa: BLE001 - reported by the test below
                errors.append(err)
                return
            time.sleep(0.01)

    thread = threading.Thread(target=control, daemon=True)
    thread.start()
    try:
        assert drive_command(emulator, config_path, monkeypatch, env) == builders.DRIVER_FAILED_EXIT_CODE
    finally:
        stop.set()
        thread.join(5)
    assert not errors
    assert [s for s, _ in controller.seen] == ["prepare", "train", "evaluate"]
    # outside its Job (no downward-API variables) the driver refuses to start: exit code 2
    assert drive_command(emulator, config_path, monkeypatch, {}) == 2
    bad = tmp_path / "bad.yaml"
    bad.write_text("name: demo\n")
    assert drive_command(emulator, bad, monkeypatch, env) == 2
