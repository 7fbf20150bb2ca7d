"""The storage seam of checkpointing: ``step-N`` folders under one fsspec URL.

Layout (``url`` is a local path, ``s3://bucket/prefix``, ``memory://...``, ...)::

    LEASE.json                the live job that owns this location (see :mod:`.lease`)
    step-00000100/            one folder per checkpoint; a name is never reused: if a crashed save
    step-00000100.1/          left ``step-00000100`` behind, the next save of step 100 goes to ``.1``
      ...                     the engine's files (DCP shards, per-rank state, DeepSpeed files)
      COMMITTED               written last: step, validation loss, world size, engine and the sha256
                              of every other file (:mod:`.integrity`); only folders that have it are
                              ever loaded
      SET_ASIDE.json          (sometimes) why this checkpoint must not be resumed from: it failed its
                              integrity check, divergence recovery went back past it, or the user
                              restarted; set-aside folders are never loaded and never deleted

Folders written before commit records held digests (DCP's ``.metadata`` and ``meta.json`` without
``COMMITTED``, or an empty DeepSpeed ``COMMITTED``) are loaded unverified, with a warning.

This module knows nothing about what is inside a checkpoint: listing, committed-ness, naming,
setting aside, pruning (keep the last k and the best) and retrying flaky storage with backoff live
here. Credentials, endpoint and options come from the environment (``AWS_*``, ``AWS_ENDPOINT_URL``)
or from ``storage_options`` in the config, never from code.
"""

from __future__ import annotations

import json
import logging
import math
import re
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypeVar

import fsspec

from pipeline.checkpoint.errors import CheckpointError, describe_error, is_transient
from pipeline.checkpoint.integrity import FileDigest, decode_commit_record, encode_commit_record

__all__ = [
    "COMMIT_FILE",
    "SET_ASIDE_FILE",
    "CheckpointInfo",
    "CheckpointStorage",
    "RetryPolicy",
    "SetAsideKind",
    "retry_call",
]

log = logging.getLogger(__name__)

COMMIT_FILE = "COMMITTED"
SET_ASIDE_FILE = "SET_ASIDE.json"
LEGACY_META_FILE = "meta.json"  # the metadata of checkpoints written before COMMITTED held it
_FOLDER = re.compile(r"step-(\d+)(?:\.(\d+))?$")

# corrupt: failed its integrity check (it blocks a silent fresh start); abandoned: divergence recovery went
# back to an older checkpoint; restarted: set aside by ``checkpoint.on_unreadable restart``.
SetAsideKind = Literal["corrupt", "abandoned", "restarted"]

T = TypeVar("T")


@dataclass(frozen=True)
class RetryPolicy:
    """Exponential backoff for storage calls: delays base, 2*base, ... capped at max_delay."""

    attempts: int = 5
    base_delay: float = 1.0
    max_delay: float = 30.0

    def delays(self) -> list[float]:
        return [min(self.base_delay * 2**i, self.max_delay) for i in range(self.attempts - 1)]


def retry_call(fn: Callable[[], T], what: str, policy: RetryPolicy) -> T:
    """Call ``fn``; on a transient error (network, server) retry after each backoff delay, then re-raise.

    Errors that waiting cannot fix (a missing file, a full or read-only device, access denied, bad
    bytes: see :func:`~pipeline.checkpoint.errors.is_transient`) are raised at once.
    """
    delays = policy.delays()
    for attempt in range(policy.attempts):
        try:
            return fn()
        except Exception as err:
            if attempt == len(delays) or not is_transient(err):
                raise
            log.warning("%s failed (attempt %d/%d: %s); retrying in %.1fs", what, attempt + 1, policy.attempts,
                        describe_error(err), delays[attempt])
            time.sleep(delays[attempt])
    raise AssertionError("unreachable")


@dataclass
class CheckpointInfo:
    """One ``step-N[.k]`` folder.

    ``files``: the digests of the commit record (None for a checkpoint written before records held
    them: loaded unverified). ``record_error``: why the commit record itself cannot be read.
    ``set_aside``: the ``SET_ASIDE.json`` record (kind, reason, time) when it has one.
    """

    step: int
    attempt: int
    name: str
    committed: bool
    meta: dict[str, Any] = field(default_factory=dict)
    files: dict[str, FileDigest] | None = None
    record_error: str | None = None
    set_aside: dict[str, Any] | None = None

    @property
    def loss(self) -> float:
        """The reported validation loss recorded with the checkpoint (inf when it has none)."""
        value = self.meta.get("loss")
        if value is None:
            return math.inf
        try:
            value = float(value)
        except (TypeError, ValueError):
            return math.inf
        return math.inf if math.isnan(value) else value

    @property
    def live(self) -> bool:
        """Committed and not set aside: a checkpoint training may resume from."""
        return self.committed and self.set_aside is None

    @property
    def order(self) -> tuple[int, int]:
        return self.step, self.attempt

    @property
    def set_aside_kind(self) -> str | None:
        """Why it is set aside (``corrupt``, ``abandoned``, ``restarted``), None when it is not."""
        return None if self.set_aside is None else self.set_aside.get("kind")

    def best_first(self) -> tuple[float, int, int]:
        """Sort key: lowest reported validation loss first; ties, and checkpoints without one, newest first."""
        return self.loss, -self.step, -self.attempt


class CheckpointStorage:
    """Lists, names, sets aside and prunes the checkpoint folders under ``url``.

    ``legacy_commit_file``: the file that marked a checkpoint committed before ``COMMITTED`` records
    (DCP's ``.metadata``); such folders are treated as committed but unverified.
    """

    def __init__(
        self,
        url: str,
        *,
        legacy_commit_file: str | None = None,
        storage_options: dict[str, Any] | None = None,
        retry: RetryPolicy | None = None,
    ) -> None:
        self.url = url.rstrip("/")
        self.commit_file = COMMIT_FILE
        self.legacy_commit_file = legacy_commit_file
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

    def file_path(self, name: str, filename: str) -> str:
        return f"{self.root}/{name}/{filename}"

    def _ls(self, path: str, what: str) -> list[str]:
        def ls() -> list[str]:
            self.fs.invalidate_cache(path)
            if not self.fs.exists(path):
                return []
            return [entry.rstrip("/").rsplit("/", 1)[-1] for entry in self.fs.ls(path, detail=False)]

        try:
            return retry_call(ls, what, self.retry)
        except Exception as err:
            raise CheckpointError(
                f"cannot list {self.url!r}: {describe_error(err)}; check the storage endpoint and credentials "
                "(AWS_ENDPOINT_URL, AWS_ACCESS_KEY_ID, ...) or checkpoint.storage_options"
            ) from err

    def _names(self) -> list[tuple[int, int, str]]:
        found = []
        for base in self._ls(self.root, f"listing checkpoints under {self.url}"):
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

    def _read_json(self, name: str, filename: str) -> dict[str, Any] | None:
        try:
            payload = retry_call(lambda: self.read_bytes(name, filename), f"reading {name}/{filename}", self.retry)
            value = json.loads(payload)
            return value if isinstance(value, dict) else None
        except Exception:
            return None

    def describe(self, step: int, attempt: int, name: str) -> CheckpointInfo:
        """What one folder holds: committed or not, its commit record, whether it is set aside."""
        files_here = set(self._ls(self.folder_path(name), f"listing {name}"))
        info = CheckpointInfo(step, attempt, name, committed=False)
        if SET_ASIDE_FILE in files_here:
            info.set_aside = self._read_json(name, SET_ASIDE_FILE) or {"kind": "corrupt", "reason": "unreadable marker"}
        if COMMIT_FILE in files_here:
            info.committed = True
            try:
                payload = retry_call(lambda: self.read_bytes(name, COMMIT_FILE), f"reading {name}/{COMMIT_FILE}",
                                     self.retry)
                record = decode_commit_record(payload)
            except Exception as err:
                info.record_error = f"{COMMIT_FILE}: {err}" if isinstance(err, ValueError) else describe_error(err)
                return info
            if record is not None:
                info.meta, info.files = record
                return info
        elif not (self.legacy_commit_file and {self.legacy_commit_file, LEGACY_META_FILE} <= files_here):
            return info  # a save that did not finish
        info.committed = True  # written before commit records held digests: unverified
        info.meta = self._read_json(name, LEGACY_META_FILE) or {}
        return info

    def list(self) -> list[CheckpointInfo]:
        """Every checkpoint folder, oldest first, with its committed-ness, metadata and set-aside marker."""
        return [self.describe(*entry) for entry in self._names()]

    def committed(self, infos: Iterable[CheckpointInfo] | None = None) -> list[CheckpointInfo]:
        """Checkpoints training may resume from (committed, not set aside), oldest first; uncommitted
        folders newer than all of them (an interrupted save) are skipped with a warning."""
        infos = self.list() if infos is None else list(infos)
        live = [i for i in infos if i.live]
        newest = max((i.order for i in live), default=(-1, -1))
        for info in infos:
            if not info.committed and info.order > newest:
                log.warning("skipping checkpoint %s: no %s (a save was interrupted); it is never loaded",
                            self.folder_url(info.name), COMMIT_FILE)
        return live

    def latest(self) -> CheckpointInfo | None:
        live = self.committed()
        return live[-1] if live else None

    # ------------------------------------------------------------------------- writing

    def write_bytes(self, name: str, filename: str, payload: bytes) -> None:
        self.fs.makedirs(self.folder_path(name), exist_ok=True)
        with self.fs.open(self.file_path(name, filename), "wb") as f:
            f.write(payload)

    def read_bytes(self, name: str, filename: str) -> bytes:
        with self.fs.open(self.file_path(name, filename), "rb") as f:
            return f.read()

    def write_commit(self, name: str, meta: Mapping[str, Any], files: Mapping[str, FileDigest]) -> None:
        """Write the commit record (retried on transient errors): from now on the checkpoint is loadable."""
        payload = encode_commit_record(meta, files)
        retry_call(lambda: self.write_bytes(name, COMMIT_FILE, payload), f"committing checkpoint {name}", self.retry)

    def set_aside(self, name: str, kind: SetAsideKind, reason: str) -> bool:
        """Mark a checkpoint as never to be resumed from (kept, never deleted). Returns whether it worked."""
        record = {"kind": kind, "reason": reason, "time": time.time()}
        try:
            retry_call(lambda: self.write_bytes(name, SET_ASIDE_FILE, json.dumps(record).encode()),
                       f"setting aside {name}", self.retry)
            return True
        except Exception as err:
            log.warning("could not mark %s as set aside (%s)", self.folder_url(name), describe_error(err))
            return False

    def remove_folder(self, name: str) -> None:
        """Delete a folder this job created for a save that failed (best effort: it is never loaded anyway)."""
        try:
            path = self.folder_path(name)
            self.fs.invalidate_cache(path)
            if self.fs.exists(path):
                self.fs.rm(path, recursive=True)
        except Exception as err:
            log.warning("could not remove the folder of the failed save %s (%s); it is never loaded and is "
                        "removed by a later prune", self.folder_url(name), describe_error(err))

    def prune(self, keep_last: int, keep_best: bool = True) -> None:
        """Delete committed checkpoints except the ``keep_last`` newest and (optionally) the best one.

        Only ever called after a new checkpoint committed, so the run always keeps its last committed
        checkpoint. Set-aside checkpoints are never deleted. Uncommitted leftovers older than the newest
        committed checkpoint (saves killed half-way) are removed too.
        """
        try:
            infos = self.list()
        except Exception as err:  # housekeeping must never fail training: try again after the next save
            log.warning("could not list %s to prune old checkpoints (%s); will retry after the next save", self.url,
                        describe_error(err))
            return
        live = [i for i in infos if i.live]
        keep = {i.name for i in live[-keep_last:]}
        if keep_best and live:
            best = min(live, key=CheckpointInfo.best_first)
            if math.isfinite(best.loss):
                keep.add(best.name)
        newest = live[-1].order if live else (-1, -1)
        for info in infos:
            if info.set_aside is not None:
                continue
            stale_partial = not info.committed and info.order < newest
            if (info.live and info.name not in keep) or stale_partial:
                try:
                    self.fs.rm(self.folder_path(info.name), recursive=True)
                except Exception as err:  # housekeeping must never fail training
                    log.warning("could not delete old checkpoint %s: %s", self.folder_url(info.name),
                                describe_error(err))
