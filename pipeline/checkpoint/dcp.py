"""Checkpoints of DDP (and single-process) training with ``torch.distributed.checkpoint``.

A save (see :mod:`pipeline.checkpoint.protocol` for the commit protocol) writes, into a fresh
``step-N`` folder (see :mod:`pipeline.checkpoint.storage`):

1. ``rank-RRRRR.pt`` per rank: the state that differs between ranks (RNG states, the carried hidden
   state of the rank's batch stripes), ``torch.save`` bytes;
2. the training state through DCP's fsspec writer: model, optimizer (FQN-keyed, via
   ``get_state_dict``), weight averages, step, data position, learning-rate scale. Replicated
   entries are written once; DCP writes its ``.metadata`` last;
3. ``COMMITTED`` (rank 0, after every rank succeeded): the metadata and the sha256 of every file,
   each hashed while it was written (:class:`DigestingFsspecWriter`: no second read).

Every rank takes part in every decision (which folder, whether a save succeeded, which checkpoint
to resume from), so ranks never disagree. Loading first checks every file against its digest (the
ranks share the work), then reads ``.metadata`` with a restricted unpickler and the per-rank files
with ``torch.load(weights_only=True)``: checkpoints may come from shared object storage and are not
trusted to run code.
"""

from __future__ import annotations

import io
import logging
import os
import pickle
from collections.abc import Callable, Generator
from contextlib import contextmanager
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FileSystem, FsspecReader, FsspecWriter
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem

from pipeline.checkpoint.errors import (
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointMismatch,
    describe_error,
    raise_if_interrupted,
)
from pipeline.checkpoint.integrity import DigestingStream, DigestLedger, FileDigest, digest_bytes, mismatch
from pipeline.checkpoint.lease import CheckpointLease
from pipeline.checkpoint.protocol import Checkpointer, Preference
from pipeline.checkpoint.storage import CheckpointInfo, CheckpointStorage, retry_call
from pipeline.distributed import DistContext

__all__ = [
    "CheckpointMismatch",
    "DCPCheckpointer",
    "DCP_METADATA_FILE",
    "DigestingFsspecWriter",
    "SafeFsspecReader",
    "SafeLoadPlanner",
    "rank_file",
]

log = logging.getLogger(__name__)

DCP_METADATA_FILE = ".metadata"

# Classes a DCP ``.metadata`` pickle may name; anything else is refused (no code execution on load).
# DCP's metadata module holds only dataclasses and enums; the other names are what torch pickles
# for shapes, dtypes and layouts.
_ALLOWED_MODULES = ("torch.distributed.checkpoint.metadata",)
_ALLOWED_GLOBALS = {
    ("torch.distributed.checkpoint.filesystem", "_StorageInfo"),
    ("torch.serialization", "_get_layout"),
    ("torch", "Size"),
    ("collections", "OrderedDict"),
}


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module in _ALLOWED_MODULES or (module, name) in _ALLOWED_GLOBALS:
            return super().find_class(module, name)
        if module == "torch" and isinstance(getattr(torch, name, None), (torch.dtype, torch.layout, torch.memory_format)):
            return getattr(torch, name)
        raise pickle.UnpicklingError(f"checkpoint metadata refers to {module}.{name}, which is not allowed")


class SafeFsspecReader(FsspecReader):
    """DCP's fsspec reader, but ``.metadata`` is unpickled with an allow-list of DCP classes."""

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        path = self._get_metadata_path(rank)
        with self.fs.create_stream(path, "rb") as f:
            metadata = _MetadataUnpickler(f).load()
        if not isinstance(metadata, Metadata):
            raise CheckpointError(f"{path} does not hold DCP metadata")
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafeLoadPlanner(DefaultLoadPlanner):
    """DCP's default load planner, but non-tensor entries are read with ``torch.load(weights_only=True)``
    (the stock planner unpickles them with ``weights_only=False``)."""

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        obj = torch.load(value, weights_only=True)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[read_item.dest_index.fqn], obj)
        else:
            self.state_dict[read_item.dest_index.fqn] = obj


class _DigestingFileSystem(FileSystem):
    """DCP's fsspec file system, hashing every file it writes into a :class:`DigestLedger`."""

    def __init__(self, ledger: DigestLedger) -> None:
        super().__init__()
        self.ledger = ledger

    @contextmanager
    def create_stream(self, path: str | os.PathLike, mode: str) -> Generator[io.IOBase, None, None]:
        with super().create_stream(path, mode) as raw:
            if not any(ch in mode for ch in "wa+"):
                yield raw
                return
            stream = DigestingStream(raw, os.path.basename(os.fspath(path)), self.ledger)
            yield stream
            stream.close()  # records the digest (DCP may have closed it already: then this is a no-op)

    def rename(self, path: str | os.PathLike, new_path: str | os.PathLike) -> None:
        super().rename(path, new_path)  # DCP writes .metadata.tmp, then renames it
        self.ledger.rename(os.path.basename(os.fspath(path)), os.path.basename(os.fspath(new_path)))


class DigestingFsspecWriter(FsspecWriter):
    """DCP's fsspec writer that records the sha256 of every file it writes in ``ledger``."""

    def __init__(self, path: str, ledger: DigestLedger, **storage_options: Any) -> None:
        super().__init__(path, sync_files=False, **storage_options)
        self.fs = _DigestingFileSystem(ledger)
        self.path = self.fs.init_path(path, **storage_options)


def rank_file(rank: int) -> str:
    """The per-rank state file (RNG, carried hidden state) of ``rank``."""
    return f"rank-{rank:05d}.pt"


class DCPCheckpointer(Checkpointer):
    """Save / find / load checkpoints of a (possibly) distributed job through DCP + fsspec."""

    engine = "ddp"

    @classmethod
    def open(cls, url: str, ctx: DistContext, *, max_failed_saves: int = 3, lease: CheckpointLease | None = None,
             **storage_kwargs: Any) -> DCPCheckpointer:
        storage = CheckpointStorage(url, legacy_commit_file=DCP_METADATA_FILE, **storage_kwargs)
        return cls(storage, ctx, max_failed_saves=max_failed_saves, lease=lease)

    def _write(self, name: str, state: dict[str, Any], per_rank: dict[str, Any]) -> dict[str, FileDigest]:
        """This rank's files of checkpoint ``name``; returns their digests (collective)."""
        ledger = DigestLedger()
        err: BaseException | None = None
        try:
            buffer = io.BytesIO()
            torch.save(per_rank, buffer)
            payload = buffer.getvalue()
            self.storage.write_bytes(name, rank_file(self.ctx.rank), payload)
            ledger.record(rank_file(self.ctx.rank), digest_bytes(payload))
        except Exception as caught:
            err = caught
        self.raise_if_any_failed(err)  # DCP's save is collective: all ranks go on, or none
        writer = DigestingFsspecWriter(self.storage.folder_url(name), ledger, **self.storage.storage_options)
        # Raises on every rank if any rank's write failed; planning and the metadata gather run on save_group.
        dcp.save(state, storage_writer=writer, process_group=self.save_group)
        return ledger.digests()

    def save(self, step: int, state: dict[str, Any], per_rank: dict[str, Any], meta: dict[str, Any], *,
             final: bool = False) -> str | None:
        """Commit checkpoint ``step``; retried with backoff into fresh folders. Returns the folder, or None.

        A save that still fails after every retry is logged and skipped (training goes on, and the
        previous committed checkpoint stays untouched) until ``max_failed_saves`` in a row failed.
        """
        return self.save_files(step, lambda name: self._write(name, state, per_rank), meta, final=final)

    def _verify(self, info: CheckpointInfo) -> None:
        if info.files is not None:
            self.verify_remote(info, self.my_share(list(info.files)))

    def _read(self, info: CheckpointInfo, state: dict[str, Any]) -> dict[str, Any]:
        url = self.storage.folder_url(info.name)
        reader = SafeFsspecReader(url, **self.storage.storage_options)
        dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        payload = retry_call(
            lambda: self.storage.read_bytes(info.name, rank_file(self.ctx.rank)), "reading per-rank state",
            self.storage.retry,
        )
        if info.files is not None and rank_file(self.ctx.rank) in info.files:
            problem = mismatch(rank_file(self.ctx.rank), info.files[rank_file(self.ctx.rank)], digest_bytes(payload))
            if problem:  # verified by another rank a moment ago; these are the bytes actually used
                raise CheckpointIntegrityError(problem)
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)

    def _load(self, info: CheckpointInfo, state: dict[str, Any]) -> dict[str, Any]:
        """Verify every file of one checkpoint and read it into ``state`` (in place) on this rank alone;
        returns the per-rank part."""
        self.check_compatible(info)
        if info.record_error is not None:
            raise CheckpointIntegrityError(info.record_error)
        if info.files is not None:
            self.verify_remote(info, sorted(info.files))
        try:
            return self._read(info, state)
        except (Exception, CheckpointException) as err:  # CheckpointException is a BaseException
            raise_if_interrupted(err)
            if isinstance(err, CheckpointError):
                raise
            raise CheckpointError(f"cannot load checkpoint {self.storage.folder_url(info.name)}: "
                                  f"{describe_error(err)}") from None

    def load_latest(self, state: dict[str, Any] | Callable[[CheckpointInfo], dict[str, Any]], *,
                    prefer: Preference = "newest") -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """Load the newest (or the best) loadable checkpoint into the state (in place); returns it with the
        per-rank part, None when there is none.

        ``state``: the structure to load into, or a function giving it for a checkpoint (checkpoints differ:
        the step-0 one has no optimizer state). All ranks load the same checkpoint; one that fails its
        integrity check or cannot be read on any rank is reported and the next one is tried.
        """
        template_for = state if callable(state) else (lambda info: state)
        return self.load(self._verify, lambda info: self._read(info, template_for(info)), prefer=prefer)
