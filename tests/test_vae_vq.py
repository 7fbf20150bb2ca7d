"""VQ-VAE latents (models/vae/latents.py VQLatent, thesis §5.A, van den Oord et al. 2017): quantisation,
straight-through gradient, commitment loss, EMA codebook, the point-mass reading of the importance-sampled
evaluation, config checks, training and state_dict round trips."""

from __future__ import annotations

import io
import math

import pytest
import torch
from pydantic import ValidationError

from models.vae import SentenceVAE, VAEModelConfig
from models.vae.decoder import LatentInput
from models.vae.estimators import estimate
from models.vae.latents import VQLatent
from models.vae.objectives import ObjectiveSpec
from pipeline.data.sentences import SentenceBatch
from pipeline.tasks.vae_evaluation import evaluate_vae, score_sentences
from pipeline.vae_config import VAEConfig

V = 30
ELBO = ObjectiveSpec()


pytestmark = pytest.mark.usefixtures("one_thread")


def _cfg(**kw) -> VAEModelConfig:
    base = dict(architecture="mlp", vocab_size=V, embedding_size=8, hidden_size=8, latent="vq", num_latents=2,
                num_categories=4, categorical_embedding_size=3)
    base.update(kw)
    return VAEModelConfig(**base)


def _model(seed: int = 0, **kw) -> SentenceVAE:
    torch.manual_seed(seed)
    return SentenceVAE(_cfg(**kw)).double()


def _symbols(x: torch.Tensor) -> SentenceBatch:
    """One-symbol sentences (the synthetic task): x [B] -> a [1, B] batch."""
    targets = x.view(1, -1)
    return SentenceBatch(inputs=torch.zeros_like(targets), targets=targets,
                         mask=torch.ones_like(targets, dtype=torch.bool), lengths=torch.ones(x.numel(), dtype=torch.long))


def _terms(model: SentenceVAE, batch: SentenceBatch, k: int = 1):
    return model(batch.inputs, batch.targets, batch.mask, batch.lengths, k)


def _random_latent(seed: int = 0, **kw) -> tuple[VQLatent, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    latent = VQLatent(3, 5, 4, **kw).double()
    with torch.no_grad():
        latent.codebook.copy_(torch.randn(3, 5, 4, generator=gen, dtype=torch.float64))
        if latent.ema:
            latent.ema_embed_sum.copy_(latent.codebook)
    params = torch.randn(7, 12, generator=gen, dtype=torch.float64)
    return latent, params


# ---------------------------------------------------------------- quantisation and densities


def test_nearest_code_quantisation_matches_brute_force() -> None:
    latent, params = _random_latent()
    codes = latent.quantize(params)
    for b in range(7):
        for i in range(3):
            z_e = params[b, 4 * i:4 * (i + 1)]
            distances = [float(((z_e - latent.codebook[i, j]) ** 2).sum()) for j in range(5)]
            assert int(codes[b, i]) == min(range(5), key=distances.__getitem__)
    z = latent.sample(params, 3)
    assert z.shape == (3, 7, latent.sample_size) == (3, 7, 3 * 4 + 3)
    assert torch.equal(z[0], z[2])  # a point mass: every sample is the same
    expected = torch.stack([latent.codebook[i, codes[:, i]] for i in range(3)], dim=1).reshape(7, 12)
    assert torch.equal(z[0, :, :12], expected)  # exactly the code vectors
    assert torch.equal(latent.codes_of(z), codes.expand(3, -1, -1))
    assert torch.equal(latent.posterior_mean(params), expected)
    assert torch.equal(LatentInput(latent)(z), z[..., :12]) and torch.equal(LatentInput(latent)(z[..., :12]), z[..., :12])


def test_point_mass_densities_and_kl_is_n_ln_m() -> None:
    latent, params = _random_latent()
    z = latent.sample(params, 2)
    assert torch.equal(latent.log_prob(params, z), torch.zeros(2, 7, dtype=torch.float64))
    other = z.flip(1)  # sentence b scored with the codes of sentence 6 - b
    same = (latent.quantize(params) == latent.quantize(params).flip(0)).all(-1)
    expected = torch.where(same, 0.0, -math.inf).double().expand(2, -1)
    assert torch.equal(latent.log_prob(params, other), expected)
    assert not same.all()
    n_ln_m = 3 * math.log(5)
    assert torch.allclose(latent.prior_log_prob(z, dtype=torch.float64), torch.full((2, 7), -n_ln_m, dtype=torch.float64))
    assert torch.allclose(latent.kl_to_prior(params), torch.full((7,), n_ln_m, dtype=torch.float64))
    assert torch.allclose(latent.kl_per_dim(params), torch.full((7, 3), math.log(5), dtype=torch.float64))
    prior = latent.prior_sample(4, 6)
    assert prior.shape == (4, 6, 15)
    codes = latent.codes_of(prior)
    assert torch.equal(prior[..., :12], latent.code_vectors(codes).flatten(-2))
    assert latent.draw_noise(2, 7, torch.Generator()).shape == (2, 7, 0)


# ---------------------------------------------------------------- gradients


@pytest.mark.parametrize("beta", [0.0, 0.7])
def test_straight_through_gradient_is_the_decoders_gradient_wrt_z_q_plus_commitment(beta: float) -> None:
    model = _model(vq_beta=beta)
    batch = _symbols(torch.arange(10) % V)
    terms = _terms(model, batch)
    est = estimate(terms, ELBO)
    n_e = model.latent.decoder_input_size
    (decoder_grad,) = torch.autograd.grad(terms.log_px_z.sum(), terms.z_leaf, retain_graph=True)
    z_q = terms.z_leaf[0, :, :n_e].detach()  # the codes the decoder read (before the EMA update)
    (encoder_grad,) = torch.autograd.grad(est.encoder_loss, terms.params, retain_graph=True)
    b = batch.lengths.numel()
    expected = -decoder_grad[0, :, :n_e] / b + 2.0 * beta * (terms.params.detach() - z_q) / b
    torch.testing.assert_close(encoder_grad, expected, rtol=1e-12, atol=1e-14)
    assert decoder_grad[0, :, :n_e].abs().sum() > 0
    # the encoder loss reaches every encoder parameter; the decoder loss none of them
    (est.decoder_loss + est.encoder_loss).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.encoder.parameters())
    model.zero_grad()
    est2 = estimate(_terms(model, batch), ELBO)
    est2.decoder_loss.backward()
    assert all(p.grad is None or p.grad.abs().sum() == 0 for p in model.encoder.parameters())
    assert est.metrics["latent_loss"] >= 0


def test_codebook_without_ema_is_a_parameter_trained_by_the_codebook_loss() -> None:
    latent, params = _random_latent(decay=None, beta=0.5)
    assert isinstance(latent.codebook, torch.nn.Parameter)
    assert set(dict(latent.named_buffers())) == set()
    params = params.requires_grad_()
    loss = latent.auxiliary_loss(params)
    codes = latent.quantize(params)
    e_q = latent.code_vectors(codes).detach().reshape(7, 12)
    torch.testing.assert_close(loss, 1.5 * (params.detach() - e_q).square().sum(-1))
    loss.sum().backward()
    torch.testing.assert_close(params.grad, 2 * 0.5 * (params.detach() - e_q))
    expected = torch.zeros_like(latent.codebook)
    for b in range(7):
        for i in range(3):
            expected[i, codes[b, i]] += 2 * (e_q[b, 4 * i:4 * (i + 1)] - params[b, 4 * i:4 * (i + 1)].detach())
    torch.testing.assert_close(latent.codebook.grad, expected)
    before = latent.codebook.detach().clone()
    latent.update_codebook(params)  # no EMA: nothing happens
    assert torch.equal(latent.codebook.detach(), before)


def test_ema_codebook_update_against_a_hand_computed_step() -> None:
    latent, params = _random_latent(decay=0.9, epsilon=1e-3)
    old = latent.codebook.clone()
    codes = latent.quantize(params)
    latent.eval()
    latent.update_codebook(params)
    assert torch.equal(latent.codebook, old)  # eval mode: no update
    latent.train()
    latent.update_codebook(params)
    z_e = params.view(7, 3, 4)
    for i in range(3):
        size = [0.9 * 1.0 + 0.1 * float((codes[:, i] == j).sum()) for j in range(5)]
        total = sum(size)
        for j in range(5):
            s = 0.9 * old[i, j] + 0.1 * z_e[codes[:, i] == j, i].sum(0)
            smoothed = (size[j] + 1e-3) / (total + 5 * 1e-3) * total
            assert latent.ema_cluster_size[i, j].item() == pytest.approx(size[j], rel=1e-12)
            torch.testing.assert_close(latent.ema_embed_sum[i, j], s)
            torch.testing.assert_close(latent.codebook[i, j], s / smoothed)
    unused = [(i, j) for i in range(3) for j in range(5) if not (codes[:, i] == j).any()]
    assert unused  # a code no sentence chose stays (almost) where it was
    for i, j in unused:
        torch.testing.assert_close(latent.codebook[i, j], old[i, j], rtol=1e-3, atol=1e-3)


def test_model_updates_the_ema_codebook_in_training_mode_only() -> None:
    model = _model()
    batch = _symbols(torch.arange(12))
    before = model.latent.codebook.clone()
    model.eval()
    _terms(model, batch)
    assert torch.equal(model.latent.codebook, before)
    model.train()
    _terms(model, batch)
    assert not torch.equal(model.latent.codebook, before)


# ---------------------------------------------------------------- evaluation


def test_evaluate_vae_gives_the_point_mass_numbers() -> None:
    model = _model(seed=3, num_categories=3)
    with torch.no_grad():  # codes at the encodings of symbols 0-2, so that the sentences use several codes
        first = _symbols(torch.arange(3))
        model.latent.codebook.copy_(model.latent.encodings(model.encoder(first.targets, first.lengths)).transpose(0, 1))
    gen = torch.Generator().manual_seed(4)
    batches = [_symbols(torch.randint(V, (size,), generator=gen)) for size in (9, 12)]
    n_ln_m = 2 * math.log(3)
    result = evaluate_vae(model, batches, num_samples=5, chunk_size=2).metrics()
    assert all(math.isfinite(v) for v in result.values())
    expected_nll, entropies = 0.0, 0.0
    model.eval()
    with torch.no_grad():
        for batch in batches:
            params = model.encoder(batch.targets, batch.lengths)
            z = model.latent.sample(params, 1)
            log_px_z = model.decoder.log_likelihood(batch.inputs, batch.targets, batch.mask, z)[0]
            expected_nll -= float((log_px_z - n_ln_m).sum())
            codes = model.latent.quantize(params)
            _, counts = torch.unique(codes, dim=0, return_counts=True)  # joint codes of all latents
            usage = counts.double() / codes.shape[0]
            entropies += float(-(usage * usage.log()).sum()) * codes.shape[0]
            scores = score_sentences(model, batch, 4, 3)
            torch.testing.assert_close(scores.log_likelihood, (log_px_z - n_ln_m).double())
            assert float(scores.mutual_information_aggregate.mean()) <= math.log(batch.lengths.numel()) + 1e-12
    assert result["nll_per_sentence"] == pytest.approx(expected_nll / 21, rel=1e-6)
    assert result["kl_per_sentence"] == pytest.approx(n_ln_m, rel=1e-12)
    assert result["mutual_information"] == pytest.approx(n_ln_m, abs=1e-6)  # Û - Ŝ of a point mass = n ln m
    # the aggregate-posterior MI (mixture of the batch's posteriors) is the entropy of the batch's code usage
    assert result["mutual_information_aggregate"] == pytest.approx(entropies / 21, rel=1e-9)
    assert 0 < result["mutual_information_aggregate"] < n_ln_m


# ---------------------------------------------------------------- training, state, config


def _train(model: SentenceVAE, steps: int, seed: int, lr: float = 0.03) -> list[float]:
    opt = torch.optim.Adam(model.parameters(), lr=lr, betas=(0.0, 0.999), eps=1e-8)
    gen = torch.Generator().manual_seed(seed)
    losses = []
    model.train()
    for _ in range(steps):
        est = estimate(_terms(model, _symbols(torch.randint(V, (32,), generator=gen))), ELBO)
        opt.zero_grad()
        (est.decoder_loss + est.encoder_loss).backward()
        opt.step()
        losses.append(-float(est.objective))
    return losses


def test_training_a_tiny_synthetic_vq_model_lowers_the_loss() -> None:
    model = _model(seed=1, embedding_size=16, hidden_size=16, num_categories=6, vq_decay=0.9)
    losses = _train(model, 40, seed=2)
    first, last = sum(losses[:10]) / 10, sum(losses[-10:]) / 10
    assert last < first - 0.3, (first, last)


def test_state_dict_round_trip_keeps_codebook_and_ema_state() -> None:
    model = _model(seed=5)
    _train(model, 3, seed=6)
    state = model.state_dict()
    for name in ("latent.codebook", "latent.ema_cluster_size", "latent.ema_embed_sum"):
        assert name in state
    assert not torch.equal(state["latent.ema_cluster_size"], torch.ones(2, 4, dtype=torch.float64))
    buffer = io.BytesIO()
    torch.save(state, buffer)
    buffer.seek(0)
    copy = _model(seed=99)
    copy.load_state_dict(torch.load(buffer))
    for name, value in model.state_dict().items():
        assert torch.equal(copy.state_dict()[name], value), name
    # resuming from the copy continues exactly as the original
    torch.manual_seed(0)
    a = _train(model, 3, seed=7)
    torch.manual_seed(0)
    b = _train(copy, 3, seed=7)
    assert a == b
    assert torch.equal(model.latent.codebook, copy.latent.codebook)


def test_config_wiring_and_refusals() -> None:
    model = SentenceVAE(_cfg(vq_beta=2.0, vq_decay=0.999, num_latents=3, num_categories=7))
    assert isinstance(model.latent, VQLatent) and model.latent.beta == 2.0 and model.latent.decay == 0.999
    assert model.encoder.output.out_features == 3 * 3 and len(model.decoder.hidden) == 1
    assert isinstance(SentenceVAE(_cfg(vq_decay=None)).latent.codebook, torch.nn.Parameter)
    with pytest.raises(ValidationError, match="vq_decay must be in"):
        _cfg(vq_decay=1.0)
    with pytest.raises(ValidationError, match="vq_beta"):
        _cfg(vq_beta=-0.1)
    with pytest.raises(ValidationError, match="estimator: elbo"):
        VAEConfig.model_validate({"model": {"latent": "vq"},
                                  "objective": {"estimator": "vimco", "kind": "kl", "mi_weight": 0.5, "samples": 16}})
    with pytest.raises(ValidationError, match="samples: 1"):
        VAEConfig.model_validate({"model": {"latent": "vq"}, "objective": {"samples": 4}})
    VAEConfig.model_validate({"model": {"latent": "vq"}})
    terms = _terms(_model(), _symbols(torch.arange(4)))
    with pytest.raises(ValueError, match="VQ latents train with estimator 'elbo'"):
        estimate(terms, ObjectiveSpec(estimator="dreg", samples=1))


def _ema_rank(rank: int, world: int, folder: str, params: torch.Tensor) -> None:
    torch.distributed.init_process_group("gloo", init_method=f"file://{folder}/init", rank=rank, world_size=world)
    try:
        latent, _ = _random_latent()
        latent.update_codebook(params.chunk(world)[rank])
        torch.save(latent.codebook.clone(), f"{folder}/codebook{rank}.pt")
    finally:
        torch.distributed.destroy_process_group()


def test_ema_statistics_are_all_reduced_across_ranks(tmp_path) -> None:
    """Two gloo ranks, each with half the batch, make the update a single process makes on the whole batch."""
    latent, params = _random_latent()
    params = torch.cat([params, params.flip(0) * 0.5])  # 14 sentences, 7 per rank
    latent.update_codebook(params)
    torch.multiprocessing.start_processes(_ema_rank, args=(2, str(tmp_path), params), nprocs=2, start_method="fork")
    for rank in (0, 1):
        torch.testing.assert_close(torch.load(tmp_path / f"codebook{rank}.pt"), latent.codebook)
