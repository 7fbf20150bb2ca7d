"""Checkpoints through fsspec: one ``step-N`` folder per checkpoint, committed by a marker written last.

Layout under the store URL (a local path, ``s3://bucket/prefix``, ``memory://...``)::

    step-00000100/state.pt      torch.save of the training state
    step-00000100/COMMITTED     JSON {step, bytes, sha256}; written only after state.pt is complete

A folder without ``COMMITTED`` (a save killed half-way) or whose ``state.pt`` does not match the
marker's checksum is skipped with a warning and never loaded. Loading always uses
``torch.load(weights_only=True)``: checkpoints may come from shared object storage.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import re
from typing import Any

import fsspec
import torch

__all__ = ["CheckpointError", "CheckpointStore"]

log = logging.getLogger(__name__)

_STEP_DIR = re.compile(r"step-(\d+)$")
STATE_FILE = "state.pt"
COMMIT_MARKER = "COMMITTED"


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it and the fix."""


class CheckpointStore:
    """Save, find, load and prune committed checkpoints under one fsspec URL."""

    def __init__(self, url: str, storage_options: dict[str, Any] | None = None) -> None:
        self.url = url.rstrip("/")
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **(storage_options or {}))
        except Exception as err:  # unknown protocol, missing s3fs, bad options
            raise CheckpointError(f"cannot open checkpoint storage {url!r}: {err}") from err

    def _step_dir(self, step: int) -> str:
        return f"{self.root}/step-{step:08d}"

    def _list_step_dirs(self) -> dict[int, str]:
        try:
            if not self.fs.exists(self.root):
                return {}
            entries = self.fs.ls(self.root, detail=False)
        except Exception as err:
            raise CheckpointError(f"cannot list checkpoints under {self.url!r}: {err}") from err
        found: dict[int, str] = {}
        for entry in entries:
            match = _STEP_DIR.search(entry.rstrip("/"))
            if match:
                found[int(match.group(1))] = entry.rstrip("/")
        return found

    def committed_steps(self) -> list[int]:
        """Steps with a commit marker, ascending; warns about uncommitted (partial) folders."""
        steps = []
        for step, path in sorted(self._list_step_dirs().items()):
            if self.fs.exists(f"{path}/{COMMIT_MARKER}"):
                steps.append(step)
            else:
                log.warning("skipping checkpoint %s/step-%08d: no commit marker (a save was interrupted)", self.url, step)
        return steps

    def latest_step(self) -> int | None:
        steps = self.committed_steps()
        return steps[-1] if steps else None

    def save(self, step: int, state: dict[str, Any]) -> str:
        """Write ``state`` as checkpoint ``step``; the commit marker goes last. Returns the folder URL."""
        buffer = io.BytesIO()
        torch.save(state, buffer)
        payload = buffer.getvalue()
        folder = self._step_dir(step)
        marker = {"step": step, "bytes": len(payload), "sha256": hashlib.sha256(payload).hexdigest()}
        try:
            if self.fs.exists(folder):
                # A leftover of an interrupted save of the same step: replace it, never mix the two.
                self.fs.rm(folder, recursive=True)
            self.fs.makedirs(folder, exist_ok=True)
            with self.fs.open(f"{folder}/{STATE_FILE}", "wb") as f:
                f.write(payload)
            with self.fs.open(f"{folder}/{COMMIT_MARKER}", "w") as f:
                f.write(json.dumps(marker))
        except Exception as err:
            raise CheckpointError(f"cannot write checkpoint {self.url}/step-{step:08d}: {err}") from err
        return f"{self.url}/step-{step:08d}"

    def load(self, step: int, map_location: str | torch.device = "cpu") -> dict[str, Any]:
        """Load committed checkpoint ``step`` after checking its size and sha256 against the marker."""
        folder = self._step_dir(step)
        name = f"{self.url}/step-{step:08d}"
        try:
            with self.fs.open(f"{folder}/{COMMIT_MARKER}", "r") as f:
                marker = json.loads(f.read())
            with self.fs.open(f"{folder}/{STATE_FILE}", "rb") as f:
                payload = f.read()
        except FileNotFoundError as err:
            raise CheckpointError(f"checkpoint {name} is not committed or incomplete ({err}); it cannot be loaded") from err
        except Exception as err:
            raise CheckpointError(f"cannot read checkpoint {name}: {err}") from err
        if len(payload) != marker["bytes"] or hashlib.sha256(payload).hexdigest() != marker["sha256"]:
            raise CheckpointError(
                f"checkpoint {name} is corrupt: {len(payload)} bytes, expected {marker['bytes']} with sha256 "
                f"{marker['sha256']}; delete the folder to fall back to the previous checkpoint"
            )
        return torch.load(io.BytesIO(payload), map_location=map_location, weights_only=True)

    def load_latest(self, map_location: str | torch.device = "cpu") -> tuple[int, dict[str, Any]] | None:
        """The newest committed checkpoint that loads; corrupt ones are skipped with a warning."""
        for step in reversed(self.committed_steps()):
            try:
                return step, self.load(step, map_location=map_location)
            except CheckpointError as err:
                log.warning("%s; trying an older checkpoint", err)
        return None

    def prune(self, keep_last: int, protect: set[int] | None = None) -> None:
        """Delete all but the ``keep_last`` newest committed checkpoints (and any in ``protect``)."""
        keep = set(self.committed_steps()[-keep_last:]) | (protect or set())
        for step, path in self._list_step_dirs().items():
            if step not in keep and self.fs.exists(f"{path}/{COMMIT_MARKER}"):
                try:
                    self.fs.rm(path, recursive=True)
                except Exception as err:  # pruning is housekeeping: never fail training over it
                    log.warning("could not delete old checkpoint %s: %s", path, err)
