"""Importance-sampled NLL of a sentence VAE: batched evaluation against one sentence at a time.

Run as ``python benchmarks/vae_nll.py [--sentences 48 --samples 500 --batch-size 16 --chunk-size 50
--reference-chunk 100 --device cpu --threads N --ptb-zip ../shared/data/ptb/ptb.zip]``.

Both score the same sentences with ``K = --samples`` importance samples (``ln p̂(x) = logsumexp_k ℓ_k - ln K``)
on the same untrained model (``VAEModelConfig``: hidden and embedding 128, 40 Gaussian latents, LSTM
encoder and decoder, PTB vocabulary), in eval mode under ``torch.no_grad``:

* batched: :func:`pipeline.tasks.vae_evaluation.importance_sampled_log_likelihood` on length-sorted
  batches of ``--batch-size`` sentences, ``--chunk-size`` samples per decoder pass (chunk x batch
  sequences at once), the encoder run once per batch;
* one sentence at a time, the way jxhe/vae-lagging-encoder's ``calc_iwnll`` / ``VAE.nll_iw`` evaluate:
  batch size 1, a Python loop over the K samples in mini-chunks of ``--reference-chunk`` (their default
  ``ns=100``), each chunk re-running the encoder and sampling (here ``SentenceVAE.sample_terms``), the
  chunks' log weights concatenated and log-sum-exp'd at the end.

Sentences: the first ``--sentences`` of PTB's validation set (words + ``<eos>``), prepared from
``--ptb-zip`` into a temporary folder by the pipeline (``ptb_word``) and read by
:class:`~pipeline.data.sentences.SentenceCorpus` / :func:`~pipeline.data.sentences.evaluation_batches`;
when the archive does not exist, a ``sentences`` corpus of random words with PTB-like lengths.

Both methods get the same sampling noise per sentence (``latent.draw_noise``, passed as ``noise``), so
they estimate ``ln p̂(x)`` from the same ``K`` latent samples and must agree per sentence within
``--tolerance`` (float rounding only; with independent samples they would differ by the Monte Carlo
error, several nats per sentence for an untrained model). The two are timed round-robin, batch by batch
(each batch of the batched method, then the same sentences one at a time), so that load changes on a
shared machine hit both alike. Prints sentences/s of each, their ratio (target >= 10x, issue 11) and the
NLLs. This is a report: the exit code is 1 only when the NLLs disagree.

On CPU both methods are bound by the same arithmetic (the decoder's vocabulary projection and log-softmax,
about 2 x hidden x vocab flops per token and sample, the same in both), so batching cannot buy much there;
the gap the target is about is per-call overhead, which dominates one-sentence evaluation on a GPU.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from models.vae import SentenceVAE, VAEModelConfig  # noqa: E402
from pipeline.data.sentences import SentenceBatch, SentenceCorpus, evaluation_batches  # noqa: E402
from pipeline.tasks.vae_evaluation import importance_sampled_log_likelihood  # noqa: E402

DEFAULT_PTB = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb" / "ptb.zip"


def _prepare_corpus(ptb_zip: Path, folder: Path, *, vocab_size: int, sentences: int, seed: int) -> tuple[str, Path]:
    """Prepare PTB (``ptb_word``) from ``ptb_zip``, or, when it does not exist, a ``sentences`` corpus of random
    words with PTB-like lengths (mean about 22 words) and ``vocab_size`` words, into ``folder``."""
    from pipeline.data import prepare_dataset

    out = folder / "prepared"
    if ptb_zip.exists():
        prepare_dataset("ptb_word", str(ptb_zip), out, progress=False)
        return f"PTB valid ({ptb_zip.name})", out
    g = torch.Generator().manual_seed(seed)

    def lines(count: int) -> str:
        lengths = torch.distributions.Gamma(4.0, 4.0 / 22.0).sample((count,)).round().clamp(1, 82).long()
        return "".join(" ".join(f"w{int(i)}" for i in torch.randint(vocab_size, (int(n),), generator=g)) + "\n"
                       for n in lengths)

    source = folder / "source"
    source.mkdir()
    for split, count in (("train", 5 * vocab_size), ("valid", sentences), ("test", 1)):
        (source / f"{split}.txt").write_text(lines(count), encoding="utf-8")
    prepare_dataset("sentences", str(source), out, progress=False)
    return "random words, PTB-like lengths", out


def _to(batch: SentenceBatch, device: torch.device) -> SentenceBatch:
    return SentenceBatch(inputs=batch.inputs.to(device), targets=batch.targets.to(device),
                         mask=batch.mask.to(device), lengths=batch.lengths.to(device), labels=None,
                         indices=batch.indices)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@torch.no_grad()
def one_at_a_time_log_likelihood(model: SentenceVAE, batch: SentenceBatch, samples: int, chunk_size: int,
                                 noise: torch.Tensor) -> float:
    """``ln p̂(x)`` of a one-sentence ``batch`` (``noise`` [K, 1, ...]): a Python loop over mini-chunks of
    samples, every chunk re-running the encoder (``sample_terms``), as the lagging-encoder code does."""
    pieces = []
    for start in range(0, samples, chunk_size):
        count = min(chunk_size, samples - start)
        terms = model.sample_terms(batch.inputs, batch.targets, batch.mask, batch.lengths, count,
                                   noise[start:start + count])
        pieces.append(terms.log_px_z + terms.log_pz - terms.log_qz)  # [c, 1]
    log_w = torch.cat(pieces, dim=0).double()
    return float(torch.logsumexp(log_w[:, 0], dim=0)) - math.log(samples)


def _timed(fn, device: torch.device):
    """``fn()`` and its wall-clock seconds."""
    _sync(device)
    start = time.perf_counter()
    result = fn()
    _sync(device)
    return result, time.perf_counter() - start


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--sentences", type=int, default=48, help="sentences scored by both methods")
    parser.add_argument("--samples", type=int, default=500, help="importance samples K per sentence")
    parser.add_argument("--batch-size", type=int, default=16, help="sentences per batch (batched method)")
    parser.add_argument("--chunk-size", type=int, default=50,
                        help="samples per decoder pass (batched method); memory ~ T x batch x chunk x vocab floats")
    parser.add_argument("--reference-chunk", type=int, default=100,
                        help="samples per mini-chunk of the one-at-a-time method (lagging encoder: ns=100)")
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--embedding", type=int, default=128)
    parser.add_argument("--latent-size", type=int, default=40)
    parser.add_argument("--vocab-size", type=int, default=10000, help="random sentences only (PTB: its vocabulary)")
    parser.add_argument("--ptb-zip", type=Path, default=DEFAULT_PTB,
                        help="PTB archive (ptb/ptb.{train,valid}.txt); random sentences when it does not exist")
    parser.add_argument("--tolerance", type=float, default=1e-3,
                        help="max per-sentence |ln p̂(x) difference| in nats (same samples: float rounding only)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.threads is not None:
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda requested but CUDA is not available")
    device = torch.device(args.device)
    with tempfile.TemporaryDirectory(prefix="vae_nll_") as folder:
        source, data_dir = _prepare_corpus(args.ptb_zip, Path(folder), vocab_size=args.vocab_size,
                                           sentences=args.sentences, seed=args.seed)
        corpus = SentenceCorpus(data_dir, "valid")  # words + <eos>, as the VAE task scores them
    torch.manual_seed(args.seed)
    n = min(args.sentences, len(corpus))
    tokens = int(corpus.lengths[:n].sum())
    config = VAEModelConfig(vocab_size=corpus.vocab_size, hidden_size=args.hidden, embedding_size=args.embedding,
                            latent="gaussian", latent_size=args.latent_size)
    model = SentenceVAE(config).to(device).eval()
    print(f"device={device} threads={torch.get_num_threads()} torch={torch.__version__} sentences={n} "
          f"({source}, {tokens} tokens incl. <eos>, mean length {tokens / n:.1f}) vocab={corpus.vocab_size} "
          f"K={args.samples} hidden={args.hidden} embedding={args.embedding} latents={args.latent_size}")
    print(f"batched: batch {args.batch_size} sentences, {args.chunk_size} samples per decoder pass; "
          f"one at a time: batch 1, mini-chunks of {args.reference_chunk} samples")
    if device.type == "cpu" and hasattr(os, "getloadavg"):
        print(f"load average before run: {os.getloadavg()[0]:.2f} (cpu count {os.cpu_count()})")

    generator = torch.Generator().manual_seed(args.seed)
    noise = model.latent.draw_noise(args.samples, n, generator)  # [K, n, ...] CPU, one column per sentence
    model.eval()
    with torch.no_grad():  # warm-up (allocator, kernels), not timed
        warm = _to(corpus.batch([0]), device)
        importance_sampled_log_likelihood(model, warm, 2, 2, noise[:2, :1].to(device))
        one_at_a_time_log_likelihood(model, warm, 2, 2, noise[:2, :1].to(device))
    batched = torch.empty(n, dtype=torch.float64)
    single = torch.empty(n, dtype=torch.float64)
    batched_s = single_s = 0.0
    for batch in evaluation_batches(corpus, args.batch_size, max_sentences=n):
        rows = batch.indices
        log_px, seconds = _timed(lambda: importance_sampled_log_likelihood(
            model, _to(batch, device), args.samples, args.chunk_size, noise[:, rows].to(device)).cpu(), device)
        batched[rows], batched_s = log_px, batched_s + seconds
        for i in rows.tolist():
            value, seconds = _timed(lambda: one_at_a_time_log_likelihood(
                model, _to(corpus.batch([i]), device), args.samples, args.reference_chunk,
                noise[:, i:i + 1].to(device)), device)
            single[i], single_s = value, single_s + seconds

    nll_batched, nll_single = -float(batched.sum()) / tokens, -float(single.sum()) / tokens
    width = 16
    print(f"\n{'method':<{width}}{'seconds':>10}{'sentences/s':>14}{'NLL/token':>12}{'ppl':>10}")
    for name, sec, nll in (("batched", batched_s, nll_batched), ("one at a time", single_s, nll_single)):
        print(f"{name:<{width}}{sec:>10.2f}{n / sec:>14.2f}{nll:>12.4f}{math.exp(nll):>10.1f}")
    ratio = single_s / batched_s
    per_sentence = float((batched - single).abs().max())
    print(f"\nspeed-up (sentences/s, batched / one at a time): {ratio:.2f}x  "
          f"{'PASS' if ratio >= 10 else 'FAIL'} (target >= 10x)")
    print(f"same latent samples in both: max per-sentence |ln p̂(x) difference| {per_sentence:.2e} nats "
          f"(tolerance {args.tolerance:g}) {'PASS' if per_sentence <= args.tolerance else 'FAIL'}; "
          f"NLL/token difference {abs(nll_batched - nll_single):.2e}")
    return 0 if per_sentence <= args.tolerance else 1


if __name__ == "__main__":
    sys.exit(main())
