"""Multi-sample dropout objective (thesis §4.3)."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from models import ModelConfig, RecurrentLM, multi_sample_loss, multi_sample_nll


def _log_probs(D, T, B, V, seed=0, dtype=torch.float64):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(D, T, B, V, generator=gen, dtype=dtype) * 2
    targets = torch.randint(0, V, (T, B), generator=gen)
    lp = torch.log_softmax(logits, -1)
    return logits, targets, lp.gather(-1, targets.expand(D, T, B).unsqueeze(-1)).squeeze(-1)


def test_single_sample_equals_cross_entropy():
    logits, targets, tlp = _log_probs(1, 4, 3, 7)
    ce = F.cross_entropy(logits[0].reshape(-1, 7), targets.reshape(-1), reduction="none").view(4, 3)
    torch.testing.assert_close(multi_sample_nll(tlp), ce)


def test_identical_samples_equal_single_sample():
    logits, targets, tlp = _log_probs(1, 4, 3, 7)
    ce = F.cross_entropy(logits[0].reshape(-1, 7), targets.reshape(-1), reduction="none").view(4, 3)
    torch.testing.assert_close(multi_sample_nll(tlp.expand(5, 4, 3)), ce)


def test_hand_computed_example():
    # p_1 = 0.1, p_2 = 0.5  ->  -ln((0.1 + 0.5) / 2) = -ln 0.3 ; second token: 0.2, 0.2, -> -ln 0.2
    tlp = torch.log(torch.tensor([[[0.1, 0.2]], [[0.5, 0.2]]], dtype=torch.float64))  # [D=2, T=1, B=2]
    out = multi_sample_nll(tlp)
    assert out.shape == (1, 2)
    torch.testing.assert_close(out, torch.tensor([[-math.log(0.3), -math.log(0.2)]], dtype=torch.float64))
    # and it is not the mean of per-sample NLLs (the single-sample ELBO)
    assert not torch.allclose(out, -tlp.mean(0))


def test_numerically_stable_for_tiny_probabilities():
    tlp = torch.tensor([[[-1000.0]], [[-1001.0]]], dtype=torch.float64)
    out = multi_sample_nll(tlp)
    expected = 1000.0 - math.log((1 + math.exp(-1.0)) / 2)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, torch.tensor([[expected]], dtype=torch.float64))


def test_gradient_matches_naive_formula_and_finite_differences():
    _, _, tlp = _log_probs(3, 4, 2, 6, seed=1)
    a = tlp.clone().requires_grad_()
    b = tlp.clone().requires_grad_()
    multi_sample_nll(a).sum().backward()
    (-torch.log(torch.exp(b).mean(0))).sum().backward()  # naive -ln mean p
    torch.testing.assert_close(a.grad, b.grad)
    assert torch.autograd.gradcheck(multi_sample_nll, (tlp.clone().requires_grad_(),))


def test_rejects_bad_shapes():
    with pytest.raises(ValueError):
        multi_sample_nll(torch.zeros(3, 4))


class _ColumnModel(nn.Module):
    """Fake LM: logits depend on the batch column, so we can check the D*B layout."""

    def __init__(self, V, D, B):
        super().__init__()
        gen = torch.Generator().manual_seed(0)
        self.table = torch.randn(D * B, V, generator=gen, dtype=torch.float64) * 2
        self.seen_tokens = None

    def forward(self, tokens, state=None):
        self.seen_tokens = tokens
        T, cols = tokens.shape
        logits = self.table[:cols].expand(T, cols, -1) + 0.1 * tokens.unsqueeze(-1).double()
        return logits, ("state", state)


def test_multi_sample_loss_layout_and_value():
    T, B, D, V = 3, 2, 4, 5
    model = _ColumnModel(V, D, B)
    gen = torch.Generator().manual_seed(3)
    inputs = torch.randint(0, V, (T, B), generator=gen)
    targets = torch.randint(0, V, (T, B), generator=gen)
    loss, new_state = multi_sample_loss(model, inputs, targets, None, D)
    assert torch.equal(model.seen_tokens, inputs.repeat(1, D))
    assert new_state == ("state", None)
    # expected: sample d is columns d*B:(d+1)*B
    probs = torch.softmax(model.table[: D * B].expand(T, D * B, V) + 0.1 * inputs.repeat(1, D).unsqueeze(-1), -1)
    p_target = probs.gather(-1, targets.repeat(1, D).unsqueeze(-1)).squeeze(-1)  # [T, D*B]
    per_sample = torch.stack([p_target[:, d * B : (d + 1) * B] for d in range(D)])  # [D, T, B]
    expected = -torch.log(per_sample.mean(0)).mean()
    torch.testing.assert_close(loss, expected)


def test_multi_sample_loss_with_real_model():
    torch.manual_seed(0)
    cfg = ModelConfig(vocab_size=9, hidden_size=8, num_layers=2, state_dropout=0.3, cell_output_dropout=0.3)
    model = RecurrentLM(cfg)
    T, B, D = 5, 3, 3
    inputs = torch.randint(0, 9, (T, B))
    targets = torch.randint(0, 9, (T, B))
    # eval mode: all D samples identical -> ordinary cross-entropy, for D = 1 and D > 1
    model.eval()
    logits, _ = model(inputs)
    ce = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1))
    for d in (1, D):
        loss, st = multi_sample_loss(model, inputs, targets, None, d)
        torch.testing.assert_close(loss, ce)
        assert st[0][0].shape == (d * B, 8)
    # training: the carried state has batch D*B; a B-sized state is rejected
    model.train()
    loss, st = multi_sample_loss(model, inputs, targets, model.initial_state(D * B), D)
    loss.backward()
    assert torch.isfinite(loss) and model.input_embedding.grad is not None
    with pytest.raises(ValueError, match="state batch"):
        multi_sample_loss(model, inputs, targets, model.initial_state(B), D)
    # multi-sample bound is tighter: loss <= mean of the single-sample losses of the same samples
    torch.manual_seed(1)
    rep_logits, _ = model(inputs.repeat(1, D))
    lp = torch.log_softmax(rep_logits, -1).gather(-1, targets.repeat(1, D).unsqueeze(-1)).squeeze(-1)
    lp = lp.view(T, D, B).transpose(0, 1)
    assert multi_sample_nll(lp).mean() <= (-lp).mean() + 1e-6
