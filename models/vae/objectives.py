"""Per-sentence Monte Carlo objectives of sentence VAEs (thesis §5.4) and their typed spec.

Every function here is a pure function of two ``[K, N]`` tensors (K latent samples of each of N
sentences; reductions run over dim 0 only, so they also work per sentence on ``[K, 1]``):

- ``log_weights`` ℓ_k = ln p(x|z_k) + ln p(z_k) - ln q(z_k|x)  (the importance log weights),
- ``log_px_z``    lp_k = ln p(x|z_k),

and returns one value per sentence, ``[N]``. Estimators (:mod:`models.vae.estimators`) differentiate
these functions with autograd, so they must stay free of in-place tricks and Python control flow that
depends on tensor values.

Base estimator: the IWAE bound Ŝ^K = ln (1/K) Σ_k e^{ℓ_k} (Burda et al. 2015). Its α-powered version
Ŝ^K_α (eq. 5.17) replaces p(x|z) by p(x|z)^α, i.e. ℓ_k by ℓ_k + (α - 1) lp_k.
"""

from __future__ import annotations

import math
from typing import Literal

import torch
from pydantic import Field, model_validator
from torch import Tensor

from models.config import StrictConfig

__all__ = [
    "ObjectiveSpec",
    "iwae_bound",
    "self_normalized_u",
    "power_bound",
    "kl_divergence_estimate",
    "renyi_divergence_estimate",
    "kl_objective",
    "renyi_objective",
    "power_objective",
    "monte_carlo_objective",
]

Estimator = Literal["elbo", "iwae", "stl", "dreg", "reinforce", "vimco"]
ObjectiveKind = Literal["standard", "kl", "renyi", "power"]


def _check_pair(log_weights: Tensor, log_px_z: Tensor | None = None) -> None:
    if log_weights.dim() != 2:
        raise ValueError(f"log_weights must be [K, N], got shape {tuple(log_weights.shape)}")
    if log_px_z is not None and log_px_z.shape != log_weights.shape:
        raise ValueError(
            f"log_px_z {tuple(log_px_z.shape)} and log_weights {tuple(log_weights.shape)} must have the same shape"
        )


def iwae_bound(log_weights: Tensor) -> Tensor:
    """Ŝ^K = ln (1/K) Σ_k exp ℓ_k: ``log_weights`` [K, N] -> [N] (lower-bounds ln p(x) in expectation)."""
    _check_pair(log_weights)
    return torch.logsumexp(log_weights, dim=0) - math.log(log_weights.shape[0])


def self_normalized_u(log_weights: Tensor, log_px_z: Tensor) -> Tensor:
    """Û^K (eq. 5.9) = Σ_k w̃_k lp_k with w̃ = softmax_k(ℓ): [K, N], [K, N] -> [N].

    The self-normalised importance-sampling estimate of E_{p(z|x)} ln p(x|z).
    """
    _check_pair(log_weights, log_px_z)
    return (torch.softmax(log_weights, dim=0) * log_px_z).sum(0)


def power_bound(log_weights: Tensor, log_px_z: Tensor, alpha: float) -> Tensor:
    """Ŝ^K_α (eq. 5.17) = ln (1/K) Σ_k p(x|z_k)^α p(z_k) / q(z_k|x): [K, N], [K, N] -> [N].

    Estimates ln p^α(x) = ln E_{p(z)} p(x|z)^α; ``alpha = 1`` gives :func:`iwae_bound`.
    """
    _check_pair(log_weights, log_px_z)
    return iwae_bound(log_weights + (alpha - 1.0) * log_px_z)


def kl_divergence_estimate(log_weights: Tensor, log_px_z: Tensor) -> Tensor:
    """Û^K - Ŝ^K (eq. 5.12), the estimate of KL(p(z|x) || p(z)): [K, N], [K, N] -> [N].

    Biased upwards (Prop. 9 ii); with K = 1 it is ln q(z_1|x)/p(z_1) (Prop. 11).
    """
    return self_normalized_u(log_weights, log_px_z) - iwae_bound(log_weights)


def renyi_divergence_estimate(log_weights: Tensor, log_px_z: Tensor, alpha: float) -> Tensor:
    """(Ŝ^K_α - α Ŝ^K) / (α - 1) (eq. 5.16), the estimate of D_α(p(z|x) || p(z)): -> [N]. ``alpha != 1``."""
    if alpha == 1.0:
        raise ValueError("the Renyi divergence estimate needs alpha != 1")
    return (power_bound(log_weights, log_px_z, alpha) - alpha * iwae_bound(log_weights)) / (alpha - 1.0)


def kl_objective(
    log_weights: Tensor,
    log_px_z: Tensor,
    mi_weight: float,
    samples: int | None = None,
    kl_samples: int | None = None,
) -> Tensor:
    """KL objective (eq. 5.11/5.12): Ŝ (first ``samples``) + λ (Û - Ŝ) (first ``kl_samples``) -> [N].

    With ``samples == kl_samples`` (the default: all K) this is exactly (1 - λ) Ŝ^K + λ Û^K; different
    counts give the thesis' "16/1" and "1/16" ablations (Fig. 5.4), where the two terms use the first
    ``samples`` and the first ``kl_samples`` of the same K draws.
    """
    _check_pair(log_weights, log_px_z)
    s, q = _counts(log_weights, samples, kl_samples)
    return iwae_bound(log_weights[:s]) + mi_weight * kl_divergence_estimate(log_weights[:q], log_px_z[:q])


def renyi_objective(
    log_weights: Tensor,
    log_px_z: Tensor,
    mi_weight: float,
    alpha: float,
    samples: int | None = None,
    kl_samples: int | None = None,
) -> Tensor:
    """Rényi objective (eq. 5.15/5.16): Ŝ (first ``samples``) + λ D̂_α (first ``kl_samples``) -> [N].

    With equal counts this is λ/(α-1) Ŝ_α - (λα/(α-1) - 1) Ŝ of eq. 5.15. ``alpha != 1``.
    """
    _check_pair(log_weights, log_px_z)
    s, q = _counts(log_weights, samples, kl_samples)
    divergence = renyi_divergence_estimate(log_weights[:q], log_px_z[:q], alpha)
    return iwae_bound(log_weights[:s]) + mi_weight * divergence


def power_objective(log_weights: Tensor, log_px_z: Tensor, alpha: float, samples: int | None = None) -> Tensor:
    """Power objective (eq. 5.18): α⁻¹ Ŝ^K_α over the first ``samples`` (default all K) -> [N].

    Equals the Rényi objective with λ = (α - 1)/α, and :func:`iwae_bound` at α = 1.
    """
    _check_pair(log_weights, log_px_z)
    s, _ = _counts(log_weights, samples, None)
    return power_bound(log_weights[:s], log_px_z[:s], alpha) / alpha


def _counts(log_weights: Tensor, samples: int | None, kl_samples: int | None) -> tuple[int, int]:
    k = log_weights.shape[0]
    s = k if samples is None else samples
    q = s if kl_samples is None else kl_samples
    if not (1 <= s <= k and 1 <= q <= k):
        raise ValueError(f"samples={s} and kl_samples={q} must be in [1, K={k}]")
    return s, q


class ObjectiveSpec(StrictConfig):
    """Which objective a sentence VAE maximises and which gradient estimator gets its gradients.

    The objective per sentence x with K = :attr:`num_samples` draws z_{1:K} ~ q(z|x):

    - ``estimator: elbo`` (``kind: standard`` only): mean_k ln p(x|z_k) - w · penalty(KL(q(z|x)||p(z)))
      with the analytic KL, w = ``kl_weight`` (β-VAE) × the trainer's annealing × soft-free-bits γ, and
      penalty = KL, or free bits (see ``free_bits``, ``free_bits_per_dim``, ``free_bits_mode``).
    - any other estimator: ``kind`` standard = Ŝ (IWAE bound), kl = eq. 5.11, renyi = eq. 5.15,
      power = eq. 5.18. λ (``mi_weight``) weights the mutual-information term; Prop. 13: a single-sample
      kl or renyi objective with λ = 1 - β equals the β-VAE objective in expectation.
    """

    estimator: Estimator = Field(
        default="elbo",
        description=(
            "Gradient estimator: elbo (analytic KL; reparameterised for gaussian, score function with a "
            "leave-one-out batch baseline for categorical), iwae, stl (sticking the landing), dreg (doubly "
            "reparameterised; the last three need gaussian latents), reinforce (score function, leave-one-out "
            "batch baseline), vimco (score function, per-sample leave-one-out baseline)."
        ),
    )
    kind: ObjectiveKind = Field(
        default="standard",
        description=(
            "Objective (thesis §5.4): standard (the IWAE bound / ELBO), kl ((1-λ)Ŝ + λÛ, eq. 5.11), "
            "renyi (Ŝ + λ D̂_α, eq. 5.15), power (Ŝ_α / α, eq. 5.18)."
        ),
    )
    mi_weight: float | None = Field(
        default=None,
        description="λ, the weight of the mutual-information term; required by kind kl and renyi, else null.",
    )
    alpha: float | None = Field(
        default=None,
        description="Rényi order α > 0 (renyi: α != 1); required by kind renyi and power, else null.",
    )
    samples: int = Field(default=1, description="K, the latent samples per sentence of the ln p(x) estimate Ŝ.")
    kl_samples: int | None = Field(
        default=None,
        description=(
            "Samples of the KL / Rényi term (kind kl, renyi); null = samples. The first kl_samples of the "
            "max(samples, kl_samples) draws are used (the thesis' 16/1 and 1/16 ablations)."
        ),
    )
    kl_weight: float = Field(
        default=1.0, description="β, the weight of the analytic KL (β-VAE; estimator elbo only), >= 0."
    )
    free_bits: float = Field(
        default=0.0,
        description="Free bits on the total KL in nats (Daly): penalty max(free_bits, KL); 0 = off; elbo only.",
    )
    free_bits_per_dim: float = Field(
        default=0.0,
        description=(
            "Free bits per latent dimension in nats (Kingma et al. 2016, Li et al. 2019): penalty "
            "Σ_d max(free_bits_per_dim, KL_d); 0 = off; elbo only."
        ),
    )
    free_bits_mode: Literal["batch", "sentence"] = Field(
        default="batch",
        description=(
            "Where free bits clamp: batch = the batch-mean KL (per dimension), as Kingma et al. and Li et al. do; "
            "sentence = each sentence's KL separately."
        ),
    )

    @property
    def num_samples(self) -> int:
        """K = max(samples, kl_samples): the latent samples to draw per sentence."""
        return max(self.samples, self.kl_samples or self.samples)

    @model_validator(mode="after")
    def _check(self) -> ObjectiveSpec:
        if self.samples < 1:
            raise ValueError(f"samples must be >= 1, got {self.samples}")
        if self.kl_samples is not None:
            if self.kl_samples < 1:
                raise ValueError(f"kl_samples must be >= 1 (or null), got {self.kl_samples}")
            if self.kind not in ("kl", "renyi"):
                raise ValueError(f"kl_samples applies to kind kl or renyi only (kind is {self.kind!r}); leave it null")
        if self.kind in ("kl", "renyi"):
            if self.mi_weight is None:
                raise ValueError(f"kind {self.kind!r} needs mi_weight (λ)")
            if not math.isfinite(self.mi_weight):
                raise ValueError(f"mi_weight must be finite, got {self.mi_weight}")
        elif self.mi_weight is not None:
            raise ValueError(f"mi_weight applies to kind kl or renyi only (kind is {self.kind!r}); leave it null")
        if self.kind in ("renyi", "power"):
            if self.alpha is None:
                raise ValueError(f"kind {self.kind!r} needs alpha (α)")
            if not (math.isfinite(self.alpha) and self.alpha > 0):
                raise ValueError(f"alpha must be > 0, got {self.alpha}")
            if self.kind == "renyi" and self.alpha == 1.0:
                raise ValueError("alpha must be != 1 for kind renyi (the Rényi divergence estimate divides by α - 1)")
        elif self.alpha is not None:
            raise ValueError(f"alpha applies to kind renyi or power only (kind is {self.kind!r}); leave it null")
        if self.estimator == "elbo" and self.kind != "standard":
            raise ValueError(
                f"estimator 'elbo' takes kind 'standard' only (got kind {self.kind!r}); weight its KL with "
                "kl_weight = 1 - λ (Prop. 13) or use iwae/dreg/vimco for the kl, renyi and power objectives"
            )
        if self.estimator == "vimco" and self.num_samples < 2:
            raise ValueError("estimator 'vimco' needs samples (or kl_samples) >= 2 for its leave-one-out baseline")
        for name in ("kl_weight", "free_bits", "free_bits_per_dim"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ValueError(f"{name} must be >= 0, got {value}")
        if self.estimator != "elbo":
            if self.kl_weight != 1.0:
                raise ValueError(f"kl_weight applies to estimator 'elbo' only (estimator is {self.estimator!r})")
            for name in ("free_bits", "free_bits_per_dim"):
                if getattr(self, name) != 0.0:
                    raise ValueError(f"{name} applies to estimator 'elbo' only (estimator is {self.estimator!r})")
        if self.free_bits > 0 and self.free_bits_per_dim > 0:
            raise ValueError("set free_bits (total KL) or free_bits_per_dim, not both")
        return self


def monte_carlo_objective(log_weights: Tensor, log_px_z: Tensor, spec: ObjectiveSpec) -> Tensor:
    """The per-sentence objective F(ℓ, lp) of a non-elbo ``spec``: [K, N], [K, N] -> [N].

    K may exceed ``spec.num_samples`` only for the standard and power kinds' trailing samples, which are
    ignored; the estimators pass exactly K = ``spec.num_samples``.
    """
    if spec.estimator == "elbo":
        raise ValueError("estimator 'elbo' has no Monte Carlo objective F(ℓ, lp); it uses the analytic KL")
    if spec.kind == "standard":
        return iwae_bound(log_weights[: spec.samples])
    if spec.kind == "kl":
        return kl_objective(log_weights, log_px_z, spec.mi_weight, spec.samples, spec.kl_samples)
    if spec.kind == "renyi":
        return renyi_objective(log_weights, log_px_z, spec.mi_weight, spec.alpha, spec.samples, spec.kl_samples)
    return power_objective(log_weights, log_px_z, spec.alpha, spec.samples)
