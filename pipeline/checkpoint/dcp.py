"""Checkpoints of DDP (and single-process) training with ``torch.distributed.checkpoint``.

A save writes, into a fresh ``step-N`` folder (see :mod:`pipeline.checkpoint.storage`):

1. ``meta.json`` (rank 0) and ``rank-RRRRR.pt`` per rank: the state that differs between ranks
   (RNG states, the carried hidden state of the rank's batch stripes), ``torch.save`` bytes;
2. the training state through DCP's fsspec writer: model, optimizer (FQN-keyed, via
   ``get_state_dict``), weight averages, step, data position, learning-rate scale. Replicated
   entries are written once; DCP writes ``.metadata`` last (temp file + rename), so a folder is
   committed exactly when ``.metadata`` exists.

Every rank takes part in every decision (which folder, whether a save succeeded, which checkpoint
to resume from), so ranks never disagree. Loading reads ``.metadata`` with a restricted unpickler
and the per-rank files with ``torch.load(weights_only=True)``: checkpoints may come from shared
object storage and are not trusted to run code.
"""

from __future__ import annotations

import io
import logging
import pickle
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint._traverse import set_element

from pipeline.checkpoint.storage import CheckpointError, CheckpointInfo, CheckpointStorage, retry_call
from pipeline.distributed import DistContext, all_reduce_sum, broadcast_object

__all__ = ["CheckpointMismatch", "DCPCheckpointer", "SafeFsspecReader", "SafeLoadPlanner", "agree_on_new_folder"]

log = logging.getLogger(__name__)

COMMIT_FILE = ".metadata"

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


def agree_on_new_folder(storage: CheckpointStorage, ctx: DistContext, step: int) -> str | None:
    """A never-used folder name for ``step``, chosen by rank 0 and the same on every rank (None: storage down)."""
    name = None
    if ctx.is_main:
        try:
            name = storage.new_folder(step)
        except CheckpointError as err:
            log.warning("%s", err)
    return broadcast_object(ctx, name)


class CheckpointMismatch(CheckpointError):
    """The checkpoint cannot belong to this job (e.g. another world size): a configuration error."""


def _rank_file(rank: int) -> str:
    return f"rank-{rank:05d}.pt"


class DCPCheckpointer:
    """Save / find / load checkpoints of a (possibly) distributed job through DCP + fsspec."""

    def __init__(self, storage: CheckpointStorage, ctx: DistContext) -> None:
        self.storage = storage
        self.ctx = ctx

    @classmethod
    def open(cls, url: str, ctx: DistContext, **storage_kwargs: Any) -> DCPCheckpointer:
        return cls(CheckpointStorage(url, commit_file=COMMIT_FILE, **storage_kwargs), ctx)

    def _all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank."""
        failures = all_reduce_sum(self.ctx, [0.0 if ok else 1.0])[0]
        return failures == 0

    def _attempt_save(self, name: str, state: dict[str, Any], per_rank: dict[str, Any], meta: dict[str, Any]) -> bool:
        ok = True
        try:
            buffer = io.BytesIO()
            torch.save(per_rank, buffer)
            self.storage.write_bytes(name, _rank_file(self.ctx.rank), buffer.getvalue())
            if self.ctx.is_main:
                self.storage.write_meta(name, meta)
        except Exception as err:
            log.warning("rank %d could not write its part of checkpoint %s: %s", self.ctx.rank, name, err)
            ok = False
        if not self._all_ok(ok):
            return False
        try:
            writer = FsspecWriter(self.storage.folder_url(name), sync_files=False, **self.storage.storage_options)
            dcp.save(state, storage_writer=writer)
        except (Exception, CheckpointException) as err:  # DCP raises on every rank if any rank's write failed
            # (CheckpointException derives from BaseException, hence named here)
            log.warning("rank %d: writing checkpoint %s failed: %s", self.ctx.rank, name, err)
            ok = False
        return self._all_ok(ok)

    def save(self, step: int, state: dict[str, Any], per_rank: dict[str, Any], meta: dict[str, Any]) -> str | None:
        """Commit checkpoint ``step``; retried with backoff into fresh folders. Returns the folder, or None.

        A save that still fails after every retry is logged and skipped (training goes on, and the
        previous committed checkpoint stays untouched); the caller tries again at the next interval.
        """
        policy = self.storage.retry
        delays = policy.delays() + [None]
        for attempt, delay in enumerate(delays, start=1):
            name = agree_on_new_folder(self.storage, self.ctx, step)
            if name is not None and self._attempt_save(name, state, per_rank, {**meta, "world_size": self.ctx.world_size}):
                return self.storage.folder_url(name)
            if delay is None:
                break
            if self.ctx.is_main:
                log.warning("checkpoint of step %d failed (attempt %d/%d); retrying in %.1fs",
                            step, attempt, policy.attempts, delay)
            import time

            time.sleep(delay)
        if self.ctx.is_main:
            log.warning(
                "could not save the checkpoint of step %d to %s after %d attempts; training continues and the "
                "last committed checkpoint is kept", step, self.storage.url, policy.attempts,
            )
        return None

    def _load(self, info: CheckpointInfo, state: dict[str, Any]) -> dict[str, Any]:
        saved_world = info.meta.get("world_size", self.ctx.world_size)
        if saved_world != self.ctx.world_size:
            raise CheckpointMismatch(
                f"checkpoint {self.storage.folder_url(info.name)} was written by {saved_world} ranks and this job has "
                f"{self.ctx.world_size}; resume with the same number of processes (nodes x nproc_per_node)"
            )
        url = self.storage.folder_url(info.name)
        try:
            reader = SafeFsspecReader(url, **self.storage.storage_options)
            dcp.load(state, storage_reader=reader, planner=SafeLoadPlanner())
        except (Exception, CheckpointException) as err:
            raise CheckpointError(f"cannot load checkpoint {url}: {err}") from None
        payload = retry_call(
            lambda: self.storage.read_bytes(info.name, _rank_file(self.ctx.rank)), "reading per-rank state",
            self.storage.retry,
        )
        return torch.load(io.BytesIO(payload), map_location="cpu", weights_only=True)

    def load_latest(self, state: dict[str, Any]) -> tuple[CheckpointInfo, dict[str, Any]] | None:
        """Load the newest committed checkpoint into ``state`` (in place); returns it with the per-rank part.

        All ranks load the same checkpoint (rank 0 chooses); one that fails to load on any rank is
        skipped with a warning in favour of the next older one.
        """
        candidates = self.storage.committed() if self.ctx.is_main else None
        candidates = broadcast_object(self.ctx, candidates)
        for info in reversed(candidates):
            try:
                per_rank = self._load(info, state)
                ok = True
            except CheckpointMismatch:
                raise
            except Exception as err:
                log.warning("rank %d could not load checkpoint %s (%s); trying an older one", self.ctx.rank,
                            self.storage.folder_url(info.name), err)
                per_rank, ok = {}, False
            if self._all_ok(ok):
                return info, per_rank
        return None
