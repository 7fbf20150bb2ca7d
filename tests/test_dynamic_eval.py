"""Dynamic evaluation (Krause et al. 2017, RMS variant): gradient statistics, the update, weight restoring,
Optuna tuning and the sizes it checks - against computations written out here on tiny float64 models."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, RecurrentLM
from pipeline.config import ConfigError, DynamicEvalConfig
from pipeline.tasks.lm_dynamic_eval import (
    DynamicSettings,
    GradientStatistics,
    dynamic_evaluation_pass,
    dynamic_nll,
    gradient_statistics,
)
from pipeline.tasks.lm_dynamic_tuning import MAX_WINDOW, TABLE_2_6, evaluate_dynamic, tune_dynamic_settings

V = 13


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(seed: int = 0, **kw) -> RecurrentLM:
    torch.manual_seed(seed)
    cfg = dict(vocab_size=V, hidden_size=8, num_layers=2, mogrifier_rounds=2, input_dropout=0.3, state_dropout=0.3,
               cell_output_dropout=0.3, output_dropout=0.3)
    cfg.update(kw)
    model = RecurrentLM(ModelConfig(**cfg)).double()
    with torch.no_grad():  # biases away from 0 so that every parameter has a gradient
        for name, p in model.named_parameters():
            if "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _tokens(n: int, seed: int = 1) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.int64)


def _window_loss(model, inputs, targets, state):
    """Mean cross-entropy of one window [T, 1] and the state after it (eval mode)."""
    logits, new_state = model(torch.as_tensor(inputs).view(-1, 1), state)
    nll = F.cross_entropy(logits.reshape(-1, V), torch.as_tensor(targets).view(-1), reduction="sum")
    return nll, new_state


def _hand_statistics(model, train: np.ndarray, rows: int, window: int):
    """MS and the normaliser from an explicit loop over the training windows (rows stripes)."""
    ref = copy.deepcopy(model).eval()
    params = list(ref.parameters())
    stripe = len(train) // rows
    data = torch.as_tensor(train[: rows * stripe].reshape(rows, stripe))
    squares = [torch.zeros_like(p) for p in params]
    batches, state, pos = 0, None, 0
    while pos < stripe - 1:
        length = min(window, stripe - 1 - pos)
        inputs, targets = data[:, pos:pos + length].T, data[:, pos + 1:pos + 1 + length].T
        logits, state = ref(inputs, state)
        loss = F.cross_entropy(logits.reshape(-1, V), targets.reshape(-1))  # the mean
        grads = torch.autograd.grad(loss, params)
        state = [(h.detach(), c.detach()) for h, c in state]
        for s, g in zip(squares, grads):
            s += g ** 2
        batches += 1
        pos += length
    ms = [torch.sqrt(s / batches) for s in squares]
    normaliser = sum(m.mean().item() for m in ms) / len(ms)
    return ms, normaliser, batches


def test_gradient_statistics_match_an_explicit_loop():
    model = _model()
    train = _tokens(3 * 23 + 2, seed=5)  # 3 stripes of 23 tokens: windows of 7, 7, 7 and 1
    stats = gradient_statistics(model, train, batch_size=3, window=7)
    ms, normaliser, batches = _hand_statistics(model, train, 3, 7)
    assert stats.batches == batches == 4 and stats.tokens == 3 * 22 and stats.window == 7
    assert stats.normaliser == pytest.approx(normaliser, rel=1e-12)
    for got, want in zip(stats.ms, ms):
        torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-15)
    for got, want in zip(stats.decay_rates(), ms):
        torch.testing.assert_close(got, want / normaliser, rtol=1e-12, atol=1e-15)
    # max_tokens caps what is read; the model is left as it was (weights, grads, mode).
    capped = gradient_statistics(model, train, batch_size=3, window=7, max_tokens=30)
    assert capped.tokens == 3 * 9
    assert model.training and all(p.grad is None for p in model.parameters())


def test_two_window_pass_matches_hand_computed_updates():
    """Window 1 scored with θ₀, the update, window 2 scored with θ₁ (state carried), the second update."""
    model = _model()
    stats = gradient_statistics(model, _tokens(401, seed=7), batch_size=4, window=5)
    window = 6
    tokens = _tokens(2 * window + 1, seed=3)  # batch 1: exactly two windows of 6 predictions
    # λ = 0.5: 1/λ = 2 clips the decay rates above 2 (some do: the check below makes sure).
    settings = DynamicSettings(lr=3e-3, decay=0.5, epsilon=1e-3, window=window)
    assert any((d > 2).any() for d in stats.decay_rates()) and any((d < 2).any() for d in stats.decay_rates())

    # By hand, on a copy: explicit autograd and the update rule written out.
    ref = copy.deepcopy(model).eval()
    params = list(ref.parameters())
    theta0 = [p.detach().clone() for p in params]
    clipped = [torch.minimum(m / stats.normaliser, torch.full_like(m, 1 / settings.decay)) for m in stats.ms]
    total, state = 0.0, None
    for w in range(2):
        inputs, targets = tokens[w * window:(w + 1) * window], tokens[w * window + 1:(w + 1) * window + 1]
        nll, state = _window_loss(ref, inputs, targets, state)
        state = [(h.detach(), c.detach()) for h, c in state]
        total += nll.item()
        grads = torch.autograd.grad(nll / window, params)
        with torch.no_grad():
            for p, g, p0, ms, d in zip(params, grads, theta0, stats.ms, clipped):
                p.copy_(p + settings.decay * d * (p0 - p) - settings.lr * g / (ms + settings.epsilon))

    # Static NLL of the same windows with θ₀, for contrast: the pass must differ from it (it adapted).
    static = _window_loss(copy.deepcopy(model).eval(), tokens[:-1], tokens[1:], None)[0].item()

    got_total, scored, count = dynamic_evaluation_pass(model, tokens, stats, settings, temperatures=(1.0, 1.3))
    assert count == 2 * window
    assert got_total == pytest.approx(total, rel=1e-12)
    assert scored[0] == pytest.approx(total, rel=1e-12)
    assert abs(got_total - static) > 1e-6
    for got, want in zip(model.parameters(), params):
        torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-12, atol=1e-14)
    # The θ change is real (not a no-op update) and the model is left in training mode, as it was.
    assert any(not torch.equal(p.detach(), p0) for p, p0 in zip(model.parameters(), theta0))
    assert model.training


def test_no_decay_is_plain_rms_steps_and_window_one():
    model = _model(seed=2)
    stats = gradient_statistics(model, _tokens(200, seed=8), batch_size=2, window=3)
    tokens = _tokens(4, seed=9)  # three windows of one token
    settings = DynamicSettings(lr=1e-2, decay=0.0, epsilon=1e-4, window=1)
    ref = copy.deepcopy(model).eval()
    params = list(ref.parameters())
    total, state = 0.0, None
    for t in range(3):
        nll, state = _window_loss(ref, tokens[t:t + 1], tokens[t + 1:t + 2], state)
        state = [(h.detach(), c.detach()) for h, c in state]
        total += nll.item()
        grads = torch.autograd.grad(nll, params)
        with torch.no_grad():
            for p, g, ms in zip(params, grads, stats.ms):
                p.sub_(settings.lr * g / (ms + settings.epsilon))
    got, _, count = dynamic_evaluation_pass(model, tokens, stats, settings)
    assert count == 3 and got == pytest.approx(total, rel=1e-12)
    for a, b in zip(model.parameters(), params):
        torch.testing.assert_close(a.detach(), b.detach(), rtol=1e-12, atol=1e-14)


def test_dynamic_nll_restores_the_weights_also_on_error():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    stats = gradient_statistics(model, _tokens(200), batch_size=2, window=4)
    settings = DynamicSettings(lr=1e-3, decay=1e-3, epsilon=1e-5, window=4)
    tokens = _tokens(41)
    (nll, nll_hot), count = dynamic_nll(model, tokens, stats, settings, temperatures=(1.0, 1.2))
    assert count == 40 and math.isfinite(nll) and nll != nll_hot
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    # The same pass again gives the same number: it starts from the restored weights.
    assert dynamic_nll(model, tokens, stats, settings)[0][0] == pytest.approx(nll, rel=1e-13)
    bad = tokens.copy()
    bad[20] = V + 5  # an id past the vocabulary: the third window raises after two updates
    with pytest.raises(IndexError):
        dynamic_nll(model, bad, stats, settings)
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))
    assert model.training and all(p.requires_grad for p in model.parameters())


def test_a_diverging_pass_stops_with_nan_and_restores_the_weights():
    model = _model()
    before = [p.detach().clone() for p in model.parameters()]
    stats = gradient_statistics(model, _tokens(200), batch_size=2, window=4)
    wild = DynamicSettings(lr=1e300, decay=0.0, epsilon=1e-12, window=4)  # weights overflow to inf
    total, scored, count = dynamic_evaluation_pass(model, _tokens(81), stats, wild, temperatures=(1.0, 1.1))
    assert math.isnan(total) and all(math.isnan(x) for x in scored) and count == 80
    model = _model()
    (nll,), count = dynamic_nll(model, _tokens(81), stats, wild)
    assert math.isnan(nll) and count == 80
    assert all(torch.equal(p.detach(), b) for p, b in zip(model.parameters(), before))


def test_settings_and_statistics_are_checked():
    with pytest.raises(ValueError, match="lr"):
        DynamicSettings(lr=0.0, decay=0.1, epsilon=1e-3, window=2)
    with pytest.raises(ValueError, match="window"):
        DynamicSettings(lr=1e-3, decay=0.1, epsilon=1e-3, window=0)
    model = _model()
    with pytest.raises(ValueError, match="2 tokens per stripe"):
        gradient_statistics(model, _tokens(5), batch_size=4, window=2)
    other = GradientStatistics(ms=[torch.ones(1)], normaliser=1.0, batches=1, tokens=1, window=1)
    with pytest.raises(ValueError, match="compute them for this model"):
        dynamic_evaluation_pass(model, _tokens(10), other, DynamicSettings(1e-3, 0.1, 1e-3, 2))


def test_tuning_searches_table_2_6_reproducibly_and_fixed_values_are_kept():
    model = _model()
    train, prefix = _tokens(300, seed=11), _tokens(61, seed=12)
    cache: dict[int, GradientStatistics] = {}

    def stats(w):
        if w not in cache:
            cache[w] = gradient_statistics(model, train, batch_size=4, window=w)
        return cache[w]

    fixed = {"lr": None, "decay": None, "epsilon": None}
    first = tune_dynamic_settings(model, prefix, stats, fixed=fixed, window=5, tune_window=True, trials=6, seed=3)
    again = tune_dynamic_settings(model, prefix, stats, fixed=fixed, window=5, tune_window=True, trials=6, seed=3)
    assert first.settings == again.settings and first.trials == 6
    s = first.settings
    for name, value in (("lr", s.lr), ("decay", s.decay), ("epsilon", s.epsilon)):
        low, high = TABLE_2_6[name]
        assert low <= value <= high
    assert 1 <= s.window <= 5 and set(cache) <= set(range(1, 6))
    # The best trial's NLL is the dynamic NLL of the prefix with the chosen settings.
    assert first.best_nll == pytest.approx(dynamic_nll(model, prefix, stats(s.window), s)[0][0], rel=1e-12)
    # Fixed values are used as they are; only the others are tuned; nothing left to tune: no trial.
    part = tune_dynamic_settings(model, prefix, stats, fixed={"lr": 2e-4, "decay": None, "epsilon": 1e-3}, window=5,
                                 tune_window=False, trials=3, seed=0)
    assert part.settings.lr == 2e-4 and part.settings.epsilon == 1e-3 and part.settings.window == 5
    none = tune_dynamic_settings(model, prefix, stats, fixed={"lr": 2e-4, "decay": 1e-3, "epsilon": 1e-3}, window=4,
                                 tune_window=False, trials=3, seed=0)
    assert none.trials == 0 and none.best_nll is None and none.settings == DynamicSettings(2e-4, 1e-3, 1e-3, 4)


def test_evaluate_dynamic_reports_valid_and_test_and_checks_sizes():
    model = _model()
    train, valid, test = _tokens(400, seed=21), _tokens(81, seed=22), _tokens(61, seed=23)
    cfg = DynamicEvalConfig(enabled=True, max_time_steps=8, trials=3, tune_tokens=40, grad_batch_size=4, grad_tokens=200)
    out = evaluate_dynamic(model, cfg, unit="char", train=train, valid=valid, test=test, temperatures=[0.9, 1.0, 1.1],
                           seed=0)
    assert out.valid_tokens == 80 and out.test_tokens == 60 and out.statistics_tokens == 4 * 49
    assert out.settings.window == 8 and out.tuning.trials == 3
    assert out.temperature in (0.9, 1.0, 1.1) and out.valid_nll_tuned <= out.valid_nll
    stats = gradient_statistics(model, train[:201], batch_size=4, window=8)
    assert out.test_nll == pytest.approx(dynamic_nll(model, test, stats, out.settings)[0][0], rel=1e-12)
    # The default window is the thesis' largest; one that does not fit says which field to change.
    assert MAX_WINDOW == {"word": 20, "char": 50}
    with pytest.raises(ConfigError, match="max_time_steps.*larger than the test"):
        evaluate_dynamic(model, cfg.model_copy(update={"max_time_steps": None}), unit="char", train=train,
                         valid=_tokens(200), test=_tokens(31), temperatures=[1.0], seed=0)
    with pytest.raises(ConfigError, match="grad_tokens"):
        evaluate_dynamic(model, cfg.model_copy(update={"grad_tokens": 20}), unit="char", train=train, valid=valid,
                         test=test, temperatures=[1.0], seed=0)
