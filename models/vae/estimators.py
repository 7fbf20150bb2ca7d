"""Gradient estimators of sentence-VAE objectives as two surrogate losses (one backward pass, DDP-safe).

:func:`estimate` turns a batch's :class:`~models.vae.model.LatentTerms` into an :class:`Estimate`:
the objective (a number to log) and two surrogate losses whose gradients are the chosen estimator's
(negated, batch-mean) gradients: ``decoder_loss`` for the decoder, ``encoder_loss`` for the encoder.
Training backprops ``decoder_loss + encoder_loss`` once.

Every non-elbo objective is a per-sentence function F(ℓ, lp) of the log weights
ℓ_k = lp_k + ln p(z_k) - ln q(z_k|x) and lp_k = ln p(x|z_k) (see :mod:`models.vae.objectives`).
Its partial derivatives c_ℓ = ∂F/∂ℓ, c_lp = ∂F/∂lp (and, for DReG, diagonal second derivatives) are
taken by autograd on detached copies of the tiny [K, B] tensors, then used as stopped coefficients:

- decoder: ``-Σ stop(c_ℓ + c_lp) · ln p(x|z)`` (``log_px_z`` has graph to the decoder only);
- encoder, reparameterised (gaussian): the path through the decoder enters as ``Σ z · stop(g)`` with
  g = ∂/∂z_leaf Σ stop(e) · ln p(x|z) (taken by ``torch.autograd.grad`` w.r.t. ``z_leaf`` only, so no
  parameter ``.grad`` is touched and the decoder parameters stay out of the encoder loss), plus a
  coefficient times R = ln p(z) - ln q(z|x):

  ========  ====================  ===================  =======================================
  estimator e (path coefficient)   R coefficient         R
  ========  ====================  ===================  =======================================
  iwae      c_ℓ + c_lp            c_ℓ                   ln p(z) - ln q(z|x) (full graph: score term kept)
  stl       c_ℓ + c_lp            c_ℓ                   ln p(z) - ln q_stop(z|x) (score term dropped; biased for K>1)
  dreg      a + b                 a                     ln p(z) - ln q_stop(z|x)
  ========  ====================  ===================  =======================================

  with a = c_ℓ - ∂c_ℓ_k/∂ℓ_k and b = c_lp - ∂c_ℓ_k/∂lp_k (generalised DReG, Tucker et al. 2019: the score
  term E[c_ℓ_k ∂_φ ln q(z_k)] is rewritten as E[d c_ℓ_k/dz_k · ∂z_k/∂φ]); for F = Ŝ (IWAE) a = w̃², b = 0.
- encoder, score function (categorical latents, or reinforce / vimco): Σ stop(F - baseline) · ln q_φ(z)
  plus the direct term -Σ stop(c_ℓ) · ln q_φ(z) (ℓ depends on φ through -ln q at fixed z). reinforce's
  baseline is F's leave-one-out mean over the batch's other sentences; vimco's (Mnih & Rezende 2016) is
  F with sample k's (ℓ_k, lp_k) replaced by the mean of the other samples' values.

elbo: F = mean_k lp_k - w · penalty(KL(q||p)) with the analytic KL (entering the encoder loss directly),
w = ``kl_weight`` × ``kl_weight_scale``; gaussian: reparameterised lp path; categorical: per-sample score
function with a leave-one-out batch baseline. Free bits clamp the batch-mean KL (``free_bits_mode: batch``,
as Kingma et al. 2016 and Li et al. 2019 do) or each sentence's KL (``sentence``).

VQ latents (``terms.latent_loss`` not None, :class:`~models.vae.latents.VQLatent`): estimator elbo only
(the VQ-VAE objective has no mutual-information term and a point-mass posterior; any other estimator is
refused). The reconstruction gradient reaches the encoder straight-through by the reparameterised path
above, the analytic KL ``n ln m`` is a constant, and the batch mean of ``latent_loss`` (β·commitment, +
the codebook loss without EMA) is added to ``encoder_loss`` (metric ``latent_loss``); it is not part of
the reported objective.

All losses and metrics are batch means per sentence (nats/sentence), i.e. gradients of the batch-mean
objective. Under ``torch.no_grad()`` only the objective and metrics are computed (losses are 0).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from typing import TYPE_CHECKING

import torch
from torch import Tensor

from .objectives import (
    ObjectiveSpec,
    iwae_bound,
    kl_divergence_estimate,
    monte_carlo_objective,
    renyi_divergence_estimate,
)

if TYPE_CHECKING:  # only for annotations: keeps this module importable without the model code
    from .model import LatentTerms

__all__ = [
    "Estimate",
    "ObjectiveFn",
    "estimate",
    "objective_coefficients",
    "dreg_coefficients",
    "vimco_baselines",
    "leave_one_out_mean",
]

ObjectiveFn = Callable[[Tensor, Tensor], Tensor]
"""F(log_weights [K, N], log_px_z [K, N]) -> [N], independent per sentence (column)."""

_REPARAMETERISED = ("iwae", "stl", "dreg")


@dataclass
class Estimate:
    """One batch's objective and surrogate losses (see the module docstring)."""

    objective: Tensor  # [] batch mean of the per-sentence objective estimate (detached; nats/sentence)
    decoder_loss: Tensor  # [] grad wrt decoder params = -(estimator's decoder gradient); no encoder path
    encoder_loss: Tensor  # [] grad wrt encoder params = -(estimator's encoder gradient); no decoder-param path
    metrics: dict[str, Tensor]  # detached [] batch means per sentence


def _work_dtype(t: Tensor) -> torch.dtype:
    return torch.promote_types(t.dtype, torch.float32)


def objective_coefficients(fn: ObjectiveFn, log_weights: Tensor, log_px_z: Tensor) -> tuple[Tensor, Tensor]:
    """c_ℓ = ∂F/∂ℓ and c_lp = ∂F/∂lp, each [K, N], of F = ``fn`` at detached copies of the inputs.

    F is independent per sentence, so the gradient of Σ_n F_n gives every sentence's own derivatives.
    """
    dtype = _work_dtype(log_weights)
    ell = log_weights.detach().to(dtype).requires_grad_()
    lp = log_px_z.detach().to(dtype).requires_grad_()
    with torch.enable_grad():
        c_ell, c_lp = torch.autograd.grad(fn(ell, lp).sum(), (ell, lp), allow_unused=True)
    c_ell = torch.zeros_like(ell) if c_ell is None else c_ell
    c_lp = torch.zeros_like(lp) if c_lp is None else c_lp
    return c_ell.detach(), c_lp.detach()


def dreg_coefficients(fn: ObjectiveFn, log_weights: Tensor, log_px_z: Tensor) -> tuple[Tensor, Tensor]:
    """Generalised DReG coefficients (a, b), each [K, N]: a = c_ℓ - ∂c_ℓ_k/∂ℓ_k, b = c_lp - ∂c_ℓ_k/∂lp_k.

    The diagonal second derivatives come from one double-backward pass batched over K one-hot
    directions (sentences are independent, so each direction covers all N at once; tiny tensors).
    For F = Ŝ^K (IWAE): a = w̃², b = 0 (Tucker et al. 2019).
    """
    dtype = _work_dtype(log_weights)
    ell = log_weights.detach().to(dtype).requires_grad_()
    lp = log_px_z.detach().to(dtype).requires_grad_()
    k, n = ell.shape
    with torch.enable_grad():
        c_ell, c_lp = torch.autograd.grad(fn(ell, lp).sum(), (ell, lp), create_graph=True, allow_unused=True)
        c_ell = torch.zeros_like(ell) if c_ell is None else c_ell
        c_lp = torch.zeros_like(lp) if c_lp is None else c_lp
        h_ell = h_lp = None
        if c_ell.requires_grad:  # else F is linear in ℓ: no second derivatives
            one_hot = torch.eye(k, dtype=dtype, device=ell.device)[:, :, None].expand(k, k, n)
            h_ell, h_lp = torch.autograd.grad(
                c_ell, (ell, lp), grad_outputs=one_hot, is_grads_batched=True, allow_unused=True
            )  # [K_direction, K, N]: row r = ∂(Σ_n c_ℓ[r, n])/∂(ℓ, lp)
    h_ell = torch.zeros_like(ell) if h_ell is None else torch.diagonal(h_ell, dim1=0, dim2=1).T
    h_lp = torch.zeros_like(lp) if h_lp is None else torch.diagonal(h_lp, dim1=0, dim2=1).T
    return (c_ell - h_ell).detach(), (c_lp - h_lp).detach()


def leave_one_out_mean(x: Tensor, dim: int) -> Tensor:
    """Mean over ``dim`` of the OTHER entries, same shape as ``x`` (size along ``dim`` >= 2).

    Computed in float64 so that rounding does not leak an entry into its own baseline.
    """
    n = x.shape[dim]
    if n < 2:
        raise ValueError(f"leave-one-out mean needs >= 2 entries along dim {dim}, got {n}")
    x64 = x.detach().double()
    return ((x64.sum(dim, keepdim=True) - x64) / (n - 1)).to(x.dtype)


def vimco_baselines(fn: ObjectiveFn, log_weights: Tensor, log_px_z: Tensor) -> Tensor:
    """VIMCO's per-sample baselines F_{-k} [K, N]: F with sample k's (ℓ_k, lp_k) replaced by the means of
    the other K - 1 samples' values (Mnih & Rezende 2016), all K replacements batched as [K, K, N]."""
    k, n = log_weights.shape
    replaced = torch.eye(k, dtype=torch.bool, device=log_weights.device)[:, :, None]  # [K_replaced, K, 1]

    def swap(x: Tensor) -> Tensor:  # [K, N] -> [K, K*N]: column block r has row r replaced
        x = x.detach()
        batched = torch.where(replaced, leave_one_out_mean(x, 0)[:, None, :], x[None, :, :])  # [K_r, K, N]
        return batched.permute(1, 0, 2).reshape(k, k * n)

    with torch.no_grad():
        return fn(swap(log_weights), swap(log_px_z)).view(k, n)


def _path_through_decoder(terms: LatentTerms, coefficient: Tensor) -> Tensor:
    """Σ z · stop(g) with g = ∂/∂z_leaf Σ stop(coefficient) · ln p(x|z): its encoder gradient is the path
    derivative through the decoder. Touches no parameter ``.grad``; the decoder graph is retained."""
    log_px_z = terms.log_px_z
    if terms.z_leaf is None or not log_px_z.requires_grad:
        return log_px_z.new_zeros(())
    (g,) = torch.autograd.grad(
        (coefficient.detach().to(log_px_z.dtype) * log_px_z).sum(), terms.z_leaf, retain_graph=True, allow_unused=True
    )
    if g is None:  # the decoder ignores z
        return log_px_z.new_zeros(())
    return (terms.z * g.detach()).sum()


def _log_q_params(terms: LatentTerms) -> Tensor:
    """ln q_φ(z|x) [K, B] with gradient through the parameters of q only (z held fixed).

    ln q - ln q_stop has zero value and the params-only gradient (both share the z path), so this also
    works for reparameterised gaussian samples used with a score-function estimator.
    """
    return terms.log_qz - terms.log_qz_stopped + terms.log_qz_stopped.detach()


def _kl_penalty(terms: LatentTerms, spec: ObjectiveSpec) -> Tensor:
    """Batch-mean KL penalty [] (graph to the encoder): KL, or free bits on the total / per dimension."""
    if spec.free_bits > 0:
        if spec.free_bits_mode == "batch":
            return terms.kl.mean().clamp(min=spec.free_bits)
        return terms.kl.clamp(min=spec.free_bits).mean()
    if spec.free_bits_per_dim > 0:
        if spec.free_bits_mode == "batch":
            return terms.kl_per_dim.mean(0).clamp(min=spec.free_bits_per_dim).sum()
        return terms.kl_per_dim.clamp(min=spec.free_bits_per_dim).sum(1).mean()
    return terms.kl.mean()


def _batch_baseline(values: Tensor) -> Tensor:
    """Leave-one-out mean over the batch (dim -1) of ``values`` [..., B]; 0 for a single sentence."""
    if values.shape[-1] < 2:
        return torch.zeros_like(values)
    return leave_one_out_mean(values, -1)


def _metrics(terms: LatentTerms, spec: ObjectiveSpec, log_weights: Tensor, objective: Tensor) -> dict[str, Tensor]:
    lp = terms.log_px_z.detach()
    q = spec.kl_samples or spec.samples
    metrics = {
        "objective": objective,
        "log_px_estimate": iwae_bound(log_weights[: spec.samples]).mean(),
        "kl_estimate": kl_divergence_estimate(log_weights[:q], lp[:q]).mean(),
        "kl_analytic": terms.kl.detach().mean(),
        "reconstruction": lp.mean(),
    }
    if spec.kind == "renyi":
        metrics["renyi_estimate"] = renyi_divergence_estimate(log_weights[:q], lp[:q], spec.alpha).mean()
    return metrics


def estimate(terms: LatentTerms, spec: ObjectiveSpec, *, kl_weight_scale: float = 1.0) -> Estimate:
    """The objective, surrogate losses and metrics of one batch (see the module docstring).

    ``terms`` holds K = ``spec.num_samples`` samples per sentence ([K, B] terms). ``kl_weight_scale`` (the
    trainer's KL annealing × soft-free-bits γ) multiplies ``spec.kl_weight``; estimator elbo only.
    Metrics: objective, log_px_estimate (Ŝ, ``samples``), kl_estimate (Û - Ŝ, ``kl_samples``),
    renyi_estimate (kind renyi), kl_analytic, reconstruction (mean_k ln p(x|z_k)); elbo adds kl_penalty
    and kl_weight (the effective w).
    """
    lp = terms.log_px_z
    if lp.dim() != 2 or lp.shape[0] != spec.num_samples:
        raise ValueError(
            f"log_px_z must be [K={spec.num_samples}, B] for this spec (num_samples), got {tuple(lp.shape)}"
        )
    if spec.estimator != "elbo" and kl_weight_scale != 1.0:
        raise ValueError(f"kl_weight_scale applies to estimator 'elbo' only (estimator is {spec.estimator!r})")
    if getattr(terms, "latent_loss", None) is not None and spec.estimator != "elbo":
        raise ValueError(
            f"VQ latents train with estimator 'elbo' (kind standard, 1 sample), not {spec.estimator!r}: the VQ-VAE "
            "objective has no mutual-information term and its point-mass posterior gives identical samples"
        )
    log_weights = (lp + terms.log_pz - terms.log_qz).detach()
    if spec.estimator == "elbo":
        return _elbo(terms, spec, log_weights, spec.kl_weight * kl_weight_scale)

    fn = partial(monte_carlo_objective, spec=spec)
    per_sentence = fn(log_weights, lp.detach())  # [B]
    objective = per_sentence.mean()
    metrics = _metrics(terms, spec, log_weights, objective)
    if not torch.is_grad_enabled():
        zero = lp.new_zeros(())
        return Estimate(objective, zero, zero.clone(), metrics)

    batch = lp.shape[1]
    c_ell, c_lp = (c / batch for c in objective_coefficients(fn, log_weights, lp))
    decoder_loss = -((c_ell + c_lp).to(lp.dtype) * lp).sum()
    reparameterised = terms.z_leaf is not None
    if spec.estimator in _REPARAMETERISED:
        if not reparameterised:
            raise ValueError(
                f"estimator {spec.estimator!r} needs reparameterised (gaussian) latents; "
                "use reinforce or vimco with categorical latents"
            )
        if spec.estimator == "dreg":
            a, b = (c / batch for c in dreg_coefficients(fn, log_weights, lp))
            path_coef, r_coef, log_q = a + b, a, terms.log_qz_stopped
        else:
            path_coef, r_coef = c_ell + c_lp, c_ell
            log_q = terms.log_qz if spec.estimator == "iwae" else terms.log_qz_stopped
        surrogate = _path_through_decoder(terms, path_coef) + (r_coef.to(lp.dtype) * (terms.log_pz - log_q)).sum()
    else:
        if spec.estimator == "reinforce":
            signal = (per_sentence - _batch_baseline(per_sentence))[None, :]  # [1, B]
        else:
            signal = per_sentence[None, :] - vimco_baselines(fn, log_weights, lp)  # [K, B]
        log_q = _log_q_params(terms)
        surrogate = ((signal / batch - c_ell).to(lp.dtype).detach() * log_q).sum()
    return Estimate(objective, decoder_loss, -surrogate, metrics)


def _elbo(terms: LatentTerms, spec: ObjectiveSpec, log_weights: Tensor, weight: float) -> Estimate:
    """mean_k ln p(x|z_k) - w · penalty(analytic KL), batch mean (see the module docstring)."""
    lp = terms.log_px_z
    k, batch = lp.shape
    penalty = _kl_penalty(terms, spec)
    objective = lp.detach().mean() - weight * penalty.detach()
    metrics = _metrics(terms, spec, log_weights, objective)
    metrics["kl_penalty"] = penalty.detach()
    metrics["kl_weight"] = lp.new_tensor(weight).detach()
    latent_loss = getattr(terms, "latent_loss", None)
    latent_loss = None if latent_loss is None else latent_loss.mean()
    if latent_loss is not None:
        metrics["latent_loss"] = latent_loss.detach()
    if not torch.is_grad_enabled():
        zero = lp.new_zeros(())
        return Estimate(objective, zero, zero.clone(), metrics)
    decoder_loss = -lp.sum() / (k * batch)
    if terms.z_leaf is not None:
        reconstruction = _path_through_decoder(terms, torch.full_like(lp, 1.0 / (k * batch)))
    else:  # score function, per sample (sample j's lp carries no signal for sample k), batch baseline
        lp_value = lp.detach()
        signal = lp_value - _batch_baseline(lp_value.mean(0))[None, :]  # [K, B]
        reconstruction = (signal / (k * batch) * _log_q_params(terms)).sum()
    encoder_loss = weight * penalty - reconstruction
    if latent_loss is not None:
        encoder_loss = encoder_loss + latent_loss
    return Estimate(objective, decoder_loss, encoder_loss, metrics)
