"""Text generation from sentence VAEs (models/vae/generation.py) and the samples report
(pipeline/tasks/vae_samples.py): tiny models built directly, decodings checked against the decoder's own
teacher-forced forward and log-likelihood scoring."""

from __future__ import annotations

import html
from pathlib import Path

import pytest
import torch

from models.vae import SentenceVAE, VAEModelConfig
from models.vae.generation import (
    decode,
    interpolate,
    interpolate_latents,
    interpolate_prior,
    interpolate_sentences,
    posterior_mode,
    prior_latents,
    prior_samples,
    reconstruct,
)
from pipeline.data import load_vocab, prepare_dataset
from pipeline.data.sentences import SentenceCorpus, evaluation_batches
from pipeline.tasks.vae_samples import (
    SAMPLES_HTML,
    SAMPLES_TEXT,
    ids_to_text,
    write_samples_report,
)

V = 30
BOS = 1
NEVER = -1  # an eos id no token has: decoding runs to max_length


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """Tiny models: one intra-op thread is many times faster than several contending for a busy CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def _model(latent: str = "gaussian", *, cell: str = "lstm", rounds: int = 0, architecture: str = "recurrent",
           vocab_size: int = V, seed: int = 0, **kw) -> SentenceVAE:
    """A tiny VAE with N(0, 0.5²) parameters (so that decodings vary with z and the prefix), in train mode."""
    torch.manual_seed(seed)
    cfg = VAEModelConfig(
        architecture=architecture, vocab_size=vocab_size, embedding_size=8, hidden_size=16, latent=latent,
        latent_size=4, num_latents=3, num_categories=5, categorical_embedding_size=4, decoder_cell=cell,
        encoder_cell=cell, mogrifier_rounds=rounds, unk_id=2, **kw,
    )
    model = SentenceVAE(cfg).double()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.5)
    return model.train()


def _sentences(model: SentenceVAE, n: int, seed: int = 0) -> torch.Tensor:
    return prior_latents(model, n, torch.Generator().manual_seed(seed))


RECURRENT = [
    pytest.param("gaussian", "lstm", 0, id="gaussian-lstm"),
    pytest.param("categorical", "gru", 2, id="categorical-gru-mogrifier"),
]


def _teacher_forced_logits(model: SentenceVAE, z: torch.Tensor, ids: list[int]) -> torch.Tensor:
    """The decoder's forward over ``<bos> + ids[:-1]`` for one latent ``z`` [...]: logits [T, V]."""
    inputs = torch.tensor([BOS, *ids[:-1]]).view(-1, 1)
    return model.decoder(inputs, z.view(1, 1, *z.shape))[:, 0, 0]


@pytest.mark.parametrize(("latent", "cell", "rounds"), RECURRENT)
def test_greedy_decoding_is_the_argmax_of_the_teacher_forced_decoder(latent, cell, rounds):
    model = _model(latent, cell=cell, rounds=rounds, word_dropout=0.5, state_dropout=0.3, output_dropout=0.3)
    z = _sentences(model, 4)
    tokens = decode(model, z, max_length=9, bos_id=BOS, eos_id=NEVER)
    assert model.training  # decode restores the mode it found (and ran in eval mode: no dropout)
    model.eval()
    assert [len(row) for row in tokens] == [9] * 4
    assert len({tuple(row) for row in tokens}) > 1  # the latent matters
    with torch.no_grad():
        for b, ids in enumerate(tokens):
            assert _teacher_forced_logits(model, z[b], ids).argmax(-1).tolist() == ids
        # The same, by scoring every candidate next token with the decoder's log-likelihood.
        ids, t = tokens[0], 5
        candidates = torch.tensor([[*ids[:t], w] for w in range(V)]).t()  # [t + 1, V]
        inputs = torch.cat([torch.full((1, V), BOS), candidates[:-1]])
        mask = torch.ones_like(candidates, dtype=torch.bool)
        scores = model.decoder.log_likelihood(inputs, candidates, mask, z[:1].unsqueeze(1).expand(1, V, *z.shape[1:]))
        assert int(scores[0].argmax()) == ids[t]


@pytest.mark.parametrize(("latent", "cell", "rounds"), RECURRENT)
def test_decoding_stops_at_eos_and_respects_max_length(latent, cell, rounds):
    model = _model(latent, cell=cell, rounds=rounds)
    z = _sentences(model, 5, seed=1)
    full = decode(model, z, max_length=12, bos_id=BOS, eos_id=NEVER)
    eos = full[0][3]  # a token the first sentence emits at step 3: make it <eos>
    stopped = decode(model, z, max_length=12, bos_id=BOS, eos_id=eos)
    for row, whole in zip(stopped, full):
        expected = whole[: whole.index(eos) + 1] if eos in whole else whole
        assert row == expected  # cut after the first <eos>, which is kept; the others run on
    assert len(stopped[0]) <= 4 and stopped[0][-1] == eos
    assert [len(r) for r in decode(model, z, max_length=1, bos_id=BOS, eos_id=NEVER)] == [1] * 5
    with pytest.raises(ValueError, match="max_length"):
        decode(model, z, max_length=0, bos_id=BOS, eos_id=eos)


@pytest.mark.parametrize(("latent", "cell", "rounds"), RECURRENT)
def test_sampled_decoding_is_reproducible_and_greedy_when_cold(latent, cell, rounds):
    model = _model(latent, cell=cell, rounds=rounds)
    z = _sentences(model, 6, seed=2)

    def sample(seed: int, temperature: float = 1.0) -> list[list[int]]:
        return decode(model, z, max_length=10, bos_id=BOS, eos_id=NEVER, greedy=False,
                      generator=torch.Generator().manual_seed(seed), temperature=temperature)

    assert sample(3) == sample(3)
    assert sample(3) != sample(4)
    assert sample(3, temperature=1e-4) == decode(model, z, max_length=10, bos_id=BOS, eos_id=NEVER)
    with pytest.raises(ValueError, match="temperature"):
        sample(3, temperature=0.0)


def test_gaussian_interpolation_is_linear_with_exact_endpoints():
    gen = torch.Generator().manual_seed(0)
    z_a, z_b = torch.randn(2, 4, generator=gen, dtype=torch.float64)
    path = interpolate(z_a, z_b, 5)
    assert path.shape == (5, 4)
    assert torch.equal(path[0], z_a) and torch.equal(path[-1], z_b)
    for i in range(5):
        torch.testing.assert_close(path[i], z_a + (i / 4) * (z_b - z_a))
    with pytest.raises(ValueError, match="steps"):
        interpolate(z_a, z_b, 1)


def test_categorical_interpolation_switches_codes_from_a_to_b():
    z_a, z_b = torch.tensor([0, 1, 2, 3, 4]), torch.tensor([4, 1, 0, 0, 2])  # 4 of 5 latents differ
    path = interpolate(z_a, z_b, 5)
    assert path.dtype == torch.long and path.shape == (5, 5)
    assert torch.equal(path[0], z_a) and torch.equal(path[-1], z_b)
    for i, row in enumerate(path):
        assert bool(((row == z_a) | (row == z_b)).all())
        assert int((row != z_a).sum()) == i  # one more latent switched per step
    coarse = interpolate(z_a, z_b, 3)
    assert [int((row != z_a).sum()) for row in coarse] == [0, 2, 4]


def _batch(model_vocab: int, lengths: list[int], seed: int = 0):
    from pipeline.data.sentences import SentenceBatch

    gen = torch.Generator().manual_seed(seed)
    T = max(lengths)
    mask = torch.arange(T).unsqueeze(1) < torch.tensor(lengths).unsqueeze(0)
    targets = torch.randint(3, model_vocab, (T, len(lengths)), generator=gen).masked_fill(~mask, 0)
    inputs = torch.cat([torch.full((1, len(lengths)), BOS), targets[:-1]]).masked_fill(~mask, 0)
    return SentenceBatch(inputs=inputs, targets=targets, mask=mask, lengths=torch.tensor(lengths))


@pytest.mark.parametrize(("latent", "cell", "rounds"), RECURRENT)
def test_reconstructions_and_sentence_interpolation(latent, cell, rounds):
    model = _model(latent, cell=cell, rounds=rounds)
    batch = _batch(V, [5, 3, 7, 2])
    mode = posterior_mode(model, batch)
    params = model.eval().encoder(batch.targets, batch.lengths).detach()
    if latent == "categorical":
        expected = model.latent.log_probs(params).argmax(-1)
    else:
        expected = model.latent.posterior_mean(params)
    assert torch.equal(mode, expected)
    opts = {"max_length": 8, "bos_id": BOS, "eos_id": NEVER}
    rec = reconstruct(model, batch, generator=torch.Generator().manual_seed(5), **opts)
    assert rec.inputs == [batch.targets[:n, b].tolist() for b, n in enumerate([5, 3, 7, 2])]
    assert rec.greedy == decode(model, mode, **opts)
    again = reconstruct(model, batch, generator=torch.Generator().manual_seed(5), **opts)
    assert again.sampled == rec.sampled and torch.equal(again.z_sampled, rec.z_sampled)
    assert not torch.equal(rec.z_sampled, rec.z_mode)

    path = interpolate_sentences(model, batch, 0, 2, 4, **opts)
    assert path.t == [0.0, 1 / 3, 2 / 3, 1.0]
    assert torch.equal(path.z[0], mode[0]) and torch.equal(path.z[-1], mode[2])
    assert path.tokens[0] == rec.greedy[0] and path.tokens[-1] == rec.greedy[2]


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_prior_samples_and_prior_interpolation_are_deterministic(latent):
    model = _model(latent)
    opts = {"max_length": 6, "bos_id": BOS, "eos_id": NEVER}
    one = prior_samples(model, 3, torch.Generator().manual_seed(7), **opts)
    two = prior_samples(model, 3, torch.Generator().manual_seed(7), **opts)
    assert torch.equal(one.z, two.z) and one.greedy == two.greedy and one.sampled == two.sampled
    assert one.z.shape == ((3, 4) if latent == "gaussian" else (3, 3))
    assert one.greedy == decode(model, one.z, **opts)
    path = interpolate_prior(model, 5, torch.Generator().manual_seed(8), **opts)
    z_ends = prior_latents(model, 2, torch.Generator().manual_seed(8))
    assert torch.equal(path.z[0], z_ends[0]) and torch.equal(path.z[-1], z_ends[1])
    assert len(path.tokens) == 5 and all(len(row) == 6 for row in path.tokens)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_decoding_on_the_gpu_matches_the_cpu():
    model = _model("gaussian")
    z = _sentences(model, 4)
    opts = {"max_length": 8, "bos_id": BOS, "eos_id": NEVER}
    cpu = decode(model, z, **opts), decode(model, z, greedy=False, generator=torch.Generator().manual_seed(1), **opts)
    model.cuda()
    gpu = decode(model, z, **opts), decode(model, z, greedy=False, generator=torch.Generator().manual_seed(1), **opts)
    assert gpu == cpu


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_mlp_decoder_returns_one_symbol(latent):
    vocab = [str(i) for i in range(10)] + ["<eos>"]
    model = _model(latent, architecture="mlp", vocab_size=len(vocab))
    z = _sentences(model, 5)
    opts = {"max_length": 4, "bos_id": 10, "eos_id": 10}
    greedy = decode(model, z, **opts)
    with torch.no_grad():
        expected = model.eval().decoder(z.unsqueeze(0))[0].argmax(-1).tolist()
    assert greedy == [[s] for s in expected]
    cold = decode(model, z, greedy=False, generator=torch.Generator().manual_seed(0), temperature=1e-4, **opts)
    assert cold == greedy
    batch = _batch(10, [1, 1, 1])
    rec = reconstruct(model, batch, generator=torch.Generator().manual_seed(0), **opts)
    assert rec.inputs == [[int(batch.targets[0, b])] for b in range(3)] and all(len(r) == 1 for r in rec.sampled)
    assert rec.greedy == decode(model, posterior_mode(model, batch), **opts)


def _has_vq() -> bool:
    try:
        VAEModelConfig(latent="vq")
    except ValueError:
        return False
    return True


@pytest.mark.skipif(not _has_vq(), reason="this tree has no VQ latent")
def test_vq_latents_decode_reconstruct_and_interpolate_by_codes(tmp_path):
    model = _model("vq")
    latent, ne = model.latent, 3 * 4
    batch = _batch(V, [4, 6, 2])
    mode = posterior_mode(model, batch)
    params = model.eval().encoder(batch.targets, batch.lengths).detach()
    assert torch.equal(mode, latent.sample(params, 1)[0]) and mode.shape == (3, ne + 3)
    prior = prior_latents(model, 4, torch.Generator().manual_seed(0))
    assert torch.equal(prior[:, :ne], latent.code_vectors(latent.codes_of(prior)).flatten(-2))
    path = interpolate_latents(model, prior[0], prior[1], 5)
    assert torch.equal(path[0], prior[0]) and torch.equal(path[-1], prior[1])
    codes = latent.codes_of(path)
    torch.testing.assert_close(path[:, :ne], latent.code_vectors(codes).flatten(-2), rtol=0, atol=0)
    assert torch.equal(codes, interpolate(codes[0], codes[-1], 5))
    tokens = decode(model, prior, max_length=7, bos_id=BOS, eos_id=NEVER)
    with torch.no_grad():
        for b, ids in enumerate(tokens):
            assert _teacher_forced_logits(model, prior[b], ids).argmax(-1).tolist() == ids
    rec = reconstruct(model, batch, generator=torch.Generator().manual_seed(0), max_length=7, bos_id=BOS, eos_id=NEVER)
    assert torch.equal(rec.z_sampled, rec.z_mode)  # a point mass
    vocab = [f"w{i}" for i in range(V)]
    vocab[1] = "<eos>"
    assert all(p.is_file() for p in write_samples_report(model, [batch], vocab, tmp_path, num_prior=2,
                                                         num_reconstructions=3, interpolation_steps=3))


# ---------------------------------------------------------------- the report

SENTENCES = ["the cat a<b sat", "x&y saw the dog", "the dog sat on the mat", "a cat saw a dog", "on the mat"]


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory) -> Path:
    source = tmp_path_factory.mktemp("sentences_src")
    text = "\n".join(SENTENCES) + "\n"
    for split in ("train", "valid", "test"):
        (source / f"{split}.txt").write_text(text, encoding="utf-8")
    out = tmp_path_factory.mktemp("sentences") / "data"
    prepare_dataset("sentences", str(source), out, progress=False)
    return out


def test_ids_to_text_stops_at_eos_and_drops_bos_and_pad():
    vocab = ["the", "<eos>", "<bos>", "<pad>", "cat"]
    assert ids_to_text([2, 0, 3, 4, 1, 4], vocab) == "the cat"
    assert ids_to_text([0, 0], vocab) == "the the"  # id 0 is a word, not padding


@pytest.mark.parametrize("latent", ["gaussian", "categorical"])
def test_samples_report_files(corpus_dir, tmp_path, latent):
    vocab = load_vocab(corpus_dir)
    corpus = SentenceCorpus(corpus_dir, "valid")
    model = _model(latent, vocab_size=len(vocab))
    opts = {"num_prior": 3, "num_reconstructions": 4, "interpolation_steps": 5, "seed": 11, "max_length": 8}
    paths = write_samples_report(model, corpus, vocab, tmp_path / "a", **opts)
    assert [p.name for p in paths] == [SAMPLES_TEXT, SAMPLES_HTML] and all(p.is_file() for p in paths)
    text, page = (p.read_text(encoding="utf-8") for p in paths)
    for sentence in SENTENCES[:4]:
        assert sentence in text and html.escape(sentence) in page
    assert "a&lt;b" in page and "a<b" not in page and "x&amp;y" in page
    assert page.startswith("<!DOCTYPE html>") and page.count("<table>") == 4
    for title in ("prior", "Reconstructions", "two sentences", "two prior samples"):
        assert title in text and title in page
    rows = [line for line in text.splitlines() if line.startswith(("A ", "B "))]
    assert rows[0].endswith(SENTENCES[0]) and rows[1].endswith(SENTENCES[3])  # first row = A, last = B
    again = write_samples_report(model, corpus, vocab, tmp_path / "b", **opts)
    assert [p.read_text(encoding="utf-8") for p in again] == [text, page]  # deterministic given the seed
    batches = evaluation_batches(corpus, 2)
    from_batches = write_samples_report(model, batches, vocab, tmp_path / "c", **opts)[0].read_text(encoding="utf-8")
    assert "on the mat" in from_batches  # the shortest sentence comes first in evaluation batches


def test_samples_report_of_the_mlp_model(tmp_path):
    vocab = [str(i) for i in range(10)] + ["<eos>"]
    model = _model("categorical", architecture="mlp", vocab_size=len(vocab))
    batches = [_batch(10, [1, 1, 1, 1])]
    text_path, html_path = write_samples_report(model, batches, vocab, tmp_path, num_prior=2, num_reconstructions=3,
                                                interpolation_steps=3, seed=0, max_length=5)
    text = text_path.read_text(encoding="utf-8")
    assert "Reconstructions" in text and html_path.is_file()
