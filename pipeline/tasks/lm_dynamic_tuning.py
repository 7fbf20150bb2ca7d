"""Dynamic evaluation as the thesis reports it: tuned on validation, then valid and test scored.

:func:`evaluate_dynamic` (driven by ``evaluate.dynamic``, :class:`pipeline.config.DynamicEvalConfig`):

1. gradient statistics on the start of the training split (``grad_tokens`` tokens in batches of
   ``grad_batch_size`` stripes and one window; :func:`~pipeline.tasks.lm_dynamic_eval.gradient_statistics`);
2. the learning rate η, decay λ and ε not fixed in the config (and the window with ``tune_window``)
   tuned with Optuna's TPE sampler (seeded, an in-memory study, ``trials`` trials) on the first
   ``tune_tokens`` validation tokens, within the ranges of thesis Table 2.6 (:data:`TABLE_2_6`, log
   spacing; window 1..20 word / 1..50 char, :data:`MAX_WINDOW`); a trial that diverges scores +inf;
3. validation scored with the tuned settings; every window is also scored at each temperature of the
   static scan's grid from the same logits (the updates always follow the T=1 loss), which tunes a
   softmax temperature for dynamic evaluation on that pass;
4. test scored with the tuned settings, at T=1 and at that temperature.

The window defaults to the thesis' largest (``max_time_steps`` null): 50 for character data, 20 for words.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from models import RecurrentLM
from pipeline.config import ConfigError, DynamicEvalConfig
from pipeline.tasks.lm_dynamic_eval import DynamicSettings, GradientStatistics, dynamic_nll, gradient_statistics, stripe_length

__all__ = ["MAX_WINDOW", "TABLE_2_6", "DynamicEvaluation", "TuningOutcome", "evaluate_dynamic", "tune_dynamic_settings"]

log = logging.getLogger(__name__)

#: Thesis Table 2.6: tuning ranges (low, high) of dynamic evaluation, all log-spaced.
TABLE_2_6: dict[str, tuple[float, float]] = {"lr": (1e-6, 1e-3), "decay": (1e-6, 1e-2), "epsilon": (1e-8, 1e-2)}
#: Thesis §2.A: "The highest possible value for max_time_steps ... was 20 for word, and 50 for character-level tasks."
MAX_WINDOW: dict[str, int] = {"word": 20, "char": 50}


@dataclass
class TuningOutcome:
    """The settings :func:`tune_dynamic_settings` chose, the tuning prefix's mean NLL with them (None when
    nothing was tuned), and how many trials ran and how many of those diverged."""

    settings: DynamicSettings
    best_nll: float | None
    trials: int
    diverged: int


@dataclass
class DynamicEvaluation:
    """Dynamic evaluation of valid and test (nats/token) with ``settings``, at T=1 and at ``temperature``
    (chosen on the validation pass), and how the settings were found."""

    settings: DynamicSettings
    valid_nll: float
    test_nll: float
    temperature: float
    valid_nll_tuned: float
    test_nll_tuned: float
    valid_tokens: int
    test_tokens: int
    tuning: TuningOutcome
    statistics_tokens: int


def tune_dynamic_settings(
    model: RecurrentLM,
    tokens: np.ndarray,
    statistics: Callable[[int], GradientStatistics],
    *,
    fixed: dict[str, float | None],
    window: int,
    tune_window: bool,
    trials: int,
    seed: int,
    batch_size: int = 1,
    progress_desc: str | None = None,
) -> TuningOutcome:
    """Minimise the dynamic-evaluation NLL of ``tokens`` (the validation prefix) over the settings.

    ``fixed``: ``lr`` / ``decay`` / ``epsilon`` -> a value, or None to tune it in :data:`TABLE_2_6`.
    ``window``: the window, or with ``tune_window`` the largest one tried (from 1). ``statistics(w)``:
    the gradient statistics for window ``w`` (called once per window tried). Nothing to tune: no trial runs.
    """
    import optuna

    from pipeline.console import progress

    free = [name for name in ("lr", "decay", "epsilon") if fixed.get(name) is None]
    if not free and not tune_window:
        return TuningOutcome(DynamicSettings(float(fixed["lr"]), float(fixed["decay"]), float(fixed["epsilon"]), window),
                             best_nll=None, trials=0, diverged=0)

    def settings_of(params: dict) -> DynamicSettings:
        values = {name: params.get(name, fixed.get(name)) for name in ("lr", "decay", "epsilon")}
        return DynamicSettings(float(values["lr"]), float(values["decay"]), float(values["epsilon"]),
                               int(params.get("window", window)))

    diverged, best = 0, math.inf
    bar = progress(trials, progress_desc or "", "trial", disable=progress_desc is None, leave=False)

    def objective(trial: optuna.Trial) -> float:
        nonlocal diverged, best
        params = {name: trial.suggest_float(name, *TABLE_2_6[name], log=True) for name in free}
        if tune_window:
            params["window"] = trial.suggest_int("window", 1, window)
        settings = settings_of(params)
        (nll,), _ = dynamic_nll(model, tokens, statistics(settings.window), settings, batch_size=batch_size)
        bar.update(1)
        log.debug("dynamic evaluation trial %d: %s -> %s", trial.number, settings, nll)
        if not math.isfinite(nll):
            diverged += 1
            return math.inf  # worse than any finite trial; TPE keeps learning from it
        best = min(best, nll)
        bar.set_postfix(best=f"{best:.4f}")
        return nll

    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no INFO line per trial on stderr
    try:
        study = optuna.create_study(direction="minimize", sampler=optuna.samplers.TPESampler(seed=seed))
        study.optimize(objective, n_trials=trials)
    finally:
        optuna.logging.set_verbosity(verbosity)
        bar.close()
    if not math.isfinite(study.best_value):
        raise RuntimeError(f"dynamic evaluation diverged in all {trials} tuning trials: fix evaluate.dynamic."
                           "learning_rate / decay_rate / epsilon, or check the model")
    return TuningOutcome(settings_of(study.best_params), best_nll=float(study.best_value), trials=len(study.trials),
                         diverged=diverged)


def _check_sizes(cfg: DynamicEvalConfig, window: int, splits: dict[str, int], train_tokens: int) -> None:
    """Clear errors (naming the fields to change) when a window does not fit the data it reads."""
    for split, n in splits.items():
        per_stripe = stripe_length(n, cfg.stripes) - 1
        if per_stripe < window:
            what = "evaluate.dynamic.tune_tokens" if split == "tuning prefix" else "evaluate.max_tokens"
            raise ConfigError(
                f"dynamic evaluation window ({window} tokens, evaluate.dynamic.max_time_steps) is larger than the {split}"
                f" ({n:,} tokens in {cfg.stripes} stripe(s) of {max(per_stripe, 0):,} predictions): lower "
                f"evaluate.dynamic.max_time_steps or evaluate.dynamic.stripes, or raise {what}")
    per_stripe = stripe_length(train_tokens, cfg.grad_batch_size) - 1
    if per_stripe < window:
        raise ConfigError(
            f"the gradient statistics read {train_tokens:,} training tokens in evaluate.dynamic.grad_batch_size = "
            f"{cfg.grad_batch_size} stripes of {max(per_stripe, 0):,} predictions, fewer than one window ({window}): "
            "raise evaluate.dynamic.grad_tokens or lower grad_batch_size")


def evaluate_dynamic(
    model: RecurrentLM,
    cfg: DynamicEvalConfig,
    *,
    unit: str,
    train: np.ndarray,
    valid: np.ndarray,
    test: np.ndarray,
    temperatures: Sequence[float],
    seed: int,
) -> DynamicEvaluation:
    """Tune dynamic evaluation on (a prefix of) ``valid`` and score ``valid`` and ``test`` with it (see the
    module docstring). ``valid`` / ``test``: the token arrays to score (already cut to evaluate.max_tokens);
    ``temperatures``: the static scan's grid (T=1 included); ``seed``: the TPE sampler's seed."""
    window = cfg.max_time_steps or MAX_WINDOW[unit]
    tune_prefix = valid[: cfg.tune_tokens + 1]
    train = train if cfg.grad_tokens is None else train[: cfg.grad_tokens + 1]
    _check_sizes(cfg, window, {"valid": len(valid), "test": len(test), "tuning prefix": len(tune_prefix)}, len(train))
    cache: dict[int, GradientStatistics] = {}

    def statistics(w: int) -> GradientStatistics:
        if w not in cache:
            cache[w] = gradient_statistics(model, train, batch_size=cfg.grad_batch_size, window=w)
        return cache[w]

    statistics(window)  # the default window's statistics first: a clear error before any tuning
    tuning = tune_dynamic_settings(
        model, tune_prefix, statistics, fixed={"lr": cfg.learning_rate, "decay": cfg.decay_rate, "epsilon": cfg.epsilon},
        window=window, tune_window=cfg.tune_window, trials=cfg.trials, seed=seed, batch_size=cfg.stripes,
        progress_desc="dynamic evaluation tuning")
    settings = tuning.settings
    log.info("dynamic evaluation settings: %s (tuning NLL %s, %d trials, %d diverged)", settings, tuning.best_nll,
             tuning.trials, tuning.diverged)
    stats = statistics(settings.window)
    grid = sorted(set(temperatures) | {1.0})
    valid_losses, valid_count = dynamic_nll(model, valid, stats, settings, batch_size=cfg.stripes, temperatures=grid,
                                            progress_desc="evaluate valid (dynamic)")
    table = dict(zip(grid, valid_losses))
    finite = [t for t in grid if math.isfinite(table[t])]
    best_t = min(finite, key=lambda t: (table[t], abs(t - 1.0))) if finite else 1.0
    (test_1, test_t), test_count = dynamic_nll(model, test, stats, settings, batch_size=cfg.stripes,
                                               temperatures=(1.0, best_t), progress_desc="evaluate test (dynamic)")
    for split, nll in (("valid", table[1.0]), ("test", test_1)):
        if math.isnan(nll):
            log.warning("dynamic evaluation diverged (NaN) on %s with %s, tuned on the first %s validation tokens: "
                        "raise evaluate.dynamic.tune_tokens, or fix lower rates", split, settings, f"{cfg.tune_tokens:,}")
    return DynamicEvaluation(
        settings=settings, valid_nll=table[1.0], test_nll=test_1, temperature=best_t, valid_nll_tuned=table[best_t],
        test_nll_tuned=test_t, valid_tokens=valid_count, test_tokens=test_count, tuning=tuning,
        statistics_tokens=stats.tokens)
