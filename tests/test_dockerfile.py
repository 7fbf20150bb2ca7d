"""What can be checked of the image without building it: the Dockerfile parsed (dockerfile-parse),
the paths it copies exist and pass .dockerignore, and it agrees with what the manifests expect; the
build script's options and the container its runner makes. (The linters - hadolint, checkov - run in
tests/test_security_scan.py; building and running the images: tests/test_image_build.py, opt-in.)"""

from __future__ import annotations

import fnmatch
import importlib.util
import json
import os
import subprocess
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from pipeline.config import ClusterConfig
from pipeline.k8s import builders

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "build-image.sh"


@pytest.fixture(scope="module")
def dockerfile() -> DockerfileParser:
    return DockerfileParser(path=str(REPO / "Dockerfile"))


def stages(dockerfile: DockerfileParser) -> list[list[dict]]:
    """The instructions of each build stage (comments dropped)."""
    out: list[list[dict]] = []
    for item in dockerfile.structure:
        if item["instruction"] == "FROM":
            out.append([])
        if out and item["instruction"] != "COMMENT":
            out[-1].append(item)
    return out


def values(stage: list[dict], instruction: str) -> list[str]:
    return [i["value"] for i in stage if i["instruction"] == instruction]


def dockerignore_patterns() -> list[str]:
    lines = (REPO / ".dockerignore").read_text().splitlines()
    return [line.strip() for line in lines if line.strip() and not line.startswith("#")]


def excluded(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last pattern matching the path or one of its parent folders wins; '!' re-includes."""
    parts = path.split("/")
    prefixes = ["/".join(parts[: i + 1]) for i in range(len(parts))]
    result = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pat = pattern.lstrip("!").rstrip("/")
        if pat.startswith("**/"):
            hit = any(fnmatch.fnmatchcase(p.rsplit("/", 1)[-1], pat[3:]) for p in prefixes)
        else:
            hit = any(fnmatch.fnmatchcase(p, pat) and p.count("/") == pat.count("/") for p in prefixes)
        if hit:
            result = not negate
    return result


def test_multi_stage_on_a_pinned_base(dockerfile):
    wheels, build, final = stages(dockerfile)
    assert [i["instruction"] for i in wheels] == ["FROM"] and values(wheels, "FROM") == ["scratch AS torch-wheels"]
    # one base for both stages (the venv's python links to it), a tag always given (BASE_IMAGE:BASE_TAG)
    assert values(build, "FROM") == ["${BASE_IMAGE}:${BASE_TAG} AS build"]
    assert values(final, "FROM") == ["${BASE_IMAGE}:${BASE_TAG}"]
    assert dockerfile.parent_images == ["scratch", "python:3.11-slim-bookworm", "python:3.11-slim-bookworm"]
    for image in dockerfile.parent_images[1:]:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
    # the final stage takes the built venv only: no compiler, pip cache, sources or build secrets
    assert values(final, "COPY")[0] == "--from=build /opt/venv /opt/venv"
    assert not any("pip install" in run or "--mount" in run for run in values(final, "RUN"))


def test_the_project_is_installed_from_the_lock_file(dockerfile):
    _, build, _ = stages(dockerfile)
    runs = " ".join(values(build, "RUN"))
    assert runs.count("-c constraints.txt") == 2  # the dependencies, then the project (--no-deps)
    assert "--no-deps" in runs and "pip check" in runs
    assert "--no-cache-dir" in runs


def test_the_cpu_variant_installs_the_locked_torch_from_the_cpu_index_or_a_wheel_folder(dockerfile):
    _, build, _ = stages(dockerfile)
    args = dict(v.split("=", 1) for v in values(build, "ARG"))
    assert args == {"TORCH": "cuda", "TORCH_CPU_INDEX": "https://download.pytorch.org/whl/cpu"}
    deps = next(run for run in values(build, "RUN") if "-r requirements.txt" in run)
    assert '--index-url "$TORCH_CPU_INDEX"' in deps and "--no-index --find-links /wheels" in deps
    assert "--mount=type=bind,from=torch-wheels,target=/wheels" in deps
    # the grep in the RUN picks exactly the lock file's torch, the version pyproject.toml requires
    pins = [line for line in (REPO / "constraints.txt").read_text().splitlines() if line.startswith("torch==")]
    assert pins == ["torch==2.13.0"] and "torch==2.13.0" in (REPO / "pyproject.toml").read_text()
    _, _, final = stages(dockerfile)
    assert "org.rlm-pipeline.torch=$TORCH" in values(final, "LABEL")


def test_pip_gets_the_build_hosts_config_only_as_build_secrets(dockerfile):
    _, build, _ = stages(dockerfile)
    for run in values(build, "RUN"):
        if "pip install" in run:  # a mirror / proxy CA reach pip, and no layer keeps them
            assert "--mount=type=secret,id=pip.conf,target=/etc/pip.conf" in run
            assert "--mount=type=secret,id=build-ca.crt" in run
    for item in dockerfile.structure:
        if item["instruction"] in ("ENV", "ARG", "COPY"):
            assert "pip.conf" not in item["value"] and "build-ca" not in item["value"], item


def test_runs_as_the_non_root_user_the_manifests_expect_with_the_pipeline_cli_as_entrypoint(dockerfile):
    *_, final = stages(dockerfile)
    (user,) = values(final, "USER")
    uid, _, gid = user.partition(":")
    assert uid == gid == str(builders.RUN_AS) and int(uid) >= 10000  # runAsNonRoot needs a numeric non-zero UID
    assert json.loads(values(final, "ENTRYPOINT")[0]) == ["python", "-m", "pipeline"]
    env = " ".join(values(final, "ENV"))
    assert "PATH=/opt/venv/bin:$PATH" in env  # the manifests' `command: [python, -m, ...]` finds the venv
    assert "HOME=/tmp" in env  # a writable home on a read-only root filesystem (/tmp is an emptyDir)


def test_no_secrets_are_baked_in(dockerfile):
    for item in dockerfile.structure:
        if item["instruction"] in ("ENV", "ARG", "LABEL"):
            upper = item["value"].upper()
            for word in ("SECRET", "PASSWORD", "TOKEN", "ACCESS_KEY", "CREDENTIAL"):
                assert word not in upper, item
        assert item["instruction"] != "ADD", "ADD can fetch URLs and unpack archives; COPY is explicit"


def test_every_copied_path_exists_and_reaches_the_build_context(dockerfile):
    patterns = dockerignore_patterns()
    sources = []
    for stage in stages(dockerfile):
        for value in values(stage, "COPY"):
            if value.startswith("--from="):
                continue
            *srcs, _dest = value.split()
            sources += srcs
    assert {"pyproject.toml", "constraints.txt", "README.md", "models", "pipeline", "mlflow"} == set(sources)
    for src in sources:
        path = REPO / src
        assert path.exists(), f"the Dockerfile copies {src}, which does not exist"
        files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        assert files
        for file in files:
            rel = file.relative_to(REPO).as_posix()
            assert not excluded(rel, patterns), f".dockerignore drops {rel}, which the Dockerfile copies"


def test_dockerignore_keeps_everything_else_out():
    patterns = dockerignore_patterns()
    for rel in [".venv/bin/python", ".git/config", "runs/demo/mlflow.db", "data/enwik8/train.npy", "tests/conftest.py",
                ".env", "k8s/minio.yaml", "pipeline/__pycache__/cli.cpython-311.pyc", "secrets.json"]:
        assert excluded(rel, patterns), rel
    for rel in ["pipeline/configs/enwik8_rlstm.yaml", "pipeline/sample_data/README.md", "mlflow/serve.sh",
                "models/lm.py", "pipeline/k8s/launch.py"]:
        assert not excluded(rel, patterns), rel


def test_the_image_holds_what_the_manifests_run(dockerfile):
    *_, final = stages(dockerfile)
    assert "mlflow /app/mlflow" in values(final, "COPY")
    deployment = builders.build_mlflow_manifest(ClusterConfig())[1]
    command = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
    assert command == ["/app/mlflow/serve.sh"]
    assert os.access(REPO / "mlflow" / "serve.sh", os.X_OK)
    # the modules the containers' commands name exist in the package
    for module in ("pipeline/k8s/__main__.py", "pipeline/k8s/launch.py", "pipeline/__main__.py"):
        assert (REPO / module).is_file()


def _runtime_closure() -> set[str]:
    """Every distribution the project needs at run time (no extras): what the image's venv holds."""
    import re
    from importlib.metadata import PackageNotFoundError, requires

    def name(req: str) -> str:
        return re.split(r"[\s;<>=!~\[(]", req, maxsplit=1)[0].lower().replace("_", "-")

    seen: set[str] = set()
    todo = [name(r) for r in requires("rlm-pipeline") or [] if "extra ==" not in r]
    while todo:
        dist = todo.pop()
        if dist in seen:
            continue
        seen.add(dist)
        try:
            todo += [name(r) for r in requires(dist) or [] if "extra ==" not in r]
        except PackageNotFoundError:
            pass  # a platform-specific requirement not installed here
    return seen


def test_the_images_dependencies_cover_what_its_containers_import():
    closure = _runtime_closure()
    # the driver's client, the stores' S3 filesystem, and boto3 for the MLflow server's S3 artifacts
    assert {"kubernetes", "s3fs", "mlflow", "boto3", "torch"} <= closure
    # test-only tools stay out of the image
    assert not closure & {"moto", "kmock", "kubernetes-validate", "dockerfile-parse", "pytest", "checkov"}


def test_the_build_script_builds_the_images_the_manifests_name():
    assert os.access(SCRIPT, os.X_OK) and os.access(REPO / "scripts" / "run-image.py", os.X_OK)
    refs = subprocess.run([str(SCRIPT), "refs"], capture_output=True, text=True, check=True, timeout=30).stdout.split()
    cluster = ClusterConfig()
    assert dict(zip(refs[::2], refs[1::2])) == {"gpu": cluster.image, "cpu": cluster.cpu_image}
    usage = subprocess.run([str(SCRIPT), "--help"], capture_output=True, text=True, check=True, timeout=30).stdout
    for option in ("--variant", "--base", "debootstrap", "--torch-wheels", "--ca-bundle", "--reuse"):
        assert option in usage


@pytest.mark.parametrize("args, message", [
    (["build", "--variant", "tpu"], "--variant must be gpu, cpu or all, not 'tpu'"),
    (["build", "--base", "python"], "--base python has no tag: give IMAGE:TAG"),
    (["build", "--base", "python:latest"], "use a version tag, not latest"),
    (["build", "--tag", "latest"], "--tag latest: the manifests refuse unpinned images"),
    (["build", "--colour"], "unknown option '--colour'"),
    (["push"], "unknown command 'push'"),
])
def test_the_build_script_refuses_bad_options_before_building(args, message):
    result = subprocess.run([str(SCRIPT), *args], capture_output=True, text=True, timeout=30)
    assert result.returncode == 2 and message in result.stderr, result.stderr


def test_the_image_runner_makes_the_container_the_manifests_ask_for(tmp_path):
    spec_ = importlib.util.spec_from_file_location("run_image", REPO / "scripts" / "run-image.py")
    run_image = importlib.util.module_from_spec(spec_)
    spec_.loader.exec_module(run_image)
    (tmp_path / "db").mkdir()
    args = run_image.parse_args(["-v", f"{tmp_path / 'db'}:/mlflow", "-e", "A=1", "--", "configs"])
    image = {"User": "10001:10001", "Entrypoint": ["python", "-m", "pipeline"], "Cmd": ["--help"], "WorkingDir": "/work",
             "Env": ["PATH=/opt/venv/bin:/usr/bin", "HOME=/tmp"]}
    spec = run_image.spec(args, "/rootfs", image, tmp_path)
    assert spec["root"] == {"path": "/rootfs", "readonly": True}  # readOnlyRootFilesystem
    process = spec["process"]
    assert process["user"] == {"uid": 10001, "gid": 10001, "additionalGids": [10001]}  # runAsUser / runAsGroup / fsGroup
    assert process["noNewPrivileges"] is True  # allowPrivilegeEscalation: false
    assert not any(process["capabilities"].values())  # capabilities: drop: [ALL]
    assert process["args"] == ["python", "-m", "pipeline", "configs"] and process["cwd"] == "/work"
    assert {"PATH=/opt/venv/bin:/usr/bin", "HOME=/tmp", "A=1"} <= set(process["env"])
    writable = {m["destination"]: m for m in spec["mounts"] if "ro" not in m.get("options", [])
                and m["type"] in ("tmpfs", "bind") and not m["destination"].startswith("/dev")}
    assert set(writable) == {"/tmp", "/work", "/mlflow"}  # the emptyDirs and the volume given, nothing else
    assert writable["/mlflow"]["source"] == str(tmp_path / "db")
    assert {"type": "network"} in spec["linux"]["namespaces"]  # --network none: loopback only
    # a root image is refused like runAsNonRoot refuses it
    with pytest.raises(SystemExit):
        run_image.spec(args, "/rootfs", {**image, "User": ""}, tmp_path)
