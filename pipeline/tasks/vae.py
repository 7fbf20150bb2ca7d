"""The sentence-VAE task (``task: vae``): one latent per sentence, trained by the shared loop.

Per optimizer step this rank reads its share of a length-bucketed global batch of sentences
(:class:`~pipeline.data.sentences.SentenceBatcher`); each micro-batch draws ``K`` latent samples per
sentence (``[K, B, ...]``, one decoder pass over all ``K*B`` sequences) and the configured estimator
(:func:`models.vae.estimators.estimate`) turns them into a decoder surrogate and an encoder surrogate;
one backward of their sum gives each side its gradient. The KL term's weight (β x annealing x soft
free bits γ, zero while the encoder is pretrained as an autoencoder) comes from
:class:`models.vae.remedies.KLSchedule`, whose state is checkpointed with the progress: exact resume.
At the end of encoder pretraining the decoder is re-initialised (Li et al. 2019) and the trainer
restarts the optimizer state and the weight averages.

The validation loss 2TA compares is the importance-sampled NLL in nats per token
(``vae.evaluate.training_samples`` samples) on this rank's share of the first
``vae.evaluate.training_sentences`` validation sentences. The final evaluation
(:func:`evaluate_final_vae`) reports, on valid and test, the importance-sampled NLL and perplexity,
ELBO, reconstruction and KL, mutual information and active units
(:mod:`pipeline.tasks.vae_evaluation`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from models.vae import SentenceVAE, VAEModelConfig
from models.vae.estimators import estimate
from models.vae.remedies import KLSchedule
from pipeline.config import ConfigError, PipelineConfig
from pipeline.data import DatasetManifest
from pipeline.data.prepare import load_vocab
from pipeline.data.sentences import SentenceBatch, SentenceBatcher, SentenceCorpus, evaluation_batches
from pipeline.distributed import DistContext, all_reduce_sum
from pipeline.plots.latents import plot_latent_means
from pipeline.tasks.base import MicroBatchLoss
from pipeline.tasks.vae_samples import write_samples_report
from pipeline.tasks.vae_evaluation import VAEEvaluation, evaluate_vae, importance_sampled_log_likelihood

LATENT_PLOT_FILE = "latent_map.png"
_SEED_STRIDE = 1_000_000_007  # seed -> noise seed of step s: seed * stride + s
_VALID_NOISE_OFFSET = _SEED_STRIDE - 1  # the validation noise's seed (no training step reaches it)
_FINAL_SEED_OFFSET = {"valid": _SEED_STRIDE - 2, "test": _SEED_STRIDE - 3}  # the final evaluation's seeds


def _noise_seed(seed: int, offset: int) -> int:
    """The seed of one stream of latent noise: training step ``offset``, or one of the evaluations' offsets."""
    return (seed * _SEED_STRIDE + offset) % 2**63

__all__ = ["LATENT_PLOT_FILE", "SentenceVAETask", "posterior_means", "VAEFinalResult", "check_vae_evaluation_sizes", "evaluate_final_vae", "vae_model_config"]


def _corpus(config: PipelineConfig, split: str) -> SentenceCorpus:
    data = config.vae.data
    return SentenceCorpus(config.data_dir, split, max_length=data.max_length, include_eos=data.include_eos)


def vae_model_config(config: PipelineConfig, manifest: DatasetManifest, corpus: SentenceCorpus) -> VAEModelConfig:
    """``vae.model`` with the vocabulary size and the ``<unk>`` id taken from the prepared data."""
    model = config.vae.model
    if model.vocab_size not in (None, manifest.vocab_size):
        raise ConfigError(f"vae.model.vocab_size is {model.vocab_size} but dataset {manifest.name} has "
                          f"{manifest.vocab_size} symbols: remove vae.model.vocab_size (it is filled in from the data)")
    if model.word_dropout > 0 and corpus.unk_id is None:
        raise ConfigError(f"vae.model.word_dropout needs an <unk> token, and dataset {manifest.name} has none: set "
                          "vae.model.word_dropout to 0")
    return model.model_copy(update={"vocab_size": manifest.vocab_size, "unk_id": corpus.unk_id})


def _rows(batch: SentenceBatch, rows: slice, device: torch.device) -> SentenceBatch:
    """Rows ``rows`` of ``batch`` on ``device``, trimmed to their longest sentence."""
    lengths = batch.lengths[rows]
    steps = int(lengths.max()) if lengths.numel() else 0
    labels = None if batch.labels is None else batch.labels[rows]
    return SentenceBatch(
        inputs=batch.inputs[:steps, rows].to(device), targets=batch.targets[:steps, rows].to(device),
        mask=batch.mask[:steps, rows].to(device), lengths=lengths.to(device), labels=labels,
        indices=None if batch.indices is None else batch.indices[rows],
    )


class SentenceVAETask:
    """:class:`~pipeline.tasks.base.TrainingTask` of the sentence VAEs (``task: vae``)."""

    name = "vae"

    def __init__(self, config: PipelineConfig, manifest: DatasetManifest, ctx: DistContext) -> None:
        self.config = config
        self.vae_cfg = vae = config.vae
        self.ctx = ctx
        self.device = ctx.device
        self.unit = manifest.unit
        train_corpus = _corpus(config, "train")
        self._model_config = vae_model_config(config, manifest, train_corpus)
        self.batcher = SentenceBatcher(train_corpus, config.train.batch_size, rank=ctx.rank, world_size=ctx.world_size,
                                       seed=config.train.seed)
        per_rank = max(1, config.train.eval_batch_size // ctx.world_size)
        valid = _corpus(config, "valid")
        self._valid_sentences = min(len(valid), vae.evaluate.training_sentences or len(valid))
        self.valid_batches = list(evaluation_batches(
            valid, per_rank, rank=ctx.rank, world_size=ctx.world_size, max_sentences=self._valid_sentences,
        ))
        self._valid_noise: torch.Tensor | None = None
        self.schedule = KLSchedule(vae.annealing, vae.soft_free_bits, vae.pretraining)
        self._step = 0
        self._period_kl, self._period_steps = 0.0, 0  # training KL over the evaluation period (soft free bits)
        self._step_kl: list[float] = []
        self._samples = vae.objective.num_samples  # K = max(samples, kl_samples)
        self._noise = torch.empty(0)
        self._rows_before = 0

    @property
    def model_config(self) -> VAEModelConfig:
        return self._model_config

    def build_model(self) -> nn.Module:
        return SentenceVAE(self._model_config)

    # ---------------------------------------------------------------- data
    def next_batch(self) -> SentenceBatch:
        return self.batcher.next_batch()

    @property
    def epoch(self) -> int:
        return self.batcher.epoch

    def batch_tokens(self, batch: SentenceBatch) -> int:
        return int(batch.lengths.sum())

    # ---------------------------------------------------------------- one step
    def before_step(self, step: int, model: nn.Module) -> bool:
        self._step = step
        if self.schedule.reset_due(step):
            model.reset_decoder(seed=self.config.train.seed + 7919 * (step + 1))  # the same new decoder on every rank
            return True
        return False

    def begin_step(self, batch: SentenceBatch, model: nn.Module, micro_batches: int, micro_batch: int) -> None:
        self._step_kl = []
        # The latent noise of the whole global batch, from (seed, step): a sentence gets the same latent
        # samples whichever rank scores it, so a DDP run samples what a single process would.
        generator = torch.Generator().manual_seed(_noise_seed(self.config.train.seed, self._step))
        self._noise = model.latent.draw_noise(self._samples, self.config.train.batch_size, generator)
        self._rows_before = self.ctx.rank * micro_batches * micro_batch  # this rank's first global row

    def micro_batch_loss(self, forward_module: nn.Module, batch: SentenceBatch, index: int,
                         micro_batch: int) -> MicroBatchLoss:
        rows = slice(index * micro_batch, (index + 1) * micro_batch)
        part = _rows(batch, rows, self.device)
        first = self._rows_before + rows.start
        noise = self._noise[:, first : first + part.lengths.numel()]
        terms = forward_module(part.inputs, part.targets, part.mask, part.lengths, self._samples, noise)
        kl_weight = self.schedule.weight(self._step)
        result = estimate(terms, self.vae_cfg.objective, kl_weight_scale=kl_weight)
        sentences = part.lengths.numel()
        tokens = part.lengths.sum().clamp_min(1)
        value = -(result.objective.detach() * sentences / tokens).float()  # nats per token
        metrics = {name: metric.detach() for name, metric in result.metrics.items()}
        metrics["kl_weight"] = torch.tensor(kl_weight)
        if "kl_analytic" in metrics:
            self._step_kl.append(float(metrics["kl_analytic"]))
        return MicroBatchLoss(objective=result.decoder_loss + result.encoder_loss, value=value, metrics=metrics,
                              weight=float(tokens))

    def accept_step(self) -> None:
        if self._step_kl:
            self._period_kl += sum(self._step_kl) / len(self._step_kl)
            self._period_steps += 1

    # ---------------------------------------------------------------- evaluation during training
    def validation_loss(self, model: nn.Module) -> tuple[float, float]:
        """Importance-sampled NLL (eval mode, no gradients: see importance_sampled_log_likelihood)."""
        ev = self.vae_cfg.evaluate
        valid_noise = self._validation_noise(model)
        nll, tokens = 0.0, 0.0
        for batch in self.valid_batches:
            noise = valid_noise[:, batch.indices]
            log_px = importance_sampled_log_likelihood(model, batch, ev.training_samples, ev.chunk_size, noise)
            nll -= float(log_px.sum())
            tokens += float(batch.lengths.sum())
        return nll, tokens

    def _validation_noise(self, model: nn.Module) -> torch.Tensor:
        if self._valid_noise is None:
            # The same noise every evaluation, per sentence: the three weights 2TA compares (raw, short, long)
            # see the same samples, and a sentence's samples do not depend on which rank scores it.
            generator = torch.Generator().manual_seed(_noise_seed(self.config.train.seed, _VALID_NOISE_OFFSET))
            self._valid_noise = model.latent.draw_noise(self.vae_cfg.evaluate.training_samples, self._valid_sentences,
                                                        generator)
        return self._valid_noise

    def after_evaluation(self, step: int, model: nn.Module) -> dict[str, float]:
        """The curves over training, on the reported weights and the validation sentences 2TA scores (all
        ranks' shards): KL per token, mutual information, active units (``vae/*``). Soft free bits: γ adapts
        once per evaluation period to the mean training KL of the period."""
        ev = self.vae_cfg.evaluate
        evaluation = evaluate_vae(model, self.valid_batches, num_samples=ev.training_samples,
                                  chunk_size=ev.chunk_size, noise=self._validation_noise(model))
        sums = all_reduce_sum(self.ctx, evaluation.sums().tolist())
        totals = VAEEvaluation.from_sums(torch.tensor(sums, dtype=torch.float64), num_samples=ev.training_samples)
        figures = {f"vae/{k}": v for k, v in totals.metrics().items()
                   if k in ("kl_per_token", "mutual_information", "active_units", "elbo_per_token")}
        if self._period_steps:
            kl = self._period_kl / self._period_steps
            figures["vae/period_kl"] = kl
            gamma = self.schedule.end_of_period(kl, step)
            if gamma is not None:
                figures["vae/soft_free_bits_gamma"] = gamma
        self._period_kl, self._period_steps = 0.0, 0
        return figures

    # ---------------------------------------------------------------- resumable state
    def batches_state(self) -> dict[str, Any]:
        return self.batcher.state_dict()

    def load_batches_state(self, state: dict[str, Any]) -> None:
        self.batcher.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {"schedule": self.schedule.state_dict(), "period_kl": self._period_kl,
                "period_steps": self._period_steps}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.schedule.load_state_dict(state["schedule"])
        self._period_kl, self._period_steps = float(state["period_kl"]), int(state["period_steps"])

    def per_rank_state(self) -> dict[str, Any]:
        return {}

    def load_per_rank_state(self, state: dict[str, Any], device: torch.device) -> None:
        pass


# ---------------------------------------------------------------------------------------- final evaluation


@dataclass
class VAEFinalResult:
    """The final evaluation of a sentence VAE on valid and test (see :func:`evaluate_final_vae`)."""

    unit: str
    valid: dict[str, float] = field(default_factory=dict)
    test: dict[str, float] = field(default_factory=dict)
    artifacts: list[str] = field(default_factory=list)  # files to log with the results (the latent plot)

    def metrics(self) -> dict[str, float]:
        """``valid_<name>`` and ``test_<name>``: nll (per token, importance-sampled), ppl (exp of it), elbo,
        reconstruction, kl, mutual_information, active_units, ..."""
        return {**{f"valid_{k}": v for k, v in self.valid.items()}, **{f"test_{k}": v for k, v in self.test.items()}}


def evaluate_final_vae(model: nn.Module, config: PipelineConfig, manifest: DatasetManifest) -> VAEFinalResult:
    """Score valid (``vae.evaluate.valid_samples`` importance samples) and test (``test_samples``)."""
    ev = config.vae.evaluate
    result = VAEFinalResult(unit=manifest.unit)
    corpora = {split: _corpus(config, split) for split in ("valid", "test")}
    for split, samples in (("valid", ev.valid_samples), ("test", ev.test_samples)):
        batches = evaluation_batches(corpora[split], ev.batch_size, max_sentences=ev.max_sentences)
        # The latent samples from a seeded generator (the global one, forked): scoring the same model again,
        # in this process or another, gives the same figures whatever ran before.
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_noise_seed(config.train.seed, _FINAL_SEED_OFFSET[split]))
            evaluation = evaluate_vae(model, batches, num_samples=samples, chunk_size=ev.chunk_size)
        metrics = evaluation.metrics()
        setattr(result, split, {k: float(v) for k, v in metrics.items() if math.isfinite(float(v))})
    valid = corpora["valid"]
    if ev.latent_map_points:  # where the sentences land in latent space (by label, for a labelled corpus)
        path = config.run_dir / "plots" / LATENT_PLOT_FILE
        means, labels = posterior_means(model, evaluation_batches(valid, ev.batch_size, max_sentences=ev.max_sentences))
        what = "by label" if valid.labels is not None else "(unlabelled corpus)"
        plot_latent_means(means, labels, path, title=f"{config.name}: validation posterior means {what}",
                          seed=config.train.seed, max_points=ev.latent_map_points)
        result.artifacts.append(str(path))
    if ev.report_sentences:  # what the latents do: samples, reconstructions, interpolations
        paths = write_samples_report(
            model, valid, load_vocab(config.data_dir), config.run_dir / "samples", num_prior=ev.report_sentences,
            num_reconstructions=ev.report_sentences, seed=config.train.seed, max_length=config.vae.data.max_length or 50)
        result.artifacts += [str(p) for p in paths]
    return result


@torch.no_grad()
def posterior_means(model: nn.Module, batches: Iterable[SentenceBatch]) -> tuple[np.ndarray, list[str]]:
    """``E_q[z|x]`` of every sentence of ``batches`` ([N, D]; categorical: flattened probabilities) and the
    sentences' labels."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    means, labels = [], []
    try:
        for batch in batches:
            params = model.encoder(batch.targets.to(device), batch.lengths.to(device))
            means.append(model.latent.posterior_mean(params).reshape(params.shape[0], -1).double().cpu().numpy())
            labels.extend(batch.labels or [""] * params.shape[0])
    finally:
        model.train(was_training)
    return np.concatenate(means) if means else np.zeros((0, 0)), labels


def check_vae_evaluation_sizes(config: PipelineConfig, manifest: DatasetManifest) -> None:
    """The evaluation needs sentences in valid and test."""
    for split in ("valid", "test"):
        if split not in manifest.splits or manifest.splits[split].num_tokens < 2:
            raise ConfigError(f"dataset {manifest.name} has no {split} sentences to evaluate the VAE on")
