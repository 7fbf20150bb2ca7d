"""Sentence-VAE objectives (models/vae/objectives.py) against closed forms of a linear-Gaussian model.

Model: z ~ N(0, I_d), x | z ~ N(W z + b, σ² I_m); encoder q(z|x) = N(A x + c, diag s²). Closed forms:
x ~ N(b, W Wᵀ + σ² I); posterior N(μ, Σ) with Σ = (I + WᵀW/σ²)⁻¹, μ = Σ Wᵀ (x - b)/σ²; and
p^α(x) = E_p(z) p(x|z)^α = (2πσ²)^{m(1-α)/2} α^{-m/2} N(x; b, W Wᵀ + σ²/α I).
W has orthogonal columns, so Σ is diagonal and a diagonal q can equal the exact posterior.

The model (``LinearGaussian``) also builds LatentTerms-shaped batches for tests/test_vae_estimators.py.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import pytest
import torch
from pydantic import ValidationError
from torch import Tensor, nn
from torch.distributions import MultivariateNormal, Normal

from models.vae.objectives import (
    ObjectiveSpec,
    iwae_bound,
    kl_divergence_estimate,
    kl_objective,
    monte_carlo_objective,
    power_bound,
    power_objective,
    renyi_divergence_estimate,
    renyi_objective,
    self_normalized_u,
)

try:  # the real container once models/vae/model.py exists; an equivalent one until then
    from models.vae.model import LatentTerms
except ImportError:  # pragma: no cover - depends on the other helper's progress

    @dataclass
    class LatentTerms:  # type: ignore[no-redef]
        params: Tensor
        z: Tensor
        z_leaf: Tensor | None
        log_px_z: Tensor
        log_pz: Tensor
        log_qz: Tensor
        log_qz_stopped: Tensor
        kl: Tensor
        kl_per_dim: Tensor
        num_tokens: Tensor


DTYPE = torch.float64
W0 = torch.tensor([[1.0, 0.5], [0.5, -1.0], [1.0, 0.0]], dtype=DTYPE)  # orthogonal columns
B0 = torch.tensor([0.2, -0.1, 0.3], dtype=DTYPE)
SIGMA0 = 0.8
X = torch.tensor([[1.0, -0.5, 0.8], [-0.3, 1.2, 0.1], [2.0, 0.4, 1.5]], dtype=DTYPE)  # [3, m]


class LinearGaussian(nn.Module):
    """Linear-Gaussian VAE (float64). Decoder parameters W, b, log σ; encoder parameters A, c, log s."""

    def __init__(self, encoder: str = "off", alpha: float = 1.0) -> None:
        super().__init__()
        self.W = nn.Parameter(W0.clone())
        self.b = nn.Parameter(B0.clone())
        self.log_sigma = nn.Parameter(torch.tensor(math.log(SIGMA0), dtype=DTYPE))
        # The exact posterior of the model with noise σ²/α (α = 1: p(z|x); else the optimal proposal of Ŝ_α).
        prec = torch.eye(2, dtype=DTYPE) + alpha * W0.T @ W0 / SIGMA0**2
        cov = torch.linalg.inv(prec)
        a = alpha * cov @ W0.T / SIGMA0**2
        c = -a @ B0
        log_s = 0.5 * torch.log(torch.diagonal(cov))
        if encoder == "off":  # a poor q: shrunk mean map, shifted, over-dispersed
            a, c, log_s = 0.6 * a, c + torch.tensor([0.4, -0.3], dtype=DTYPE), log_s + 0.3
        elif encoder != "posterior":
            raise ValueError(encoder)
        self.A = nn.Parameter(a.clone())
        self.c = nn.Parameter(c.clone())
        self.log_s = nn.Parameter(log_s.clone())

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [self.A, self.c, self.log_s]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [self.W, self.b, self.log_sigma]

    # ---- q(z|x) and closed forms -------------------------------------------------------------
    def q(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Mean and std [B, d] of q(z|x)."""
        mean = x @ self.A.T + self.c
        return mean, torch.exp(self.log_s).expand_as(mean)

    def log_marginal(self, x: Tensor) -> Tensor:
        cov = self.W @ self.W.T + torch.exp(2 * self.log_sigma) * torch.eye(3, dtype=DTYPE)
        return MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def log_power_marginal(self, x: Tensor, alpha: float) -> Tensor:
        """ln p^α(x) = ln E_p(z) p(x|z)^α (closed form, see the module docstring)."""
        var = torch.exp(2 * self.log_sigma)
        cov = self.W @ self.W.T + var / alpha * torch.eye(3, dtype=DTYPE)
        m = x.shape[-1]
        log_c = 0.5 * m * (1 - alpha) * torch.log(2 * math.pi * var) - 0.5 * m * math.log(alpha)
        return log_c + MultivariateNormal(self.b, covariance_matrix=cov).log_prob(x)

    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Exact posterior mean [B, d] and covariance [d, d]."""
        var = torch.exp(2 * self.log_sigma)
        cov = torch.linalg.inv(torch.eye(2, dtype=DTYPE) + self.W.T @ self.W / var)
        return (x - self.b) @ self.W @ cov / var, cov

    def true_kl(self, x: Tensor) -> Tensor:
        """KL(p(z|x) || p(z)) [B]."""
        mu, cov = self.posterior(x)
        return 0.5 * (torch.trace(cov) + (mu**2).sum(-1) - 2 - torch.logdet(cov))

    def kl_q_to_posterior(self, x: Tensor) -> Tensor:
        """KL(q(z|x) || p(z|x)) [B]; E_q[Ŝ^1] = ln p(x) - this."""
        mu, cov = self.posterior(x)
        mean, std = self.q(x)
        prec = torch.linalg.inv(cov)
        diff = mu - mean
        trace = (torch.diagonal(prec) * std**2).sum(-1)
        maha = ((diff @ prec) * diff).sum(-1)
        return 0.5 * (trace + maha - 2 + torch.logdet(cov) - torch.log(std**2).sum(-1))

    def expected_log_px_z(self, x: Tensor) -> Tensor:
        """E_q ln p(x|z) [B] (closed form)."""
        mean, std = self.q(x)
        var = torch.exp(2 * self.log_sigma)
        resid = x - mean @ self.W.T - self.b
        trace = ((self.W**2) @ (std**2).T).sum(0)  # tr(W diag(s²) Wᵀ) per sentence
        return -0.5 * x.shape[-1] * torch.log(2 * math.pi * var) - ((resid**2).sum(-1) + trace) / (2 * var)

    def analytic_kl_per_dim(self, x: Tensor) -> Tensor:
        mean, std = self.q(x)
        return 0.5 * (mean**2 + std**2 - 1) - torch.log(std)

    # ---- a LatentTerms batch ---------------------------------------------------------------------
    def sample_terms(
        self, x: Tensor, num_samples: int, generator: torch.Generator, *, leaf: bool = True
    ) -> LatentTerms:
        """K samples per sentence of ``x`` [B, m]; ``leaf=False`` keeps the full graph through the decoder
        (for reference gradients) instead of the spec's z_leaf detachment."""
        mean, std = self.q(x)
        eps = torch.randn(num_samples, *mean.shape, generator=generator, dtype=DTYPE)
        z = mean + std * eps  # [K, B, d]
        z_leaf = z.detach().requires_grad_() if leaf and torch.is_grad_enabled() else None
        z_decoder = z_leaf if z_leaf is not None else (z if not leaf else z.detach())
        sigma = torch.exp(self.log_sigma)
        log_px_z = Normal(z_decoder @ self.W.T + self.b, sigma).log_prob(x).sum(-1)
        kl_per_dim = self.analytic_kl_per_dim(x)
        return LatentTerms(
            params=torch.cat([mean, std], -1),
            z=z,
            z_leaf=z_leaf,
            log_px_z=log_px_z,
            log_pz=Normal(0.0, 1.0).log_prob(z).sum(-1),
            log_qz=Normal(mean, std).log_prob(z).sum(-1),
            log_qz_stopped=Normal(mean.detach(), std.detach()).log_prob(z).sum(-1),
            kl=kl_per_dim.sum(-1),
            kl_per_dim=kl_per_dim,
            num_tokens=torch.ones(x.shape[0], dtype=torch.long),
        )


def log_weights_of(terms: LatentTerms) -> Tensor:
    return (terms.log_px_z + terms.log_pz - terms.log_qz).detach()


def replicated(copies: int) -> Tensor:
    """X repeated ``copies`` times: [3 * copies, m]; sentence j is X[j % 3]."""
    return X.repeat(copies, 1)


def per_x_mean_and_se(values: Tensor) -> tuple[Tensor, Tensor]:
    """values [3 * copies] (from ``replicated``) -> mean and standard error per distinct x, [3] each."""
    v = values.view(-1, 3)
    return v.mean(0), v.std(0) / math.sqrt(v.shape[0])


@torch.no_grad()
def test_iwae_bound_converges_to_log_marginal_from_below() -> None:
    model = LinearGaussian("off")
    gen = torch.Generator().manual_seed(0)
    log_px = model.log_marginal(X)
    gaps = []
    for k in (1, 4, 32, 256):
        bound = iwae_bound(log_weights_of(model.sample_terms(replicated(2000), k, gen)))
        mean, se = per_x_mean_and_se(bound)
        assert torch.all(mean <= log_px + 4 * se), (k, mean, log_px, se)  # a lower bound in expectation
        if k == 1:  # E[ELBO] = ln p(x) - KL(q || p(z|x)), exactly
            expected = log_px - model.kl_q_to_posterior(X)
            assert torch.all((mean - expected).abs() < 4 * se), (mean, expected, se)
        gaps.append(log_px - mean)
    gaps = torch.stack(gaps)  # [4 K values, 3 x]
    assert torch.all(gaps[:-1] > gaps[1:]), gaps  # tighter with more samples
    assert torch.all(gaps[0] > 0.3) and torch.all(gaps[-1] < 0.03 * gaps[0]), gaps


@torch.no_grad()
@pytest.mark.parametrize("k", [1, 5])
def test_iwae_bound_is_exact_with_the_true_posterior(k: int) -> None:
    model = LinearGaussian("posterior")
    gen = torch.Generator().manual_seed(1)
    bound = iwae_bound(log_weights_of(model.sample_terms(X, k, gen)))
    torch.testing.assert_close(bound, model.log_marginal(X), rtol=0, atol=1e-10)


@torch.no_grad()
@pytest.mark.parametrize("alpha", [0.5, 2.0, 3.0])
def test_power_bound_estimates_log_power_marginal(alpha: float) -> None:
    """Ŝ_α estimates ln p^α(x) (closed form): exactly under the optimal proposal ∝ p(x|z)^α p(z), and
    from below, converging, under a poor q."""
    exact = LinearGaussian("off").log_power_marginal(X, alpha)
    optimal = LinearGaussian("posterior", alpha=alpha)
    gen = torch.Generator().manual_seed(2)
    terms = optimal.sample_terms(X, 3, gen)
    torch.testing.assert_close(power_bound(log_weights_of(terms), terms.log_px_z, alpha), exact, rtol=0, atol=1e-10)
    model = LinearGaussian("off")
    terms = model.sample_terms(replicated(1000), 512, gen)
    mean, se = per_x_mean_and_se(power_bound(log_weights_of(terms), terms.log_px_z, alpha))
    assert torch.all(mean <= exact + 4 * se) and torch.all(exact - mean < 0.05), (mean, exact, se)


@torch.no_grad()
def test_kl_estimate_converges_to_true_kl() -> None:
    """Û - Ŝ: = KL(q || p(z)) in expectation at K = 1 (Prop. 11), -> the true KL(p(z|x) || p(z)) as K grows
    (Prop. 9 i). (Prop. 9 ii's upward bias needs E Û >= E_p(z|x) ln p(x|z); with this over-dispersed q
    the self-normalised Û is biased downwards, so the small-K estimates lie below the true KL.)"""
    model = LinearGaussian("off")
    gen = torch.Generator().manual_seed(3)
    true_kl = model.true_kl(X)
    errors, ses = [], []
    for k in (1, 16, 512):
        terms = model.sample_terms(replicated(1000), k, gen)
        mean, se = per_x_mean_and_se(kl_divergence_estimate(log_weights_of(terms), terms.log_px_z))
        if k == 1:
            representational = model.analytic_kl_per_dim(X).sum(-1)
            assert torch.all((mean - representational).abs() < 4 * se), (mean, representational, se)
        errors.append((mean - true_kl).abs())
        ses.append(se)
    assert torch.all(errors[0] > 0.2) and torch.all(errors[1] < 0.25 * errors[0]), errors
    assert torch.all(errors[2] < 4 * ses[2] + 0.01), (errors, ses)


@torch.no_grad()
def test_self_normalized_u_matches_its_definition() -> None:
    gen = torch.Generator().manual_seed(4)
    ell = torch.randn(6, 4, generator=gen, dtype=DTYPE) * 3
    lp = torch.randn(6, 4, generator=gen, dtype=DTYPE) - 5
    p_hat = torch.exp(ell).mean(0)  # eq. 5.8
    expected = (torch.exp(ell) * lp).mean(0) / p_hat  # eq. 5.9
    torch.testing.assert_close(self_normalized_u(ell, lp), expected)
    torch.testing.assert_close(iwae_bound(ell), torch.log(p_hat))


@torch.no_grad()
@pytest.mark.parametrize("beta", [0.25, 0.5, 1.0, 2.0])
def test_single_sample_objectives_are_the_beta_vae_objective(beta: float) -> None:
    """Props. 11-13, per sample: with K = 1 (Ŝ¹ = ln p(x,z)/q(z|x)), the KL and Rényi (any α) objectives
    with λ = 1 - β and the power objective with α = 1/β all equal ln p(x|z) - β ln q(z|x)/p(z)."""
    model = LinearGaussian("off")
    terms = model.sample_terms(X, 1, torch.Generator().manual_seed(5))
    ell, lp = log_weights_of(terms), terms.log_px_z
    log_ratio = terms.log_qz - terms.log_pz  # the single-sample representational KL
    beta_vae = (lp - beta * log_ratio)[0]
    torch.testing.assert_close(kl_divergence_estimate(ell, lp), log_ratio[0])  # Prop. 11
    torch.testing.assert_close(kl_objective(ell, lp, 1 - beta), beta_vae)
    for alpha in (0.3, 0.9, 1.5, 4.0):
        torch.testing.assert_close(renyi_divergence_estimate(ell, lp, alpha), log_ratio[0])  # Prop. 12
        torch.testing.assert_close(renyi_objective(ell, lp, 1 - beta, alpha), beta_vae)
    torch.testing.assert_close(power_objective(ell, lp, 1 / beta), beta_vae)


@torch.no_grad()
def test_objectives_match_their_alternative_forms() -> None:
    gen = torch.Generator().manual_seed(6)
    ell = torch.randn(8, 5, generator=gen, dtype=DTYPE) * 2 - 10
    lp = torch.randn(8, 5, generator=gen, dtype=DTYPE) - 7
    lam, alpha = 0.7, 1.8
    s, u, s_alpha = iwae_bound(ell), self_normalized_u(ell, lp), power_bound(ell, lp, alpha)
    torch.testing.assert_close(power_objective(ell, lp, 1.0), s)  # α = 1: the IWAE bound
    torch.testing.assert_close(power_bound(ell, lp, 1.0), s)
    torch.testing.assert_close(kl_objective(ell, lp, lam), (1 - lam) * s + lam * u)  # eq. 5.11
    eq_5_15 = lam / (alpha - 1) * s_alpha - (lam * alpha / (alpha - 1) - 1) * s
    torch.testing.assert_close(renyi_objective(ell, lp, lam, alpha), eq_5_15)
    # The power objective is the Rényi objective with λ = (α - 1)/α.
    torch.testing.assert_close(renyi_objective(ell, lp, (alpha - 1) / alpha, alpha), power_objective(ell, lp, alpha))
    # Ŝ_α replaces p(x|z) by p(x|z)^α inside the IWAE estimator.
    torch.testing.assert_close(s_alpha, torch.log(torch.exp(ell + (alpha - 1) * lp).mean(0)))


@torch.no_grad()
def test_separate_sample_counts_use_the_leading_samples() -> None:
    gen = torch.Generator().manual_seed(7)
    ell = torch.randn(16, 3, generator=gen, dtype=DTYPE)
    lp = torch.randn(16, 3, generator=gen, dtype=DTYPE) - 2
    lam, alpha = 0.4, 0.5
    # "16/1": Ŝ from 16 samples, the KL from the first sample alone (= ln q/p = lp - ℓ).
    torch.testing.assert_close(kl_objective(ell, lp, lam, 16, 1), iwae_bound(ell) + lam * (lp[0] - ell[0]))
    # "1/16": Ŝ¹ = ℓ_1, the KL from all 16.
    torch.testing.assert_close(
        kl_objective(ell, lp, lam, 1, 16), ell[0] + lam * (self_normalized_u(ell, lp) - iwae_bound(ell))
    )
    torch.testing.assert_close(
        renyi_objective(ell, lp, lam, alpha, 4, 16),
        iwae_bound(ell[:4]) + lam * renyi_divergence_estimate(ell, lp, alpha),
    )
    torch.testing.assert_close(power_objective(ell, lp, alpha, 4), power_bound(ell[:4], lp[:4], alpha) / alpha)
    with pytest.raises(ValueError, match="samples"):
        kl_objective(ell, lp, lam, 17, 1)


@torch.no_grad()
def test_monte_carlo_objective_dispatches_on_kind() -> None:
    gen = torch.Generator().manual_seed(8)
    ell = torch.randn(4, 3, generator=gen, dtype=DTYPE)
    lp = torch.randn(4, 3, generator=gen, dtype=DTYPE) - 1
    cases = [
        (ObjectiveSpec(estimator="iwae", samples=4), iwae_bound(ell)),
        (ObjectiveSpec(estimator="dreg", kind="kl", mi_weight=0.5, samples=2, kl_samples=4),
         kl_objective(ell, lp, 0.5, 2, 4)),
        (ObjectiveSpec(estimator="vimco", kind="renyi", mi_weight=0.5, alpha=2.0, samples=4),
         renyi_objective(ell, lp, 0.5, 2.0)),
        (ObjectiveSpec(estimator="stl", kind="power", alpha=3.0, samples=4), power_objective(ell, lp, 3.0)),
    ]  # fmt: skip
    for spec, expected in cases:
        torch.testing.assert_close(monte_carlo_objective(ell, lp, spec), expected)
    with pytest.raises(ValueError, match="elbo"):
        monte_carlo_objective(ell, lp, ObjectiveSpec())


def test_objective_spec_defaults_and_sample_counts() -> None:
    spec = ObjectiveSpec()
    assert (spec.estimator, spec.kind, spec.samples, spec.num_samples) == ("elbo", "standard", 1, 1)
    assert (spec.kl_weight, spec.free_bits, spec.free_bits_per_dim) == (1.0, 0.0, 0.0)
    assert spec.mi_weight is None and spec.alpha is None and spec.kl_samples is None
    assert ObjectiveSpec(estimator="dreg", kind="kl", mi_weight=0.9, samples=16, kl_samples=1).num_samples == 16
    one_sixteen = ObjectiveSpec(estimator="vimco", kind="renyi", mi_weight=1, alpha=0.5, samples=1, kl_samples=16)
    assert one_sixteen.num_samples == 16
    ObjectiveSpec(estimator="elbo", kl_weight=0.5, free_bits_per_dim=0.1, free_bits_mode="sentence")  # valid
    assert ObjectiveSpec.model_fields["mi_weight"].description  # every field documented (CLI help)
    assert all(f.description for f in ObjectiveSpec.model_fields.values())


@pytest.mark.parametrize(
    ("fields", "named"),
    [
        ({"samples": 0}, "samples"),
        ({"estimator": "iwae", "kind": "standard", "kl_samples": 4}, "kl_samples"),
        ({"estimator": "iwae", "kind": "kl", "mi_weight": 0.5, "kl_samples": 0}, "kl_samples"),
        ({"estimator": "iwae", "kind": "kl"}, "mi_weight"),
        ({"estimator": "iwae", "kind": "standard", "mi_weight": 0.5}, "mi_weight"),
        ({"estimator": "iwae", "kind": "renyi", "mi_weight": 0.5}, "alpha"),
        ({"estimator": "iwae", "kind": "renyi", "mi_weight": 0.5, "alpha": 1.0}, "alpha"),
        ({"estimator": "iwae", "kind": "power", "alpha": 0.0}, "alpha"),
        ({"estimator": "iwae", "kind": "power", "alpha": -2.0}, "alpha"),
        ({"estimator": "iwae", "kind": "kl", "mi_weight": 0.5, "alpha": 2.0}, "alpha"),
        ({"estimator": "elbo", "kind": "kl", "mi_weight": 0.5}, "kind"),
        ({"estimator": "vimco", "samples": 1}, "samples"),
        ({"estimator": "iwae", "kl_weight": 0.5}, "kl_weight"),
        ({"estimator": "dreg", "free_bits": 3.0}, "free_bits"),
        ({"estimator": "stl", "free_bits_per_dim": 0.1}, "free_bits_per_dim"),
        ({"kl_weight": -1.0}, "kl_weight"),
        ({"free_bits": -1.0}, "free_bits"),
        ({"free_bits": 1.0, "free_bits_per_dim": 0.1}, "free_bits_per_dim"),
        ({"estimator": "adam"}, "estimator"),
        ({"kind": "mutual"}, "kind"),
        ({"lambda": 0.5}, "lambda"),  # extra fields are rejected
    ],
)
def test_objective_spec_rejects_invalid_settings_naming_the_field(fields: dict, named: str) -> None:
    with pytest.raises(ValidationError, match=named):
        ObjectiveSpec(**fields)


def test_objective_spec_validates_assignment() -> None:
    spec = ObjectiveSpec(estimator="vimco", samples=4)
    with pytest.raises(ValidationError, match="samples"):
        spec.samples = 1
