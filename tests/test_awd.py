"""AWD-LSTM baselines (Merity et al. 2017; Yoon et al.'s GRU variant): weight drop, embedding dropout,
AR / TAR, the embedding-size projection, variable BPTT with its per-step learning-rate rescale, plain
SGD, the shipped ``ptb_word_awd*`` configs, and a tiny AWD run on real PTB words with exact resume.
NT-ASGD's averager is tested in tests/test_averaging.py."""

from __future__ import annotations

import copy
import json
import math
import subprocess
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from pydantic import ValidationError
from torch.func import functional_call

from conftest import PTB_DIR, PYTHON, REPO, pipeline_env
from models import (
    ModelConfig,
    RecurrentLayer,
    RecurrentLM,
    count_parameters,
    embedding_dropout,
    multi_sample_loss,
    multi_sample_objective,
)
from pipeline.config import TrainConfig, load_config, validate_config
from pipeline.data.batches import Batch, BatchStream, VariableBPTT

F64 = torch.float64


def _tokens(T, B, V, seed=0):
    return torch.randint(0, V, (T, B), generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------------------------- weight drop


def _replayed_mask(shape, p: float, seed: int) -> torch.Tensor:
    """The inverted-dropout mask (entries 0 or 1/(1-p)) that dropout of a float64 tensor of ``shape``
    draws right after ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return F.dropout(torch.ones(shape, dtype=F64), p, training=True)


@pytest.mark.parametrize("cell, rounds", [("lstm", 0), ("rlstm", 0), ("gru", 0), ("elman", 0), ("lstm", 2),
                                          ("rlstm", 3)])
def test_weight_drop_uses_one_dropped_recurrent_matrix_for_every_step(cell, rounds):
    p, T, B, m, n = 0.4, 7, 3, 4, 5
    torch.manual_seed(0)
    layer = RecurrentLayer(cell, m, n, mogrifier_rounds=rounds, weight_drop=p).double().train()
    x = torch.randn(T, B, m, dtype=F64)
    h0 = torch.randn(B, n, dtype=F64)
    state = (h0, h0.clone() if cell in ("gru", "elman") else torch.randn(B, n, dtype=F64))
    upstream = torch.randn(T, B, n, dtype=F64)

    torch.manual_seed(11)  # the layer draws nothing but the weight-drop mask
    out, _ = layer(x, state)
    (out * upstream).sum().backward()

    mask = _replayed_mask(layer.cell.weight_hh.shape, p, 11)
    keep = torch.isclose(mask, torch.full_like(mask, 1 / (1 - p)))
    assert torch.all((mask == 0) | keep) and (mask == 0).any() and keep.any()
    # Reference: the same weights, no dropout (eval), with weight_hh := W ⊙ mask / (1 - p) at every time step;
    # the input weights, the Mogrifier and the RLSTM's weight_fu / weight_oc as they are.
    reference = copy.deepcopy(layer).eval()
    dropped = (layer.cell.weight_hh.detach() * mask).requires_grad_(True)
    ref_out, _ = functional_call(reference, {"cell.weight_hh": dropped}, (x, state))
    torch.testing.assert_close(out, ref_out, rtol=0, atol=1e-12)
    (ref_out * upstream).sum().backward()
    # The gradient reaches the undropped weight multiplied by mask / (1 - p).
    torch.testing.assert_close(layer.cell.weight_hh.grad, dropped.grad * mask, rtol=0, atol=1e-12)
    for name, param in layer.named_parameters():
        if name != "cell.weight_hh":
            torch.testing.assert_close(param.grad, dict(reference.named_parameters())[name].grad, rtol=0, atol=1e-12)


def test_weight_drop_draws_a_new_mask_per_call_and_none_in_eval():
    torch.manual_seed(0)
    layer = RecurrentLayer("lstm", 3, 6, weight_drop=0.5).double().train()
    plain = RecurrentLayer("lstm", 3, 6).double()
    plain.load_state_dict(layer.state_dict())  # same parameters, same state_dict keys
    x = torch.randn(5, 2, 3, dtype=F64)
    state = (torch.zeros(2, 6, dtype=F64), torch.zeros(2, 6, dtype=F64))
    torch.manual_seed(1)
    first, _ = layer(x, state)
    second, _ = layer(x, state)  # the next call: the next mask from the generator
    assert not torch.allclose(first, second)
    torch.manual_seed(1)
    F.dropout(torch.ones(24, 6, dtype=F64), 0.5, training=True)  # skip the first call's mask
    mask = F.dropout(torch.ones(24, 6, dtype=F64), 0.5, training=True)
    ref, _ = functional_call(plain, {"cell.weight_hh": plain.cell.weight_hh * mask}, (x, state))
    torch.testing.assert_close(second, ref, rtol=0, atol=1e-12)
    layer.eval()
    torch.testing.assert_close(layer(x, state)[0], plain(x, state)[0], rtol=0, atol=0)


def test_weight_drop_keeps_checkpoints_and_copies_working():
    cfg = ModelConfig(cell="rlstm", vocab_size=9, hidden_size=6, num_layers=2, mogrifier_rounds=2, weight_drop=0.5)
    torch.manual_seed(0)
    model = RecurrentLM(cfg)
    torch.manual_seed(0)
    plain = RecurrentLM(cfg.model_copy(update={"weight_drop": 0.0}))
    # Same parameters (weight drop adds nothing and draws nothing at construction), same state_dict keys.
    assert list(model.state_dict()) == list(plain.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), plain.state_dict().values()))
    assert not list(model.buffers())
    # A deep copy holds no mask of the original: with the same generator state both draw the same masks,
    # and the copy trains on its own.
    twin = copy.deepcopy(model)
    tokens = _tokens(5, 2, 9)
    torch.manual_seed(3)
    a, _ = model(tokens)
    torch.manual_seed(3)
    b, _ = twin(tokens)
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    with torch.no_grad():
        twin.layers[0].cell.weight_hh.add_(1.0)
    torch.manual_seed(3)
    assert torch.equal(model(tokens)[0], a)


def test_dropout_rates_are_validated_by_name():
    for field in ("weight_drop", "embedding_dropout"):
        with pytest.raises(ValidationError, match=field):
            ModelConfig(**{field: 1.0})
        with pytest.raises(ValidationError, match=field):
            ModelConfig(**{field: -0.1})
    with pytest.raises(ValueError, match="weight_drop must be in"):
        RecurrentLayer("gru", 3, 4, weight_drop=1.0)
    with pytest.raises(ValidationError, match="embedding_size"):
        ModelConfig(embedding_size=0)


# ------------------------------------------------------------------------------- embedding dropout


def test_embedding_dropout_drops_whole_words_for_every_occurrence():
    V, e, p = 7, 3, 0.5
    weight = torch.randn(V, e, dtype=F64, requires_grad=True)
    tokens = torch.tensor([[0, 1, 2], [1, 2, 3], [2, 3, 4], [0, 5, 6], [4, 4, 1]])
    torch.manual_seed(2)
    out = embedding_dropout(weight, tokens, p)
    ratio = out / weight.detach()[tokens]  # [T, B, e]
    scale = {}
    for t in range(tokens.shape[0]):
        for b in range(tokens.shape[1]):
            row = ratio[t, b]
            assert torch.allclose(row, row[0].expand_as(row))  # the whole row is kept or dropped
            scale.setdefault(int(tokens[t, b]), float(row[0].detach()))
            assert float(row[0].detach()) == pytest.approx(scale[int(tokens[t, b])])  # every occurrence alike
    assert set(round(v, 9) for v in scale.values()) == {0.0, 2.0}  # dropped and kept (x 1/(1-p)) words
    # Gradient: row w of the matrix gets mask_w / (1 - p) times the sum of the upstream rows of its occurrences.
    upstream = torch.randn_like(out)
    (out * upstream).sum().backward()
    expected = torch.zeros(V, e, dtype=F64)
    for t in range(tokens.shape[0]):
        for b in range(tokens.shape[1]):
            expected[tokens[t, b]] += scale[int(tokens[t, b])] * upstream[t, b]
    torch.testing.assert_close(weight.grad, expected, rtol=0, atol=1e-12)
    # Eval (or p = 0): the plain lookup.
    assert torch.equal(embedding_dropout(weight, tokens, p, training=False), weight[tokens])
    assert torch.equal(embedding_dropout(weight, tokens, 0.0), weight[tokens])


def test_lm_embedding_dropout_feeds_the_first_layer_one_mask_per_call():
    cfg = ModelConfig(cell="lstm", vocab_size=5, hidden_size=4, num_layers=1, embedding_dropout=0.5)
    torch.manual_seed(0)
    model = RecurrentLM(cfg).double()
    seen: list[torch.Tensor] = []
    model.layers[0].register_forward_pre_hook(lambda module, args: seen.append(args[0].detach()))
    tokens = _tokens(12, 3, 5)
    model.train()
    masks = []
    for _ in range(2):
        model(tokens)
        ratio = seen[-1] / model.input_embedding.detach()[tokens]
        word_scale = {}
        for t in range(12):
            for b in range(3):
                word_scale.setdefault(int(tokens[t, b]), ratio[t, b])
                torch.testing.assert_close(ratio[t, b], word_scale[int(tokens[t, b])])
        masks.append(torch.stack([word_scale[w][0] for w in sorted(word_scale)]))
    assert not torch.equal(masks[0], masks[1])  # a new mask per forward call
    model.eval()
    model(tokens)
    assert torch.equal(seen[-1], model.input_embedding.detach()[tokens])


# ------------------------------------------------------------------------------------------ AR / TAR


def _hand_residual(model: RecurrentLM, tokens: torch.Tensor) -> torch.Tensor:
    """Σ_l hˡ (eval mode: no dropout) from the layers, started at zero state: [T, B, n]."""
    B = tokens.shape[1]
    layer_input = model.input_embedding[tokens]
    residual = None
    for layer in model.layers:
        zeros = torch.zeros(B, model.hidden_size, dtype=F64)
        out, _ = layer(layer_input, (zeros, zeros))
        residual = out if residual is None else residual + out
        layer_input = residual
    return residual


def test_ar_tar_match_the_hand_formulas_on_a_tiny_model():
    cfg = ModelConfig(cell="lstm", vocab_size=9, hidden_size=5, embedding_size=3, num_layers=2, tie_embeddings=True,
                      output_dropout=0.3, cell_output_dropout=0.2, input_dropout=0.1)
    torch.manual_seed(0)
    model = RecurrentLM(cfg).double().eval()
    T, B, alpha, beta = 6, 2, 2.0, 1.0
    inputs, targets = _tokens(T, B, 9, seed=1), _tokens(T, B, 9, seed=2)
    result = multi_sample_objective(model, inputs, targets, None, 1, ar_alpha=alpha, tar_beta=beta)

    with torch.no_grad():
        r = _hand_residual(model, inputs)  # eval: raw = dropped
    n = model.hidden_size
    ar = alpha * sum(float(r[t, b, k]) ** 2 for t in range(T) for b in range(B) for k in range(n)) / (T * B * n)
    tar = beta * sum(float(r[t + 1, b, k] - r[t, b, k]) ** 2
                     for t in range(T - 1) for b in range(B) for k in range(n)) / ((T - 1) * B * n)
    logits = (r @ model.output_projection.T) @ model.input_embedding.T + model.output_bias
    nll = F.cross_entropy(logits.reshape(-1, 9), targets.reshape(-1))
    assert float(result.ar) == pytest.approx(ar, rel=1e-12)
    assert float(result.tar) == pytest.approx(tar, rel=1e-12)
    assert float(result.nll) == pytest.approx(float(nll), rel=1e-12)
    assert float(result.loss) == pytest.approx(float(nll) + ar + tar, rel=1e-12)
    # Coefficients 0: nothing computed, the plain multi-sample loss.
    plain = multi_sample_objective(model, inputs, targets, None, 1)
    assert plain.ar is None and plain.tar is None
    assert torch.equal(plain.loss, multi_sample_loss(model, inputs, targets, None, 1)[0])


@pytest.mark.parametrize("samples", [1, 3])
def test_ar_reads_the_dropped_output_and_tar_the_raw_one_in_training(samples):
    p = 0.5
    cfg = ModelConfig(cell="gru", vocab_size=9, hidden_size=4, num_layers=2, output_dropout=p, state_dropout=0.2)
    torch.manual_seed(0)
    model = RecurrentLM(cfg).double().train()
    T, B, alpha, beta = 5, 2, 2.0, 1.0
    inputs, targets = _tokens(T, B, 9, seed=1), _tokens(T, B, 9, seed=2)
    torch.manual_seed(7)
    result = multi_sample_objective(model, inputs, targets, None, samples, ar_alpha=alpha, tar_beta=beta)
    torch.manual_seed(7)  # the same forward call again: the same masks
    _, _, outputs = model(inputs.repeat(1, samples), None, return_outputs=True)
    raw, dropped = outputs.raw, outputs.dropped
    assert raw.shape == (T, samples * B, 4)
    ratio = dropped / raw
    assert torch.all(torch.isclose(ratio, torch.zeros_like(ratio)) | torch.isclose(ratio, torch.full_like(ratio, 2.0)))
    count = raw.numel()
    ar = alpha * sum(float(v) ** 2 for v in dropped.flatten()) / count
    diffs = (raw[1:] - raw[:-1]).flatten()
    tar = beta * sum(float(v) ** 2 for v in diffs) / diffs.numel()
    assert float(result.ar) == pytest.approx(ar, rel=1e-12)
    assert float(result.tar) == pytest.approx(tar, rel=1e-12)
    assert float(result.ar) != pytest.approx(alpha * float(raw.pow(2).mean()), rel=1e-3)
    result.loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
    # One time step has no consecutive pair: TAR is 0.
    one = multi_sample_objective(model, inputs[:1], targets[:1], None, 1, tar_beta=beta)
    assert float(one.tar) == 0.0


# -------------------------------------------------------------------------------- embedding size


def test_embedding_size_projects_the_output_into_the_tied_embedding_space():
    V, n, e = 11, 6, 4
    cfg = ModelConfig(cell="gru", vocab_size=V, hidden_size=n, embedding_size=e, num_layers=2, tie_embeddings=True)
    torch.manual_seed(0)
    model = RecurrentLM(cfg).double().eval()
    assert model.output_embedding is model.input_embedding and model.input_embedding.shape == (V, e)
    assert (model.layers[0].input_size, model.layers[1].input_size) == (e, n)
    assert model.output_projection.shape == (e, n)
    tokens = _tokens(5, 3, V)
    logits, _ = model(tokens)
    r = _hand_residual(model, tokens)
    torch.testing.assert_close(logits, (r @ model.output_projection.T) @ model.input_embedding.T + model.output_bias)
    # Parameters by hand (GRU: 3n x m input, 3n x n recurrent, two 3n biases): tied counts the embedding once.
    gru = lambda m: 3 * n * m + 3 * n * n + 6 * n  # noqa: E731
    tied = V * e + V + gru(e) + gru(n) + e * n
    assert count_parameters(cfg) == tied == sum(p.numel() for p in model.parameters())
    untied = cfg.model_copy(update={"tie_embeddings": False})
    assert count_parameters(untied) == tied + V * e == sum(p.numel() for p in RecurrentLM(untied).parameters())


def test_embedding_size_equal_to_hidden_size_is_the_default_model():
    base = ModelConfig(cell="rlstm", vocab_size=9, hidden_size=6, num_layers=2, mogrifier_rounds=2)
    torch.manual_seed(0)
    default = RecurrentLM(base)
    after_default = torch.rand(3)
    torch.manual_seed(0)
    same = RecurrentLM(base.model_copy(update={"embedding_size": 6}))
    assert torch.equal(torch.rand(3), after_default)  # the same random numbers consumed
    assert default.output_projection is None and same.output_projection is None
    assert list(default.state_dict()) == list(same.state_dict())
    assert all(torch.equal(a, b) for a, b in zip(default.state_dict().values(), same.state_dict().values()))


def test_default_model_numbers_are_unchanged():
    """Golden numbers of the default-option LM (recorded before the AWD options existed): the same
    parameters, the same dropout masks, the same loss."""
    cfg = ModelConfig(cell="lstm", vocab_size=13, hidden_size=8, num_layers=2, input_dropout=0.2, state_dropout=0.3,
                      cell_output_dropout=0.1, output_dropout=0.2)
    torch.manual_seed(0)
    model = RecurrentLM(cfg).train()
    tokens = torch.randint(0, 13, (5, 3))
    loss, _ = multi_sample_loss(model, tokens, tokens.roll(1, 0), None, 2)
    assert float(loss.detach()) == pytest.approx(GOLDEN_LOSS, rel=0, abs=1e-6)
    param_sum = float(sum(p.detach().double().sum() for p in model.parameters()))
    assert param_sum == pytest.approx(GOLDEN_PARAM_SUM, rel=0, abs=1e-9)


GOLDEN_LOSS = 2.566051483154297  # computed with the code before this change (git HEAD 38a6443)
GOLDEN_PARAM_SUM = 0.6595895775244571


# --------------------------------------------------------------------------------- variable BPTT


def _stream_tokens(n: int) -> np.ndarray:
    return (np.arange(n, dtype=np.int64) * 7919) % 1000


def test_variable_windows_tile_each_stripe_and_carry_their_lr_factor():
    tokens = _stream_tokens(4 * 2000 + 3)
    bptt = 30
    stream = BatchStream(tokens, 4, bptt, variable=VariableBPTT(seed=5, std=5.0, min_length=5))
    stripes = tokens[: 4 * stream.stripe_len].reshape(4, stream.stripe_len)
    pieces, lengths, first = [], [], True
    while stream.epoch == 0:
        pos = stream.position
        batch = stream.next_batch()
        length = batch.inputs.shape[0]
        assert batch.reset_state == first
        first = False
        assert batch.lr_factor == length / bptt
        assert torch.equal(batch.inputs, torch.from_numpy(stripes[:, pos : pos + length].T.copy()))
        assert torch.equal(batch.targets, torch.from_numpy(stripes[:, pos + 1 : pos + 1 + length].T.copy()))
        pieces.append(batch.inputs)
        lengths.append(length)
    # One epoch: the windows cover the S - 1 prediction positions of every stripe once, in order.
    assert torch.equal(torch.cat(pieces).T, torch.from_numpy(stripes[:, :-1].copy()))
    assert len(set(lengths)) > 5 and min(lengths[:-1]) >= 5
    assert stream.position == 0 and stream.next_batch().reset_state


def test_variable_window_lengths_follow_awd():
    bptt, n = 40, 4000
    draw = VariableBPTT(seed=1, std=1.0, min_length=5)
    lengths = np.array([draw.length(bptt, epoch, pos) for epoch in range(4) for pos in range(n // 4)])
    half = lengths < 30  # bptt / 2 ± many std vs bptt ± many std
    assert 0.035 < half.mean() < 0.065  # probability 0.05 (binomial sd ~0.0034)
    assert abs(lengths[~half].mean() - 40) < 0.1 and abs(lengths[~half].std() - 1.0) < 0.1
    assert abs(lengths[half].mean() - 20) < 0.3
    assert np.all(lengths == np.round(lengths))
    # The shortest window, and a pure function of (seed, epoch, position).
    wide = VariableBPTT(seed=1, std=50.0, min_length=7)
    wide_lengths = [wide.length(bptt, 0, pos) for pos in range(300)]
    assert min(wide_lengths) == 7
    assert [wide.length(bptt, 0, pos) for pos in range(300)] == wide_lengths
    assert [VariableBPTT(seed=2, std=50.0, min_length=7).length(bptt, 0, pos) for pos in range(300)] != wide_lengths
    with pytest.raises(ValueError, match="min_length"):
        VariableBPTT(min_length=0)
    with pytest.raises(ValueError, match="std"):
        VariableBPTT(std=-1.0)


def test_variable_windows_are_the_same_on_every_rank_and_resume_exactly():
    tokens = _stream_tokens(8 * 500 + 5)
    draw = VariableBPTT(seed=9, std=4.0, min_length=3)
    whole = BatchStream(tokens, 8, 16, variable=draw)
    ranks = [BatchStream(tokens, 8, 16, rank=r, world_size=2, variable=draw) for r in range(2)]
    for _ in range(80):  # several epochs
        batch, parts = whole.next_batch(), [s.next_batch() for s in ranks]
        assert torch.equal(torch.cat([p.inputs for p in parts], 1), batch.inputs)
        assert parts[0].lr_factor == parts[1].lr_factor == batch.lr_factor
    assert whole.epoch >= 2
    # Resume: the state (epoch + position in tokens, the same keys as with fixed windows) continues exactly.
    state = whole.state_dict()
    assert set(state) == {"epoch", "position", "num_tokens", "batch_size", "bptt"}
    resumed = BatchStream(tokens, 8, 16, variable=draw)
    resumed.load_state_dict(json.loads(json.dumps(state)))
    for _ in range(60):
        a, b = whole.next_batch(), resumed.next_batch()
        assert torch.equal(a.inputs, b.inputs) and a.lr_factor == b.lr_factor and a.reset_state == b.reset_state
    # A state saved with fixed windows (an old checkpoint) loads: variable windows from its position on.
    fixed = BatchStream(tokens, 8, 16)
    for _ in range(3):
        assert fixed.next_batch().lr_factor == 1.0
    switched = BatchStream(tokens, 8, 16, variable=draw)
    switched.load_state_dict(fixed.state_dict())
    assert switched.position == 48 and switched.next_batch().inputs[0, 0] == fixed.next_batch().inputs[0, 0]


def test_fixed_windows_never_rescale_the_lr():
    stream = BatchStream(_stream_tokens(2 * 50), 2, 7)  # stripes of 50: windows 7 x 7 then 0 left... and a short one
    factors = [stream.next_batch().lr_factor for _ in range(2 * stream.batches_per_epoch)]
    assert factors == [1.0] * len(factors)


# ------------------------------------------------------------------------------- lr and optimizer


def test_step_lr_factor_composes_with_lr_scale_on_every_param_group():
    from pipeline.trainer_state import TrainerCheckpoints

    class LrOnly(TrainerCheckpoints):  # the trainer's lr handling, on its own
        def __init__(self) -> None:
            self.train_cfg = TrainConfig(optimizer={"name": "sgd", "lr": 30.0})
            self.lr_scale = 0.9
            a, b = torch.nn.Parameter(torch.zeros(2)), torch.nn.Parameter(torch.zeros(3))
            self.optimizer = torch.optim.SGD([{"params": [a]}, {"params": [b], "lr": 1.0}], lr=30.0)

    trainer = LrOnly()
    window = Batch(torch.zeros(1, 1, dtype=torch.long), torch.zeros(1, 1, dtype=torch.long), False, lr_factor=0.5)
    trainer._set_step_lr(window)
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(30 * 0.9 * 0.5)] * 2
    trainer.lr_scale = 0.81  # a divergence decays the scale: the step factor stays
    trainer._apply_lr()
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(30 * 0.81 * 0.5)] * 2
    trainer._set_step_lr(object())  # a batch without a factor (the VAE's): 1
    assert [g["lr"] for g in trainer.optimizer.param_groups] == [pytest.approx(30 * 0.81)] * 2


def test_sgd_is_plain_sgd():
    from pipeline.trainer_state import build_optimizer

    torch.manual_seed(0)
    model = torch.nn.Linear(3, 2)
    optimizer = build_optimizer(model, TrainConfig(optimizer={"name": "sgd", "lr": 0.5}))
    assert isinstance(optimizer, torch.optim.SGD) and optimizer.param_groups[0]["momentum"] == 0
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(2):  # no momentum: every step is -lr * its own gradient
        optimizer.zero_grad()
        model(torch.ones(1, 3)).pow(2).sum().backward()
        grads = [p.grad.clone() for p in model.parameters()]
        optimizer.step()
        for p, b, g in zip(model.parameters(), before, grads):
            torch.testing.assert_close(p.detach(), b - 0.5 * g)
        before = [p.detach().clone() for p in model.parameters()]


# ----------------------------------------------------------------------------------- shipped configs


def _lstm(m: int, n: int) -> int:
    return 4 * n * m + 4 * n * n + 4 * n


def _gru(m: int, n: int) -> int:
    return 3 * n * m + 3 * n * n + 6 * n


@pytest.mark.parametrize("name, cell, layer, count", [("ptb_word_awd", "lstm", _lstm, 32_773_800),
                                                      ("ptb_word_awd_gru", "gru", _gru, 25_708_200)])
def test_shipped_awd_configs(name, cell, layer, count):
    config = load_config(name)
    m, t = config.model, config.train
    assert (m.cell, m.hidden_size, m.embedding_size, m.num_layers, m.tie_embeddings) == (cell, 1150, 400, 3, True)
    assert (m.input_dropout, m.cell_output_dropout, m.output_dropout, m.embedding_dropout, m.weight_drop) == (
        0.4, 0.25, 0.4, 0.1, 0.5)
    assert (t.batch_size, t.bptt, t.variable_bptt, t.ar_alpha, t.tar_beta) == (80, 70, True, 2.0, 1.0)
    assert (t.optimizer.name, t.optimizer.lr, t.optimizer.clip_norm, t.optimizer.l2_penalty) == ("sgd", 30.0, 0.25, 1.2e-6)
    assert (t.averaging.method, t.averaging.nonmono) == ("nt_asgd", 5)
    assert config.data.dataset == "ptb_word"
    V, e, n = 10_000, 400, 1150
    assert V * e + V + layer(e, n) + 2 * layer(n, n) + e * n == count
    assert count_parameters(m.model_copy(update={"vocab_size": V})) == count


def test_awd_sizes_fit_real_ptb(ptb_word_dir):
    from pipeline.data import load_manifest
    from pipeline.sizes import check_evaluation_sizes, check_training_sizes

    manifest = load_manifest(ptb_word_dir)
    assert manifest.vocab_size == 10_000
    for name in ("ptb_word_awd", "ptb_word_awd_gru"):
        config = load_config(name)
        for world_size in (1, 2, 4, 8):  # batch 80: whole stripes per rank on 1, 2, 4 or 8 GPUs
            check_training_sizes(config, manifest, world_size)
        check_evaluation_sizes(config, manifest)


# ------------------------------------------------------------------------------ end to end + resume


def _tiny_awd(work_dir, data_dir, max_steps: int, **train):
    raw = yaml.safe_load((REPO / "pipeline" / "configs" / "ptb_word_awd.yaml").read_text())
    raw.update(work_dir=str(work_dir), tracking={"enabled": False}, checkpoint={"every": 2})
    raw["data"].update(dir=str(data_dir), source=str(PTB_DIR / "ptb.zip"))
    raw["model"].update(hidden_size=12, embedding_size=8, num_layers=2)
    raw["train"].update({"batch_size": 8, "bptt": 12, "max_steps": max_steps, "eval_every": 2, "eval_tokens": 400,
                         "eval_batch_size": 4, "log_every": 1, "device": "cpu", **train})
    raw["train"]["averaging"]["nonmono"] = 1
    raw["evaluate"] = {"batch_size": 4, "bptt": 12, "max_tokens": 400}
    return validate_config(raw)


def _log(run_dir) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "train_log.jsonl").read_text().splitlines()]


def test_tiny_awd_run_applies_the_window_lr_and_resumes_exactly(tmp_path, ptb_word_dir):
    from pipeline.data import load_tokens
    from pipeline.trainer import Trainer

    steps = 6
    reference = Trainer(_tiny_awd(tmp_path / "a", ptb_word_dir, steps))
    assert isinstance(reference.optimizer, torch.optim.SGD)
    first_loss, _ = reference.train_step()
    assert set(reference._step_metrics) == {"ar", "tar"} and all(v > 0 for v in reference._step_metrics.values())
    assert math.isfinite(first_loss)
    reference = Trainer(_tiny_awd(tmp_path / "a", ptb_word_dir, steps))  # fresh: train() from step 0
    reference.train()
    ref_log = _log(tmp_path / "a")
    ref_steps = {r["step"]: r for r in ref_log if "loss" in r}
    assert sorted(ref_steps) == list(range(1, steps + 1))
    # lr of step t = 30 x (its window length / bptt): the windows of a replica of rank 0's stream.
    replica = BatchStream(load_tokens(ptb_word_dir, "train"), 8, 12, variable=VariableBPTT(seed=141, std=5.0,
                                                                                          min_length=5))
    windows = [replica.next_batch().inputs.shape[0] for _ in range(steps)]
    assert len(set(windows)) > 1
    assert [ref_steps[t]["lr"] for t in range(1, steps + 1)] == [pytest.approx(30.0 * w / 12) for w in windows]
    evals = [r["eval"] for r in ref_log if "eval" in r]
    assert [e["source"] for e in evals][0] == "raw" and len(evals) == steps // 2

    # Interrupted after 3 steps (checkpoint at step 2 and the final one at 3), then continued to 6.
    Trainer(_tiny_awd(tmp_path / "b", ptb_word_dir, 3)).train()
    resumed = Trainer(_tiny_awd(tmp_path / "b", ptb_word_dir, steps))
    resumed.train()
    got = {r["step"]: r for r in _log(tmp_path / "b") if "loss" in r}
    assert [(got[t]["loss"], got[t]["lr"]) for t in range(1, steps + 1)] == [
        (ref_steps[t]["loss"], ref_steps[t]["lr"]) for t in range(1, steps + 1)]
    assert [r["eval"] for r in _log(tmp_path / "b") if "eval" in r][-1] == evals[-1]
    for p, q in zip(reference.model.parameters(), resumed.model.parameters()):
        assert torch.equal(p, q)


def _deepspeed_and_ddp_steps(rank: int, folder: str, data_dir: str) -> None:
    """Child process of the test below: four steps of each engine; lrs and the largest weight difference to JSON."""
    from pipeline.deepspeed_engine import DeepSpeedTrainer
    from pipeline.trainer import Trainer

    def deterministic(config):
        rates = dict.fromkeys(("input_dropout", "cell_output_dropout", "output_dropout", "embedding_dropout",
                               "weight_drop"), 0.0)
        return config.model_copy(update={"model": config.model.model_copy(update=rates)})

    root = Path(folder)
    ddp = Trainer(deterministic(_tiny_awd(root / "ddp", Path(data_dir), 4)))
    ds = DeepSpeedTrainer(deterministic(_tiny_awd(root / "ds", Path(data_dir), 4, engine="deepspeed", zero_stage=2)))
    try:
        steps = []
        for _ in range(4):
            ddp.train_step()
            ds.train_step()
            steps.append({"ds": ds._lr(), "ddp": ddp._lr(), "zero": ds.engine.optimizer.param_groups[0]["lr"]})
        diff = max(float((p.detach() - q.detach()).abs().max()) for p, q in zip(ddp.model.parameters(),
                                                                                  ds.model.parameters()))
        (root / "result.json").write_text(json.dumps({"steps": steps, "max_diff": diff}))
    finally:
        ds.close()
        ddp.close()


def test_deepspeed_applies_the_window_lr_like_ddp(tmp_path, ptb_word_dir, monkeypatch):
    """The per-step lr reaches the optimizer ZeRO steps: without dropout both engines train the same weights.
    (In a child process: DeepSpeed caches its process groups, so one engine per process, and test_deepspeed.py
    builds one in this process.)"""
    pytest.importorskip("deepspeed")
    for key, value in (("DS_ACCELERATOR", "cpu"), ("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
        monkeypatch.setenv(key, value)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_awd import _deepspeed_and_ddp_steps; "
            "_deepspeed_and_ddp_steps(0, sys.argv[2], sys.argv[3])")
    done = subprocess.run([PYTHON, "-c", code, str(Path(__file__).parent), str(tmp_path), str(ptb_word_dir)], cwd=REPO,
                          env=pipeline_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    result = json.loads((tmp_path / "result.json").read_text())
    lrs = [step["ds"] for step in result["steps"]]
    assert all(step["ds"] == step["ddp"] == step["zero"] for step in result["steps"])
    assert len(set(lrs)) > 1
    assert result["max_diff"] <= 1e-5


def test_awd_training_fields_are_language_model_fields():
    """A sentence-VAE config refuses them by name (and its resolved config leaves them out)."""
    from pipeline.config import ConfigError

    raw = yaml.safe_load((REPO / "pipeline" / "configs" / "ptb_vae.yaml").read_text())
    for field, value in (("ar_alpha", 2.0), ("tar_beta", 1.0), ("variable_bptt", True)):
        bad = copy.deepcopy(raw)
        bad["train"][field] = value
        with pytest.raises(ConfigError, match=f"train.{field}: a language-model field"):
            validate_config(bad)
    assert "ar_alpha" not in load_config("ptb_vae").to_yaml()
