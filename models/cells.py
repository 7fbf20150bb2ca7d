"""Single-step recurrent cells: LSTM (thesis eq. 2.1), Rewired LSTM (§4.1), GRU and Elman RNN.

Conventions shared by all cells
-------------------------------
* ``forward(x [B, m], h [B, n], c [B, n], state_mask=None) -> (h, c)``.
* ``h`` is the previous output *as the cell should see it*: in a layer, the
  variational state-dropout mask has already been applied to it (and it may
  have been mogrified). The cells never mask ``h`` or ``c_prev`` themselves.
* ``state_mask`` ([B, n] or None) is the layer's variational state-dropout mask.
  It is only used where the cell equations use it internally: the RLSTM output
  gate ``o = σ(W_oc (c ⊙ M_state) + b_o)`` (thesis §4.2). ``LSTMCell`` accepts
  it for interface uniformity and ignores it.
* For speed, a layer precomputes the input-dependent part of the gates for all
  time steps with :meth:`input_projection` (one big matmul) and then calls the
  step function returned by :meth:`make_step` once per time step;
  ``forward`` is exactly ``make_step()(input_projection(x), h, c, state_mask)``.
* Weight drop (DropConnect, AWD-LSTM): ``make_step(weight_drop=p)`` binds a dropped copy of the
  recurrent (hidden-to-hidden) matrix ``weight_hh`` (:func:`models.regularizers.drop_connect`, one
  mask per call, only in training mode), so every step of the returned function uses the same
  dropped matrix. ``weight_hh`` is the only recurrent matrix of every cell (``RECURRENT_WEIGHTS``):
  the RLSTM's ``weight_fu`` and ``weight_oc`` act within a time step (on ``i ⊙ j`` and on the new
  ``c``), and the input weights ``weight_ih`` are not recurrent; none of them is dropped.

* The GRU and the Elman RNN have a single state vector. So that every layer and
  model keeps carrying ``(h, c)`` pairs (``LMState``, ``RecurrentLayer``), they
  return ``(h, h)``: the "cell state" ``c`` is the (unmasked, unmogrified)
  previous output. The GRU interpolates with ``c`` (``h' = (1 - u) ⊙ n + u ⊙ c``)
  and reads the masked ``h`` only in its recurrent matmul, so state dropout
  never erases its memory (as ``c_prev`` is never masked in the LSTMs). Called
  directly, pass ``c = h``. The Elman cell ignores ``c``.

Initialisation: every weight and bias ~ U(-1/√n, 1/√n) (as ``torch.nn.LSTM``),
except the forget-gate bias, which is Chrono-initialised
``b_f ~ ln U(1, T_max - 1)`` when ``chrono_t_max`` is given and set to the
constant ``forget_bias_init`` otherwise. The GRU's forget gate is its update
gate ``u`` (the weight of the previous state); the Elman cell has none.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch import Tensor, nn

from .regularizers import drop_connect

__all__ = ["ElmanCell", "GRUCell", "LSTMCell", "RLSTMCell", "init_forget_bias"]

StepFn = Callable[[Tensor, Tensor, Tensor, "Tensor | None"], "tuple[Tensor, Tensor]"]


def init_forget_bias(bias: Tensor, chrono_t_max: float | None, forget_bias_init: float) -> None:
    """In-place forget-bias init: Chrono ``ln U(1, T_max-1)`` or a constant."""
    with torch.no_grad():
        if chrono_t_max is not None:
            if not chrono_t_max > 2:
                raise ValueError(f"chrono_t_max must be > 2, got {chrono_t_max}")
            bias.uniform_(1.0, chrono_t_max - 1.0).log_()
        else:
            bias.fill_(forget_bias_init)


def _cap(i: Tensor, f: Tensor) -> Tensor:
    """``min(i, 1 - f)`` written as ``i - relu(i + f - 1)``: identical values, but its
    backward is ~4x cheaper on CPU than ``torch.minimum``'s (which handles ties with
    extra masks). At an exact tie the gradient goes to ``i`` only (a measure-zero set)."""
    return i - (i + f - 1.0).relu()


def _project(x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
    """``x W^T (+ bias)`` over the last axis: [..., m] -> [..., out] (one matmul over all leading axes)."""
    flat = x if x.dim() == 2 else x.reshape(-1, x.shape[-1])
    out = torch.mm(flat, weight.t()) if bias is None else torch.addmm(bias, flat, weight.t())
    return out if x.dim() == 2 else out.view(*x.shape[:-1], -1)


def _uniform_init(cell: nn.Module) -> None:
    """Every parameter of ``cell`` ~ U(-1/√n, 1/√n), n = its hidden size (as ``torch.nn.LSTM``)."""
    bound = 1.0 / math.sqrt(cell.hidden_size)
    for p in cell.parameters():
        nn.init.uniform_(p, -bound, bound)


def _check_sizes(input_size: int, hidden_size: int) -> None:
    if input_size <= 0 or hidden_size <= 0:
        raise ValueError(f"input_size and hidden_size must be > 0, got {input_size}, {hidden_size}")


class LSTMCell(nn.Module):
    """LSTM cell (eq. 2.1), optionally with the input gate capped at ``1 - f``.

    ``c = f ⊙ c_prev + min(i, 1 - f) ⊙ j`` if ``capped_input_gate`` else
    ``c = f ⊙ c_prev + i ⊙ j``.

    Parameters (gate blocks stacked in the order **i, f, o, j**, each ``n`` rows):
    ``weight_ih`` [4n, m], ``weight_hh`` [4n, n], ``bias`` [4n].
    """

    GATE_ORDER = ("i", "f", "o", "j")
    RECURRENT_WEIGHTS = ("weight_hh",)  # the hidden-to-hidden matrices (weight drop)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        capped_input_gate: bool = True,
        chrono_t_max: float | None = None,
        forget_bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        self.capped_input_gate = capped_input_gate
        self.weight_ih = nn.Parameter(torch.empty(4 * hidden_size, input_size))
        self.weight_hh = nn.Parameter(torch.empty(4 * hidden_size, hidden_size))
        self.bias = nn.Parameter(torch.empty(4 * hidden_size))
        self.reset_parameters(chrono_t_max, forget_bias_init)

    def reset_parameters(self, chrono_t_max: float | None = None, forget_bias_init: float = 0.0) -> None:
        _uniform_init(self)
        n = self.hidden_size
        init_forget_bias(self.bias[n : 2 * n], chrono_t_max, forget_bias_init)

    @property
    def forget_bias(self) -> Tensor:
        n = self.hidden_size
        return self.bias[n : 2 * n]

    def input_projection(self, x: Tensor) -> Tensor:
        """``W_x x + b`` for all four gates: [..., m] -> [..., 4n]."""
        return _project(x, self.weight_ih, self.bias)

    def make_step(self, weight_drop: float = 0.0) -> StepFn:
        """Step function ``(xproj [B,4n], h, c, state_mask) -> (h, c)`` with weights bound (``weight_hh``
        weight-dropped with rate ``weight_drop`` in training mode, one mask for every step)."""
        w_hh_t = drop_connect(self.weight_hh, weight_drop, self.training).t()
        n = self.hidden_size
        capped = self.capped_input_gate
        split_sizes = (3 * n, n)

        def step(xproj: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None):
            gates = torch.addmm(xproj, h, w_hh_t)
            # split/chunk rather than slicing: one cat in backward instead of a
            # zero-filled full-size gradient per slice.
            ifo, j = gates.split(split_sizes, 1)
            i, f, o = ifo.sigmoid().chunk(3, 1)
            j = j.tanh()
            if capped:
                i = _cap(i, f)
            c = torch.addcmul(f * c, i, j)
            h = o * c.tanh()
            return h, c

        return step

    def forward(self, x: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.make_step()(self.input_projection(x), h, c, state_mask)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}, capped_input_gate={self.capped_input_gate}"


class RLSTMCell(nn.Module):
    """Rewired LSTM cell (thesis §4.1)::

        i = σ(W_ix x + W_ih h + b_i)
        j = tanh(W_jx x + W_jh h + b_j)
        f = σ(W_fu (i ⊙ j) + W_fh h + b_f)
        c = f ⊙ c_prev + min(i, 1 - f) ⊙ j
        o = σ(W_oc (c ⊙ M_state) + b_o)          (M_state = 1 when state_mask is None)
        h = o ⊙ tanh(c)

    Parameters: ``weight_ih`` [2n, m] (blocks i, j), ``weight_hh`` [3n, n]
    (blocks i, j, f), ``bias`` [3n] (b_i, b_j, b_f), ``weight_fu`` [n, n],
    ``weight_oc`` [n, n], ``bias_o`` [n].
    """

    # The hidden-to-hidden matrices (weight drop); weight_fu and weight_oc act within a time step.
    RECURRENT_WEIGHTS = ("weight_hh",)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        chrono_t_max: float | None = None,
        forget_bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        n = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(2 * n, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * n, n))
        self.bias = nn.Parameter(torch.empty(3 * n))
        self.weight_fu = nn.Parameter(torch.empty(n, n))
        self.weight_oc = nn.Parameter(torch.empty(n, n))
        self.bias_o = nn.Parameter(torch.empty(n))
        self.reset_parameters(chrono_t_max, forget_bias_init)

    def reset_parameters(self, chrono_t_max: float | None = None, forget_bias_init: float = 0.0) -> None:
        _uniform_init(self)
        n = self.hidden_size
        init_forget_bias(self.bias[2 * n :], chrono_t_max, forget_bias_init)

    @property
    def forget_bias(self) -> Tensor:
        return self.bias[2 * self.hidden_size :]

    def input_projection(self, x: Tensor) -> Tensor:
        """``[W_ix x, W_jx x]`` (no bias; biases are added in the step): [..., m] -> [..., 2n]."""
        return _project(x, self.weight_ih, None)

    def make_step(self, weight_drop: float = 0.0) -> StepFn:
        """Step function ``(xproj [B,2n], h, c, state_mask) -> (h, c)`` with weights bound (``weight_hh``
        weight-dropped with rate ``weight_drop`` in training mode, one mask for every step)."""
        n = self.hidden_size
        w_hh_t = drop_connect(self.weight_hh, weight_drop, self.training).t()
        w_fu_t = self.weight_fu.t()
        w_oc_t = self.weight_oc.t()
        bias = self.bias
        bias_o = self.bias_o
        split_sizes = (2 * n, n)

        def step(xproj: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None):
            g = torch.addmm(bias, h, w_hh_t)  # [B, 3n]: (W_ih h + b_i, W_jh h + b_j, W_fh h + b_f)
            ij_h, f_h = g.split(split_sizes, 1)
            i, j = (ij_h + xproj).chunk(2, 1)
            i = i.sigmoid()
            j = j.tanh()
            f = torch.addmm(f_h, i * j, w_fu_t).sigmoid()
            c = torch.addcmul(f * c, _cap(i, f), j)
            cm = c if state_mask is None else c * state_mask
            o = torch.addmm(bias_o, cm, w_oc_t).sigmoid()
            h = o * c.tanh()
            return h, c

        return step

    def forward(self, x: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.make_step()(self.input_projection(x), h, c, state_mask)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class GRUCell(nn.Module):
    """Gated recurrent unit with the ``torch.nn.GRUCell`` equations (reset gate inside the candidate)::

        r = σ(W_ir x + b_ir + W_hr h + b_hr)
        u = σ(W_iu x + b_iu + W_hu h + b_hu)          (update gate: the weight of the previous state)
        n = tanh(W_in x + b_in + r ⊙ (W_hn h + b_hn))
        h' = (1 - u) ⊙ n + u ⊙ c                       (c = the previous state, unmasked; = h without dropout)

    Returns ``(h', h')`` (see the module docstring). Parameters (blocks **r, u, n**, each ``n`` rows, as
    torch's ``r, z, n``): ``weight_ih`` [3n, m], ``weight_hh`` [3n, n], ``bias_ih`` [3n], ``bias_hh`` [3n].
    The update-gate bias is the forget bias: ``bias_ih[n:2n]`` gets the Chrono / constant init and
    ``bias_hh[n:2n]`` is zeroed. ``state_mask`` is accepted for interface uniformity and ignored.
    """

    GATE_ORDER = ("r", "u", "n")
    RECURRENT_WEIGHTS = ("weight_hh",)  # the hidden-to-hidden matrices (weight drop)

    def __init__(
        self,
        input_size: int,
        hidden_size: int,
        chrono_t_max: float | None = None,
        forget_bias_init: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        n = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(3 * n, input_size))
        self.weight_hh = nn.Parameter(torch.empty(3 * n, n))
        self.bias_ih = nn.Parameter(torch.empty(3 * n))
        self.bias_hh = nn.Parameter(torch.empty(3 * n))
        self.reset_parameters(chrono_t_max, forget_bias_init)

    def reset_parameters(self, chrono_t_max: float | None = None, forget_bias_init: float = 0.0) -> None:
        _uniform_init(self)
        n = self.hidden_size
        init_forget_bias(self.bias_ih[n : 2 * n], chrono_t_max, forget_bias_init)
        with torch.no_grad():
            self.bias_hh[n : 2 * n].zero_()

    @property
    def forget_bias(self) -> Tensor:
        """The update gate's total bias ``b_iu + b_hu`` [n]."""
        n = self.hidden_size
        return self.bias_ih[n : 2 * n] + self.bias_hh[n : 2 * n]

    def input_projection(self, x: Tensor) -> Tensor:
        """``W_i x + b_i`` for r, u, n: [..., m] -> [..., 3n]."""
        return _project(x, self.weight_ih, self.bias_ih)

    def make_step(self, weight_drop: float = 0.0) -> StepFn:
        """Step function ``(xproj [B,3n], h, c, state_mask) -> (h', h')`` with weights bound (``weight_hh``
        weight-dropped with rate ``weight_drop`` in training mode, one mask for every step)."""
        n = self.hidden_size
        w_hh_t = drop_connect(self.weight_hh, weight_drop, self.training).t()
        bias_hh = self.bias_hh
        split_sizes = (2 * n, n)

        def step(xproj: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None):
            x_ru, x_n = xproj.split(split_sizes, 1)
            h_ru, h_n = torch.addmm(bias_hh, h, w_hh_t).split(split_sizes, 1)
            r, u = (x_ru + h_ru).sigmoid().chunk(2, 1)
            cand = torch.addcmul(x_n, r, h_n).tanh()
            h_new = torch.addcmul(cand, u, c - cand)  # (1 - u) ⊙ n + u ⊙ c
            return h_new, h_new

        return step

    def forward(self, x: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.make_step()(self.input_projection(x), h, c, state_mask)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"


class ElmanCell(nn.Module):
    """Vanilla (Elman) RNN cell, as ``torch.nn.RNNCell`` with tanh::

        h' = tanh(W_ih x + b_ih + W_hh h + b_hh)

    Returns ``(h', h')``; ``c`` and ``state_mask`` are accepted for interface uniformity and ignored.
    Parameters: ``weight_ih`` [n, m], ``weight_hh`` [n, n], ``bias_ih`` [n], ``bias_hh`` [n].
    """

    RECURRENT_WEIGHTS = ("weight_hh",)  # the hidden-to-hidden matrix (weight drop)

    def __init__(self, input_size: int, hidden_size: int) -> None:
        super().__init__()
        _check_sizes(input_size, hidden_size)
        self.input_size = input_size
        self.hidden_size = hidden_size
        n = hidden_size
        self.weight_ih = nn.Parameter(torch.empty(n, input_size))
        self.weight_hh = nn.Parameter(torch.empty(n, n))
        self.bias_ih = nn.Parameter(torch.empty(n))
        self.bias_hh = nn.Parameter(torch.empty(n))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        _uniform_init(self)

    def input_projection(self, x: Tensor) -> Tensor:
        """``W_ih x + b_ih + b_hh``: [..., m] -> [..., n] (both biases folded in here)."""
        return _project(x, self.weight_ih, self.bias_ih + self.bias_hh)

    def make_step(self, weight_drop: float = 0.0) -> StepFn:
        """Step function ``(xproj [B,n], h, c, state_mask) -> (h', h')`` with weights bound (``weight_hh``
        weight-dropped with rate ``weight_drop`` in training mode, one mask for every step)."""
        w_hh_t = drop_connect(self.weight_hh, weight_drop, self.training).t()

        def step(xproj: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None):
            h_new = torch.addmm(xproj, h, w_hh_t).tanh()
            return h_new, h_new

        return step

    def forward(self, x: Tensor, h: Tensor, c: Tensor, state_mask: Tensor | None = None) -> tuple[Tensor, Tensor]:
        return self.make_step()(self.input_projection(x), h, c, state_mask)

    def extra_repr(self) -> str:
        return f"{self.input_size}, {self.hidden_size}"
