"""The tracker on a local SQLite store: run tree resolution across processes/pods, queue behaviour."""

from __future__ import annotations

import time

import pytest
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, validate_config
from pipeline.tracking import PENDING_FILE, Tracker, TrackingOp, is_transient, dataset_checksum


def _config(tmp_path, work: str, **tracking):
    return validate_config({
        "name": "tiny", "work_dir": str(tmp_path / work), "data": {"dataset": "text", "source": "sample"},
        "tracking": {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False, **tracking},
    })


def _runs(tmp_path):
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("tiny")
    return client, client.search_runs([experiment.experiment_id])


def test_stages_on_different_pods_share_a_parent_through_the_run_key(tmp_path, monkeypatch):
    """Two processes with different work dirs (two pods) and one PIPELINE_RUN_KEY: one tree."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.setenv("PIPELINE_RUN_KEY", "driver-abc")
    pods = (("pod-a", "prepare", "FINISHED"), ("pod-b", "train", "KILLED"), ("pod-c", "train", "FINISHED"),
            ("pod-d", "evaluate", "FINISHED"))
    for work, stage, status in pods:
        tracker = Tracker(_config(tmp_path, work), command=stage)
        tracker.start_stage(stage)
        tracker.log_metrics({f"{stage}/x": 1.0}, step=1)
        tracker.end_stage(status)
        tracker.close(None if status != "FINISHED" else "FINISHED")
    client, runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags["pipeline.kind"] == "pipeline"]
    assert len(parents) == 1 and parents[0].data.tags["pipeline.run_key"] == "driver-abc"
    assert parents[0].info.status == "FINISHED"
    stages = sorted(r.data.tags["pipeline.stage"] for r in runs if r.data.tags["pipeline.kind"] == "stage")
    assert stages == ["evaluate", "prepare", "train"]  # the train stage restarted after preemption continued its run
    assert all(r.data.tags["mlflow.parentRunId"] == parents[0].info.run_id for r in runs if r is not parents[0])

    # Another key is another pipeline run.
    monkeypatch.setenv("PIPELINE_RUN_KEY", "driver-xyz")
    tracker = Tracker(_config(tmp_path, "pod-e"), command="prepare")
    tracker.start_stage("prepare")
    tracker.close(None)
    _, runs = _runs(tmp_path)
    assert len([r for r in runs if r.data.tags["pipeline.kind"] == "pipeline"]) == 2


def test_mlflow_run_id_names_the_parent(tmp_path, monkeypatch):
    monkeypatch.delenv("PIPELINE_RUN_KEY", raising=False)
    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment_id = client.create_experiment("tiny")
    parent = client.create_run(experiment_id, tags={"pipeline.kind": "pipeline"})
    monkeypatch.setenv("MLFLOW_RUN_ID", parent.info.run_id)
    tracker = Tracker(_config(tmp_path, "w"), command="train")
    tracker.start_stage("train")
    tracker.close(None)
    _, runs = _runs(tmp_path)
    (stage,) = [r for r in runs if r.data.tags.get("pipeline.kind") == "stage"]
    assert stage.data.tags["mlflow.parentRunId"] == parent.info.run_id
    assert tracker.parent_run_id == parent.info.run_id


def test_a_failed_stage_marks_its_run_and_the_parent_failed(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PIPELINE_RUN_KEY", raising=False)
    tracker = Tracker(_config(tmp_path, "w"), command="run")
    tracker.start_stage("train")
    tracker.end_stage("FAILED")
    tracker.close(None)
    _, runs = _runs(tmp_path)
    assert {r.data.tags["pipeline.kind"]: r.info.status for r in runs} == {"pipeline": "FAILED", "stage": "FAILED"}
    # The next `run` in the same folder resumes that pipeline run (it has not finished) ...
    tracker = Tracker(_config(tmp_path, "w"), command="run")
    tracker.start_stage("train")
    tracker.end_stage("FINISHED")
    tracker.close("FINISHED")
    _, runs = _runs(tmp_path)
    assert len(runs) == 2 and {r.info.status for r in runs} == {"FINISHED"}


def test_metric_calls_are_merged_and_ordered(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PIPELINE_RUN_KEY", raising=False)
    tracker = Tracker(_config(tmp_path, "w"), command="train")
    tracker.start_stage("train")
    for step in range(1, 2501):
        tracker.log_metrics({"a": float(step), "b": None}, step=step)
    tracker.close(None)
    client, runs = _runs(tmp_path)
    stage = next(r for r in runs if r.data.tags["pipeline.kind"] == "stage")
    history = client.get_metric_history(stage.info.run_id, "a")
    assert sorted((m.step, m.value) for m in history) == [(s, float(s)) for s in range(1, 2501)]
    assert "b" not in stage.data.metrics
    # 2500 metric calls went out in a handful of batched requests (at most 1000 metrics each).
    assert tracker.sent < 40


def test_unreachable_server_never_blocks_the_caller(tmp_path):
    """Calls return at once while the server is down; close() waits flush_timeout, then spools."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    config = validate_config({
        "name": "tiny", "work_dir": str(tmp_path / "w"), "data": {"dataset": "text", "source": "sample"},
        "tracking": {"uri": f"http://127.0.0.1:{port}", "system_metrics": False, "flush_timeout": 0.5,
                     "request_timeout": 1},
    })
    tracker = Tracker(config, command="train")
    started = time.monotonic()
    tracker.start_stage("train")
    for step in range(200):
        tracker.log_metrics({"loss": 1.0}, step=step)
    assert time.monotonic() - started < 0.5
    tracker.close("FINISHED")
    lines = (config.run_dir / PENDING_FILE).read_text().splitlines()
    ops = [TrackingOp.from_json(line) for line in lines]
    assert sum(len(op.payload["metrics"]) for op in ops if op.kind == "log_batch") == 200
    assert ops[-1] == TrackingOp("set_status", "parent", {"status": "FINISHED", "if_opened": True})


def test_error_classification():
    import requests
    from mlflow.exceptions import MlflowException
    from mlflow.protos.databricks_pb2 import INVALID_PARAMETER_VALUE, TEMPORARILY_UNAVAILABLE

    assert is_transient(ConnectionRefusedError())
    assert is_transient(requests.ConnectionError())
    assert is_transient(MlflowException("API request to http://x failed"))  # INTERNAL_ERROR
    assert is_transient(MlflowException("busy", error_code=TEMPORARILY_UNAVAILABLE))
    assert not is_transient(MlflowException("bad", error_code=INVALID_PARAMETER_VALUE))
    assert not is_transient(TypeError("a bug"))


def test_a_bad_tracking_uri_is_a_config_error(tmp_path):
    config = _config(tmp_path, "w", uri="nosuchscheme://x")
    with pytest.raises(ConfigError, match="tracking.uri"):
        Tracker(config)


def test_dataset_checksum_depends_on_every_split():
    from types import SimpleNamespace

    def manifest(valid_sha):
        return SimpleNamespace(splits={"train": SimpleNamespace(sha256="a" * 64), "valid": SimpleNamespace(sha256=valid_sha)})

    assert dataset_checksum(manifest("b" * 64)) == dataset_checksum(manifest("b" * 64))
    assert dataset_checksum(manifest("b" * 64)) != dataset_checksum(manifest("c" * 64))


def test_sigterm_closes_the_runs_as_killed(tmp_path, ptb_char_dir):
    """Preemption (SIGTERM to the pod): the stage and parent runs end KILLED instead of staying RUNNING."""
    import json
    import signal
    import subprocess

    import yaml

    from conftest import PYTHON, pipeline_env, tiny_ptb_config

    config = tiny_ptb_config(tmp_path / "w", ptb_char_dir)
    config["name"] = "tiny"
    config["train"].update(max_steps=100000, log_every=5)
    config["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}", "system_metrics": False}
    path = tmp_path / "c.yaml"
    path.write_text(yaml.safe_dump(config))
    env = {**pipeline_env(), "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen([PYTHON, "-m", "pipeline", "train", "--config", str(path)], cwd=tmp_path, env=env,
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    log_path = tmp_path / "w" / "train_log.jsonl"
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline and not (log_path.exists() and len(log_path.read_text().splitlines()) >= 10):
        assert proc.poll() is None
        time.sleep(0.2)
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, stderr[-3000:]
    client, runs = _runs(tmp_path)
    assert {r.data.tags["pipeline.kind"]: r.info.status for r in runs} == {"pipeline": "KILLED", "stage": "KILLED"}
    assert json.loads(log_path.read_text().splitlines()[-1])["step"] >= 10


def test_the_tracker_leaves_the_process_mlflow_settings_alone(tmp_path, monkeypatch):
    import os

    import mlflow

    monkeypatch.delenv("MLFLOW_HTTP_REQUEST_TIMEOUT", raising=False)
    before = mlflow.get_tracking_uri()
    tracker = Tracker(_config(tmp_path, "w"), command="train")
    tracker.start_stage("train")
    tracker.close(None)
    assert mlflow.get_tracking_uri() == before
    assert "MLFLOW_HTTP_REQUEST_TIMEOUT" not in os.environ


def _snapshot(tmp_path):
    _, runs = _runs(tmp_path)
    return sorted((r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())),
                   tuple(sorted(r.data.params.items()))) for r in runs)


def _stage_process(tmp_path, stage, *, work=False, fresh_start=False, command=None, max_steps=None):
    """One CLI process running ``stage`` tentatively; ``work``: the stage found something to do."""
    config = _config(tmp_path, "w")
    if max_steps is not None:
        config.train.max_steps = max_steps
    tracker = Tracker(config, command=command or stage)
    tracker.start_stage(stage, tentative=True)
    tracker.log_metrics({f"{stage}/x": 1.0}, step=1)
    if work:
        tracker.confirm_stage(fresh_start=fresh_start)
    tracker.end_stage("FINISHED")
    tracker.close("FINISHED")
    return tracker


def test_a_stage_with_nothing_to_do_changes_nothing(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PIPELINE_RUN_KEY", raising=False)
    # The first time, a stage shows in its new pipeline run even when it had nothing to do (the data was
    # prepared by an earlier pipeline run); the process ends its parent.
    _stage_process(tmp_path, "prepare", command="run")
    _stage_process(tmp_path, "train", work=True, fresh_start=True, command="run")
    _, runs = _runs(tmp_path)
    assert sorted(r.info.run_name for r in runs) == ["prepare", "tiny", "train"]
    assert {r.info.status for r in runs} == {"FINISHED"}
    before = _snapshot(tmp_path)
    # Re-run with nothing to do: not one call reaches the finished runs (status, end time, tags, params).
    for stage in ("prepare", "train", "evaluate"):
        if stage != "evaluate":
            _stage_process(tmp_path, stage, command="run")
    assert _snapshot(tmp_path) == before


def test_more_work_after_a_finished_stage_is_a_visible_continuation(tmp_path, monkeypatch):
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PIPELINE_RUN_KEY", raising=False)
    _stage_process(tmp_path, "train", work=True, fresh_start=True, command="run")
    (parent_before,) = [r for r in _runs(tmp_path)[1] if r.data.tags["pipeline.kind"] == "pipeline"]
    _stage_process(tmp_path, "train", work=True, max_steps=900)
    client, runs = _runs(tmp_path)
    (parent,) = [r for r in runs if r.data.tags["pipeline.kind"] == "pipeline"]
    first, second = sorted((r for r in runs if r.data.tags["pipeline.kind"] == "stage"), key=lambda r: r.info.start_time)
    assert second.info.run_name == "train (continued)" and second.data.tags["pipeline.continues"] == first.info.run_id
    assert second.data.params["train.max_steps"] == "900" and parent.data.params == parent_before.data.params
    assert parent.data.tags["pipeline.continuations"] == "1"
    # The parent keeps where it came from, and the last stage run ends it.
    assert parent.data.tags["mlflow.source.name"] == "python -m pipeline run"
    assert parent.info.status == "FINISHED" and parent.info.end_time >= second.info.end_time
    assert client.get_metric_history(second.info.run_id, "train/x")[0].value == 1.0


def test_training_from_step_0_under_a_finished_parent_is_a_new_pipeline_run(tmp_path, monkeypatch):
    """Checkpoints removed, the same work dir: a new training is not mixed into the old curves."""
    monkeypatch.delenv("MLFLOW_RUN_ID", raising=False)
    monkeypatch.delenv("PIPELINE_RUN_KEY", raising=False)
    _stage_process(tmp_path, "train", work=True, fresh_start=True, command="run")
    _stage_process(tmp_path, "train", work=True, fresh_start=True, command="run")
    _, runs = _runs(tmp_path)
    parents = [r for r in runs if r.data.tags["pipeline.kind"] == "pipeline"]
    assert len(parents) == 2 and len(runs) == 4
    assert all(r.info.run_name == "train" for r in runs if r.data.tags["pipeline.kind"] == "stage")
