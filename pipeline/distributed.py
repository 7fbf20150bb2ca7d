"""Process-group set-up and teardown for ``torchrun`` jobs (NCCL on GPU, gloo on CPU).

A stage started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` in the
environment) joins the process group on start; a plain ``python -m pipeline`` process runs as a
world of one without any process group. :func:`shutdown` follows the order that keeps torch 2.13's
gloo backend from aborting at interpreter exit ("terminate called without an active exception"):
barrier, drop every object that holds the group, ``gc.collect()``, then ``destroy_process_group()``.

A worker started by ``torchrun`` watches its launcher (:func:`watch_launcher`): if the launcher is
killed, the worker stops within seconds instead of training on unsupervised, racing a restarted job
in the same checkpoint location.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
import signal
import threading
import time
from dataclasses import dataclass
from collections.abc import Callable
from typing import Any, TypeVar

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "FlatGradients",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "init_distributed",
    "on_main",
    "shutdown",
    "watch_launcher",
]

log = logging.getLogger(__name__)

T = TypeVar("T")


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")
    backend: str | None = None  # None: no process group (world of one)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Join the torchrun process group if the environment describes one; pick the device.

    device: ``auto`` (CUDA when available, else CPU), ``cpu`` or ``cuda``.
    """
    want_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if want_cuda and not torch.cuda.is_available():
        from pipeline.config import ConfigError

        raise ConfigError("train.device is cuda but this machine has no usable CUDA GPU (torch.cuda.is_available() is "
                          "False); use --train.device cpu or auto, or run on a GPU node")
    watch_launcher()
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if want_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if world_size <= 1:
        return DistContext(device=dev)
    backend = "nccl" if want_cuda else "gloo"
    if not dist.is_initialized():
        dist.init_process_group(
            backend=backend, timeout=datetime.timedelta(seconds=timeout_s),
            device_id=dev if want_cuda else None,
        )
    log.info("rank %d/%d joined the %s process group on %s", rank, world_size, backend, dev)
    return DistContext(rank=rank, world_size=world_size, local_rank=local_rank, device=dev, backend=backend)


_watchdog: threading.Thread | None = None


def watch_launcher(poll_s: float = 0.5, grace_s: float = 3.0) -> threading.Thread | None:
    """Under ``torchrun``: stop this worker when its launcher (the parent process) is gone.

    The worker first gets SIGTERM (the CLI turns it into a clean KILLED exit: MLflow runs closed,
    the checkpoint lease released); if it has not exited ``grace_s`` seconds later (e.g. blocked in a
    collective whose peer is gone), it exits at once. Returns the watching thread (None outside torchrun).
    """
    global _watchdog
    if "TORCHELASTIC_RUN_ID" not in os.environ or _watchdog is not None:
        return _watchdog
    launcher = os.getppid()
    if launcher <= 1:
        return None

    def watch() -> None:
        while os.getppid() == launcher:
            time.sleep(poll_s)
        log.error("the torchrun launcher (pid %d) is gone: stopping this worker (rank %s)", launcher,
                  os.environ.get("RANK", "?"))
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(grace_s)
        os._exit(128 + signal.SIGTERM)

    _watchdog = threading.Thread(target=watch, name="launcher-watchdog", daemon=True)
    _watchdog.start()
    return _watchdog


def barrier(ctx: DistContext) -> None:
    if ctx.distributed:
        if ctx.backend == "nccl":
            dist.barrier(device_ids=[ctx.local_rank])
        else:
            dist.barrier()


def all_reduce_sum(ctx: DistContext, values: list[float]) -> list[float]:
    """Sum a few floats over all ranks (float64, on the collective's device)."""
    if not ctx.distributed:
        return list(values)
    device = ctx.device if ctx.backend == "nccl" else torch.device("cpu")
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t.cpu().tolist()


class FlatGradients:
    """Data-parallel gradient averaging with one all-reduce per optimizer step (gloo's alternative to DDP).

    Every parameter's ``.grad`` is a view into one flat buffer, so backward accumulates straight into it
    (micro-batches included) and :meth:`all_reduce` averages all of them over the ranks in a single
    collective that also sums the step's few figures (loss, weights, tokens, metrics: float32 slots at the
    end of the buffer), instead of DDP's bucketed all-reduces during backward plus a second collective for
    the figures. On a CPU machine whose cores are all busy computing, overlapping the all-reduce with
    backward gains nothing and every extra collective costs a scheduler wake-up and a wait for the slower
    rank; with a sequence-level backward the gradients arrive at its end anyway.

    Semantics are DDP's: the weights start equal (broadcast from rank 0, as DDP does), the gradient is the
    mean over ranks, and every trainable parameter must get a gradient in every step (DDP without
    ``find_unused_parameters``; an unused one would get a zero gradient here). Models with buffers need
    DDP (it broadcasts them before every forward). The figures are summed in float32.
    """

    def __init__(self, ctx: DistContext, params, *, max_values: int = 32) -> None:
        self.ctx = ctx
        self.params = [p for p in params if p.requires_grad]
        if not self.params:
            raise ValueError("no trainable parameters")
        first = self.params[0]
        if any(p.dtype != first.dtype or p.device != first.device for p in self.params):
            raise ValueError("flat gradient reduction needs every trainable parameter in one dtype on one device")
        self.numel = sum(p.numel() for p in self.params)
        self.max_values = max_values
        self.buffer = torch.zeros(self.numel + max_values, dtype=first.dtype, device=first.device)
        self.views: list[torch.Tensor] = []
        offset = 0
        for p in self.params:
            self.views.append(self.buffer[offset : offset + p.numel()].view_as(p))
            offset += p.numel()
        if ctx.distributed:  # identical starting weights on every rank (DDP does the same broadcast)
            with torch.no_grad():
                flat = torch.cat([p.detach().reshape(-1) for p in self.params])
                dist.broadcast(flat, src=0)
                torch._foreach_copy_([p.detach() for p in self.params],
                                     [v.view_as(p) for v, p in zip(flat.split([p.numel() for p in self.params]),
                                                                   self.params)])
        # No gradient is attached before the first step's zero_(): until then every .grad stays None, as after
        # optimizer.zero_grad(set_to_none=True) (torch.distributed.checkpoint initialises an optimizer's state
        # on load only when no parameter has a gradient).

    def zero_(self) -> None:
        """Zero every gradient, making each ``.grad`` (again) its view into the buffer (at a step's start)."""
        self.buffer.zero_()
        for p, view in zip(self.params, self.views):
            if p.grad is not view:
                p.grad = view

    def all_reduce(self, values: list[float]) -> list[float]:
        """Average the gradients over the ranks and return ``values`` summed over the ranks (one collective)."""
        for p, view in zip(self.params, self.views):
            if p.grad is not view:  # replaced by something outside backward: take its values back into the buffer
                with torch.no_grad():
                    view.copy_(p.grad if p.grad is not None else torch.zeros_like(view))
                p.grad = view
        if not self.ctx.distributed:
            return list(values)
        if len(values) > self.max_values:  # more figures than slots: a second (float64) collective for them
            dist.all_reduce(self.buffer[: self.numel], op=dist.ReduceOp.SUM)
            self.buffer[: self.numel].div_(self.ctx.world_size)
            return all_reduce_sum(self.ctx, values)
        end = self.numel + len(values)
        self.buffer[self.numel : end].copy_(torch.tensor(values, dtype=torch.float64))
        dist.all_reduce(self.buffer[:end], op=dist.ReduceOp.SUM)
        self.buffer[: self.numel].div_(self.ctx.world_size)
        return self.buffer[self.numel : end].tolist()


def gather_objects(ctx: DistContext, obj: Any) -> list[Any]:
    """Every rank's ``obj``, in rank order, on every rank."""
    if not ctx.distributed:
        return [obj]
    out: list[Any] = [None] * ctx.world_size
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(ctx: DistContext, obj: Any, src: int = 0) -> Any:
    """Rank ``src``'s ``obj`` on every rank (so that all ranks take the same decision)."""
    if not ctx.distributed:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src, device=ctx.device if ctx.backend == "nccl" else None)
    return box[0]


def on_main(ctx: DistContext, fn: Callable[[], T]) -> T:
    """``fn()`` on rank 0 and its result on every rank (a collective). If it raises, rank 0 raises the error
    and every other rank a :class:`~pipeline.errors.PeerFailure` with its message and exit code, so that a
    failure on rank 0 (storage, work dir) never leaves the others waiting in a collective."""
    from pipeline.errors import PeerFailure, PipelineError

    result, failure, error = None, None, None
    if ctx.is_main:
        try:
            result = fn()
        except Exception as err:
            text = str(err) if isinstance(err, PipelineError) else f"{type(err).__name__}: {err}"
            failure, error = (text, getattr(err, "exit_code", 1)), err
    result, failure = broadcast_object(ctx, (result, failure))
    if failure is not None:
        if error is not None:
            raise error
        raise PeerFailure(*failure)
    return result


def shutdown(ctx: DistContext, *, failed: bool = False) -> None:
    """Leave the process group cleanly; call it after dropping every object holding the group (DDP).

    After a failure the barrier is skipped (peers may be stuck in a collective; torchrun ends them).
    """
    if not ctx.distributed or not dist.is_initialized():
        return
    try:
        if not failed:
            barrier(ctx)
    finally:
        gc.collect()  # collect DDP reducers etc. still referencing the group before destroying it
        dist.destroy_process_group()
