"""Training options: gradient accumulation semantics, precision guard, per-rank memory report."""

from __future__ import annotations

import math

import pytest

from conftest import tiny_ptb_config


def _config(tmp_path, data_dir, **train):
    from pipeline.config import validate_config

    raw = tiny_ptb_config(tmp_path / "run", data_dir)
    # No dropout: the objective is deterministic, so micro-batching must not change it.
    for key in ("input_dropout", "state_dropout", "cell_output_dropout", "output_dropout"):
        raw["model"][key] = 0.0
    raw["train"].update(max_steps=6, eval_every=3, eval_tokens=1000, device="cpu", **train)
    return validate_config(raw)


def _losses(trainer, steps):
    return [trainer.train_step()[0] for _ in range(steps)]


def test_gradient_accumulation_keeps_the_global_batch_semantics(tmp_path, ptb_char_dir):
    from pipeline.train import Trainer

    whole = Trainer(_config(tmp_path / "a", ptb_char_dir))
    split = Trainer(_config(tmp_path / "b", ptb_char_dir, grad_accum_steps=4))
    assert split.micro_batch == whole.micro_batch // 4
    a, b = _losses(whole, 5), _losses(split, 5)
    # Same data, same weights, mean over the same tokens: equal up to float summation order.
    assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(a, b)), (a, b)
    for p, q in zip(whole.model.parameters(), split.model.parameters()):
        assert (p - q).abs().max() < 1e-4


def test_grad_accum_must_divide_the_batch(tmp_path, ptb_char_dir):
    from pipeline.train import Trainer

    with pytest.raises(ValueError, match="grad_accum_steps"):
        Trainer(_config(tmp_path, ptb_char_dir, grad_accum_steps=3))


def test_bf16_needs_a_gpu(tmp_path, ptb_char_dir):
    from pipeline.train import Trainer

    with pytest.raises(ValueError, match="bf16 needs a GPU"):
        Trainer(_config(tmp_path, ptb_char_dir, precision="bf16"))


def test_memory_report_counts_params_optimizer_and_averages(tmp_path, ptb_char_dir):
    from pipeline.train import Trainer, memory_report

    trainer = Trainer(_config(tmp_path, ptb_char_dir))
    trainer.train_step()
    report = memory_report(trainer.model, trainer.optimizer, trainer.averager)
    params = sum(p.numel() for p in trainer.model.parameters()) * 4 / 2**20
    assert math.isclose(report["params_mib"], params)
    assert math.isclose(report["averages_mib"], 2 * params)  # 2TA keeps a short and a long average
    # RAdam keeps exp_avg and exp_avg_sq per parameter (plus a scalar step each).
    assert 2 * params <= report["optimizer_mib"] < 2 * params + 0.01
