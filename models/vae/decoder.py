"""Decoders: ``log p(x|z)`` of every sentence under each of its ``K`` latent samples, in one pass.

Both expose ``log_likelihood(inputs [T, B], targets [T, B], mask [T, B], z [K, B, ...]) -> [K, B]``: the
log-probability of the sentence's targets summed over its real (``mask``) positions; padding positions
contribute exactly 0. The ``K*B`` sequences run as one batch (flattened sample-major, row ``k*B + b``).

The decoder reads the latent as a vector ``z_vec`` [K, B, D'] (:class:`LatentInput`): a Gaussian ``z``
itself; categorical indices ``z`` [K, B, n] through one embedding table per latent, concatenated; a VQ
sample's quantised vectors ``z_q`` (its codebook belongs to :class:`~models.vae.latents.VQLatent`).

:class:`RecurrentDecoder` (thesis §5.7.2): at step ``t`` the input is ``[E[w_t] ; z_vec]`` (previous
token's embedding, then the latent), one unidirectional :class:`~models.mogrifier.RecurrentLayer` of
``hidden_size`` from a zero state, a Linear to the vocabulary. Regularisation, in training mode only
(all masks are inverted dropout, scaled by 1/(1-p)):

- word dropout: each input token except ``<bos>`` at ``t = 0`` is replaced by ``unk_id`` with
  probability ``word_dropout`` (Bowman et al. 2016);
- embedding dropout: element-wise on the token embeddings ``E[w_t]``, fresh per step;
- input dropout: element-wise on the layer input ``[E[w_t] ; z_vec]``, fresh per step;
- state dropout: variational, one [hidden] mask per sequence for all steps (applied to ``h_prev``);
- output dropout: element-wise on the layer outputs, fresh per step.

With ``shared_dropout_mask`` every mask (and word-dropout draw) is drawn per *sentence* and used for all
``K`` samples of it (thesis Fig. 5.12); otherwise independently per (sample, sentence).

:class:`MLPDecoder` (thesis §5.7.1): ``z_vec`` -> tanh layers -> Linear -> the distribution of the one
symbol of a sentence (``T = 1``; ``inputs`` are ignored).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..lm import EMBEDDING_INIT_RANGE
from ..mogrifier import RecurrentLayer
from .latents import CategoricalLatent, GaussianLatent, VQLatent

__all__ = ["LatentInput", "MLPDecoder", "RecurrentDecoder"]


class LatentInput(nn.Module):
    """``z`` -> the decoder's latent vector ``z_vec`` [K, B, D'].

    Gaussian: the identity (``D' = D``). Categorical: ``weight`` [n*m, e] holds one ``e``-vector per
    (latent, category), rows latent-major; ``z_vec = concat_i weight[i*m + z_i]`` (``D' = n e``),
    initialised N(0, 1) (the scale of a Gaussian ``z``). VQ: the quantised vectors ``z_q``, the first
    ``D' = n e`` values of a sample ``[z_q ; codes]`` (a bare ``z_q`` [K, B, n e], e.g. the latent's
    ``posterior_mean``, is taken as is); no parameters here, the codebook is the latent's.
    """

    def __init__(self, latent: GaussianLatent | CategoricalLatent | VQLatent) -> None:
        super().__init__()
        self.size = latent.decoder_input_size
        self.categorical = isinstance(latent, CategoricalLatent)
        self.vq = isinstance(latent, VQLatent)
        if self.categorical:
            self.num_latents = latent.num_latents
            self.num_categories = latent.num_categories
            self.weight = nn.Parameter(torch.empty(latent.param_size, latent.embedding_size))
            self.register_buffer(
                "offsets", torch.arange(latent.num_latents) * latent.num_categories, persistent=False
            )
        if self.vq:
            self.sample_size = latent.sample_size
        self.reset_parameters()

    def reset_parameters(self) -> None:
        if self.categorical:
            nn.init.normal_(self.weight)

    def forward(self, z: Tensor) -> Tensor:
        """``z`` [K, B, D] float, [K, B, n] int64 or [K, B, n e (+ n)] float (VQ) -> ``z_vec`` [K, B, D']."""
        if self.vq:
            if z.shape[-1] not in (self.size, self.sample_size):
                raise ValueError(f"VQ latents are [K, B, {self.sample_size}] samples or [K, B, {self.size}] "
                                 f"quantised vectors, got {tuple(z.shape)}")
            return z[..., : self.size]
        if not self.categorical:
            return z
        embedded = F.embedding(z + self.offsets, self.weight)  # [K, B, n, e]
        return embedded.flatten(-2)


def _sequence_log_likelihood(logits: Tensor, targets: Tensor, mask: Tensor) -> Tensor:
    """``logits`` [T, K, B, V], ``targets``/``mask`` [T, B] -> Σ_t mask · log softmax(logits)[target]: [K, B]."""
    num_steps, k, batch, vocab = logits.shape
    flat_targets = targets.unsqueeze(1).expand(num_steps, k, batch).reshape(-1)
    log_p = -F.cross_entropy(logits.reshape(-1, vocab), flat_targets, reduction="none").view(num_steps, k, batch)
    return torch.where(mask.unsqueeze(1), log_p, log_p.new_zeros(())).sum(0)


def _check_batch(inputs: Tensor, targets: Tensor, mask: Tensor, z: Tensor) -> None:
    if inputs.dim() != 2 or targets.shape != inputs.shape or mask.shape != inputs.shape:
        raise ValueError(
            f"inputs, targets and mask must all be [T, B]; got {tuple(inputs.shape)}, {tuple(targets.shape)}, "
            f"{tuple(mask.shape)}"
        )
    if z.dim() != 3 or z.shape[1] != inputs.shape[1]:
        raise ValueError(f"z must be [K, B={inputs.shape[1]}, ...], got {tuple(z.shape)}")


class RecurrentDecoder(nn.Module):
    """Recurrent LM conditioned on ``z`` at every step (see the module docstring)."""

    def __init__(
        self,
        vocab_size: int,
        embedding_size: int,
        hidden_size: int,
        latent_input: LatentInput,
        cell: str = "lstm",
        mogrifier_rounds: int = 0,
        *,
        embedding_dropout: float = 0.0,
        word_dropout: float = 0.0,
        input_dropout: float = 0.0,
        state_dropout: float = 0.0,
        output_dropout: float = 0.0,
        shared_dropout_mask: bool = True,
        unk_id: int | None = None,
    ) -> None:
        super().__init__()
        if word_dropout > 0.0 and unk_id is None:
            raise ValueError("word_dropout > 0 needs unk_id (the id of <unk>)")
        self.hidden_size = hidden_size
        self.embedding_dropout = embedding_dropout
        self.word_dropout = word_dropout
        self.input_dropout = input_dropout
        self.state_dropout = state_dropout
        self.output_dropout = output_dropout
        self.shared_dropout_mask = shared_dropout_mask
        self.unk_id = unk_id
        self.embedding = nn.Embedding(vocab_size, embedding_size)
        self.latent_input = latent_input
        self.layer = RecurrentLayer(
            cell, embedding_size + latent_input.size, hidden_size, mogrifier_rounds=mogrifier_rounds
        )
        self.output = nn.Linear(hidden_size, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Token embedding ~ U(-0.1, 0.1) (as the LM's); output bias 0, output weight U(±1/√n); cell,
        Mogrifier and latent embeddings as their own inits."""
        nn.init.uniform_(self.embedding.weight, -EMBEDDING_INIT_RANGE, EMBEDDING_INIT_RANGE)
        self.latent_input.reset_parameters()
        self.layer.cell.reset_parameters()
        self.layer.mogrifier.reset_parameters()
        bound = 1.0 / math.sqrt(self.hidden_size)
        nn.init.uniform_(self.output.weight, -bound, bound)
        nn.init.zeros_(self.output.bias)

    def _active(self, p: float) -> bool:
        return self.training and p > 0.0

    def _mask(self, p: float, lead: tuple[int, ...], k: int, batch: int, features: int, ref: Tensor) -> Tensor:
        """Inverted-dropout mask ``[*lead, K or 1, B, features]`` (1 on the sample axis when shared)."""
        shape = (*lead, 1 if self.shared_dropout_mask else k, batch, features)
        return torch.empty(shape, device=ref.device, dtype=ref.dtype).bernoulli_(1.0 - p).div_(1.0 - p)

    def _token_embeddings(self, inputs: Tensor, k: int) -> Tensor:
        """Word dropout, embedding, embedding dropout: [T, B] -> [T, K or 1, B, E]."""
        num_steps, batch = inputs.shape
        tokens = inputs.unsqueeze(1)  # [T, 1, B]
        if self._active(self.word_dropout):
            draws = 1 if self.shared_dropout_mask else k
            drop = torch.rand(num_steps, draws, batch, device=inputs.device) < self.word_dropout
            drop[0] = False  # <bos> is never replaced
            tokens = torch.where(drop, torch.full_like(tokens, self.unk_id), tokens)
        embedded = self.embedding(tokens)
        if self._active(self.embedding_dropout):
            embedded = embedded * self._mask(
                self.embedding_dropout, (num_steps,), k, batch, embedded.shape[-1], embedded
            )
        return embedded

    def forward(self, inputs: Tensor, z: Tensor) -> Tensor:
        """``inputs`` [T, B] int64, ``z`` [K, B, ...] -> next-token logits [T, K, B, V]."""
        num_steps, batch = inputs.shape
        k = z.shape[0]
        z_vec = self.latent_input(z)  # [K, B, D']
        embedded = self._token_embeddings(inputs, k)  # [T, K or 1, B, E]
        x = torch.cat(
            (embedded.expand(num_steps, k, batch, -1), z_vec.unsqueeze(0).expand(num_steps, -1, -1, -1)), dim=-1
        )  # [T, K, B, E + D']
        if self._active(self.input_dropout):
            x = x * self._mask(self.input_dropout, (num_steps,), k, batch, x.shape[-1], x)
        n = self.hidden_size
        state_mask = None
        if self._active(self.state_dropout):  # variational: one mask per sequence
            state_mask = self._mask(self.state_dropout, (), k, batch, n, x).expand(k, batch, n).reshape(k * batch, n)
        zeros = x.new_zeros(k * batch, n)
        out, _ = self.layer(x.reshape(num_steps, k * batch, -1), (zeros, zeros), state_mask)
        out = out.view(num_steps, k, batch, n)
        if self._active(self.output_dropout):
            out = out * self._mask(self.output_dropout, (num_steps,), k, batch, n, out)
        return self.output(out)

    def log_likelihood(self, inputs: Tensor, targets: Tensor, mask: Tensor, z: Tensor) -> Tensor:
        """``log p(x|z_k)`` summed over each sentence's real positions: [K, B]."""
        _check_batch(inputs, targets, mask, z)
        return _sequence_log_likelihood(self(inputs, z), targets, mask)


class MLPDecoder(nn.Module):
    """The synthetic task's decoder: ``z_vec`` -> ``num_hidden_layers`` tanh layers -> Linear -> logits.

    ``log_likelihood`` needs one-symbol sentences (``T = 1``); ``inputs`` are ignored.
    """

    def __init__(self, vocab_size: int, hidden_size: int, latent_input: LatentInput, num_hidden_layers: int) -> None:
        super().__init__()
        if num_hidden_layers < 1:
            raise ValueError(f"num_hidden_layers must be >= 1, got {num_hidden_layers}")
        self.latent_input = latent_input
        sizes = [latent_input.size] + [hidden_size] * num_hidden_layers
        self.hidden = nn.ModuleList(nn.Linear(a, b) for a, b in zip(sizes[:-1], sizes[1:]))
        self.output = nn.Linear(hidden_size, vocab_size)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        self.latent_input.reset_parameters()
        for linear in (*self.hidden, self.output):
            linear.reset_parameters()

    def forward(self, z: Tensor) -> Tensor:
        """``z`` [K, B, ...] -> logits of the sentence's symbol [K, B, V]."""
        h = self.latent_input(z)
        for linear in self.hidden:
            h = linear(h).tanh()
        return self.output(h)

    def log_likelihood(self, inputs: Tensor, targets: Tensor, mask: Tensor, z: Tensor) -> Tensor:
        """``log p(x|z_k)`` of each one-symbol sentence: [K, B] (0 where ``mask`` is False)."""
        _check_batch(inputs, targets, mask, z)
        if inputs.shape[0] != 1:
            raise ValueError(f"the mlp decoder scores one-symbol sentences (T = 1), got T = {inputs.shape[0]}")
        return _sequence_log_likelihood(self(z).unsqueeze(0), targets, mask)
