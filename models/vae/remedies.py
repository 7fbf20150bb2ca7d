"""Posterior-collapse remedies that weight the KL term over training: annealing, soft free bits,
encoder pretraining (the β weight and free bits themselves are in :class:`~models.vae.objectives.ObjectiveSpec`).

The weight of the KL term at optimizer step ``s`` (``s`` steps done) is::

    weight(s) = 0                                   while s < pretraining.steps (autoencoder)
              = annealing(s - P) * γ                otherwise, P = pretraining.steps (0 without)

* **Annealing** (:func:`kl_weight`): ``constant`` 1; ``linear`` warm-up (Bowman et al. 2015): from
  ``start`` to 1 over ``warmup_steps``, then 1; ``cyclical`` (Fu et al. 2019, described in Li's note):
  ``M = cycles`` cycles over ``T = total_steps``; Fu et al.'s formula at iteration ``t = s + 1`` is
  ``τ = mod(t - 1, ceil(T/M)) / (T/M)``, weight ``τ / R`` while ``τ <= R`` (``R = ratio``) and 1 after
  (their ``f(τ) = τ/R`` ramps 0 -> 1 over the first ``R`` of each cycle, then holds). From step ``T`` on
  the weight stays 1 (their code computes the schedule for ``T`` iterations only).
* **Soft free bits** (Chen et al. 2016; Leibowitz Algorithm 1): a multiplier γ adapted once per
  evaluation period from the period's mean KL (nats per sentence): ``KL > (1+β)λ`` → ``γ =
  min(γ(1+χ), 1)``; ``KL < (1-β)λ`` → ``γ = γ(1-χ)``; else unchanged (λ: target rate, β: threshold,
  χ: multiplier). It adapts only once annealing is complete (Algorithm 1 anneals first).
* **Encoder pretraining** (Li et al. 2019; Leibowitz): ``steps`` optimizer steps as an autoencoder (KL
  weight 0), then the decoder is re-initialised (:func:`reset_due` is true before step ``steps + 1``)
  and annealing starts from there.

:class:`KLSchedule` combines the three; its :meth:`~KLSchedule.state_dict` (γ) goes into every
checkpoint, and everything else is a pure function of the step, so a resumed run continues exactly.
"""

from __future__ import annotations

import math
from typing import Any, Literal

from pydantic import Field, model_validator

from models.config import StrictConfig

__all__ = [
    "AnnealingConfig",
    "KLSchedule",
    "PretrainingConfig",
    "SoftFreeBits",
    "SoftFreeBitsConfig",
    "kl_weight",
    "phase",
    "reset_due",
]


class AnnealingConfig(StrictConfig):
    """KL annealing: constant, linear warm-up (Bowman et al.) or cyclical (Fu et al. 2019)."""

    schedule: Literal["constant", "linear", "cyclical"] = Field(
        default="constant", description="constant (weight 1), linear warm-up, or cyclical (M cycles of ramp then hold)."
    )
    start: float = Field(default=0.0, ge=0, le=1, description="linear: the weight at step 0.")
    warmup_steps: int = Field(default=0, ge=0, description="linear: optimizer steps of the rise to 1 (required > 0).")
    cycles: int = Field(default=4, ge=1, description="cyclical: M, the number of cycles in total_steps.")
    ratio: float = Field(
        default=0.5, gt=0, le=1, description="cyclical: R, the fraction of each cycle that ramps 0 -> 1."
    )
    total_steps: int = Field(default=0, ge=0, description="cyclical: steps the M cycles span (required > 0); then 1.")

    @model_validator(mode="after")
    def _parameters(self) -> AnnealingConfig:
        if self.schedule == "linear" and self.warmup_steps <= 0:
            raise ValueError("annealing.warmup_steps must be > 0 for schedule linear")
        if self.schedule == "cyclical" and self.total_steps < self.cycles:
            raise ValueError(f"annealing.total_steps ({self.total_steps}) must be >= annealing.cycles ({self.cycles}) "
                             "for schedule cyclical")
        return self


def kl_weight(step: int, config: AnnealingConfig) -> float:
    """The annealing weight after ``step`` optimizer steps (``step`` >= 0), in [0, 1]."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    if config.schedule == "constant":
        return 1.0
    if config.schedule == "linear":
        if step >= config.warmup_steps:
            return 1.0
        return config.start + (1.0 - config.start) * step / config.warmup_steps
    if step >= config.total_steps:
        return 1.0
    # Fu et al. 2019: τ = mod(t-1, ⌈T/M⌉) / (T/M) with t = step + 1 (1-based iterations).
    tau = (step % math.ceil(config.total_steps / config.cycles)) / (config.total_steps / config.cycles)
    return 1.0 if tau > config.ratio else tau / config.ratio


def annealing_done(step: int, config: AnnealingConfig) -> bool:
    """Has the annealing schedule reached its final weight 1 for good?"""
    if config.schedule == "constant":
        return True
    return step >= (config.warmup_steps if config.schedule == "linear" else config.total_steps)


class SoftFreeBitsConfig(StrictConfig):
    """Soft free bits (Chen et al. 2016; Leibowitz Alg. 1): γ steers the KL towards a target rate."""

    target_rate: float | None = Field(
        default=None, gt=0,
        description="λ: the target KL in nats per sentence (Leibowitz: 4); null = soft free bits off.",
    )
    threshold: float = Field(
        default=0.05, ge=0, lt=1,
        description="β: γ changes only outside [(1-β)λ, (1+β)λ] (Leibowitz / Chen et al.: 0.05).",
    )
    multiplier: float = Field(
        default=0.1, gt=0, lt=1,
        description="χ: relative change of γ per evaluation period (Leibowitz / Chen et al.: 0.1).",
    )
    initial_gamma: float = Field(default=1.0, gt=0, le=1, description="γ before the first adaptation.")

    @property
    def enabled(self) -> bool:
        return self.target_rate is not None


class SoftFreeBits:
    """The γ of soft free bits; :meth:`update` once per evaluation period."""

    def __init__(self, config: SoftFreeBitsConfig) -> None:
        if config.target_rate is None:
            raise ValueError("soft free bits need a target_rate")
        self.config = config
        self.gamma = config.initial_gamma

    def update(self, kl: float) -> float:
        """Adapt γ to the period's mean KL (nats per sentence); returns the new γ."""
        c = self.config
        target = float(c.target_rate)  # type: ignore[arg-type] - checked in __init__
        if kl > (1.0 + c.threshold) * target:
            self.gamma = min(self.gamma * (1.0 + c.multiplier), 1.0)
        elif kl < (1.0 - c.threshold) * target:
            self.gamma = self.gamma * (1.0 - c.multiplier)
        return self.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"gamma": self.gamma}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.gamma = float(state["gamma"])


class PretrainingConfig(StrictConfig):
    """Encoder pretraining as an autoencoder, then a decoder reset (Li et al. 2019; Leibowitz)."""

    steps: int = Field(
        default=0, ge=0, description="Optimizer steps trained with KL weight 0 before the decoder is reset; 0 = off."
    )

    @property
    def enabled(self) -> bool:
        return self.steps > 0


def phase(step: int, config: PretrainingConfig | None) -> Literal["pretrain", "train"]:
    """``pretrain`` for the first ``config.steps`` steps, then ``train``."""
    return "pretrain" if config is not None and step < config.steps else "train"


def reset_due(step: int, config: PretrainingConfig | None) -> bool:
    """True before step ``config.steps + 1``: pretraining is over and the decoder is re-initialised."""
    return config is not None and config.enabled and step == config.steps


class KLSchedule:
    """The KL term's weight multiplier over training (annealing x soft free bits γ, 0 while pretraining)."""

    def __init__(self, annealing: AnnealingConfig, soft_free_bits: SoftFreeBitsConfig | None = None,
                 pretraining: PretrainingConfig | None = None) -> None:
        self.annealing = annealing
        self.pretraining = pretraining if pretraining is not None and pretraining.enabled else None
        enabled = soft_free_bits is not None and soft_free_bits.enabled
        self.soft_free_bits = SoftFreeBits(soft_free_bits) if enabled else None  # type: ignore[arg-type]
        self._step = 0

    def _since_pretraining(self, step: int) -> int:
        return step - (self.pretraining.steps if self.pretraining is not None else 0)

    def weight(self, step: int) -> float:
        """The multiplier of the KL term for the step after ``step`` completed steps."""
        self._step = step
        if phase(step, self.pretraining) == "pretrain":
            return 0.0
        gamma = 1.0 if self.soft_free_bits is None else self.soft_free_bits.gamma
        return kl_weight(self._since_pretraining(step), self.annealing) * gamma

    def reset_due(self, step: int) -> bool:
        """Re-initialise the decoder before this step (the end of encoder pretraining)?"""
        return reset_due(step, self.pretraining)

    def end_of_period(self, mean_kl: float, step: int | None = None) -> float | None:
        """An evaluation period ended with mean training KL ``mean_kl``: soft free bits adapt γ (only once
        pretraining and annealing are over). Returns γ, or None without soft free bits."""
        if self.soft_free_bits is None:
            return None
        step = self._step if step is None else step
        if phase(step, self.pretraining) == "train" and annealing_done(self._since_pretraining(step), self.annealing):
            self.soft_free_bits.update(mean_kl)
        return self.soft_free_bits.gamma

    def state_dict(self) -> dict[str, Any]:
        return {"soft_free_bits": None if self.soft_free_bits is None else self.soft_free_bits.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state.get("soft_free_bits")
        if self.soft_free_bits is not None and saved is not None:
            self.soft_free_bits.load_state_dict(saved)
