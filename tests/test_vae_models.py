"""Sentence-VAE models (models/vae): latents, encoders, decoders, SentenceVAE terms, against independent
computations (torch.distributions, closed forms, hand-written per-sentence loops)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from pydantic import ValidationError
from torch import distributions as D

from models.vae import (
    CategoricalLatent,
    GaussianLatent,
    LatentTerms,
    MLPDecoder,
    RecurrentDecoder,
    SentenceVAE,
    VAEModelConfig,
)

V = 17
UNK = 3


def _cfg(**kw) -> VAEModelConfig:
    base = dict(vocab_size=V, embedding_size=6, hidden_size=7, latent_size=4, num_latents=3, num_categories=5,
                 categorical_embedding_size=2, unk_id=UNK)
    base.update(kw)
    return VAEModelConfig(**base)


def _batch(lengths: list[int], seed: int = 0, pad: int | None = None):
    """inputs/targets/mask [T, B] with T = max(lengths); ``pad`` = padding token (None: random garbage)."""
    gen = torch.Generator().manual_seed(seed)
    T, B = max(lengths), len(lengths)
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(T).unsqueeze(1) < lengths_t.unsqueeze(0)
    targets = torch.randint(4, V, (T, B), generator=gen)
    inputs = torch.cat([torch.ones(1, B, dtype=torch.long), targets[:-1]])  # id 1 = <bos>
    if pad is None:
        garbage = torch.randint(0, V, (2, T, B), generator=gen)
        targets, inputs = torch.where(mask, targets, garbage[0]), torch.where(mask, inputs, garbage[1])
    else:
        targets, inputs = targets.masked_fill(~mask, pad), inputs.masked_fill(~mask, pad)
    return inputs, targets, mask, lengths_t


def _model(**kw) -> SentenceVAE:
    torch.manual_seed(kw.pop("seed", 0))
    return SentenceVAE(_cfg(**kw)).double()


# ---------------------------------------------------------------- latents


def _gaussian_params(B=3, Dz=4, seed=1):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(B, 2 * Dz, generator=gen, dtype=torch.float64)


def test_gaussian_densities_and_kl_match_torch_distributions():
    latent = GaussianLatent(4, min_std=1e-3)
    params = _gaussian_params()
    mean, raw = params.chunk(2, 1)
    std = F.softplus(raw) + 1e-3
    q = D.Independent(D.Normal(mean, std), 1)
    p = D.Independent(D.Normal(torch.zeros_like(mean), torch.ones_like(std)), 1)
    z = latent.sample(params, 5)
    assert z.shape == (5, 3, 4) and latent.param_size == 8 and latent.decoder_input_size == 4
    torch.testing.assert_close(latent.log_prob(params, z), q.log_prob(z))
    torch.testing.assert_close(latent.prior_log_prob(z), p.log_prob(z))
    torch.testing.assert_close(latent.kl_to_prior(params), D.kl_divergence(q, p))
    torch.testing.assert_close(latent.kl_per_dim(params), D.kl_divergence(D.Normal(mean, std), D.Normal(0.0, 1.0)))
    torch.testing.assert_close(latent.posterior_mean(params), mean)
    assert latent.prior_sample(6, 3).shape == (6, 3, 4)


def test_gaussian_analytic_kl_equals_monte_carlo_and_samples_are_reparameterised():
    torch.manual_seed(2)
    latent = GaussianLatent(4)
    params = _gaussian_params(seed=3).requires_grad_()
    z = latent.sample(params, 200_000)
    diff = (latent.log_prob(params, z) - latent.prior_log_prob(z)).detach()  # [K, B]
    stderr = diff.std(0) / math.sqrt(diff.shape[0])
    kl = latent.kl_to_prior(params).detach()
    assert torch.all((diff.mean(0) - kl).abs() < 4 * stderr), (diff.mean(0), kl)
    mean, std = latent.mean_std(params.detach())
    torch.testing.assert_close(z.detach().mean(0), mean, atol=0.02, rtol=0)
    torch.testing.assert_close(z.detach().std(0), std, atol=0.02, rtol=0.01)
    # reparameterised: dz/dmean = 1 (summed over samples: K)
    (grad,) = torch.autograd.grad(z[:10].sum(), params)
    torch.testing.assert_close(grad[:, :4], torch.full_like(grad[:, :4], 10.0))


def test_gaussian_scale_is_numerically_safe():
    latent = GaussianLatent(2, min_std=1e-4)
    params = torch.tensor([[0.0, 0.0, -1e4, 1e4]], dtype=torch.float64)  # raw scales: tiny and huge
    _, std = latent.mean_std(params)
    assert std[0, 0] == pytest.approx(1e-4) and std[0, 1] == pytest.approx(1e4)
    assert torch.isfinite(latent.kl_to_prior(params)).all()
    assert torch.isfinite(latent.log_prob(params, latent.sample(params, 3))).all()


def test_categorical_densities_and_kl_against_hand_computation():
    n, m = 3, 5
    latent = CategoricalLatent(n, m, embedding_size=2)
    assert latent.param_size == 15 and latent.decoder_input_size == 6 and not latent.reparameterized
    gen = torch.Generator().manual_seed(4)
    params = torch.randn(2, n * m, generator=gen, dtype=torch.float64) * 2
    probs = torch.softmax(params.view(2, n, m), -1)
    kl_hand = torch.zeros(2, n, dtype=torch.float64)
    for b in range(2):
        for i in range(n):
            kl_hand[b, i] = sum(probs[b, i, c] * math.log(probs[b, i, c] * m) for c in range(m))
    torch.testing.assert_close(latent.kl_per_dim(params), kl_hand)
    torch.testing.assert_close(latent.kl_to_prior(params), kl_hand.sum(1))
    z = latent.sample(params, 4)
    assert z.shape == (4, 2, n) and z.dtype == torch.int64 and not z.requires_grad
    q = D.Independent(D.Categorical(probs=probs), 1)
    torch.testing.assert_close(latent.log_prob(params, z), q.log_prob(z))
    prior = latent.prior_log_prob(z, dtype=torch.float64)
    torch.testing.assert_close(prior, torch.full((4, 2), -n * math.log(m), dtype=torch.float64))
    torch.testing.assert_close(latent.posterior_mean(params), probs.reshape(2, -1))
    zp = latent.prior_sample(7, 2)
    assert zp.shape == (7, 2, n) and zp.min() >= 0 and zp.max() < m


def test_categorical_samples_follow_the_posterior():
    torch.manual_seed(5)
    latent = CategoricalLatent(2, 4, embedding_size=1)
    params = torch.tensor([[2.0, 0.0, -1.0, 0.5, -3.0, 1.0, 1.0, 0.0]])
    z = latent.sample(params, 100_000)  # [K, 1, 2]
    for i in range(2):
        freq = torch.bincount(z[:, 0, i], minlength=4).double() / z.shape[0]
        torch.testing.assert_close(freq, torch.softmax(params.view(2, 4)[i].double(), 0), atol=0.006, rtol=0)


# ---------------------------------------------------------------- encoder


def _cell_loop(layer, xs):
    """A RecurrentLayer without Mogrifier / dropout, stepped by hand over one sequence xs [T, m]."""
    h = c = torch.zeros(1, layer.hidden_size, dtype=xs.dtype)
    for x in xs:
        h, c = layer.cell(x.unsqueeze(0), h, c)
    return h[0]


@pytest.mark.parametrize("cell", ["lstm", "gru"])
def test_bidirectional_encoder_matches_hand_loop_and_ignores_padding(cell):
    model = _model(encoder_cell=cell)
    enc = model.encoder
    inputs, targets, mask, lengths = _batch([5, 2, 7, 1], seed=6)  # garbage in the padding
    params = enc(targets, lengths)
    assert params.shape == (4, 8)
    emb = enc.embedding.weight
    for b, length in enumerate(lengths.tolist()):
        tokens = targets[:length, b]
        forward_last = _cell_loop(enc.forward_layer, emb[tokens])
        backward_last = _cell_loop(enc.backward_layer, emb[tokens.flip(0)])
        expected = enc.output(0.5 * (forward_last + backward_last))
        torch.testing.assert_close(params[b], expected, rtol=1e-10, atol=1e-12)
        alone = enc(tokens.unsqueeze(1), lengths[b : b + 1])  # the sentence alone, unpadded
        torch.testing.assert_close(params[b], alone[0], rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- decoder


def _decoder_reference(dec: RecurrentDecoder, inputs, targets, length, z_vec):
    """log p(x|z) of one sentence: hand loop of log_softmax over its positions (eval mode, no Mogrifier)."""
    h = c = torch.zeros(1, dec.hidden_size, dtype=z_vec.dtype)
    total = torch.zeros((), dtype=z_vec.dtype)
    for t in range(length):
        x = torch.cat([dec.embedding.weight[inputs[t]], z_vec]).unsqueeze(0)
        h, c = dec.layer.cell(x, h, c)
        total = total + torch.log_softmax(dec.output(h[0]), 0)[targets[t]]
    return total


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
@pytest.mark.parametrize("cell", ["lstm", "rlstm", "elman"])
def test_log_px_z_equals_hand_loop(latent, cell):
    model = _model(latent=latent, decoder_cell=cell).eval()
    inputs, targets, mask, lengths = _batch([4, 6, 1], seed=7)
    terms = model.sample_terms(inputs, targets, mask, lengths, num_samples=3)
    assert terms.log_px_z.shape == (3, 3)
    dec = model.decoder
    for k in range(3):
        for b in range(3):
            if latent == "gaussian":
                z_vec = terms.z[k, b].detach()
            else:  # one embedding table per latent, rows latent-major, concatenated
                m = model.latent.num_categories
                z_vec = torch.cat([dec.latent_input.weight[i * m + terms.z[k, b, i]] for i in range(3)])
            expected = _decoder_reference(dec, inputs[:, b], targets[:, b], int(lengths[b]), z_vec)
            torch.testing.assert_close(terms.log_px_z[k, b], expected, rtol=1e-10, atol=1e-10)


def test_decoder_is_padding_invariant():
    model = _model().eval()
    inputs, targets, mask, lengths = _batch([3, 8, 5], seed=8)
    z = torch.randn(2, 3, 4, dtype=torch.float64)
    full = model.decoder.log_likelihood(inputs, targets, mask, z)
    for b, length in enumerate(lengths.tolist()):
        alone = model.decoder.log_likelihood(
            inputs[:length, b : b + 1], targets[:length, b : b + 1], mask[:length, b : b + 1], z[:, b : b + 1]
        )
        torch.testing.assert_close(full[:, b], alone[:, 0], rtol=1e-10, atol=1e-10)


_DROPOUTS = ["embedding_dropout", "word_dropout", "input_dropout", "state_dropout", "output_dropout"]


@pytest.mark.parametrize("which", _DROPOUTS)
@pytest.mark.parametrize("shared", [True, False])
def test_shared_and_independent_dropout_masks(which, shared):
    """With z identical across the K samples, shared masks give K identical log p(x|z) per sentence
    (different sentences get different masks); independent masks give different values. Eval: no dropout."""
    model = _model(shared_dropout_mask=shared, **{which: 0.5}, seed=9)
    inputs, targets, mask, lengths = _batch([8, 8, 8], seed=10)
    K = 4
    z = torch.randn(1, 3, 4, dtype=torch.float64).expand(K, 3, 4)
    torch.manual_seed(11)
    train = model.decoder.log_likelihood(inputs, targets, mask, z)
    spread = (train - train[:1]).abs().max(0).values  # per sentence, over samples
    if shared:
        assert spread.max() < 1e-10
    else:
        assert torch.all(spread > 1e-6)
    model.eval()
    evaluated = model.decoder.log_likelihood(inputs, targets, mask, z)
    assert (evaluated - evaluated[:1]).abs().max() < 1e-10
    assert not torch.allclose(evaluated, train)  # dropout was active in training mode
    # sentences of a shared-mask batch are masked differently: identical sentences differ
    same = _batch([8], seed=10)
    twins = [t.expand(-1, 3) for t in same[:3]]
    out = model.train().decoder.log_likelihood(*twins, z[:, :1].expand(K, 3, 4))
    assert (out[0] - out[0, 0]).abs().max() > 1e-6


def test_word_dropout_replaces_tokens_by_unk_but_never_bos():
    model = _model(word_dropout=0.4, shared_dropout_mask=False, seed=12)
    seen = []
    model.decoder.embedding.register_forward_hook(lambda mod, args, out: seen.append(args[0]))
    inputs, targets, mask, lengths = _batch([30] * 20, seed=13)
    model.decoder.log_likelihood(inputs, targets, mask, torch.zeros(5, 20, 4, dtype=torch.float64))
    tokens = seen[0]  # [T, K, B]
    assert tokens.shape == (30, 5, 20)
    assert torch.equal(tokens[0], inputs[0].expand(5, 20))
    original = inputs.unsqueeze(1).expand_as(tokens)
    replaced = tokens != original
    assert torch.all(tokens[replaced] == UNK)
    rate = replaced[1:].double().mean().item()
    assert 0.35 < rate < 0.45
    with pytest.raises(ValueError, match="unk_id"):
        SentenceVAE(_cfg(word_dropout=0.1, unk_id=None))


def test_decoder_runs_all_samples_in_one_pass():
    model = _model(encoder_cell="elman", decoder_cell="gru", mogrifier_rounds=2)
    calls = []
    for layer in (model.decoder.layer, model.encoder.forward_layer, model.encoder.backward_layer):
        layer.register_forward_hook(lambda mod, args, out: calls.append(args[0].shape))
    inputs, targets, mask, lengths = _batch([4, 2, 3], seed=14)
    terms = model(inputs, targets, mask, lengths, 6)
    assert terms.log_px_z.shape == (6, 3)
    assert calls == [(4, 3, 6), (4, 3, 6), (4, 18, 6 + 4)]  # encoder twice, decoder once over K*B rows


# ---------------------------------------------------------------- SentenceVAE terms and gradients


def _grads(model_part, loss):
    params = list(model_part.parameters())
    grads = torch.autograd.grad(loss, params, retain_graph=True, allow_unused=True)
    return [g for g in grads if g is not None and g.abs().sum() > 0]


def test_terms_shapes_values_and_gradient_paths_gaussian():
    model = _model(embedding_dropout=0.2, state_dropout=0.2)
    inputs, targets, mask, lengths = _batch([5, 3], seed=15)
    terms = model.sample_terms(inputs, targets, mask, lengths, num_samples=3)
    assert isinstance(terms, LatentTerms) and terms.num_samples == 3
    assert terms.params.shape == (2, 8) and terms.z.shape == (3, 2, 4) and terms.z_leaf.shape == (3, 2, 4)
    for name in ("log_px_z", "log_pz", "log_qz", "log_qz_stopped"):
        assert getattr(terms, name).shape == (3, 2), name
    assert terms.kl.shape == (2,) and terms.kl_per_dim.shape == (2, 4)
    assert torch.equal(terms.num_tokens, lengths)
    torch.testing.assert_close(terms.log_qz_stopped, terms.log_qz)
    torch.testing.assert_close(terms.z_leaf, terms.z.detach())
    torch.testing.assert_close(terms.kl, model.latent.kl_to_prior(terms.params))
    # log p(x|z): decoder only; its z-gradient is taken at z_leaf
    assert _grads(model.encoder, terms.log_px_z.sum()) == []
    assert len(_grads(model.decoder, terms.log_px_z.sum())) == len(list(model.decoder.parameters()))
    (g,) = torch.autograd.grad(terms.log_px_z.sum(), terms.z_leaf, retain_graph=True)
    assert g.shape == (3, 2, 4) and g.abs().sum() > 0
    # q, p and KL terms: encoder only
    for name in ("log_qz", "log_qz_stopped", "log_pz"):
        assert _grads(model.decoder, getattr(terms, name).sum()) == [], name
        assert _grads(model.encoder, getattr(terms, name).sum()), name
    assert _grads(model.decoder, terms.kl.sum()) == [] and _grads(model.encoder, terms.kl.sum())
    # log q = its path part (log_qz_stopped) + its score part (∂/∂params at fixed z)
    (full,) = torch.autograd.grad(terms.log_qz.sum(), terms.params, retain_graph=True)
    (path,) = torch.autograd.grad(terms.log_qz_stopped.sum(), terms.params, retain_graph=True)
    params = terms.params.detach().requires_grad_()
    (score,) = torch.autograd.grad(model.latent.log_prob(params, terms.z.detach()).sum(), params)
    torch.testing.assert_close(full, path + score)


def test_terms_categorical_and_no_grad():
    model = _model(latent="categorical")
    inputs, targets, mask, lengths = _batch([4, 4, 2], seed=16)
    terms = model(inputs, targets, mask, lengths, 5)
    assert terms.z.shape == (5, 3, 3) and terms.z.dtype == torch.int64 and terms.z_leaf is None
    assert terms.kl_per_dim.shape == (3, 3) and terms.params.shape == (3, 15)
    assert not terms.log_pz.requires_grad and not terms.log_qz_stopped.requires_grad
    assert terms.log_pz.dtype == torch.float64
    assert _grads(model.decoder, terms.log_qz.sum()) == [] and _grads(model.encoder, terms.log_qz.sum())
    assert _grads(model.encoder, terms.log_px_z.sum()) == []
    assert any(p is model.decoder.latent_input.weight for p in model.decoder.parameters())
    with torch.no_grad():
        gaussian = _model()(inputs, targets, mask, lengths, 2)
    assert gaussian.z_leaf is None and not gaussian.log_px_z.requires_grad


def test_reset_decoder_changes_decoder_only():
    model = _model(latent="categorical")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    before_enc = {k: v.clone() for k, v in model.encoder.state_dict().items()}
    before_dec = {k: v.clone() for k, v in model.decoder.state_dict().items()}
    model.reset_decoder()
    for k, v in model.encoder.state_dict().items():
        assert torch.equal(v, before_enc[k]), k
    for k, v in model.decoder.state_dict().items():
        assert not torch.equal(v, before_dec[k]), k
    assert torch.all(model.decoder.output.bias == 0)
    # seeded: the same decoder on every rank, and the global RNG stream is left alone
    other = _model(latent="categorical", seed=99)
    rng = torch.get_rng_state()
    model.reset_decoder(seed=7)
    other.reset_decoder(seed=7)
    assert torch.equal(torch.get_rng_state(), rng)
    for (k, v), w in zip(model.decoder.state_dict().items(), other.decoder.state_dict().values()):
        assert torch.equal(v, w), k


@pytest.mark.parametrize("latent, hidden_layers", [("gaussian", 2), ("categorical", 1)])
def test_mlp_model_shapes_and_likelihood(latent, hidden_layers):
    model = _model(architecture="mlp", latent=latent, embedding_size=128, hidden_size=128,
                   categorical_embedding_size=16, num_latents=8, num_categories=10, latent_size=40)
    assert isinstance(model.decoder, MLPDecoder) and len(model.decoder.hidden) == hidden_layers
    assert model.decoder.hidden[0].in_features == (40 if latent == "gaussian" else 128)
    assert len([m for m in model.encoder.hidden if isinstance(m, torch.nn.Linear)]) == 2
    inputs, targets, mask, lengths = _batch([1] * 6, seed=17)
    terms = model(inputs, targets, mask, lengths, 3)
    P = 2 * 40 if latent == "gaussian" else 8 * 10  # mean and scale / logits
    assert terms.params.shape == (6, P) and terms.log_px_z.shape == (3, 6)
    # hand MLP: z_vec -> tanh layers -> log_softmax at the target symbol
    h = model.decoder.latent_input(terms.z_leaf if terms.z_leaf is not None else terms.z).detach()
    for linear in model.decoder.hidden:
        h = torch.tanh(h @ linear.weight.T + linear.bias)
    expected = torch.log_softmax(h @ model.decoder.output.weight.T + model.decoder.output.bias, -1)
    expected = expected.gather(-1, targets[0].view(1, 6, 1).expand(3, 6, 1)).squeeze(-1)
    torch.testing.assert_close(terms.log_px_z, expected)
    with pytest.raises(ValueError, match="T = 1"):
        model(*_batch([2, 1], seed=18), 2)


def test_config_validation():
    with pytest.raises(ValidationError, match="state_dropout"):
        VAEModelConfig(architecture="mlp", state_dropout=0.1)
    with pytest.raises(ValidationError, match="word_dropout"):
        VAEModelConfig(word_dropout=1.0)
    with pytest.raises(ValidationError, match="num_categories"):
        VAEModelConfig(num_categories=1)
    with pytest.raises(ValidationError, match="min_std"):
        VAEModelConfig(min_std=0.0)
    with pytest.raises(ValidationError, match="decoder_cell"):
        VAEModelConfig(decoder_cell="transformer")
    with pytest.raises(ValidationError):
        VAEModelConfig(hiden_size=3)  # extra="forbid"
    with pytest.raises(ValueError, match="vocab_size"):
        SentenceVAE(VAEModelConfig())
    cfg = VAEModelConfig()
    assert (cfg.latent_size, cfg.num_latents, cfg.num_categories, cfg.hidden_size) == (40, 8, 10, 128)


def test_given_noise_fixes_the_samples_and_inverse_cdf_sampling_has_the_right_frequencies():
    """``sample(params, K, noise)``: Gaussian z = μ + σ ε with the given ε; categorical by the inverse CDF of
    given uniforms - frequencies match the probabilities (an independent check of the mapping)."""
    from models.vae import CategoricalLatent, GaussianLatent

    gaussian = GaussianLatent(3)
    params = torch.randn(2, 6)
    eps = torch.randn(4, 2, 3)
    mean, std = gaussian.mean_std(params)
    torch.testing.assert_close(gaussian.sample(params, 4, eps), mean + std * eps)
    categorical = CategoricalLatent(num_latents=2, num_categories=4, embedding_size=8)
    logits = torch.tensor([[0.0, 1.0, 2.0, -1.0, 3.0, 0.0, 0.0, 0.0]])
    noise = categorical.draw_noise(40_000, 1, torch.Generator().manual_seed(0))
    z = categorical.sample(logits, 40_000, noise)
    probs = categorical.log_probs(logits).exp()[0]  # [n, m]
    for latent in range(2):
        freq = torch.bincount(z[:, 0, latent], minlength=4).double() / 40_000
        torch.testing.assert_close(freq, probs[latent].double(), atol=0.01, rtol=0)
