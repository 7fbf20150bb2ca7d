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

Variable BPTT (AWD-LSTM, Merity et al. 2017; :class:`VariableBPTT`): the window starting at offset
``p`` of epoch ``k`` is instead ``T = min(max(min_length, round(x)), S - 1 - p)`` long, where
``x ~ N(b, std)`` and ``b = bptt`` with probability 0.95, else ``bptt / 2``. The draw comes from a
generator seeded with ``(seed, k, p)`` alone, so every rank cuts the same windows and a stream
resumed from its state (epoch and position, in tokens, as always) continues with exactly the windows
the uninterrupted one would have cut; no extra state is needed, and a state saved with fixed windows
loads as it is. Such a window carries ``lr_factor = T / bptt``, the learning-rate rescale AWD applies
to the step (AWD uses the drawn length before the cap at the stripe's end; here the window's real
length, which only differs for an epoch's last window).
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

__all__ = ["Batch", "BatchStream", "VariableBPTT", "evaluation_windows", "num_eval_targets"]


@dataclass
class Batch:
    inputs: torch.Tensor  # [T, B] int64, time-major
    targets: torch.Tensor  # [T, B] int64: inputs shifted by one step
    reset_state: bool  # True on the first window of an epoch / pass: start from a fresh hidden state
    lr_factor: float = 1.0  # learning-rate multiplier of the step on this window (variable BPTT: T / bptt)


@dataclass(frozen=True)
class VariableBPTT:
    """AWD-LSTM's random window lengths (see the module docstring).

    seed: seeds the lengths (with the epoch and the window's offset); the same on every rank.
    std: standard deviation of the normal draw around ``bptt`` (or ``bptt / 2``), in tokens, >= 0.
    min_length: the shortest window, >= 1 (an epoch's last window may still be shorter).
    half_probability: probability of drawing around ``bptt / 2`` instead of ``bptt`` (AWD: 0.05).
    """

    seed: int = 0
    std: float = 5.0
    min_length: int = 5
    half_probability: float = 0.05

    def __post_init__(self) -> None:
        if not (self.std >= 0 and math.isfinite(self.std)):
            raise ValueError(f"variable BPTT std must be a finite number >= 0, got {self.std}")
        if not isinstance(self.min_length, (int, np.integer)) or self.min_length < 1:
            raise ValueError(f"variable BPTT min_length must be a positive integer, got {self.min_length!r}")
        if not 0.0 <= self.half_probability <= 1.0:
            raise ValueError(f"variable BPTT half_probability must be in [0, 1], got {self.half_probability}")

    def length(self, bptt: int, epoch: int, position: int) -> int:
        """The drawn window length (before the cap at the stripe's end) of the window at ``position`` of
        ``epoch``: a pure function of (seed, epoch, position)."""
        rng = np.random.default_rng([self.seed % 2**64, int(epoch), int(position)])
        base = bptt / 2.0 if rng.random() < self.half_probability else float(bptt)
        return max(int(self.min_length), int(round(rng.normal(base, self.std))))


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
    ``batch_size`` is global; each rank gets ``batch_size // world_size`` rows. ``variable``: AWD-LSTM
    window lengths (:class:`VariableBPTT`); None = every window ``bptt`` long (but an epoch's last).
    """

    def __init__(
        self,
        tokens: np.ndarray,
        batch_size: int,
        bptt: int,
        *,
        rank: int = 0,
        world_size: int = 1,
        variable: VariableBPTT | None = None,
    ) -> None:
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
        self.variable = variable
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
        """Windows per epoch with fixed ``bptt`` windows (about the mean with variable BPTT)."""
        return -(-(self.stripe_len - 1) // self.bptt)

    def next_batch(self) -> Batch:
        pos = self._pos
        left = self.stripe_len - 1 - pos
        if self.variable is None:
            length = min(self.bptt, left)
            batch = _window(self._stripes, pos, length, reset=pos == 0)
        else:
            length = min(self.variable.length(self.bptt, self._epoch, pos), left)
            batch = _window(self._stripes, pos, length, reset=pos == 0)
            batch.lr_factor = length / self.bptt
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
        rank / world_size may differ since the position is global; bptt and variable BPTT may differ:
        the position is in tokens, and variable window lengths depend on the epoch and position only)."""
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
