"""Monte Carlo dropout evaluation: the two means in closed form, zero dropout = deterministic evaluation,
an independent re-computation of the per-sample states and averages, and the dropout-rate scaling."""

from __future__ import annotations

import copy
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from models import ModelConfig, RecurrentLM
from pipeline.tasks.lm_evaluation import evaluate_nll
from pipeline.tasks.lm_mc_dropout import MAX_DROPOUT_RATE, SampleAverage, dropout_fields, mc_dropout_nll, scaled_dropout

V = 17
RATES = dict(input_dropout=0.2, state_dropout=0.3, cell_output_dropout=0.25, output_dropout=0.4, embedding_dropout=0.1,
             weight_drop=0.5)


pytestmark = pytest.mark.usefixtures("one_thread")


def _model(**rates) -> RecurrentLM:
    torch.manual_seed(0)
    model = RecurrentLM(ModelConfig(vocab_size=V, hidden_size=10, num_layers=2, mogrifier_rounds=1, **rates)).double()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.add_(torch.randn_like(p) * 0.3)
    return model


def _tokens(n: int, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, V, size=n).astype(np.int64)


def test_the_two_means_in_closed_form():
    # Two samples over a vocabulary of 2: p1 = (0.5, 0.5), p2 = (0.9, 0.1).
    average = SampleAverage()
    average.add(torch.tensor([[0.5, 0.5]], dtype=torch.float64).log())
    average.add(torch.tensor([[0.9, 0.1]], dtype=torch.float64).log())
    targets = torch.tensor([0])
    assert average.arithmetic(targets).item() == pytest.approx(math.log(0.7), rel=1e-12)
    assert average.arithmetic(torch.tensor([1])).item() == pytest.approx(math.log(0.3), rel=1e-12)
    g0, g1 = math.sqrt(0.5 * 0.9), math.sqrt(0.5 * 0.1)  # geometric means, then renormalised
    assert average.geometric(targets).item() == pytest.approx(math.log(g0 / (g0 + g1)), rel=1e-12)
    assert average.geometric(torch.tensor([1])).item() == pytest.approx(math.log(g1 / (g0 + g1)), rel=1e-12)
    # Three samples, shapes [T, B, V] = [1, 2, 3]; the arithmetic mean of the probabilities by hand.
    probs = torch.tensor([[[[0.2, 0.3, 0.5], [0.6, 0.2, 0.2]]], [[[0.1, 0.1, 0.8], [0.3, 0.3, 0.4]]],
                          [[[0.4, 0.4, 0.2], [0.5, 0.25, 0.25]]]], dtype=torch.float64)
    average = SampleAverage()
    for p in probs:
        average.add(p.log())
    targets = torch.tensor([[2, 0]])
    assert average.arithmetic(targets)[0].tolist() == pytest.approx([math.log(1.5 / 3), math.log(1.4 / 3)], rel=1e-12)
    geo = probs.prod(0) ** (1 / 3)
    want = (geo / geo.sum(-1, keepdim=True)).log().gather(-1, targets.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(average.geometric(targets), want, rtol=1e-12, atol=0)
    with pytest.raises(ValueError, match="no samples"):
        SampleAverage().arithmetic(targets)


@pytest.mark.parametrize("with_rates", [False, True])
def test_zero_dropout_equals_deterministic_evaluation(with_rates):
    # No dropout in the model, or dropout scaled by 0: every sample is the deterministic model.
    model = _model(**(RATES if with_rates else {}))
    tokens = _tokens(103)
    (det,), count = evaluate_nll(model, tokens, batch_size=2, bptt=7)
    out = mc_dropout_nll(model, tokens, samples=3, rate_multiplier=0.0 if with_rates else 1.0, batch_size=2, bptt=7,
                         seed=1)
    assert out.tokens == count == 2 * 50
    assert out.arithmetic == pytest.approx(det, abs=1e-6)
    assert out.geometric == pytest.approx(det, abs=1e-6)
    assert abs(out.arithmetic - det) < 1e-12 and abs(out.geometric - det) < 1e-12  # in fact exact in float64


def test_mc_dropout_matches_an_independent_computation():
    """N samples each carrying its own state; the probabilities averaged explicitly (exp, mean, log)."""
    model = _model(**RATES)
    tokens = _tokens(2 * 13 + 1, seed=4)
    samples, multiplier, bptt = 3, 0.8, 5
    out = mc_dropout_nll(model, tokens, samples=samples, rate_multiplier=multiplier, batch_size=2, bptt=bptt, seed=7)

    ref = copy.deepcopy(model).train()
    ref.config = ref.config.model_copy(update={k: v * multiplier for k, v in RATES.items()})
    for layer in ref.layers:
        layer.weight_drop = RATES["weight_drop"] * multiplier
    torch.manual_seed(7)  # the same masks: the same draws in the same order (window by window, sample by sample)
    data = torch.as_tensor(tokens[:26].reshape(2, 13))
    states = [None] * samples
    arithmetic = geometric = 0.0
    count = 0
    for pos in range(0, 12, bptt):
        length = min(bptt, 12 - pos)
        inputs, targets = data[:, pos:pos + length].T, data[:, pos + 1:pos + 1 + length].T
        probs = []
        for k in range(samples):
            with torch.no_grad():
                logits, states[k] = ref(inputs, states[k])
            probs.append(F.softmax(logits, dim=-1))
        probs = torch.stack(probs)  # [N, T, B, V]
        mean = probs.mean(0)
        geo = probs.log().mean(0).exp()
        geo = geo / geo.sum(-1, keepdim=True)
        arithmetic -= mean.gather(-1, targets.unsqueeze(-1)).log().sum().item()
        geometric -= geo.gather(-1, targets.unsqueeze(-1)).log().sum().item()
        count += targets.numel()
    assert out.tokens == count == 24
    assert out.arithmetic == pytest.approx(arithmetic / count, rel=1e-10)
    assert out.geometric == pytest.approx(geometric / count, rel=1e-10)
    # Different masks than the deterministic model, and reproducible from the seed.
    (det,), _ = evaluate_nll(model, tokens, batch_size=2, bptt=bptt)
    assert abs(out.arithmetic - det) > 1e-4
    again = mc_dropout_nll(model, tokens, samples=samples, rate_multiplier=multiplier, batch_size=2, bptt=bptt, seed=7)
    assert (again.arithmetic, again.geometric) == (out.arithmetic, out.geometric)
    assert model.training and model.config.output_dropout == RATES["output_dropout"]


def test_scaled_dropout_scales_every_rate_by_name_and_restores_them():
    model = _model(**RATES)
    original = model.config
    assert set(dropout_fields(original)) == set(RATES)
    with scaled_dropout(model, 1.5) as rates:
        for name, rate in RATES.items():
            assert getattr(model.config, name) == pytest.approx(min(rate * 1.5, MAX_DROPOUT_RATE)) == rates[name]
        assert model.config.output_dropout == pytest.approx(0.6) and model.config.weight_drop == 0.75
        assert all(layer.weight_drop == 0.75 for layer in model.layers)
        assert model.config.hidden_size == original.hidden_size
    assert model.config is original and all(layer.weight_drop == 0.5 for layer in model.layers)
    with scaled_dropout(model, 3.0):  # capped below 1
        assert model.config.output_dropout == MAX_DROPOUT_RATE < 1 and model.config.weight_drop == MAX_DROPOUT_RATE
    with pytest.raises(RuntimeError, match="inside"):
        with scaled_dropout(model, 0.5):
            assert model.config.state_dropout == pytest.approx(0.15)
            raise RuntimeError("inside")
    assert model.config is original and model.layers[0].weight_drop == 0.5
    plain = _model()
    with scaled_dropout(plain, 2.0):
        assert all(getattr(plain.config, name) == 0.0 for name in RATES)
    with pytest.raises(ValueError, match="multiplier"):
        with scaled_dropout(plain, -1.0):
            pass
    with pytest.raises(ValueError, match="at least 1 sample"):
        mc_dropout_nll(plain, _tokens(20), samples=0, batch_size=1, bptt=4)
