"""End to end: the whole pipeline through the CLI on real PTB char with a tiny model, tracked in MLflow."""

from __future__ import annotations

import json
import math
import subprocess

import yaml

from conftest import PYTHON, pipeline_env, tiny_ptb_config


def _write_config(tmp_path, data_dir, **train_overrides):
    config = tiny_ptb_config(tmp_path / "run", data_dir)
    config["tracking"] = {"uri": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    config["train"].update(train_overrides)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config))
    return path


def test_run_command_does_prepare_train_evaluate(tmp_path, ptb_char_dir):
    config_path = _write_config(tmp_path, ptb_char_dir, max_steps=60, eval_every=20)
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "run", "--config", str(config_path)],
        cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "eval_results.json").read_text())
    metrics = results["metrics"]
    # A tiny model after 60 steps is far from good, but clearly better than uniform over 50 symbols
    # (log2(50) = 5.64 bits); this run measured about 4.2.
    assert metrics["valid_bpc"] < 4.7
    assert metrics["test_bpc"] < 4.7
    assert metrics["valid_bpc_tuned_temperature"] <= metrics["valid_bpc"] + 1e-9
    assert 0.8 <= results["temperature"] <= 1.2
    assert (run_dir / "final_model.pt").exists()
    assert yaml.safe_load((run_dir / "resolved_config.yaml").read_text())["train"]["max_steps"] == 60

    # Tracked in MLflow (local SQLite store): a parent run with one nested run per stage.
    from mlflow.tracking import MlflowClient

    client = MlflowClient(tracking_uri=f"sqlite:///{tmp_path / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("ptb_char_tiny")
    runs = client.search_runs([experiment.experiment_id])
    parent = next(r for r in runs if r.data.tags.get("pipeline.kind") == "pipeline")
    stages = {r.data.tags["pipeline.stage"]: r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id}
    assert len(runs) == 4 and set(stages) == {"prepare", "train", "evaluate"}
    assert all(r.info.status == "FINISHED" for r in runs)
    assert parent.data.params["train.max_steps"] == "60"
    assert parent.data.params["model.cell"] == "rlstm"
    train = stages["train"].info.run_id
    history = client.get_metric_history(train, "valid/reported_loss")
    assert [m.step for m in history] == [20, 40, 60]
    assert len(client.get_metric_history(train, "averaging/long_length")) == 3
    for run in (parent, stages["evaluate"]):
        assert math.isclose(run.data.metrics["final/test_bpc"], metrics["test_bpc"], rel_tol=1e-9)
    assert stages["prepare"].data.metrics["data/train_tokens"] == 5_017_482
    assert {a.path for a in client.list_artifacts(parent.info.run_id)} >= {"config.yaml", "plots"}
    assert {a.path for a in client.list_artifacts(train)} >= {"dataset_manifest.json", "plots"}
    assert {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)} >= {"eval_results.json", "plots"}
    # The reported (2TA) model, registered under the experiment's name, loads back with mlflow.pytorch.
    (version,) = client.search_model_versions("name='ptb_char_tiny'")
    assert version.run_id == train and version.tags["step"] == "60"

    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "evaluate", "--config", str(config_path)],
        cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    runs_after = client.search_runs([experiment.experiment_id])
    # `evaluate` alone belongs to the same pipeline run: its evaluate stage run is reused.
    assert len(runs_after) == 4

    # A second `run` is idempotent: the data verifies and is skipped, training resumes at its end.
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "run", "--config", str(config_path)],
        cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "already prepared" in proc.stderr
    assert "resumed from" in proc.stderr
    # ... and, the first pipeline run having finished, it is a new parent run with its own stages.
    parents = [r for r in client.search_runs([experiment.experiment_id]) if r.data.tags["pipeline.kind"] == "pipeline"]
    assert len(parents) == 2 and all(p.info.status == "FINISHED" for p in parents)


def test_bad_config_fails_fast_with_the_field_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "data": {"dataset": "ptb_char", "source": "y"}, "train": {"bptt": "long"}}))
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "train", "--config", str(bad)],
        cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.bptt" in proc.stderr
