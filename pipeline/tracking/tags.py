"""Tags that identify what a run used: the source commit and the prepared dataset."""

from __future__ import annotations

import hashlib
import os
import subprocess
from pathlib import Path
from typing import Any

__all__ = ["dataset_checksum", "dataset_tags", "git_commit"]


def git_commit() -> str | None:
    """The source commit: ``$GIT_COMMIT`` (baked into images at build time), else ``git rev-parse``."""
    commit = os.environ.get("GIT_COMMIT")
    if commit and commit != "unknown":  # "unknown": an image built without --build-arg GIT_COMMIT
        return commit
    repo = Path(__file__).resolve().parents[2]
    if not (repo / ".git").exists():
        return None
    try:
        out = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None if out.returncode == 0 else None


def dataset_checksum(manifest: Any) -> str:
    """One sha256 over the prepared splits' sha256s (sorted by split name): equal iff the token arrays are."""
    digest = hashlib.sha256()
    for name in sorted(manifest.splits):
        digest.update(f"{name}:{manifest.splits[name].sha256}\n".encode())
    return digest.hexdigest()


def dataset_tags(manifest: Any) -> dict[str, str]:
    """Tags that identify the prepared data a run used (compare runs on equal data)."""
    return {
        "dataset.name": manifest.name,
        "dataset.unit": manifest.unit,
        "dataset.checksum": dataset_checksum(manifest),
        "dataset.source_sha256": manifest.source_sha256 or "none",
        "dataset.vocab_size": str(manifest.vocab_size),
    }
