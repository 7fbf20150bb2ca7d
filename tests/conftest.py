"""Shared fixtures: real PTB from ../shared/data (read-only), prepared once per session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED_DATA = REPO.parent / "shared" / "data"
PTB_DIR = SHARED_DATA / "ptb"


def pipeline_env() -> dict[str, str]:
    """Environment for `python -m pipeline` subprocesses (repo importable, no inherited MLflow run)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    return env


PYTHON = sys.executable


@pytest.fixture(scope="session")
def ptb_char_dir(tmp_path_factory) -> Path:
    """Real PTB character-level data, tokenised once for the session."""
    if not PTB_DIR.exists():
        pytest.skip(f"real PTB not available at {PTB_DIR}")
    from pipeline.data import prepare_dataset

    out = tmp_path_factory.mktemp("ptb_char") / "data"
    prepare_dataset("ptb_char", str(PTB_DIR), out, progress=False)
    return out


@pytest.fixture(scope="session")
def s3_endpoint():
    """A real S3 API: the moto server on 127.0.0.1 (an ephemeral port), as s3fs's own tests use.

    Yields the environment a client needs (endpoint and dummy credentials come from the
    environment, never from code) with a fresh bucket ``checkpoints``.
    """
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    old = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    import boto3

    boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"]).create_bucket(Bucket="checkpoints")
    try:
        yield env
    finally:
        for key, value in old.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        server.stop()
