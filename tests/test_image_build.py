"""Opt-in: build the container images with scripts/build-image.sh and run in them what the
Kubernetes manifests run, the way the pods run it: as the image's user 10001, with a read-only root
filesystem and only the pods' volumes writable (scripts/run-image.py: an OCI runtime, runc, on the
built image; no capabilities, no privilege escalation). A command that writes outside its mounted
volumes fails here as it would in the cluster.

Skipped unless RLM_IMAGE_TEST=1 (and marked slow): the first build downloads gigabytes (the CUDA
torch wheels) and takes minutes. Needs root, buildah and runc (``apt-get install buildah runc debootstrap``)::

    RLM_IMAGE_TEST=1 .venv/bin/python -m pytest -q -s tests/test_image_build.py

``RLM_IMAGE_BASE`` is the script's ``--base`` (e.g. ``debootstrap`` where the registry's
python:3.11-slim-bookworm cannot be pulled), ``RLM_TORCH_WHEELS`` its ``--torch-wheels`` (a folder
with the torch CPU wheel where download.pytorch.org cannot be reached). Images whose inputs did not
change are reused (``--reuse``). Timings and sizes go to ``$RLM_IMAGE_CACHE/test-report.json``.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import time
import urllib.request
import uuid
from pathlib import Path

import pytest
import yaml

from pipeline.config import ClusterConfig, load_config, shipped_config_names
from pipeline.data.store import verify_stored
from pipeline.k8s.builders import (
    DriverRef,
    build_minio_manifest,
    build_mlflow_manifest,
    build_pipeline_manifest,
    build_stage_job,
    dataset_url,
)

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build-image.sh"
CACHE = Path(os.environ.get("RLM_IMAGE_CACHE", "/var/tmp/rlm-image-build"))
USER = 10001

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not os.environ.get("RLM_IMAGE_TEST"),
                       reason="opt-in: RLM_IMAGE_TEST=1 builds the images (gigabytes of downloads; see the docstring)"),
]

REPORT: dict[str, dict] = {}


def record(key: str, **values) -> None:
    REPORT.setdefault(key, {}).update(values)
    CACHE.mkdir(parents=True, exist_ok=True)
    (CACHE / "test-report.json").write_text(json.dumps(REPORT, indent=1))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def images() -> dict[str, str]:
    """variant -> image reference, built (or reused when their inputs are unchanged) by the script."""
    if os.geteuid() != 0:
        pytest.fail("RLM_IMAGE_TEST needs root (buildah storage, an OCI runtime): run pytest as root")
    if not shutil.which("buildah") or not (shutil.which("runc") or shutil.which("crun")):
        pytest.fail("RLM_IMAGE_TEST needs buildah and an OCI runtime: apt-get install buildah runc debootstrap")
    options = ["--reuse"]
    if os.environ.get("RLM_IMAGE_BASE"):
        options += ["--base", os.environ["RLM_IMAGE_BASE"]]
    if os.environ.get("RLM_TORCH_WHEELS"):
        options += ["--torch-wheels", os.environ["RLM_TORCH_WHEELS"]]
    start = time.monotonic()
    build = subprocess.run([str(SCRIPT), "build", *options], capture_output=True, text=True, timeout=3 * 3600)
    assert build.returncode == 0, f"the build failed:\n{build.stdout[-6000:]}\n{build.stderr[-4000:]}"
    record("build", seconds=round(time.monotonic() - start), options=options,
           log=[line for line in build.stdout.splitlines() if line.startswith(("base:", "gpu:", "cpu:"))])
    refs = subprocess.run([str(SCRIPT), "refs"], capture_output=True, text=True, check=True).stdout.split()
    return dict(zip(refs[::2], refs[1::2]))


def inspect(ref: str) -> dict:
    out = subprocess.run(["buildah", "--storage-driver", "vfs", "inspect", "--type", "image", ref],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def run_image(ref: str, args: list[str], *, options: tuple[str, ...] = (), timeout: float = 900):
    """``build-image.sh run``: the image's ENTRYPOINT (or --entrypoint) + args, read-only root."""
    argv = [str(SCRIPT), "run", "--image", ref, "--timeout", str(timeout), *options, "--", *args]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=timeout + 120)
    # The read-only root must not have been hit; a tool that swallows EROFS would otherwise hide it.
    assert "Read-only file system" not in result.stdout + result.stderr, result.stdout[-3000:] + result.stderr[-3000:]
    return result


def pod_dir(root: Path, name: str) -> Path:
    """A pod volume (emptyDir / PVC) on this machine, writable by the pod's user like an fsGroup volume."""
    path = root / name
    path.mkdir(parents=True)
    os.chown(path, USER, USER)
    return path


@pytest.mark.parametrize("variant", ["gpu", "cpu"])
def test_the_image_runs_the_cli_as_the_manifests_user(images, variant):
    ref = images[variant]
    config = inspect(ref)["OCIv1"]["config"]
    # what the manifests assume: runAsUser / runAsGroup 10001, `command: [python, -m, ...]` on the venv's PATH
    assert config["User"] == f"{USER}:{USER}"
    assert config["Entrypoint"] == ["python", "-m", "pipeline"] and config["Cmd"] == ["--help"]
    assert config["WorkingDir"] == "/work"
    env = dict(item.split("=", 1) for item in config["Env"])
    assert env["PATH"].startswith("/opt/venv/bin:") and env["HOME"] == "/tmp"
    assert config["Labels"]["org.rlm-pipeline.torch"] == {"gpu": "cuda", "cpu": "cpu"}[variant]
    size = subprocess.run(["buildah", "--storage-driver", "vfs", "images", "--format", "{{.Size}}", ref],
                          capture_output=True, text=True, check=True).stdout.strip()
    record(f"image-{variant}", ref=ref, size=size)

    start = time.monotonic()
    result = run_image(ref, ["configs"])
    record(f"image-{variant}", configs_seconds=round(time.monotonic() - start, 1))
    assert result.returncode == 0, result.stderr[-3000:]
    listed = result.stdout
    assert all(name in listed for name in shipped_config_names()), listed

    probe = ("import os, torch; print(os.getuid(), os.getgid(), torch.__version__, torch.version.cuda, "
             "os.path.exists('/etc/pip.conf'), os.path.exists('/run/secrets/build-ca.crt'))")
    result = run_image(ref, ["-c", probe], options=["--entrypoint", "python"])
    assert result.returncode == 0, result.stderr[-3000:]
    uid, gid, version, cuda, pip_conf, ca = result.stdout.split()
    assert (uid, gid) == (str(USER), str(USER))
    assert (pip_conf, ca) == ("False", "False")  # the build host's pip config stayed a build secret
    if variant == "cpu":
        assert (version, cuda) == ("2.13.0+cpu", "None")
    else:
        # PyPI's CUDA build (2.13.0+cu130); without a GPU it imports and runs on the CPU
        assert version.startswith("2.13.0+cu") and cuda != "None"
    record(f"image-{variant}", torch=version, cuda=cuda)


def test_root_filesystem_is_read_only_and_only_the_volumes_are_writable(images, tmp_path):
    work = pod_dir(tmp_path, "work")
    probe = (
        "import os\n"
        "for path in ('/work/x', '/tmp/x', '/opt/venv/x', '/etc/x', '/app/x'):\n"
        "    try:\n"
        "        open(path, 'w').close(); print(path, 'written')\n"
        "    except OSError as err:\n"
        "        print(path, err.strerror)\n"
    )
    result = subprocess.run([str(SCRIPT), "run", "--image", images["cpu"], "-v", f"{work}:/work",
                             "--entrypoint", "python", "--", "-c", probe], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = dict(line.split(" ", 1) for line in result.stdout.splitlines())
    assert lines["/work/x"] == "written" and lines["/tmp/x"] == "written"
    for path in ("/opt/venv/x", "/etc/x", "/app/x"):
        assert lines[path] == "Read-only file system", lines
    assert (work / "x").is_file()


def test_a_short_demo_runs_as_the_non_root_user_on_a_read_only_root(images, tmp_path):
    work = pod_dir(tmp_path, "work")
    args = ["run", "--config", "demo", "--train.max_steps", "20", "--train.eval_every", "10",
            "--train.eval_tokens", "4096", "--evaluate.max_tokens", "4096"]
    start = time.monotonic()
    # /work bound here to look at the results; /tmp a tmpfs; no network: the demo needs none
    result = run_image(images["gpu"], args, options=["-v", f"{work}:/work"])
    seconds = round(time.monotonic() - start, 1)
    record("demo-gpu-image", seconds=seconds, args=args)
    assert result.returncode == 0, f"{result.stdout[-3000:]}\n{result.stderr[-5000:]}"
    results = json.loads((work / "runs" / "demo" / "eval_results.json").read_text())
    assert results["metrics"], results
    record("demo-gpu-image", metrics=results["metrics"])
    assert all(p.stat().st_uid == USER for p in (work / "runs" / "demo").rglob("*"))


def substitute_env(container: dict, s3: dict[str, str]) -> list[str]:
    """The container's env as ``-e`` options: the Secret's keys -> moto's, the downward API -> pod 0 of
    its Job, the in-cluster MinIO -> moto; literal values as the manifest has them."""
    options = []
    for item in container["env"]:
        ref = item.get("valueFrom", {})
        if "secretKeyRef" in ref:
            value = s3[ref["secretKeyRef"]["key"]]
        elif "fieldRef" in ref:
            path = ref["fieldRef"]["fieldPath"]
            pod_0 = "0" if "completion-index" in path else "demo-image-test"
            value = {"metadata.namespace": "rlm-pipeline"}.get(path, pod_0)
        else:
            value = item["value"]
        if item["name"] in ("AWS_ENDPOINT_URL", "MLFLOW_S3_ENDPOINT_URL"):
            value = s3["AWS_ENDPOINT_URL"]
        options += ["-e", f"{item['name']}={value}"]
    return options


class Pod:
    """One pod of a manifest: its volumes are folders here; each container runs in the image it names."""

    def __init__(self, root: Path, pod_spec: dict, images: dict[str, str], config_text: str = "") -> None:
        self.root, self.spec, self.images = root, pod_spec, images
        self.volumes: dict[str, tuple[Path, bool]] = {}
        for volume in pod_spec["volumes"]:
            if "configMap" in volume:
                path = root / volume["name"]
                path.mkdir(parents=True)
                (path / "config.yaml").write_text(config_text)
                self.volumes[volume["name"]] = (path, True)
            elif volume["name"] != "dshm":  # /dev/shm: the runtime's own tmpfs
                self.volumes[volume["name"]] = (pod_dir(root, volume["name"]), False)

    def options(self, container: dict, s3: dict[str, str]) -> list[str]:
        assert container["image"] in self.images.values(), f"{container['name']}: {container['image']} not built here"
        options = ["--image", container["image"], "--network", "host", "--no-default-tmpfs"]
        for mount in container["volumeMounts"]:
            if mount["name"] in self.volumes:
                host, read_only = self.volumes[mount["name"]]
                options += ["-v", f"{host}:{mount['mountPath']}{':ro' if read_only or mount.get('readOnly') else ''}"]
        if container.get("workingDir"):
            options += ["--workdir", container["workingDir"]]
        options += substitute_env(container, s3)
        if container.get("command"):
            options += ["--entrypoint", container["command"][0]]
        return options

    def argv(self, container: dict, s3: dict[str, str], extra_env: tuple[str, ...] = (), timeout: float = 900):
        """``build-image.sh run`` of the container: ``command[1:] + args`` after its entrypoint."""
        args = [*container.get("command", [])[1:], *container.get("args", [])]
        env = [opt for item in extra_env for opt in ("-e", item)]  # after the manifest's: they win
        return [str(SCRIPT), "run", "--timeout", str(timeout), *self.options(container, s3), *env, "--", *args]

    def run(self, container: dict, s3: dict[str, str], *, extra_env: tuple[str, ...] = (), timeout: float = 900):
        start = time.monotonic()
        result = subprocess.run(self.argv(container, s3, extra_env, timeout), capture_output=True, text=True,
                                timeout=timeout + 120)
        assert "Read-only file system" not in result.stdout + result.stderr, result.stderr[-3000:]
        return result, round(time.monotonic() - start, 1)


def test_the_manifests_containers_run_in_their_images(images, s3_endpoint, tmp_path):
    """The containers of the manifests, each in the image and with the command, env and volumes its
    manifest gives: the buckets Job, the MLflow server, the driver, and prepare -> train -> evaluate
    through S3 (moto) with tracking to that MLflow server."""
    import boto3
    from mlflow.tracking import MlflowClient

    assert (ClusterConfig().image, ClusterConfig().cpu_image) == (images["gpu"], images["cpu"])
    bucket = f"pipeline-{uuid.uuid4().hex[:10]}"
    mlflow_port = free_port()
    config = load_config("demo", {
        "name": f"image-test-{uuid.uuid4().hex[:6]}",
        "train.max_steps": 8, "train.eval_every": 4, "train.eval_tokens": 1024, "train.log_every": 4,
        "train.batch_size": 8, "train.bptt": 32, "evaluate.max_tokens": 1024, "evaluate.batch_size": 8,
        "evaluate.temperature.num": 3,
        "cluster.storage_url": f"s3://{bucket}", "cluster.train.gpus": 0, "cluster.evaluate.gpus": 0,
        "cluster.mlflow_uri": f"http://127.0.0.1:{mlflow_port}",
    })
    timings: dict[str, float] = {}

    # The buckets Job (cpu image): creates the pipeline's bucket and MLflow's.
    buckets_job = build_minio_manifest(config.cluster)[2]
    pod = Pod(tmp_path / "buckets", buckets_job["spec"]["template"]["spec"], images)
    result, timings["buckets"] = pod.run(pod.spec["containers"][0], s3_endpoint)
    assert result.returncode == 0, result.stderr[-3000:]

    # The MLflow Deployment (cpu image): SQLite on its volume, artifacts proxied to S3.
    deployment = build_mlflow_manifest(config.cluster)[1]
    mlflow_pod = Pod(tmp_path / "mlflow", deployment["spec"]["template"]["spec"], images)
    server = mlflow_pod.spec["containers"][0]
    log = (tmp_path / "mlflow.log").open("w")
    process = subprocess.Popen(mlflow_pod.argv(server, s3_endpoint, (f"MLFLOW_PORT={mlflow_port}",)),
                               stdout=log, stderr=subprocess.STDOUT)
    try:
        start = time.monotonic()
        while True:
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{mlflow_port}/health", timeout=2) as response:
                    if response.status == 200:
                        break
            except OSError:
                pass
            assert process.poll() is None, (tmp_path / "mlflow.log").read_text()[-4000:]
            assert time.monotonic() - start < 300, "MLflow did not answer /health in 300 s"
            time.sleep(2)
        timings["mlflow-ready"] = round(time.monotonic() - start, 1)

        # The driver (cpu image): outside a cluster it stops at the API server, after loading its config.
        names_job = build_pipeline_manifest(config)[-1]
        driver_pod = Pod(tmp_path / "driver", names_job["spec"]["template"]["spec"], images, config.to_yaml())
        result, timings["driver"] = driver_pod.run(driver_pod.spec["containers"][0], s3_endpoint)
        assert result.returncode == 2 and "not inside a pod" in result.stderr, result.stderr[-3000:]

        # The stage Jobs, each pod with fresh volumes: the data and checkpoints pass through S3.
        driver = DriverRef(name="demo-image-test", namespace="rlm-pipeline", uid=None,
                           configmap="demo-image-test-config")
        for stage in ("prepare", "train", "evaluate"):
            job = build_stage_job(config, stage, driver)
            pod = Pod(tmp_path / stage, job["spec"]["template"]["spec"], images, config.to_yaml())
            for container in pod.spec.get("initContainers", []) + pod.spec["containers"]:
                # the rendezvous host, pod 0 of the train Job, is this machine
                extra = ("PET_MASTER_ADDR=127.0.0.1", f"PET_MASTER_PORT={free_port()}")
                extra = extra if container["name"] == "train" else ()
                result, timings[f"{stage}/{container['name']}"] = pod.run(container, s3_endpoint, extra_env=extra)
                assert result.returncode == 0, (
                    f"{stage}/{container['name']} failed:\n{result.stdout[-3000:]}\n{result.stderr[-5000:]}")
            if stage == "prepare":
                assert verify_stored(dataset_url(config)) is not None
        evaluate_work = tmp_path / "evaluate" / "work"
        results = json.loads((evaluate_work / "run" / "eval_results.json").read_text())
        assert results["metrics"]

        # Every stage tracked to the MLflow server, under one parent run, tagged with its pod's image.
        client = MlflowClient(tracking_uri=f"http://127.0.0.1:{mlflow_port}")
        experiment = client.get_experiment_by_name(config.name)
        runs = client.search_runs([experiment.experiment_id])
        stages = {r.data.tags["pipeline.stage"]: r.data.tags.get("pipeline.image")
                  for r in runs if "pipeline.stage" in r.data.tags}
        assert stages == {"prepare": images["cpu"], "train": images["gpu"], "evaluate": images["gpu"]}, stages
        # artifacts went through the server to the object store
        s3 = boto3.client("s3", endpoint_url=s3_endpoint["AWS_ENDPOINT_URL"])
        listed = s3.list_objects_v2(Bucket="mlflow-artifacts")
        assert listed.get("KeyCount", 0) > 0
    finally:
        process.terminate()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()
        record("manifest-containers", seconds=timings)
    assert "Read-only file system" not in (tmp_path / "mlflow.log").read_text()
    # The MLflow pod wrote only to its volumes: the database on the PVC.
    assert (tmp_path / "mlflow" / "db" / "mlflow.db").is_file()


def test_the_image_renders_the_nightly_manifest_with_its_own_builders(images):
    gpu, cpu = "ghcr.io/org/rlm@sha256:" + "a" * 64, "ghcr.io/org/rlm@sha256:" + "b" * 64
    result = run_image(images["cpu"], ["-m", "pipeline.k8s.shipped", "--print", "nightly-enwik8_rlstm.yaml",
                                       "--cluster.image", gpu, "--cluster.cpu_image", cpu],
                       options=["--entrypoint", "python"])
    assert result.returncode == 0, result.stderr[-3000:]
    cronjob = list(yaml.safe_load_all(result.stdout))[-1]
    (container,) = cronjob["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert container["image"] == cpu  # the driver runs the CPU image; it gives the stage Jobs theirs
    assert gpu in yaml.safe_load(list(yaml.safe_load_all(result.stdout))[0]["data"]["config.yaml"])["cluster"]["image"]
