"""Mogrifier (thesis eq. 2.2) and the recurrent layer that combines it with a cell.

``mogrify(h, x)`` with ``r`` rounds (round ``i`` has its own matrix)::

    odd  i:  x = 2σ(Q^i h + b^i) ⊙ x        Q^i: R^n -> R^m
    even i:  h = 2σ(R^i x + b^i) ⊙ h        R^i: R^m -> R^n

Round 1 gates ``x``; ``r = 0`` is the identity. Each matrix is full rank, or
(when ``0 < rank < min(m, n)``) factorised as ``Q = Q_left Q_right`` with
``Q_left`` [out, k] and ``Q_right`` [k, in]; the bias (initialised to zero) is
added after the product. Initialisation keeps ``Var(Q_ab) ≈ 1/fan_in`` where
``fan_in`` is the size of the vector being transformed: full rank
``Q ~ N(0, 1/fan_in)``; low rank ``Q_right ~ N(0, 1/fan_in)``,
``Q_left ~ N(0, 1/k)``.
"""

from __future__ import annotations

import math

from typing import Literal

import torch
from torch import Tensor, nn

from .bptt import SEQUENCE_CELLS, MogrifierParams, SequenceSpec, recurrent_sequence
from .cells import ElmanCell, GRUCell, LSTMCell, RLSTMCell
from .regularizers import drop_connect

__all__ = ["CELL_TYPES", "IMPLEMENTATIONS", "Mogrifier", "RecurrentLayer"]


def _effective_rank(rank: int, in_features: int, out_features: int) -> int | None:
    """Rank of the factorisation, or None for a full-rank matrix."""
    if rank <= 0 or rank >= min(in_features, out_features):
        return None
    return rank


class Mogrifier(nn.Module):
    """Mutual gating of the cell input ``x`` [B, m] and previous output ``h`` [B, n].

    Round ``i`` (1-based) has parameters ``weights[i-1]`` (full rank, shape
    [out, in]) or ``lefts[i-1]`` [out, k] and ``rights[i-1]`` [k, in]; plus
    ``biases[i-1]`` [out]. For odd rounds in = n, out = m; for even rounds
    in = m, out = n.
    """

    def __init__(self, input_size: int, hidden_size: int, rounds: int, rank: int = 0) -> None:
        super().__init__()
        if rounds < 0:
            raise ValueError(f"mogrifier rounds must be >= 0, got {rounds}")
        if input_size <= 0 or hidden_size <= 0:
            raise ValueError(f"input_size and hidden_size must be > 0, got {input_size}, {hidden_size}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.rounds = rounds
        self.rank = rank
        self.low_rank = _effective_rank(rank, input_size, hidden_size) is not None
        self.weights = nn.ParameterList()
        self.lefts = nn.ParameterList()
        self.rights = nn.ParameterList()
        self.biases = nn.ParameterList()
        for i in range(1, rounds + 1):
            in_f, out_f = (hidden_size, input_size) if i % 2 == 1 else (input_size, hidden_size)
            if self.low_rank:
                self.lefts.append(nn.Parameter(torch.empty(out_f, rank)))
                self.rights.append(nn.Parameter(torch.empty(rank, in_f)))
            else:
                self.weights.append(nn.Parameter(torch.empty(out_f, in_f)))
            self.biases.append(nn.Parameter(torch.empty(out_f)))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        with torch.no_grad():
            for idx in range(self.rounds):
                if self.low_rank:
                    left, right = self.lefts[idx], self.rights[idx]
                    right.normal_(0.0, 1.0 / math.sqrt(right.shape[1]))  # fan_in = vector size
                    left.normal_(0.0, 1.0 / math.sqrt(left.shape[1]))  # 1/k
                else:
                    w = self.weights[idx]
                    w.normal_(0.0, 1.0 / math.sqrt(w.shape[1]))
                self.biases[idx].zero_()

    def round_matrix(self, i: int) -> Tensor:
        """The (possibly factorised) matrix of round ``i`` (1-based) as a dense [out, in] tensor."""
        if self.low_rank:
            return self.lefts[i - 1] @ self.rights[i - 1]
        return self.weights[i - 1]

    def _round_params(self) -> list[tuple[Tensor | None, Tensor, Tensor]]:
        """Per round: (left^T or None, right^T or weight^T, bias), transposed for ``addmm``."""
        out = []
        for idx in range(self.rounds):
            if self.low_rank:
                out.append((self.lefts[idx].t(), self.rights[idx].t(), self.biases[idx]))
            else:
                out.append((None, self.weights[idx].t(), self.biases[idx]))
        return out

    @staticmethod
    def _mogrify(params: list[tuple[Tensor | None, Tensor, Tensor]], x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        for idx, (left_t, right_t, bias) in enumerate(params):
            src = h if idx % 2 == 0 else x  # round idx+1: odd rounds read h, even rounds read x
            if left_t is None:
                pre = torch.addmm(bias, src, right_t)
            else:
                pre = torch.addmm(bias, src.mm(right_t), left_t)
            gate = 2.0 * pre.sigmoid()
            if idx % 2 == 0:
                x = gate * x
            else:
                h = gate * h
        return x, h

    def forward(self, x: Tensor, h: Tensor) -> tuple[Tensor, Tensor]:
        if self.rounds == 0:
            return x, h
        return self._mogrify(self._round_params(), x, h)

    def extra_repr(self) -> str:
        return f"input_size={self.input_size}, hidden_size={self.hidden_size}, rounds={self.rounds}, rank={self.rank}"


CELL_TYPES = ("lstm", "rlstm", "gru", "elman")
IMPLEMENTATIONS = ("sequence", "autograd")


class RecurrentLayer(nn.Module):
    """One recurrent layer: ``cell(c_prev, mogrify(h_prev ⊙ M_state, x))`` over a sequence.

    ``cell`` is one of :data:`CELL_TYPES`: ``lstm``, ``rlstm``, ``gru`` or ``elman``
    (the GRU and Elman cells carry ``c = h``; see :mod:`models.cells`).
    ``capped_input_gate`` is an LSTM option (ignored by gru / elman); the Elman
    cell has no forget gate, so it rejects ``chrono_t_max`` / a non-zero
    ``forget_bias_init``.

    ``forward(inputs [T, B, m], state (h [B, n], c [B, n]), state_mask [B, n] | None)``
    returns ``(outputs [T, B, n], (h_T, c_T))``. The state mask (variational: the
    same for every time step of the call) is applied to ``h_prev`` before the
    Mogrifier at every step, and passed to the cell (RLSTM masks ``c`` in its
    output gate). ``c_prev`` is never masked; the returned state is unmasked.

    ``weight_drop`` (AWD-LSTM weight drop, DropConnect): in training mode each forward call drops the
    cell's recurrent matrix ``weight_hh`` once (:func:`models.regularizers.drop_connect`: a fresh mask
    per call, the same dropped matrix at every time step of the call); eval mode uses the weights as
    they are. Only the hidden-to-hidden weights are dropped: the Mogrifier matrices gate ``x`` and
    ``h`` before the cell (they are not recurrent transitions of the state) and stay untouched, as do
    the input weights and the RLSTM's within-step ``weight_fu`` / ``weight_oc``.

    ``implementation``: ``"sequence"`` (default) runs LSTM and RLSTM layers, with or without a
    Mogrifier, through :func:`models.bptt.recurrent_sequence` whenever a gradient is being recorded: the
    whole window is one autograd node with a hand-derived backward through time and every weight
    gradient one matrix multiply over all time steps. ``"autograd"`` always runs the per-step reference
    below (autograd differentiates each step); it is what the sequence implementation is tested against,
    and what double backward / forward-mode AD need. Without a gradient (evaluation, generation), under
    CUDA autocast, for the GRU / Elman cells and for empty sequences both run the reference loop. The two
    compute the same function; results agree to rounding. ``compile_steps`` (sequence only) runs the cells'
    per-step pointwise work through ``torch.compile``: on a GPU a step is then a few kernel launches besides
    its matrix multiplies; the first call in a process compiles (seconds).
    """

    def __init__(
        self,
        cell: str,
        input_size: int,
        hidden_size: int,
        mogrifier_rounds: int = 0,
        mogrifier_rank: int = 0,
        capped_input_gate: bool = True,
        chrono_t_max: float | None = None,
        forget_bias_init: float = 0.0,
        weight_drop: float = 0.0,
        implementation: Literal["sequence", "autograd"] = "sequence",
        compile_steps: bool = False,
    ) -> None:
        super().__init__()
        if implementation not in IMPLEMENTATIONS:
            raise ValueError(
                f"unknown implementation {implementation!r}; expected one of {', '.join(map(repr, IMPLEMENTATIONS))}"
            )
        self.implementation = implementation
        self.compile_steps = bool(compile_steps)
        if not 0.0 <= weight_drop < 1.0:  # also rejects NaN
            raise ValueError(f"weight_drop must be in [0, 1), got {weight_drop}")
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.cell_type = cell
        self.weight_drop = float(weight_drop)
        if cell == "lstm":
            self.cell: LSTMCell | RLSTMCell | GRUCell | ElmanCell = LSTMCell(
                input_size, hidden_size, capped_input_gate, chrono_t_max, forget_bias_init
            )
        elif cell == "rlstm":
            if not capped_input_gate:
                raise ValueError("the RLSTM input gate is always capped; capped_input_gate=False is not supported")
            self.cell = RLSTMCell(input_size, hidden_size, chrono_t_max, forget_bias_init)
        elif cell == "gru":
            self.cell = GRUCell(input_size, hidden_size, chrono_t_max, forget_bias_init)
        elif cell == "elman":
            if chrono_t_max is not None or forget_bias_init != 0.0:
                raise ValueError("the elman cell has no forget gate: chrono_t_max / forget_bias_init do not apply")
            self.cell = ElmanCell(input_size, hidden_size)
        else:
            raise ValueError(f"unknown cell {cell!r}; expected one of {', '.join(map(repr, CELL_TYPES))}")
        if weight_drop > 0 and not getattr(self.cell, "RECURRENT_WEIGHTS", ()):
            raise ValueError(
                f"weight_drop={weight_drop} needs a cell with a recurrent (hidden-to-hidden) weight matrix, and cell "
                f"{cell!r} declares none; set weight_drop to 0"
            )
        self.mogrifier = Mogrifier(input_size, hidden_size, mogrifier_rounds, mogrifier_rank)

    def forward(
        self,
        inputs: Tensor,
        state: tuple[Tensor, Tensor],
        state_mask: Tensor | None = None,
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        if inputs.dim() != 3 or inputs.shape[-1] != self.input_size:
            raise ValueError(f"inputs must be [T, B, {self.input_size}], got {tuple(inputs.shape)}")
        h, c = state
        seq_len = inputs.shape[0]
        if self._use_sequence(inputs, h, c):
            return self._forward_sequence(inputs, h, c, state_mask)
        # Weight drop: the recurrent matrix is dropped here, once, and bound into the step function.
        step = self.cell.make_step(self.weight_drop) if self.weight_drop > 0 and self.training else self.cell.make_step()
        outputs: list[Tensor] = [None] * seq_len  # type: ignore[list-item]
        if self.mogrifier.rounds == 0:
            # All input projections in one matmul; only the h-dependent part runs per step.
            # unbind (not xproj[t]): its backward is a single stack, whereas indexing
            # would allocate a full-size zero gradient per time step.
            xprojs = self.cell.input_projection(inputs).unbind(0)
            if state_mask is None:
                for t in range(seq_len):
                    h, c = step(xprojs[t], h, c, None)
                    outputs[t] = h
            else:
                for t in range(seq_len):
                    h, c = step(xprojs[t], h * state_mask, c, state_mask)
                    outputs[t] = h
        else:
            mog_params = self.mogrifier._round_params()
            mogrify = self.mogrifier._mogrify
            project = self.cell.input_projection
            xs = inputs.unbind(0)
            for t in range(seq_len):
                h_in = h if state_mask is None else h * state_mask
                x_t, h_in = mogrify(mog_params, xs[t], h_in)
                h, c = step(project(x_t), h_in, c, state_mask)
                outputs[t] = h
        if seq_len == 0:
            return inputs.new_zeros(0, inputs.shape[1], self.hidden_size), (h, c)
        return torch.stack(outputs), (h, c)

    def _use_sequence(self, inputs: Tensor, h: Tensor, c: Tensor) -> bool:
        """Whether this call goes through the hand-derived backward (see the class docstring)."""
        if self.implementation != "sequence" or self.cell_type not in SEQUENCE_CELLS or inputs.shape[0] == 0:
            return False
        if not torch.is_grad_enabled() or torch.is_autocast_enabled(inputs.device.type):
            return False
        return inputs.requires_grad or h.requires_grad or c.requires_grad or any(
            p.requires_grad for p in self.parameters()
        )

    def _forward_sequence(
        self, inputs: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None
    ) -> tuple[Tensor, tuple[Tensor, Tensor]]:
        cell = self.cell
        weight_hh = drop_connect(cell.weight_hh, self.weight_drop, self.training and self.weight_drop > 0)
        extras = (cell.weight_fu, cell.weight_oc, cell.bias_o) if self.cell_type == "rlstm" else ()
        mog = self.mogrifier
        rounds = tuple(
            (mog.lefts[r] if mog.low_rank else None, mog.rights[r] if mog.low_rank else mog.weights[r], mog.biases[r])
            for r in range(mog.rounds)
        )
        spec = SequenceSpec(
            self.cell_type, bool(getattr(cell, "capped_input_gate", True)), mog.rounds, self.compile_steps
        )
        outputs, h_last, c_last = recurrent_sequence(
            spec, inputs, h, c, state_mask, cell.weight_ih, weight_hh, cell.bias, extras, MogrifierParams(rounds)
        )
        return outputs, (h_last, c_last)

    def extra_repr(self) -> str:
        return f"cell={self.cell_type!r}" + (f", weight_drop={self.weight_drop}" if self.weight_drop else "")
