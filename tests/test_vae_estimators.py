"""Gradient estimators (models/vae/estimators.py) against independent computations.

Gaussian: the linear-Gaussian model of tests/test_vae_objectives.py (closed-form ELBO; the reparameterised
IWAE gradient taken by plain autograd through an un-detached graph as the reference). Categorical: a tiny
model whose expectations are computed exactly by enumerating every latent configuration.
Monte Carlo comparisons average many independent draws (sentences replicated in the batch), split into
chunks whose spread gives the standard error; paired differences (same draws) keep the errors small.
"""

from __future__ import annotations

import itertools
import math
from functools import partial

import pytest
import torch
from torch import Tensor, nn
from test_vae_objectives import DTYPE, X, LatentTerms, LinearGaussian, replicated

from models.vae.estimators import (
    dreg_coefficients,
    estimate,
    leave_one_out_mean,
    objective_coefficients,
    vimco_baselines,
)
from models.vae.objectives import (
    ObjectiveSpec,
    iwae_bound,
    kl_divergence_estimate,
    monte_carlo_objective,
    renyi_divergence_estimate,
)

KINDS = {
    "standard": {},
    "kl": {"kind": "kl", "mi_weight": 0.6},
    "renyi": {"kind": "renyi", "mi_weight": 0.6, "alpha": 1.5},
    "power": {"kind": "power", "alpha": 2.0},
}


def spec_of(estimator: str, kind: str = "standard", samples: int = 4, **extra) -> ObjectiveSpec:
    return ObjectiveSpec(estimator=estimator, samples=samples, **KINDS[kind], **extra)


def flat_grad(loss: Tensor, params: list[nn.Parameter]) -> Tensor:
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return torch.cat([(torch.zeros_like(p) if g is None else g).reshape(-1) for g, p in zip(grads, params)])


def mean_and_se(draws: Tensor) -> tuple[Tensor, Tensor]:
    """draws [chunks, P] -> mean and standard error over chunks, [P] each."""
    return draws.mean(0), draws.std(0) / math.sqrt(draws.shape[0])


# ---- coefficients ------------------------------------------------------------------------------------


def test_dreg_coefficient_of_the_iwae_bound_is_the_squared_normalised_weight() -> None:
    gen = torch.Generator().manual_seed(0)
    ell = torch.randn(7, 5, generator=gen, dtype=DTYPE) * 3 - 40
    lp = torch.randn(7, 5, generator=gen, dtype=DTYPE) - 30
    fn = partial(monte_carlo_objective, spec=spec_of("dreg", samples=7))
    w = torch.softmax(ell, 0)
    c_ell, c_lp = objective_coefficients(fn, ell, lp)
    torch.testing.assert_close(c_ell, w)
    assert torch.all(c_lp == 0)
    a, b = dreg_coefficients(fn, ell, lp)
    torch.testing.assert_close(a, w**2, rtol=0, atol=1e-14)
    torch.testing.assert_close(b, torch.zeros_like(b), rtol=0, atol=1e-14)


def test_coefficients_of_the_kl_objective_match_hand_derivatives() -> None:
    """F = (1-λ)Ŝ + λÛ: c_ℓ = (1-λ)w̃ + λw̃(lp - Û), c_lp = λw̃; ∂c_ℓ_k/∂ℓ_k = (1-λ)(w̃ - w̃²) +
    λ(w̃ - 2w̃²)(lp - Û), ∂c_ℓ_k/∂lp_k = λw̃(1 - w̃)."""
    gen = torch.Generator().manual_seed(1)
    ell = torch.randn(6, 4, generator=gen, dtype=DTYPE)
    lp = torch.randn(6, 4, generator=gen, dtype=DTYPE) - 3
    lam = 0.7
    fn = partial(monte_carlo_objective, spec=spec_of("dreg", "kl", samples=6).model_copy(update={"mi_weight": lam}))
    w = torch.softmax(ell, 0)
    u = (w * lp).sum(0)
    c_ell, c_lp = objective_coefficients(fn, ell, lp)
    torch.testing.assert_close(c_ell, (1 - lam) * w + lam * w * (lp - u))
    torch.testing.assert_close(c_lp, lam * w)
    a, b = dreg_coefficients(fn, ell, lp)
    torch.testing.assert_close(a, c_ell - ((1 - lam) * (w - w**2) + lam * (w - 2 * w**2) * (lp - u)))
    torch.testing.assert_close(b, c_lp - lam * w * (1 - w))


def test_vimco_baselines_and_leave_one_out_means_match_loops() -> None:
    gen = torch.Generator().manual_seed(2)
    ell = torch.randn(5, 3, generator=gen, dtype=DTYPE) - 20
    lp = torch.randn(5, 3, generator=gen, dtype=DTYPE) - 10
    spec = spec_of("vimco", "renyi", samples=5)
    fn = partial(monte_carlo_objective, spec=spec)
    expected = torch.empty(5, 3, dtype=DTYPE)
    for k in range(5):
        others = [j for j in range(5) if j != k]
        e, p = ell.clone(), lp.clone()
        e[k], p[k] = ell[others].mean(0), lp[others].mean(0)
        expected[k] = fn(e, p)
        torch.testing.assert_close(leave_one_out_mean(ell, 0)[k], ell[others].mean(0))
    torch.testing.assert_close(vimco_baselines(fn, ell, lp), expected)


# ---- surrogate losses on one sample ------------------------------------------------------------------


@pytest.mark.parametrize("kind", list(KINDS))
def test_iwae_losses_give_exactly_the_autograd_gradient_of_the_objective(kind: str) -> None:
    """iwae = plain reparameterisation: decoder + encoder loss gradients equal -∇ mean F computed by
    autograd through an un-detached graph, for the same draws (checks the z_leaf path trick)."""
    model = LinearGaussian("off")
    spec = spec_of("iwae", kind)
    fn = partial(monte_carlo_objective, spec=spec)
    terms = model.sample_terms(X, 4, torch.Generator().manual_seed(3))
    full = model.sample_terms(X, 4, torch.Generator().manual_seed(3), leaf=False)
    reference = -fn(full.log_px_z + full.log_pz - full.log_qz, full.log_px_z).mean()
    est = estimate(terms, spec)
    torch.testing.assert_close(est.objective, -reference.detach())
    pairs = ((model.decoder_parameters(), est.decoder_loss), (model.encoder_parameters(), est.encoder_loss))
    for params, loss in pairs:
        torch.testing.assert_close(flat_grad(loss, params), flat_grad(reference, params), rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("estimator", ["elbo", "iwae", "stl", "dreg", "reinforce", "vimco"])
def test_decoder_and_encoder_losses_reach_only_their_own_parameters(estimator: str) -> None:
    model = LinearGaussian("off")
    spec = ObjectiveSpec(estimator=estimator, samples=1 if estimator == "elbo" else 3)
    terms = model.sample_terms(X, spec.num_samples, torch.Generator().manual_seed(4))
    est = estimate(terms, spec)
    assert all(p.grad is None for p in model.parameters())  # estimate() touched no parameter .grad (DDP)
    dec, enc = model.decoder_parameters(), model.encoder_parameters()
    assert all(g is None for g in torch.autograd.grad(est.decoder_loss, enc, retain_graph=True, allow_unused=True))
    assert all(g is None for g in torch.autograd.grad(est.encoder_loss, dec, retain_graph=True, allow_unused=True))
    assert flat_grad(est.decoder_loss, dec).abs().sum() > 0 and flat_grad(est.encoder_loss, enc).abs().sum() > 0
    (est.decoder_loss + est.encoder_loss).backward()  # one backward pass works
    assert all(p.grad is not None for p in model.parameters())


def test_metrics_and_no_grad_mode() -> None:
    model = LinearGaussian("off")
    spec = spec_of("dreg", "renyi", samples=2, kl_samples=6)
    terms = model.sample_terms(X, 6, torch.Generator().manual_seed(5))
    ell, lp = (terms.log_px_z + terms.log_pz - terms.log_qz).detach(), terms.log_px_z.detach()
    est = estimate(terms, spec)
    expected = {
        "objective": monte_carlo_objective(ell, lp, spec).mean(),
        "log_px_estimate": iwae_bound(ell[:2]).mean(),
        "kl_estimate": kl_divergence_estimate(ell, lp).mean(),
        "renyi_estimate": renyi_divergence_estimate(ell, lp, 1.5).mean(),
        "kl_analytic": terms.kl.mean(),
        "reconstruction": lp.mean(),
    }
    assert set(est.metrics) == set(expected)
    for name, value in expected.items():
        torch.testing.assert_close(est.metrics[name], value.detach(), msg=name)
        assert not est.metrics[name].requires_grad
    with torch.no_grad():
        quiet = estimate(model.sample_terms(X, 6, torch.Generator().manual_seed(5)), spec)
    torch.testing.assert_close(quiet.objective, est.objective)
    assert quiet.decoder_loss.item() == 0 and quiet.encoder_loss.item() == 0


def test_misuse_is_rejected() -> None:
    model = LinearGaussian("off")
    terms = model.sample_terms(X, 4, torch.Generator().manual_seed(6))
    with pytest.raises(ValueError, match="num_samples"):
        estimate(terms, spec_of("iwae", samples=3))
    with pytest.raises(ValueError, match="kl_weight_scale"):
        estimate(terms, spec_of("iwae"), kl_weight_scale=0.5)
    terms.z_leaf = None  # as for categorical latents
    with pytest.raises(ValueError, match="reparameterised"):
        estimate(terms, spec_of("dreg"))


# ---- unbiasedness (Gaussian) ---------------------------------------------------------------------------


def gradient_draws(
    model: LinearGaussian, specs: dict[str, ObjectiveSpec], samples: int, chunks: int, copies: int, seed: int
) -> dict[str, Tensor]:
    """Per chunk (``copies`` draws of each x of X), each spec's batch-mean encoder gradient: [chunks, P]."""
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, list[Tensor]] = {name: [] for name in specs}
    for _ in range(chunks):
        terms = model.sample_terms(replicated(copies), samples, gen)
        for name, spec in specs.items():
            out[name].append(flat_grad(estimate(terms, spec).encoder_loss, model.encoder_parameters()))
    return {name: torch.stack(v) for name, v in out.items()}


@pytest.mark.parametrize("kind", list(KINDS))
def test_dreg_and_vimco_encoder_gradients_are_unbiased_and_stl_is_not(kind: str) -> None:
    model = LinearGaussian("off")
    names = ["iwae", "dreg", "vimco", "reinforce", "stl"]
    draws = gradient_draws(model, {n: spec_of(n, kind) for n in names}, samples=4, chunks=24, copies=400, seed=7)
    reference, _ = mean_and_se(draws["iwae"])
    scale = reference.abs().max()
    for name in ("dreg", "vimco", "reinforce"):
        diff, se = mean_and_se(draws[name] - draws["iwae"])  # paired: same draws
        assert torch.all(se < 0.1 * scale), (name, se, scale)  # the comparison has teeth
        assert torch.all(diff.abs() < 4.5 * se), (name, diff / se)
    diff, se = mean_and_se(draws["stl"] - draws["iwae"])
    assert (diff.abs() / se).max() > 8, (diff / se)  # STL's gradient is biased for K > 1
    # DReG's point: lower variance than IWAE's reparameterised encoder gradient.
    assert draws["dreg"].var(0).sum() < draws["iwae"].var(0).sum()


def test_stl_is_unbiased_for_a_single_sample() -> None:
    model = LinearGaussian("off")
    draws = gradient_draws(model, {n: spec_of(n, samples=1) for n in ("iwae", "stl")}, 1, 16, 400, seed=8)
    diff, se = mean_and_se(draws["stl"] - draws["iwae"])
    assert torch.all(diff.abs() < 4.5 * se), diff / se


def test_elbo_gradients_are_unbiased_for_the_closed_form_elbo() -> None:
    """Gaussian elbo (reparameterised reconstruction + analytic KL, weight β × scale) against the
    closed-form E_q ln p(x|z) - w KL(q || p(z)) of the linear-Gaussian model."""
    model = LinearGaussian("off")
    spec = ObjectiveSpec(estimator="elbo", samples=2, kl_weight=0.5)
    weight = 0.5 * 0.3
    exact = (model.expected_log_px_z(X) - weight * model.analytic_kl_per_dim(X).sum(-1)).mean()
    params = model.encoder_parameters() + model.decoder_parameters()
    exact_grad = flat_grad(-exact, params)
    gen = torch.Generator().manual_seed(9)
    draws, objectives = [], []
    for _ in range(16):
        est = estimate(model.sample_terms(replicated(300), 2, gen), spec, kl_weight_scale=0.3)
        draws.append(flat_grad(est.decoder_loss + est.encoder_loss, params))
        objectives.append(est.objective)
        assert est.metrics["kl_weight"].item() == pytest.approx(weight)
    mean, se = mean_and_se(torch.stack(draws))
    assert torch.all((mean - exact_grad).abs() < 4.5 * se + 1e-12), (mean - exact_grad) / se
    obj_mean, obj_se = mean_and_se(torch.stack(objectives)[:, None])
    assert (obj_mean - exact).abs().item() < 4.5 * obj_se.item()


@pytest.mark.parametrize("beta", [0.5, 2.0])
def test_single_sample_kl_objective_is_the_beta_vae_in_expectation(beta: float) -> None:
    """Prop. 13 with gradients: elbo with kl_weight β and the single-sample KL objective with λ = 1 - β
    (any base estimator) agree in expected objective and expected encoder gradient."""
    model = LinearGaussian("off")
    specs = {
        "elbo": ObjectiveSpec(estimator="elbo", kl_weight=beta),
        "dreg": ObjectiveSpec(estimator="dreg", kind="kl", mi_weight=1 - beta),
        "iwae": ObjectiveSpec(estimator="iwae", kind="renyi", mi_weight=1 - beta, alpha=3.0),
    }
    draws = gradient_draws(model, specs, samples=1, chunks=16, copies=400, seed=10)
    for name in ("dreg", "iwae"):
        diff, se = mean_and_se(draws[name] - draws["elbo"])
        assert torch.all(diff.abs() < 4.5 * se), (name, diff / se)


def test_free_bits_penalties() -> None:
    model = LinearGaussian("off")
    terms = model.sample_terms(X, 1, torch.Generator().manual_seed(11))
    kl, kl_dim = terms.kl.detach(), terms.kl_per_dim.detach()
    recon = terms.log_px_z.detach().mean()
    cases = {
        ("free_bits", "batch", 10.0): torch.tensor(10.0, dtype=DTYPE),  # clamped: no KL gradient
        ("free_bits", "batch", 0.1): kl.mean(),
        ("free_bits", "batch", float(kl.min() + kl.mean()) / 2): kl.mean(),  # some sentences below, the mean above
        ("free_bits", "sentence", float(kl[1])): torch.maximum(kl, kl[1]).mean(),
        ("free_bits_per_dim", "batch", float(kl_dim.mean(0)[0])):
            torch.maximum(kl_dim.mean(0), kl_dim.mean(0)[0]).sum(),
        ("free_bits_per_dim", "sentence", float(kl_dim[0, 0])): torch.maximum(kl_dim, kl_dim[0, 0]).sum(1).mean(),
    }
    for (field, mode, threshold), penalty in cases.items():
        spec = ObjectiveSpec(estimator="elbo", kl_weight=2.0, free_bits_mode=mode, **{field: threshold})
        est = estimate(terms, spec)
        torch.testing.assert_close(est.metrics["kl_penalty"], penalty)
        torch.testing.assert_close(est.objective, recon - 2.0 * penalty)
    # Fully clamped: the encoder gets the reconstruction gradient only (same as a zero KL weight).
    clamped = estimate(terms, ObjectiveSpec(estimator="elbo", free_bits=10.0))
    unweighted = estimate(terms, ObjectiveSpec(estimator="elbo", kl_weight=0.0))
    enc = model.encoder_parameters()
    torch.testing.assert_close(flat_grad(clamped.encoder_loss, enc), flat_grad(unweighted.encoder_loss, enc))


# ---- categorical latents: exact enumeration -----------------------------------------------------------

NUM_LATENTS, NUM_CATEGORIES, VOCAB = 2, 3, 4
CONFIGS = torch.tensor(list(itertools.product(range(NUM_CATEGORIES), repeat=NUM_LATENTS)))  # [9, n]


class TinyCategorical(nn.Module):
    """x ∈ {0..3} given n = 2 categorical latents of m = 3 categories (uniform prior); q(z|x) per x."""

    def __init__(self) -> None:
        super().__init__()
        gen = torch.Generator().manual_seed(12)
        self.enc_logits = nn.Parameter(torch.randn(VOCAB, NUM_LATENTS, NUM_CATEGORIES, generator=gen, dtype=DTYPE))
        self.dec_embed = nn.Parameter(torch.randn(NUM_LATENTS, NUM_CATEGORIES, VOCAB, generator=gen, dtype=DTYPE))
        self.dec_bias = nn.Parameter(torch.randn(VOCAB, generator=gen, dtype=DTYPE))

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [self.enc_logits]

    def decoder_parameters(self) -> list[nn.Parameter]:
        return [self.dec_embed, self.dec_bias]

    def log_px_given(self, x: Tensor, z: Tensor) -> Tensor:
        """x [B], z [..., B, n] long -> ln p(x|z) [..., B]."""
        logits = self.dec_bias + sum(self.dec_embed[i][z[..., i]] for i in range(NUM_LATENTS))
        return torch.log_softmax(logits, -1).gather(-1, x.expand(z.shape[:-1])[..., None])[..., 0]

    def log_q(self, x: Tensor, z: Tensor, logits: Tensor | None = None) -> Tensor:
        log_probs = torch.log_softmax(self.enc_logits[x] if logits is None else logits, -1)  # [B, n, m]
        picked = log_probs.expand(*z.shape[:-1], NUM_LATENTS, NUM_CATEGORIES).gather(-1, z[..., None])[..., 0]
        return picked.sum(-1)

    def sample_terms(self, x: Tensor, num_samples: int, gen: torch.Generator) -> LatentTerms:
        logits = self.enc_logits[x]  # [B, n, m]
        probs = torch.softmax(logits.detach(), -1)
        z = torch.multinomial(probs.reshape(-1, NUM_CATEGORIES), num_samples, True, generator=gen)  # [B*n, K]
        z = z.T.reshape(num_samples, x.shape[0], NUM_LATENTS)
        log_probs = torch.log_softmax(logits, -1)
        kl_per_dim = (log_probs.exp() * (log_probs + math.log(NUM_CATEGORIES))).sum(-1)
        log_pz = torch.full(z.shape[:-1], -NUM_LATENTS * math.log(NUM_CATEGORIES), dtype=DTYPE)
        return LatentTerms(
            params=logits.reshape(x.shape[0], -1),
            z=z,
            z_leaf=None,
            log_px_z=self.log_px_given(x, z),
            log_pz=log_pz,
            log_qz=self.log_q(x, z),
            log_qz_stopped=self.log_q(x, z, logits.detach()),
            kl=kl_per_dim.sum(-1),
            kl_per_dim=kl_per_dim,
            num_tokens=torch.ones_like(x),
        )

    def exact_objective(self, x: Tensor, spec: ObjectiveSpec) -> Tensor:
        """E over all K-tuples of latent configurations of the batch-mean objective (exact)."""
        k = spec.num_samples
        tuples = torch.tensor(list(itertools.product(range(len(CONFIGS)), repeat=k)))  # [9^K, K]
        z = CONFIGS[tuples].permute(1, 0, 2)[:, :, None, :].expand(k, len(tuples), x.shape[0], NUM_LATENTS)
        lp = self.log_px_given(x, z)  # [K, 9^K, B]
        log_q = self.log_q(x, z)
        prob = log_q.sum(0).exp()  # [9^K, B]
        if spec.estimator == "elbo":
            kl = self.sample_terms(x, 1, torch.Generator()).kl
            values = lp.mean(0) - spec.kl_weight * kl
        else:
            ell = lp - NUM_LATENTS * math.log(NUM_CATEGORIES) - log_q
            values = monte_carlo_objective(ell.reshape(k, -1), lp.reshape(k, -1), spec).view(len(tuples), -1)
        return (prob * values).sum(0).mean()


@pytest.mark.parametrize(
    "spec",
    [
        ObjectiveSpec(estimator="elbo", samples=2, kl_weight=0.7),
        ObjectiveSpec(estimator="reinforce", samples=1),
        ObjectiveSpec(estimator="reinforce", samples=2, kind="kl", mi_weight=0.5),
        ObjectiveSpec(estimator="vimco", samples=2),
        ObjectiveSpec(estimator="vimco", samples=1, kl_samples=2, kind="renyi", mi_weight=0.5, alpha=2.0),
        ObjectiveSpec(estimator="vimco", samples=2, kind="power", alpha=0.5),
    ],
    ids=lambda s: f"{s.estimator}-{s.kind}-{s.samples}-{s.kl_samples}",
)
def test_categorical_gradients_are_unbiased_against_enumeration(spec: ObjectiveSpec) -> None:
    model = TinyCategorical()
    x = torch.tensor([0, 1, 2, 3])
    exact = model.exact_objective(x, spec)
    enc, dec = model.encoder_parameters(), model.decoder_parameters()
    exact_enc, exact_dec = flat_grad(-exact, enc), flat_grad(-exact, dec)
    gen = torch.Generator().manual_seed(13)
    enc_draws, dec_draws, objectives = [], [], []
    copies = 500
    for _ in range(20):
        terms = model.sample_terms(x.repeat(copies), spec.num_samples, gen)
        est = estimate(terms, spec)
        enc_draws.append(flat_grad(est.encoder_loss, enc))
        dec_draws.append(flat_grad(est.decoder_loss, dec))
        objectives.append(est.objective)
    for draws, target in ((enc_draws, exact_enc), (dec_draws, exact_dec)):
        mean, se = mean_and_se(torch.stack(draws))
        assert torch.all(se < 0.1 * target.abs().max()), (se, target)
        assert torch.all((mean - target).abs() < 4.5 * se + 1e-12), (mean - target) / se
    obj_mean, obj_se = mean_and_se(torch.stack(objectives)[:, None])
    assert (obj_mean - exact).abs().item() < 4.5 * obj_se.item() + 1e-12


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_estimators_run_on_the_sentence_vae(latent: str) -> None:
    """Integration with models.vae.SentenceVAE (MLP, one-token sentences): every applicable estimator
    yields separated losses and one working backward pass."""
    from models.vae import SentenceVAE, VAEModelConfig

    torch.manual_seed(0)
    config = VAEModelConfig(
        architecture="mlp", vocab_size=12, embedding_size=8, hidden_size=8, latent=latent, latent_size=3,
        num_latents=2, num_categories=3, categorical_embedding_size=4,
    )  # fmt: skip
    model = SentenceVAE(config)
    targets = torch.randint(1, 12, (1, 5))
    inputs, mask, lengths = torch.zeros_like(targets), torch.ones_like(targets, dtype=torch.bool), torch.ones(5).long()
    estimators = ["elbo", "reinforce", "vimco"] + (["iwae", "stl", "dreg"] if latent == "gaussian" else [])
    enc, dec = list(model.encoder.parameters()), list(model.decoder.parameters())
    for name in estimators:
        spec = ObjectiveSpec(estimator=name, samples=3) if name == "elbo" else spec_of(name, "kl", samples=3)
        est = estimate(model.sample_terms(inputs, targets, mask, lengths, 3), spec)
        assert all(g is None for g in torch.autograd.grad(est.decoder_loss, enc, retain_graph=True, allow_unused=True))
        assert all(g is None for g in torch.autograd.grad(est.encoder_loss, dec, retain_graph=True, allow_unused=True))
        model.zero_grad()
        (est.decoder_loss + est.encoder_loss).backward()
        assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in enc + dec), name
        assert torch.isfinite(est.objective) and set(est.metrics) >= {"log_px_estimate", "kl_estimate"}
