"""Residual recurrent language model (thesis §4.2).

With ``L`` layers, hidden size ``n`` = embedding size, time-major tokens ``w``::

    x̂⁰_t = E_in[w_t] ⊙ M_in_t                                  (input dropout)
    c¹_t, h¹_t = [R]LSTM(c¹_{t-1}, mogrify(h¹_{t-1} ⊙ M_state,1, x̂⁰_t))
    cˡ_t, hˡ_t = [R]LSTM(cˡ_{t-1}, mogrify(hˡ_{t-1} ⊙ M_state,l, Σ_{i=1}^{l-1} x̂ⁱ_t))   (l ≥ 2)
    x̂ˡ_t = hˡ_t ⊙ M_cell,l_t                                  (cell-output dropout)
    logits_t = ((Σ_{l=1}^{L} x̂ˡ_t) ⊙ M_out_t) E_outᵀ + b_out

(The thesis writes ``c⁰_{t-1}`` for layer 1, an evident typo for ``c¹_{t-1}``.)
Per §4.2 the embedding is not part of the residual sum for ``l ≥ 2`` nor of the
output sum. ``M_in``, ``M_cell,l`` and ``M_out`` are fresh per time step and
element; ``M_state,l`` is variational: one [B, n] mask per layer per forward
call, shared by all time steps. All masks are inverted dropout (scaled by
1/(1-p)); in eval mode every mask is all ones (deterministic approximation).

Initialisation: ``E_in ~ U(-0.1, 0.1)``; untied ``E_out ~ U(-1/√n, 1/√n)``;
``b_out = 0``; cells and Mogrifier as documented in their modules. ``E_out``
is stored as [V, n] (like an ``nn.Linear`` weight), so with ``tie_embeddings``
``output_embedding`` *is* the ``input_embedding`` Parameter.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .mogrifier import RecurrentLayer

__all__ = ["LMState", "RecurrentLM", "detach_state", "count_parameters"]

LMState = list[tuple[Tensor, Tensor]]  # per layer (h, c), each [B, n]

EMBEDDING_INIT_RANGE = 0.1


def detach_state(state: LMState) -> LMState:
    """Cut the autograd graph between truncated-BPTT segments."""
    return [(h.detach(), c.detach()) for h, c in state]


class RecurrentLM(nn.Module):
    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        vocab_size = config.require_vocab_size()
        self.config = config.model_copy()
        n = config.hidden_size
        self.vocab_size = vocab_size
        self.hidden_size = n
        self.num_layers = config.num_layers
        self.input_embedding = nn.Parameter(torch.empty(vocab_size, n))
        if config.tie_embeddings:
            self.output_embedding = self.input_embedding
        else:
            self.output_embedding = nn.Parameter(torch.empty(vocab_size, n))
        self.output_bias = nn.Parameter(torch.empty(vocab_size))
        self.layers = nn.ModuleList(
            RecurrentLayer(
                config.cell,
                n,
                n,
                mogrifier_rounds=config.mogrifier_rounds,
                mogrifier_rank=config.mogrifier_rank,
                capped_input_gate=config.capped_input_gate,
                chrono_t_max=config.chrono_t_max,
                forget_bias_init=config.forget_bias_init,
            )
            for _ in range(config.num_layers)
        )
        self._reset_embeddings()

    def _reset_embeddings(self) -> None:
        with torch.no_grad():
            self.input_embedding.uniform_(-EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
            if not self.config.tie_embeddings:
                bound = 1.0 / math.sqrt(self.hidden_size)
                self.output_embedding.uniform_(-bound, bound)
            self.output_bias.zero_()

    def initial_state(self, batch_size: int, device=None, dtype=None) -> LMState:
        ref = self.output_bias
        device = ref.device if device is None else device
        dtype = ref.dtype if dtype is None else dtype
        n = self.hidden_size
        return [
            (
                torch.zeros(batch_size, n, device=device, dtype=dtype),
                torch.zeros(batch_size, n, device=device, dtype=dtype),
            )
            for _ in range(self.num_layers)
        ]

    def _state_mask(self, batch_size: int, ref: Tensor) -> Tensor | None:
        p = self.config.state_dropout
        if not self.training or p == 0.0:
            return None
        mask = torch.empty(batch_size, self.hidden_size, device=ref.device, dtype=ref.dtype)
        return mask.bernoulli_(1.0 - p).div_(1.0 - p)

    def _dropout(self, x: Tensor, p: float) -> Tensor:
        if not self.training or p == 0.0:
            return x
        return F.dropout(x, p, training=True)

    def forward(
        self, tokens: Tensor, state: LMState | None = None, temperature: float = 1.0
    ) -> tuple[Tensor, LMState]:
        """``tokens`` [T, B] int64 -> (logits [T, B, V], final state (not detached))."""
        if tokens.dim() != 2:
            raise ValueError(f"tokens must be time-major [T, B], got shape {tuple(tokens.shape)}")
        if not temperature > 0:
            raise ValueError(f"temperature must be > 0, got {temperature}")
        batch_size = tokens.shape[1]
        if state is None:
            state = self.initial_state(batch_size, device=tokens.device)
        elif len(state) != self.num_layers:
            raise ValueError(f"state has {len(state)} layers, model has {self.num_layers}")
        cfg = self.config

        x0 = self._dropout(F.embedding(tokens, self.input_embedding), cfg.input_dropout)
        layer_input = x0
        residual: Tensor | None = None  # Σ_{i ≤ l} x̂ⁱ
        new_state: LMState = []
        for layer, layer_state in zip(self.layers, state):
            if layer_state[0].shape[0] != batch_size:
                raise ValueError(
                    f"state batch size {layer_state[0].shape[0]} does not match tokens batch size {batch_size}"
                )
            outputs, s = layer(layer_input, layer_state, self._state_mask(batch_size, x0))
            new_state.append(s)
            x_hat = self._dropout(outputs, cfg.cell_output_dropout)
            residual = x_hat if residual is None else residual + x_hat
            layer_input = residual
        assert residual is not None
        logits = F.linear(self._dropout(residual, cfg.output_dropout), self.output_embedding, self.output_bias)
        if temperature != 1.0:
            logits = logits / temperature
        return logits, new_state


def count_parameters(config: ModelConfig) -> int:
    """Number of trainable parameters (tied embeddings counted once), built on the meta device."""
    with torch.device("meta"):
        model = RecurrentLM(config)
    return sum(p.numel() for p in model.parameters())
