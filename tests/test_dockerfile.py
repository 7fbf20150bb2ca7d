"""What can be checked of the image without a Docker engine: the Dockerfile parsed (dockerfile-parse),
the paths it copies exist and pass .dockerignore, and it agrees with what the manifests expect.
(The linters - hadolint, checkov - run in tests/test_security_scan.py.)"""

from __future__ import annotations

import fnmatch
import json
import os
from pathlib import Path

import pytest
from dockerfile_parse import DockerfileParser

from pipeline.config import ClusterConfig
from pipeline.k8s import builders

REPO = Path(__file__).resolve().parents[1]


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
    build, final = stages(dockerfile)
    assert values(build, "FROM")[0].endswith(" AS build")
    for image in dockerfile.parent_images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", image
    # the final stage takes the built venv only: no compiler, pip cache or sources
    assert values(final, "COPY")[0] == "--from=build /opt/venv /opt/venv"
    assert not any("pip install" in run for run in values(final, "RUN"))


def test_the_project_is_installed_from_the_lock_file(dockerfile):
    build, _ = stages(dockerfile)
    runs = " ".join(values(build, "RUN"))
    assert runs.count("-c constraints.txt") == 2  # the dependencies, then the project (--no-deps)
    assert "--no-deps" in runs and "pip check" in runs
    assert "--no-cache-dir" in runs


def test_runs_as_the_non_root_user_the_manifests_expect_with_the_pipeline_cli_as_entrypoint(dockerfile):
    _, final = stages(dockerfile)
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
    _, final = stages(dockerfile)
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
