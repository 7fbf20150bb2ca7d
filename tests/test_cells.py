"""Cells and Mogrifier against independent references written from the thesis equations."""

from __future__ import annotations

import math

import pytest
import torch
from pydantic import ValidationError
from torch import nn

from models import LSTMCell, ModelConfig, Mogrifier, RecurrentLayer, RecurrentLM, RLSTMCell
from models.cells import ElmanCell, GRUCell


def _sig(z):
    return 1.0 / (1.0 + torch.exp(-z))


def _rand_state(b, m, n, gen, dtype=torch.float64):
    x = torch.randn(b, m, generator=gen, dtype=dtype)
    h = torch.randn(b, n, generator=gen, dtype=dtype) * 0.5
    c = torch.randn(b, n, generator=gen, dtype=dtype) * 0.5
    return x, h, c


def _mask(b, n, p, gen, dtype=torch.float64):
    keep = (torch.rand(b, n, generator=gen) >= p).to(dtype)
    return keep / (1.0 - p)


# ---------------------------------------------------------------- references


def lstm_reference(cell: LSTMCell, x, h, c, capped: bool):
    """Eq. 2.1 with explicit per-gate matrices; gate blocks are (i, f, o, j)."""
    n = cell.hidden_size
    W_x = cell.weight_ih.detach().double()
    W_h = cell.weight_hh.detach().double()
    b = cell.bias.detach().double()
    blk = {name: slice(k * n, (k + 1) * n) for k, name in enumerate(("i", "f", "o", "j"))}

    def pre(g):
        return x @ W_x[blk[g]].T + h @ W_h[blk[g]].T + b[blk[g]]

    i, f, o, j = _sig(pre("i")), _sig(pre("f")), _sig(pre("o")), torch.tanh(pre("j"))
    gate = torch.where(i < 1 - f, i, 1 - f) if capped else i
    c_new = f * c + gate * j
    return o * torch.tanh(c_new), c_new


def rlstm_reference(cell: RLSTMCell, x, h, c, mask=None):
    """§4.1/§4.2 RLSTM with explicit per-gate matrices; o reads c ⊙ M_state."""
    n = cell.hidden_size
    W_x = cell.weight_ih.detach().double()
    W_h = cell.weight_hh.detach().double()
    b = cell.bias.detach().double()
    W_ix, W_jx = W_x[:n], W_x[n : 2 * n]
    W_ih, W_jh, W_fh = W_h[:n], W_h[n : 2 * n], W_h[2 * n :]
    b_i, b_j, b_f = b[:n], b[n : 2 * n], b[2 * n :]
    W_fu = cell.weight_fu.detach().double()
    W_oc = cell.weight_oc.detach().double()
    b_o = cell.bias_o.detach().double()
    i = _sig(x @ W_ix.T + h @ W_ih.T + b_i)
    j = torch.tanh(x @ W_jx.T + h @ W_jh.T + b_j)
    f = _sig((i * j) @ W_fu.T + h @ W_fh.T + b_f)
    c_new = f * c + torch.where(i < 1 - f, i, 1 - f) * j
    m = torch.ones_like(c_new) if mask is None else mask
    o = _sig((c_new * m) @ W_oc.T + b_o)
    return o * torch.tanh(c_new), c_new


def mogrify_reference(mog: Mogrifier, x, h):
    """Eq. 2.2 (+ bias) as a hand-written loop over rounds 1..r using dense round matrices."""
    for i in range(1, mog.rounds + 1):
        Q = mog.round_matrix(i).detach().double()
        bias = mog.biases[i - 1].detach().double()
        if i % 2 == 1:
            x = 2 * _sig(h @ Q.T + bias) * x
        else:
            h = 2 * _sig(x @ Q.T + bias) * h
    return x, h


def _perturb_biases(module: nn.Module, gen):
    """Make zero-initialised biases non-trivial so the tests exercise them."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            if "bias" in name:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


# ---------------------------------------------------------------- cells


@pytest.mark.parametrize("capped", [True, False])
@pytest.mark.parametrize("use_mask", [False, True])
def test_lstm_cell_matches_reference(capped, use_mask):
    gen = torch.Generator().manual_seed(0)
    cell = LSTMCell(5, 7, capped_input_gate=capped).double()
    _perturb_biases(cell, gen)
    x, h, c = _rand_state(4, 5, 7, gen)
    mask = _mask(4, 7, 0.3, gen) if use_mask else None
    # LSTMCell takes h already masked by the layer; state_mask is only used by RLSTM.
    h_out, c_out = cell(x, h, c, mask)
    h_ref, c_ref = lstm_reference(cell, x, h, c, capped)
    torch.testing.assert_close(h_out, h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_out, c_ref, rtol=1e-10, atol=1e-12)


def test_capping_changes_result():
    """Guard: with a large input/forget bias the cap is active, so capped != uncapped."""
    gen = torch.Generator().manual_seed(1)
    capped = LSTMCell(3, 6, capped_input_gate=True, forget_bias_init=3.0).double()
    uncapped = LSTMCell(3, 6, capped_input_gate=False).double()
    uncapped.load_state_dict(capped.state_dict())
    x, h, c = _rand_state(4, 3, 6, gen)
    assert not torch.allclose(capped(x, h, c)[1], uncapped(x, h, c)[1])


def test_uncapped_lstm_matches_torch_lstmcell():
    gen = torch.Generator().manual_seed(2)
    m, n = 6, 8
    ours = LSTMCell(m, n, capped_input_gate=False).double()
    _perturb_biases(ours, gen)
    ref = nn.LSTMCell(m, n).double()
    # torch gate order (i, f, g=j, o); ours (i, f, o, j).
    perm = torch.cat([torch.arange(0, 2 * n), torch.arange(3 * n, 4 * n), torch.arange(2 * n, 3 * n)])
    with torch.no_grad():
        ref.weight_ih.copy_(ours.weight_ih[perm])
        ref.weight_hh.copy_(ours.weight_hh[perm])
        ref.bias_ih.copy_(ours.bias[perm])
        ref.bias_hh.zero_()
    x, h, c = _rand_state(3, m, n, gen)
    h_ref, c_ref = ref(x, (h, c))
    h_out, c_out = ours(x, h, c)
    torch.testing.assert_close(h_out, h_ref)
    torch.testing.assert_close(c_out, c_ref)


@pytest.mark.parametrize("use_mask", [False, True])
def test_rlstm_cell_matches_reference(use_mask):
    gen = torch.Generator().manual_seed(3)
    cell = RLSTMCell(5, 7).double()
    _perturb_biases(cell, gen)
    x, h, c = _rand_state(4, 5, 7, gen)
    mask = _mask(4, 7, 0.4, gen) if use_mask else None
    h_out, c_out = cell(x, h, c, mask)
    h_ref, c_ref = rlstm_reference(cell, x, h, c, mask)
    torch.testing.assert_close(h_out, h_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(c_out, c_ref, rtol=1e-10, atol=1e-12)
    if use_mask:  # the mask must actually matter (o gate reads c ⊙ M)
        h_nomask, c_nomask = cell(x, h, c, None)
        torch.testing.assert_close(c_nomask, c_out)
        assert not torch.allclose(h_nomask, h_out)


def test_rlstm_cell_state_is_bounded():
    """Capping i at 1 - f keeps |c| <= 1 whenever |c_prev| <= 1."""
    gen = torch.Generator().manual_seed(4)
    cell = RLSTMCell(4, 16).double()
    x, h, c = _rand_state(32, 4, 16, gen)
    c = c.clamp(-1, 1)
    for _ in range(20):
        h, c = cell(x * 5, h, c)
        assert c.abs().max() <= 1.0


@pytest.mark.parametrize("chrono", [None, 50.0])
@pytest.mark.parametrize("cell_cls", [LSTMCell, RLSTMCell])
def test_forget_bias_init(cell_cls, chrono):
    cell = cell_cls(4, 300, chrono_t_max=chrono, forget_bias_init=1.5)
    fb = cell.forget_bias.detach()
    assert fb.shape == (300,)
    if chrono is None:
        assert torch.all(fb == 1.5)
    else:
        assert fb.min() >= 0.0 and fb.max() <= math.log(chrono - 1)
        assert fb.std() > 0.3
    # the other biases are untouched by the forget-bias init
    n = 300
    others = cell.bias.detach().clone()
    others[(n if cell_cls is LSTMCell else 2 * n) :][:n] = 0
    assert others.abs().max() <= 1 / math.sqrt(n)


# ---------------------------------------------------------------- mogrifier


def test_mogrifier_r0_is_identity_and_layer_equals_bare_cell():
    gen = torch.Generator().manual_seed(5)
    mog = Mogrifier(5, 7, rounds=0)
    assert len(list(mog.parameters())) == 0
    x, h, _ = _rand_state(3, 5, 7, gen, dtype=torch.float32)
    x2, h2 = mog(x, h)
    assert torch.equal(x2, x) and torch.equal(h2, h)

    for kind in ("lstm", "rlstm"):
        layer = RecurrentLayer(kind, 5, 7, mogrifier_rounds=0).double()
        _perturb_biases(layer, gen)
        xs = torch.randn(6, 3, 5, generator=gen, dtype=torch.float64)
        h0 = torch.randn(3, 7, generator=gen, dtype=torch.float64)
        c0 = torch.randn(3, 7, generator=gen, dtype=torch.float64)
        mask = _mask(3, 7, 0.3, gen)
        out, (hT, cT) = layer(xs, (h0, c0), mask)
        h, c = h0, c0
        for t in range(6):  # bare cell, state mask on h_prev (and RLSTM o gate)
            h, c = layer.cell(xs[t], h * mask, c, mask)
            torch.testing.assert_close(out[t], h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hT, h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cT, c, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("rounds", [1, 2, 3, 4, 5])
@pytest.mark.parametrize("rank", [0, 2])
def test_mogrifier_round_order(rounds, rank):
    gen = torch.Generator().manual_seed(10 + rounds)
    m, n = 5, 6
    mog = Mogrifier(m, n, rounds=rounds, rank=rank).double()
    assert mog.low_rank == (rank == 2)
    _perturb_biases(mog, gen)
    x, h, _ = _rand_state(4, m, n, gen)
    x_out, h_out = mog(x, h)
    x_ref, h_ref = mogrify_reference(mog, x, h)
    torch.testing.assert_close(x_out, x_ref, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(h_out, h_ref, rtol=1e-10, atol=1e-12)
    # round 1 gates x (and only x): h untouched for r=1
    if rounds == 1:
        assert torch.equal(h_out, h) and not torch.allclose(x_out, x)


def test_mogrifier_round_shapes_and_full_rank_fallback():
    m, n = 8, 12
    mog = Mogrifier(m, n, rounds=3, rank=4)
    assert mog.round_matrix(1).shape == (m, n)  # Q: h -> x
    assert mog.round_matrix(2).shape == (n, m)  # R: x -> h
    assert mog.lefts[0].shape == (m, 4) and mog.rights[0].shape == (4, n)
    for k in (0, -1, 8, 20):  # k <= 0 or k >= min(m, n): full rank
        full = Mogrifier(m, n, rounds=2, rank=k)
        assert not full.low_rank and len(full.lefts) == 0 and full.weights[1].shape == (n, m)
    assert all(torch.all(b == 0) for b in mog.biases)


@pytest.mark.parametrize("rank", [0, 16])
def test_mogrifier_init_variance(rank):
    torch.manual_seed(0)
    m, n = 96, 384  # fan_in differs between odd (h: n) and even (x: m) rounds
    mog = Mogrifier(m, n, rounds=4, rank=rank)
    for i in range(1, 5):
        fan_in = n if i % 2 == 1 else m
        Q = mog.round_matrix(i).detach()
        var = Q.var().item()
        assert abs(Q.mean().item()) < 0.1 / math.sqrt(fan_in)
        assert 0.8 / fan_in < var < 1.25 / fan_in, (i, var * fan_in)


def test_recurrent_layer_with_mogrifier_matches_hand_loop():
    gen = torch.Generator().manual_seed(20)
    for kind, ref_cell in (("lstm", "lstm"), ("rlstm", "rlstm")):
        layer = RecurrentLayer(kind, 5, 6, mogrifier_rounds=3, mogrifier_rank=2).double()
        _perturb_biases(layer, gen)
        xs = torch.randn(5, 3, 5, generator=gen, dtype=torch.float64)
        h = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.5
        c = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.5
        mask = _mask(3, 6, 0.3, gen)
        out, (hT, cT) = layer(xs, (h, c), mask)
        for t in range(5):
            x_m, h_m = mogrify_reference(layer.mogrifier, xs[t], h * mask)  # mask, then mogrify
            if ref_cell == "lstm":
                h, c = lstm_reference(layer.cell, x_m, h_m, c, capped=True)  # c_prev unmasked
            else:
                h, c = rlstm_reference(layer.cell, x_m, h_m, c, mask)
            torch.testing.assert_close(out[t], h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hT, h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(cT, c, rtol=1e-10, atol=1e-12)


# ---------------------------------------------------------------- gradients


def _gradcheck_module(module, fn, inputs):
    params = [p for p in module.parameters()]
    assert torch.autograd.gradcheck(lambda *a: fn(*a), (*inputs, *params), eps=1e-6, atol=1e-5)


@pytest.mark.parametrize("capped", [True, False])
def test_lstm_cell_gradcheck(capped):
    gen = torch.Generator().manual_seed(30)
    cell = LSTMCell(3, 4, capped_input_gate=capped).double()
    x, h, c = (t.requires_grad_() for t in _rand_state(2, 3, 4, gen))
    _gradcheck_module(cell, lambda x, h, c, *p: cell(x, h, c), (x, h, c))


def test_rlstm_cell_gradcheck():
    gen = torch.Generator().manual_seed(31)
    cell = RLSTMCell(3, 4).double()
    x, h, c = (t.requires_grad_() for t in _rand_state(2, 3, 4, gen))
    mask = _mask(2, 4, 0.3, gen)
    _gradcheck_module(cell, lambda x, h, c, *p: cell(x, h, c, mask), (x, h, c))


@pytest.mark.parametrize("rank", [0, 2])
def test_mogrifier_gradcheck(rank):
    gen = torch.Generator().manual_seed(32)
    mog = Mogrifier(4, 5, rounds=3, rank=rank).double()
    _perturb_biases(mog, gen)
    x, h, _ = (t.requires_grad_() for t in _rand_state(2, 4, 5, gen))
    _gradcheck_module(mog, lambda x, h, *p: mog(x, h), (x, h))


def test_recurrent_layer_gradcheck():
    gen = torch.Generator().manual_seed(33)
    layer = RecurrentLayer("rlstm", 3, 4, mogrifier_rounds=2, mogrifier_rank=0).double()
    xs = torch.randn(3, 2, 3, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.zeros(2, 4, dtype=torch.float64)
    mask = _mask(2, 4, 0.3, gen)
    assert torch.autograd.gradcheck(lambda x: layer(x, (h0, h0), mask)[0], (xs,), eps=1e-6, atol=1e-5)


def test_unknown_cell_rejected():
    with pytest.raises(ValueError, match="unknown cell"):
        RecurrentLayer("transformer", 3, 4)
    with pytest.raises(ValueError, match="always capped"):
        RecurrentLayer("rlstm", 3, 4, capped_input_gate=False)


# ---------------------------------------------------------------- GRU and Elman cells


def _copy_torch_weights(ours, theirs):
    with torch.no_grad():
        for name in ("weight_ih", "weight_hh", "bias_ih", "bias_hh"):
            getattr(ours, name).copy_(getattr(theirs, name))


def gru_reference(cell, x, h_masked, h_prev):
    """torch.nn.GRUCell equations with explicit per-gate matrices (blocks r, u, n); the matmuls read the
    masked state, the interpolation the unmasked previous state."""
    n = cell.hidden_size
    W_x, W_h = cell.weight_ih.detach(), cell.weight_hh.detach()
    b_x, b_h = cell.bias_ih.detach(), cell.bias_hh.detach()
    blk = [slice(k * n, (k + 1) * n) for k in range(3)]
    r = _sig(x @ W_x[blk[0]].T + b_x[blk[0]] + h_masked @ W_h[blk[0]].T + b_h[blk[0]])
    u = _sig(x @ W_x[blk[1]].T + b_x[blk[1]] + h_masked @ W_h[blk[1]].T + b_h[blk[1]])
    cand = torch.tanh(x @ W_x[blk[2]].T + b_x[blk[2]] + r * (h_masked @ W_h[blk[2]].T + b_h[blk[2]]))
    return (1 - u) * cand + u * h_prev


def test_gru_cell_matches_torch_grucell():
    gen = torch.Generator().manual_seed(40)
    ref = nn.GRUCell(5, 7).double()
    _perturb_biases(ref, gen)
    cell = GRUCell(5, 7).double()
    _copy_torch_weights(cell, ref)
    h = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    for _ in range(4):  # several steps: the returned c (= h) is fed back as the carried state
        x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        h_ref = ref(x, h)
        h_new, c_new = cell(x, h, h)
        torch.testing.assert_close(h_new, h_ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(c_new, h_new)
        h = h_new


def test_elman_cell_matches_torch_rnncell():
    gen = torch.Generator().manual_seed(41)
    ref = nn.RNNCell(5, 7, nonlinearity="tanh").double()
    _perturb_biases(ref, gen)
    cell = ElmanCell(5, 7).double()
    _copy_torch_weights(cell, ref)
    h = torch.randn(3, 7, generator=gen, dtype=torch.float64)
    for _ in range(4):
        x = torch.randn(3, 5, generator=gen, dtype=torch.float64)
        h_ref = ref(x, h)
        h_new, c_new = cell(x, h, torch.full_like(h, 99.0))  # c is ignored
        torch.testing.assert_close(h_new, h_ref, rtol=1e-10, atol=1e-12)
        assert torch.equal(c_new, h_new)
        h = h_new


@pytest.mark.parametrize("rounds", [0, 2])
def test_gru_and_elman_layers_match_hand_loop_with_state_dropout(rounds):
    """Layer over a sequence with a variational state mask: the matmuls read the masked (and mogrified)
    h_prev, the GRU interpolates with the unmasked previous state, the layer returns (h, h)."""
    gen = torch.Generator().manual_seed(42 + rounds)
    for kind in ("gru", "elman"):
        layer = RecurrentLayer(kind, 5, 6, mogrifier_rounds=rounds).double()
        _perturb_biases(layer, gen)
        xs = torch.randn(5, 3, 5, generator=gen, dtype=torch.float64)
        h = torch.randn(3, 6, generator=gen, dtype=torch.float64) * 0.5
        mask = _mask(3, 6, 0.3, gen)
        out, (hT, cT) = layer(xs, (h, h), mask)
        cell = layer.cell
        for t in range(5):
            x_m, h_m = mogrify_reference(layer.mogrifier, xs[t], h * mask) if rounds else (xs[t], h * mask)
            if kind == "gru":
                h = gru_reference(cell, x_m, h_m, h)
            else:
                W_x, W_h = cell.weight_ih.detach(), cell.weight_hh.detach()
                h = torch.tanh(x_m @ W_x.T + cell.bias_ih.detach() + h_m @ W_h.T + cell.bias_hh.detach())
            torch.testing.assert_close(out[t], h, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(hT, h, rtol=1e-10, atol=1e-12)
        assert torch.equal(cT, hT)


@pytest.mark.parametrize("chrono", [None, 50.0])
def test_gru_update_gate_bias_init(chrono):
    torch.manual_seed(43)
    n = 400
    cell = GRUCell(3, n, chrono_t_max=chrono, forget_bias_init=1.5)
    update = cell.bias_ih[n : 2 * n].detach()
    assert torch.all(cell.bias_hh[n : 2 * n] == 0)
    torch.testing.assert_close(cell.forget_bias.detach(), update)
    if chrono is None:
        assert torch.all(update == 1.5)
    else:
        assert update.min() >= 0 and update.max() <= math.log(chrono - 1)
        assert update.max() > 0.9 * math.log(chrono - 1)
    others = torch.cat([cell.bias_ih[:n], cell.bias_ih[2 * n :], cell.weight_hh.flatten()]).detach()
    assert others.abs().max() <= 1 / math.sqrt(n)


def test_gru_and_elman_gradcheck():
    gen = torch.Generator().manual_seed(44)
    for cell in (GRUCell(3, 4).double(), ElmanCell(3, 4).double()):
        x, h, c = (t.requires_grad_() for t in _rand_state(2, 3, 4, gen))
        _gradcheck_module(cell, lambda x, h, c, *p: cell(x, h, c)[0], (x, h, c))


def test_gru_and_elman_option_checks():
    with pytest.raises(ValueError, match="no forget gate"):
        RecurrentLayer("elman", 3, 4, chrono_t_max=10.0)
    with pytest.raises(ValidationError, match="elman"):
        ModelConfig(cell="elman", chrono_t_max=10.0)
    with pytest.raises(ValidationError, match="capped_input_gate"):
        ModelConfig(cell="gru", capped_input_gate=False)
    assert ModelConfig(cell="gru", chrono_t_max=10.0).cell == "gru"


@pytest.mark.parametrize("cell", ["gru", "elman"])
def test_lm_with_gru_and_elman_trains(cell):
    """A tiny RecurrentLM with the new cells: logits [T, B, V], (h, c = h) state per layer, every parameter
    gets a finite gradient, and a few Adam steps on one batch lower its loss."""
    torch.manual_seed(45)
    V, T, B = 13, 7, 4
    cfg = ModelConfig(cell=cell, vocab_size=V, hidden_size=8, num_layers=2, mogrifier_rounds=2, state_dropout=0.2)
    model = RecurrentLM(cfg)
    tokens = torch.randint(0, V, (T + 1, B), generator=torch.Generator().manual_seed(0))
    opt = torch.optim.Adam(model.parameters(), lr=0.03)
    losses = []
    for step in range(15):
        logits, state = model(tokens[:-1])
        assert logits.shape == (T, B, V)
        assert all(h.shape == (B, 8) and torch.equal(h, c) for h, c in state)
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, V), tokens[1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.3

