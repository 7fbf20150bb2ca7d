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
    # Quiet by default: progress and our own lines, none of the libraries' chatter.
    for noise in ("torch.distributed is disabled", "registered model '", "Created version", "Pickle",
                  "Creating initial MLflow database", "GitPython"):
        assert noise not in proc.stderr, noise
    assert "train  60/60 steps (100%)" in proc.stderr and "evaluate test" in proc.stderr
    run_dir = tmp_path / "run"
    results = json.loads((run_dir / "eval_results.json").read_text())
    metrics = results["metrics"]
    # A tiny model after 60 steps is far from good, but clearly better than uniform over 50 symbols
    # (log2(50) = 5.64 bits); this run measured about 4.2.
    assert metrics["valid_bpc"] < 4.7
    assert metrics["test_bpc"] < 4.7
    assert metrics["valid_bpc_tuned_temperature"] <= metrics["valid_bpc"] + 1e-9
    assert 0.8 <= results["temperature"] <= 1.25  # the default scan (evaluate.temperature)
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
    assert {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id)} >= {"eval_results.json", "plots",
                                                                                      "evaluation"}
    report = {a.path for a in client.list_artifacts(stages["evaluate"].info.run_id, "evaluation")}
    assert report == {"evaluation/report.md", "evaluation/report.csv", "evaluation/report.png"}
    # The reported (2TA) model, registered under the experiment's name, loads back with mlflow.pytorch.
    (version,) = client.search_model_versions("name='ptb_char_tiny'")
    assert version.run_id == train and version.tags["step"] == "60"

    # The model is logged into the run's own experiment and store, not MLflow's Default one in ./mlruns.
    (logged,) = client.search_logged_models([experiment.experiment_id])
    assert logged.source_run_id == train and logged.artifact_location.startswith((tmp_path / "mlartifacts").as_uri())
    assert not (tmp_path / "mlruns").exists()
    # The run ends with a summary on stdout: what happened, where things are, how to open MLflow.
    assert "ptb_char_tiny: done" in proc.stdout and "test_bpc" in proc.stdout
    assert "mlflow ui --backend-store-uri" in proc.stdout and parent.info.run_id in proc.stdout

    def snapshot():
        return sorted((r.info.run_id, r.info.status, r.info.end_time, tuple(sorted(r.data.tags.items())))
                      for r in client.search_runs([experiment.experiment_id]))

    before = snapshot()
    # Re-running a finished pipeline, or one of its stages, with nothing to do says so and changes nothing.
    for command in ("run", "evaluate", "train"):
        proc = subprocess.run(
            [PYTHON, "-m", "pipeline", command, "--config", str(config_path)],
            cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=600,
        )
        assert proc.returncode == 0, proc.stderr[-4000:]
        assert "ptb_char_tiny: nothing to do" in proc.stdout, proc.stdout
        if command == "run":
            assert "already prepared" in proc.stderr
    assert snapshot() == before
    assert len(client.search_model_versions("name='ptb_char_tiny'")) == 1

    # Training further is visibly a continuation: a new train stage run, the parent tagged, a new version.
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "train", "--config", str(config_path), "--train.max_steps", "80"],
        cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "resumed from" in proc.stderr and "trained to step 80" in proc.stdout
    runs = client.search_runs([experiment.experiment_id])
    (parent,) = [r for r in runs if r.data.tags["pipeline.kind"] == "pipeline"]
    continued = [r for r in runs if r.data.tags.get("pipeline.continues") == train]
    assert len(runs) == 5 and len(continued) == 1 and continued[0].info.run_name == "train (continued)"
    assert continued[0].data.params["train.max_steps"] == "80" and continued[0].info.status == "FINISHED"
    # The parent keeps its source and params, says it was continued, and the last stage ended it.
    assert parent.data.tags["pipeline.continuations"] == "1" and parent.info.status == "FINISHED"
    assert parent.data.tags["mlflow.source.name"] == "python -m pipeline run"
    assert [m.step for m in client.get_metric_history(continued[0].info.run_id, "valid/reported_loss")] == [80]
    assert sorted(int(v.version) for v in client.search_model_versions("name='ptb_char_tiny'")) == [1, 2]


def test_bad_config_fails_fast_with_the_field_named(tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"name": "x", "data": {"dataset": "ptb_char", "source": "y"}, "train": {"bptt": "long"}}))
    proc = subprocess.run(
        [PYTHON, "-m", "pipeline", "train", "--config", str(bad)],
        cwd=tmp_path, env=pipeline_env(), capture_output=True, text=True, timeout=120,
    )
    assert proc.returncode == 2
    assert "train.bptt" in proc.stderr
