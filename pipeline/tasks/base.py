"""The task seam: what one model family contributes to the one training loop.

:class:`~pipeline.trainer.Trainer` owns everything a model family does not decide: the engine (DDP or
DeepSpeed), gradient accumulation, clipping, the optimizer, Two-Tailed Averaging, divergence
recovery, checkpoints with exact resume, and tracking. A :class:`TrainingTask` owns the rest: it
builds the model from the config and the dataset manifest, yields this rank's resumable training
batches, computes one micro-batch's loss (plus the metrics to log), scores the validation loss that
2TA compares, and keeps whatever state of its own must survive a resume (the LM's carried hidden
state, the VAE's annealing weight, γ and pretraining phase).

The trainer calls a task in this order each optimizer step::

    task.before_step(step)                  # may ask for an optimizer / averager reset (decoder reset)
    batch = task.next_batch()
    task.begin_step(batch, model)           # e.g. the LM resets its carried state at an epoch start
    for m in range(grad_accum_steps):
        loss = task.micro_batch_loss(forward_module, batch, m, micro_batch)
        backward(loss.objective / grad_accum_steps)
    ... clip, divergence check, optimizer step ...
    task.accept_step()                      # the step was applied (the LM keeps its new state)

and every ``train.eval_every`` steps ``task.validation_loss(model)`` (three times: raw, short and long
weights) followed by ``task.after_evaluation(step, model)`` on the reported weights.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import torch
from pydantic import BaseModel
from torch import nn

__all__ = ["MicroBatchLoss", "TrainingTask"]


@dataclass
class MicroBatchLoss:
    """One micro-batch's contribution to a step.

    ``objective``: the scalar whose gradient is the micro-batch's gradient (mean over the micro-batch;
    the trainer divides by ``grad_accum_steps`` and adds the L2 penalty). ``value``: the loss reported
    for the step in nats per token (detached; what the divergence guard watches). ``weight``: what the
    value is an average over (the VAE: the micro-batch's tokens), so that the step's loss is the global
    per-token figure however the batch is split over micro-batches and ranks; None: every micro-batch
    counts the same (the LM, whose micro-batches have equal token counts). ``metrics``: extra per-step
    figures (detached scalars), averaged over micro-batches and ranks and logged as ``train/<name>``.
    """

    objective: torch.Tensor
    value: torch.Tensor
    metrics: dict[str, torch.Tensor] = field(default_factory=dict)
    weight: float | None = None


@runtime_checkable
class TrainingTask(Protocol):
    """One model family's part of training (see the module docstring for the calling order)."""

    name: str  # "lm" or "vae": the config's ``task``
    unit: str  # what the per-token losses are per: "char" (bits per character shown) or "word"

    @property
    def model_config(self) -> BaseModel:
        """The resolved model config (vocabulary filled in), saved with the final model."""

    def build_model(self) -> nn.Module:
        """A freshly initialised model (the caller seeds the RNG first: identical on every rank)."""

    # ---------------------------------------------------------------- data
    def next_batch(self) -> Any:
        """This rank's share of the next global batch."""

    @property
    def epoch(self) -> int:
        """Completed passes over the training data."""

    def batch_tokens(self, batch: Any) -> int:
        """Target tokens in this rank's ``batch`` (throughput and ``tokens_seen``)."""

    # ---------------------------------------------------------------- one step
    def before_step(self, step: int, model: nn.Module) -> bool:
        """Called before step ``step + 1``; True when it changed the weights so that the optimizer state
        and the weight averages must start afresh (the VAE's decoder reset after encoder pretraining)."""

    def begin_step(self, batch: Any, model: nn.Module, micro_batches: int, micro_batch: int) -> None:
        """Prepare for the micro-batches of ``batch`` (``micro_batches`` of ``micro_batch`` rows each)."""

    def micro_batch_loss(self, forward_module: nn.Module, batch: Any, index: int, micro_batch: int) -> MicroBatchLoss:
        """The loss of micro-batch ``index`` (rows ``index*micro_batch : (index+1)*micro_batch``)."""

    def accept_step(self) -> None:
        """The step was applied (not skipped as diverged)."""

    # ---------------------------------------------------------------- evaluation during training
    def validation_loss(self, model: nn.Module) -> tuple[float, float]:
        """(sum of losses, count) on this rank's validation shard: the trainer all-reduces both and 2TA
        compares ``sum / count`` (nats per token)."""

    def after_evaluation(self, step: int, model: nn.Module) -> dict[str, float]:
        """Called after each evaluation with the model holding the reported (2TA) weights; returns figures
        to log (the VAE's KL, mutual information, active units and γ). Every rank calls it (it may all-reduce)."""

    # ---------------------------------------------------------------- resumable state
    def batches_state(self) -> dict[str, Any]:
        """Where the training data stands (global: the same on every rank)."""

    def load_batches_state(self, state: dict[str, Any]) -> None: ...

    def state_dict(self) -> dict[str, Any]:
        """The task's own global state (JSON-able), checkpointed with the progress."""

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def per_rank_state(self) -> dict[str, Any]:
        """What differs per rank (tensors allowed), checkpointed per rank."""

    def load_per_rank_state(self, state: dict[str, Any], device: torch.device) -> None: ...
