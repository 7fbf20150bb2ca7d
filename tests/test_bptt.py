"""The hand-derived backward through time (models.bptt) against the per-step autograd reference.

Everything in float64: outputs, final states and every gradient (input, carried h0 / c0, all weights
including the Mogrifier's and the RLSTM's own), for LSTM (capped and not) and RLSTM, 0-5 Mogrifier
rounds, full and low rank, with and without the variational state mask, with weight drop, with
gradients arriving through the outputs, the final states or both. Plus torch's numerical gradcheck of
the sequence function, the whole LM with every dropout on, and which path runs when.
"""

from __future__ import annotations

import pytest
import torch

from models import ModelConfig, RecurrentLM
from models.bptt import SequenceSpec
from models.mogrifier import RecurrentLayer

pytestmark = pytest.mark.usefixtures("one_thread")

M, N, T, B = 5, 6, 7, 3


def _pair(cell, rounds=0, rank=0, capped=True, weight_drop=0.0, seed=0):
    """A reference layer and a sequence layer with the same (perturbed, so no bias is trivially 0) weights."""
    torch.manual_seed(seed)
    ref = RecurrentLayer(cell, M, N, rounds, rank, capped_input_gate=capped, weight_drop=weight_drop,
                         implementation="autograd").double()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(0.3 * torch.randn_like(p))
    seq = RecurrentLayer(cell, M, N, rounds, rank, capped_input_gate=capped, weight_drop=weight_drop,
                         implementation="sequence").double()
    seq.load_state_dict(ref.state_dict())
    return ref, seq


def _inputs(mask: bool, steps=T, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(steps, B, M, generator=gen, dtype=torch.float64, requires_grad=True)
    h0 = torch.randn(B, N, generator=gen, dtype=torch.float64, requires_grad=True)
    c0 = torch.randn(B, N, generator=gen, dtype=torch.float64, requires_grad=True)
    state_mask = (torch.rand(B, N, generator=gen) > 0.3).double() / 0.7 if mask else None
    return x, h0, c0, state_mask


def _run(layer, x, h0, c0, state_mask, through=("outputs", "h", "c"), rng_seed=5):
    """Outputs, final state and the gradients of a loss that reads ``through`` (w.r.t. x, h0, c0, params)."""
    torch.manual_seed(rng_seed)  # weight drop draws its mask here: the same for both layers
    out, (h_last, c_last) = layer(x, (h0, c0), state_mask)
    weights = torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape)
    loss = out.new_zeros(())
    if "outputs" in through:
        loss = loss + (out * weights).sum()
    if "h" in through:
        loss = loss + (1.3 * h_last).sum()
    if "c" in through:
        loss = loss + (c_last**2).sum()
    params = list(layer.parameters())
    grads = torch.autograd.grad(loss, [x, h0, c0, *params], allow_unused=True)
    return [out, h_last, c_last], grads, [name for name, _ in layer.named_parameters()]


def _assert_same(ref_layer, seq_layer, *inputs, through=("outputs", "h", "c")):
    values_ref, grads_ref, names = _run(ref_layer, *inputs, through=through)
    values_seq, grads_seq, _ = _run(seq_layer, *inputs, through=through)
    for label, a, b in zip(["outputs", "h_T", "c_T"], values_ref, values_seq):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12, msg=label)
    for label, a, b in zip(["x", "h0", "c0", *names], grads_ref, grads_seq):
        if a is None:
            assert b is None or torch.count_nonzero(b) == 0, label
            continue
        assert b is not None, f"no gradient for {label}"
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12, msg=f"d {label}")


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
@pytest.mark.parametrize("rounds,rank", [(0, 0), (1, 0), (2, 2), (3, 0), (5, 2)])
@pytest.mark.parametrize("mask", [False, True])
def test_sequence_matches_autograd(cell, rounds, rank, mask):
    ref, seq = _pair(cell, rounds, rank)
    _assert_same(ref, seq, *_inputs(mask))


@pytest.mark.parametrize("rounds", [0, 3])
def test_uncapped_lstm_matches_autograd(rounds):
    ref, seq = _pair("lstm", rounds, 2, capped=False)
    _assert_same(ref, seq, *_inputs(True))


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_weight_drop_matches_autograd(cell):
    """The dropped recurrent matrix (same mask: the same RNG draw in both paths) and the gradient that
    reaches the undropped weight through it."""
    ref, seq = _pair(cell, 2, 0, weight_drop=0.4)
    _assert_same(ref, seq, *_inputs(True))


@pytest.mark.parametrize("through", [("h",), ("c",), ("outputs",), ("h", "c")])
@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_gradient_through_final_state_only(cell, through):
    """Carried states: a loss on the final (h, c) alone, or on the outputs alone."""
    ref, seq = _pair(cell, 1, 0)
    _assert_same(ref, seq, *_inputs(True), through=through)


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_single_step_and_two_windows(cell):
    """T = 1, and a state carried from one window into the next without detaching (BPTT across calls)."""
    ref, seq = _pair(cell, 2, 2)
    _assert_same(ref, seq, *_inputs(True, steps=1))

    def two_windows(layer):
        x, h0, c0, state_mask = _inputs(True, steps=6, seed=3)
        out1, state = layer(x[:3], (h0, c0), state_mask)
        out2, (h_last, c_last) = layer(x[3:], state, state_mask)
        loss = out1.sum() + (out2 * out2).sum() + h_last.sum()
        return [out1, out2, c_last], torch.autograd.grad(loss, [x, h0, c0, *layer.parameters()])

    values_ref, grads_ref = two_windows(ref)
    values_seq, grads_seq = two_windows(seq)
    for a, b in zip(values_ref + list(grads_ref), values_seq + list(grads_seq)):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("cell,rounds,rank", [("lstm", 0, 0), ("rlstm", 3, 2), ("lstm", 2, 0)])
def test_sequence_gradcheck(cell, rounds, rank):
    """Finite differences of the sequence function itself (not only agreement with the reference)."""
    _ref, seq = _pair(cell, rounds, rank, seed=7)
    x, h0, c0, state_mask = _inputs(True, steps=4)
    params = list(seq.parameters())

    def fn(x, h0, c0, *p):
        out, (h_last, c_last) = seq(x, (h0, c0), state_mask)
        return out, h_last, c_last

    assert torch.autograd.gradcheck(fn, (x, h0, c0, *params), eps=1e-6, atol=1e-6)


def test_lm_with_every_dropout_matches_autograd():
    """The whole residual LM in training mode: input / state / cell-output / output / embedding dropout and
    weight drop draw the same masks in both implementations, so logits and every gradient agree."""
    common = dict(vocab_size=13, hidden_size=8, num_layers=2, mogrifier_rounds=3, mogrifier_rank=2,
                  input_dropout=0.2, state_dropout=0.3, cell_output_dropout=0.1, output_dropout=0.2,
                  embedding_dropout=0.1, weight_drop=0.3)
    tokens = torch.randint(0, 13, (9, 4), generator=torch.Generator().manual_seed(2))
    results = []
    for implementation in ("autograd", "sequence"):
        torch.manual_seed(11)
        model = RecurrentLM(ModelConfig(**common, cell="rlstm", cell_implementation=implementation)).double().train()
        torch.manual_seed(12)
        logits, _state = model(tokens)
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), tokens.roll(-1, 0).flatten())
        loss.backward()
        results.append((logits.detach(), {k: p.grad for k, p in model.named_parameters()}))
    torch.testing.assert_close(results[1][0], results[0][0], rtol=1e-12, atol=1e-12)
    for name, grad in results[0][1].items():
        torch.testing.assert_close(results[1][1][name], grad, rtol=1e-9, atol=1e-12, msg=name)


def test_which_path_runs(monkeypatch):
    """The sequence function runs only when a gradient is recorded for an lstm / rlstm layer; evaluation
    (no_grad), the gru / elman cells and implementation="autograd" use the per-step reference."""
    import models.mogrifier as mogrifier_module

    calls = []
    real = mogrifier_module.recurrent_sequence
    monkeypatch.setattr(mogrifier_module, "recurrent_sequence", lambda *a: calls.append(1) or real(*a))
    x, h0, c0, _ = _inputs(False)
    layer = RecurrentLayer("rlstm", M, N, 2).double()
    layer(x, (h0, c0))
    assert len(calls) == 1
    with torch.no_grad():
        layer(x, (h0, c0))
    RecurrentLayer("rlstm", M, N, implementation="autograd").double()(x, (h0, c0))
    RecurrentLayer("gru", M, N).double()(x, (h0, h0))
    assert len(calls) == 1
    frozen = RecurrentLayer("lstm", M, N).double().requires_grad_(False)
    frozen(x.detach(), (h0.detach(), c0.detach()))  # nothing needs a gradient
    assert len(calls) == 1


def test_bad_implementation_and_spec_are_rejected():
    with pytest.raises(ValueError, match="unknown implementation 'cudnn'"):
        RecurrentLayer("lstm", M, N, implementation="cudnn")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="covers cells"):
        SequenceSpec("gru", True, 0)
    with pytest.raises(ValueError, match="cell_implementation"):
        ModelConfig(vocab_size=5, cell_implementation="fast")  # type: ignore[arg-type]


def test_double_backward_needs_the_reference():
    _ref, seq = _pair("lstm")
    x, h0, c0, _ = _inputs(False)
    out, _ = seq(x, (h0, c0))
    with pytest.raises(RuntimeError, match="double backward.*cell_implementation: autograd"):
        torch.autograd.grad(out.sum(), x, create_graph=True)


@pytest.mark.parametrize("cell", ["lstm", "rlstm"])
def test_compiled_steps_match_autograd(cell):
    """The per-step kernels fused by torch.compile (the GPU configuration; here inductor's CPU backend) give
    the reference's outputs and gradients."""
    ref, seq = _pair(cell, 1, 0)
    seq.compile_steps = True
    _assert_same(ref, seq, *_inputs(True))
