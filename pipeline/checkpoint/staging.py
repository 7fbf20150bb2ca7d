"""A CPU copy of a checkpoint's state, taken at a step boundary, for saves that run in the background.

A background save writes its state while training goes on, and training mutates the live tensors in
place (the optimizer step updates the parameters and moments, the averager its averages), so a
background save must write a copy taken at the step boundary: every tensor copied, every other value
deep-copied (data position, RNG state, the last report).

Allocating a fresh copy of a large state costs several times the copy itself: the new pages fault
in one by one (on a 2-core machine, 964 MB took 0.9-2.2 s to clone and 0.13 s to copy into memory
touched before). So a :class:`CpuStager` keeps the buffers of its last copy and copies the next state
into them when the layout is the same (same entries, shapes and dtypes; any entry that changed gets a
fresh buffer). Its caller must therefore not stage again while the previous copy is still being
written: :class:`~pipeline.checkpoint.async_save.BackgroundSaver` waits for the save in flight first.

The copies run on one intra-op thread. A copy is memory-bound: one thread gets most of the bandwidth
(0.09 s vs 0.07 s with two for 964 MB on an idle 2-core machine), while several OpenMP threads each
wait, at the end of every tensor's copy, for the slowest of them: with one core taken by another
process that made the copy of a model's few hundred tensors 3-5x slower than with one thread.
"""

from __future__ import annotations

import copy
from collections.abc import Hashable, Iterator, Mapping
from contextlib import contextmanager
from typing import Any, TypeVar

import torch

__all__ = ["CpuStager"]

T = TypeVar("T")
_Path = tuple[Hashable, ...]


class CpuStager:
    """Copies nested state (dicts, lists, tuples of tensors and plain values) into CPU memory it reuses.

    ``pin_memory``: allocate page-locked buffers for tensors on a GPU, so that their device-to-host
    copies run asynchronously (all of them are waited for before :meth:`stage` returns).
    """

    def __init__(self, *, pin_memory: bool = False) -> None:
        self.pin_memory = pin_memory
        self._buffers: dict[_Path, torch.Tensor] = {}

    @property
    def nbytes(self) -> int:
        """Bytes of CPU memory held by the buffers of the last copy."""
        return sum(t.numel() * t.element_size() for t in self._buffers.values())

    def release(self) -> None:
        """Drop the buffers (the next :meth:`stage` allocates afresh)."""
        self._buffers = {}

    def stage(self, state: T) -> T:
        """A copy of ``state`` that shares nothing mutable with it: tensors copied into CPU buffers (kept for
        the next call), mappings rebuilt as dicts, lists and tuples rebuilt, other values deep-copied.

        Overwrites the buffers of the previous copy: that copy must no longer be in use.
        """
        buffers: dict[_Path, torch.Tensor] = {}
        devices: set[torch.device] = set()
        with _one_intra_op_thread():
            staged = self._copy(state, (), buffers, devices)
        for device in devices:  # the asynchronous device-to-host copies into pinned memory
            torch.cuda.synchronize(device)
        self._buffers = buffers
        return staged

    def _copy(self, node: Any, path: _Path, buffers: dict[_Path, torch.Tensor], devices: set[torch.device]) -> Any:
        if isinstance(node, torch.Tensor):
            return self._copy_tensor(node, path, buffers, devices)
        if isinstance(node, Mapping):
            return {key: self._copy(value, (*path, key), buffers, devices) for key, value in node.items()}
        if type(node) is list:
            return [self._copy(value, (*path, i), buffers, devices) for i, value in enumerate(node)]
        if type(node) is tuple:
            return tuple(self._copy(value, (*path, i), buffers, devices) for i, value in enumerate(node))
        return copy.deepcopy(node)

    def _copy_tensor(self, tensor: torch.Tensor, path: _Path, buffers: dict[_Path, torch.Tensor],
                     devices: set[torch.device]) -> torch.Tensor:
        source = tensor.detach()
        if source.layout != torch.strided or type(source) is not torch.Tensor:  # sparse, DTensor: no buffer reuse
            return source.to("cpu", copy=True)
        on_gpu = source.device.type == "cuda"
        buffer = self._buffers.get(path)
        if buffer is None or buffer.shape != source.shape or buffer.dtype != source.dtype:
            buffer = torch.empty(source.shape, dtype=source.dtype, pin_memory=self.pin_memory and on_gpu)
        asynchronous = on_gpu and buffer.is_pinned()
        buffer.copy_(source, non_blocking=asynchronous)
        if asynchronous:
            devices.add(source.device)
        buffers[path] = buffer
        return buffer


@contextmanager
def _one_intra_op_thread() -> Iterator[None]:
    """torch's intra-op parallelism set to one thread inside the block (restored after; see the module
    docstring). Process-wide: the stager runs while no background save is in flight."""
    threads = torch.get_num_threads()
    if threads > 1:
        torch.set_num_threads(1)
    try:
        yield
    finally:
        if threads > 1:
            torch.set_num_threads(threads)
