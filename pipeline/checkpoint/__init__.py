"""Checkpointing: an fsspec storage seam (:mod:`.storage`), content digests (:mod:`.integrity`), the commit
protocol shared by both engines (:mod:`.protocol`), the DCP implementation (:mod:`.dcp`, DDP), the
DeepSpeed one (:mod:`.ds`), the lease that keeps two jobs out of one location (:mod:`.lease`), and DCP
saves run in the background from a CPU copy of the state (:mod:`.async_save`, :mod:`.staging`)."""

from pipeline.checkpoint.async_save import BackgroundSaver
from pipeline.checkpoint.dcp import DCP_METADATA_FILE, DCPCheckpointer, SafeFsspecReader
from pipeline.checkpoint.ds import DeepSpeedCheckpointer
from pipeline.checkpoint.errors import (
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointLeaseLost,
    CheckpointLocked,
    CheckpointMismatch,
    CheckpointSaveFailed,
    Rejection,
    UnreadableCheckpoints,
)
from pipeline.checkpoint.integrity import FileDigest
from pipeline.checkpoint.lease import LEASE_FILE, CheckpointLease
from pipeline.checkpoint.protocol import Checkpointer
from pipeline.checkpoint.staging import CpuStager
from pipeline.checkpoint.storage import (
    COMMIT_FILE,
    SET_ASIDE_FILE,
    CheckpointInfo,
    CheckpointStorage,
    RetryPolicy,
    retry_call,
)

__all__ = [
    "BackgroundSaver",
    "COMMIT_FILE",
    "DCP_METADATA_FILE",
    "LEASE_FILE",
    "SET_ASIDE_FILE",
    "CheckpointError",
    "CheckpointInfo",
    "CheckpointIntegrityError",
    "CheckpointLease",
    "CheckpointLeaseLost",
    "CheckpointLocked",
    "CheckpointMismatch",
    "CheckpointSaveFailed",
    "CheckpointStorage",
    "Checkpointer",
    "CpuStager",
    "DCPCheckpointer",
    "DeepSpeedCheckpointer",
    "FileDigest",
    "Rejection",
    "RetryPolicy",
    "SafeFsspecReader",
    "UnreadableCheckpoints",
    "retry_call",
]
