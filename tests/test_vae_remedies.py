"""KL annealing, soft free bits and encoder pretraining against hand-computed sequences."""

from __future__ import annotations

import json

import pytest

from models.vae.remedies import (
    AnnealingConfig,
    KLSchedule,
    PretrainingConfig,
    SoftFreeBits,
    SoftFreeBitsConfig,
    kl_weight,
    phase,
    reset_due,
)


def test_constant_is_one():
    assert [kl_weight(s, AnnealingConfig()) for s in range(3)] == [1.0, 1.0, 1.0]


def test_linear_warmup_by_hand():
    config = AnnealingConfig(schedule="linear", warmup_steps=4)
    assert [kl_weight(s, config) for s in range(7)] == [0.0, 0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
    started = AnnealingConfig(schedule="linear", warmup_steps=2, start=0.2)
    assert [kl_weight(s, started) for s in range(4)] == pytest.approx([0.2, 0.6, 1.0, 1.0])


def test_cyclical_fu_et_al_by_hand():
    # M = 2 cycles over T = 8 steps: cycles of 4; R = 0.5 -> the first 2 steps of each cycle ramp (0, 0.5),
    # then 1; after T the weight stays 1.
    config = AnnealingConfig(schedule="cyclical", cycles=2, ratio=0.5, total_steps=8)
    assert [kl_weight(s, config) for s in range(11)] == [0.0, 0.5, 1.0, 1.0, 0.0, 0.5, 1.0, 1.0, 1.0, 1.0, 1.0]
    # M = 3 over T = 9 with R = 1: a full ramp over each cycle of 3 steps: 0, 1/3, 2/3.
    ramp = AnnealingConfig(schedule="cyclical", cycles=3, ratio=1.0, total_steps=9)
    assert [kl_weight(s, ramp) for s in range(9)] == pytest.approx([0, 1 / 3, 2 / 3] * 3)
    # T = 10 not divisible by M = 3 (Fu et al.: cycles of ceil(10/3) = 4 steps, τ = (s mod 4) / (10/3)), R = 0.5:
    # τ = 0, 0.3, 0.6, 0.9 -> weights 0, 0.6, 1, 1; the third cycle is cut at T; then 1.
    uneven = AnnealingConfig(schedule="cyclical", cycles=3, ratio=0.5, total_steps=10)
    assert [kl_weight(s, uneven) for s in range(11)] == pytest.approx([0, 0.6, 1, 1, 0, 0.6, 1, 1, 0, 0.6, 1])


@pytest.mark.parametrize("fields, field", [({"schedule": "linear"}, "warmup_steps"),
                                           ({"schedule": "cyclical", "cycles": 4, "total_steps": 2}, "total_steps")])
def test_annealing_config_names_the_missing_field(fields, field):
    with pytest.raises(ValueError, match=field):
        AnnealingConfig(**fields)


def test_soft_free_bits_gamma_by_hand():
    # λ = 10, β = 0.1 (band [9, 11]), χ = 0.5, γ0 = 0.5
    sfb = SoftFreeBits(SoftFreeBitsConfig(target_rate=10.0, threshold=0.1, multiplier=0.5, initial_gamma=0.5))
    kls = [12.0, 12.0, 10.0, 5.0, 9.5, 20.0, 20.0]
    expected = [0.75, 1.0, 1.0, 0.5, 0.5, 0.75, 1.0]  # up x1.5 (capped at 1), hold, down x0.5, hold, up, up
    assert [sfb.update(kl) for kl in kls] == pytest.approx(expected)


def test_pretraining_phase_and_reset():
    config = PretrainingConfig(steps=3)
    assert [phase(s, config) for s in range(5)] == ["pretrain"] * 3 + ["train"] * 2
    assert [reset_due(s, config) for s in range(5)] == [False, False, False, True, False]
    assert phase(0, None) == "train" and not reset_due(0, None)


def test_schedule_combines_pretraining_annealing_and_gamma():
    schedule = KLSchedule(AnnealingConfig(schedule="linear", warmup_steps=2), None, PretrainingConfig(steps=2))
    # two autoencoder steps, then annealing restarts at the reset: 0, 0.5, 1
    assert [schedule.weight(s) for s in range(6)] == [0.0, 0.0, 0.0, 0.5, 1.0, 1.0]
    assert [schedule.reset_due(s) for s in range(4)] == [False, False, True, False]


def test_gamma_adapts_only_after_annealing_and_resumes_exactly():
    sfb = SoftFreeBitsConfig(target_rate=4.0, threshold=0.0, multiplier=0.5, initial_gamma=1.0)
    schedule = KLSchedule(AnnealingConfig(schedule="linear", warmup_steps=4), sfb)
    assert schedule.end_of_period(1.0, step=2) == 1.0  # still annealing: no change
    assert schedule.end_of_period(1.0, step=4) == 0.5  # KL below target: γ halves
    assert schedule.weight(5) == 0.5
    saved = json.loads(json.dumps(schedule.state_dict()))  # checkpointed as JSON
    resumed = KLSchedule(AnnealingConfig(schedule="linear", warmup_steps=4), sfb)
    resumed.load_state_dict(saved)
    for step, kl in ((6, 1.0), (8, 9.0), (10, 1.0)):
        assert resumed.end_of_period(kl, step=step) == schedule.end_of_period(kl, step=step)
        assert resumed.weight(step) == schedule.weight(step)
    assert schedule.soft_free_bits.gamma == pytest.approx(0.25 * 1.5 * 0.5)
