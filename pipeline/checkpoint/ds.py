"""Checkpoints of DeepSpeed training: save locally, upload, write the commit marker last.

A save (every rank takes part):

1. rank 0 picks a fresh, never-used ``step-N[.k]`` folder (see :mod:`pipeline.checkpoint.storage`)
   and broadcasts its name;
2. every rank writes its part into its own local temporary folder: ``engine.save_checkpoint`` (rank
   0 the module states ``mp_rank_00_model_states.pt``, each rank its ZeRO optimizer shard
   ``zero_pp_rank_R_mp_rank_00_optim_states.pt``) plus the trainer's ``torch.save`` files (rank 0
   ``trainer_state.pt`` with the weight averages and the progress; each rank ``rank-RRRRR.pt`` with
   its RNG and carried hidden state);
3. rank 0 writes ``meta.json``, every rank uploads its files, each call retried with backoff
   (``checkpoint.retry_*``);
4. once every rank reports success (an all-reduce, i.e. a barrier), rank 0 writes ``COMMITTED``:
   only folders that have it are ever loaded. A save that fails leaves an uncommitted folder behind
   (never loaded, pruned later) and training goes on from the last committed checkpoint.

Resuming: rank 0 lists the committed folders and broadcasts them; every rank downloads the newest
one's shared files and its own shards into a local temporary folder and loads them. A checkpoint
written by another number of ranks is refused with a clear error. DeepSpeed's files are read with
``torch.load(weights_only=True)`` too (:class:`SafeTorchCheckpointEngine` allow-lists the three
plain data classes DeepSpeed pickles into ZeRO shards): checkpoints may come from shared object
storage and are not trusted to run code.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.checkpoint.dcp import CheckpointMismatch, agree_on_new_folder
from pipeline.checkpoint.storage import CheckpointInfo, CheckpointStorage, retry_call
from pipeline.distributed import DistContext, all_reduce_sum, broadcast_object

__all__ = ["COMMIT_FILE", "DeepSpeedCheckpointer", "rank_file", "safe_checkpoint_engine"]

log = logging.getLogger(__name__)

COMMIT_FILE = "COMMITTED"
_OTHER_RANK_FILES = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^rank-(\d+)\.pt$"))

T = TypeVar("T")


def rank_file(rank: int) -> str:
    """The trainer's per-rank state file (RNG, carried hidden state)."""
    return f"rank-{rank:05d}.pt"


def _needed_by(filename: str, rank: int) -> bool:
    """Whether ``rank`` needs this checkpoint file: shared files and its own shards, not other ranks'."""
    if filename in (COMMIT_FILE, "meta.json"):
        return False
    for pattern in _OTHER_RANK_FILES:
        match = pattern.search(filename)
        if match:
            return int(match.group(1)) == rank
    return True


def safe_checkpoint_engine(config_params: Any = None):
    """DeepSpeed's torch checkpoint engine, but loading with ``weights_only=True``.

    ZeRO shards pickle three plain data classes (the ZeRO stage enum, the loss scaler's settings and
    the fragment addresses of flat partitions); only those are allow-listed.
    """
    import torch
    from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address

    allowed = [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]

    class SafeTorchCheckpointEngine(TorchCheckpointEngine):
        def load(self, path: str, map_location=None):
            with torch.serialization.safe_globals(allowed):
                return torch.load(path, map_location=map_location, weights_only=True)

    return SafeTorchCheckpointEngine(config_params)


class DeepSpeedCheckpointer:
    """Save / find / load DeepSpeed checkpoints: local files uploaded to a ``COMMITTED``-marked folder."""

    def __init__(self, storage: CheckpointStorage, ctx: DistContext, local_dir: str | Path | None = None) -> None:
        self.storage = storage
        self.ctx = ctx
        self.local_dir = None if local_dir is None else Path(local_dir)
        if self.local_dir is not None:
            self.local_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, url: str, ctx: DistContext, *, local_dir: str | Path | None = None,
             **storage_kwargs: Any) -> DeepSpeedCheckpointer:
        return cls(CheckpointStorage(url, commit_file=COMMIT_FILE, **storage_kwargs), ctx, local_dir)

    def _all_ok(self, ok: bool) -> bool:
        """True on every rank iff ``ok`` on every rank (a collective: also a barrier)."""
        return all_reduce_sum(self.ctx, [0.0 if ok else 1.0])[0] == 0

    def _tempdir(self, what: str) -> tempfile.TemporaryDirectory:
        return tempfile.TemporaryDirectory(prefix=f"ds-{what}-rank{self.ctx.rank}-", dir=self.local_dir)

    # ------------------------------------------------------------------------- saving

    def _upload(self, name: str, folder: Path) -> None:
        fs, policy = self.storage.fs, self.storage.retry
        remote = self.storage.folder_path(name)
        retry_call(lambda: fs.makedirs(remote, exist_ok=True), f"creating checkpoint folder {name}", policy)
        files = sorted(p for p in folder.iterdir() if p.is_file())
        for path in files:
            retry_call(lambda path=path: fs.put_file(str(path), f"{remote}/{path.name}"),
                       f"uploading {path.name} of checkpoint {name}", policy)

    def _commit(self, name: str) -> None:
        retry_call(lambda: self.storage.write_bytes(name, COMMIT_FILE, b""), f"committing checkpoint {name}",
                   self.storage.retry)

    def save(self, step: int, write_local: Callable[[Path, str], None], meta: dict[str, Any]) -> str | None:
        """Commit checkpoint ``step``. Returns its URL, or None when it could not be saved (logged).

        ``write_local(folder, tag)`` is called on every rank (it may be collective, as
        ``engine.save_checkpoint`` is) and writes this rank's files under ``folder / tag``.
        """
        name = agree_on_new_folder(self.storage, self.ctx, step)
        if name is None:
            self._skipped(step, "its folder could not be chosen")
            return None
        with self._tempdir("save") as tmp:
            ok = True
            try:
                write_local(Path(tmp), name)
            except Exception as err:
                log.warning("rank %d could not write checkpoint %s locally: %s", self.ctx.rank, name, err)
                ok = False
            if not self._all_ok(ok):
                self._skipped(step, "writing it locally failed")
                return None
            try:
                if self.ctx.is_main:
                    def write_meta() -> None:
                        self.storage.fs.makedirs(self.storage.folder_path(name), exist_ok=True)
                        self.storage.write_meta(name, {**meta, "world_size": self.ctx.world_size})

                    retry_call(write_meta, f"writing meta of checkpoint {name}", self.storage.retry)
                self._upload(name, Path(tmp) / name)
            except Exception as err:
                log.warning("rank %d could not upload its part of checkpoint %s: %s", self.ctx.rank, name, err)
                ok = False
        if not self._all_ok(ok):  # every rank has uploaded (or failed) before the commit
            self._skipped(step, "uploading it failed")
            return None
        committed = False
        if self.ctx.is_main:
            try:
                self._commit(name)
                committed = True
            except Exception as err:
                log.warning("could not write %s of checkpoint %s: %s", COMMIT_FILE, name, err)
        if not broadcast_object(self.ctx, committed):
            self._skipped(step, f"its {COMMIT_FILE} marker could not be written")
            return None
        return self.storage.folder_url(name)

    def _skipped(self, step: int, why: str) -> None:
        if self.ctx.is_main:
            log.warning(
                "could not save the checkpoint of step %d to %s (%s); training continues and the last committed "
                "checkpoint is kept", step, self.storage.url, why,
            )

    # ------------------------------------------------------------------------- loading

    def _download(self, info: CheckpointInfo, folder: Path) -> None:
        fs, policy = self.storage.fs, self.storage.retry
        remote = self.storage.folder_path(info.name)

        def ls() -> list[str]:
            fs.invalidate_cache(remote)
            return fs.ls(remote, detail=False)

        entries = retry_call(ls, f"listing checkpoint {info.name}", policy)
        folder.mkdir(parents=True, exist_ok=True)
        for entry in entries:
            filename = entry.rstrip("/").rsplit("/", 1)[-1]
            if _needed_by(filename, self.ctx.rank):
                retry_call(lambda entry=entry, filename=filename: fs.get_file(entry, str(folder / filename)),
                           f"downloading {filename} of checkpoint {info.name}", policy)

    def _check_compatible(self, info: CheckpointInfo) -> None:
        saved_world = info.meta.get("world_size", self.ctx.world_size)
        if saved_world != self.ctx.world_size:
            raise CheckpointMismatch(
                f"checkpoint {self.storage.folder_url(info.name)} was written by {saved_world} ranks and this job has "
                f"{self.ctx.world_size}; resume with the same number of processes (nodes x nproc_per_node), or start "
                "a new run with another checkpoint.url"
            )
        engine = info.meta.get("engine", "deepspeed")
        if engine != "deepspeed":
            raise CheckpointMismatch(
                f"checkpoint {self.storage.folder_url(info.name)} was written by the {engine!r} engine; resume it with "
                f"train.engine {engine}"
            )

    def load_latest(self, read_local: Callable[[Path, str], T]) -> tuple[CheckpointInfo, T] | None:
        """Load the newest committed checkpoint; returns it with what ``read_local`` returned, or None.

        ``read_local(folder, tag)`` runs on every rank with this rank's files under ``folder / tag``. All
        ranks load the same checkpoint (rank 0 chooses); one that cannot be downloaded or read on any
        rank is skipped with a warning in favour of the next older one.
        """
        candidates = self.storage.committed() if self.ctx.is_main else None
        candidates = broadcast_object(self.ctx, candidates)
        for info in reversed(candidates):
            self._check_compatible(info)
            with self._tempdir("load") as tmp:
                ok = True
                try:
                    self._download(info, Path(tmp) / info.name)
                except Exception as err:
                    log.warning("rank %d could not download checkpoint %s (%s); trying an older one", self.ctx.rank,
                                self.storage.folder_url(info.name), err)
                    ok = False
                if not self._all_ok(ok):
                    continue
                result = None
                try:
                    result = read_local(Path(tmp), info.name)
                except CheckpointMismatch:
                    raise
                except Exception as err:
                    log.warning("rank %d could not load checkpoint %s (%s); trying an older one", self.ctx.rank,
                                self.storage.folder_url(info.name), err)
                    ok = False
                if self._all_ok(ok):
                    return info, result
        return None
