"""Batch and window sizes checked against the prepared data, before any work starts.

A BPTT window longer than a training stripe is silently capped at the stripe (one optimizer step
would then run the recurrence over a whole stripe: hours per step on enwik8), and an evaluation
batch wider than the validation tokens leaves nothing to score. Both are configuration mistakes and
are refused with a :class:`~pipeline.config.ConfigError` naming the field and the largest value
that fits.
"""

from __future__ import annotations

from pipeline.config import ConfigError, PipelineConfig
from pipeline.data import DatasetManifest

__all__ = ["check_evaluation_sizes", "check_training_sizes"]


def _stripe(tokens: int, batch: int) -> int:
    return tokens // batch


def check_training_sizes(config: PipelineConfig, manifest: DatasetManifest, world_size: int = 1) -> None:
    """``train.batch_size`` / ``train.bptt`` against the train split, ``train.eval_batch_size`` against each
    rank's share of the validation tokens."""
    train = config.train
    n = manifest.splits["train"].num_tokens
    stripe = _stripe(n, train.batch_size)
    if stripe < 2:
        raise ConfigError(
            f"train.batch_size {train.batch_size} is too large for the train split of {manifest.name} ({n:,} tokens): "
            f"each stripe needs at least 2 tokens, so train.batch_size must be at most {max(1, n // 2):,}"
        )
    if train.bptt > stripe - 1:
        raise ConfigError(
            f"train.bptt {train.bptt:,} is longer than a training stripe: {n:,} train tokens / train.batch_size "
            f"{train.batch_size} = {stripe:,} tokens per stripe, so train.bptt must be at most {stripe - 1:,}; lower "
            "train.bptt (or train.batch_size)"
        )
    valid = manifest.splits["valid"].num_tokens
    if train.eval_tokens is not None:
        valid = min(valid, train.eval_tokens + 1)
    per_rank = valid // world_size
    batch = max(1, train.eval_batch_size // world_size)
    if _stripe(per_rank, batch) < 2:
        raise ConfigError(
            f"train.eval_batch_size {train.eval_batch_size} is too large for the {valid:,} validation tokens "
            f"evaluated during training ({world_size} rank(s), {per_rank:,} tokens each): lower train.eval_batch_size "
            "or raise train.eval_tokens"
        )


def check_evaluation_sizes(config: PipelineConfig, manifest: DatasetManifest) -> None:
    """``evaluate.batch_size`` against the validation and test splits (after ``evaluate.max_tokens``)."""
    ev = config.evaluate
    for split in ("valid", "test"):
        n = manifest.splits[split].num_tokens
        if ev.max_tokens is not None:
            n = min(n, ev.max_tokens + 1)
        if _stripe(n, ev.batch_size) < 2:
            raise ConfigError(
                f"evaluate.batch_size {ev.batch_size} is too large for the {n:,} {split} tokens evaluated: each stripe "
                f"needs at least 2 tokens, so evaluate.batch_size must be at most {max(1, n // 2):,}"
            )
