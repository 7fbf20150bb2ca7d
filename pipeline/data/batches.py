"""Truncated-BPTT batching over contiguous stripes of a token stream.

The stream ``tokens`` (length ``N``) is cut into ``batch_size`` contiguous *stripes* of
``S = N // batch_size`` tokens (the trailing ``N % batch_size`` tokens are dropped); stripe ``b``
is ``tokens[b*S : (b+1)*S]``. Windows of up to ``bptt`` time steps advance along all stripes at
once, so row ``b`` of every batch continues row ``b`` of the previous one and the caller can carry
its hidden state across windows (zeroing it when ``reset_state`` is set). A window starting at
offset ``p`` holds ``inputs[t, b] = stripe_b[p + t]`` and ``targets[t, b] = stripe_b[p + t + 1]``
(time-major ``[T, B]`` int64); it is ``T = min(bptt, S - 1 - p)`` long, so an epoch is
``ceil((S - 1) / bptt)`` windows covering the ``S - 1`` prediction positions of every stripe, and
only its last window may be shorter.

With ``world_size > 1`` rank ``r`` holds the global stripes ``[r*B/W, (r+1)*B/W)``: a contiguous
shard ``tokens[r*B/W*S : (r+1)*B/W*S]`` of the stream, and the rows of all ranks, concatenated in
rank order, are exactly the single-process batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "BatchStream", "evaluation_windows", "num_eval_targets"]


@dataclass
class Batch:
    inputs: torch.Tensor  # [T, B] int64, time-major
    targets: torch.Tensor  # [T, B] int64: inputs shifted by one step
    reset_state: bool  # True on the first window of an epoch / pass: start from a fresh hidden state


def _check_args(tokens: np.ndarray, batch_size: int, bptt: int) -> int:
    if tokens.ndim != 1:
        raise ValueError(f"tokens must be a 1-D array, got shape {tokens.shape}")
    if not isinstance(batch_size, (int, np.integer)) or batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    if not isinstance(bptt, (int, np.integer)) or bptt < 1:
        raise ValueError(f"bptt must be a positive integer, got {bptt!r}")
    return int(tokens.shape[0]) // int(batch_size)


def _time_major(stripes: np.ndarray, start: int, length: int) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(stripes[:, start : start + length].T, dtype=np.int64))


def _window(stripes: np.ndarray, pos: int, length: int, reset: bool) -> Batch:
    # Two small int64 copies (not views of one block) so in-place edits of inputs never touch targets.
    return Batch(
        inputs=_time_major(stripes, pos, length), targets=_time_major(stripes, pos + 1, length), reset_state=reset
    )


class BatchStream:
    """Truncated-BPTT windows over contiguous batch stripes, resumable.

    Iterating is infinite (epoch after epoch); ``next_batch()`` and iteration share one position,
    which :meth:`state_dict` / :meth:`load_state_dict` save and restore exactly.
    ``batch_size`` is global; each rank gets ``batch_size // world_size`` rows.
    """

    def __init__(self, tokens: np.ndarray, batch_size: int, bptt: int, *, rank: int = 0, world_size: int = 1) -> None:
        stripe_len = _check_args(tokens, batch_size, bptt)
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size % world_size:
            raise ValueError(
                f"batch_size ({batch_size}) must be divisible by world_size ({world_size}): each rank takes "
                "batch_size // world_size rows of the global batch"
            )
        if stripe_len < 2:
            raise ValueError(
                f"{tokens.shape[0]} tokens are too few for batch_size {batch_size}: each stripe needs at least 2 tokens"
            )
        self.num_tokens = int(tokens.shape[0])
        self.batch_size = int(batch_size)
        self.bptt = int(bptt)
        self.rank = int(rank)
        self.world_size = int(world_size)
        self.stripe_len = stripe_len
        rows = batch_size // world_size
        lo = rank * rows * stripe_len
        # A view (of the memory map, if tokens is one): only the windows are ever copied.
        self._stripes = tokens[lo : lo + rows * stripe_len].reshape(rows, stripe_len)
        self._epoch = 0
        self._pos = 0

    @property
    def epoch(self) -> int:
        """Completed epochs (0 during the first)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Offset along the stripes of the next window (0 at the start of an epoch)."""
        return self._pos

    @property
    def batches_per_epoch(self) -> int:
        return -(-(self.stripe_len - 1) // self.bptt)

    def next_batch(self) -> Batch:
        pos = self._pos
        length = min(self.bptt, self.stripe_len - 1 - pos)
        batch = _window(self._stripes, pos, length, reset=pos == 0)
        self._pos = pos + length
        if self._pos >= self.stripe_len - 1:
            self._pos = 0
            self._epoch += 1
        return batch

    def __iter__(self) -> Iterator[Batch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, int]:
        return {
            "epoch": self._epoch,
            "position": self._pos,
            "num_tokens": self.num_tokens,
            "batch_size": self.batch_size,
            "bptt": self.bptt,
        }

    def load_state_dict(self, state: dict[str, int]) -> None:
        """Continue where the saved stream stopped (the token array and batch_size must match;
        rank / world_size may differ since the position is global; bptt may differ)."""
        for key in ("num_tokens", "batch_size"):
            if key in state and int(state[key]) != getattr(self, key):
                raise ValueError(
                    f"cannot resume: the saved stream had {key}={state[key]}, this one has {getattr(self, key)}"
                )
        epoch, pos = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= pos < self.stripe_len - 1:
            raise ValueError(f"cannot resume: position {pos} / epoch {epoch} out of range for stripes of {self.stripe_len}")
        self._epoch, self._pos = epoch, pos


def num_eval_targets(num_tokens: int, batch_size: int) -> int:
    """How many positions :func:`evaluation_windows` scores: ``batch_size * (S - 1)``, S = N // batch_size."""
    stripe_len = num_tokens // batch_size
    return batch_size * (stripe_len - 1) if stripe_len >= 2 else 0


def evaluation_windows(tokens: np.ndarray, batch_size: int, bptt: int) -> Iterator[Batch]:
    """One pass over ``tokens`` with the striping of :class:`BatchStream` (single process).

    Every prediction position of every stripe is a target exactly once. Not scored: the last
    ``N % batch_size`` tokens (dropped) and the first token of each stripe (it has no context),
    i.e. ``N - batch_size * (N // batch_size - 1)`` tokens in all (see :func:`num_eval_targets`);
    ``batch_size=1`` scores all tokens but the first. ``reset_state`` is set on the first window
    only. Yields nothing when a stripe would hold fewer than 2 tokens.
    """
    stripe_len = _check_args(tokens, batch_size, bptt)  # validated now, not at the first next()
    return _eval_pass(tokens, int(batch_size), int(bptt), stripe_len)


def _eval_pass(tokens: np.ndarray, batch_size: int, bptt: int, stripe_len: int) -> Iterator[Batch]:
    if stripe_len < 2:
        return
    stripes = tokens[: batch_size * stripe_len].reshape(batch_size, stripe_len)
    pos = 0
    while pos < stripe_len - 1:
        length = min(bptt, stripe_len - 1 - pos)
        yield _window(stripes, pos, length, reset=pos == 0)
        pos += length
