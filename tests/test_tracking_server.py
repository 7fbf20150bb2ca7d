"""Tracking against real parts: an ``mlflow server`` process (started by ``mlflow/serve.sh``) on
127.0.0.1 with artifacts proxied to the moto S3 server, and the pipeline run through its CLI.

What is checked goes through ``MlflowClient`` and the REST API the MLflow UI reads: the run tree,
params, tags, metrics per evaluation, system metrics, plots, the registered model, the ``compare``
command; and that a server stopped mid-run and restarted loses nothing while training goes on.
"""

from __future__ import annotations

import json
import os
import subprocess
import time
from pathlib import Path

import pytest
import requests
import yaml

from conftest import PYTHON, REPO, pipeline_env, tiny_ptb_config
from mlflow_server import MlflowServer, free_port

ARTIFACT_BUCKET = "mlflow-artifacts"


def _s3_server(root: Path, s3_env: dict[str, str]) -> MlflowServer:
    """The server with its artifacts in the S3 bucket (clients need no S3 credentials)."""
    return MlflowServer(root, f"s3://{ARTIFACT_BUCKET}/artifacts",
                        {**s3_env, "MLFLOW_S3_ENDPOINT_URL": s3_env["AWS_ENDPOINT_URL"]})


@pytest.fixture(scope="module")
def mlflow_server(tmp_path_factory, s3_endpoint):
    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"]).create_bucket(Bucket=ARTIFACT_BUCKET)
    server = _s3_server(tmp_path_factory.mktemp("mlflow_server"), s3_endpoint)
    server.start()
    yield server
    server.stop()


def client_env(server: MlflowServer) -> dict[str, str]:
    """A pipeline process that knows only the server: no S3 credentials (artifacts go through the server)."""
    env = {k: v for k, v in pipeline_env().items() if not k.startswith("AWS_")}
    env["MLFLOW_TRACKING_URI"] = server.uri
    env["OMP_NUM_THREADS"] = "1"  # the server process needs the other core
    return env


def write_config(tmp_path: Path, data_dir: Path, name: str, *, experiment: str, **train) -> Path:
    config = tiny_ptb_config(tmp_path / name, data_dir)
    config["tracking"] = {"experiment": experiment, "system_metrics_interval": 0.5, "flush_timeout": 120}
    config["train"].update(train)
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def run_pipeline(config: Path, env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    proc = subprocess.run([PYTHON, "-m", "pipeline", "run", "--config", str(config)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-5000:]
    return proc


def test_two_pipeline_runs_on_a_server_with_s3_artifacts(tmp_path, ptb_char_dir, mlflow_server, s3_endpoint):
    from mlflow.tracking import MlflowClient

    experiment = "ptb_char_tiny_server"
    configs = {
        "lr_a": write_config(tmp_path, ptb_char_dir, "lr_a", experiment=experiment, max_steps=40, eval_every=20),
        "lr_b": write_config(tmp_path, ptb_char_dir, "lr_b", experiment=experiment, max_steps=40, eval_every=20,
                             optimizer={"name": "radam", "lr": 0.003}),
    }
    for config in configs.values():
        proc = run_pipeline(config, client_env(mlflow_server), tmp_path)
        assert "unreachable" not in proc.stderr

    client = MlflowClient(tracking_uri=mlflow_server.uri)
    exp = client.get_experiment_by_name(experiment)
    assert exp.artifact_location.startswith("mlflow-artifacts:")  # proxied: clients never see S3
    runs = client.search_runs([exp.experiment_id])
    parents = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    assert len(parents) == 2 and len(runs) == 8
    by_lr = {p.data.params["train.optimizer.lr"]: p for p in parents}
    assert set(by_lr) == {"0.01", "0.003"}
    commit = subprocess.run(["git", "-C", str(REPO), "rev-parse", "HEAD"], capture_output=True, text=True).stdout.strip()
    manifest = json.loads((ptb_char_dir / "manifest.json").read_text())

    for parent in parents:
        pid = parent.info.run_id
        assert parent.info.status == "FINISHED"
        tags = parent.data.tags
        assert tags["pipeline.kind"] == "pipeline"
        assert tags["pipeline.world_size"] == "1" and tags["pipeline.engine"] == "ddp"
        assert tags["dataset.name"] == "ptb_char" and len(tags["dataset.checksum"]) == 64
        assert tags["dataset.source_sha256"] == (manifest["source_sha256"] or "none")
        if commit:
            assert tags["mlflow.source.git.commit"] == commit
        assert parent.data.params["model.cell"] == "rlstm" and parent.data.params["train.max_steps"] == "40"
        children = {r.data.tags["pipeline.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == pid}
        assert set(children) == {"prepare", "train", "evaluate"}
        assert all(c.info.status == "FINISHED" for c in children.values())
        train = children["train"]
        assert train.data.params == parent.data.params

        # Every evaluation logged its whole picture at its step.
        for key in ("valid/raw_loss", "valid/long_loss", "valid/reported_loss", "valid/reported_bpc",
                    "averaging/short_length", "averaging/long_length", "lr", "tokens_per_second", "train/grad_norm"):
            steps = {m.step for m in client.get_metric_history(train.info.run_id, key)}
            assert {20, 40} <= steps, key
        assert any(k.startswith("system/cpu_utilization") for k in train.data.metrics)
        assert any(k.startswith("system/system_memory") for k in train.data.metrics)

        # Final metrics on the parent (what `compare` and the UI's run table show) equal the stage's result.
        results = json.loads((Path(parent.data.params["work_dir"]) / "eval_results.json").read_text())["metrics"]
        assert parent.data.metrics["final/test_bpc"] == pytest.approx(results["test_bpc"], rel=1e-12)
        assert children["evaluate"].data.metrics["final/valid_bpc"] == pytest.approx(results["valid_bpc"], rel=1e-12)

        # Plots: learning curves and L over evaluations on the train run, all three on the parent.
        parent_plots = {a.path for a in client.list_artifacts(pid, "plots")}
        assert parent_plots == {"plots/learning_curves.png", "plots/averaging_lengths.png", "plots/final_summary.png"}
        local = client.download_artifacts(pid, "plots/learning_curves.png", str(tmp_path / pid))
        assert Path(local).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert {a.path for a in client.list_artifacts(pid)} >= {"config.yaml", "plots"}

    # The artifacts are in S3 (moto), under the server's destination.
    import boto3

    s3 = boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"])
    keys = [o["Key"] for o in s3.list_objects_v2(Bucket=ARTIFACT_BUCKET, MaxKeys=1000).get("Contents", [])]
    assert any(k.endswith("plots/learning_curves.png") for k in keys)
    assert any(k.endswith("data/model.pth") or k.endswith("MLmodel") for k in keys)

    # The model of each run is registered under the experiment's name and loads with mlflow.pytorch.
    versions = client.search_model_versions(f"name='{experiment}'")
    assert len(versions) == 2
    train_ids = {r.info.run_id for r in runs if r.data.tags.get("pipeline.stage") == "train"}
    assert {v.run_id for v in versions} == train_ids
    import mlflow.pytorch
    import torch

    from pipeline.evaluate import load_final_model

    newest = max(versions, key=lambda v: int(v.version))
    os.environ["MLFLOW_TRACKING_URI"] = mlflow_server.uri
    try:
        loaded = mlflow.pytorch.load_model(f"models:/{experiment}/{newest.version}")
    finally:
        os.environ.pop("MLFLOW_TRACKING_URI")
    saved, _ = load_final_model(tmp_path / "lr_b" / "final_model.pt")
    for (name, a), (_, b) in zip(sorted(loaded.state_dict().items()), sorted(saved.state_dict().items())):
        assert torch.equal(a, b), name

    # The REST API the UI reads serves the runs and the plot images.
    assert requests.get(mlflow_server.uri, timeout=10).status_code == 200
    response = requests.post(f"{mlflow_server.uri}/ajax-api/2.0/mlflow/runs/search",
                             json={"experiment_ids": [exp.experiment_id], "max_results": 50}, timeout=10)
    assert response.status_code == 200
    assert {r["info"]["run_id"] for r in response.json()["runs"]} == {r.info.run_id for r in runs}
    pid = parents[0].info.run_id
    image = requests.get(f"{mlflow_server.uri}/get-artifact", params={"path": "plots/final_summary.png", "run_uuid": pid},
                         timeout=10)
    assert image.status_code == 200 and image.content[:4] == b"\x89PNG"

    # `compare`: the differing config values side by side, final metrics, a plot.
    out = tmp_path / "compare.png"
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "compare", "--experiment", experiment, "--output", str(out)],
        cwd=tmp_path, env=client_env(mlflow_server), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    lr_row = next(line for line in proc.stdout.splitlines() if "train.optimizer.lr" in line)
    assert "0.01" in lr_row and "0.003" in lr_row
    assert "model.cell" not in proc.stdout  # equal in both runs: not a difference
    assert "final/test_bpc" in proc.stdout
    assert out.read_bytes()[:4] == b"\x89PNG"


def _metric_steps(client, run_id: str, key: str) -> list[int]:
    return sorted(m.step for m in client.get_metric_history(run_id, key))


def _train_run(client, experiment: str):
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        return None
    found = client.search_runs([exp.experiment_id], filter_string="tags.`pipeline.stage` = 'train'")
    return found[0] if found else None


def _steps_done(work_dir: Path) -> int:
    log_path = work_dir / "train_log.jsonl"
    if not log_path.exists():
        return 0
    steps = [json.loads(line).get("step", 0) for line in log_path.read_text().splitlines() if line.strip()]
    return max(steps, default=0)


def test_training_survives_a_tracking_server_outage(tmp_path, ptb_char_dir, s3_endpoint):
    """Stop the server mid-run, keep it down while training goes on, start it again: nothing is lost."""
    from mlflow.tracking import MlflowClient

    import boto3

    boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"]).create_bucket(Bucket=ARTIFACT_BUCKET)
    server = _s3_server(tmp_path, s3_endpoint)
    server.start()
    experiment = "outage"
    config = write_config(tmp_path, ptb_char_dir, "outage", experiment=experiment, max_steps=240, eval_every=20,
                          log_every=10)
    config_data = yaml.safe_load(config.read_text())
    config_data["tracking"].update(request_timeout=2, retry_max_delay=2)
    config.write_text(yaml.safe_dump(config_data))
    work_dir = tmp_path / "outage"
    stderr_path = tmp_path / "pipeline.stderr"
    with open(stderr_path, "w") as stderr:
        proc = subprocess.Popen([PYTHON, "-m", "pipeline", "run", "--config", str(config)], cwd=tmp_path,
                                env=client_env(server), stdout=subprocess.DEVNULL, stderr=stderr)
    client = MlflowClient(tracking_uri=server.uri)
    try:
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline:  # wait for the first evaluation to reach the server
            train = _train_run(client, experiment)
            if train is not None and _metric_steps(client, train.info.run_id, "valid/reported_loss"):
                break
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            time.sleep(0.5)
        else:
            pytest.fail("no evaluation reached the server")
        server.stop()
        down_at = _steps_done(work_dir)
        while _steps_done(work_dir) < down_at + 60:  # training goes on without the server
            assert proc.poll() is None, stderr_path.read_text()[-3000:]
            time.sleep(0.2)
        assert _steps_done(work_dir) < 240, "the run finished before the server came back: make it longer"
        server.start()
        assert proc.wait(timeout=400) == 0, stderr_path.read_text()[-5000:]
    finally:
        if proc.poll() is None:
            proc.kill()
        log_text = stderr_path.read_text()
        server_started = server.proc is not None
    try:
        assert server_started
        assert "unreachable" in log_text and "reachable again" in log_text, log_text[-3000:]
        train = _train_run(client, experiment)
        expected = list(range(20, 241, 20))
        assert _metric_steps(client, train.info.run_id, "valid/reported_loss") == expected
        assert _metric_steps(client, train.info.run_id, "averaging/long_length") == expected
        assert _metric_steps(client, train.info.run_id, "train/loss") == list(range(10, 241, 10))
        assert train.info.status == "FINISHED"
        parent = client.get_run(train.data.tags["mlflow.parentRunId"])
        assert parent.info.status == "FINISHED" and "final/test_bpc" in parent.data.metrics
        assert not (work_dir / "mlflow_pending.jsonl").exists()
    finally:
        server.stop()


def test_unsent_calls_are_kept_on_disk_and_flushed_later(tmp_path, mlflow_server):
    """A stage that ends while the server is down leaves its calls in mlflow_pending.jsonl; `flush` sends them."""
    from mlflow.tracking import MlflowClient

    from pipeline.config import validate_config
    from pipeline.tracking import PENDING_FILE, Tracker, iter_pending

    raw = {
        "name": "spool", "work_dir": str(tmp_path / "spool"), "data": {"dataset": "text", "source": "sample"},
        "tracking": {"uri": f"http://127.0.0.1:{free_port()}", "flush_timeout": 1, "request_timeout": 1,
                     "experiment": "spool", "system_metrics": False},
    }
    config = validate_config(raw)
    tracker = Tracker(config, command="train")
    tracker.start_stage("train")
    for step in range(1, 6):
        tracker.log_metrics({"train/loss": 1.0 / step}, step=step)
    tracker.end_stage("FINISHED")
    started = time.monotonic()
    tracker.close("FINISHED")
    assert time.monotonic() - started < 20
    spooled = list(iter_pending(config.run_dir))
    assert spooled and {op.kind for op in spooled} >= {"log_batch", "set_status", "log_params"}

    config_path = tmp_path / "spool.yaml"
    raw["tracking"]["uri"] = mlflow_server.uri
    config_path.write_text(yaml.safe_dump(raw))
    proc = subprocess.run([PYTHON, "-m", "pipeline", "flush", "--config", str(config_path), "--timeout", "60"],
                          cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=180)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "sent" in proc.stdout
    assert not (config.run_dir / PENDING_FILE).exists()
    client = MlflowClient(tracking_uri=mlflow_server.uri)
    train = _train_run(client, "spool")
    assert [m.value for m in sorted(client.get_metric_history(train.info.run_id, "train/loss"), key=lambda m: m.step)] == \
        pytest.approx([1.0, 0.5, 1 / 3, 0.25, 0.2])
    assert train.info.status == "FINISHED"
    assert client.get_run(train.data.tags["mlflow.parentRunId"]).data.params["name"] == "spool"
