"""Checkpointing: an fsspec storage seam (:mod:`.storage`), the DCP implementation (:mod:`.dcp`, DDP) and
the DeepSpeed one (:mod:`.ds`)."""

from pipeline.checkpoint.dcp import COMMIT_FILE, DCPCheckpointer, SafeFsspecReader
from pipeline.checkpoint.ds import DeepSpeedCheckpointer
from pipeline.checkpoint.storage import CheckpointError, CheckpointInfo, CheckpointStorage, RetryPolicy, retry_call

__all__ = [
    "COMMIT_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointStorage",
    "DCPCheckpointer",
    "DeepSpeedCheckpointer",
    "RetryPolicy",
    "SafeFsspecReader",
    "retry_call",
]
