"""The language-model task: truncated BPTT over contiguous stripes with a carried hidden state.

Each rank reads its own contiguous block of batch stripes (:class:`~pipeline.data.BatchStream` with
``rank, world_size``), one window of ``train.bptt`` tokens per optimizer step. The micro-batch loss is
the multi-sample dropout objective (thesis §4.3) with ``train.dropout_samples`` samples; the hidden
state of every micro-batch is carried to the next window (reset at each epoch start) and checkpointed
per rank. The validation loss 2TA compares is the cross-entropy (nats/token) on this rank's share of
the first ``train.eval_tokens`` validation tokens.

AWD-LSTM options (Merity et al. 2017): ``train.ar_alpha`` / ``train.tar_beta`` add AR and TAR to the
objective (:func:`models.multi_sample_objective`; logged as ``train/ar`` and ``train/tar``, the terms as
added, while the step's reported loss stays the NLL); ``train.variable_bptt`` draws the window lengths
(:class:`~pipeline.data.batches.VariableBPTT`, seeded by ``train.seed``: the same on every rank, exact on
resume) and each window carries the learning-rate factor ``length / bptt`` the trainer applies.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
from torch import nn

from models import ModelConfig, RecurrentLM, detach_state, multi_sample_objective
from pipeline.config import PipelineConfig
from pipeline.data import Batch, BatchStream, DatasetManifest, load_tokens
from pipeline.data.batches import VariableBPTT
from pipeline.distributed import DistContext
from pipeline.sizes import check_training_sizes
from pipeline.tasks.base import MicroBatchLoss
from pipeline.tasks.lm_evaluation import evaluate_nll

__all__ = ["LanguageModelTask", "model_config_for"]


def model_config_for(config: PipelineConfig, manifest: DatasetManifest) -> ModelConfig:
    """The model config with the vocabulary size taken from the dataset manifest."""
    if config.model.vocab_size not in (None, manifest.vocab_size):
        raise ValueError(
            f"model.vocab_size is {config.model.vocab_size} but dataset {manifest.name} has {manifest.vocab_size} "
            "symbols: remove model.vocab_size from the config (it is filled in from the data)"
        )
    return config.model.model_copy(update={"vocab_size": manifest.vocab_size})


def _shard(tokens: np.ndarray, ctx: DistContext, limit: int | None) -> np.ndarray:
    """This rank's contiguous share of the (first ``limit``) validation tokens."""
    if limit is not None:
        tokens = tokens[: limit + 1]
    bounds = np.linspace(0, len(tokens), ctx.world_size + 1).astype(np.int64)
    return tokens[bounds[ctx.rank] : bounds[ctx.rank + 1]]


class LanguageModelTask:
    """:class:`~pipeline.tasks.base.TrainingTask` of the recurrent language models (``task: lm``)."""

    name = "lm"

    def __init__(self, config: PipelineConfig, manifest: DatasetManifest, ctx: DistContext) -> None:
        check_training_sizes(config, manifest, ctx.world_size)
        self.config = config
        self.train_cfg = config.train
        self.manifest = manifest
        self.ctx = ctx
        self.device = ctx.device
        self.unit = manifest.unit
        self._model_config = model_config_for(config, manifest)
        cfg = config.train
        variable = (
            VariableBPTT(seed=cfg.seed, std=cfg.variable_bptt_std, min_length=cfg.variable_bptt_min)
            if cfg.variable_bptt else None
        )
        self.stream = BatchStream(
            load_tokens(config.data_dir, "train"), cfg.batch_size, cfg.bptt, rank=ctx.rank, world_size=ctx.world_size,
            variable=variable,
        )
        self.valid_shard = _shard(load_tokens(config.data_dir, "valid"), ctx, cfg.eval_tokens)
        self.states: list | None = None  # carried hidden state per micro-batch, rows = D * micro_batch
        self._new_states: list = []

    @property
    def model_config(self) -> ModelConfig:
        return self._model_config

    def build_model(self) -> nn.Module:
        return RecurrentLM(self._model_config)

    # ---------------------------------------------------------------- data
    def next_batch(self) -> Batch:
        return self.stream.next_batch()

    @property
    def epoch(self) -> int:
        return self.stream.epoch

    def batch_tokens(self, batch: Batch) -> int:
        return batch.targets.numel()

    # ---------------------------------------------------------------- one step
    def before_step(self, step: int, model: nn.Module) -> bool:
        return False

    def begin_step(self, batch: Batch, model: nn.Module, micro_batches: int, micro_batch: int) -> None:
        if self.states is None or batch.reset_state:
            samples = self.train_cfg.dropout_samples
            self.states = [model.initial_state(micro_batch * samples, device=self.device) for _ in range(micro_batches)]
        self._new_states = []

    def micro_batch_loss(self, forward_module: nn.Module, batch: Batch, index: int, micro_batch: int) -> MicroBatchLoss:
        cols = slice(index * micro_batch, (index + 1) * micro_batch)
        inputs = batch.inputs[:, cols].to(self.device)
        targets = batch.targets[:, cols].to(self.device)
        assert self.states is not None
        cfg = self.train_cfg
        result = multi_sample_objective(
            forward_module, inputs, targets, self.states[index], cfg.dropout_samples,
            ar_alpha=cfg.ar_alpha, tar_beta=cfg.tar_beta,
        )
        self._new_states.append(detach_state(result.state))
        metrics = {name: term.detach().float() for name, term in (("ar", result.ar), ("tar", result.tar))
                   if term is not None}
        return MicroBatchLoss(objective=result.loss, value=result.nll.detach().float(), metrics=metrics)

    def accept_step(self) -> None:
        self.states = self._new_states

    # ---------------------------------------------------------------- evaluation during training
    def validation_loss(self, model: nn.Module) -> tuple[float, float]:
        nll, count = 0.0, 0
        if len(self.valid_shard) > 1:
            (nll,), count = evaluate_nll(
                model, self.valid_shard, batch_size=max(1, self.train_cfg.eval_batch_size // self.ctx.world_size),
                bptt=self.config.evaluate.bptt,
            )
        return nll * count, float(count)

    def after_evaluation(self, step: int, model: nn.Module) -> dict[str, float]:
        return {}

    # ---------------------------------------------------------------- resumable state
    def batches_state(self) -> dict[str, Any]:
        return self.stream.state_dict()

    def load_batches_state(self, state: dict[str, Any]) -> None:
        self.stream.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        pass

    def per_rank_state(self) -> dict[str, Any]:
        hidden = None
        if self.states is not None:
            hidden = [[t.detach().cpu().clone() for pair in state for t in pair] for state in self.states]
        return {"hidden": hidden}

    def load_per_rank_state(self, state: dict[str, Any], device: torch.device) -> None:
        hidden = state["hidden"]
        self.states = None if hidden is None else [
            [(h[i].to(device), h[i + 1].to(device)) for i in range(0, len(h), 2)] for h in hidden
        ]
