"""Evaluation of sentence VAEs: importance-sampled NLL and perplexity, ELBO, KL, mutual information, active units.

Every figure of one batch comes from one pass: the encoder runs once, ``K`` latent samples per sentence
``z [K, B, ...]`` are drawn at once, and the decoder scores them ``chunk_size`` samples at a time (all
``chunk_size * B`` sequences of a chunk in one decoder pass), which bounds memory without changing any
number: the importance log weights ``ℓ_k = ln p(x|z_k) + ln p(z_k) - ln q(z_k|x)`` of the chunks are
combined exactly (a log-sum-exp of the chunks' log-sum-exps). From the same ``K`` samples:

* ``ln p̂(x) = Ŝ^K = logsumexp_k ℓ_k - ln K`` - the importance-sampled (IWAE) log-likelihood (Burda et
  al. 2015); NLL and perplexity come from it, never from the ELBO.
* ELBO ``= reconstruction - KL``: reconstruction ``E_q ln p(x|z)`` estimated by ``mean_k ln p(x|z_k)``,
  KL(q(z|x) || p(z)) analytic.
* Mutual information as thesis §5.7.1 estimates it: the mean over sentences of ``Û^K - Ŝ^K``, with the
  self-normalised ``Û^K = Σ_k softmax_k(ℓ)_k ln p(x|z_k)`` (eq. 5.9); per sentence it estimates
  KL(p(z|x) || p(z)) (consistent as K grows, biased upwards), whose mean over the data is the model's
  ``I_p(X, Z)``.
* For comparison the aggregate-posterior estimate ``I_q = E_x KL(q(z|x) || q(z))`` with ``q(z)`` the
  mixture of the posteriors of the sentences *of the same batch* (as He et al.'s lagging-encoder code
  does): ``ln q(z_k|x_i) - ln (1/B Σ_j q(z_k|x_j))``, averaged over the K samples. Each term is at most
  ``ln B``, so this estimate is capped by the log of the evaluation batch size.
* Active units (Burda et al. 2015): latent dimensions whose posterior mean ``E_q[z|x]`` varies over the
  data with (unbiased) variance >= ``active_unit_threshold`` (0.01). Categorical latents use their
  flattened probabilities (``n * m`` "dimensions", see ``posterior_mean`` of the latent).

Token-count convention: ``tokens`` counts the target tokens, i.e. the sentence's words plus the
end-of-sentence token when the corpus includes it (``SentenceCorpus(include_eos=...)``, decided by the
dataset / task), never the ``<bos>`` input. Per-token figures and the perplexity ``exp(NLL / tokens)``
therefore follow the usual PTB language-model convention (words + ``<eos>``) when ``<eos>`` is included.

Multi-rank: :func:`evaluate_vae` returns sums (:meth:`VAEEvaluation.sums`, one float64 vector) that the
ranks can all-reduce and rebuild with :meth:`VAEEvaluation.from_sums`, so each rank scores a shard.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
from torch import Tensor, nn

if TYPE_CHECKING:
    from pipeline.data.sentences import SentenceBatch

__all__ = [
    "METRIC_DESCRIPTIONS",
    "SentenceScores",
    "VAEEvaluation",
    "evaluate_vae",
    "importance_sampled_log_likelihood",
    "score_sentences",
]

# Bound on the elements of the [samples*B, B, D] tensor of the aggregate-posterior cross terms.
_CROSS_ELEMENTS = 1 << 23

METRIC_DESCRIPTIONS: dict[str, str] = {
    "nll": "importance-sampled negative log-likelihood, nats per token (same as nll_per_token)",
    "nll_per_token": "importance-sampled negative log-likelihood -ln p̂(x), nats per target token",
    "nll_per_sentence": "importance-sampled negative log-likelihood -ln p̂(x), nats per sentence",
    "ppl": "perplexity exp(nll_per_token) from the importance-sampled NLL (never from the ELBO)",
    "elbo_per_token": "ELBO (reconstruction - analytic KL), nats per target token",
    "elbo_per_sentence": "ELBO (reconstruction - analytic KL), nats per sentence",
    "reconstruction_per_token": "E_q ln p(x|z) (mean over the K samples), nats per target token",
    "reconstruction_per_sentence": "E_q ln p(x|z) (mean over the K samples), nats per sentence",
    "kl_per_token": "analytic KL(q(z|x) || p(z)), nats per target token",
    "kl_per_sentence": "analytic KL(q(z|x) || p(z)), nats per sentence",
    "mutual_information": "mean over sentences of Û^K - Ŝ^K (thesis eq. 5.9, §5.7.1), nats: estimates I_p(X, Z)",
    "mutual_information_aggregate": "E_x KL(q(z|x) || q(z)) with q(z) the mixture of the batch's posteriors, "
                                    "nats; capped by ln(evaluation batch size)",
    "active_units": "latent dimensions whose posterior mean has variance over the data >= the threshold "
                    "(categorical: flattened probabilities)",
    "sentences": "sentences scored",
    "tokens": "target tokens scored (words + <eos> when the corpus includes it)",
    "samples": "importance samples K per sentence",
}


@dataclass
class SentenceScores:
    """Per-sentence figures of one batch of ``B`` sentences (float64, on the model's device)."""

    log_likelihood: Tensor  # [B] Ŝ^K = ln p̂(x)
    reconstruction: Tensor  # [B] mean_k ln p(x|z_k)
    kl: Tensor  # [B] analytic KL(q(z|x) || p(z))
    mutual_information: Tensor  # [B] Û^K - Ŝ^K
    mutual_information_aggregate: Tensor | None  # [B] mean_k ln q(z_k|x) - ln q_batch(z_k), or None
    posterior_mean: Tensor  # [B, D'] E_q[z|x] (categorical: flattened probabilities)
    num_tokens: Tensor  # [B] target tokens per sentence


def _model_device(model: nn.Module, fallback: torch.device) -> torch.device:
    parameter = next(model.parameters(), None)
    return fallback if parameter is None else parameter.device


def _aggregate_posterior_log_density(latent: nn.Module, params: Tensor, z: Tensor) -> Tensor:
    """``ln (1/B Σ_j q(z[k, i] | x_j))`` for every sample ``z [c, B, ...]`` -> ``[c, B]``."""
    c, b = z.shape[:2]
    tail = z.shape[2:]
    per_sample = b * b * max(1, math.prod(tail))
    step = max(1, _CROSS_ELEMENTS // per_sample)
    out = []
    for start in range(0, c, step):
        piece = z[start:start + step]
        n = piece.shape[0]
        # row (k, i) repeats z[k, i] for every column j, so log_prob scores it under each q(z|x_j)
        cross = piece.unsqueeze(2).expand(n, b, b, *tail).reshape(n * b, b, *tail)
        log_q = latent.log_prob(params, cross).double()  # [n*b, b]
        out.append((torch.logsumexp(log_q, dim=1) - math.log(b)).view(n, b))
    return torch.cat(out, dim=0)


@torch.no_grad()
def score_sentences(model: nn.Module, batch: SentenceBatch, num_samples: int, chunk_size: int, *,
                    aggregate: bool = True, noise: Tensor | None = None) -> SentenceScores:
    """All per-sentence figures of ``batch`` from one set of ``num_samples`` latent samples per sentence.

    ``model`` exposes ``encoder(targets [T,B], lengths [B]) -> params [B,P]``,
    ``decoder.log_likelihood(inputs, targets, mask, z [c,B,...]) -> [c,B]`` and ``latent`` (``sample``,
    ``log_prob``, ``prior_log_prob``, ``kl_to_prior``, ``posterior_mean``) as :class:`models.vae.SentenceVAE`.
    The caller chooses the mode (``model.eval()`` for evaluation). The batch is moved to the model's device.
    ``chunk_size`` samples per decoder pass; the results do not depend on it (given the random state).
    ``aggregate=False`` skips the aggregate-posterior mutual information (``None``). ``noise``: the
    sampling noise [K, B, ...] (``latent.draw_noise``), so that the figures do not depend on the RNG state.
    """
    if num_samples < 1 or chunk_size < 1:
        raise ValueError(f"num_samples ({num_samples}) and chunk_size ({chunk_size}) must be >= 1")
    device = _model_device(model, batch.targets.device)
    inputs, targets = batch.inputs.to(device), batch.targets.to(device)
    mask, lengths = batch.mask.to(device), batch.lengths.to(device)
    latent = model.latent
    params = model.encoder(targets, lengths)  # [B, P]
    # [K, B, ...]: all samples at once, so chunking changes nothing
    z = latent.sample(params, num_samples) if noise is None else latent.sample(params, num_samples, noise)
    chunk_lse, chunk_u, recon_sum, agg_sum = [], [], 0.0, 0.0
    for start in range(0, num_samples, chunk_size):
        zc = z[start:start + chunk_size]
        log_px_z = model.decoder.log_likelihood(inputs, targets, mask, zc).double()  # [c, B]
        log_qz = latent.log_prob(params, zc).double()
        log_w = log_px_z + latent.prior_log_prob(zc).double() - log_qz  # [c, B]
        lse = torch.logsumexp(log_w, dim=0)  # [B]
        chunk_lse.append(lse)
        # Û within the chunk; the chunks are re-weighted by their share of the total weight below
        chunk_u.append((torch.softmax(log_w, dim=0) * log_px_z).sum(0))
        recon_sum = recon_sum + log_px_z.sum(0)
        if aggregate:
            agg_sum = agg_sum + (log_qz - _aggregate_posterior_log_density(latent, params, zc)).sum(0)
    lse_chunks = torch.stack(chunk_lse)  # [C, B]
    total_lse = torch.logsumexp(lse_chunks, dim=0)  # [B]
    u_hat = (torch.exp(lse_chunks - total_lse) * torch.stack(chunk_u)).sum(0)
    log_likelihood = total_lse - math.log(num_samples)
    return SentenceScores(
        log_likelihood=log_likelihood,
        reconstruction=recon_sum / num_samples,
        kl=latent.kl_to_prior(params).double(),
        mutual_information=u_hat - log_likelihood,
        mutual_information_aggregate=agg_sum / num_samples if aggregate else None,
        posterior_mean=latent.posterior_mean(params).double().reshape(params.shape[0], -1),
        num_tokens=lengths.double(),
    )


@torch.no_grad()
def importance_sampled_log_likelihood(model: nn.Module, batch: SentenceBatch, num_samples: int,
                                      chunk_size: int, noise: Tensor | None = None) -> Tensor:
    """``ln p̂(x) = logsumexp_k ℓ_k - ln K`` per sentence, ``[B]`` float64 on the model's device.

    ``ℓ_k = ln p(x|z_k) + ln p(z_k) - ln q(z_k|x)``, ``z_k ~ q(z|x)``, ``K = num_samples`` processed
    ``chunk_size`` samples at a time (exact). Runs in eval mode (dropout off); the mode is restored.
    """
    was_training = model.training
    model.eval()
    try:
        return score_sentences(model, batch, num_samples, chunk_size, aggregate=False, noise=noise).log_likelihood
    finally:
        model.train(was_training)


@dataclass
class VAEEvaluation:
    """Sums over the scored sentences (float64 scalars, nats); :meth:`metrics` turns them into figures.

    Sums rather than means so that shards combine: ``from_sums(all_reduce(sums()))`` on every rank.
    ``posterior_mean_sum`` / ``posterior_mean_square_sum`` ``[D']`` give the active units.
    """

    num_samples: int
    active_unit_threshold: float
    sentences: float
    tokens: float
    log_likelihood: float  # Σ ln p̂(x)
    reconstruction: float  # Σ mean_k ln p(x|z_k)
    kl: float  # Σ analytic KL
    mutual_information: float  # Σ (Û^K - Ŝ^K)
    mutual_information_aggregate: float  # Σ per-sentence aggregate-posterior estimate
    posterior_mean_sum: Tensor  # [D'] float64
    posterior_mean_square_sum: Tensor  # [D'] float64

    _SCALARS: ClassVar[tuple[str, ...]] = ("sentences", "tokens", "log_likelihood", "reconstruction", "kl",
                                           "mutual_information", "mutual_information_aggregate")

    def sums(self) -> Tensor:
        """``[7 + 2 D']`` float64 vector of every sum (CPU), to all-reduce across ranks."""
        scalars = torch.tensor([getattr(self, name) for name in self._SCALARS], dtype=torch.float64)
        return torch.cat([scalars, self.posterior_mean_sum.double().cpu(), self.posterior_mean_square_sum.double().cpu()])

    @classmethod
    def from_sums(cls, sums: Tensor, *, num_samples: int, active_unit_threshold: float = 0.01) -> VAEEvaluation:
        """Inverse of :meth:`sums` (e.g. after an all-reduce of every rank's sums)."""
        sums = sums.detach().double().cpu()
        n = len(cls._SCALARS)
        dims = (sums.numel() - n) // 2
        if sums.numel() != n + 2 * dims:
            raise ValueError(f"sums has {sums.numel()} entries, expected {n} + 2 x latent dimensions")
        scalars = dict(zip(cls._SCALARS, sums[:n].tolist()))
        return cls(num_samples=num_samples, active_unit_threshold=active_unit_threshold, **scalars,
                   posterior_mean_sum=sums[n:n + dims].clone(), posterior_mean_square_sum=sums[n + dims:].clone())

    def __add__(self, other: VAEEvaluation) -> VAEEvaluation:
        if (self.num_samples, self.active_unit_threshold) != (other.num_samples, other.active_unit_threshold):
            raise ValueError("cannot combine evaluations with different num_samples / active_unit_threshold")
        return VAEEvaluation.from_sums(self.sums() + other.sums(), num_samples=self.num_samples,
                                       active_unit_threshold=self.active_unit_threshold)

    def posterior_mean_variance(self) -> Tensor:
        """``[D']`` unbiased variance over the sentences of ``E_q[z|x]`` (NaN for fewer than 2 sentences)."""
        n = self.sentences
        if n < 2:
            return torch.full_like(self.posterior_mean_sum, float("nan"))
        mean = self.posterior_mean_sum / n
        return ((self.posterior_mean_square_sum - n * mean * mean) / (n - 1)).clamp_min(0.0)

    def active_units(self) -> float:
        """Dimensions with ``posterior_mean_variance() >= active_unit_threshold`` (NaN below 2 sentences)."""
        if self.sentences < 2:
            return float("nan")
        return float((self.posterior_mean_variance() >= self.active_unit_threshold).sum())

    def metrics(self, prefix: str = "") -> dict[str, float]:
        """``{prefix + name: value}`` for the names of :data:`METRIC_DESCRIPTIONS`.

        Per-token figures divide by ``tokens`` (target tokens incl. ``<eos>`` when the corpus has it);
        ``ppl = exp(nll_per_token)`` from the importance-sampled NLL.
        """
        if self.sentences <= 0 or self.tokens <= 0:
            raise ValueError("nothing was evaluated: no sentences / tokens")
        s, t = self.sentences, self.tokens
        nll, elbo = -self.log_likelihood, self.reconstruction - self.kl
        values = {
            "nll": nll / t, "nll_per_token": nll / t, "nll_per_sentence": nll / s,
            "ppl": math.exp(min(nll / t, 700.0)),
            "elbo_per_token": elbo / t, "elbo_per_sentence": elbo / s,
            "reconstruction_per_token": self.reconstruction / t, "reconstruction_per_sentence": self.reconstruction / s,
            "kl_per_token": self.kl / t, "kl_per_sentence": self.kl / s,
            "mutual_information": self.mutual_information / s,
            "mutual_information_aggregate": self.mutual_information_aggregate / s,
            "active_units": self.active_units(),
            "sentences": s, "tokens": t, "samples": float(self.num_samples),
        }
        return {prefix + name: float(value) for name, value in values.items()}


@torch.no_grad()
def evaluate_vae(model: nn.Module, batches: Iterable[SentenceBatch], *, num_samples: int, chunk_size: int,
                 active_unit_threshold: float = 0.01, noise: Tensor | None = None) -> VAEEvaluation:
    """Score every sentence of ``batches`` (one pass each, ``num_samples`` importance samples) in eval mode.

    Each batch is scored before the next is read. The mutual information estimates and the active units
    are described in the module docstring; the aggregate-posterior one mixes the posteriors of each
    batch, so it is capped by ``ln(batch size)`` and depends on the batching. The model's mode is restored.
    Returns sums (see :class:`VAEEvaluation`); a shard with no sentences gives zero sums. ``noise``: the
    sampling noise of every sentence ``[K, N, ...]`` (``latent.draw_noise``), row ``batch.indices`` for a
    batch, so that the figures neither depend on nor advance the global random state; None: drawn from it.
    """
    was_training = model.training
    model.eval()
    sums: dict[str, float] = {name: 0.0 for name in VAEEvaluation._SCALARS}
    mean_sum: Tensor | None = None
    square_sum: Tensor | None = None
    try:
        for batch in batches:
            if batch.lengths.numel() == 0:
                continue
            if noise is not None and batch.indices is None:
                raise ValueError("evaluate_vae with noise needs batches with sentence indices (evaluation_batches)")
            batch_noise = None if noise is None else noise[:, batch.indices]
            scores = score_sentences(model, batch, num_samples, chunk_size, noise=batch_noise)
            assert scores.mutual_information_aggregate is not None
            sums["sentences"] += float(scores.log_likelihood.numel())
            sums["tokens"] += float(scores.num_tokens.sum())
            sums["log_likelihood"] += float(scores.log_likelihood.sum())
            sums["reconstruction"] += float(scores.reconstruction.sum())
            sums["kl"] += float(scores.kl.sum())
            sums["mutual_information"] += float(scores.mutual_information.sum())
            sums["mutual_information_aggregate"] += float(scores.mutual_information_aggregate.sum())
            means = scores.posterior_mean.cpu()
            mean_sum = means.sum(0) if mean_sum is None else mean_sum + means.sum(0)
            square_sum = (means * means).sum(0) if square_sum is None else square_sum + (means * means).sum(0)
    finally:
        model.train(was_training)
    if mean_sum is None or square_sum is None:
        # no sentences on this shard: the latent width is unknown here; a zero-width vector would not
        # all-reduce with the other ranks' vectors, so ask the model for it
        width = _posterior_width(model)
        mean_sum = square_sum = torch.zeros(width, dtype=torch.float64)
    return VAEEvaluation(num_samples=num_samples, active_unit_threshold=active_unit_threshold, **sums,
                         posterior_mean_sum=mean_sum, posterior_mean_square_sum=square_sum)


def _posterior_width(model: nn.Module) -> int:
    """Width ``D'`` of ``latent.posterior_mean`` (from one all-zero parameter row)."""
    latent = model.latent
    device = _model_device(model, torch.device("cpu"))
    return int(latent.posterior_mean(torch.zeros(1, latent.param_size, device=device)).reshape(1, -1).shape[1])
