"""Checkpoint saves that run in the background while training goes on (``checkpoint.async_save``).

:meth:`BackgroundSaver.save`, on the training thread at a step boundary:

1. waits for the save in flight, if any (at most one at a time), and raises here what it raised;
2. copies the state into CPU memory (:class:`~pipeline.checkpoint.staging.CpuStager`): from then on
   training may mutate the live parameters, optimizer state and averages;
3. starts a thread that runs the whole synchronous save on the copy
   (:meth:`~pipeline.checkpoint.dcp.DCPCheckpointer.save`: fresh ``step-N`` folder, every file hashed
   while written, ``COMMITTED`` last, failed attempts removed and retried with the storage's retry
   policy) and, only once it has committed, prunes the old checkpoints.

The commit protocol is unchanged: a process killed mid-save leaves a folder without ``COMMITTED``, which
is never loaded. The outcome of a background save reaches the training thread at the next
:meth:`BackgroundSaver.wait` (the next save, a restore, the end of training): a save that failed and may
be skipped has been logged and counted (``failed_saves``) exactly as a synchronous one; one that must stop
the run (``checkpoint.max_failed_saves`` failures in a row, a lost lease) raises there the error a
synchronous save would have raised, with its exit code.

Under ``torchrun`` every rank runs its own background save; their collectives (choosing the folder,
DCP's planning and metadata gather, agreeing on success) run on a gloo process group created for the
saver, never on the default group the training thread all-reduces on: two threads issuing collectives
on one group would interleave them differently on different ranks.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from typing import Any

import torch.distributed as dist

from pipeline.checkpoint.dcp import DCPCheckpointer
from pipeline.checkpoint.errors import describe_error
from pipeline.checkpoint.staging import CpuStager
from pipeline.distributed import DistContext

__all__ = ["BackgroundSaver"]

log = logging.getLogger(__name__)


class BackgroundSaver:
    """Runs DCP checkpoint saves on a background thread, one at a time, from a CPU copy of the state.

    Create it on every rank at the same point (under ``torchrun`` it creates its process group, a
    collective). ``stall_s``: how long the last :meth:`save` blocked its caller (waiting for the previous
    save + copying the state); ``save_s``: how long the last finished background save took, from its start
    until it had committed and pruned (None before one finished).
    """

    def __init__(self, ctx: DistContext) -> None:
        self.ctx = ctx
        # A process group of its own for the background collectives (gloo: the copy lives in CPU memory).
        self.group: dist.ProcessGroup | None = dist.new_group(backend="gloo") if ctx.distributed else None
        self.stager = CpuStager(pin_memory=ctx.device.type == "cuda")
        self._future: Future[str | None] | None = None
        self._step: int | None = None
        self.stall_s = 0.0
        self.save_s: float | None = None

    @property
    def in_flight(self) -> bool:
        """Whether a save has been started and its outcome not yet collected by :meth:`wait`."""
        return self._future is not None

    def save(self, checkpointer: DCPCheckpointer, step: int, state: dict[str, Any], per_rank: dict[str, Any],
             meta: dict[str, Any], *, keep_last: int, keep_best: bool, final: bool = False) -> None:
        """Start committing checkpoint ``step`` in the background (collective: every rank calls it).

        Waits for the previous save first (raising what it raised), copies ``state`` / ``per_rank`` /
        ``meta`` (taken at this step boundary) and returns; the thread then runs ``checkpointer.save`` on
        the copy and, once it has committed, ``checkpointer.prune(keep_last, keep_best)``. The
        checkpointer's collectives run on this saver's process group from now on (``save_group``).
        ``final``: the run's last save, which must succeed (its failure raises at :meth:`wait`).
        """
        started = time.perf_counter()
        self.wait()  # one save in flight at most; it also frees the staging buffers for this copy
        staged_state, staged_per_rank, staged_meta = self.stager.stage((state, per_rank, meta))
        checkpointer.save_group = self.group
        future: Future[str | None] = Future()
        future.set_running_or_notify_cancel()

        def run() -> None:
            began = time.perf_counter()
            try:
                saved = checkpointer.save(step, staged_state, staged_per_rank, staged_meta, final=final)
                if saved is not None:  # never prune to recover from a failure: only after a new commit
                    checkpointer.prune(keep_last, keep_best)
            except BaseException as err:  # raised on the training thread at wait(); noticed now, as it happens
                if self.ctx.is_main:
                    log.warning("the background save of the checkpoint of step %d failed: %s; the run stops at its "
                                "next checkpoint", step, describe_error(err))
                self.save_s = time.perf_counter() - began
                future.set_exception(err)
            else:
                self.save_s = time.perf_counter() - began
                future.set_result(saved)

        # A daemon: a process that ends without waiting (killed, crashed) leaves an uncommitted folder, never
        # loaded; every orderly way out of training waits for the save first.
        threading.Thread(target=run, name=f"checkpoint-save-step-{step}", daemon=True).start()
        self._future, self._step = future, step
        self.stall_s = time.perf_counter() - started

    def wait(self) -> str | None:
        """Block until the save in flight (if any) has finished; returns its folder URL, None when it failed
        and training may go on (logged) or when none was in flight.

        Raises, on the calling thread, what the save raised (e.g.
        :class:`~pipeline.checkpoint.errors.CheckpointSaveFailed`). Interruptible: a stop request
        (``SystemExit`` from SIGTERM) leaves the save in flight, to be waited for again.
        """
        future = self._future
        if future is None:
            return None
        try:
            return future.result()
        finally:
            if future.done():
                self._future = None

    def close(self) -> None:
        """Wait for the save in flight and drop the staging buffers. On teardown another error may be on its
        way out: a failure of the background save is logged here, not raised (:meth:`wait` raises it)."""
        step = self._step
        try:
            self.wait()
        except Exception as err:
            if self.ctx.is_main:
                log.error("the checkpoint of step %s was not saved: %s", step, describe_error(err))
        self.stager.release()
