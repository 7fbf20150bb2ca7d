"""The storage seam of checkpointing: ``step-N`` folders under one fsspec URL.

Layout (``url`` is a local path, ``s3://bucket/prefix``, ``memory://...``, ...)::

    step-00000100/            one folder per checkpoint; a name is never reused: if a crashed save
    step-00000100.1/          left ``step-00000100`` behind, the next save of step 100 goes to ``.1``
      meta.json               step, reported validation loss, world size, engine (written first)
      ...                     the engine's files (DCP shards, per-rank state, DeepSpeed files)
      <commit file>           written last; its presence is what makes the checkpoint committed
                              (DCP: ``.metadata``; DeepSpeed: ``COMMITTED``)

This module knows nothing about what is inside a checkpoint: listing, committed-ness, naming,
pruning (keep the last k and the best) and retrying flaky storage with backoff live here.
Credentials, endpoint and options come from the environment (``AWS_*``, ``AWS_ENDPOINT_URL``) or
from ``storage_options`` in the config, never from code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import fsspec

__all__ = ["CheckpointError", "CheckpointInfo", "CheckpointStorage", "RetryPolicy", "retry_call"]

log = logging.getLogger(__name__)

META_FILE = "meta.json"
_FOLDER = re.compile(r"step-(\d+)(?:\.(\d+))?$")

T = TypeVar("T")


class CheckpointError(RuntimeError):
    """A checkpoint that cannot be written or read; the message names it and the fix."""


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for storage calls: delays base, 2*base, ... capped at max_delay."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.base_delay * 2**i, self.max_delay) for i in range(self.attempts - 1)]


def retry_call(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Call ``fn``; on an exception retry after each backoff delay, then re-raise the last error."""
    delays = policy.delays()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == len(delays):
                raise
            log.warning("%s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt + 1, policy.attempts,
                        err, delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


@dataclass
class CheckpointInfo:
    """One ``step-N[.k]`` folder."""

    step: int
    attempt: int
    name: str
    committed: bool
    meta: dict[str, Any] = field(default_factory=dict)

    @property
    def loss(self) -> float:
        value = self.meta.get("loss")
        return math.inf if value is None or (isinstance(value, float) and math.isnan(value)) else float(value)


class CheckpointStorage:
    """Lists, names and prunes the checkpoint folders under ``url``."""

    def __init__(
        self,
        url: str,
        *,
        commit_file: str,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.commit_file = commit_file
        self.storage_options = dict(storage_options or {})
        self.retry = retry or RetryPolicy()
        try:
            self.fs, self.root = fsspec.core.url_to_fs(self.url, **self.storage_options)
        except Exception as err:  # unknown protocol, missing s3fs, bad options
            raise CheckpointError(f"cannot open checkpoint storage {url!r}: {err}") from err

    # ------------------------------------------------------------------------- names

    def folder_url(self, name: str) -> str:
        """Full URL of a checkpoint folder (what DCP's fsspec writer/reader take)."""
        return f"{self.url}/{name}"

    def folder_path(self, name: str) -> str:
        """Path of a checkpoint folder inside ``self.fs``."""
        return f"{self.root}/{name}"

    def _names(self) -> list[tuple[int, int, str]]:
        def ls() -> list[str]:
            self.fs.invalidate_cache(self.root)
            if not self.fs.exists(self.root):
                return []
            return self.fs.ls(self.root, detail=False)

        try:
            entries = retry_call(ls, f"listing checkpoints under {self.url}", self.retry)
        except Exception as err:
            raise CheckpointError(
                f"cannot list checkpoints under {self.url!r}: {err}; check the storage endpoint and credentials "
                "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or checkpoint.storage_options"
            ) from err
        found = []
        for entry in entries:
            base = entry.rstrip("/").rsplit("/", 1)[-1]
            match = _FOLDER.fullmatch(base)
            if match:
                found.append((int(match.group(1)), int(match.group(2) or 0), base))
        return sorted(found)

    def new_folder(self, step: int) -> str:
        """A folder name for checkpoint ``step`` that has never been used (``step-N``, ``step-N.1``, ...)."""
        taken = {attempt for s, attempt, _ in self._names() if s == step}
        attempt = 0 if not taken else max(taken) + 1
        return f"step-{step:08d}" if attempt == 0 else f"step-{step:08d}.{attempt}"

    # ------------------------------------------------------------------------- listing

    def _read_meta(self, name: str) -> dict[str, Any]:
        try:
            with self.fs.open(f"{self.folder_path(name)}/{META_FILE}", "r") as f:
                return json.loads(f.read())
        except Exception:
            return {}

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first, with its committed-ness and metadata."""
        infos = []
        for step, attempt, name in self._names():
            committed = self.fs.exists(f"{self.folder_path(name)}/{self.commit_file}")
            infos.append(CheckpointInfo(step, attempt, name, committed, self._read_meta(name) if committed else {}))
        return infos

    def committed(self) -> list[CheckpointInfo]:
        """Committed checkpoints oldest first; a folder without its commit file is skipped with a warning."""
        infos = self.list()
        newest_committed = max((i.step for i in infos if i.committed), default=-1)
        for info in infos:
            if not info.committed and info.step >= newest_committed:
                log.warning("skipping checkpoint %s: no %s (a save was interrupted); it is never loaded",
                            self.folder_url(info.name), self.commit_file)
        return [i for i in infos if i.committed]

    def latest(self) -> CheckpointInfo | None:
        committed = self.committed()
        return committed[-1] if committed else None

    # ------------------------------------------------------------------------- writing

    def write_meta(self, name: str, meta: dict[str, Any]) -> None:
        def write() -> None:
            with self.fs.open(f"{self.folder_path(name)}/{META_FILE}", "w") as f:
                f.write(json.dumps(meta))

        write()

    def write_bytes(self, name: str, filename: str, payload: bytes) -> None:
        self.fs.makedirs(self.folder_path(name), exist_ok=True)
        with self.fs.open(f"{self.folder_path(name)}/{filename}", "wb") as f:
            f.write(payload)

    def read_bytes(self, name: str, filename: str) -> bytes:
        with self.fs.open(f"{self.folder_path(name)}/{filename}", "rb") as f:
            return f.read()

    def prune(self, keep_last: int, keep_best: bool = True) -> None:
        """Delete committed checkpoints except the ``keep_last`` newest and (optionally) the best one.

        Only ever called after a new checkpoint committed, so the run always keeps its last committed
        checkpoint. Uncommitted leftovers older than the newest committed checkpoint are removed too.
        """
        try:
            infos = self.list()
        except Exception as err:  # housekeeping must never fail training: try again after the next save
            log.warning("could not list %s to prune old checkpoints (%s); will retry after the next save", self.url, err)
            return
        committed = [i for i in infos if i.committed]
        keep = {i.name for i in committed[-keep_last:]}
        if keep_best and committed:
            best = min(committed, key=lambda i: (i.loss, -i.step))
            if math.isfinite(best.loss):
                keep.add(best.name)
        newest = (committed[-1].step, committed[-1].attempt) if committed else (-1, -1)
        for info in infos:
            stale_partial = not info.committed and (info.step, info.attempt) < newest
            if (info.committed and info.name not in keep) or stale_partial:
                try:
                    self.fs.rm(self.folder_path(info.name), recursive=True)
                except Exception as err:  # housekeeping must never fail training
                    log.warning("could not delete old checkpoint %s: %s", self.folder_url(info.name), err)
