"""A lease on a checkpoint location, so that two live jobs never write into the same checkpoints.

``<checkpoint.url>/LEASE.json`` names the job that owns the location (a random owner id, host, pid,
when it was taken) and when it last beat. Rank 0 of a training job takes the lease before it lists
any checkpoint and refreshes it every ``ttl / 6`` seconds from a background thread; the trainer
checks it before every save and stops (exit code 7) as soon as another job has taken it over.

A lease is *stale*, and may be taken over, when its last heartbeat is older than its ``ttl``
(the owner died without releasing it, e.g. ``kill -9`` or a lost node), or at once when its owner
ran on this host and its process is gone. A job that finds a live lease waits for it to go stale for
up to ``ttl`` plus two heartbeats (a restarted Job whose predecessor is still shutting down), then
gives up with an error naming the owner. Heartbeats are wall-clock times: the hosts sharing a
checkpoint location are assumed to keep their clocks in sync (NTP) to well within ``ttl``.

Object stores have no atomic create-if-absent here, so two jobs starting in the same second could
both write the lease; each re-reads it after a short pause, and the one whose write did not survive
sees the other's owner id at its next check and stops before it writes a checkpoint.
"""

from __future__ import annotations

import json
import logging
import os
import socket
import threading
import time
import uuid
from dataclasses import asdict, dataclass
from typing import Any

from pipeline.checkpoint.errors import (
    CheckpointError,
    CheckpointLeaseLost,
    CheckpointLocked,
    CheckpointSaveFailed,
    describe_error,
    is_transient,
)
from pipeline.checkpoint.storage import CheckpointStorage, retry_call

__all__ = ["LEASE_FILE", "CheckpointLease", "LeaseRecord"]

log = logging.getLogger(__name__)

LEASE_FILE = "LEASE.json"
_SETTLE_S = 0.2  # pause between writing the lease and reading it back
_UNREADABLE_READS = 3  # reads of a lease that does not parse before it counts as damaged


@dataclass(frozen=True)
class LeaseRecord:
    owner: str
    host: str
    pid: int
    job: str
    acquired: float
    heartbeat: float
    ttl: float

    def describe(self, now: float) -> str:
        return (f"job {self.job!r} (pid {self.pid} on {self.host}, last heartbeat {max(0.0, now - self.heartbeat):.0f} s "
                f"ago)")


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


class CheckpointLease:
    """The lease of one checkpoint location (see the module docstring). Use it as a context manager or
    call :meth:`acquire` / :meth:`release`; :meth:`check` raises once it has been lost."""

    def __init__(self, storage: CheckpointStorage, *, ttl: float = 60.0, job: str | None = None,
                 wait: float | None = None) -> None:
        if ttl <= 0:
            raise ValueError("the lease ttl must be positive")
        self.storage = storage
        self.ttl = float(ttl)
        self.heartbeat_every = self.ttl / 6
        self.wait = self.ttl + 2 * self.heartbeat_every if wait is None else float(wait)
        self.owner = uuid.uuid4().hex
        self.host = socket.gethostname()
        self.pid = os.getpid()
        self.job = job or os.environ.get("PIPELINE_RUN_KEY") or f"{self.host}:{self.pid}"
        self.path = f"{storage.root}/{LEASE_FILE}"
        self.url = f"{storage.url}/{LEASE_FILE}"
        self._acquired_at: float | None = None
        self._lost: str | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------------- storage

    def _read(self) -> LeaseRecord | None:
        def read() -> bytes | None:
            self.storage.fs.invalidate_cache(self.path)
            try:
                with self.storage.fs.open(self.path, "rb") as f:
                    return f.read()
            except FileNotFoundError:
                return None

        for attempt in range(_UNREADABLE_READS):
            payload = retry_call(read, f"reading the lease {self.url}", self.storage.retry)
            if payload is None:
                return None
            try:
                fields = json.loads(payload)
                return LeaseRecord(**{k: fields[k] for k in LeaseRecord.__dataclass_fields__})
            except Exception:
                # Caught mid-write (a store without atomic renames): read again before believing it damaged.
                if attempt + 1 < _UNREADABLE_READS:
                    time.sleep(_SETTLE_S)
        log.warning("the lease %s is unreadable; taking it over", self.url)  # a damaged lease protects nothing
        return None

    def _write(self) -> None:
        now = time.time()
        record = LeaseRecord(self.owner, self.host, self.pid, self.job, self._acquired_at or now, now, self.ttl)
        payload = json.dumps(asdict(record)).encode()
        fs = self.storage.fs
        # A local file is replaced by a rename, so that a reader never sees it half written; an object
        # store's PUT already replaces the whole object at once.
        local = "file" in (fs.protocol if isinstance(fs.protocol, tuple) else (fs.protocol,))

        def write() -> None:
            fs.makedirs(self.storage.root, exist_ok=True)
            target = f"{self.path}.{self.owner}.tmp" if local else self.path
            with fs.open(target, "wb") as f:
                f.write(payload)
            if local:
                os.replace(target, self.path)

        retry_call(write, f"writing the lease {self.url}", self.storage.retry)

    def _stale(self, record: LeaseRecord, now: float) -> str | None:
        """Why ``record`` may be taken over, or None while its owner looks alive."""
        if record.owner == self.owner:
            return "it is ours"
        if record.host == self.host and record.pid == self.pid:
            return "it was taken by this process earlier"
        if record.host == self.host and not _pid_alive(record.pid):
            return f"its owner (pid {record.pid} on this host) is gone"
        if now - record.heartbeat > record.ttl:
            return f"its last heartbeat is {now - record.heartbeat:.0f} s old (ttl {record.ttl:.0f} s)"
        return None

    # ------------------------------------------------------------------------- lifecycle

    def acquire(self) -> CheckpointLease:
        """Take the lease (waiting up to ``wait`` seconds for a live one to go stale) and start heartbeating.

        Raises :class:`CheckpointLocked` if another job keeps it alive, :class:`CheckpointSaveFailed`
        (exit code 5) if the location cannot be written at all (read-only, full, access denied).
        """
        deadline = time.monotonic() + self.wait
        announced = False
        while True:
            try:
                record = self._read()
                now = time.time()
                why = "there is none" if record is None else self._stale(record, now)
                if why is not None:
                    if record is not None and record.owner != self.owner:
                        log.warning("taking over the lease of %s from %s: %s", self.storage.url, record.describe(now), why)
                    self._acquired_at = time.time()
                    self._write()
                    time.sleep(_SETTLE_S)
                    again = self._read()
                    if again is not None and again.owner == self.owner:
                        break
                    continue  # another job wrote at the same moment: look again
            except CheckpointError:
                raise
            except Exception as err:
                if is_transient(err):
                    raise CheckpointError(
                        f"cannot reach the checkpoint location {self.storage.url} to take its lease: "
                        f"{describe_error(err)}; check the storage endpoint and credentials"
                    ) from err
                raise CheckpointSaveFailed(
                    f"the checkpoint location {self.storage.url} is not writable ({describe_error(err)}): nothing "
                    "could be checkpointed; make it writable, free space, or choose another --checkpoint.url",
                    permanent=True,
                ) from err
            if time.monotonic() > deadline:
                raise CheckpointLocked(
                    f"the checkpoint location {self.storage.url} is in use by {record.describe(time.time())}; stop "
                    "that job, or train into another --checkpoint.url (the lease is taken over once its heartbeat is "
                    f"{record.ttl:.0f} s old)"
                )
            if not announced:
                log.warning("the checkpoint location %s is in use by %s; waiting up to %.0f s for it to end",
                            self.storage.url, record.describe(time.time()), self.wait)
                announced = True
            time.sleep(min(self.heartbeat_every, 1.0, max(0.0, deadline - time.monotonic())) or 0.05)
        self._stop.clear()
        self._thread = threading.Thread(target=self._beat, name="checkpoint-lease", daemon=True)
        self._thread.start()
        log.info("took the lease of %s (heartbeat every %.0f s)", self.storage.url, self.heartbeat_every)
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_every):
            try:
                record = self._read()
                if record is not None and record.owner != self.owner:
                    self._lost = f"it was taken over by {record.describe(time.time())}"
                    log.error("lost the lease of %s: %s", self.storage.url, self._lost)
                    return
                self._write()
            except Exception as err:  # storage outage: keep trying; the saves report the outage themselves
                log.debug("lease heartbeat failed: %s", describe_error(err))

    def check(self) -> None:
        """Raise :class:`CheckpointLeaseLost` if another job has taken the lease over."""
        if self._lost is not None:
            raise CheckpointLeaseLost(
                f"this job no longer owns the checkpoint location {self.storage.url}: {self._lost}; it stops "
                "without writing another checkpoint (its heartbeat was late for longer than the lease's ttl)"
            )

    @property
    def lost(self) -> bool:
        return self._lost is not None

    def release(self) -> None:
        """Stop heartbeating and delete the lease if it is still ours (best effort)."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._acquired_at is None or self._lost is not None:
            return
        try:
            record = self._read()
            if record is not None and record.owner == self.owner:
                self.storage.fs.rm(self.path)
        except Exception as err:
            log.warning("could not release the lease %s (%s); it goes stale after %.0f s", self.url,
                        describe_error(err), self.ttl)
        self._acquired_at = None

    def __enter__(self) -> CheckpointLease:
        return self.acquire()

    def __exit__(self, *exc: Any) -> None:
        self.release()
