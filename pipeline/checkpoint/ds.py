"""Checkpoints of DeepSpeed training: save locally, upload, write the commit record last.

A save (every rank takes part; the commit protocol is :mod:`pipeline.checkpoint.protocol`'s):

1. rank 0 picks a fresh, never-used ``step-N[.k]`` folder and broadcasts its name;
2. every rank writes its part into its own local temporary folder: ``engine.save_checkpoint`` (rank
   0 the module states ``mp_rank_00_model_states.pt``, each rank its ZeRO optimizer shard
   ``zero_pp_rank_R_mp_rank_00_optim_states.pt``) plus the trainer's ``torch.save`` files (rank 0
   ``trainer_state.pt`` with the weight averages and the progress; each rank ``rank-RRRRR.pt`` with
   its RNG and carried hidden state); each file is hashed (sha256) on local disk;
3. every rank uploads its files, each call retried with backoff (``checkpoint.retry_*``);
4. once every rank reports success, rank 0 writes ``COMMITTED`` with the metadata and every file's
   digest: only folders that have it are ever loaded. A save that fails is removed again and
   training goes on from the last committed checkpoint.

Resuming: rank 0 lists the committed folders and broadcasts them; every rank downloads the chosen
one's shared files and its own shards into a local temporary folder, checks each against its digest
and loads them. A checkpoint written by another number of ranks is refused with a clear error.
DeepSpeed's files are read with ``torch.load(weights_only=True)`` too
(:class:`SafeTorchCheckpointEngine` allow-lists the three plain data classes DeepSpeed pickles into
ZeRO shards): checkpoints may come from shared object storage and are not trusted to run code.
"""

from __future__ import annotations

import logging
import re
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.checkpoint.errors import CheckpointIntegrityError
from pipeline.checkpoint.integrity import FileDigest, digest_file, mismatch
from pipeline.checkpoint.lease import CheckpointLease
from pipeline.checkpoint.protocol import Checkpointer, Preference
from pipeline.checkpoint.storage import COMMIT_FILE, CheckpointInfo, CheckpointStorage, retry_call
from pipeline.distributed import DistContext

__all__ = ["COMMIT_FILE", "DeepSpeedCheckpointer", "rank_file", "safe_checkpoint_engine"]

log = logging.getLogger(__name__)

_OTHER_RANK_FILES = (re.compile(r"zero_pp_rank_(\d+)_"), re.compile(r"^rank-(\d+)\.pt$"))
_NOT_DOWNLOADED = (COMMIT_FILE, "meta.json", "SET_ASIDE.json")

T = TypeVar("T")


def rank_file(rank: int) -> str:
    """The trainer's per-rank state file (RNG, carried hidden state)."""
    return f"rank-{rank:05d}.pt"


def _needed_by(filename: str, rank: int) -> bool:
    """Whether ``rank`` needs this checkpoint file: shared files and its own shards, not other ranks'."""
    if filename in _NOT_DOWNLOADED:
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


class DeepSpeedCheckpointer(Checkpointer):
    """Save / find / load DeepSpeed checkpoints: local files uploaded to a ``COMMITTED``-marked folder."""

    engine = "deepspeed"
    save_attempts = 1  # each upload call is retried with backoff; the local save is not redone

    def __init__(self, storage: CheckpointStorage, ctx: DistContext, local_dir: str | Path | None = None, *,
                 max_failed_saves: int = 3, lease: CheckpointLease | None = None) -> None:
        super().__init__(storage, ctx, max_failed_saves=max_failed_saves, lease=lease)
        self.local_dir = None if local_dir is None else Path(local_dir)
        if self.local_dir is not None:
            self.local_dir.mkdir(parents=True, exist_ok=True)

    @classmethod
    def open(cls, url: str, ctx: DistContext, *, local_dir: str | Path | None = None, max_failed_saves: int = 3,
             lease: CheckpointLease | None = None, **storage_kwargs: Any) -> DeepSpeedCheckpointer:
        return cls(CheckpointStorage(url, **storage_kwargs), ctx, local_dir, max_failed_saves=max_failed_saves,
                   lease=lease)

    def _tempdir(self, what: str) -> tempfile.TemporaryDirectory:
        return tempfile.TemporaryDirectory(prefix=f"ds-{what}-rank{self.ctx.rank}-", dir=self.local_dir)

    # ------------------------------------------------------------------------- saving

    def _upload(self, name: str, folder: Path) -> dict[str, FileDigest]:
        fs, policy = self.storage.fs, self.storage.retry
        remote = self.storage.folder_path(name)
        retry_call(lambda: fs.makedirs(remote, exist_ok=True), f"creating checkpoint folder {name}", policy)
        digests = {}
        for path in sorted(p for p in folder.iterdir() if p.is_file()):
            digests[path.name] = digest_file(path)
            retry_call(lambda path=path: fs.put_file(str(path), f"{remote}/{path.name}"),
                       f"uploading {path.name} of checkpoint {name}", policy)
        return digests

    def _write(self, name: str, write_local: Callable[[Path, str], None]) -> dict[str, FileDigest]:
        with self._tempdir("save") as tmp:
            err: BaseException | None = None
            try:
                write_local(Path(tmp), name)
            except Exception as caught:
                log.warning("rank %d could not write checkpoint %s locally: %s", self.ctx.rank, name, caught)
                err = caught
            self.raise_if_any_failed(err)  # engine.save_checkpoint is collective: all go on, or none
            return self._upload(name, Path(tmp) / name)

    def save(self, step: int, write_local: Callable[[Path, str], None], meta: dict[str, Any], *,
             final: bool = False) -> str | None:
        """Commit checkpoint ``step``. Returns its URL, or None when it could not be saved (logged).

        ``write_local(folder, tag)`` is called on every rank (it may be collective, as
        ``engine.save_checkpoint`` is) and writes this rank's files under ``folder / tag``.
        """
        return self.save_files(step, lambda name: self._write(name, write_local), meta, final=final)

    # ------------------------------------------------------------------------- loading

    def _download(self, info: CheckpointInfo, folder: Path) -> None:
        """This rank's files of ``info`` into ``folder``, each checked against the commit record."""
        fs, policy = self.storage.fs, self.storage.retry
        remote = self.storage.folder_path(info.name)

        def ls() -> list[str]:
            fs.invalidate_cache(remote)
            return fs.ls(remote, detail=False)

        entries = {entry.rstrip("/").rsplit("/", 1)[-1]: entry for entry in retry_call(ls, f"listing {info.name}", policy)}
        folder.mkdir(parents=True, exist_ok=True)
        wanted = sorted(info.files) if info.files is not None else sorted(entries)
        for filename in wanted:
            if not _needed_by(filename, self.ctx.rank):
                continue
            if filename not in entries:
                raise CheckpointIntegrityError(f"{filename}: missing (it is listed in {COMMIT_FILE})")
            retry_call(lambda entry=entries[filename], filename=filename: fs.get_file(entry, str(folder / filename)),
                       f"downloading {filename} of checkpoint {info.name}", policy)
            if info.files is not None:
                problem = mismatch(filename, info.files[filename], digest_file(folder / filename))
                if problem:
                    raise CheckpointIntegrityError(problem)

    def load_latest(self, read_local: Callable[[Path, str], T], *, prefer: Preference = "newest"
                    ) -> tuple[CheckpointInfo, T] | None:
        """Load the newest (or best) loadable checkpoint; returns it with what ``read_local`` returned.

        ``read_local(folder, tag)`` runs on every rank with this rank's verified files under
        ``folder / tag``. All ranks load the same checkpoint (rank 0 chooses); one that fails its
        integrity check or cannot be read on any rank is reported in favour of the next one.
        """
        staging: dict[str, tempfile.TemporaryDirectory] = {}

        def verify(info: CheckpointInfo) -> None:
            tmp = staging[info.name] = self._tempdir("load")
            self._download(info, Path(tmp.name) / info.name)

        def read(info: CheckpointInfo) -> T:
            return read_local(Path(staging[info.name].name), info.name)

        try:
            return self.load(verify, read, prefer=prefer)
        finally:
            for tmp in staging.values():
                tmp.cleanup()
