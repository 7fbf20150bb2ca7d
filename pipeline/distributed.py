"""Process-group set-up and teardown for ``torchrun`` jobs (NCCL on GPU, gloo on CPU).

A stage started by ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR`` in the
environment) joins the process group on start; a plain ``python -m pipeline`` process runs as a
world of one without any process group. :func:`shutdown` follows the order that keeps torch 2.13's
gloo backend from aborting at interpreter exit ("terminate called without an active exception"):
barrier, drop every object that holds the group, ``gc.collect()``, then ``destroy_process_group()``.
"""

from __future__ import annotations

import datetime
import gc
import logging
import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

__all__ = [
    "DistContext",
    "all_reduce_sum",
    "barrier",
    "broadcast_object",
    "gather_objects",
    "init_distributed",
    "shutdown",
]

log = logging.getLogger(__name__)


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
        raise RuntimeError("device 'cuda' was requested but CUDA is not available; use --train.device cpu")
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
