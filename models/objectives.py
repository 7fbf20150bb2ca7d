"""Multi-sample dropout objective (thesis §4.3).

Per token, with ``D`` dropout samples::

    -ln p(w_t | w_<t) = -ln( (1/D) Σ_d p(w_t | w_<t, M^d) )
                      = -( logsumexp_d ln p_d(w_t) - ln D )

computed entirely in log space (no probabilities are materialised).

:func:`multi_sample_objective` adds the AWD-LSTM activation regularisers to it (Merity et al. 2017)::

    objective = NLL + AR + TAR,   AR = alpha * mean(dropped²),   TAR = beta * mean((raw_{t+1} - raw_t)²)

over all elements of the model's :class:`~models.lm.RNNOutputs` (the summed residual output after /
before output dropout, [T, D*B, n]: the means run over the D dropout copies too). AR / TAR are only
computed when their coefficient is > 0 (the model is then called with ``return_outputs=True``).
:func:`multi_sample_loss` is the plain objective, unchanged.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from .lm import LMState
from .regularizers import activation_regularization, temporal_activation_regularization

__all__ = ["LMObjective", "multi_sample_loss", "multi_sample_nll", "multi_sample_objective"]


def multi_sample_nll(target_log_probs: Tensor) -> Tensor:
    """``target_log_probs`` [D, T, B] (log-prob of the target under each sample) -> NLL [T, B]."""
    if target_log_probs.dim() != 3:
        raise ValueError(f"target_log_probs must be [D, T, B], got shape {tuple(target_log_probs.shape)}")
    num_samples = target_log_probs.shape[0]
    if num_samples < 1:
        raise ValueError("need at least one dropout sample (D >= 1)")
    if num_samples == 1:
        return -target_log_probs[0]
    return math.log(num_samples) - torch.logsumexp(target_log_probs, dim=0)


@dataclass
class LMObjective:
    """One window's training objective (:func:`multi_sample_objective`); every tensor a scalar.

    loss: what to minimise, ``nll`` + ``ar`` + ``tar`` (the terms that are not None).
    nll: the mean multi-sample NLL over the targets (nats per token).
    ar / tar: the weighted AR / TAR terms as added to ``loss`` (float32 or wider); None when their
        coefficient is 0.
    state: the model's new carried state (not detached), batch D*B.
    """

    loss: Tensor
    nll: Tensor
    ar: Tensor | None
    tar: Tensor | None
    state: LMState


def multi_sample_loss(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    state: LMState | None,
    num_samples: int,
) -> tuple[Tensor, LMState]:
    """Mean multi-sample NLL over the [T, B] targets, and the model's new state.

    The batch is replicated ``num_samples`` (= D) times along the batch axis
    (``inputs.repeat(1, D)`` -> [T, D*B]; sample ``d`` occupies columns
    ``d*B:(d+1)*B``), so each copy gets independent dropout masks in a single
    forward pass. Consequently the carried ``state`` has batch ``D*B`` (``None``
    starts from zeros). The returned state is not detached.
    """
    result = multi_sample_objective(model, inputs, targets, state, num_samples)
    return result.loss, result.state


def multi_sample_objective(
    model: nn.Module,
    inputs: Tensor,
    targets: Tensor,
    state: LMState | None,
    num_samples: int,
    *,
    ar_alpha: float = 0.0,
    tar_beta: float = 0.0,
) -> LMObjective:
    """The multi-sample NLL of :func:`multi_sample_loss` plus AR (``ar_alpha``) and TAR (``tar_beta``).

    inputs, targets: [T, B] int64; state: per layer (h, c) of batch D*B, or None. With both coefficients
    0 the model is called exactly as by :func:`multi_sample_loss` (``model(inputs, state)``); otherwise as
    ``model(inputs, state, return_outputs=True)``, which must return ``(logits, state, RNNOutputs)``.
    """
    if ar_alpha < 0 or tar_beta < 0 or math.isnan(ar_alpha) or math.isnan(tar_beta):
        raise ValueError(f"ar_alpha and tar_beta must be >= 0, got {ar_alpha} and {tar_beta}")
    if inputs.dim() != 2 or inputs.shape != targets.shape:
        raise ValueError(
            f"inputs and targets must both be [T, B]; got {tuple(inputs.shape)} and {tuple(targets.shape)}"
        )
    if num_samples < 1:
        raise ValueError(f"num_samples must be >= 1, got {num_samples}")
    seq_len, batch = inputs.shape
    d = num_samples
    if state is not None:
        state_batch = state[0][0].shape[0]
        if state_batch != d * batch:
            raise ValueError(
                f"state batch size is {state_batch} but multi_sample_loss with num_samples={d} and "
                f"batch {batch} needs a state of batch {d * batch} (sample d in columns d*B:(d+1)*B)"
            )
    rep_inputs = inputs.repeat(1, d) if d > 1 else inputs
    regularised = ar_alpha > 0 or tar_beta > 0
    if regularised:
        logits, new_state, outputs = model(rep_inputs, state, return_outputs=True)
    else:
        logits, new_state = model(rep_inputs, state)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least float32
    log_probs = torch.log_softmax(logits, dim=-1)  # [T, D*B, V]
    rep_targets = targets.repeat(1, d) if d > 1 else targets
    target_lp = log_probs.gather(-1, rep_targets.unsqueeze(-1)).squeeze(-1)  # [T, D*B]
    target_lp = target_lp.view(seq_len, d, batch).transpose(0, 1)  # [D, T, B]
    nll = multi_sample_nll(target_lp).mean()
    ar = activation_regularization(outputs.dropped, ar_alpha) if ar_alpha > 0 else None
    tar = temporal_activation_regularization(outputs.raw, tar_beta) if tar_beta > 0 else None
    loss = nll
    for term in (ar, tar):
        if term is not None:
            loss = loss + term
    return LMObjective(loss=loss, nll=nll, ar=ar, tar=tar, state=new_state)
