"""The AWD-LSTM regularisers (Merity et al. 2017, "Regularizing and Optimizing LSTM Language Models").

* :func:`drop_connect` - weight drop (DropConnect, Wan et al. 2013) of a recurrent weight matrix:
  inverted dropout on the *weights*, one mask per call. A layer calls it once per forward call and
  uses the dropped matrix at every time step (:meth:`models.mogrifier.RecurrentLayer.forward`), so
  all time steps of one call share the mask and the next call draws a new one. It is functional (no
  module surgery, no ``torch.nn.utils.parametrize``): the parameter itself is never modified, the
  ``state_dict`` keys stay the same, deep copies share nothing, and DDP / DeepSpeed see ordinary
  parameters. The gradient reaches the undropped weight multiplied by ``mask / (1 - p)``.
* :func:`embedding_dropout` - drops whole rows of the embedding matrix (word types): one Bernoulli
  draw per vocabulary entry per call, shared by every occurrence of the word in the batch, kept rows
  scaled by ``1 / (1 - p)``. Equivalent to AWD's ``embedded_dropout`` (which masks the whole
  ``[V, e]`` matrix before the lookup), computed on the looked-up rows only.
* :func:`activation_regularization` (AR) and :func:`temporal_activation_regularization` (TAR),
  as in AWD's training loop: ``alpha * dropped.pow(2).mean()`` and
  ``beta * (raw[1:] - raw[:-1]).pow(2).mean()``, means over every element.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["activation_regularization", "drop_connect", "embedding_dropout", "temporal_activation_regularization"]


def drop_connect(weight: Tensor, p: float, training: bool = True) -> Tensor:
    """``weight`` (any shape) with each entry zeroed with probability ``p`` and the rest scaled by
    ``1 / (1 - p)``; ``weight`` itself when ``p == 0`` or not ``training`` (no random numbers drawn)."""
    if not 0.0 <= p < 1.0:
        raise ValueError(f"weight drop rate must be in [0, 1), got {p}")
    if not training or p == 0.0:
        return weight
    return F.dropout(weight, p, training=True)


def embedding_dropout(weight: Tensor, tokens: Tensor, p: float, training: bool = True) -> Tensor:
    """Embedding lookup with whole-word dropout.

    weight: the embedding matrix [V, e]; tokens: int64 ids of any shape [...]. Returns [..., e]:
    ``weight[tokens] * mask[tokens] / (1 - p)`` with ``mask ~ Bernoulli(1 - p)`` of shape [V], drawn
    once per call. ``p == 0`` or not ``training``: the plain lookup (no random numbers drawn).
    """
    if not 0.0 <= p < 1.0:
        raise ValueError(f"embedding dropout rate must be in [0, 1), got {p}")
    embedded = F.embedding(tokens, weight)
    if not training or p == 0.0:
        return embedded
    mask = torch.empty(weight.shape[0], device=weight.device, dtype=embedded.dtype).bernoulli_(1.0 - p)
    mask.div_(1.0 - p)
    return embedded * F.embedding(tokens, mask.unsqueeze(1))


def _at_least_float32(x: Tensor) -> Tensor:
    """``x`` in float32, or in its own dtype when that is wider (float64): bf16 activations are squared and
    averaged in float32, float64 ones stay float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def activation_regularization(dropped: Tensor, alpha: float) -> Tensor:
    """AR: ``alpha * mean(dropped²)`` over all elements of the dropped RNN output [T, B, n] (a scalar,
    computed in at least float32)."""
    return alpha * _at_least_float32(dropped).pow(2).mean()


def temporal_activation_regularization(raw: Tensor, beta: float) -> Tensor:
    """TAR: ``beta * mean((h_{t+1} - h_t)²)`` over the time-major raw RNN output [T, B, n] (a scalar, in at
    least float32); 0 for a window of one time step (no pair of consecutive steps)."""
    raw = _at_least_float32(raw)
    if raw.shape[0] < 2:
        return raw.new_zeros(())
    return beta * (raw[1:] - raw[:-1]).pow(2).mean()
