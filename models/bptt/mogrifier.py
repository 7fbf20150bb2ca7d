"""The Mogrifier's forward and hand-derived backward, one time step at a time, with the weight gradients
deferred to one matrix multiply per round over the whole sequence.

Round ``r`` (0-based; the thesis' round ``r + 1``) reads ``src`` (``h`` for even ``r``, ``x`` for odd ``r``)
and gates the other vector, ``tgt``::

    mid  = src Rᵀ                  (low rank only: R [k, in])
    pre  = mid Lᵀ + b              (low rank: L [out, k]; full rank: pre = src Wᵀ + b)
    gate = 2 σ(pre)
    tgt' = gate ⊙ tgt

Backward, given ``d tgt'`` and the gradient already flowing into ``src``::

    d tgt   = d tgt' ⊙ gate
    d pre   = (d tgt' ⊙ tgt) ⊙ gate ⊙ (1 - gate / 2)          (d gate / d pre = 2σ(1 - σ))
    d mid   = d pre L                                       (low rank)
    d src  += d mid R          (full rank: d pre W)

and, summed over all time steps at the end (one GEMM each over ``[T·B, ·]``)::

    dL = Σ d preᵀ mid,   dR = Σ d midᵀ src   (full rank: dW = Σ d preᵀ src),   db = Σ d pre
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

__all__ = ["MogrifierParams", "MogrifierTape"]


@dataclass(frozen=True)
class MogrifierParams:
    """The rounds' parameters: per round ``(left [out, k] | None, right [k, in] | weight [out, in], bias [out])``."""

    rounds: tuple[tuple[Tensor | None, Tensor, Tensor], ...]

    @property
    def count(self) -> int:
        return len(self.rounds)

    def flat(self) -> list[Tensor | None]:
        """``[left_0, right_0, bias_0, left_1, ...]`` (the order :meth:`from_flat` reads)."""
        return [t for round_params in self.rounds for t in round_params]

    @staticmethod
    def from_flat(flat: tuple[Tensor | None, ...] | list[Tensor | None]) -> "MogrifierParams":
        if len(flat) % 3:
            raise ValueError(f"expected 3 tensors per Mogrifier round, got {len(flat)}")
        return MogrifierParams(tuple((flat[i], flat[i + 1], flat[i + 2]) for i in range(0, len(flat), 3)))  # type: ignore[misc]


class MogrifierTape:
    """What the forward keeps for the backward, for ``T`` steps of a batch ``B`` (x: [·, m], h: [·, n]).

    Buffers, all [T, B, ·]: ``src[r]`` (the vector round ``r`` reads; round ``r``'s output is written
    straight into ``src[r + 1]``), ``gate[r]`` (``2σ(pre)``), ``gate_grad[r]`` (``gate (1 - gate / 2)``, made
    while the gate is in cache) and, for low-rank rounds, ``mid[r]`` (``src Rᵀ``). The backward fills ``dpre[r]`` (and ``dmid[r]``) for the deferred weight gradients.
    """

    def __init__(self, params: MogrifierParams, steps: int, batch: int, input_size: int, hidden_size: int,
                 like: Tensor) -> None:
        self.params = params
        self.src: list[Tensor] = []
        self.gate: list[Tensor] = []
        self.mid: list[Tensor | None] = []
        for r, (left, _right, bias) in enumerate(params.rounds):
            in_size = hidden_size if r % 2 == 0 else input_size
            self.src.append(like.new_empty(steps, batch, in_size))
            self.gate.append(like.new_empty(steps, batch, bias.shape[0]))
            self.mid.append(None if left is None else like.new_empty(steps, batch, left.shape[1]))
        self.gate_grad = [torch.empty_like(gate) for gate in self.gate]  # d gate / d pre = gate (1 - gate / 2)
        self.dpre: list[Tensor] = []
        self.dmid: list[Tensor | None] = []
        # Transposed weights, made once per call (``mm`` reads the transposed strides directly).
        self._right_t = [right.t() for _left, right, _bias in params.rounds]
        self._left_t = [None if left is None else left.t() for left, _right, _bias in params.rounds]

    def first_source(self, t: int) -> Tensor:
        """Where the driver writes step ``t``'s masked previous output (round 0 reads it)."""
        return self.src[0][t]

    def forward_step(self, t: int, x: Tensor, x_out: Tensor, h_out: Tensor) -> None:
        """Mogrify ``x`` [B, m] and the masked previous output (already in :meth:`first_source`) of step
        ``t``; write the results into ``x_out`` [B, m] and ``h_out`` [B, n]."""
        rounds = self.params.rounds
        last = len(rounds) - 1
        h = self.src[0][t]
        for r, (_left, _right, bias) in enumerate(rounds):
            src, tgt = (h, x) if r % 2 == 0 else (x, h)
            left_t = self._left_t[r]
            if left_t is None:
                pre = torch.addmm(bias, src, self._right_t[r])
            else:
                pre = torch.addmm(bias, torch.mm(src, self._right_t[r], out=self.mid[r][t]), left_t)  # type: ignore[index]
            gate = torch.sigmoid(pre, out=self.gate[r][t]).mul_(2.0)
            torch.mul(gate, 1.0 - 0.5 * gate, out=self.gate_grad[r][t])  # while gate is in cache
            if r == last:
                new_out, other_out = (x_out, h_out) if r % 2 == 0 else (h_out, x_out)
                torch.mul(gate, tgt, out=new_out)
                other_out.copy_(src)
            else:
                new = torch.mul(gate, tgt, out=self.src[r + 1][t])
                if r % 2 == 0:
                    x = new
                else:
                    h = new

    def start_backward(self) -> None:
        """Allocate the gradient buffers."""
        for r, (left, _right, _bias) in enumerate(self.params.rounds):
            gate = self.gate[r]
            self.dpre.append(torch.empty_like(gate))
            self.dmid.append(None if left is None else gate.new_empty(gate.shape[0], gate.shape[1], left.shape[1]))

    def backward_step(self, t: int, x_in: Tensor, dx: Tensor, dh: Tensor) -> tuple[Tensor, Tensor]:
        """Given ``dx`` [B, m] and ``dh`` [B, n], the gradients of the mogrified vectors of step ``t``, and
        ``x_in`` [B, m] (the step's input before mogrifying), return the gradients of the input and of the
        masked previous output; record each round's ``d pre`` (and ``d mid``) for :meth:`weight_grads`."""
        for r in range(len(self.params.rounds) - 1, -1, -1):
            left, right, _bias = self.params.rounds[r]
            tgt = x_in if r == 0 else self.src[r - 1][t]  # round r gates what round r - 1 read
            d_new = dx if r % 2 == 0 else dh
            dpre = torch.mul(d_new, tgt, out=self.dpre[r][t]).mul_(self.gate_grad[r][t])
            d_tgt = d_new * self.gate[r][t]
            d_src_from = dpre if left is None else torch.mm(dpre, left, out=self.dmid[r][t])  # type: ignore[index]
            if r % 2 == 0:  # tgt = x, src = h
                dx, dh = d_tgt, torch.addmm(dh, d_src_from, right)
            else:  # tgt = h, src = x
                dh, dx = d_tgt, torch.addmm(dx, d_src_from, right)
        return dx, dh

    def weight_grads(self) -> list[Tensor | None]:
        """The rounds' parameter gradients in :meth:`MogrifierParams.flat` order (one GEMM per matrix)."""
        grads: list[Tensor | None] = []
        for r, (left, _right, _bias) in enumerate(self.params.rounds):
            dpre = self.dpre[r].flatten(0, 1)
            src = self.src[r].flatten(0, 1)
            if left is None:
                grads += [None, dpre.t() @ src, dpre.sum(0)]
            else:
                mid = self.mid[r].flatten(0, 1)  # type: ignore[union-attr]
                dmid = self.dmid[r].flatten(0, 1)  # type: ignore[union-attr]
                grads += [dpre.t() @ mid, dmid.t() @ src, dpre.sum(0)]
        return grads
