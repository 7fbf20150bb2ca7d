"""Dynamic evaluation of a recurrent LM (Krause et al. 2017, the RMS variant; thesis §4.5 and §2.A).

The evaluated split is read as one stream (``batch_size`` stripes, 1 by default) in windows of
``window`` tokens, the recurrent state carried (detached) from window to window. Each window is first
**scored** with the current weights, then the weights are **updated** with the gradient ``g`` of that
window's mean cross-entropy (eval mode: no dropout; no clipping, no L2)::

    θ ← θ + λ · min(decrate, 1/λ) ⊙ (θ₀ − θ) − η · g / (MS + ε)

``θ₀`` are the weights before the pass; ``MS`` and ``decrate`` come from the training data
(:func:`gradient_statistics`): ``MS = sqrt(mean over training batches of g²)`` (element-wise, the
batches of ``grad_batch_size`` stripes and ``window`` tokens, state carried) and
``decrate = MS / mean_p(mean(MS_p))``, the normaliser being the mean over the parameter tensors ``p``
of each tensor's mean ``MS`` (as benkrause/dynamic-evaluation ``dynamiceval.py``; deepmind/lamb's
``dyneval.py`` takes the mean over all elements instead). Clipping ``decrate`` at ``1/λ`` keeps
``λ · decrate ≤ 1`` so that the decay never overshoots ``θ₀``.

:func:`dynamic_evaluation_pass` changes the weights in place (tests inspect them);
:func:`dynamic_nll` runs it inside :func:`preserved_weights`, which restores the weights bit for bit
afterwards, also when the pass raises.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from models import RecurrentLM, detach_state
from pipeline.averaging import restored_weights
from pipeline.data import evaluation_windows

__all__ = [
    "DynamicSettings",
    "GradientStatistics",
    "dynamic_evaluation_pass",
    "dynamic_nll",
    "gradient_statistics",
    "preserved_weights",
    "stripe_length",
]


@dataclass(frozen=True)
class DynamicSettings:
    """The hyperparameters of one dynamic evaluation (thesis Table 2.6 names in brackets).

    lr: η (``dyneval_learning_rate``) > 0. decay: λ (``dyneval_decay_rate``) >= 0; 0 = no decay towards θ₀.
    epsilon: ε (``dyneval_epsilon``) > 0. window: tokens per update (``max_time_steps``) >= 1.
    """

    lr: float
    decay: float
    epsilon: float
    window: int

    def __post_init__(self) -> None:
        if not (self.lr > 0 and math.isfinite(self.lr)):
            raise ValueError(f"dynamic evaluation lr must be a finite number > 0, got {self.lr}")
        if not (self.decay >= 0 and math.isfinite(self.decay)):
            raise ValueError(f"dynamic evaluation decay must be a finite number >= 0, got {self.decay}")
        if not (self.epsilon > 0 and math.isfinite(self.epsilon)):
            raise ValueError(f"dynamic evaluation epsilon must be a finite number > 0, got {self.epsilon}")
        if int(self.window) != self.window or self.window < 1:
            raise ValueError(f"dynamic evaluation window must be a positive integer, got {self.window}")


@dataclass
class GradientStatistics:
    """Root-mean-squared training gradients of every parameter (``model.parameters()`` order).

    ms: per parameter, ``sqrt(mean_k g_k²)`` (same shape as the parameter) over ``batches`` training
    batches. normaliser: ``mean_p(mean(ms_p))``, the mean over parameter tensors of their mean RMS.
    tokens: training targets the batches held. window: tokens per batch row (the update window).
    """

    ms: list[Tensor]
    normaliser: float
    batches: int
    tokens: int
    window: int

    def decay_rates(self) -> list[Tensor]:
        """``decrate = ms / normaliser`` per parameter (before the clip at 1/λ)."""
        return [m / self.normaliser for m in self.ms]


def stripe_length(num_tokens: int, batch_size: int) -> int:
    """Tokens per stripe when ``num_tokens`` are cut into ``batch_size`` stripes (as :func:`evaluation_windows`)."""
    return int(num_tokens) // int(batch_size)


def _parameters(model: nn.Module) -> list[nn.Parameter]:
    return list(model.parameters())  # tied parameters once


@contextlib.contextmanager
def _grad_mode(model: nn.Module) -> Iterator[list[nn.Parameter]]:
    """Eval mode (no dropout), gradients enabled and required on every parameter; all restored after."""
    params = _parameters(model)
    was_training = model.training
    required = [p.requires_grad for p in params]
    model.eval()
    try:
        with torch.enable_grad():
            for p in params:
                p.requires_grad_(True)
            yield params
    finally:
        for p, r in zip(params, required):
            p.requires_grad_(r)
        model.train(was_training)


def _window_gradients(model: RecurrentLM, params: Sequence[Tensor], inputs: Tensor, targets: Tensor, state,
                      temperatures: Sequence[float] = ()) -> tuple[list[Tensor], Tensor, list[Tensor], object]:
    """One window: (gradients of the mean NLL at T=1, summed NLL at T=1 [scalar, float64], summed NLL at
    each of ``temperatures`` (detached, float64), the new state (detached))."""
    logits, new_state = model(inputs, state)
    flat = logits.reshape(-1, logits.shape[-1])
    flat_targets = targets.reshape(-1)
    nll_sum = F.cross_entropy(flat, flat_targets, reduction="sum")
    grads = torch.autograd.grad(nll_sum / flat_targets.numel(), params, allow_unused=True)
    grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads)]
    with torch.no_grad():
        detached = flat.detach()
        scores = [F.cross_entropy(detached / t, flat_targets, reduction="sum").double() for t in temperatures]
    return grads, nll_sum.detach().double(), scores, detach_state(new_state)


def gradient_statistics(model: RecurrentLM, train_tokens: np.ndarray, *, batch_size: int, window: int,
                        max_tokens: int | None = None) -> GradientStatistics:
    """The mean squared gradients of ``model`` on the start of ``train_tokens`` (1-D token ids).

    The first ``max_tokens + 1`` tokens (all when None) are cut into ``batch_size`` stripes and read in
    windows of ``window`` tokens, the state carried; one gradient of the mean cross-entropy per window, in
    eval mode. The model's weights are not changed (its ``.grad`` fields are not touched either).
    """
    tokens = train_tokens if max_tokens is None else train_tokens[: max_tokens + 1]
    if stripe_length(len(tokens), batch_size) < 2:
        raise ValueError(f"gradient statistics need at least 2 tokens per stripe: {len(tokens):,} training tokens cut "
                         f"into {batch_size} stripes leave {stripe_length(len(tokens), batch_size)}")
    device = next(model.parameters()).device
    with _grad_mode(model) as params:
        sums = [torch.zeros_like(p, dtype=torch.float64) for p in params]
        batches, count, state = 0, 0, None
        for batch in evaluation_windows(tokens, batch_size, window):
            inputs, targets = batch.inputs.to(device), batch.targets.to(device)
            if state is None or batch.reset_state:
                state = model.initial_state(inputs.shape[1])
            grads, _, _, state = _window_gradients(model, params, inputs, targets, state)
            for s, g in zip(sums, grads):
                s += g.detach().double() ** 2
            batches += 1
            count += targets.numel()
    ms = [torch.sqrt(s / batches).to(p.dtype) for s, p in zip(sums, params)]
    normaliser = float(sum(m.double().mean() for m in ms) / len(ms))
    if not (normaliser > 0 and math.isfinite(normaliser)):
        raise ValueError(f"the mean RMS gradient is {normaliser}: the gradient statistics are unusable (a model with "
                         "no gradient, or a diverged one)")
    return GradientStatistics(ms=ms, normaliser=normaliser, batches=batches, tokens=count, window=int(window))


@contextlib.contextmanager
def preserved_weights(model: nn.Module) -> Iterator[None]:
    """Run the block, then copy the weights the model had before back into its parameters (in place,
    bit for bit), also when the block raises (:func:`pipeline.averaging.restored_weights` of its parameters)."""
    with restored_weights(_parameters(model)):
        yield


def dynamic_evaluation_pass(
    model: RecurrentLM,
    tokens: np.ndarray,
    stats: GradientStatistics,
    settings: DynamicSettings,
    *,
    batch_size: int = 1,
    temperatures: Sequence[float] = (),
    progress_desc: str | None = None,
) -> tuple[float, list[float], int]:
    """Dynamic evaluation of ``tokens`` (1-D token ids), **updating the model's weights in place**.

    Returns (summed NLL in nats at T=1, summed NLL at each of ``temperatures``, number of targets): each
    window is scored before the update it causes. The updates always use the T=1 loss; the other
    temperatures only score the same logits (logits / T). The stream is cut as
    :func:`pipeline.data.evaluation_windows` cuts it (``batch_size`` stripes, windows of
    ``settings.window`` tokens, the state reset on the first window only). A pass that diverges (a
    window's loss not finite) stops there: the sums are NaN, the count is still that of the whole pass.
    """
    from pipeline.console import progress

    if len(stats.ms) != len(_parameters(model)):
        raise ValueError(f"the gradient statistics hold {len(stats.ms)} tensors but the model has "
                         f"{len(_parameters(model))} parameters: compute them for this model")
    if stripe_length(len(tokens), batch_size) < 2:
        raise ValueError(f"dynamic evaluation needs at least 2 tokens per stripe: {len(tokens):,} tokens cut into "
                         f"{batch_size} stripes leave {stripe_length(len(tokens), batch_size)}")
    device = next(model.parameters()).device
    lam, lr, eps = settings.decay, settings.lr, settings.epsilon
    # λ · min(decrate, 1/λ) = min(λ · decrate, 1); computed once per pass.
    decay_steps = [torch.clamp(lam * d, max=1.0) for d in stats.decay_rates()] if lam > 0 else None
    total = torch.zeros((), dtype=torch.float64)
    scored = torch.zeros(len(temperatures), dtype=torch.float64)
    count = 0
    bar = progress(max(len(tokens) - 1, 0), progress_desc or "", "tok", disable=progress_desc is None, leave=False)
    try:
        with _grad_mode(model) as params:
            start = [p.detach().clone() for p in params]
            state = None
            for batch in evaluation_windows(tokens, batch_size, settings.window):
                inputs, targets = batch.inputs.to(device), batch.targets.to(device)
                if state is None or batch.reset_state:
                    state = model.initial_state(inputs.shape[1])
                grads, nll, scores, state = _window_gradients(model, params, inputs, targets, state, temperatures)
                if not torch.isfinite(nll):  # diverged: every later window would be NaN too
                    stripes = min(batch_size, len(tokens))
                    return math.nan, [math.nan] * len(temperatures), stripes * (stripe_length(len(tokens), stripes) - 1)
                total += nll.cpu()
                if scores:
                    scored += torch.stack(scores).cpu()
                count += targets.numel()
                with torch.no_grad():
                    for i, (p, g, ms) in enumerate(zip(params, grads, stats.ms)):
                        step = g / (ms + eps)
                        if decay_steps is not None:
                            p.add_(decay_steps[i] * (start[i] - p) - lr * step)
                        else:
                            p.add_(step, alpha=-lr)
                bar.update(targets.numel())
    finally:
        bar.close()
    return float(total), scored.tolist(), count


def dynamic_nll(
    model: RecurrentLM,
    tokens: np.ndarray,
    stats: GradientStatistics,
    settings: DynamicSettings,
    *,
    batch_size: int = 1,
    temperatures: Sequence[float] = (1.0,),
    progress_desc: str | None = None,
) -> tuple[list[float], int]:
    """Mean NLL (nats/token) of dynamic evaluation of ``tokens`` at each of ``temperatures``, and the
    number of targets; the model's weights are restored afterwards (see :func:`dynamic_evaluation_pass`)."""
    with preserved_weights(model):
        _, sums, count = dynamic_evaluation_pass(model, tokens, stats, settings, batch_size=batch_size,
                                                 temperatures=temperatures, progress_desc=progress_desc)
    return [s / count for s in sums], count
