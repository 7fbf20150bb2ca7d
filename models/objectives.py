"""Multi-sample dropout objective (thesis §4.3).

Per token, with ``D`` dropout samples::

    -ln p(w_t | w_<t) = -ln( (1/D) Σ_d p(w_t | w_<t, M^d) )
                      = -( logsumexp_d ln p_d(w_t) - ln D )

computed entirely in log space (no probabilities are materialised).
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from .lm import LMState

__all__ = ["multi_sample_nll", "multi_sample_loss"]


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
    logits, new_state = model(rep_inputs, state)
    if logits.dtype in (torch.float16, torch.bfloat16):
        logits = logits.float()  # log-softmax in at least float32
    log_probs = torch.log_softmax(logits, dim=-1)  # [T, D*B, V]
    rep_targets = targets.repeat(1, d) if d > 1 else targets
    target_lp = log_probs.gather(-1, rep_targets.unsqueeze(-1)).squeeze(-1)  # [T, D*B]
    target_lp = target_lp.view(seq_len, d, batch).transpose(0, 1)  # [D, T, B]
    nll = multi_sample_nll(target_lp)
    return nll.mean(), new_state
