"""Sweeps: the grid and each point's config (pure), the Kubernetes objects of a sweep (validated against the
official schemas in strict mode and submitted to kmock's API emulator), and a real local sweep of two
tiny VAE pipelines as processes, nested under one MLflow sweep run, ending with its Pareto frontier."""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml
from kmock_emulator import Emulator
from mlflow.tracking import MlflowClient

from pipeline.config import ConfigError, load_config
from pipeline.k8s.builders import LABEL, build_sweep_manifest
from pipeline.sweep import expand_grid, parse_axis, point_config, sweep_key
from pipeline.sweep.kubernetes import submit_objects

REPO = Path(__file__).resolve().parents[1]


def test_axes_shorthands_and_yaml_values():
    axis = parse_axis("lambda=0, 0.5,1")
    assert axis.field == "vae.objective.mi_weight" and axis.values == (0, 0.5, 1) and axis.short == "lambda"
    assert parse_axis("vae.model.latent=gaussian,categorical").values == ("gaussian", "categorical")
    for bad in ("lambda", "lambda=", "=1,2", "lambda=1,,2"):
        with pytest.raises(ConfigError, match="FIELD=V1,V2"):
            parse_axis(bad)


def test_grid_is_the_product_in_order_and_refuses_repeats():
    points = expand_grid([parse_axis("lambda=0,0.5"), parse_axis("vae.objective.samples=1,16")])
    assert [p.overrides for p in points] == [
        {"vae.objective.mi_weight": 0, "vae.objective.samples": 1}, {"vae.objective.mi_weight": 0, "vae.objective.samples": 16},
        {"vae.objective.mi_weight": 0.5, "vae.objective.samples": 1}, {"vae.objective.mi_weight": 0.5, "vae.objective.samples": 16}]
    assert points[3].slug == "lambda0.5-samples16"
    with pytest.raises(ConfigError, match="at least one axis"):
        expand_grid([])
    with pytest.raises(ConfigError, match="swept twice"):
        expand_grid([parse_axis("lambda=0"), parse_axis("vae.objective.mi_weight=1")])
    with pytest.raises(ConfigError, match="repeated values"):
        expand_grid([parse_axis("lambda=0,0.0")])


def test_each_point_is_its_own_nested_run_with_its_own_storage():
    base = load_config("ptb_vae", {"checkpoint.url": "s3://ckpt/vae"})
    axes = [parse_axis("lambda=0,0.5")]
    key = sweep_key(base, axes)
    assert key == sweep_key(load_config("ptb_vae", {"checkpoint.url": "s3://ckpt/vae"}), axes)  # stable
    assert key != sweep_key(base, [parse_axis("lambda=0,0.6")])
    a, b = (point_config(base, p, key, tracking_uri="sqlite:///x.db") for p in expand_grid(axes))
    assert (a.vae.objective.mi_weight, b.vae.objective.mi_weight) == (0, 0.5)
    assert a.name == "ptb_vae-lambda0" and a.tracking.experiment == "ptb_vae" and a.tracking.uri == "sqlite:///x.db"
    assert a.tracking.sweep_key == key and {a.tracking.run_key, b.tracking.run_key} == {f"{key}-0", f"{key}-1"}
    assert a.run_dir != b.run_dir and a.checkpoint_url == f"s3://ckpt/vae/sweep-{key}/point-0"
    assert a.cluster.run_name != b.cluster.run_name
    bad = expand_grid([parse_axis("alpha=0.5")])[0]  # alpha on the KL objective
    with pytest.raises(ConfigError, match=r"(?s)sweep point 0 \(vae.objective.alpha=0.5\).*alpha applies to kind renyi"):
        point_config(base, bad, key)


@pytest.fixture(scope="module")
def sweep_objects():
    base = load_config("ptb_vae", {"cluster.train.gpus": 1})
    axes = [parse_axis("lambda=0,0.5,0.9")]
    key = sweep_key(base, axes)
    configs = [point_config(base, p, key) for p in expand_grid(axes)]
    return key, build_sweep_manifest(configs, f"ptb_vae-sweep-{key[:6]}", key)


def test_sweep_manifest_validates_strictly_and_shares_one_driver_account(sweep_objects):
    key, objects = sweep_objects
    for obj in objects:
        kubernetes_validate.validate(obj, kubernetes_validate.latest_version(), strict=True)
        assert obj["metadata"]["labels"][f"{LABEL}/sweep"] == key
    kinds = [o["kind"] for o in objects]
    assert kinds == ["ServiceAccount", "Role", "RoleBinding"] + ["ConfigMap", "Job"] * 3
    account = objects[0]["metadata"]["name"]
    jobs = [o for o in objects if o["kind"] == "Job"]
    assert len({j["metadata"]["name"] for j in jobs}) == 3
    assert all(j["spec"]["template"]["spec"]["serviceAccountName"] == account for j in jobs)
    configs = [yaml.safe_load(o["data"]["config.yaml"]) for o in objects if o["kind"] == "ConfigMap"]
    assert [c["vae"]["objective"]["mi_weight"] for c in configs] == [0, 0.5, 0.9]
    assert {c["tracking"]["sweep_key"] for c in configs} == {key} and all("uri" not in c["tracking"] or
                                                                          c["tracking"]["uri"] is None for c in configs)


def test_sweep_objects_submit_to_an_api_server_and_resubmitting_keeps_them(sweep_objects):
    _, objects = sweep_objects
    emulator = Emulator()
    try:
        api = emulator.api_client("sweep-test")
        assert {state for _, state in submit_objects(objects, api)} == {"created"}
        assert {state for _, state in submit_objects(objects, api)} == {"exists"}
        from kubernetes import client

        jobs = client.BatchV1Api(api).list_namespaced_job(objects[0]["metadata"]["namespace"]).items
        assert sorted(j.metadata.name for j in jobs) == sorted(o["metadata"]["name"] for o in objects if o["kind"] == "Job")
    finally:
        emulator.close()


def test_a_local_sweep_runs_every_point_as_a_nested_pipeline_run_and_ends_with_its_frontier(tmp_path):
    """Two tiny synthetic-task VAEs (λ 0 and 1) as two processes; run again, nothing is repeated."""
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    env.pop("MLFLOW_TRACKING_URI", None)
    command = [sys.executable, "-m", "pipeline", "sweep", "--config", "synthetic_vae_tiny", "--lambda", "0", "1",
               "--parallel", "2", "--train.max_steps", "10", "--train.eval_every", "5", "--log-level", "WARNING",
               "--tracking.system_metrics", "false", "--tracking.register_model", "false"]
    done = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "VIMCO 4 / KL:" in done.stdout and "on the frontier" in done.stdout
    sweep_dir = next((tmp_path / "runs" / "synthetic_vae_tiny").glob("sweep-*"))
    rows = list(csv.DictReader((sweep_dir / "pareto-valid.csv").open()))
    assert sorted(r["label"] for r in rows) == ["synthetic_vae_tiny-lambda0", "synthetic_vae_tiny-lambda1"]

    client = MlflowClient(f"sqlite:///{tmp_path}/runs/mlflow.db")
    experiment = client.get_experiment_by_name("synthetic_vae_tiny").experiment_id
    runs = client.search_runs([experiment])
    (sweep,) = [r for r in runs if r.data.tags.get("pipeline.kind") == "sweep"]
    assert sweep.info.status == "FINISHED" and sweep.data.tags["pipeline.sweep_key"] == sweep_dir.name[len("sweep-"):]
    assert {a.path for a in client.list_artifacts(sweep.info.run_id, "pareto")} == {
        "pareto/pareto-valid.png", "pareto/pareto-valid.csv"}
    points = [r for r in runs if r.data.tags.get("pipeline.kind") == "pipeline"]
    assert len(points) == 2 and all(r.data.tags["mlflow.parentRunId"] == sweep.info.run_id for r in points)
    for point in points:
        stages = {r.data.tags["pipeline.stage"] for r in runs if r.data.tags.get("mlflow.parentRunId") == point.info.run_id}
        assert stages == {"prepare", "train", "evaluate"}
        assert "final/valid_mutual_information" in point.data.metrics
        plots = {a.path for a in client.list_artifacts(point.info.run_id, "plots")}
        assert {"plots/pareto.png", "plots/pareto.csv", "plots/vae_training_curves.png"} <= plots
        (evaluate,) = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == point.info.run_id
                       and r.data.tags["pipeline.stage"] == "evaluate"]
        assert {a.path for a in client.list_artifacts(evaluate.info.run_id, "samples")} == {
            "samples/vae_samples.txt", "samples/vae_samples.html"}

    again = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=400)
    assert again.returncode == 0, again.stdout + again.stderr
    assert len(client.search_runs([experiment])) == len(runs)  # the same runs: nothing new, nothing repeated
    for log in sweep_dir.glob("point-*.log"):
        assert "nothing to do" in log.read_text()
