"""The containers of the stage Jobs, run here as they would run in their pods: the exact command
lines (the Dockerfile's ENTRYPOINT + the Job's args, or the Job's command), the Job's environment,
against a real S3 API (moto). Only what the cluster provides is substituted: the pod's folders
(emptyDirs, the ConfigMap mount) become temporary folders, the Secret's keys and the MinIO
endpoint become moto's, the rendezvous host pod 0 becomes 127.0.0.1."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import uuid
from pathlib import Path

import fsspec
import pytest
from dockerfile_parse import DockerfileParser

from conftest import REPO
from pipeline.config import load_config
from pipeline.data import verify_prepared
from pipeline.data.store import verify_stored
from pipeline.evaluate import FINAL_MODEL_FILE, RESULTS_FILE
from pipeline.k8s.builders import CONFIG_FILE, WORK_DIR, DriverRef, build_stage_job, checkpoint_url, dataset_url
from pipeline.k8s.launch import exit_code_for

ENTRYPOINT = json.loads([i["value"] for i in DockerfileParser(path=str(REPO / "Dockerfile")).structure
                         if i["instruction"] == "ENTRYPOINT"][-1])


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Pod:
    """One pod's filesystem (its emptyDirs and the mounted config) in a temporary folder."""

    def __init__(self, root: Path, config_text: str) -> None:
        self.root = root
        (root / "etc").mkdir(parents=True)
        (root / "etc" / "config.yaml").write_text(config_text)
        (root / "tmp").mkdir()

    def path(self, text: str) -> str:
        """A path inside the pod -> the same place in this pod's folder (other text unchanged)."""
        if text == CONFIG_FILE:
            return str(self.root / "etc" / "config.yaml")
        for mount, local in ((WORK_DIR, "work"), ("/tmp", "tmp")):
            if text == mount or text.startswith(mount + "/"):
                return str(self.root / local) + text[len(mount):]
        return text

    def run(self, container: dict, s3: dict[str, str], *, timeout: float = 300) -> subprocess.CompletedProcess:
        argv = (container.get("command") or ENTRYPOINT) + container["args"]
        argv = [sys.executable if a == "python" else self.path(a) for a in argv]
        env = {"PATH": os.environ["PATH"], "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
        for item in container["env"]:
            ref = item.get("valueFrom", {})
            if "secretKeyRef" in ref:  # the Secret's keys: moto's dummy credentials
                env[item["name"]] = s3[ref["secretKeyRef"]["key"]]
            elif "fieldRef" in ref:  # the downward API: this is pod 0 of its Job
                assert "job-completion-index" in ref["fieldRef"]["fieldPath"]
                env[item["name"]] = "0"
            else:
                env[item["name"]] = self.path(item["value"])
        env["AWS_ENDPOINT_URL"] = s3["AWS_ENDPOINT_URL"]  # the in-cluster MinIO -> moto
        if "PET_MASTER_ADDR" in env:
            env["PET_MASTER_ADDR"], env["PET_MASTER_PORT"] = "127.0.0.1", str(free_port())
        return subprocess.run(argv, env=env, cwd=self.root, capture_output=True, text=True, timeout=timeout)


def test_stage_containers_run_end_to_end_through_the_object_store(s3_endpoint, tmp_path):
    bucket = f"pipeline-{uuid.uuid4().hex[:10]}"
    config = load_config("demo", {
        "train.max_steps": 8, "train.eval_every": 4, "train.eval_tokens": 1024, "train.log_every": 4,
        "train.batch_size": 8, "train.bptt": 32, "evaluate.max_tokens": 1024, "evaluate.batch_size": 8,
        "evaluate.temperature.num": 3, "tracking.enabled": False,
        "cluster.storage_url": f"s3://{bucket}", "cluster.train.gpus": 0, "cluster.evaluate.gpus": 0,
    })
    driver = DriverRef(name="demo-e2e", namespace="rlm-pipeline", uid=None, configmap="demo-e2e-config")
    jobs = {stage: build_stage_job(config, stage, driver) for stage in ("prepare", "train", "evaluate")}

    def run_pod(stage: str) -> Pod:
        pod = Pod(tmp_path / stage, config.to_yaml())
        spec = jobs[stage]["spec"]["template"]["spec"]
        for container in spec.get("initContainers", []) + spec["containers"]:
            result = pod.run(container, s3_endpoint)
            assert result.returncode == 0, f"{stage}/{container['name']} failed:\n{result.stdout}\n{result.stderr[-4000:]}"
        return pod

    run_pod("prepare")
    published = verify_stored(dataset_url(config))  # prepare published the tokenised data
    assert published is not None and published.name == "text"

    train = run_pod("train")  # its init container fetched and verified the data, then torchrun trained
    assert verify_prepared(train.root / "work" / "data" / "text") == published
    fs, root = fsspec.core.url_to_fs(checkpoint_url(config, driver))
    assert any(p.rsplit("/", 1)[-1].startswith("step-") for p in fs.ls(root)), "no checkpoint in object storage"

    evaluate = run_pod("evaluate")  # another pod: data and final model come from the store
    assert not (evaluate.root / "work" / "run" / "checkpoints").exists()
    assert (evaluate.root / "work" / "run" / FINAL_MODEL_FILE).is_file()
    results = json.loads((evaluate.root / "work" / "run" / RESULTS_FILE).read_text())
    assert results["metrics"]

    # A second prepare (a re-run of the pipeline) finds the verified dataset and does nothing.
    again = Pod(tmp_path / "prepare-again", config.to_yaml())
    result = again.run(jobs["prepare"]["spec"]["template"]["spec"]["containers"][0], s3_endpoint)
    assert result.returncode == 0 and "already published" in result.stderr
    assert not (again.root / "work" / "data").exists()


def test_the_launcher_keeps_a_config_errors_exit_code_where_torchrun_says_1(tmp_path):
    argv = ["--standalone", "--nproc-per-node=1", "--max-restarts=0", "--monitor-interval=0.2",
            "-m", "pipeline", "train", "--config", str(tmp_path / "missing.yaml")]
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    launcher = subprocess.run([sys.executable, "-m", "pipeline.k8s.launch", *argv], env=env, capture_output=True,
                              text=True, timeout=120)
    assert launcher.returncode == 2, launcher.stderr[-2000:]  # FailJob in the train Job's podFailurePolicy
    assert "exiting with 2" in launcher.stderr
    plain = subprocess.run([sys.executable, "-m", "torch.distributed.run", *argv], env=env, capture_output=True,
                           text=True, timeout=120)
    assert plain.returncode == 1  # why the launcher exists


@pytest.mark.parametrize("codes, expected", [
    ([2], 2), ([2, 2], 2), ([1], 1), ([2, 1], 1), ([-9], 1), ([137], 1),
    # The other workers, stopped by torchrun (SIGTERM) after the first failed, do not hide its code.
    ([4, -15], 4), ([5, 143], 5), ([7, 7, 143], 7), ([-15], 1), ([143, 1], 1),
])
def test_launcher_exit_code(codes, expected):
    assert exit_code_for(codes) == expected
