"""Encoders: a sentence -> the parameters of q(z|x).

Both map ``targets`` [T, B] (the sentence tokens, time-major, padding after each sentence's end) and
``lengths`` [B] (real tokens per sentence, >= 1) to ``params`` [B, P], ``P`` = the latent's
``param_size``. No dropout (the thesis regularises the decoder only).

- :class:`RecurrentEncoder` (thesis §5.7.2): embedding -> one-layer bidirectional recurrent layer ->
  the average of the two directions' last states -> Linear -> params. The backward direction reads each
  sentence reversed *within its length*, and each direction's last state is taken at the sentence's
  last real token, so a sentence gets the same params whatever the padding of its batch.
- :class:`MLPEncoder` (thesis §5.7.1, one-symbol sentences): embedding -> two tanh layers -> Linear.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from ..lm import EMBEDDING_INIT_RANGE
from ..mogrifier import RecurrentLayer

__all__ = ["MLPEncoder", "RecurrentEncoder", "last_positions", "reverse_within_lengths"]


def _check_sentences(targets: Tensor, lengths: Tensor) -> None:
    if targets.dim() != 2:
        raise ValueError(f"targets must be time-major [T, B], got shape {tuple(targets.shape)}")
    if lengths.shape != (targets.shape[1],):
        raise ValueError(f"lengths must be [B] = [{targets.shape[1]}], got {tuple(lengths.shape)}")


def reverse_within_lengths(lengths: Tensor, num_steps: int) -> Tensor:
    """Time indices [T, B] that reverse each sentence within its length and leave padding in place:
    ``index[t, b] = lengths[b] - 1 - t`` for ``t < lengths[b]``, else ``t``."""
    t = torch.arange(num_steps, device=lengths.device).unsqueeze(1)  # [T, 1]
    lengths = lengths.unsqueeze(0)  # [1, B]
    return torch.where(t < lengths, lengths - 1 - t, t)


def last_positions(outputs: Tensor, lengths: Tensor) -> Tensor:
    """``outputs[lengths[b] - 1, b]``: [T, B, n] -> [B, n]."""
    index = (lengths - 1).view(1, -1, 1).expand(1, -1, outputs.shape[-1])
    return outputs.gather(0, index).squeeze(0)


class RecurrentEncoder(nn.Module):
    """Bidirectional recurrent encoder; ``forward(targets [T, B], lengths [B]) -> params [B, P]``."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        param_size: int,
        cell: str = "lstm",
        mogrifier_rounds: int = 0,
    ) -> None:
        super().__init__()
        self.hidden_size = hidden_size
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.forward_layer = RecurrentLayer(cell, embedding_size, hidden_size, mogrifier_rounds=mogrifier_rounds)
        self.backward_layer = RecurrentLayer(cell, embedding_size, hidden_size, mogrifier_rounds=mogrifier_rounds)
        self.output = nn.Linear(hidden_size, param_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Embedding ~ U(-0.1, 0.1) (as the LM's); cells, Mogrifiers and the Linear as their own inits."""
        nn.init.uniform_(self.embedding.weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
        for layer in (self.forward_layer, self.backward_layer):
            layer.cell.reset_parameters()
            layer.mogrifier.reset_parameters()
        self.output.reset_parameters()

    def summary(self, targets: Tensor, lengths: Tensor) -> Tensor:
        """The average of the two directions' last states ``o``: [B, n]."""
        _check_sentences(targets, lengths)
        num_steps, batch = targets.shape
        x = self.embedding(targets)  # [T, B, E]
        zeros = x.new_zeros(batch, self.hidden_size)
        forward_out, _ = self.forward_layer(x, (zeros, zeros))
        reverse = reverse_within_lengths(lengths, num_steps)  # [T, B]
        x_reversed = x.gather(0, reverse.unsqueeze(-1).expand_as(x))
        backward_out, _ = self.backward_layer(x_reversed, (zeros, zeros))
        return 0.5 * (last_positions(forward_out, lengths) + last_positions(backward_out, lengths))

    def forward(self, targets: Tensor, lengths: Tensor) -> Tensor:
        """``targets`` [T, B] int64, ``lengths`` [B] -> ``params`` [B, P]."""
        return self.output(self.summary(targets, lengths))


class MLPEncoder(nn.Module):
    """The synthetic task's encoder: ``params = W tanh(W2 tanh(W1 E[x] + b1) + b2) + b``.

    ``forward(targets [1, B], lengths [B]) -> params [B, P]`` (one-symbol sentences only).
    """

    def __init__(self, vocab_size: int, embedding_size: int, hidden_size: int, param_size: int) -> None:
        super().__init__()
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.hidden = nn.Sequential(
            nn.Linear(embedding_size, hidden_size), nn.Tanh(), nn.Linear(hidden_size, hidden_size), nn.Tanh()
        )
        self.output = nn.Linear(hidden_size, param_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.uniform_(self.embedding.weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
        for module in (*self.hidden, self.output):
            if isinstance(module, nn.Linear):
                module.reset_parameters()

    def forward(self, targets: Tensor, lengths: Tensor) -> Tensor:
        """``targets`` [1, B] int64, ``lengths`` [B] (all 1) -> ``params`` [B, P]."""
        _check_sentences(targets, lengths)
        if targets.shape[0] != 1:
            raise ValueError(f"the mlp encoder reads one-symbol sentences (T = 1), got T = {targets.shape[0]}")
        return self.output(self.hidden(self.embedding(targets[0])))
