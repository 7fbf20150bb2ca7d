"""The LSTM and RLSTM cells' per-step forward and hand-derived backward (the parts between the matrix
multiplies that the sequence driver, :mod:`models.bptt.sequence`, batches over time).

Both cells see, per step, the pre-activations ``pre`` [B, G] = ``h_in W_hhᵀ + b (+ x W_ihᵀ on the first
Gx columns)``, written by the driver into :meth:`pre_buffer`, and the previous cell state ``c_prev``
[B, n]; ``h_in`` is the (masked, mogrified) previous output. The backward turns ``dh`` (gradient of the
step's output) and ``dc`` (of its cell state, from the next step) into ``d pre`` [B, G] (written into the
caller's buffer) and ``dc_prev``.

Notation as :mod:`models.cells`; ``σ' = σ(1 - σ)``, ``tanh' = 1 - tanh²``; the capped input gate
``ĩ = i - relu(i + f - 1)`` = ``min(i, 1 - f)``; where ``k = [i + f - 1 > 0]`` (the cap is active)
``∂ĩ/∂i = 1 - k`` and ``∂ĩ/∂f = -k`` (at a tie the reference's choice: relu's gradient at 0 is 0).

LSTM (G = Gx = 4n, blocks i, f, o, j)::

    forward:  i, f, o = σ(pre_ifo); j = tanh(pre_j); c = f ⊙ c_prev + ĩ ⊙ j; h = o ⊙ tanh(c)
    backward: dc += dh ⊙ o ⊙ tanh'(c);  d ĩ = dc ⊙ j
              d pre_i = d ĩ (1-k) σ'(i);  d pre_f = (dc ⊙ c_prev - d ĩ k) σ'(f)
              d pre_o = dh ⊙ tanh(c) σ'(o);  d pre_j = dc ⊙ ĩ tanh'(j);  dc_prev = dc ⊙ f

(without the cap, ĩ = i and k = 0.)

RLSTM (G = 3n, blocks i, j, f; Gx = 2n: the input feeds i and j only)::

    forward:  i = σ(pre_i); j = tanh(pre_j); u = i ⊙ j; f = σ(pre_f + u W_fuᵀ)
              c = f ⊙ c_prev + ĩ ⊙ j;  o = σ((c ⊙ M) W_ocᵀ + b_o);  h = o ⊙ tanh(c)
    backward: d a_o = dh ⊙ tanh(c) σ'(o);  dc += dh ⊙ o ⊙ tanh'(c) + (d a_o W_oc) ⊙ M
              d ĩ = dc ⊙ j;  d pre_f = (dc ⊙ c_prev - d ĩ k) σ'(f);  du = d pre_f W_fu
              d pre_i = (d ĩ (1-k) + du ⊙ j) σ'(i);  d pre_j = (dc ⊙ ĩ + du ⊙ i) tanh'(j);  dc_prev = dc ⊙ f

The RLSTM's own weights get deferred gradients: ``dW_oc = Σ d a_oᵀ (c ⊙ M)``, ``db_o = Σ d a_o``,
``dW_fu = Σ d pre_fᵀ u`` (one GEMM each over all steps).

Speed: the factors of the backward that do not depend on the incoming gradient (``σ'``, ``tanh(c) σ'(o)``,
``o tanh'(c)``, ``ĩ tanh'(j)``, ``k``) are computed in the forward step, while its activations are still in
cache, and stored instead of the activations they replace; each backward step then runs only the
operations that the recurrence makes sequential. In eager mode the gradient blocks are written straight
into their slots of ``d pre``; under ``torch.compile`` (whose ``out=`` must be contiguous) one ``cat``.
"""

from __future__ import annotations

import functools
from typing import Callable, TypeVar

import torch
from torch import Tensor

__all__ = ["LSTMTape", "RLSTMTape", "compiled", "eager"]

F = TypeVar("F", bound=Callable[..., object])


def eager(kernel: F) -> F:
    """Run a pointwise kernel as it is (one ATen call per operation)."""
    return kernel


@functools.cache
def compiled(kernel: F) -> F:
    """The kernel compiled by ``torch.compile`` (one fused loop on CPU, one or two Triton kernels on CUDA instead
    of a dozen launches), compiled once per kernel and process; graph breaks are errors."""
    return torch.compile(kernel, fullgraph=True)  # type: ignore[return-value]


def _write_blocks(dpre: Tensor, blocks: list[Tensor]) -> None:
    """``dpre`` [B, len(blocks)·n] = the blocks side by side."""
    if torch.compiler.is_compiling():
        torch.cat(blocks, 1, out=dpre)
    else:
        for slot, block in zip(dpre.chunk(len(blocks), 1), blocks):
            slot.copy_(block)


# The pointwise kernels write into the caller's buffers (views of the [T, B, ·] tapes), so that the eager and
# the compiled runs share one definition; every argument is a tensor, None or a constant of the layer.


def lstm_forward_pointwise(a: Tensor, c_prev: Tensor, active: Tensor | None, k_f: Tensor, k_c: Tensor, k_j: Tensor,
                           cell: Tensor, out: Tensor, n: int) -> None:
    """``a`` [B, 4n] holds the pre-activations; afterwards it holds (σ'(i), f, tanh(c) σ'(o), j). Fills the [B, n]
    buffers ``active`` (k; None: no cap), ``k_f`` = σ'(f), ``k_c`` = o tanh'(c),
    ``k_j`` = ĩ tanh'(j), ``cell`` (c) and ``out`` (h)."""
    a[:, : 3 * n].sigmoid_()
    a[:, 3 * n :].tanh_()
    i, f, o, j = a.chunk(4, 1)
    if active is not None:
        cap = (i + f - 1.0).relu_()
        torch.gt(cap, 0.0, out=active)
        i_eff = i - cap
    else:
        i_eff = i
    c = torch.mul(f, c_prev, out=cell).addcmul_(i_eff, j)
    tc = c.tanh()
    torch.mul(o, tc, out=out)
    torch.mul(i_eff, 1.0 - j * j, out=k_j)
    torch.mul(f, 1.0 - f, out=k_f)
    torch.mul(o, 1.0 - tc * tc, out=k_c)
    o.mul_(1.0 - o).mul_(tc)  # the o slot becomes k_o
    i.mul_(1.0 - i)  # the i slot becomes σ'(i) (ĩ is in k_j already)


def lstm_backward_pointwise(dh: Tensor, dc: Tensor, c_prev: Tensor, a: Tensor, active: Tensor | None, k_f: Tensor,
                            k_c: Tensor, k_j: Tensor, dpre: Tensor) -> Tensor:
    """Fill ``dpre`` [B, 4n]; update ``dc`` [B, n] in place to ``dc_prev`` and return it (module docstring)."""
    k_i, f, k_o, j = a.chunk(4, 1)
    dc.addcmul_(dh, k_c)
    d_f = dc * c_prev
    if active is not None:
        d_ieff = dc * j
        d_ieff_cap = torch.where(active, d_ieff, 0.0)
        d_i = d_ieff.sub_(d_ieff_cap)
        d_f.sub_(d_ieff_cap)
    else:
        d_i = dc * j
    _write_blocks(dpre, [d_i.mul_(k_i), d_f.mul_(k_f), dh * k_o, dc * k_j])
    return dc.mul_(f)


def rlstm_forward_pointwise(a: Tensor, c_prev: Tensor, state_mask: Tensor | None, weight_fu_t: Tensor,
                            weight_oc_t: Tensor, bias_o: Tensor, u: Tensor, active: Tensor, i_eff: Tensor,
                            k_i: Tensor, k_f: Tensor, k_j: Tensor, k_o: Tensor, k_c: Tensor, cell: Tensor,
                            cell_masked: Tensor | None, out: Tensor, n: int) -> None:
    """``a`` [B, 3n] holds the pre-activations (f's without ``u W_fuᵀ``); afterwards (i, j, f). Fills the [B, n]
    buffers ``u`` = i ⊙ j, ``active`` (k), ``i_eff`` (ĩ), the factors ``k_i`` = σ'(i), ``k_f`` = σ'(f),
    ``k_j`` = tanh'(j), ``k_o`` = tanh(c) σ'(o), ``k_c`` = o tanh'(c), and ``cell``, ``cell_masked`` (c ⊙ M;
    None without a state mask), ``out`` (h)."""
    a[:, :n].sigmoid_()
    a[:, n : 2 * n].tanh_()
    i, j, f = a.chunk(3, 1)
    f.addmm_(torch.mul(i, j, out=u), weight_fu_t).sigmoid_()
    cap = (i + f - 1.0).relu_()
    torch.gt(cap, 0.0, out=active)
    torch.sub(i, cap, out=i_eff)
    c = torch.mul(f, c_prev, out=cell).addcmul_(i_eff, j)
    c_masked = c if state_mask is None or cell_masked is None else torch.mul(c, state_mask, out=cell_masked)
    o = torch.addmm(bias_o, c_masked, weight_oc_t).sigmoid_()
    tc = c.tanh()
    torch.mul(o, tc, out=out)
    torch.mul(i, 1.0 - i, out=k_i)
    torch.mul(f, 1.0 - f, out=k_f)
    torch.mul(j, j, out=k_j).neg_().add_(1.0)
    torch.mul(o, 1.0 - tc * tc, out=k_c)
    torch.mul(o, 1.0 - o, out=k_o).mul_(tc)


def rlstm_backward_pointwise(dh: Tensor, dc: Tensor, c_prev: Tensor, state_mask: Tensor | None, a: Tensor,
                             i_eff: Tensor, active: Tensor, k_i: Tensor, k_f: Tensor, k_j: Tensor, k_o: Tensor,
                             k_c: Tensor, weight_fu: Tensor, weight_oc: Tensor, d_ao: Tensor, dpre: Tensor) -> Tensor:
    """Fill ``dpre`` [B, 3n] and ``d_ao`` [B, n]; update ``dc`` in place to ``dc_prev`` and return it."""
    i, j, f = a.chunk(3, 1)
    torch.mul(dh, k_o, out=d_ao)
    d_cm = d_ao.mm(weight_oc)
    dc.addcmul_(dh, k_c)
    if state_mask is None:
        dc.add_(d_cm)
    else:
        dc.addcmul_(d_cm, state_mask)
    d_ieff = dc * j
    d_ieff_cap = torch.where(active, d_ieff, 0.0)
    d_f = (dc * c_prev).sub_(d_ieff_cap).mul_(k_f)
    du = d_f.mm(weight_fu)
    d_i = d_ieff.sub_(d_ieff_cap).addcmul_(du, j).mul_(k_i)
    d_j = (dc * i_eff).addcmul_(du, i).mul_(k_j)
    _write_blocks(dpre, [d_i, d_j, d_f])
    return dc.mul_(f)


class LSTMTape:
    """Per-step LSTM forward / backward over [T, B, ·] buffers: ``act`` [T, B, 4n] (after the forward: σ'(i), f,
    tanh(c) σ'(o), j), the factors ``k_f``, ``k_c``, ``k_j``, ``cell`` (c), ``out`` (h), all [T, B, n], and with the
    cap ``active`` (bool). ``kernels`` is :func:`eager` or :func:`compiled`."""

    gates_per_unit = 4
    input_gates_per_unit = 4

    def __init__(self, steps: int, batch: int, hidden: int, capped: bool, like: Tensor,
                 kernels: Callable[[F], F] = eager) -> None:
        self.n = hidden
        self.kernels = kernels
        shape = (steps, batch, hidden)
        self.act = like.new_empty(steps, batch, 4 * hidden)
        self.k_f = like.new_empty(shape)
        self.k_c = like.new_empty(shape)
        self.k_j = like.new_empty(shape)
        self.cell = like.new_empty(shape)
        self.out = like.new_empty(shape)
        self.active = like.new_empty(shape, dtype=torch.bool) if capped else None

    def pre_buffer(self, t: int) -> Tensor:
        """Where the step's pre-activations [B, 4n] go (replaced in place by the forward step)."""
        return self.act[t]

    def forward_step(self, t: int, c_prev: Tensor, state_mask: Tensor | None) -> None:
        active = self.active[t] if self.active is not None else None
        self.kernels(lstm_forward_pointwise)(self.act[t], c_prev, active, self.k_f[t], self.k_c[t], self.k_j[t],
                                            self.cell[t], self.out[t], self.n)

    def start_backward(self) -> None:
        """Nothing to prepare: the forward stored the factors."""

    def backward_step(self, t: int, dh: Tensor, dc: Tensor, c_prev: Tensor, state_mask: Tensor | None,
                      dpre: Tensor) -> Tensor:
        """Write ``d pre`` [B, 4n] into ``dpre``; return ``dc_prev`` [B, n]. ``dc`` is updated in place
        (the driver owns it)."""
        active = self.active[t] if self.active is not None else None
        return self.kernels(lstm_backward_pointwise)(dh, dc, c_prev, self.act[t], active, self.k_f[t], self.k_c[t],
                                                     self.k_j[t], dpre)

    def extra_weight_grads(self, state_mask: Tensor | None, dpre_all: Tensor) -> list[Tensor]:
        return []


class RLSTMTape:
    """Per-step RLSTM forward / backward over [T, B, ·] buffers: ``act`` [T, B, 3n] (i, j, f after their
    nonlinearities); ``u`` (i ⊙ j), ``active`` (k, bool), ``i_eff`` (ĩ), the factors ``k_i``, ``k_f``, ``k_j``,
    ``k_o``, ``k_c``, ``cell`` (c), ``cell_masked`` (c ⊙ M), ``out`` (h), all [T, B, n]; and, in the backward,
    ``d_ao`` [T, B, n] (the output gate's pre-activation gradient) for the deferred ``W_oc`` gradient.
    ``kernels`` is :func:`eager` or :func:`compiled`."""

    gates_per_unit = 3
    input_gates_per_unit = 2

    def __init__(self, steps: int, batch: int, hidden: int, weight_fu: Tensor, weight_oc: Tensor, bias_o: Tensor,
                 like: Tensor, kernels: Callable[[F], F] = eager) -> None:
        self.n = hidden
        self.kernels = kernels
        self.weight_fu = weight_fu
        self.weight_oc = weight_oc
        self.bias_o = bias_o
        self._weight_fu_t = weight_fu.t()
        self._weight_oc_t = weight_oc.t()
        self.act = like.new_empty(steps, batch, 3 * hidden)
        shape = (steps, batch, hidden)
        self.u = like.new_empty(shape)
        self.active = like.new_empty(shape, dtype=torch.bool)
        self.i_eff = like.new_empty(shape)
        self.k_i = like.new_empty(shape)
        self.k_f = like.new_empty(shape)
        self.k_j = like.new_empty(shape)
        self.k_o = like.new_empty(shape)
        self.k_c = like.new_empty(shape)
        self.cell = like.new_empty(shape)
        self.cell_masked: Tensor | None = None
        self.out = like.new_empty(shape)
        self.d_ao: Tensor | None = None

    def pre_buffer(self, t: int) -> Tensor:
        return self.act[t]

    def forward_step(self, t: int, c_prev: Tensor, state_mask: Tensor | None) -> None:
        if state_mask is not None and self.cell_masked is None:
            self.cell_masked = torch.empty_like(self.cell)
        cell_masked = self.cell_masked[t] if self.cell_masked is not None else None
        self.kernels(rlstm_forward_pointwise)(
            self.act[t], c_prev, state_mask, self._weight_fu_t, self._weight_oc_t, self.bias_o, self.u[t],
            self.active[t], self.i_eff[t], self.k_i[t], self.k_f[t], self.k_j[t], self.k_o[t], self.k_c[t],
            self.cell[t], cell_masked, self.out[t], self.n,
        )

    def start_backward(self) -> None:
        self.d_ao = torch.empty_like(self.out)

    def backward_step(self, t: int, dh: Tensor, dc: Tensor, c_prev: Tensor, state_mask: Tensor | None,
                      dpre: Tensor) -> Tensor:
        """Write ``d pre`` [B, 3n] into ``dpre`` (and ``d a_o`` into ``d_ao[t]``); return ``dc_prev`` [B, n]."""
        assert self.d_ao is not None, "start_backward() first"
        return self.kernels(rlstm_backward_pointwise)(
            dh, dc, c_prev, state_mask, self.act[t], self.i_eff[t], self.active[t], self.k_i[t], self.k_f[t],
            self.k_j[t], self.k_o[t], self.k_c[t], self.weight_fu, self.weight_oc, self.d_ao[t], dpre,
        )

    def extra_weight_grads(self, state_mask: Tensor | None, dpre_all: Tensor) -> list[Tensor]:
        """``[dW_fu, dW_oc, db_o]`` from the whole sequence (``dpre_all`` [T, B, 3n])."""
        assert self.d_ao is not None, "start_backward() first"
        n = self.n
        d_ao = self.d_ao.flatten(0, 1)
        cell = self.cell if self.cell_masked is None else self.cell_masked
        d_f = dpre_all.flatten(0, 1)[:, 2 * n :]
        return [d_f.t() @ self.u.flatten(0, 1), d_ao.t() @ cell.flatten(0, 1), d_ao.sum(0)]
