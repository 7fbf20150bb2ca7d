"""Residual LM (thesis §4.2): wiring, dropout masks, tying, init, temperature, config."""

from __future__ import annotations

import math
import time

import pytest
import torch
from pydantic import ValidationError

from models import ModelConfig, RecurrentLayer, RecurrentLM, count_parameters, detach_state
from models.cells import RLSTMCell


def _cfg(**kw) -> ModelConfig:
    base = dict(vocab_size=11, hidden_size=6, num_layers=2)
    base.update(kw)
    return ModelConfig(**base)


def _tokens(T, B, V, seed=0):
    return torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(seed))


def _assert_dropout_values(ratio, p):
    """Every entry of an inverted-dropout mask is 0 or 1/(1-p); both occur."""
    zero = torch.isclose(ratio, torch.zeros_like(ratio), atol=1e-5)
    keep = torch.isclose(ratio, torch.full_like(ratio, 1 / (1 - p)), rtol=1e-4)
    assert torch.all(zero | keep)
    assert zero.any() and keep.any()


def _perturb(model, seed=0):
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.3)


# ---------------------------------------------------------------- wiring


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_residual_wiring_matches_hand_computation(cell):
    torch.manual_seed(0)
    cfg = _cfg(cell=cell, num_layers=3, mogrifier_rounds=2, input_dropout=0.5, state_dropout=0.5,
               cell_output_dropout=0.5, output_dropout=0.5)
    model = RecurrentLM(cfg).double().eval()
    _perturb(model)
    T, B, n = 5, 3, cfg.hidden_size
    tokens = _tokens(T, B, cfg.vocab_size)
    state = [(torch.randn(B, n, dtype=torch.float64), torch.randn(B, n, dtype=torch.float64)) for _ in range(3)]
    logits, new_state = model(tokens, state)

    # Hand computation (eval: all masks are ones).
    x0 = model.input_embedding[tokens]                               # x̂⁰
    h1, s1 = model.layers[0](x0, state[0])                           # layer 1 reads x̂⁰
    h2, s2 = model.layers[1](h1, state[1])                           # layer 2 reads x̂¹
    h3, s3 = model.layers[2](h1 + h2, state[2])                      # layer 3 reads x̂¹ + x̂²
    expected = (h1 + h2 + h3) @ model.output_embedding.T + model.output_bias
    torch.testing.assert_close(logits, expected, rtol=1e-10, atol=1e-12)
    for got, want in zip(new_state, (s1, s2, s3)):
        torch.testing.assert_close(got[0], want[0])
        torch.testing.assert_close(got[1], want[1])
    assert new_state[0][0].requires_grad  # not detached
    # guard against e.g. a plain stacked LSTM or including the embedding in the sums
    h3_stacked, _ = model.layers[2](h2, state[2])
    assert not torch.allclose(logits, (h1 + h2 + h3_stacked) @ model.output_embedding.T + model.output_bias)


def test_state_carry_equals_full_sequence():
    torch.manual_seed(1)
    model = RecurrentLM(_cfg(num_layers=2, mogrifier_rounds=1)).eval()
    tokens = _tokens(8, 2, 11)
    full, _ = model(tokens)
    first, st = model(tokens[:3])
    second, _ = model(tokens[3:], detach_state(st))
    torch.testing.assert_close(torch.cat([first, second]), full)
    assert all(not h.requires_grad and not c.requires_grad for h, c in detach_state(st))


def test_dropout_only_in_training_mode():
    torch.manual_seed(2)
    model = RecurrentLM(_cfg(input_dropout=0.3, state_dropout=0.3, cell_output_dropout=0.3, output_dropout=0.3))
    tokens = _tokens(4, 3, 11)
    model.eval()
    a, _ = model(tokens)
    b, _ = model(tokens)
    assert torch.equal(a, b)
    model.train()
    c, _ = model(tokens)
    d, _ = model(tokens)
    assert not torch.allclose(c, d) and not torch.allclose(a, c)
    no_dropout = RecurrentLM(_cfg()).train()
    no_dropout.load_state_dict(model.state_dict())
    torch.testing.assert_close(no_dropout(tokens)[0], a)  # p = 0 in training == eval


@pytest.mark.parametrize("which", ["input_dropout", "cell_output_dropout", "output_dropout"])
def test_elementwise_dropout_is_inverted_and_fresh_per_step(which, monkeypatch):
    """Non-state masks: values in {0, 1/(1-p)} and different across time steps."""
    torch.manual_seed(3)
    p = 0.4
    model = RecurrentLM(_cfg(**{which: p}, hidden_size=64)).train()
    seen = []
    orig = model._dropout

    def spy(x, prob):
        out = orig(x, prob)
        if prob > 0:
            seen.append((x, out))
        return out

    monkeypatch.setattr(model, "_dropout", spy)
    tokens = torch.zeros(4, 8, dtype=torch.long)  # identical inputs at every step
    model(tokens)
    assert seen
    x, out = seen[0]
    ratio = out[x != 0] / x[x != 0]
    _assert_dropout_values(ratio, p)
    masks = (out != 0)
    assert not torch.equal(masks[0], masks[1])


def _record_masked_h(model, monkeypatch):
    """Wrap each layer's cell step to record the h it receives and the h it returns."""
    records = []
    for layer in model.layers:
        rec = {"h_in": [], "h_out": []}
        records.append(rec)
        orig_make = layer.cell.make_step

        def make_step(orig_make=orig_make, rec=rec):
            step = orig_make()

            def wrapped(xproj, h, c, mask):
                rec["h_in"].append(h.detach().clone())
                h2, c2 = step(xproj, h, c, mask)
                rec["h_out"].append(h2.detach().clone())
                return h2, c2

            return wrapped

        monkeypatch.setattr(layer.cell, "make_step", make_step)
    return records


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_state_dropout_is_variational(cell, monkeypatch):
    torch.manual_seed(4)
    p = 0.5
    # The per-step reference (whose steps are recorded); the sequence implementation is checked equal to it.
    model = RecurrentLM(_cfg(cell=cell, hidden_size=32, num_layers=2, state_dropout=p,
                             cell_implementation="autograd")).train()
    records = _record_masked_h(model, monkeypatch)
    T, B = 6, 4
    model(_tokens(T, B, 11))
    layer_masks = []
    for rec in records:
        masks = []
        for t in range(1, T):  # mask_t = h fed to step t / h produced at step t-1
            masks.append(rec["h_in"][t] / rec["h_out"][t - 1])
        first = masks[0]
        _assert_dropout_values(first, p)
        for m in masks[1:]:
            torch.testing.assert_close(m, first)  # identical across time steps
        assert not torch.equal(first[0], first[1])  # different between batch rows
        layer_masks.append(first)
    assert not torch.equal(layer_masks[0], layer_masks[1])  # one mask per layer
    # a new forward call draws a new mask
    for rec in records:
        rec["h_in"].clear(), rec["h_out"].clear()
    model(_tokens(T, B, 11))
    again = records[0]["h_in"][1] / records[0]["h_out"][0]
    assert not torch.allclose(again, layer_masks[0])


def test_state_dropout_leaves_c_prev_unmasked(monkeypatch):
    torch.manual_seed(5)
    model = RecurrentLM(_cfg(cell="lstm", hidden_size=16, num_layers=1, state_dropout=0.5,
                             cell_implementation="autograd")).train()
    seen = []
    orig_make = model.layers[0].cell.make_step

    def make_step():
        step = orig_make()

        def wrapped(xproj, h, c, mask):
            seen.append(c)
            out = step(xproj, h, c, mask)
            seen.append(out[1])
            return out

        return wrapped

    monkeypatch.setattr(model.layers[0].cell, "make_step", make_step)
    model(_tokens(4, 3, 11))
    for t in range(1, 4):  # c passed into step t is exactly the c returned at step t-1
        assert seen[2 * t] is seen[2 * t - 1]


def test_rlstm_output_gate_uses_masked_c():
    torch.manual_seed(6)
    n, B = 5, 3
    layer = RecurrentLayer("rlstm", n, n).double()
    cell: RLSTMCell = layer.cell
    x = torch.randn(1, B, n, dtype=torch.float64)
    h0 = torch.randn(B, n, dtype=torch.float64) * 0.5
    c0 = torch.randn(B, n, dtype=torch.float64) * 0.5
    mask = torch.tensor([[2.0, 0.0, 2.0, 0.0, 2.0]], dtype=torch.float64).expand(B, n)
    out, (h1, c1) = layer(x, (h0, c0), mask)
    # Recompute c from the cell (h_prev masked), then o from c ⊙ M vs c.
    _, c_ref = cell(x[0], h0 * mask, c0)
    torch.testing.assert_close(c1, c_ref)
    o_masked = torch.sigmoid((c_ref * mask) @ cell.weight_oc.T + cell.bias_o)
    o_plain = torch.sigmoid(c_ref @ cell.weight_oc.T + cell.bias_o)
    torch.testing.assert_close(h1, o_masked * torch.tanh(c_ref))
    assert not torch.allclose(h1, o_plain * torch.tanh(c_ref))


# ---------------------------------------------------------------- embeddings, init, temperature


def test_tied_embeddings_share_storage():
    tied = RecurrentLM(_cfg(tie_embeddings=True))
    untied = RecurrentLM(_cfg(tie_embeddings=False))
    assert tied.output_embedding is tied.input_embedding
    assert tied.output_embedding.data_ptr() == tied.input_embedding.data_ptr()
    assert untied.output_embedding is not untied.input_embedding
    V, n = 11, 6
    assert sum(p.numel() for p in untied.parameters()) - sum(p.numel() for p in tied.parameters()) == V * n
    logits, _ = tied(_tokens(3, 2, V))
    logits.sum().backward()
    assert tied.input_embedding.grad is not None
    with torch.no_grad():
        tied.input_embedding[0, 0] += 1.0
    assert tied.output_embedding[0, 0] == tied.input_embedding[0, 0]


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_chrono_init(cell):
    torch.manual_seed(7)
    t_max = 200.0
    model = RecurrentLM(_cfg(cell=cell, hidden_size=2000, num_layers=1, vocab_size=3, chrono_t_max=t_max))
    fb = model.layers[0].cell.forget_bias.detach().double()
    assert fb.min() >= 0.0 and fb.max() <= math.log(t_max - 1)
    # log-uniform: exp(b_f) ~ U(1, T_max - 1); compare quantiles of exp(b_f)
    u = (fb.exp() - 1) / (t_max - 2)
    qs = torch.tensor([0.1, 0.25, 0.5, 0.75, 0.9], dtype=torch.float64)
    torch.testing.assert_close(torch.quantile(u, qs), qs, atol=0.05, rtol=0)
    # whereas b_f itself is far from uniform on [0, ln(T_max-1)] (median of b_f ≈ ln(T_max/2))
    assert abs(fb.median().item() - math.log(t_max / 2)) < 0.2


def test_forget_bias_constant_without_chrono():
    model = RecurrentLM(_cfg(cell="lstm", forget_bias_init=1.0))
    for layer in model.layers:
        assert torch.all(layer.cell.forget_bias == 1.0)


def test_temperature_divides_logits():
    torch.manual_seed(8)
    model = RecurrentLM(_cfg()).eval()
    tokens = _tokens(4, 2, 11)
    base, _ = model(tokens)
    hot, _ = model(tokens, temperature=2.5)
    torch.testing.assert_close(hot, base / 2.5)
    with pytest.raises(ValueError, match="temperature"):
        model(tokens, temperature=0.0)


def test_initial_state_zeros_and_default():
    model = RecurrentLM(_cfg(num_layers=3)).double()
    st = model.initial_state(5)
    assert len(st) == 3 and all(h.shape == (5, 6) and c.dtype == torch.float64 for h, c in st)
    assert all(torch.all(h == 0) and torch.all(c == 0) for h, c in st)
    tokens = _tokens(3, 5, 11)
    torch.testing.assert_close(model.eval()(tokens)[0], model(tokens, st)[0])


# ---------------------------------------------------------------- parameter count and config


@pytest.mark.parametrize(
    "kw",
    [
        dict(cell="lstm"),
        dict(cell="rlstm", tie_embeddings=True),
        dict(cell="lstm", mogrifier_rounds=3, mogrifier_rank=2, num_layers=3),
        dict(cell="rlstm", mogrifier_rounds=4, mogrifier_rank=0),
    ],
)
def test_count_parameters_matches_real_model(kw):
    cfg = _cfg(**kw)
    real = RecurrentLM(cfg)
    assert count_parameters(cfg) == sum(p.numel() for p in real.parameters())


def test_count_parameters_large_config_is_cheap():
    cfg = ModelConfig(cell="rlstm", vocab_size=50_000, hidden_size=1536, num_layers=4,
                      mogrifier_rounds=5, mogrifier_rank=64)
    start = time.perf_counter()
    count = count_parameters(cfg)
    assert time.perf_counter() - start < 2.0
    n, V = 1536, 50_000
    per_layer = 2 * n * n + 3 * n * n + 3 * n + 2 * n * n + n + 5 * (2 * n * 64 + n)
    assert count == 2 * V * n + V + 4 * per_layer


def test_config_validation():
    assert ModelConfig().cell == "rlstm"
    with pytest.raises(ValidationError, match="hidden_size"):
        ModelConfig(hidden_size=0)
    with pytest.raises(ValidationError, match="num_layers"):
        ModelConfig(num_layers=0)
    with pytest.raises(ValidationError, match="mogrifier_rounds"):
        ModelConfig(mogrifier_rounds=-1)
    with pytest.raises(ValidationError, match="state_dropout"):
        ModelConfig(state_dropout=1.0)
    with pytest.raises(ValidationError, match="input_dropout"):
        ModelConfig(input_dropout=-0.1)
    with pytest.raises(ValidationError, match="chrono_t_max"):
        ModelConfig(chrono_t_max=2.0)
    with pytest.raises(ValidationError, match="vocab_size"):
        ModelConfig(vocab_size=0)
    with pytest.raises(ValidationError, match="hiden_size"):
        ModelConfig(hiden_size=3)  # extra="forbid"
    with pytest.raises(ValidationError, match="capped_input_gate"):
        ModelConfig(cell="rlstm", capped_input_gate=False)
    assert ModelConfig(cell="lstm", capped_input_gate=False).capped_input_gate is False
    cfg = ModelConfig()
    with pytest.raises(ValueError, match="vocab_size"):
        RecurrentLM(cfg)
    with pytest.raises(ValueError, match="vocab_size"):
        count_parameters(cfg)
    cfg.vocab_size = 7  # the pipeline fills this in; assignment is validated
    assert RecurrentLM(cfg).vocab_size == 7
    with pytest.raises(ValidationError):
        cfg.vocab_size = -1
