"""Language-model evaluation: cross-entropy, bits per character / perplexity, softmax temperature,
dynamic evaluation, Monte Carlo dropout, and the evaluation report.

Static evaluation uses the standard deterministic dropout approximation (``model.eval()``), carries the
recurrent state across windows of contiguous stripes, and scans softmax temperatures on the
validation set in a single pass (every window's logits are scored at all temperatures), as in
deepmind/lamb's evaluation. The test set is then scored with and without the tuned temperature.

Softmax temperature convention: the logits are **divided** by ``T`` (``softmax(logits / T)``; ``T > 1``
flattens the distribution). deepmind/lamb **multiplies** the logits by its ``eval_softmax_temperature``
``t`` (``softmax(t · logits)``, "a value lower than 1 to smoothen the distribution"), so lamb's ``t`` is
``T = 1/t`` here. lamb scans ``t`` from 1.06 down to 0.80 in steps of 0.02 (``evaluation.py``,
``eval_softmax_temperature=-0.8`` in all its experiment scripts; the README's example picks 0.9), i.e.
``T`` in [0.943, 1.25]; the default scan (:class:`pipeline.config.TemperatureScan`, 0.8 to 1.25) covers it.

Optional, beside the static numbers (thesis Tables 4.1 / 4.2 report valid / test with and without
dynamic evaluation):

* dynamic evaluation (``evaluate.dynamic``; :mod:`pipeline.tasks.lm_dynamic_tuning`,
  :mod:`pipeline.tasks.lm_dynamic_eval`), tuned on a validation prefix, at T = 1 and at a temperature
  tuned on its own validation pass (the updates always follow the T = 1 loss);
* Monte Carlo dropout (``evaluate.mc_dropout``; :mod:`pipeline.tasks.lm_mc_dropout`), arithmetic and
  geometric means of the samples' predictions, at T = 1.

:func:`evaluate_model` writes the report (:mod:`pipeline.tasks.lm_report`) into ``<run_dir>/evaluation``
and lists its files in :attr:`EvaluationResult.artifacts`. It runs on the GPU when ``train.device``
allows one and CUDA is available (dynamic evaluation with batch 1 is impractical on a CPU for the
large models), else on the CPU.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from models import RecurrentLM, detach_state
from pipeline.config import PipelineConfig
from pipeline.data import DatasetManifest, evaluation_windows, load_tokens

__all__ = ["EvaluationResult", "bits_per_token", "evaluate_model", "evaluate_nll", "scan_temperature", "temperature_grid"]

#: The folder of ``run_dir`` that holds the evaluation report (also its MLflow artifact folder).
REPORT_DIR = "evaluation"


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
    is restored afterwards. The windows go to the model's device. Logits are divided by each
    temperature. ``progress_desc``: show progress (tokens scored) under this name.
    """
    from pipeline.console import progress

    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    tokens = _limit(tokens, max_tokens)
    bar = progress(max(len(tokens) - 1, 0), progress_desc or "", "tok", disable=progress_desc is None, leave=False)
    try:
        temps = torch.tensor(list(temperatures), dtype=torch.float32)
        totals = torch.zeros(len(temps), dtype=torch.float64, device=device)
        count = 0
        state = None
        for batch in evaluation_windows(tokens, batch_size, bptt):
            if state is None or batch.reset_state:
                state = model.initial_state(batch.inputs.shape[1])
            logits, state = model(batch.inputs.to(device), state)
            state = detach_state(state)
            targets = batch.targets.reshape(-1).to(device)
            flat = logits.reshape(-1, logits.shape[-1])
            for k, t in enumerate(temps.tolist()):
                # Scoring every temperature from the same logits costs one log_softmax each, not a pass each.
                nll = F.cross_entropy(flat / t, targets, reduction="sum")
                totals[k] += nll.double()
            count += targets.numel()
            bar.update(targets.numel())
        if count == 0:
            raise ValueError("nothing to evaluate: the token array is shorter than one window")
        return (totals.cpu() / count).tolist(), count
    finally:
        bar.close()
        model.train(was_training)


def temperature_grid(t_min: float, t_max: float, num: int) -> list[float]:
    """The temperatures a scan tries: ``linspace(t_min, t_max, num)`` rounded to 6 decimals, plus 1.0, sorted."""
    return sorted({round(float(t), 6) for t in np.linspace(t_min, t_max, num)} | {1.0})


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
    """The softmax temperature in :func:`temperature_grid` minimising validation NLL (ties: the one nearest
    1), and the mean NLL at every temperature of the grid."""
    grid = temperature_grid(t_min, t_max, num)
    losses, _ = evaluate_nll(model, valid_tokens, batch_size=batch_size, bptt=bptt, max_tokens=max_tokens, temperatures=grid,
                             progress_desc=progress_desc)
    table = dict(zip(grid, losses))
    best = min(grid, key=lambda t: (table[t], abs(t - 1.0)))
    return best, table


@dataclass
class EvaluationResult:
    """Final metrics of a model; ``*_nll`` in nats/token (bits per character and perplexity in :meth:`metrics`).

    Static: ``valid_nll`` / ``test_nll`` at T = 1, ``*_nll_tuned`` at the validation-tuned ``temperature``.
    Dynamic evaluation (None unless ``evaluate.dynamic.enabled``): ``dynamic_valid_nll`` / ``dynamic_test_nll``
    at T = 1, ``dynamic_*_nll_tuned`` at ``dynamic_temperature``, with the settings ``dynamic_lr`` (η),
    ``dynamic_decay`` (λ), ``dynamic_epsilon`` (ε) and ``dynamic_window``. Monte Carlo dropout (None unless
    ``evaluate.mc_dropout.samples`` > 0): ``mc_*_nll_arithmetic`` / ``mc_*_nll_geometric`` from
    ``mc_samples`` samples with the dropout rates times ``mc_rate_multiplier``. ``artifacts``: the report's
    files. Results saved before a field existed load with its default.
    """

    unit: str
    temperature: float
    valid_nll: float
    test_nll: float
    valid_nll_tuned: float
    test_nll_tuned: float
    valid_tokens: int
    test_tokens: int
    dynamic_valid_nll: float | None = None
    dynamic_test_nll: float | None = None
    dynamic_temperature: float | None = None
    dynamic_valid_nll_tuned: float | None = None
    dynamic_test_nll_tuned: float | None = None
    dynamic_lr: float | None = None
    dynamic_decay: float | None = None
    dynamic_epsilon: float | None = None
    dynamic_window: int | None = None
    mc_valid_nll_arithmetic: float | None = None
    mc_test_nll_arithmetic: float | None = None
    mc_valid_nll_geometric: float | None = None
    mc_test_nll_geometric: float | None = None
    mc_samples: int | None = None
    mc_rate_multiplier: float | None = None
    artifacts: list[str] = field(default_factory=list)

    def nlls(self) -> dict[str, float]:
        """Every NLL that was computed, by metric name (``<split>_nll[<method suffix>]``)."""
        named = {
            "valid_nll": self.valid_nll, "test_nll": self.test_nll,
            "valid_nll_tuned_temperature": self.valid_nll_tuned, "test_nll_tuned_temperature": self.test_nll_tuned,
            "valid_nll_dynamic": self.dynamic_valid_nll, "test_nll_dynamic": self.dynamic_test_nll,
            "valid_nll_dynamic_tuned_temperature": self.dynamic_valid_nll_tuned,
            "test_nll_dynamic_tuned_temperature": self.dynamic_test_nll_tuned,
            "valid_nll_mc_arithmetic": self.mc_valid_nll_arithmetic, "test_nll_mc_arithmetic": self.mc_test_nll_arithmetic,
            "valid_nll_mc_geometric": self.mc_valid_nll_geometric, "test_nll_mc_geometric": self.mc_test_nll_geometric,
        }
        return {k: float(v) for k, v in named.items() if v is not None}

    def metrics(self) -> dict[str, float]:
        """Every number as a metric: the NLLs (:meth:`nlls`), each also as ``*_bpc`` (character data) or
        ``*_ppl`` (word data) in its place (``valid_nll_dynamic`` -> ``valid_bpc_dynamic``), and the settings
        (``temperature``, ``dynamic_temperature``, ``dynamic_lr`` / ``_decay`` / ``_epsilon`` / ``_window``,
        ``mc_samples``, ``mc_rate_multiplier``) of the methods that ran."""
        out: dict[str, float] = {"temperature": self.temperature}
        nlls = self.nlls()
        out.update(nlls)
        for name, nll in nlls.items():
            if self.unit == "char":
                out[name.replace("_nll", "_bpc", 1)] = bits_per_token(nll)
            else:
                out[name.replace("_nll", "_ppl", 1)] = math.exp(nll)
        for name in ("dynamic_temperature", "dynamic_lr", "dynamic_decay", "dynamic_epsilon", "dynamic_window",
                     "mc_samples", "mc_rate_multiplier"):
            value = getattr(self, name)
            if value is not None:
                out[name] = float(value)
        return out


def _device(config: PipelineConfig) -> torch.device:
    """CUDA when ``train.device`` allows it and a GPU is there, else the CPU."""
    if config.train.device != "cpu" and torch.cuda.is_available():
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _report_notes(config: PipelineConfig, result: EvaluationResult, dynamic, mc_tokens: int | None) -> list[str]:
    ev = config.evaluate
    notes = [
        f"Weights: the run's final (reported) weights. Static and MC: batch {ev.batch_size} stripes, windows of "
        f"{ev.bptt} tokens, state carried; {result.valid_tokens:,} valid / {result.test_tokens:,} test tokens scored.",
        "Softmax temperature T divides the logits (deepmind/lamb's multiplier t is 1/T); tuned on valid over "
        f"{len(temperature_grid(ev.temperature.min, ev.temperature.max, ev.temperature.num))} temperatures in "
        f"[{ev.temperature.min}, {ev.temperature.max}] (plus 1).",
    ]
    if dynamic is not None:
        d, tuning = ev.dynamic, dynamic.tuning
        tuned = (f"tuned with Optuna TPE (seed {config.train.seed}), {tuning.trials} trials ({tuning.diverged} diverged) "
                 f"on the first {min(d.tune_tokens, dynamic.valid_tokens):,} valid tokens, ranges of thesis Table 2.6"
                 if tuning.trials else "fixed in the config")
        notes.append(
            f"Dynamic evaluation (Krause et al. 2017, RMS variant): batch {d.stripes}, window "
            f"{dynamic.settings.window}; each window scored before its update; settings {tuned}. Gradient statistics: "
            f"{dynamic.statistics_tokens:,} training tokens in batches of {d.grad_batch_size}. Its tuned T is chosen on "
            "its own valid pass (updates follow the T = 1 loss).")
        if math.isnan(dynamic.valid_nll) or math.isnan(dynamic.test_nll):
            notes.append("Dynamic evaluation diverged (NaN) with the tuned settings on a split longer than the tuning "
                         "prefix: raise evaluate.dynamic.tune_tokens, or fix lower learning_rate / higher epsilon.")
    if result.mc_samples is not None:
        notes.append(
            f"MC dropout: {result.mc_samples} dropout masks per token, every dropout rate x {result.mc_rate_multiplier} "
            f"(capped below 1), each sample with its own recurrent state, T = 1; {mc_tokens:,} tokens per split. "
            "Arithmetic: log of the mean probability; geometric: renormalised mean log-probability.")
    return notes


def evaluate_model(model: RecurrentLM, config: PipelineConfig, manifest: DatasetManifest) -> EvaluationResult:
    """Score valid and test with and without the validation-tuned softmax temperature, with dynamic
    evaluation and Monte Carlo dropout when the config asks for them, and write the report."""
    from pipeline.tasks.lm_dynamic_tuning import evaluate_dynamic
    from pipeline.tasks.lm_mc_dropout import mc_dropout_nll
    from pipeline.tasks.lm_report import write_report

    ev = config.evaluate
    model.to(_device(config))
    valid = _limit(load_tokens(config.data_dir, "valid"), ev.max_tokens)
    test = _limit(load_tokens(config.data_dir, "test"), ev.max_tokens)
    best_t, table = scan_temperature(
        model, valid, batch_size=ev.batch_size, bptt=ev.bptt,
        t_min=ev.temperature.min, t_max=ev.temperature.max, num=ev.temperature.num, progress_desc="evaluate valid (T scan)",
    )
    (valid_nll_1,), valid_count = evaluate_nll(
        model, valid, batch_size=ev.batch_size, bptt=ev.bptt, temperatures=(1.0,), progress_desc="evaluate valid",
    )
    (test_nll_1, test_nll_t), test_count = evaluate_nll(
        model, test, batch_size=ev.batch_size, bptt=ev.bptt, temperatures=(1.0, best_t), progress_desc="evaluate test",
    )
    result = EvaluationResult(
        unit=manifest.unit, temperature=best_t, valid_nll=valid_nll_1, test_nll=test_nll_1,
        valid_nll_tuned=table[best_t], test_nll_tuned=test_nll_t, valid_tokens=valid_count, test_tokens=test_count,
    )
    dynamic = None
    if ev.dynamic.enabled:
        dynamic = evaluate_dynamic(
            model, ev.dynamic, unit=manifest.unit, train=load_tokens(config.data_dir, "train"), valid=valid, test=test,
            temperatures=temperature_grid(ev.temperature.min, ev.temperature.max, ev.temperature.num),
            seed=config.train.seed)
        result.dynamic_valid_nll, result.dynamic_test_nll = dynamic.valid_nll, dynamic.test_nll
        result.dynamic_temperature = dynamic.temperature
        result.dynamic_valid_nll_tuned, result.dynamic_test_nll_tuned = dynamic.valid_nll_tuned, dynamic.test_nll_tuned
        s = dynamic.settings
        result.dynamic_lr, result.dynamic_decay, result.dynamic_epsilon, result.dynamic_window = (
            s.lr, s.decay, s.epsilon, s.window)
    mc_tokens = None
    if ev.mc_dropout.samples > 0:
        mc = ev.mc_dropout
        for offset, (split, tokens) in enumerate((("valid", valid), ("test", test)), start=1):
            scores = mc_dropout_nll(model, tokens, samples=mc.samples, rate_multiplier=mc.rate_multiplier,
                                    batch_size=ev.batch_size, bptt=ev.bptt, seed=config.train.seed + offset,
                                    progress_desc=f"evaluate {split} (MC dropout)")
            setattr(result, f"mc_{split}_nll_arithmetic", scores.arithmetic)
            setattr(result, f"mc_{split}_nll_geometric", scores.geometric)
            mc_tokens = scores.tokens
        result.mc_samples, result.mc_rate_multiplier = mc.samples, mc.rate_multiplier
    paths = write_report(result.metrics(), config.run_dir / REPORT_DIR, unit=manifest.unit,
                         title=f"{config.name}: final evaluation",
                         notes=_report_notes(config, result, dynamic, mc_tokens))
    result.artifacts = [str(p) for p in paths]
    return result
