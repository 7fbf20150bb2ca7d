"""Errors that end a stage with one readable line, and the exit codes that tell a retry apart from a human.

The CLI prints ``error: <message>`` for a :class:`PipelineError` (no traceback) and exits with its
``exit_code``. The Kubernetes Jobs' ``podFailurePolicy`` fails a Job at once (no pod retries, no
re-created train Job) on the codes in :data:`NON_RETRIABLE_EXIT_CODES`: running the same command
again cannot fix them. Every other failure (exit 1: storage or tracking server unreachable, a
killed rank, ...) may be retried: training resumes from its last committed checkpoint.
"""

from __future__ import annotations

import errno
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

__all__ = [
    "EXIT_CHECKPOINTS_UNREADABLE",
    "EXIT_CONFIG",
    "EXIT_DIVERGED",
    "EXIT_DRIVER_FAILED",
    "EXIT_LOCKED",
    "EXIT_PRUNED",
    "EXIT_STORAGE",
    "NON_RETRIABLE_EXIT_CODES",
    "PeerFailure",
    "PipelineError",
    "StorageFull",
    "TrialPruned",
    "WorkDirError",
    "unwritable",
    "writing",
]

EXIT_CONFIG = 2  # bad configuration, command line, or a job that does not match its checkpoints / machine
EXIT_DRIVER_FAILED = 3  # the Kubernetes driver: a stage failed for good
EXIT_CHECKPOINTS_UNREADABLE = 4  # checkpoints exist but none can be loaded: a human must decide
EXIT_STORAGE = 5  # checkpoint location or work dir not writable / full; too many failed saves in a row
EXIT_DIVERGED = 6  # the loss kept diverging after every allowed recovery
EXIT_LOCKED = 7  # another live job owns the checkpoint location
# An Optuna trial stopped early by its study's pruner (``python -m pipeline tune``): a decision, not a failure.
# Its last checkpoint is committed and the later stages are skipped; running it again cannot change the study's
# decision (a re-created pod stops at once: pipeline.tune.reporting.ensure_trial_running), so Jobs never retry it.
EXIT_PRUNED = 8

NON_RETRIABLE_EXIT_CODES: tuple[int, ...] = (
    EXIT_CONFIG, EXIT_CHECKPOINTS_UNREADABLE, EXIT_STORAGE, EXIT_DIVERGED, EXIT_LOCKED, EXIT_PRUNED,
)


class PipelineError(Exception):
    """An error whose message says what is wrong and what to do; the CLI shows it without a traceback."""

    exit_code: int = 1


class WorkDirError(PipelineError):
    """The run's local work dir cannot be written (read-only, full, no permission)."""

    exit_code = EXIT_STORAGE


class StorageFull(PipelineError):
    """Writing failed because the device is full, read-only or over quota (retrying cannot help)."""

    exit_code = EXIT_STORAGE


class TrialPruned(PipelineError):
    """The study's pruner stopped this trial (thesis §3: 2TA's anytime loss makes early stopping reliable)."""

    exit_code = EXIT_PRUNED


class PeerFailure(PipelineError):
    """What another rank failed with (a message and exit code broadcast from it), raised on this rank so
    that every rank of the job stops with the same message and exit code."""

    def __init__(self, message: str, exit_code: int) -> None:
        super().__init__(message)
        self.exit_code = exit_code

    def __reduce__(self):
        return type(self), (str(self), self.exit_code)


# errnos of a local write that failed because of the disk, not the program: full, read-only, over quota, denied.
STORAGE_ERRNOS = frozenset({errno.ENOSPC, errno.EROFS, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EFBIG})


def unwritable(err: OSError, path: str | Path | None = None) -> str:
    """One line for a failed local write: what could not be written, why, and what to do."""
    target = path if path is not None else err.filename
    reason = err.strerror or str(err)
    return (f"cannot write {target if target is not None else 'to the work dir'}: {reason}; the work dir must be "
            "writable and have free space: free space, fix its permissions, or point --work_dir elsewhere")


@contextmanager
def writing(path: str | Path) -> Iterator[None]:
    """Turn a full / read-only / denied write of ``path`` into a :class:`WorkDirError` naming it."""
    try:
        yield
    except OSError as err:
        if err.errno in STORAGE_ERRNOS:
            raise WorkDirError(unwritable(err, path)) from None
        raise
