"""A whole recurrent layer (LSTM or RLSTM, with or without a Mogrifier) as one autograd function with a
hand-derived backward through time, as cuDNN structures its RNNs.

Forward (no autograd graph): per step, ``h_in = mogrify(h_prev ⊙ M, x_t)``, the pre-activations
``pre = h_in W_hhᵀ + b (+ x W_ihᵀ on the input gates)`` and the cell's pointwise part
(:mod:`models.bptt.cells`), keeping the activations the backward needs in [T, B, ·] buffers. Without a
Mogrifier the input projection of every step is one GEMM over the whole sequence before the loop.

Backward: the recurrence runs once, in reverse, computing per step only what the next (earlier) step
needs: ``d pre`` (stored), ``d h_in = d pre W_hh`` (and, with a Mogrifier, ``d x_mog = d pre_x W_ih``
through the Mogrifier's rounds), ``dh_prev = d h_in ⊙ M`` and ``dc_prev``. Every weight gradient is then
one matrix multiply over all ``T·B`` rows (``dW_hh = Σ_t d preᵀ h_in``, ``dW_ih = Σ_t d pre_xᵀ x``, the
Mogrifier's and the RLSTM's own), and without a Mogrifier the input gradient too (``dx = d pre_x W_ih``).

The function is first-order only: double backward (``create_graph=True``, which raises a clear error),
forward-mode AD and ``torch.func`` transforms need the reference implementation
(``RecurrentLayer(implementation="autograd")``, ``model.cell_implementation: autograd``).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor
from torch.autograd.function import FunctionCtx

from .cells import LSTMTape, RLSTMTape, compiled, eager
from .mogrifier import MogrifierParams, MogrifierTape

__all__ = ["SEQUENCE_CELLS", "SequenceSpec", "recurrent_sequence"]

SEQUENCE_CELLS = ("lstm", "rlstm")


@dataclass(frozen=True)
class SequenceSpec:
    """What the layer is: ``cell`` (lstm / rlstm), ``capped`` (LSTM input-gate cap), ``rounds`` (Mogrifier); and
    ``compiled_steps``: run the cells' per-step pointwise kernels through ``torch.compile`` (fused: on a GPU one or
    two kernel launches per step instead of a dozen; the first call of a process compiles)."""

    cell: str
    capped: bool
    rounds: int
    compiled_steps: bool = False

    def __post_init__(self) -> None:
        if self.cell not in SEQUENCE_CELLS:
            raise ValueError(f"the sequence implementation covers cells {SEQUENCE_CELLS}, not {self.cell!r}")


class _RecurrentSequence(torch.autograd.Function):
    """``apply(spec, x, h0, c0, state_mask, weight_ih, weight_hh, bias, *cell_extras, *mogrifier_flat)``.

    ``cell_extras`` is empty for the LSTM and ``(weight_fu, weight_oc, bias_o)`` for the RLSTM. Returns
    ``(outputs [T, B, n], h_T [B, n], c_T [B, n])``.
    """

    @staticmethod
    def forward(ctx: FunctionCtx, spec: SequenceSpec, x: Tensor, h0: Tensor, c0: Tensor, state_mask: Tensor | None,
                weight_ih: Tensor, weight_hh: Tensor, bias: Tensor, *rest: Tensor | None):
        steps, batch, _m = x.shape
        n = h0.shape[1]
        extras, mog = (rest[:3], rest[3:]) if spec.cell == "rlstm" else ((), rest)
        mog_params = MogrifierParams.from_flat(mog)
        kernels = compiled if spec.compiled_steps else eager
        if spec.cell == "lstm":
            tape: LSTMTape | RLSTMTape = LSTMTape(steps, batch, n, spec.capped, x, kernels)
        else:
            tape = RLSTMTape(steps, batch, n, *extras, like=x, kernels=kernels)  # type: ignore[misc]
        gx = tape.input_gates_per_unit * n
        full_input = gx == tape.gates_per_unit * n  # the input feeds every gate (LSTM)
        w_hh_t = weight_hh.t()
        w_ih_t = weight_ih.t()
        mog_tape = MogrifierTape(mog_params, steps, batch, x.shape[2], n, x) if mog_params.count else None
        # What each step's W_hh multiplies; without mask and Mogrifier that is the previous output itself.
        # With a Mogrifier, every gate of the LSTM reads [x_mog, h_in]: one GEMM per step against [W_ih, W_hh]
        # (forward and backward) and one for both weight gradients, instead of two each.
        joint = mog_tape is not None and full_input
        w_joint_t = torch.cat([weight_ih, weight_hh], 1).t() if joint else None
        xh_all = x.new_empty(steps, batch, x.shape[2] + n) if joint else None
        if xh_all is not None:
            x_mog_all, h_in_all = xh_all.split([x.shape[2], n], 2)  # what W_ih and W_hh multiply
        else:
            h_in_all = x.new_empty(steps, batch, n) if mog_tape is not None or state_mask is not None else None
            x_mog_all = x.new_empty(x.shape) if mog_tape is not None else x
        x_proj = None
        if mog_tape is None:  # one GEMM for the whole sequence's input projection (the LSTM's bias folded in)
            x_flat = x.flatten(0, 1)
            if full_input:  # straight into the activation buffer: each step then adds h_in W_hhᵀ in place
                x_proj = torch.addmm(bias, x_flat, w_ih_t, out=tape.act.view(steps * batch, gx)).view(steps, batch, gx)
            else:
                x_proj = torch.mm(x_flat, w_ih_t).view(steps, batch, gx)
        h, c = h0, c0
        for t in range(steps):
            if mog_tape is not None:
                h_masked = mog_tape.first_source(t)
                if state_mask is None:
                    h_masked.copy_(h)
                else:
                    torch.mul(h, state_mask, out=h_masked)
                h_in = h_in_all[t]  # type: ignore[index]
                mog_tape.forward_step(t, x[t], x_mog_all[t], h_in)
            elif h_in_all is not None:
                h_in = torch.mul(h, state_mask, out=h_in_all[t])
            else:
                h_in = h
            pre = tape.pre_buffer(t)
            if xh_all is not None:
                torch.addmm(bias, xh_all[t], w_joint_t, out=pre)
            elif x_proj is None:
                torch.addmm(bias, h_in, w_hh_t, out=pre)
                pre[:, :gx].addmm_(x_mog_all[t], w_ih_t)
            elif full_input:
                pre.addmm_(h_in, w_hh_t)  # pre already holds x W_ihᵀ + b
            else:
                torch.addmm(bias, h_in, w_hh_t, out=pre).narrow(1, 0, gx).add_(x_proj[t])
            tape.forward_step(t, c, state_mask)
            h, c = tape.out[t], tape.cell[t]
        ctx.spec = spec
        ctx.tape = tape
        ctx.mog_tape = mog_tape
        ctx.gx = gx
        ctx.has_mask = state_mask is not None
        ctx.h_in_all = h_in_all
        ctx.x_mog_all = x_mog_all if mog_tape is not None else None
        ctx.xh_all = xh_all
        ctx.save_for_backward(x, h0, c0, state_mask if state_mask is not None else x.new_empty(0), weight_ih, weight_hh)
        ctx.set_materialize_grads(False)
        # Clones: an autograd function may not return views of its other outputs.
        return tape.out, tape.out[-1].clone(), tape.cell[-1].clone()

    @staticmethod
    def backward(ctx: FunctionCtx, d_out: Tensor | None, d_h_last: Tensor | None, d_c_last: Tensor | None):
        if torch.is_grad_enabled():  # create_graph=True: the hand-written backward is not itself differentiable
            raise RuntimeError(
                "double backward (create_graph=True) is not supported by the sequence implementation of the "
                "recurrent layers; use the per-step reference: model.cell_implementation: autograd "
                "(RecurrentLayer(..., implementation='autograd'))"
            )
        x, h0, c0, state_mask, weight_ih, weight_hh = ctx.saved_tensors
        state_mask = state_mask if ctx.has_mask else None
        tape: LSTMTape | RLSTMTape = ctx.tape
        mog_tape: MogrifierTape | None = ctx.mog_tape
        h_in_all: Tensor | None = ctx.h_in_all
        xh_all: Tensor | None = ctx.xh_all
        split_xh = [x.shape[2], weight_hh.shape[1]]
        w_joint = torch.cat([weight_ih, weight_hh], 1) if xh_all is not None else None
        gx = ctx.gx
        steps, batch, _m = x.shape
        dpre_all = x.new_empty(steps, batch, tape.act.shape[2])
        dx = x.new_empty(x.shape) if mog_tape is not None else None
        tape.start_backward()
        if mog_tape is not None:
            mog_tape.start_backward()
        # dh: the gradient of step t's output, from above (d_out) and from step t + 1 (through W_hh).
        dh = torch.zeros_like(h0) if d_h_last is None else d_h_last
        if d_out is not None:
            dh = dh + d_out[-1]
        dc = torch.zeros_like(c0) if d_c_last is None else d_c_last.clone()  # updated in place below
        for t in range(steps - 1, -1, -1):
            c_prev = tape.cell[t - 1] if t > 0 else c0
            dpre = dpre_all[t]
            dc = tape.backward_step(t, dh, dc, c_prev, state_mask, dpre)
            if xh_all is not None:
                d_x_mog, d_h_in = dpre.mm(w_joint).split(split_xh, 1)
            else:
                d_h_in = dpre.mm(weight_hh)
                d_x_mog = dpre[:, :gx].mm(weight_ih) if mog_tape is not None else None
            if mog_tape is not None:
                dx_t, d_h_in = mog_tape.backward_step(t, x[t], d_x_mog, d_h_in)
                dx[t] = dx_t  # type: ignore[index]
            if state_mask is not None:
                d_h_in = d_h_in.mul_(state_mask) if mog_tape is None else d_h_in * state_mask
            dh = d_h_in if t == 0 or d_out is None else d_h_in.add_(d_out[t - 1])
        needs = ctx.needs_input_grad
        dpre_flat = dpre_all.flatten(0, 1)
        dpre_x = dpre_flat[:, :gx]
        if mog_tape is None and needs[1]:
            dx = dpre_x.mm(weight_ih).view(x.shape)
        d_weight_ih = d_weight_hh = None
        if xh_all is not None:
            if needs[5] or needs[6]:
                d_weight_ih, d_weight_hh = (dpre_flat.t() @ xh_all.flatten(0, 1)).split(split_xh, 1)
        elif needs[5]:
            d_weight_ih = dpre_x.t() @ (x if mog_tape is None else ctx.x_mog_all).flatten(0, 1)
        if needs[6] and xh_all is None:
            if h_in_all is not None:
                d_weight_hh = dpre_flat.t() @ h_in_all.flatten(0, 1)
            else:  # h_in = (h0, out[0], ..., out[T-2])
                d_weight_hh = dpre_all[0].t() @ h0
                if steps > 1:
                    d_weight_hh.addmm_(dpre_all[1:].flatten(0, 1).t(), tape.out[:-1].flatten(0, 1))
        d_bias = dpre_flat.sum(0) if needs[7] else None
        extras = tape.extra_weight_grads(state_mask, dpre_all)
        mog_grads = mog_tape.weight_grads() if mog_tape is not None else []
        return (None, dx if needs[1] else None, dh if needs[2] else None, dc if needs[3] else None, None,
                d_weight_ih, d_weight_hh, d_bias, *extras, *mog_grads)


def recurrent_sequence(spec: SequenceSpec, x: Tensor, h0: Tensor, c0: Tensor, state_mask: Tensor | None,
                       weight_ih: Tensor, weight_hh: Tensor, bias: Tensor, cell_extras: tuple[Tensor, ...],
                       mogrifier: MogrifierParams) -> tuple[Tensor, Tensor, Tensor]:
    """Run a layer over ``x`` [T, B, m] (T ≥ 1) from ``(h0, c0)`` [B, n] with the state mask ``state_mask``
    ([B, n] or None) applied to the previous output before the Mogrifier at every step (and, RLSTM, to
    ``c`` in the output gate). Returns ``(outputs [T, B, n], h_T, c_T)``; differentiable (first order) in
    ``x``, ``h0``, ``c0`` and every weight.

    ``weight_hh`` is the matrix to use (e.g. already weight-dropped); ``cell_extras`` is ``()`` for the
    LSTM and ``(weight_fu, weight_oc, bias_o)`` for the RLSTM.
    """
    if x.dim() != 3 or x.shape[0] == 0:
        raise ValueError(f"x must be [T, B, m] with T >= 1, got {tuple(x.shape)}")
    if mogrifier.count != spec.rounds:
        raise ValueError(f"spec says {spec.rounds} Mogrifier rounds, got parameters for {mogrifier.count}")
    return _RecurrentSequence.apply(spec, x, h0, c0, state_mask, weight_ih, weight_hh, bias, *cell_extras,
                                    *mogrifier.flat())
