"""Weight averaging of optimizer iterates: Two-Tailed Averaging and the TA / EMA / NT-ASGD baselines.

Notation (thesis, chapter 3): the optimizer produces iterates theta_t, t = 1, 2, ... (theta_0 being the
initial weights); ``update()`` is called after every optimizer step and adds the new theta_t. Every E
steps ``evaluate_and_adapt(evaluate)`` measures the generalisation loss f of the raw and averaged weights.

* :class:`TwoTailedAveraging` - Algorithm 1 (core 2TA) with the two optional extensions of Algorithm 2:
  resetting stagnating averages (``reset_patience``) and falling back to the raw weights while they are
  better (``raw_fallback``). ``reset_patience=None, raw_fallback=False`` is exactly Algorithm 1.
  The decision logic lives in :class:`TwoTailedLogic` (numbers only, no tensors).
* :class:`TailAveraging` - eq. 3.2: raw weights before ``start_step``, then the equal-weight average of
  theta_start_step, ..., theta_t.
* :class:`ExponentialAveraging` - eq. 3.1 with a constant beta: avg_0 = theta_0,
  avg_t = (1 - beta) theta_t + beta avg_{t-1}.
* :class:`NonMonotonicAveraging` - NT-ASGD's averaging (Merity et al. 2017, Algorithm 1): the raw weights
  until a raw validation loss is worse than the best one before the last ``nonmono`` evaluations, then
  the equal-weight average of the iterates from that step on.
* :class:`NoAveraging` - always the raw weights.

All averagers keep their averages in preallocated tensors with the parameters' shapes and device, in
float32 (or float64 for float64 parameters), updated in place under ``torch.no_grad()``. They evaluate
and report weights by copying an average into the model's parameters for the duration of a ``with``
block (:func:`averaged_weights`); the raw weights are always restored afterwards, also on exceptions.

``state_dict()`` holds only tensors, ints, floats, bools, strings, None, lists and dicts (loadable with
``torch.load(weights_only=True)``); its tensors are the live buffers (like ``nn.Module.state_dict``),
so serialise or clone it before the next ``update()``. Resuming from it continues bit-identically.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor
from torch.nn import Parameter

__all__ = [
    "Averager",
    "AveragingReport",
    "ExponentialAveraging",
    "NoAveraging",
    "NonMonotonicAveraging",
    "TailAveraging",
    "TwoTailedAveraging",
    "TwoTailedLogic",
    "averaged_weights",
    "restored_weights",
]

Source = Literal["raw", "long", "tail", "ema", "nt_asgd"]
Event = Literal["none", "switch", "stagnation_switch", "short_reset", "reinit", "trigger"]
Role = Literal["raw", "short", "long"]

_INF = math.inf


@dataclass
class AveragingReport:
    """The outcome of one evaluation (``evaluate_and_adapt``).

    loss: the reported generalisation loss, i.e. f of the reported weights (F^L, or F^1 when the raw
        weights are reported).
    source: whose weights are reported: ``"raw"`` (the current iterate), ``"long"`` (2TA long average),
        ``"tail"`` (tail average), ``"ema"`` (exponential moving average) or ``"nt_asgd"`` (the NT-ASGD
        average, once triggered).
    length: number of iterates averaged in the reported weights (1 for raw weights; for EMA the number
        of iterates that entered the recursion, theta_0 included).
    raw_loss / short_loss / long_loss: f(theta), f(theta^S), f(theta^L) as evaluated this time, None where
        not evaluated (empty averages are never evaluated; raw only with ``raw_fallback`` or when nothing
        else can be reported; short/long are 2TA only). ``long_loss`` is measured before a switch, i.e. of
        the average that was the long one when the evaluation started.
    short_length / long_length: S and L after adaptation (for TA/EMA: 0 and the averaging length).
    event: what adaptation happened: ``"switch"`` (F^S <= F^L: the long average continues from the short
        one, the short one restarts empty), ``"stagnation_switch"`` (the same, forced because F^L is
        stagnating), ``"short_reset"`` (the short average stagnated and restarts empty, S = 0),
        ``"reinit"`` (raw weights have always been better: S = L = 0; supersedes a switch at the same
        evaluation), ``"trigger"`` (NT-ASGD: averaging starts with the current iterate) or ``"none"``.
    """

    loss: float
    source: Source
    length: int
    raw_loss: float | None
    short_loss: float | None
    long_loss: float | None
    short_length: int
    long_length: int
    event: Event


@runtime_checkable
class Averager(Protocol):
    """What the training loop uses; see the module docstring."""

    def update(self) -> None:
        """Add the current parameters (the iterate after an optimizer step) to the averages."""
        ...

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        """Evaluate the weights with ``evaluate()`` (the loss of whatever weights are in the model), adapt."""
        ...

    def reported_weights(self) -> ContextManager[None]:
        """Within the block, the model holds the reported weights; the raw weights are restored after."""
        ...

    def state_dict(self) -> dict:
        ...

    def load_state_dict(self, state: dict) -> None:
        ...


def _key(loss: float) -> float:
    """Comparison key for a loss: NaN counts as +inf so that it is never better than anything."""
    return _INF if math.isnan(loss) else loss


# --------------------------------------------------------------------------------------------- tensors


def _unique_params(params: Iterable[Parameter]) -> list[Parameter]:
    """The parameters in order, each once (tied weights appear once), validated as floating point."""
    seen: set[int] = set()
    unique = []
    for p in params:
        if id(p) in seen:
            continue
        if not isinstance(p, Tensor) or not (p.is_floating_point() or p.is_complex()):
            raise TypeError(f"can only average floating-point tensors, got {type(p).__name__} {getattr(p, 'dtype', '')}")
        seen.add(id(p))
        unique.append(p)
    if not unique:
        raise ValueError("no parameters to average")
    return unique


def _average_dtype(dtype: torch.dtype) -> torch.dtype:
    # Running means of low-precision weights lose the small increments 1/L; average in >= float32.
    return torch.promote_types(dtype, torch.float32)


def _new_buffers(params: Sequence[Parameter]) -> list[Tensor]:
    """One zero-initialised average per parameter (zeros, not garbage: empty slots are checkpointed too)."""
    return [torch.zeros_like(p, dtype=_average_dtype(p.dtype), memory_format=torch.preserve_format) for p in params]


def _sources(params: Sequence[Parameter], like: Sequence[Tensor]) -> list[Tensor]:
    """The parameters' current values as tensors of the averages' dtype, without autograd history."""
    return [p.detach() if p.dtype == b.dtype else p.detach().to(b.dtype) for p, b in zip(params, like)]


@torch.no_grad()
def _accumulate(average: list[Tensor], sources: list[Tensor], count: int) -> None:
    """Fold one iterate into a running mean that now holds ``count`` iterates (count >= 1).

    The first iterate is copied rather than lerped with weight 1: lerp keeps NaN/inf left in a restarted
    buffer (NaN * 0 = NaN), copy_ overwrites it, so restarting never needs to touch or reallocate memory.
    """
    if count == 1:
        torch._foreach_copy_(average, sources)
    else:
        torch._foreach_lerp_(average, sources, 1.0 / count)


@torch.no_grad()
def _load_buffers(buffers: list[Tensor], saved: Any, what: str) -> None:
    """Copy saved tensors into existing buffers in place (keeping device and memory), checking shapes."""
    if not isinstance(saved, (list, tuple)) or len(saved) != len(buffers):
        raise ValueError(f"{what}: expected a list of {len(buffers)} tensors, got {type(saved).__name__} "
                         f"of length {len(saved) if isinstance(saved, (list, tuple)) else '?'}")
    for i, (buf, t) in enumerate(zip(buffers, saved)):
        if not isinstance(t, Tensor) or t.shape != buf.shape:
            raise ValueError(f"{what}[{i}]: expected a tensor of shape {tuple(buf.shape)}, "
                             f"got {getattr(t, 'shape', type(t).__name__)}")
        buf.copy_(t)


def _check_kind(state: dict, kind: str) -> None:
    if not isinstance(state, dict) or state.get("kind") != kind:
        got = state.get("kind") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"cannot load averager state of kind {got!r} into {kind}")


@contextlib.contextmanager
def averaged_weights(params: Sequence[Parameter], averages: Sequence[Tensor]) -> Iterator[None]:
    """Copy ``averages`` into ``params`` in place for the duration of the block, then restore the params.

    params: the model's parameters (modified in place, so the model and optimizer see the same objects).
    averages: one tensor per parameter, same shapes (dtype may differ; values are cast by ``copy_``).
    The raw values are backed up in a temporary clone and copied back bit-exactly on exit, also when the
    block raises. All copies run under ``torch.no_grad()``: no autograd graph, no in-place-on-leaf error.
    """
    params = list(params)
    averages = list(averages)
    if len(params) != len(averages):
        raise ValueError(f"{len(params)} parameters but {len(averages)} averages")
    for i, (p, a) in enumerate(zip(params, averages)):
        if p.shape != a.shape:
            raise ValueError(f"parameter {i} has shape {tuple(p.shape)} but its average {tuple(a.shape)}")
    with restored_weights(params):
        with torch.no_grad():
            for p, a in zip(params, averages):
                p.copy_(a)
        yield


@contextlib.contextmanager
def restored_weights(params: Sequence[Parameter]) -> Iterator[None]:
    """Run the block, then copy the values ``params`` had before back into them (in place, bit for bit), also
    when the block raises. The block may change the weights any way it likes (an average swapped in, dynamic
    evaluation's updates)."""
    params = list(params)
    with torch.no_grad():
        backup = [p.detach().clone() for p in params]
    try:
        yield
    finally:
        with torch.no_grad():
            for p, b in zip(params, backup):
                p.copy_(b)


# ----------------------------------------------------------------------------------- two-tailed logic


class TwoTailedLogic:
    """The decision logic of Two-Tailed Averaging (thesis Algorithms 1 and 2) on numbers only.

    State: the lengths S (``short_length``) and L (``long_length``) of the short and long running
    averages, which of two storage slots (0/1) holds the short average (``short_slot``; the long one is
    in the other slot, so a switch swaps labels instead of copying weights), and per average its best
    loss so far and the number of consecutive evaluations since it last improved (for the reset
    heuristic). :class:`TwoTailedAveraging` keeps the tensors in the slots; tests drive this class with
    scripted losses.

    eval_every: E, the evaluation period in optimizer steps (only used by the reinitialisation test
        ``L == E`` of Algorithm 2).
    reset_patience: an average is stagnating when its loss has not improved on its best for this many
        consecutive evaluations; then a stagnating long average is replaced by the short one and a
        stagnating short one restarts. None disables the extension.
    raw_fallback: evaluate the raw weights too and report them while they are at least as good as the
        long average (Algorithm 2, second extension).
    """

    def __init__(self, eval_every: int, *, reset_patience: int | None = None, raw_fallback: bool = True) -> None:
        if isinstance(eval_every, bool) or not isinstance(eval_every, int) or eval_every < 1:
            raise ValueError(f"eval_every must be a positive int, got {eval_every!r}")
        if reset_patience is not None and (
            isinstance(reset_patience, bool) or not isinstance(reset_patience, int) or reset_patience < 1
        ):
            raise ValueError(f"reset_patience must be None or a positive int, got {reset_patience!r}")
        self.eval_every = eval_every
        self.reset_patience = reset_patience
        self.raw_fallback = bool(raw_fallback)
        self.short_length = 0  # S: iterates in the short average
        self.long_length = 0  # L: iterates in the long average (S <= L)
        self.short_slot = 0  # storage slot of the short average; the long one is in 1 - short_slot
        self.short_best = _INF  # best loss the short average has had since it (re)started
        self.short_since_best = 0  # consecutive evaluations without improving short_best
        self.long_best = _INF
        self.long_since_best = 0
        # Whose weights were reported at the last evaluation. Before any: the long average if the raw
        # weights are never reported (Algorithm 1 reports theta^L at all times), else the raw weights.
        self.reported_source: Literal["raw", "long"] = "raw" if self.raw_fallback else "long"
        self.num_evaluations = 0

    @property
    def long_slot(self) -> int:
        return 1 - self.short_slot

    @property
    def reported_length(self) -> int:
        """Averaging length of the weights reported now (1 for raw; L grows between evaluations)."""
        return self.long_length if self.reports_long else 1

    @property
    def reports_long(self) -> bool:
        """Whether the reported weights are the long average (else the raw weights)."""
        return self.reported_source == "long" and self.long_length > 0

    def is_stagnating(self, role: Literal["short", "long"]) -> bool:
        if self.reset_patience is None:
            return False
        since = self.short_since_best if role == "short" else self.long_since_best
        return since >= self.reset_patience

    def add_weights(self) -> None:
        """Account for one more iterate in both averages (Algorithm 1, add_weights)."""
        self.short_length += 1
        self.long_length += 1

    def _restart_short(self) -> None:
        self.short_length = 0
        self.short_best, self.short_since_best = _INF, 0

    def _switch(self) -> None:
        # S, L, theta^L <- 0, S, theta^S: the short average (with its bookkeeping) becomes the long one,
        # and the old long slot is reused, empty, for the new short average.
        self.long_length = self.short_length
        self.long_best, self.long_since_best = self.short_best, self.short_since_best
        self.short_slot = self.long_slot
        self._restart_short()

    def _reinit(self) -> None:
        self._restart_short()
        self.long_length = 0
        self.long_best, self.long_since_best = _INF, 0

    @staticmethod
    def _track(best: float, since: int, loss: float) -> tuple[float, int]:
        """Stagnation bookkeeping: new (best loss, evaluations since it improved) after one evaluation."""
        if _key(loss) < best:
            return loss, 0
        return best, since + 1

    def evaluate_and_adapt(self, loss_of: Callable[[Role], float]) -> AveragingReport:
        """One evaluation: get the losses, adapt the averages (Algorithm 2, or 1), return the report.

        loss_of(role): f of the raw weights (``"raw"``), the short or the long average. Called at most
            once per role, never for an empty average (length 0 counts as f = +inf), only once for both
            averages when S == L (they then average the same iterates), and for ``"raw"`` only with
            ``raw_fallback`` or when the long average is empty. All calls happen before any state
            changes, so an exception from ``loss_of`` leaves the logic untouched.
        """
        S, L = self.short_length, self.long_length
        short_loss = float(loss_of("short")) if S > 0 else None
        if L == S:
            long_loss = short_loss  # same iterates, same average: evaluate once
        else:
            long_loss = float(loss_of("long")) if L > 0 else None
        raw_loss = float(loss_of("raw")) if self.raw_fallback or L == 0 else None

        f_short = _INF if short_loss is None else short_loss
        f_long = _INF if long_loss is None else long_loss
        # Update the stagnation bookkeeping with this evaluation (empty averages were not evaluated).
        if short_loss is not None:
            self.short_best, self.short_since_best = self._track(self.short_best, self.short_since_best, short_loss)
        if long_loss is not None:
            self.long_best, self.long_since_best = self._track(self.long_best, self.long_since_best, long_loss)

        event: Event = "none"
        reported = f_long
        # Switching to an empty short average would just throw the long one away, hence S > 0.
        if S > 0 and (_key(f_short) <= _key(f_long) or self.is_stagnating("long")):
            event = "switch" if _key(f_short) <= _key(f_long) else "stagnation_switch"
            reported = f_short  # F^L <- F^S
            self._switch()
        elif S > 0 and self.is_stagnating("short"):
            event = "short_reset"
            self._restart_short()

        source: Literal["raw", "long"] = "long"
        if self.raw_fallback and raw_loss is not None and self.long_length > 1 and _key(raw_loss) <= _key(reported):
            if self.long_length == self.eval_every:
                # The raw weights have been better ever since the averages (re)started: start over.
                event = "reinit"
                self._reinit()
            source = "raw"
        elif self.long_length == 0:
            source = "raw"  # nothing averaged yet (evaluation before any update)
        if source == "raw":
            reported = raw_loss  # type: ignore[assignment]  # evaluated whenever L == 0 or raw_fallback

        self.reported_source = source
        self.num_evaluations += 1
        return AveragingReport(
            loss=float(reported),
            source=source,
            length=self.long_length if source == "long" else 1,
            raw_loss=raw_loss,
            short_loss=short_loss,
            long_loss=long_loss,
            short_length=self.short_length,
            long_length=self.long_length,
            event=event,
        )

    def state_dict(self) -> dict[str, Any]:
        """The full logic state as plain Python values (best losses may be inf/NaN floats)."""
        return {
            "eval_every": self.eval_every,
            "reset_patience": self.reset_patience,
            "raw_fallback": self.raw_fallback,
            "short_length": self.short_length,
            "long_length": self.long_length,
            "short_slot": self.short_slot,
            "short_best": self.short_best,
            "short_since_best": self.short_since_best,
            "long_best": self.long_best,
            "long_since_best": self.long_since_best,
            "reported_source": self.reported_source,
            "num_evaluations": self.num_evaluations,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state; the configuration given to the constructor is kept (reset_patience and
        raw_fallback may change on resume), except that eval_every must match: the lengths are
        multiples of it."""
        if state["eval_every"] != self.eval_every:
            raise ValueError(f"averager state was saved with eval_every={state['eval_every']}, "
                             f"this run has eval_every={self.eval_every}")
        S, L, slot = int(state["short_length"]), int(state["long_length"]), int(state["short_slot"])
        if not (0 <= S <= L) or slot not in (0, 1) or state["reported_source"] not in ("raw", "long"):
            raise ValueError(f"inconsistent two-tailed averaging state: S={S}, L={L}, short_slot={slot}, "
                             f"reported_source={state['reported_source']!r}")
        self.short_length, self.long_length, self.short_slot = S, L, slot
        self.short_best, self.short_since_best = float(state["short_best"]), int(state["short_since_best"])
        self.long_best, self.long_since_best = float(state["long_best"]), int(state["long_since_best"])
        self.reported_source = state["reported_source"]
        self.num_evaluations = int(state["num_evaluations"])


# ---------------------------------------------------------------------------------------- averagers


class TwoTailedAveraging(Averager):
    """Two-Tailed Averaging (2TA): a short and a long running average of the iterates.

    params: the model parameters to average (modified in place only inside the ``*_weights()`` blocks
        and during ``evaluate_and_adapt``). Build the averager after moving the model to its device.
    eval_every: E, the evaluation period in optimizer steps (call ``evaluate_and_adapt`` every E steps).
    reset_patience / raw_fallback: the Algorithm 2 extensions, see :class:`TwoTailedLogic`.

    Memory: two averages (2 x the parameters, float32), plus a transient copy of the parameters while
    an average is swapped in. The two averages live in fixed slots; switching, restarting and
    reinitialising only change lengths and labels, never memory.
    """

    def __init__(
        self,
        params: Iterable[Parameter],
        eval_every: int,
        *,
        reset_patience: int | None = None,
        raw_fallback: bool = True,
    ) -> None:
        self.logic = TwoTailedLogic(eval_every, reset_patience=reset_patience, raw_fallback=raw_fallback)
        self._params = _unique_params(params)
        # _slots[i][j]: running mean of parameter j in slot i; which slot is short is logic.short_slot.
        self._slots = [_new_buffers(self._params), _new_buffers(self._params)]

    @property
    def short_length(self) -> int:
        """S: number of (most recent) iterates in the short average."""
        return self.logic.short_length

    @property
    def long_length(self) -> int:
        """L: number of (most recent) iterates in the long average."""
        return self.logic.long_length

    def _short(self) -> list[Tensor]:
        return self._slots[self.logic.short_slot]

    def _long(self) -> list[Tensor]:
        return self._slots[self.logic.long_slot]

    @torch.no_grad()
    def update(self) -> None:
        """Add the current parameters to both averages: theta^X <- theta^X + (theta - theta^X) / X."""
        sources = _sources(self._params, self._slots[0])
        self.logic.add_weights()
        _accumulate(self._short(), sources, self.logic.short_length)
        _accumulate(self._long(), sources, self.logic.long_length)

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        def loss_of(role: Role) -> float:
            if role == "raw":
                return float(evaluate())
            with averaged_weights(self._params, self._short() if role == "short" else self._long()):
                return float(evaluate())

        return self.logic.evaluate_and_adapt(loss_of)

    def _swap_in(self, average: list[Tensor], length: int, what: str) -> ContextManager[None]:
        if length == 0:
            raise RuntimeError(f"the {what} average is empty (no iterates since it was (re)started)")
        return averaged_weights(self._params, average)

    def short_weights(self) -> ContextManager[None]:
        """Within the block the model holds theta^S (raises RuntimeError if S == 0)."""
        return self._swap_in(self._short(), self.short_length, "short")

    def long_weights(self) -> ContextManager[None]:
        """Within the block the model holds theta^L (raises RuntimeError if L == 0)."""
        return self._swap_in(self._long(), self.long_length, "long")

    def reported_weights(self) -> ContextManager[None]:
        """The weights chosen at the last evaluation: theta^L (as it is now), or the raw weights when the
        raw fallback was reported, the long average is empty, or (with raw_fallback) before the first
        evaluation."""
        if self.logic.reports_long:
            return averaged_weights(self._params, self._long())
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "two_tailed", "logic": self.logic.state_dict(), "slots": [list(s) for s in self._slots]}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "two_tailed")
        slots = state["slots"]
        if not isinstance(slots, (list, tuple)) or len(slots) != 2:
            raise ValueError("two-tailed averaging state must have 2 slots")
        for i in range(2):
            _load_buffers(self._slots[i], slots[i], f"slots[{i}]")
        self.logic.load_state_dict(state["logic"])


class _EqualWeightAverage(Averager):
    """What tail averaging and NT-ASGD share: the equal-weight average of the iterates added since averaging
    started (``count`` of them, kept in ``_average``), reported once it holds one, the raw weights before."""

    def __init__(self, params: Iterable[Parameter]) -> None:
        self._params = _unique_params(params)
        self._average = _new_buffers(self._params)
        self.count = 0  # iterates in the average

    @torch.no_grad()
    def _add(self) -> None:
        """Add the current parameters to the average."""
        self.count += 1
        _accumulate(self._average, _sources(self._params, self._average), self.count)

    def reported_weights(self) -> ContextManager[None]:
        """The average once it holds an iterate, else the raw weights."""
        return averaged_weights(self._params, self._average) if self.count > 0 else contextlib.nullcontext()


class TailAveraging(_EqualWeightAverage):
    """Tail Averaging, eq. 3.2: the raw weights for t < start_step, then (1/(t-s+1)) sum_{i=s..t} theta_i.

    params: the parameters to average. t counts ``update()`` calls (optimizer steps); theta_0 is the
    parameters' value at construction and is included when ``start_step == 0``.
    """

    def __init__(self, params: Iterable[Parameter], start_step: int) -> None:
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 0:
            raise ValueError(f"start_step must be a non-negative int, got {start_step!r}")
        self.start_step = start_step
        super().__init__(params)  # the mean of theta_s..theta_t once t >= s: count = max(0, t - s + 1)
        self.step = 0  # t: optimizer steps seen
        if start_step == 0:
            self._add()

    def update(self) -> None:
        self.step += 1
        if self.step >= self.start_step:
            self._add()

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        with self.reported_weights():
            loss = float(evaluate())
        averaging = self.count > 0
        return AveragingReport(
            loss=loss, source="tail" if averaging else "raw", length=self.count if averaging else 1,
            raw_loss=None if averaging else loss, short_loss=None, long_loss=loss if averaging else None,
            short_length=0, long_length=self.count, event="none",
        )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "tail", "start_step": self.start_step, "step": self.step, "count": self.count,
                "average": list(self._average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "tail")
        if state["start_step"] != self.start_step:
            raise ValueError(f"tail averaging state has start_step={state['start_step']}, this run {self.start_step}")
        _load_buffers(self._average, state["average"], "average")
        self.step, self.count = int(state["step"]), int(state["count"])


class ExponentialAveraging(Averager):
    """Exponential moving average, eq. 3.1 with constant beta = ``decay``:
    avg_0 = theta_0 (the parameters at construction), avg_t = (1 - beta) theta_t + beta avg_{t-1}."""

    def __init__(self, params: Iterable[Parameter], decay: float) -> None:
        decay = float(decay)
        if not 0.0 <= decay < 1.0:
            raise ValueError(f"decay must be in [0, 1), got {decay}")
        self.decay = decay
        self._params = _unique_params(params)
        self._average = _new_buffers(self._params)
        with torch.no_grad():
            torch._foreach_copy_(self._average, _sources(self._params, self._average))
        self.step = 0  # t: optimizer steps seen; the average has seen t + 1 iterates

    @torch.no_grad()
    def update(self) -> None:
        self.step += 1
        torch._foreach_lerp_(self._average, _sources(self._params, self._average), 1.0 - self.decay)

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        with self.reported_weights():
            loss = float(evaluate())
        return AveragingReport(
            loss=loss, source="ema", length=self.step + 1, raw_loss=None, short_loss=None, long_loss=loss,
            short_length=0, long_length=self.step + 1, event="none",
        )

    def reported_weights(self) -> ContextManager[None]:
        return averaged_weights(self._params, self._average)

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "ema", "decay": self.decay, "step": self.step, "average": list(self._average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "ema")
        _load_buffers(self._average, state["average"], "average")
        self.step = int(state["step"])


class NonMonotonicAveraging(_EqualWeightAverage):
    """The averaging of NT-ASGD, non-monotonically triggered ASGD (Merity et al. 2017, Algorithm 1).

    params: the parameters to average. nonmono: n, the non-monotone interval.

    Until it triggers, every evaluation scores the raw weights, reports them, and logs the loss. An
    evaluation triggers averaging when ``t > n`` and ``loss > min(logs[:-n])``, with ``logs`` the t
    losses of the earlier evaluations (AWD-LSTM's code: ``len(best_val_loss) > nonmono and val_loss >
    min(best_val_loss[:-nonmono])``; Algorithm 1's ``min_{l in {0, ..., t-n-1}} logs[l]``): the raw loss
    is worse than the best one from before the last n evaluations. NaN counts as worse than anything.
    From then on the reported weights are the equal-weight average of the iterates theta_T,
    theta_T+1, ..., theta_t, T being the step of the triggering evaluation (Algorithm 1's returned
    ``sum_{i=T..K} w_i / (K - T + 1)``; :class:`TailAveraging` with ``start_step = T``), and every
    evaluation scores that average; the trigger is final. The triggering evaluation itself reports
    the raw loss it measured (the average then holds theta_T alone, the same weights).

    Difference to AWD-LSTM: AWD switches the optimizer from SGD to ``torch.optim.ASGD`` (t0 = 0,
    lambd = 0), which keeps the running average inside the optimizer and starts it with the first
    iterate after the switch. Here the configured optimizer (SGD for the AWD configs, or any other)
    runs on unchanged and the average is kept beside it, like every averager of this module; it also
    counts the triggering iterate (one iterate of difference). AWD checks the trigger once per epoch;
    here at every evaluation (``train.eval_every`` steps).
    """

    def __init__(self, params: Iterable[Parameter], nonmono: int = 5) -> None:
        if isinstance(nonmono, bool) or not isinstance(nonmono, int) or nonmono < 1:
            raise ValueError(f"nonmono must be a positive int, got {nonmono!r}")
        self.nonmono = nonmono
        super().__init__(params)  # the mean of theta_T..theta_t once triggered: count = t - T + 1, else 0
        self.step = 0  # t: optimizer steps seen
        self.trigger_step: int | None = None  # T: the step whose evaluation triggered averaging
        self.logs: list[float] = []  # raw validation losses of the evaluations before the trigger

    @property
    def triggered(self) -> bool:
        return self.trigger_step is not None

    def update(self) -> None:
        self.step += 1
        if self.triggered:
            self._add()

    def should_trigger(self, loss: float) -> bool:
        """Whether a raw validation loss ``loss`` triggers averaging, given the losses logged so far."""
        n = self.nonmono
        return len(self.logs) > n and _key(loss) > min(_key(v) for v in self.logs[:-n])

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        if self.triggered:
            with self.reported_weights():
                loss = float(evaluate())
            return AveragingReport(
                loss=loss, source="nt_asgd", length=self.count, raw_loss=None, short_loss=None, long_loss=loss,
                short_length=0, long_length=self.count, event="none",
            )
        loss = float(evaluate())
        event: Event = "none"
        if self.should_trigger(loss):
            self.trigger_step = self.step
            self._add()  # theta_T, the weights just evaluated
            event = "trigger"
        self.logs.append(loss)
        return AveragingReport(
            loss=loss, source="raw", length=1, raw_loss=loss, short_loss=None, long_loss=None,
            short_length=0, long_length=self.count, event=event,
        )

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "nt_asgd", "nonmono": self.nonmono, "step": self.step,
                "trigger_step": -1 if self.trigger_step is None else self.trigger_step, "count": self.count,
                "logs": list(self.logs), "average": list(self._average)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore the state; ``nonmono`` is the constructor's (it may change on resume)."""
        _check_kind(state, "nt_asgd")
        step, trigger, count = int(state["step"]), int(state["trigger_step"]), int(state["count"])
        if not (0 <= step and (trigger, count) == (-1, 0) or 0 <= trigger <= step and count == step - trigger + 1):
            raise ValueError(f"inconsistent NT-ASGD averaging state: step={step}, trigger_step={trigger}, count={count}")
        _load_buffers(self._average, state["average"], "average")
        self.step, self.count = step, count
        self.trigger_step = None if trigger < 0 else trigger
        self.logs = [float(v) for v in state["logs"]]


class NoAveraging(Averager):
    """No averaging: the raw weights are evaluated and reported."""

    def __init__(self, params: Iterable[Parameter]) -> None:
        self._params = list(params)

    def update(self) -> None:
        pass

    def evaluate_and_adapt(self, evaluate: Callable[[], float]) -> AveragingReport:
        loss = float(evaluate())
        return AveragingReport(loss=loss, source="raw", length=1, raw_loss=loss, short_loss=None, long_loss=None,
                               short_length=0, long_length=0, event="none")

    def reported_weights(self) -> ContextManager[None]:
        return contextlib.nullcontext()

    def state_dict(self) -> dict[str, Any]:
        return {"kind": "none"}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        _check_kind(state, "none")
