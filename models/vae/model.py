"""The sentence VAE (thesis ch. 5): encoder q(z|x), latent, decoder p(x|z), and one batch's sampled terms.

:meth:`SentenceVAE.sample_terms` encodes a batch once, draws ``K`` latent samples per sentence
(``[K, B, ...]``) and scores all ``K*B`` (sample, sentence) pairs with one decoder pass. It returns the
per-sample terms every estimator needs (:class:`LatentTerms`); the estimators
(:mod:`models.vae.estimators`) combine them into surrogate losses.

Gradient bookkeeping: the decoder reads ``z_leaf = z.detach().requires_grad_()`` (reparameterised
latents with grad enabled) or ``z.detach()``, so ``log_px_z`` has a graph to the decoder only. The
path derivative through the decoder is ``autograd.grad(log_px_z..., z_leaf)``, which an estimator
chains into the encoder through ``z``; this touches no parameter's ``.grad`` (DDP-safe) and lets
each estimator weight the decoder and encoder gradients differently.

VQ latents (:class:`~models.vae.latents.VQLatent`): ``z`` is the straight-through quantised vector, so
the same path derivative copies the decoder's gradient w.r.t. ``z_q`` to the encoder; ``latent_loss``
carries the commitment (+ codebook) loss, and in training mode the EMA codebook is updated after the
batch was quantised (and scored) with the old codebook.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .config import VAEModelConfig
from .decoder import LatentInput, MLPDecoder, RecurrentDecoder
from .encoder import MLPEncoder, RecurrentEncoder
from .latents import CategoricalLatent, GaussianLatent, VQLatent

__all__ = ["LatentTerms", "SentenceVAE", "build_latent"]


@dataclass
class LatentTerms:
    """One batch's terms under ``K`` samples per sentence (``B`` sentences)."""

    params: Tensor  # [B, P] q(z|x) parameters (graph to the encoder)
    z: Tensor  # [K, B, ...] samples (graph to the encoder when reparameterized)
    z_leaf: Tensor | None  # [K, B, D] the decoder's latent input (z.detach().requires_grad_()) or None
    log_px_z: Tensor  # [K, B] log p(x|z_k) over the masked positions (graph to the DECODER only)
    log_pz: Tensor  # [K, B] log p(z_k) (graph via z)
    log_qz: Tensor  # [K, B] log q(z_k|x), full graph (params and z)
    log_qz_stopped: Tensor  # [K, B] log q(z_k|x) with params detached (graph via z only): STL / DReG
    kl: Tensor  # [B] analytic KL(q(z|x) || p(z)) (graph to params)
    kl_per_dim: Tensor  # [B, D or n]
    num_tokens: Tensor  # [B] target tokens per sentence (= lengths)
    latent_loss: Tensor | None = None  # [B] the latent's own loss (VQ: β·commitment [+ codebook]), graph to the
    # encoder (and a trained codebook); the estimators add its batch mean to the encoder loss. None: no such loss

    @property
    def num_samples(self) -> int:
        """``K``."""
        return self.log_px_z.shape[0]


def build_latent(config: VAEModelConfig) -> GaussianLatent | CategoricalLatent | VQLatent:
    """The configured latent family."""
    if config.latent == "gaussian":
        return GaussianLatent(config.latent_size, config.min_std)
    if config.latent == "vq":
        return VQLatent(config.num_latents, config.num_categories, config.categorical_embedding_size,
                        beta=config.vq_beta, decay=config.vq_decay)
    return CategoricalLatent(config.num_latents, config.num_categories, config.categorical_embedding_size)


class SentenceVAE(nn.Module):
    """Encoder, latent and decoder built from a :class:`VAEModelConfig` (``vocab_size`` filled in).

    ``encoder(targets [T, B], lengths [B]) -> params [B, P]``;
    ``decoder.log_likelihood(inputs, targets, mask [T, B], z [K, B, ...]) -> [K, B]``;
    ``latent``: :class:`GaussianLatent`, :class:`CategoricalLatent` or :class:`VQLatent`. ``forward`` is
    :meth:`sample_terms` (so DDP wraps the whole pass).
    """

    def __init__(self, config: VAEModelConfig) -> None:
        super().__init__()
        vocab_size = config.require_vocab_size()
        self.config = config.model_copy()
        self.latent = build_latent(config)
        latent_input = LatentInput(self.latent)
        if config.architecture == "recurrent":
            self.encoder: RecurrentEncoder | MLPEncoder = RecurrentEncoder(
                vocab_size, config.embedding_size, config.hidden_size, self.latent.param_size,
                cell=config.encoder_cell, mogrifier_rounds=config.mogrifier_rounds,
            )
            self.decoder: RecurrentDecoder | MLPDecoder = RecurrentDecoder(
                vocab_size, config.embedding_size, config.hidden_size, latent_input,
                cell=config.decoder_cell, mogrifier_rounds=config.mogrifier_rounds,
                embedding_dropout=config.embedding_dropout, word_dropout=config.word_dropout,
                input_dropout=config.input_dropout, state_dropout=config.state_dropout,
                output_dropout=config.output_dropout, shared_dropout_mask=config.shared_dropout_mask,
                unk_id=config.unk_id,
            )
        else:
            self.encoder = MLPEncoder(vocab_size, config.embedding_size, config.hidden_size, self.latent.param_size)
            # §5.7.1: categorical latents are embedded first, so their decoder has one hidden layer, not two
            # (VQ latents too: the decoder reads code vectors).
            hidden_layers = 2 if config.latent == "gaussian" else 1
            self.decoder = MLPDecoder(vocab_size, config.hidden_size, latent_input, hidden_layers)

    def sample_terms(
        self, inputs: Tensor, targets: Tensor, mask: Tensor, lengths: Tensor, num_samples: int,
        noise: Tensor | None = None,
    ) -> LatentTerms:
        """Encode, draw ``K = num_samples`` latents per sentence, score them all.

        ``inputs``/``targets`` [T, B] int64, ``mask`` [T, B] bool, ``lengths`` [B] int64 (= mask.sum(0)).
        ``noise``: the sampling noise (``latent.draw_noise(K, B, generator)``), so that a sentence's latents
        do not depend on which rank scores it; None draws from the global RNG.
        """
        if num_samples < 1:
            raise ValueError(f"num_samples must be >= 1, got {num_samples}")
        params = self.encoder(targets, lengths)  # [B, P]
        z = self.latent.sample(params, num_samples, noise)  # [K, B, ...]
        if self.latent.reparameterized and torch.is_grad_enabled():
            z_leaf: Tensor | None = z.detach().requires_grad_()
            decoder_z = z_leaf
        else:
            z_leaf, decoder_z = None, z.detach()
        log_px_z = self.decoder.log_likelihood(inputs, targets, mask, decoder_z)
        log_qz = self.latent.log_prob(params, z)
        kl_per_dim = self.latent.kl_per_dim(params)
        latent_loss = None
        if isinstance(self.latent, VQLatent):
            latent_loss = self.latent.auxiliary_loss(params)
            if self.training:
                self.latent.update_codebook(params)  # EMA (no-op without); the batch used the old codebook
        return LatentTerms(
            params=params,
            z=z,
            z_leaf=z_leaf,
            log_px_z=log_px_z,
            log_pz=self.latent.prior_log_prob(z, dtype=log_qz.dtype),
            log_qz=log_qz,
            log_qz_stopped=self.latent.log_prob(params.detach(), z),
            kl=kl_per_dim.sum(-1),
            kl_per_dim=kl_per_dim,
            num_tokens=lengths,
            latent_loss=latent_loss,
        )

    def forward(
        self, inputs: Tensor, targets: Tensor, mask: Tensor, lengths: Tensor, num_samples: int,
        noise: Tensor | None = None,
    ) -> LatentTerms:
        """Same as :meth:`sample_terms` (DDP and DeepSpeed wrap ``forward``)."""
        return self.sample_terms(inputs, targets, mask, lengths, num_samples, noise)

    def reset_decoder(self, seed: int | None = None) -> None:
        """Re-initialise the decoder's parameters in place (encoder pretraining followed by a decoder reset,
        Li et al. 2019); the encoder is untouched.

        With ``seed`` the new parameters are drawn from a forked RNG seeded with it (the same on every
        rank, and the global RNG streams are left as they were); without it from the global RNG.
        """
        if seed is None:
            self.decoder.reset_parameters()
            return
        devices = [p.device for p in self.decoder.parameters() if p.device.type == "cuda"]
        with torch.random.fork_rng(devices=sorted({d.index or 0 for d in devices})):
            torch.manual_seed(seed)
            self.decoder.reset_parameters()
