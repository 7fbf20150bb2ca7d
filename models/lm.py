"""Residual recurrent language model (thesis §4.2).

With ``L`` layers, hidden size ``n`` = embedding size (see ``embedding_size`` below), time-major tokens ``w``::

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

AWD-LSTM options (Merity et al. 2017; all off by default, and then the model, its parameters, their
init order and its use of the random number generator are exactly the above):

* ``embedding_size`` ``e`` different from ``n``: ``E_in`` and ``E_out`` are [V, e], layer 1 reads
  e-dim inputs, and a linear projection ``P`` [e, n] (no bias, ``U(-1/√n, 1/√n)``; thesis 2.A: "the
  linear projection from the cell output into the output embeddings space") maps the dropped output
  sum into the embedding space, ``logits_t = (P ((Σ_l x̂ˡ_t) ⊙ M_out_t)) E_outᵀ + b_out``, so that
  the embeddings can be tied. Untied ``E_out ~ U(-1/√e, 1/√e)``; ``P`` is registered (and
  initialised) after everything else.
* ``embedding_dropout``: whole rows of ``E_in`` (word types) are dropped before the lookup, one mask
  per forward call (:func:`models.regularizers.embedding_dropout`), then input dropout as above.
* ``weight_drop``: DropConnect on every layer's recurrent matrix, one mask per layer per forward
  call (:class:`models.mogrifier.RecurrentLayer`).

With the multi-sample objective (D copies of the batch in one forward call, see
:mod:`models.objectives`), the D copies get independent input / state / cell-output / output masks
but share the embedding-dropout and weight-drop masks, which are drawn once per call (as in AWD,
where every row of a batch shares them).

"The output of the RNN" for AR / TAR (``forward(..., return_outputs=True)``, :class:`RNNOutputs`):
the summed residual output ``Σ_l x̂ˡ_t`` [T, B, n] (what the softmax reads), ``raw`` before and
``dropped`` after the output dropout ``M_out`` - AWD's ``rnn_hs[-1]`` and ``dropped_rnn_hs[-1]``,
the last layer's output, whose role the residual sum plays here.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .config import ModelConfig
from .mogrifier import RecurrentLayer
from .regularizers import embedding_dropout

__all__ = ["LMState", "RNNOutputs", "RecurrentLM", "detach_state", "count_parameters"]

LMState = list[tuple[Tensor, Tensor]]  # per layer (h, c), each [B, n]

EMBEDDING_INIT_RANGE = 0.1


def detach_state(state: LMState) -> LMState:
    """Cut the autograd graph between truncated-BPTT segments."""
    return [(h.detach(), c.detach()) for h, c in state]


class RNNOutputs(NamedTuple):
    """The RNN output the AR / TAR regularisers read (see the module docstring), both [T, B, n].

    raw: the summed layer outputs ``Σ_l x̂ˡ_t`` before the output dropout (TAR's ``h_t``).
    dropped: the same after the output dropout (AR's ``m ⊙ h_t``); ``raw`` itself in eval mode.
    """

    raw: Tensor
    dropped: Tensor


class RecurrentLM(nn.Module):
    """The residual recurrent LM of the module docstring, built from a :class:`ModelConfig`.

    Parameters: ``input_embedding`` [V, e], ``output_embedding`` [V, e] (the same Parameter when tied),
    ``output_bias`` [V], ``layers`` (L :class:`RecurrentLayer`, layer 1 reading e inputs, the others n),
    and ``output_projection`` [e, n] only when e != n (else None). e = n unless ``embedding_size`` is set.
    """

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        vocab_size = config.require_vocab_size()
        self.config = config.model_copy()
        n = config.hidden_size
        e = config.embedding_dim
        self.vocab_size = vocab_size
        self.hidden_size = n
        self.embedding_size = e
        self.num_layers = config.num_layers
        self.input_embedding = nn.Parameter(torch.empty(vocab_size, e))
        if config.tie_embeddings:
            self.output_embedding = self.input_embedding
        else:
            self.output_embedding = nn.Parameter(torch.empty(vocab_size, e))
        self.output_bias = nn.Parameter(torch.empty(vocab_size))
        self.layers = nn.ModuleList(
            RecurrentLayer(
                config.cell,
                e if index == 0 else n,
                n,
                mogrifier_rounds=config.mogrifier_rounds,
                mogrifier_rank=config.mogrifier_rank,
                capped_input_gate=config.capped_input_gate,
                chrono_t_max=config.chrono_t_max,
                forget_bias_init=config.forget_bias_init,
                weight_drop=config.weight_drop,
                implementation=config.cell_implementation,
                compile_steps=config.compile_cell_steps,
            )
            for index in range(config.num_layers)
        )
        # Registered last, and only when needed: the default model keeps its parameters and their order.
        self.output_projection: nn.Parameter | None = nn.Parameter(torch.empty(e, n)) if e != n else None
        self._reset_embeddings()

    def _reset_embeddings(self) -> None:
        with torch.no_grad():
            self.input_embedding.uniform_(-EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
            if not self.config.tie_embeddings:
                bound = 1.0 / math.sqrt(self.embedding_size)
                self.output_embedding.uniform_(-bound, bound)
            self.output_bias.zero_()
            if self.output_projection is not None:
                bound = 1.0 / math.sqrt(self.hidden_size)
                self.output_projection.uniform_(-bound, bound)

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
        self, tokens: Tensor, state: LMState | None = None, temperature: float = 1.0, *, return_outputs: bool = False
    ) -> tuple[Tensor, LMState] | tuple[Tensor, LMState, RNNOutputs]:
        """``tokens`` [T, B] int64 -> (logits [T, B, V], final state (not detached)).

        ``return_outputs=True`` adds a third element, the :class:`RNNOutputs` (raw and dropped output
        sums, [T, B, n]) that AR / TAR read; it goes through ``forward`` so that DDP / DeepSpeed wrappers
        see an ordinary forward call. The state is carried as ``initial_state`` makes it ([B, n] per layer).
        """
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

        embedded = embedding_dropout(self.input_embedding, tokens, cfg.embedding_dropout, self.training)
        x0 = self._dropout(embedded, cfg.input_dropout)
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
        dropped = self._dropout(residual, cfg.output_dropout)
        softmax_input = dropped if self.output_projection is None else F.linear(dropped, self.output_projection)
        logits = F.linear(softmax_input, self.output_embedding, self.output_bias)
        if temperature != 1.0:
            logits = logits / temperature
        if return_outputs:
            return logits, new_state, RNNOutputs(raw=residual, dropped=dropped)
        return logits, new_state


def count_parameters(config: ModelConfig) -> int:
    """Number of trainable parameters (tied embeddings counted once), built on the meta device."""
    with torch.device("meta"):
        model = RecurrentLM(config)
    return sum(p.numel() for p in model.parameters())
