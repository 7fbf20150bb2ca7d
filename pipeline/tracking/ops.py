"""The durable queue's unit: one call to the tracking server, its spool file, and which failures retry.

Calls are queued in memory and, when a process ends with the server unreachable, written to
``<work_dir>/mlflow_pending.jsonl`` (one JSON object per line, oldest first) for the next stage or
``python -m pipeline flush`` to send.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

__all__ = ["PENDING_FILE", "PermanentError", "TrackingOp", "is_transient", "iter_pending", "short_error", "write_spool"]

log = logging.getLogger("pipeline.tracking")

PENDING_FILE = "mlflow_pending.jsonl"
PARENT = "parent"
# Errors the server will give again however often we retry: drop the call, warn.
_PERMANENT_ERROR_CODES = {
    "INVALID_PARAMETER_VALUE",
    "RESOURCE_ALREADY_EXISTS",
    "RESOURCE_DOES_NOT_EXIST",
    "BAD_REQUEST",
    "INVALID_STATE",
    "PERMISSION_DENIED",
    "UNAUTHENTICATED",
}


@dataclasses.dataclass
class TrackingOp:
    """One queued call to the tracking server.

    ``run`` is ``"parent"`` or ``"stage:<name>"``; the background thread resolves it to a run id
    (creating the run if needed) when it sends the call, so calls can be queued, and spooled to
    disk, before the server was ever reached.
    """

    kind: str
    run: str
    payload: dict[str, Any]

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, line: str) -> TrackingOp:
        data = json.loads(line)
        return cls(kind=data["kind"], run=data["run"], payload=data["payload"])


class PermanentError(Exception):
    """A call that cannot succeed however often it is retried."""


def is_transient(err: BaseException) -> bool:
    """Network and server-side failures (worth retrying); anything else -- a refused call, a bug -- is not."""
    if isinstance(err, PermanentError):
        return False
    if isinstance(err, (OSError, TimeoutError)):  # ConnectionError, socket timeouts, ...
        return True
    try:
        import requests
        from mlflow.exceptions import MlflowException
    except ImportError:  # pragma: no cover - mlflow is a dependency
        return False
    if isinstance(err, requests.RequestException):
        return True
    return isinstance(err, MlflowException) and err.error_code not in _PERMANENT_ERROR_CODES


def short_error(err: BaseException, limit: int = 300) -> str:
    """``Type: message``, cut to ``limit`` characters (server errors can carry whole HTML pages)."""
    text = f"{type(err).__name__}: {err}"
    return text if len(text) <= limit else text[:limit] + "..."


def iter_pending(run_dir: Path) -> Iterable[TrackingOp]:
    """The calls spooled in ``<run_dir>/mlflow_pending.jsonl``, oldest first; a damaged line is skipped
    with a warning."""
    path = Path(run_dir) / PENDING_FILE
    if not path.exists():
        return
    for number, line in enumerate(path.read_text().splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield TrackingOp.from_json(line)
        except (ValueError, KeyError) as err:
            log.warning("%s line %d is not a tracking call (%s); skipped", path, number, err)


def write_spool(run_dir: Path, ops: Sequence[TrackingOp]) -> Path | None:
    """Replace the spool file with ``ops`` (atomically); remove it when there are none. Returns its path
    when calls were kept."""
    path = Path(run_dir) / PENDING_FILE
    if not ops:
        path.unlink(missing_ok=True)
        return None
    tmp = path.with_suffix(".tmp")
    try:
        tmp.write_text("".join(op.to_json() + "\n" for op in ops))
        tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)
    return path
