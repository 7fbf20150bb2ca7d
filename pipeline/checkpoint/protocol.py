"""The commit protocol both checkpoint engines follow (DCP in :mod:`.dcp`, DeepSpeed in :mod:`.ds`).

Saving, on every rank (collectives keep the ranks' decisions identical):

1. rank 0 checks that the job still owns the location's lease and picks a fresh ``step-N[.k]`` folder;
2. every rank writes its files (the engine's hook), hashing them as they are written;
3. once every rank has succeeded, rank 0 writes ``COMMITTED``: the metadata and every file's
   sha256. A checkpoint without it is never loaded;
4. a failed attempt's folder is removed at once; transient failures (network) are retried with
   backoff into a fresh folder, permanent ones (full, read-only, access denied) are not. After
   ``max_failed_saves`` failed saves in a row, or when the run's last save fails, the run stops with
   :class:`~pipeline.checkpoint.errors.CheckpointSaveFailed`.

A save may run on a background thread (:mod:`.async_save`: the state copied to CPU memory at the step,
training going on meanwhile): the same steps, its collectives on a process group of its own
(``save_group``); the step is committed only once ``COMMITTED`` is written, as for a synchronous save.

Loading: candidates are the committed folders that are not set aside, newest first (resume) or
best validation loss first (divergence recovery, thesis §4.4). For each, every file is checked against
its recorded digest before it is used, then the engine reads it. A checkpoint that fails is
reported in one line (file and reason) and the next candidate is tried; one that failed its
integrity check is set aside (``SET_ASIDE.json``), never deleted. When checkpoints exist but none can
be loaded, :class:`~pipeline.checkpoint.errors.UnreadableCheckpoints` lists each with its reason:
training never silently starts over.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any, Literal, TypeVar

import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException

from pipeline.checkpoint.errors import (
    CheckpointError,
    CheckpointIntegrityError,
    CheckpointLeaseLost,
    CheckpointMismatch,
    CheckpointSaveFailed,
    Rejection,
    UnreadableCheckpoints,
    describe_error,
    is_transient,
    raise_if_interrupted,
)
from pipeline.checkpoint.integrity import FileDigest, digest_stream, merge_digests, mismatch
from pipeline.checkpoint.lease import CheckpointLease
from pipeline.checkpoint.storage import CheckpointInfo, CheckpointStorage, retry_call
from pipeline.distributed import DistContext, broadcast_object, gather_objects, on_main

__all__ = ["Checkpointer", "Preference", "SaveAborted"]

log = logging.getLogger(__name__)

T = TypeVar("T")
Preference = Literal["newest", "best"]


class SaveAborted(CheckpointError):
    """Raised on every rank when any rank failed its part of a save (carries the first failure's reason)."""

    def __init__(self, reason: str, transient: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.transient = transient


def _failure(err: BaseException | None) -> tuple[str, str] | None:
    """(one-line reason, kind) of a failed step on one rank; kind: integrity | transient | permanent."""
    if err is None:
        return None
    if isinstance(err, SaveAborted):
        return err.reason, "transient" if err.transient else "permanent"
    if isinstance(err, CheckpointIntegrityError):
        return str(err), "integrity"
    return describe_error(err), "transient" if is_transient(err) else "permanent"


class Checkpointer:
    """Save / find / load the checkpoints of a (possibly) distributed job: the engine-independent part.

    Engines implement the file-level hooks (see :class:`~pipeline.checkpoint.dcp.DCPCheckpointer`).
    ``lease``: the location's lease held by rank 0 (None: not checked, e.g. in library use).
    ``save_group``: the process group the collectives of a save run on (choosing the folder, agreeing
    on success, DCP's planning); None: the default group. A save on a background thread
    (:class:`~pipeline.checkpoint.async_save.BackgroundSaver`) needs a group of its own, or its
    collectives would interleave with the training thread's on the default group. Loading always
    uses the default group (it runs on the training thread).
    """

    engine: str = ""
    save_attempts: int | None = None  # None: checkpoint.retry_attempts whole-save attempts

    def __init__(self, storage: CheckpointStorage, ctx: DistContext, *, max_failed_saves: int = 3,
                 lease: CheckpointLease | None = None) -> None:
        self.storage = storage
        self.ctx = ctx
        self.max_failed_saves = max_failed_saves
        self.lease = lease
        self.failed_saves = 0  # in a row
        self.save_group: dist.ProcessGroup | None = None

    # ------------------------------------------------------------------------- collectives

    def _gather_on_save_group(self, obj: Any) -> list[Any]:
        """Every rank's ``obj`` in rank order (a collective on ``save_group``)."""
        if self.save_group is None or not self.ctx.distributed:
            return gather_objects(self.ctx, obj)
        out: list[Any] = [None] * self.ctx.world_size
        dist.all_gather_object(out, obj, group=self.save_group)
        return out

    def _broadcast_on_save_group(self, obj: Any) -> Any:
        """Rank 0's ``obj`` on every rank (a collective on ``save_group``)."""
        if self.save_group is None or not self.ctx.distributed:
            return broadcast_object(self.ctx, obj)
        box = [obj]
        dist.broadcast_object_list(box, src=0, group=self.save_group)  # a gloo group: objects travel on the CPU
        return box[0]

    def raise_if_any_failed(self, err: BaseException | None) -> None:
        """Collective (on ``save_group``): raise :class:`SaveAborted` on every rank with the first rank's
        failure, if any."""
        failures = [f for f in self._gather_on_save_group(_failure(err)) if f is not None]
        if failures:
            reason, kind = failures[0]
            raise SaveAborted(reason, transient=kind == "transient")

    def _agree_on_folder(self, step: int) -> str | None:
        """A never-used folder for ``step``, chosen by rank 0 and the same on every rank (None: storage down).

        Raises :class:`CheckpointLeaseLost` on every rank once another job owns the location.
        """
        name, lost = None, None
        if self.ctx.is_main:
            if self.lease is not None:
                try:
                    self.lease.check()
                except CheckpointLeaseLost as err:
                    lost = str(err)
            if lost is None:
                try:
                    name = self.storage.new_folder(step)
                except CheckpointError as err:
                    log.warning("%s", err)
        name, lost = self._broadcast_on_save_group((name, lost))
        if lost is not None:
            raise CheckpointLeaseLost(lost)
        return name

    # ------------------------------------------------------------------------- saving

    def _commit(self, name: str, write: Callable[[str], Mapping[str, FileDigest]], meta: Mapping[str, Any]) -> None:
        """One attempt: every rank writes its files, then rank 0 writes the commit record (raises on failure)."""
        err: BaseException | None = None
        digests: Mapping[str, FileDigest] = {}
        try:
            digests = write(name)
        except (Exception, CheckpointException) as caught:  # CheckpointException is a BaseException
            raise_if_interrupted(caught)
            err = caught
        everyone = self._gather_on_save_group((_failure(err), dict(digests)))
        failures = [f for f, _ in everyone if f is not None]
        if not failures and self.ctx.is_main:
            try:
                files = merge_digests(d for _, d in everyone)
                self.storage.write_commit(name, {**meta, "world_size": self.ctx.world_size, "engine": self.engine},
                                          files)
            except Exception as caught:
                failures = [_failure(caught)]
        failures = self._broadcast_on_save_group(failures)
        if failures:
            reason, kind = failures[0]
            raise SaveAborted(reason, transient=kind == "transient")

    def save_files(self, step: int, write: Callable[[str], Mapping[str, FileDigest]], meta: Mapping[str, Any], *,
                   final: bool = False) -> str | None:
        """Commit checkpoint ``step`` (collective). ``write(folder_name)`` writes this rank's files and returns
        their digests. Returns the folder's URL, or None when the save failed and training may go on.

        Raises :class:`CheckpointSaveFailed` after ``max_failed_saves`` failed saves in a row, or when the
        run's ``final`` save fails.
        """
        attempts = self.save_attempts or self.storage.retry.attempts
        delays = (self.storage.retry.delays() + [0.0] * attempts)[: attempts - 1] + [None]
        reason, transient = "", True
        for attempt, delay in enumerate(delays, start=1):
            name = self._agree_on_folder(step)
            if name is None:
                reason, transient = "its folder could not be chosen (the storage cannot be listed)", True
            else:
                try:
                    self._commit(name, write, meta)
                    self.failed_saves = 0
                    return self.storage.folder_url(name)
                except SaveAborted as err:
                    reason, transient = err.reason, err.transient
                if self.ctx.is_main:
                    self.storage.remove_folder(name)  # every rank has stopped writing (the commit gathered)
            if not transient or delay is None:
                break
            if self.ctx.is_main:
                log.warning("checkpoint of step %d failed (attempt %d/%d: %s); retrying in %.1fs", step, attempt,
                            attempts, reason, delay)
            time.sleep(delay)
        self.failed_saves += 1
        if final or self.failed_saves >= self.max_failed_saves:
            what = (f"the final checkpoint (step {step})" if final else
                    f"{self.failed_saves} checkpoints in a row (checkpoint.max_failed_saves {self.max_failed_saves})")
            raise CheckpointSaveFailed(
                f"could not save {what} to {self.storage.url}: {reason}; "
                + ("free space or make the location writable, or choose another --checkpoint.url"
                   if not transient else "the storage is unreachable; check its endpoint and credentials")
                + " (the last committed checkpoint is kept; training resumes from it)",
                permanent=not transient,
            )
        if self.ctx.is_main:
            log.warning(
                "could not save the checkpoint of step %d to %s (%s); training continues and the last committed "
                "checkpoint is kept (%d failed save(s) in a row; the run stops at checkpoint.max_failed_saves=%d)",
                step, self.storage.url, reason, self.failed_saves, self.max_failed_saves,
            )
        return None

    # ------------------------------------------------------------------------- loading

    def check_compatible(self, info: CheckpointInfo) -> None:
        """Refuse a checkpoint written by another number of ranks or another engine (a configuration error)."""
        url = self.storage.folder_url(info.name)
        saved_world = info.meta.get("world_size", self.ctx.world_size)
        if saved_world != self.ctx.world_size:
            raise CheckpointMismatch(
                f"checkpoint {url} was written by {saved_world} ranks and this job has {self.ctx.world_size}; resume "
                "with the same number of processes (nodes x nproc_per_node), or start a new run with another "
                "--checkpoint.url"
            )
        engine = info.meta.get("engine", self.engine)
        if engine != self.engine:
            raise CheckpointMismatch(
                f"checkpoint {url} was written by the {engine!r} engine; resume it with --train.engine {engine}, or "
                "start a new run with another --checkpoint.url"
            )

    def verify_remote(self, info: CheckpointInfo, filenames: Sequence[str]) -> None:
        """Hash ``filenames`` of ``info`` in storage and compare them with the commit record."""
        assert info.files is not None
        for filename in filenames:
            expected = info.files[filename]
            path = self.storage.file_path(info.name, filename)

            def read(path: str = path) -> FileDigest:
                with self.storage.fs.open(path, "rb") as f:
                    return digest_stream(f)

            try:
                found = retry_call(read, f"verifying {info.name}/{filename}", self.storage.retry)
            except FileNotFoundError:
                raise CheckpointIntegrityError(f"{filename}: missing (it is listed in {self.storage.commit_file})") from None
            problem = mismatch(filename, expected, found)
            if problem:
                raise CheckpointIntegrityError(problem)

    def my_share(self, filenames: Sequence[str]) -> list[str]:
        """This rank's share of ``filenames`` (round robin): the ranks verify a checkpoint together."""
        return sorted(filenames)[self.ctx.rank :: self.ctx.world_size]

    def _candidates(self, prefer: Preference) -> tuple[list[CheckpointInfo], list[CheckpointInfo]]:
        """(candidates in the order to try, every folder), decided by rank 0 and the same on every rank."""
        infos = on_main(self.ctx, self.storage.list)
        live = self.storage.committed(infos) if self.ctx.is_main else [i for i in infos if i.live]
        if prefer == "newest":
            return list(reversed(live)), infos
        return sorted(live, key=CheckpointInfo.best_first), infos

    def _on_every_rank(self, fn: Callable[[], T]) -> tuple[T | None, list[tuple[str, str]]]:
        """Run ``fn`` on every rank; returns its result here and every rank's failure (a collective)."""
        err: BaseException | None = None
        result = None
        try:
            result = fn()
        except CheckpointMismatch:
            raise
        except (Exception, CheckpointException) as caught:  # CheckpointException is a BaseException
            raise_if_interrupted(caught)
            err = caught
        return result, [f for f in gather_objects(self.ctx, _failure(err)) if f is not None]

    def load(self, verify: Callable[[CheckpointInfo], None], read: Callable[[CheckpointInfo], T], *,
             prefer: Preference = "newest") -> tuple[CheckpointInfo, T] | None:
        """Load the first candidate whose files pass ``verify(info)`` and ``read(info)`` on every rank.

        ``verify`` runs on each rank on its own (it checks this rank's share of the files against the commit
        record, raising :class:`CheckpointIntegrityError`); ``read`` may be collective: every rank calls it
        only once every rank has verified. Returns the checkpoint with what ``read`` returned, or None when
        there is no checkpoint at all. Raises :class:`UnreadableCheckpoints` when checkpoints exist but none
        can be loaded, or a retriable :class:`CheckpointError` when the storage failed while reading them.
        """
        candidates, infos = self._candidates(prefer)
        rejections: list[Rejection] = []
        for index, info in enumerate(candidates):
            self.check_compatible(info)
            url = self.storage.folder_url(info.name)

            def checked(info: CheckpointInfo = info) -> None:
                if info.record_error is not None:
                    raise CheckpointIntegrityError(info.record_error)
                verify(info)

            _, failures = self._on_every_rank(checked)
            if not failures:
                result, failures = self._on_every_rank(lambda info=info: read(info))
                if not failures:
                    if info.files is None and self.ctx.is_main:
                        log.warning("checkpoint %s has no integrity record (written by an earlier version): loaded "
                                    "unverified", url)
                    return info, result
            integrity = [f for f in failures if f[1] == "integrity"]
            reason, kind = (integrity or failures)[0]
            rejections.append(Rejection(url, reason, transient=kind == "transient"))
            if self.ctx.is_main:
                after = candidates[index + 1].name if index + 1 < len(candidates) else None
                log.warning("cannot load checkpoint %s: %s; %s", url, reason,
                            f"falling back to {after}" if after else "no other checkpoint to fall back to")
                if kind == "integrity":
                    self.storage.set_aside(info.name, "corrupt", reason)
        blocking = rejections + [
            Rejection(self.storage.folder_url(i.name), f"set aside earlier: {i.set_aside.get('reason', '?')}")
            for i in infos if i.set_aside_kind == "corrupt"
        ]
        if not blocking:
            return None
        if any(r.transient for r in rejections):
            raise CheckpointError(
                "could not read the checkpoints under " + self.storage.url + " (the storage failed): "
                + "; ".join(f"{r.url}: {r.reason}" for r in rejections)
                + "; check the storage endpoint and credentials, then run again (nothing was deleted)"
            )
        raise UnreadableCheckpoints(self.storage.url, blocking)

    # ------------------------------------------------------------------------- setting aside

    def set_aside_all(self, reason: str) -> list[str]:
        """``checkpoint.on_unreadable restart``: set aside every checkpoint (collective); returns their URLs."""
        def set_aside_all() -> list[str]:
            infos = [i for i in self.storage.list() if i.committed and i.set_aside_kind in (None, "corrupt")]
            for info in infos:
                old = (info.set_aside or {}).get("reason")
                self.storage.set_aside(info.name, "restarted", reason + (f" (it had failed: {old})" if old else ""))
            return [self.storage.folder_url(i.name) for i in infos]

        return on_main(self.ctx, set_aside_all)

    def abandon_newer_than(self, info: CheckpointInfo) -> list[str]:
        """After divergence recovery went back to ``info``: set aside the newer checkpoints of the diverged
        trajectory, so that a restart never resumes from them (collective); returns their URLs."""
        def abandon() -> list[str]:
            newer = [i for i in self.storage.committed() if i.order > info.order]
            for other in newer:
                self.storage.set_aside(other.name, "abandoned",
                                       f"divergence recovery went back to {info.name} (best reported validation loss)")
            return [self.storage.folder_url(i.name) for i in newer]

        return on_main(self.ctx, abandon)

    def prune(self, keep_last: int, keep_best: bool) -> None:
        """Rank 0 deletes old checkpoints (never fails training)."""
        if self.ctx.is_main:
            try:
                self.storage.prune(keep_last, keep_best)
            except Exception as err:  # housekeeping must never end training; the next save prunes again
                log.warning("could not prune old checkpoints under %s: %s", self.storage.url, describe_error(err))
