"""A real MLflow tracking server for tests: ``mlflow/serve.sh`` as a child process on a free loopback port."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import time
from collections.abc import Mapping
from pathlib import Path

import requests

from conftest import PYTHON, REPO, pipeline_env


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class MlflowServer:
    """``mlflow/serve.sh`` with a SQLite store under ``root`` and artifacts proxied to
    ``artifacts_destination`` (a folder, or ``s3://...`` with the S3 settings in ``env``); stop() and
    start() again on the same port and store."""

    def __init__(self, root: Path, artifacts_destination: str, env: Mapping[str, str] | None = None) -> None:
        self.port = free_port()
        self.uri = f"http://127.0.0.1:{self.port}"
        self.root = root
        self.env = {
            **pipeline_env(),
            **(env or {}),
            "MLFLOW_BACKEND_STORE_URI": f"sqlite:///{root / 'mlflow.db'}",
            "MLFLOW_ARTIFACTS_DESTINATION": artifacts_destination,
            "MLFLOW_PORT": str(self.port),
            "MLFLOW_WORKERS": "1",
            "MLFLOW_PYTHON": PYTHON,
        }
        self.proc: subprocess.Popen | None = None
        self.log_path = root / "server.log"

    def start(self, timeout: float = 90) -> None:
        with open(self.log_path, "a") as log:
            self.proc = subprocess.Popen(
                ["bash", str(REPO / "mlflow" / "serve.sh")], cwd=self.root, env=self.env,
                stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
            )
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"mlflow server exited: {self.log_path.read_text()[-3000:]}")
            try:
                if requests.get(f"{self.uri}/health", timeout=2).status_code == 200:
                    return
            except requests.RequestException:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"mlflow server not up after {timeout}s: {self.log_path.read_text()[-3000:]}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait()
        self.proc = None
