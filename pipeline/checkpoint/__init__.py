"""Checkpointing: an fsspec storage seam (:mod:`.storage`) and the DCP implementation (:mod:`.dcp`)."""

from pipeline.checkpoint.dcp import COMMIT_FILE, DCPCheckpointer, SafeFsspecReader
from pipeline.checkpoint.storage import CheckpointError, CheckpointInfo, CheckpointStorage, RetryPolicy, retry_call

__all__ = [
    "COMMIT_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStorage",
    "DCPCheckpointer",
    "RetryPolicy",
    "SafeFsspecReader",
    "retry_call",
]
