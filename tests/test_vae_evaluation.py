"""Tests of pipeline.tasks.vae_evaluation against closed forms of a linear-Gaussian model.

The stand-in model: z ~ N(0, I_D), x | z ~ N(A z + b, σ² I_T), with A = U diag(s) (U orthonormal
columns), so that the true posterior is diagonal: p(z|x) = N(m(x), diag(v)), v = 1 / (1 + s²/σ²),
m(x) = v * s * Uᵀ(x - b) / σ². Then ln p(x) = ln N(x; b, AAᵀ + σ²I), KL(p(z|x) || p(z)) and the mutual
information I(X, Z) = ½ Σ ln(1 + s²/σ²) have closed forms. Each x "token" is one coordinate of x, so
a sentence has T tokens. The encoder is the true posterior, optionally distorted (mean shift, std
scale), to make importance sampling non-trivial. Integration tests with the real SentenceVAE follow.
"""

from __future__ import annotations

import math
from types import SimpleNamespace

import pytest
import torch
from torch import Tensor, nn

from pipeline.data.sentences import SentenceBatch, SentenceCorpus, evaluation_batches
from pipeline.tasks.vae_evaluation import (
    METRIC_DESCRIPTIONS,
    VAEEvaluation,
    evaluate_vae,
    importance_sampled_log_likelihood,
    score_sentences,
)

T, D, SIGMA = 4, 3, 0.5
S = torch.tensor([2.0, 0.7, 0.0], dtype=torch.float64)  # the third latent ignores x: inactive


def _batch(x: Tensor) -> SentenceBatch:
    """x [B, T] -> time-major batch whose "sentences" are the continuous x (targets [T, B] float)."""
    b = x.shape[0]
    targets = x.t().contiguous()
    return SentenceBatch(inputs=torch.zeros_like(targets), targets=targets, mask=torch.ones(T, b, dtype=torch.bool),
                  lengths=torch.full((b,), T, dtype=torch.int64))


class _DiagonalGaussian(nn.Module):
    """params [B, 2D] = (mean, log std); the latents API of models.vae.latents."""

    param_size = 2 * D
    reparameterized = True

    def _split(self, params: Tensor) -> tuple[Tensor, Tensor]:
        return params[:, :D], params[:, D:].exp()

    def sample(self, params: Tensor, num_samples: int) -> Tensor:
        mean, std = self._split(params)
        return mean + std * torch.randn(num_samples, *mean.shape, dtype=params.dtype)

    def log_prob(self, params: Tensor, z: Tensor) -> Tensor:
        mean, std = self._split(params)
        return torch.distributions.Normal(mean, std).log_prob(z).sum(-1)

    def prior_log_prob(self, z: Tensor) -> Tensor:
        return torch.distributions.Normal(0.0, 1.0).log_prob(z).sum(-1)

    def kl_to_prior(self, params: Tensor) -> Tensor:
        mean, std = self._split(params)
        return torch.distributions.kl_divergence(torch.distributions.Normal(mean, std),
                                                 torch.distributions.Normal(0.0, 1.0)).sum(-1)

    def posterior_mean(self, params: Tensor) -> Tensor:
        return params[:, :D]


class _LinearGaussianVAE(nn.Module):
    def __init__(self, mean_shift: float = 0.0, std_scale: float = 1.0, seed: int = 0) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        u, _ = torch.linalg.qr(torch.randn(T, D, generator=g, dtype=torch.float64))
        self.register_buffer("a", u * S)  # [T, D]
        self.register_buffer("b", torch.randn(T, generator=g, dtype=torch.float64))
        self.latent = _DiagonalGaussian()
        self.mean_shift, self.std_scale = mean_shift, std_scale
        self.encoder = self._encode
        self.decoder = SimpleNamespace(log_likelihood=self.log_likelihood)

    # true posterior quantities ------------------------------------------------------------
    def posterior(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """x [B, T] -> mean [B, D], variance [D] of p(z|x)."""
        var = 1.0 / (1.0 + S**2 / SIGMA**2)
        return var * ((x - self.b) @ self.a) / SIGMA**2, var

    def log_marginal(self, x: Tensor) -> Tensor:
        cov = self.a @ self.a.t() + SIGMA**2 * torch.eye(T, dtype=torch.float64)
        return torch.distributions.MultivariateNormal(self.b, cov).log_prob(x)

    def true_kl(self, x: Tensor) -> Tensor:
        mean, var = self.posterior(x)
        return 0.5 * (var.sum() + (mean**2).sum(-1) - D - var.log().sum())

    def sample_x(self, n: int, seed: int) -> Tensor:
        g = torch.Generator().manual_seed(seed)
        z = torch.randn(n, D, generator=g, dtype=torch.float64)
        return z @ self.a.t() + self.b + SIGMA * torch.randn(n, T, generator=g, dtype=torch.float64)

    # the model API -------------------------------------------------------------------------
    def _encode(self, targets: Tensor, lengths: Tensor) -> Tensor:
        mean, var = self.posterior(targets.t())
        log_std = (0.5 * var.log() + math.log(self.std_scale)).expand_as(mean)
        return torch.cat([mean + self.mean_shift, log_std], dim=1)

    def log_likelihood(self, inputs: Tensor, targets: Tensor, mask: Tensor, z: Tensor) -> Tensor:
        loc = z @ self.a.t() + self.b  # [c, B, T]
        per_token = torch.distributions.Normal(loc, SIGMA).log_prob(targets.t())
        return (per_token * mask.t()).sum(-1)


MUTUAL_INFORMATION = 0.5 * float(torch.log1p(S**2 / SIGMA**2).sum())


def _seeded(batches: list, seeds: list[int]):
    """Yield batches, re-seeding the global RNG right before each is scored."""
    for seed, batch in zip(seeds, batches):
        torch.manual_seed(seed)
        yield batch


# ------------------------------------------------------------------------------------------- stand-in


def test_exact_posterior_gives_exact_log_likelihood() -> None:
    model = _LinearGaussianVAE()
    x = model.sample_x(50, seed=1)
    torch.manual_seed(0)
    log_px = importance_sampled_log_likelihood(model, _batch(x), num_samples=3, chunk_size=2)
    torch.testing.assert_close(log_px, model.log_marginal(x), rtol=0, atol=1e-9)


def test_importance_sampled_nll_converges_to_log_marginal() -> None:
    model = _LinearGaussianVAE(mean_shift=0.4, std_scale=1.6)
    x = model.sample_x(200, seed=2)
    exact = model.log_marginal(x)
    gaps = []
    for k in (1, 10, 3000):
        torch.manual_seed(k)
        gaps.append(float((exact - importance_sampled_log_likelihood(model, _batch(x), k, 500)).mean()))
    # a lower bound in expectation whose gap shrinks with K (Burda et al.)
    assert gaps[0] > 0.3 and gaps[0] > gaps[1] > gaps[2] >= -0.01
    assert gaps[2] < 0.02


@pytest.mark.parametrize("chunk_size", [1, 3, 7, 40])
def test_chunked_equals_unchunked(chunk_size: int) -> None:
    model = _LinearGaussianVAE(mean_shift=0.3, std_scale=1.3)
    batch = _batch(model.sample_x(16, seed=3))
    torch.manual_seed(5)
    whole = score_sentences(model, batch, num_samples=40, chunk_size=40)
    torch.manual_seed(5)
    chunked = score_sentences(model, batch, num_samples=40, chunk_size=chunk_size)
    for name in ("log_likelihood", "reconstruction", "kl", "mutual_information", "mutual_information_aggregate",
                 "posterior_mean", "num_tokens"):
        torch.testing.assert_close(getattr(chunked, name), getattr(whole, name), rtol=1e-12, atol=1e-12)
    # and the chunk-combined IS estimate equals a direct logsumexp over all 40 samples
    torch.manual_seed(5)
    params = model.encoder(batch.targets, batch.lengths)
    z = model.latent.sample(params, 40)
    log_w = (model.log_likelihood(batch.inputs, batch.targets, batch.mask, z) + model.latent.prior_log_prob(z)
             - model.latent.log_prob(params, z))
    torch.testing.assert_close(chunked.log_likelihood, torch.logsumexp(log_w, 0) - math.log(40))


def test_mutual_information_estimate_converges_to_true_kl_and_mi() -> None:
    model = _LinearGaussianVAE(mean_shift=0.2, std_scale=1.3)
    x = model.sample_x(1000, seed=4)
    torch.manual_seed(0)
    scores = score_sentences(model, _batch(x), num_samples=2000, chunk_size=500, aggregate=False)
    true_kl = model.true_kl(x)
    # per sentence Û - Ŝ estimates KL(p(z|x) || p(z)) (thesis Prop. 10 (i))
    assert float((scores.mutual_information - true_kl).abs().mean()) < 0.05
    assert abs(float(scores.mutual_information.mean() - true_kl.mean())) < 0.02
    # the mean over data drawn from the model estimates I(X, Z); sampling error of x ~ 0.03 here
    assert abs(float(scores.mutual_information.mean()) - MUTUAL_INFORMATION) < 0.12
    # the exact posterior makes Û - Ŝ an unbiased single-average: mean_k ln p(x|z_k) - ln p(x)
    exact = _LinearGaussianVAE()
    torch.manual_seed(0)
    exact_scores = score_sentences(exact, _batch(x), num_samples=500, chunk_size=500, aggregate=False)
    assert abs(float(exact_scores.mutual_information.mean() - true_kl.mean())) < 0.02


def test_reconstruction_and_kl_match_closed_forms() -> None:
    model = _LinearGaussianVAE(mean_shift=0.3, std_scale=1.5)
    x = model.sample_x(100, seed=6)
    torch.manual_seed(0)
    scores = score_sentences(model, _batch(x), num_samples=4000, chunk_size=1000, aggregate=False)
    mean, var = model.posterior(x)
    q_mean, q_var = mean + 0.3, var * 1.5**2
    # E_q ln N(x; A z + b, σ²I) = -T/2 ln(2πσ²) - (|x - A μ_q - b|² + tr(A diag(v_q) Aᵀ)) / (2σ²)
    residual = x - q_mean @ model.a.t() - model.b
    expected = (-0.5 * T * math.log(2 * math.pi * SIGMA**2)
                - ((residual**2).sum(-1) + (model.a**2 * q_var).sum()) / (2 * SIGMA**2))
    torch.testing.assert_close(scores.reconstruction, expected, rtol=0, atol=0.25)
    assert abs(float((scores.reconstruction - expected).mean())) < 0.01
    closed_kl = 0.5 * (q_var.sum() + (q_mean**2).sum(-1) - D - q_var.log().sum())
    torch.testing.assert_close(scores.kl, closed_kl)


def test_active_units_count_dimensions_that_depend_on_x() -> None:
    model = _LinearGaussianVAE()
    x = model.sample_x(300, seed=7)
    batches = [_batch(x[i:i + 64]) for i in range(0, 300, 64)]
    evaluation = evaluate_vae(model, batches, num_samples=4, chunk_size=4)
    means, _ = model.posterior(x)
    torch.testing.assert_close(evaluation.posterior_mean_variance(), means.var(0))
    assert evaluation.active_units() == 2.0  # s = (2, 0.7, 0): the third dimension ignores x
    high = VAEEvaluation.from_sums(evaluation.sums(), num_samples=4, active_unit_threshold=float(means.var(0)[1]) + 1e-6)
    assert high.active_units() == 1.0


def test_aggregate_mutual_information_is_capped_by_log_batch_size_and_matches_brute_force() -> None:
    sharp = _LinearGaussianVAE(std_scale=0.01)  # nearly deterministic encoder: I_q saturates at ln B
    x = sharp.sample_x(8, seed=8)
    torch.manual_seed(0)
    scores = score_sentences(sharp, _batch(x), num_samples=20, chunk_size=7)
    assert scores.mutual_information_aggregate is not None
    assert bool((scores.mutual_information_aggregate <= math.log(8) + 1e-9).all())
    assert float(scores.mutual_information_aggregate.mean()) > math.log(8) - 0.1
    # brute force on a small batch: ln q(z|x_i) - ln mean_j q(z|x_j), sample by sample
    model = _LinearGaussianVAE(mean_shift=0.1, std_scale=1.2)
    x = model.sample_x(3, seed=9)
    torch.manual_seed(1)
    scores = score_sentences(model, _batch(x), num_samples=5, chunk_size=2)
    torch.manual_seed(1)
    params = model.encoder(_batch(x).targets, None)
    z = model.latent.sample(params, 5)
    mean, std = params[:, :D], params[:, D:].exp()
    expected = torch.zeros(3, dtype=torch.float64)
    for i in range(3):
        for k in range(5):
            log_q = [float(torch.distributions.Normal(mean[j], std[j]).log_prob(z[k, i]).sum()) for j in range(3)]
            expected[i] += (log_q[i] - (math.log(sum(math.exp(v) for v in log_q)) - math.log(3))) / 5
    torch.testing.assert_close(scores.mutual_information_aggregate, expected)


def test_metrics_relations_and_perplexity_from_importance_sampled_nll() -> None:
    model = _LinearGaussianVAE(mean_shift=0.3, std_scale=1.3)
    x = model.sample_x(40, seed=10)
    evaluation = evaluate_vae(model, [_batch(x[:25]), _batch(x[25:])], num_samples=30, chunk_size=8)
    m = evaluation.metrics("valid/")
    assert set(m) == {"valid/" + name for name in METRIC_DESCRIPTIONS}
    assert m["valid/sentences"] == 40 and m["valid/tokens"] == 40 * T and m["valid/samples"] == 30
    assert m["valid/ppl"] == pytest.approx(math.exp(m["valid/nll_per_token"]), rel=1e-12)
    assert m["valid/nll"] == m["valid/nll_per_token"] == pytest.approx(m["valid/nll_per_sentence"] / T)
    assert m["valid/elbo_per_sentence"] == pytest.approx(
        m["valid/reconstruction_per_sentence"] - m["valid/kl_per_sentence"])
    assert m["valid/kl_per_token"] == pytest.approx(m["valid/kl_per_sentence"] / T)
    # the importance-sampled NLL is tighter than -ELBO, and perplexity comes from the former
    assert m["valid/nll_per_token"] < -m["valid/elbo_per_token"]
    assert m["valid/ppl"] < math.exp(-m["valid/elbo_per_token"])
    assert "ln(evaluation batch size)" in METRIC_DESCRIPTIONS["mutual_information_aggregate"]


def test_shard_sums_combine_to_single_shard_result() -> None:
    model = _LinearGaussianVAE(mean_shift=0.2, std_scale=1.4)
    x = model.sample_x(40, seed=11)
    batches = [_batch(x[i:i + 10]) for i in range(0, 40, 10)]
    kwargs = dict(num_samples=12, chunk_size=5)
    single = evaluate_vae(model, _seeded(batches, [0, 1, 2, 3]), **kwargs)
    rank0 = evaluate_vae(model, _seeded([batches[0], batches[2]], [0, 2]), **kwargs)
    rank1 = evaluate_vae(model, _seeded([batches[1], batches[3]], [1, 3]), **kwargs)
    empty = evaluate_vae(model, [], **kwargs)  # a rank without sentences contributes zeros of the right width
    reduced = rank0.sums() + rank1.sums() + empty.sums()  # what an all-reduce (SUM) computes
    combined = VAEEvaluation.from_sums(reduced, num_samples=12)
    torch.testing.assert_close(combined.sums(), single.sums())
    expected = single.metrics()
    for name, value in combined.metrics().items():
        assert value == pytest.approx(expected[name], rel=1e-12), name
    assert (rank0 + rank1).metrics() == pytest.approx(expected, rel=1e-12)
    with pytest.raises(ValueError, match="nothing was evaluated"):
        empty.metrics()


def test_evaluation_restores_training_mode() -> None:
    model = _LinearGaussianVAE()
    model.train()
    batch = _batch(model.sample_x(4, seed=12))
    importance_sampled_log_likelihood(model, batch, 2, 1)
    evaluate_vae(model, [batch], num_samples=2, chunk_size=1)
    assert model.training


# ------------------------------------------------------------------------------------------- real model

VOCAB = 23


def _sentence_batch(lengths: list[int], seed: int = 0) -> SentenceBatch:
    """Random sentences (ids 3..VOCAB-1, <bos> = 1), padded with 0, time-major."""
    g = torch.Generator().manual_seed(seed)
    steps, b = max(lengths), len(lengths)
    targets = torch.zeros(steps, b, dtype=torch.int64)
    for column, n in enumerate(lengths):
        targets[:n, column] = torch.randint(3, VOCAB, (n,), generator=g)
    inputs = torch.cat([torch.ones(1, b, dtype=torch.int64), targets[:-1]])
    lengths_t = torch.tensor(lengths)
    mask = torch.arange(steps).unsqueeze(1) < lengths_t
    return SentenceBatch(inputs=inputs * mask, targets=targets, mask=mask, lengths=lengths_t)


def _rows(batch: SentenceBatch, columns: list[int]) -> SentenceBatch:
    steps = int(batch.lengths[columns].max())
    return SentenceBatch(inputs=batch.inputs[:steps, columns], targets=batch.targets[:steps, columns],
                  mask=batch.mask[:steps, columns], lengths=batch.lengths[columns])


def _real_model(latent: str = "gaussian"):
    from models.vae import SentenceVAE, VAEModelConfig

    torch.manual_seed(0)
    config = VAEModelConfig(vocab_size=VOCAB, embedding_size=8, hidden_size=16, latent=latent, latent_size=4,
                            num_latents=3, num_categories=4, categorical_embedding_size=5, unk_id=2,
                            word_dropout=0.3, output_dropout=0.3, embedding_dropout=0.2)
    return SentenceVAE(config)


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_real_model_matches_its_sampled_terms_and_chunking(latent: str) -> None:
    model = _real_model(latent).train()  # dropout on in training mode: evaluation must switch it off
    batch = _sentence_batch([5, 1, 9, 3, 7], seed=1)
    torch.manual_seed(3)
    model.eval()
    scores = score_sentences(model, batch, num_samples=12, chunk_size=12)
    model.train()
    # independent: the model's own terms from the same random state (encoder, then K samples, then decoder)
    torch.manual_seed(3)
    model.eval()
    with torch.no_grad():
        terms = model.sample_terms(batch.inputs, batch.targets, batch.mask, batch.lengths, 12)
    model.train()
    log_w = (terms.log_px_z + terms.log_pz - terms.log_qz).double()
    torch.testing.assert_close(scores.log_likelihood, torch.logsumexp(log_w, 0) - math.log(12))
    u_hat = (torch.softmax(log_w, 0) * terms.log_px_z.double()).sum(0)
    torch.testing.assert_close(scores.mutual_information, u_hat - scores.log_likelihood)
    torch.testing.assert_close(scores.reconstruction, terms.log_px_z.double().mean(0))
    torch.testing.assert_close(scores.kl, terms.kl.double())
    for chunk_size in (1, 5):
        torch.manual_seed(3)
        log_px = importance_sampled_log_likelihood(model, batch, 12, chunk_size)
        torch.testing.assert_close(log_px, scores.log_likelihood, rtol=1e-6, atol=1e-5)
    assert model.training


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_real_model_batched_equals_one_sentence_at_a_time(latent: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """Padding and batching do not change a sentence's score when it sees the same latent samples."""
    model = _real_model(latent).eval()
    batch = _sentence_batch([4, 8, 1, 6], seed=2)
    with torch.no_grad():
        z = model.latent.sample(model.encoder(batch.targets, batch.lengths), 10)  # [K, B, ...]
    monkeypatch.setattr(model.latent, "sample", lambda params, k: z)
    batched = score_sentences(model, batch, num_samples=10, chunk_size=4)
    for i in range(4):
        monkeypatch.setattr(model.latent, "sample", lambda params, k, i=i: z[:, i:i + 1])
        single = score_sentences(model, _rows(batch, [i]), num_samples=10, chunk_size=3, aggregate=False)
        for name in ("log_likelihood", "reconstruction", "kl", "mutual_information"):
            torch.testing.assert_close(getattr(single, name)[0], getattr(batched, name)[i], rtol=1e-5, atol=1e-5)


def test_real_categorical_model_metrics() -> None:
    model = _real_model("categorical")
    batches = [_sentence_batch([3, 5, 2, 7, 4, 6], seed=s) for s in range(3)]
    evaluation = evaluate_vae(model, batches, num_samples=8, chunk_size=3)
    m = evaluation.metrics()
    assert m["sentences"] == 18 and m["tokens"] == 3 * 27
    assert 0 <= m["active_units"] <= 3 * 4  # flattened probabilities: n * m dimensions
    assert evaluation.posterior_mean_sum.shape == (12,)
    assert m["mutual_information_aggregate"] <= math.log(6) + 1e-9
    assert m["kl_per_sentence"] >= 0 and m["ppl"] == pytest.approx(math.exp(m["nll_per_token"]))
    assert 0 < m["nll_per_token"] < 2 * math.log(VOCAB)  # an untrained model: about ln |V| per token


def test_rank_shards_of_a_prepared_corpus_combine_to_the_one_process_evaluation(
        tmp_path, monkeypatch: pytest.MonkeyPatch) -> None:
    from models.vae import SentenceVAE, VAEModelConfig
    from pipeline.data import prepare_dataset

    g = torch.Generator().manual_seed(0)
    source = tmp_path / "source"
    source.mkdir()
    for split, count in (("train", 60), ("valid", 23), ("test", 2)):
        lines = [" ".join(f"w{int(i)}" for i in torch.randint(12, (int(n),), generator=g))
                 for n in torch.randint(1, 9, (count,), generator=g)]
        (source / f"{split}.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    prepare_dataset("sentences", str(source), tmp_path / "data", progress=False)
    corpus = SentenceCorpus(tmp_path / "data", "valid")
    torch.manual_seed(0)
    model = SentenceVAE(VAEModelConfig(vocab_size=corpus.vocab_size, embedding_size=8, hidden_size=16, latent_size=4))
    # each sentence's samples depend on the sentence alone (not on which rank / batch scores it)
    eps = torch.randn(6, 1, 4)

    def sample(params: Tensor, k: int) -> Tensor:
        mean, std = model.latent.mean_std(params)
        return mean + std * eps[:k]

    monkeypatch.setattr(model.latent, "sample", sample)
    kwargs = dict(num_samples=6, chunk_size=4)
    single = evaluate_vae(model, evaluation_batches(corpus, 8), **kwargs)
    shards = [evaluate_vae(model, evaluation_batches(corpus, 4, rank=r, world_size=3), **kwargs) for r in range(3)]
    combined = VAEEvaluation.from_sums(sum(shard.sums() for shard in shards), num_samples=6)
    assert combined.sentences == single.sentences == len(corpus)
    assert combined.tokens == single.tokens == corpus.num_tokens  # words + <eos>
    expected = single.metrics()
    for name, value in combined.metrics().items():
        if name != "mutual_information_aggregate":  # mixes the posteriors of a batch: depends on the batching
            assert value == pytest.approx(expected[name], rel=1e-6, abs=1e-6), name
    assert combined.metrics()["mutual_information_aggregate"] <= math.log(4) + 1e-9
