"""Shared fixtures: real PTB from ../shared/data (read-only), prepared once per session."""

from __future__ import annotations

import json
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
    # Tiny models: one intra-op thread is faster than two fighting a server process (and each other,
    # under torchrun) for the 2 cores of a CI machine.
    env.setdefault("OMP_NUM_THREADS", "1")
    return env


PYTHON = sys.executable


@pytest.fixture
def one_thread():
    """One torch intra-op thread for the test (tiny models: two threads fighting the other processes of a 2-core
    machine are many times slower); the previous count is restored after. Use with
    ``pytestmark = pytest.mark.usefixtures("one_thread")``."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


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


def tiny_ptb_config(work_dir: Path, data_dir: Path) -> dict:
    """The shipped ``ptb_char_tiny`` config as a mapping, pointed at prepared PTB char data and
    ``work_dir``, with tracking disabled; tests adjust the sections they exercise."""
    import yaml

    config = yaml.safe_load((REPO / "pipeline" / "configs" / "ptb_char_tiny.yaml").read_text())
    config["work_dir"] = str(work_dir)
    config["data"]["dir"] = str(data_dir)
    config["data"]["source"] = str(PTB_DIR)
    config["tracking"] = {"enabled": False}
    return config


@pytest.fixture(scope="session")
def ptb_word_dir(tmp_path_factory) -> Path:
    """Real PTB word-level data (the sentence VAE's corpus), tokenised once for the session."""
    if not (PTB_DIR / "ptb.zip").exists():
        pytest.skip(f"real PTB not available at {PTB_DIR}")
    from pipeline.data import prepare_dataset

    out = tmp_path_factory.mktemp("ptb_word") / "data"
    prepare_dataset("ptb_word", str(PTB_DIR / "ptb.zip"), out, progress=False)
    return out


def tiny_vae_config(work_dir: Path, data_dir: Path, name: str = "ptb_vae_tiny") -> dict:
    """A shipped tiny VAE config (``ptb_vae_tiny`` / ``synthetic_vae_tiny``) as a mapping, pointed at
    prepared data and ``work_dir``, with tracking disabled."""
    import yaml

    config = yaml.safe_load((REPO / "pipeline" / "configs" / f"{name}.yaml").read_text())
    config["work_dir"] = str(work_dir)
    config["data"]["dir"] = str(data_dir)
    if config["data"]["dataset"] == "ptb_word":
        config["data"]["source"] = str(PTB_DIR / "ptb.zip")
    config["tracking"] = {"enabled": False}
    return config


def torchrun_train_command(config: Path, *, nproc: int = 2) -> list[str]:
    """``torchrun`` of the train stage on this machine (no in-place restarts; fast failure detection)."""
    return [
        PYTHON, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}",
        "--max-restarts=0", "--monitor-interval=0.2",
        "-m", "pipeline", "train", "--config", str(config),
    ]


def multiprocess_env(s3_endpoint: dict) -> dict[str, str]:
    """Environment for multi-process jobs against the moto S3 server."""
    env = pipeline_env()
    env.update(s3_endpoint)
    env["OMP_NUM_THREADS"] = "1"  # two processes on two cores: no thread oversubscription
    return env


def diverge_once(monkeypatch, at_step: int) -> dict:
    """Make ``Trainer.train_step`` return a non-finite loss once, when the trainer is at ``at_step`` (i.e. on
    step ``at_step + 1``); the returned dict's ``done`` says whether it happened."""
    import math

    from pipeline.train import Trainer

    real_step = Trainer.train_step
    poisoned = {"done": False}

    def flaky_step(self):
        if self.step == at_step and not poisoned["done"]:
            poisoned["done"] = True
            return math.nan, math.nan
        return real_step(self)

    monkeypatch.setattr(Trainer, "train_step", flaky_step)
    return poisoned


def train_log_entries(run_dir: Path, key: str = "loss") -> dict[int, object]:
    """Per-step ``key`` entries of a run's train log (``train_log.jsonl``); a step re-run after a resume
    overwrites the killed run's entry."""
    out: dict[int, object] = {}
    for line in (run_dir / "train_log.jsonl").read_text().splitlines():
        record = json.loads(line)
        if key in record:
            out[record["step"]] = record[key]
    return out
