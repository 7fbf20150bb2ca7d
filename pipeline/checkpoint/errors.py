"""What can go wrong with checkpoints, as errors whose one-line message names the checkpoint and the fix,
plus the helpers that turn any storage / DCP exception into one readable reason and tell transient
failures (worth retrying) from permanent ones."""

from __future__ import annotations

import errno
import pickle
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.errors import (
    STORAGE_ERRNOS,
    EXIT_CHECKPOINTS_UNREADABLE,
    EXIT_CONFIG,
    EXIT_LOCKED,
    EXIT_STORAGE,
    PipelineError,
)

__all__ = [
    "CheckpointError",
    "CheckpointIntegrityError",
    "CheckpointLeaseLost",
    "CheckpointLocked",
    "CheckpointMismatch",
    "CheckpointSaveFailed",
    "Rejection",
    "UnreadableCheckpoints",
    "describe_error",
    "is_transient",
    "raise_if_interrupted",
    "root_causes",
]

# errnos of conditions that do not go away by waiting: the device is full or read-only, access denied
# (STORAGE_ERRNOS), or the path itself is wrong.
_PERMANENT_ERRNOS = STORAGE_ERRNOS | {
    errno.ENOENT, errno.EISDIR, errno.ENOTDIR, errno.EEXIST, errno.ENAMETOOLONG, errno.EINVAL,
}
# Exception types that mean "the bytes / the request are wrong", never "try again later".
_PERMANENT_TYPES: tuple[type[BaseException], ...] = (
    FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError, FileExistsError,
    ValueError, TypeError, KeyError, IndexError, AttributeError, AssertionError, EOFError, NotImplementedError,
    pickle.UnpicklingError, UnicodeDecodeError,
)


class CheckpointError(PipelineError, RuntimeError):
    """A checkpoint that cannot be written or read; the message names it and the fix.

    Exit code 1: storage that cannot be reached may come back, so a retry (a re-created Job) can help.
    """


class CheckpointMismatch(CheckpointError):
    """The checkpoint cannot belong to this job (another world size or engine): a configuration error."""

    exit_code = EXIT_CONFIG


class CheckpointIntegrityError(CheckpointError):
    """A checkpoint file does not match the digest recorded when the checkpoint was committed."""


class CheckpointLocked(CheckpointError):
    """Another live job holds the lease of the checkpoint location."""

    exit_code = EXIT_LOCKED


class CheckpointLeaseLost(CheckpointError):
    """This job's lease was taken over (its heartbeat went stale): it must not write checkpoints any more."""

    exit_code = EXIT_LOCKED


class CheckpointSaveFailed(CheckpointError):
    """Saves keep failing (``checkpoint.max_failed_saves`` in a row, or the last one of the run).

    ``permanent``: the storage refused for a reason that waiting cannot fix (full, read-only, access
    denied): exit code 5 (not retried); otherwise 1 (a re-created Job resumes from the last checkpoint).
    """

    def __init__(self, message: str, *, permanent: bool) -> None:
        super().__init__(message)
        self.permanent = permanent

    @property
    def exit_code(self) -> int:  # type: ignore[override]
        return EXIT_STORAGE if self.permanent else 1

    def __reduce__(self):
        return _rebuild_save_failed, (str(self), self.permanent)


def _rebuild_save_failed(message: str, permanent: bool) -> CheckpointSaveFailed:
    return CheckpointSaveFailed(message, permanent=permanent)


@dataclass(frozen=True)
class Rejection:
    """Why one checkpoint was not loaded. ``transient``: the storage failed, not the checkpoint."""

    url: str
    reason: str
    transient: bool = False


class UnreadableCheckpoints(CheckpointError):
    """Committed checkpoints exist but none of them can be loaded.

    Training never starts over on its own in this case (that would prune the old checkpoints away): a
    person decides, with ``--checkpoint.on_unreadable restart`` or a new ``checkpoint.url``.
    """

    exit_code = EXIT_CHECKPOINTS_UNREADABLE

    def __init__(self, location: str, rejections: Sequence[Rejection]) -> None:
        self.location = location
        self.rejections = list(rejections)
        lines = [f"no checkpoint under {location} can be loaded, and none was deleted:"]
        lines += [f"  {r.url}: {r.reason}" for r in self.rejections]
        lines.append(
            "fix the cause (e.g. the config must match the one that wrote them), or start over explicitly with "
            "--checkpoint.on_unreadable restart (they are set aside, not deleted) or a new --checkpoint.url"
        )
        super().__init__("\n".join(lines))

    def __reduce__(self):
        return type(self), (self.location, self.rejections)


def root_causes(err: BaseException) -> list[BaseException]:
    """The exceptions behind ``err``: DCP's ``CheckpointException`` wraps one per failed rank."""
    failures = getattr(err, "failures", None)
    if isinstance(failures, dict) and failures:
        causes = []
        for value in failures.values():
            inner = value[0] if isinstance(value, tuple) and value and isinstance(value[0], BaseException) else value
            if isinstance(inner, BaseException):
                causes.extend(root_causes(inner))
        if causes:
            return causes
    return [err]


def raise_if_interrupted(err: BaseException) -> None:
    """Re-raise the ``SystemExit`` / ``KeyboardInterrupt`` behind ``err``, if any.

    DCP wraps whatever a rank raised - a SIGTERM turned into ``SystemExit`` mid-save included - into a
    ``CheckpointException``; taken for a failed save, the stop request would be swallowed and the job
    would train on after being told to stop.
    """
    for cause in root_causes(err):
        if isinstance(cause, (SystemExit, KeyboardInterrupt)):
            raise cause


def describe_error(err: BaseException) -> str:
    """One readable line for an exception: its type and the first line of its message (no traceback)."""
    cause = root_causes(err)[0]
    text = str(cause).strip().splitlines()
    first = text[0] if text else ""
    if isinstance(cause, OSError) and cause.strerror and cause.filename:
        first = f"{cause.strerror}: {cause.filename}"
    name = type(cause).__name__
    return f"{name}: {first}" if first else name


def is_transient(err: BaseException) -> bool:
    """Whether retrying after a pause can help: network and server errors yes; a full or read-only device,
    a missing file, access denied or undecodable bytes no."""
    for cause in root_causes(err):
        if isinstance(cause, (CheckpointIntegrityError, CheckpointMismatch)):
            return False
        if isinstance(cause, _PERMANENT_TYPES):
            return False
        if isinstance(cause, OSError) and cause.errno in _PERMANENT_ERRNOS:
            return False
        if isinstance(cause, RuntimeError) and _mentions_corruption(cause):
            return False
    return True


def _mentions_corruption(err: BaseException) -> bool:
    # torch.load raises RuntimeError for truncated / corrupt zip archives ("PytorchStreamReader failed ...").
    text = str(err)
    return any(s in text for s in ("PytorchStreamReader", "invalid header", "archive is corrupt", "unpickl"))
