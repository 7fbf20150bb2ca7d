"""Language-model evaluation: cross-entropy, bits per character / perplexity, softmax temperature scan.

Evaluation uses the standard deterministic dropout approximation (``model.eval()``), carries the
recurrent state across windows of contiguous stripes, and scans softmax temperatures on the
validation set in a single pass (every window's logits are scored at all temperatures), as in
deepmind/lamb's evaluation. The test set is then scored with and without the tuned temperature.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from models import RecurrentLM, detach_state
from pipeline.config import PipelineConfig
from pipeline.data import DatasetManifest, evaluation_windows, load_tokens

__all__ = ["EvaluationResult", "bits_per_token", "evaluate_model", "evaluate_nll", "scan_temperature"]


def bits_per_token(nats: float) -> float:
    """Convert a mean cross-entropy in nats to bits (bpc for character-level corpora)."""
    return nats / math.log(2)


def _limit(tokens: np.ndarray, max_tokens: int | None) -> np.ndarray:
    return tokens if max_tokens is None else tokens[: max_tokens + 1]


@torch.no_grad()
def evaluate_nll(
    model: RecurrentLM,
    tokens: np.ndarray,
    *,
    batch_size: int,
    bptt: int,
    max_tokens: int | None = None,
    temperatures: list[float] | tuple[float, ...] = (1.0,),
    progress_desc: str | None = None,
) -> tuple[list[float], int]:
    """Mean negative log-likelihood (nats/token) of ``tokens`` at each temperature, and the token count.

    ``tokens``: 1-D array of token ids. The model runs in eval mode (no dropout); its training mode
    is restored afterwards. ``progress_desc``: show progress (tokens scored) under this name.
    """
    from pipeline.console import progress

    was_training = model.training
    model.eval()
    tokens = _limit(tokens, max_tokens)
    bar = progress(max(len(tokens) - 1, 0), progress_desc or "", "tok", disable=progress_desc is None, leave=False)
    try:
        temps = torch.tensor(list(temperatures), dtype=torch.float32)
        totals = torch.zeros(len(temps), dtype=torch.float64)
        count = 0
        state = None
        for batch in evaluation_windows(tokens, batch_size, bptt):
            if state is None or batch.reset_state:
                state = model.initial_state(batch.inputs.shape[1])
            logits, state = model(batch.inputs, state)
            state = detach_state(state)
            targets = batch.targets.reshape(-1)
            flat = logits.reshape(-1, logits.shape[-1])
            for k, t in enumerate(temps.tolist()):
                # Scoring every temperature from the same logits costs one log_softmax each, not a pass each.
                nll = F.cross_entropy(flat / t, targets, reduction="sum")
                totals[k] += nll.double()
            count += targets.numel()
            bar.update(targets.numel())
        if count == 0:
            raise ValueError("nothing to evaluate: the token array is shorter than one window")
        return (totals / count).tolist(), count
    finally:
        bar.close()
        model.train(was_training)


def scan_temperature(
    model: RecurrentLM,
    valid_tokens: np.ndarray,
    *,
    batch_size: int,
    bptt: int,
    t_min: float,
    t_max: float,
    num: int,
    max_tokens: int | None = None,
    progress_desc: str | None = None,
) -> tuple[float, dict[float, float]]:
    """The softmax temperature in ``linspace(t_min, t_max, num)`` (plus 1.0) minimising validation NLL."""
    grid = sorted({round(float(t), 6) for t in np.linspace(t_min, t_max, num)} | {1.0})
    losses, _ = evaluate_nll(model, valid_tokens, batch_size=batch_size, bptt=bptt, max_tokens=max_tokens, temperatures=grid,
                             progress_desc=progress_desc)
    table = dict(zip(grid, losses))
    best = min(grid, key=lambda t: (table[t], abs(t - 1.0)))
    return best, table


@dataclass
class EvaluationResult:
    """Final metrics of a model; ``*_nll`` in nats/token, ``*_bits`` in bits/token (bpc), ``*_ppl`` perplexity."""

    unit: str
    temperature: float
    valid_nll: float
    test_nll: float
    valid_nll_tuned: float
    test_nll_tuned: float
    valid_tokens: int
    test_tokens: int

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "temperature": self.temperature,
            "valid_nll": self.valid_nll,
            "test_nll": self.test_nll,
            "valid_nll_tuned_temperature": self.valid_nll_tuned,
            "test_nll_tuned_temperature": self.test_nll_tuned,
        }
        if self.unit == "char":
            for key in ("valid", "test"):
                out[f"{key}_bpc"] = bits_per_token(getattr(self, f"{key}_nll"))
                out[f"{key}_bpc_tuned_temperature"] = bits_per_token(getattr(self, f"{key}_nll_tuned"))
        else:
            for key in ("valid", "test"):
                out[f"{key}_ppl"] = math.exp(getattr(self, f"{key}_nll"))
                out[f"{key}_ppl_tuned_temperature"] = math.exp(getattr(self, f"{key}_nll_tuned"))
        return out


def evaluate_model(model: RecurrentLM, config: PipelineConfig, manifest: DatasetManifest) -> EvaluationResult:
    """Score valid and test with and without the validation-tuned softmax temperature."""
    ev = config.evaluate
    valid = load_tokens(config.data_dir, "valid")
    test = load_tokens(config.data_dir, "test")
    best_t, table = scan_temperature(
        model, valid, batch_size=ev.batch_size, bptt=ev.bptt, max_tokens=ev.max_tokens,
        t_min=ev.temperature.min, t_max=ev.temperature.max, num=ev.temperature.num, progress_desc="evaluate valid (T scan)",
    )
    (valid_nll_1,), valid_count = evaluate_nll(
        model, valid, batch_size=ev.batch_size, bptt=ev.bptt, max_tokens=ev.max_tokens, temperatures=(1.0,),
        progress_desc="evaluate valid",
    )
    (test_nll_1, test_nll_t), test_count = evaluate_nll(
        model, test, batch_size=ev.batch_size, bptt=ev.bptt, max_tokens=ev.max_tokens, temperatures=(1.0, best_t),
        progress_desc="evaluate test",
    )
    return EvaluationResult(
        unit=manifest.unit, temperature=best_t, valid_nll=valid_nll_1, test_nll=test_nll_1,
        valid_nll_tuned=table[best_t], test_nll_tuned=test_nll_t, valid_tokens=valid_count, test_tokens=test_count,
    )
