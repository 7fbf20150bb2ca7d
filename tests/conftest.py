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
