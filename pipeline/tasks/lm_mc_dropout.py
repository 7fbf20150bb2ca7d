"""Monte Carlo dropout evaluation of a recurrent LM (Gal & Ghahramani 2016; as deepmind/lamb evaluates).

``N`` dropout masks are drawn per window (the model in train mode); sample ``k`` has its own
recurrent state, carried across the windows of the pass as with deterministic evaluation. The ``N``
predictive distributions of each token are combined two ways (lamb's ``eval_method``):

* arithmetic mean (``arithmetic``): ``log p(w) = logsumexp_k log p_k(w) − log N``;
* renormalised geometric mean (``geometric``): ``log p(w) = log_softmax_w(mean_k log p_k(·))[w]``,
  which equals lamb's softmax of the mean logits (the log-normalisers are constant over the vocabulary).

Every dropout rate of the model is multiplied by ``rate_multiplier`` (lamb's ``eval_dropout_multiplier``,
"Pushing the bounds of dropout", Melis et al. 2018): the fields of ``model.config`` named ``*_dropout``
and ``weight_drop`` (those present), and the ``weight_drop`` attribute the recurrent layers keep, capped
at :data:`MAX_DROPOUT_RATE`. :class:`models.RecurrentLM` reads its rates from ``self.config`` at
forward time, so :func:`scaled_dropout` swaps that config (and the layers' attribute) for the block;
nothing in ``models/`` changes. With all rates 0 every sample is the deterministic model, and both
means equal deterministic evaluation.

The masks come from a seeded generator (the global one, forked): the same model scores the same
whatever ran before.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from models import RecurrentLM
from pipeline.data import evaluation_windows

__all__ = ["MAX_DROPOUT_RATE", "MCDropoutNLL", "SampleAverage", "dropout_fields", "mc_dropout_nll", "scaled_dropout"]

#: Scaled rates are capped here (a rate must stay below 1).
MAX_DROPOUT_RATE = 0.95
_EXTRA_RATE_NAMES = ("weight_drop",)


def dropout_fields(config) -> list[str]:
    """The dropout-rate fields of a model config: every field named ``*_dropout``, and ``weight_drop``."""
    names = type(config).model_fields if hasattr(type(config), "model_fields") else vars(config)
    return [n for n in names if n.endswith("_dropout") or n in _EXTRA_RATE_NAMES]


def _scaled(rate: float, multiplier: float) -> float:
    return min(float(rate) * multiplier, MAX_DROPOUT_RATE) if rate > 0 else float(rate)


@contextlib.contextmanager
def scaled_dropout(model: RecurrentLM, multiplier: float) -> Iterator[dict[str, float]]:
    """For the block, every dropout rate of ``model`` times ``multiplier`` (capped at :data:`MAX_DROPOUT_RATE`);
    yields the rates in effect by field name. The original config and attributes are put back after,
    also when the block raises."""
    if not (multiplier >= 0 and math.isfinite(multiplier)):
        raise ValueError(f"dropout rate multiplier must be a finite number >= 0, got {multiplier}")
    original = model.config
    rates = {name: _scaled(getattr(original, name), multiplier) for name in dropout_fields(original)}
    layers = [(m, name, getattr(m, name)) for m in model.modules() if m is not model
              for name in _EXTRA_RATE_NAMES if isinstance(getattr(m, name, None), float)]
    model.config = original.model_copy(update=rates)  # no validation needed: every rate is in [0, 1)
    try:
        for module, name, value in layers:
            setattr(module, name, _scaled(value, multiplier))
        yield rates
    finally:
        model.config = original
        for module, name, value in layers:
            setattr(module, name, value)


class SampleAverage:
    """Running combination of ``N`` predictive distributions of the same tokens.

    ``add(log_probs)`` once per sample, ``log_probs`` [..., V] (normalised, any float dtype); then
    :meth:`arithmetic` and :meth:`geometric` give the log-probability of ``targets`` [...] under the
    arithmetic mean and the renormalised geometric mean of the samples (float64, shape [...]).
    """

    def __init__(self) -> None:
        self.samples = 0
        self._log_sum: Tensor | None = None  # logsumexp_k log p_k, [..., V]
        self._sum: Tensor | None = None  # Σ_k log p_k, [..., V]

    def add(self, log_probs: Tensor) -> None:
        lp = log_probs.detach().double()
        if self._log_sum is None:
            self._log_sum, self._sum = lp.clone(), lp.clone()
        else:
            self._log_sum = torch.logaddexp(self._log_sum, lp)
            self._sum += lp
        self.samples += 1

    def _check(self) -> tuple[Tensor, Tensor]:
        if self._log_sum is None or self._sum is None:
            raise ValueError("no samples were added")
        return self._log_sum, self._sum

    def arithmetic(self, targets: Tensor) -> Tensor:
        """``log (1/N Σ_k p_k(target))`` per position."""
        log_sum, _ = self._check()
        return log_sum.gather(-1, targets.unsqueeze(-1)).squeeze(-1) - math.log(self.samples)

    def geometric(self, targets: Tensor) -> Tensor:
        """``log_softmax(1/N Σ_k log p_k)[target]`` per position."""
        _, total = self._check()
        return F.log_softmax(total / self.samples, dim=-1).gather(-1, targets.unsqueeze(-1)).squeeze(-1)


@dataclass
class MCDropoutNLL:
    """Mean NLL (nats/token) under the arithmetic and geometric means of ``samples`` dropout samples."""

    arithmetic: float
    geometric: float
    tokens: int
    samples: int
    rate_multiplier: float


@torch.no_grad()
def mc_dropout_nll(
    model: RecurrentLM,
    tokens: np.ndarray,
    *,
    samples: int,
    rate_multiplier: float = 1.0,
    batch_size: int,
    bptt: int,
    seed: int | None = None,
    progress_desc: str | None = None,
) -> MCDropoutNLL:
    """Monte Carlo dropout evaluation of ``tokens`` (1-D token ids; see the module docstring).

    The stream is cut as :func:`pipeline.data.evaluation_windows` cuts it (``batch_size`` stripes,
    windows of ``bptt``); per window each of the ``samples`` samples runs its own forward call from its
    own state (fresh masks). ``seed``: seeds the masks (None: the global generator as it is). The
    model's training mode and config are restored afterwards.
    """
    from pipeline.console import progress

    if samples < 1:
        raise ValueError(f"Monte Carlo dropout needs at least 1 sample, got {samples}")
    device = next(model.parameters()).device
    was_training = model.training
    bar = progress(max(len(tokens) - 1, 0), progress_desc or "", "tok", disable=progress_desc is None, leave=False)
    cuda = [torch.cuda.current_device()] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=cuda, enabled=seed is not None), scaled_dropout(model, rate_multiplier):
            if seed is not None:
                torch.manual_seed(seed)
            model.train()  # dropout masks
            arithmetic = torch.zeros((), dtype=torch.float64)
            geometric = torch.zeros((), dtype=torch.float64)
            count = 0
            states: list = [None] * samples
            for batch in evaluation_windows(tokens, batch_size, bptt):
                inputs, targets = batch.inputs.to(device), batch.targets.to(device)
                average = SampleAverage()
                for k in range(samples):
                    if states[k] is None or batch.reset_state:
                        states[k] = model.initial_state(inputs.shape[1])
                    logits, states[k] = model(inputs, states[k])
                    average.add(F.log_softmax(logits.double(), dim=-1))
                arithmetic -= average.arithmetic(targets).sum().cpu()
                geometric -= average.geometric(targets).sum().cpu()
                count += targets.numel()
                bar.update(targets.numel())
        if count == 0:
            raise ValueError("nothing to evaluate: the token array is shorter than one window")
        return MCDropoutNLL(arithmetic=float(arithmetic) / count, geometric=float(geometric) / count, tokens=count,
                            samples=samples, rate_multiplier=float(rate_multiplier))
    finally:
        bar.close()
        model.train(was_training)
