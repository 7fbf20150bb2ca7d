"""The shipped experiment configs carry the thesis' settings (ch. 4 §4.6) and parameter budgets."""

from __future__ import annotations

import pytest

from models import count_parameters
from pipeline.config import load_config

# Vocabulary sizes the data stage produces for each corpus (bytes, a-z + space, PTB char + <eos>).
VOCAB = {"enwik8": 256, "text8": 27, "ptb_char": 50}


@pytest.mark.parametrize(
    "name, budget",
    [
        ("enwik8_rlstm", 48e6),
        ("enwik8_rlstm_96m", 96e6),
        ("text8_rlstm", 48e6),
        ("text8_rlstm_96m", 96e6),
        ("ptb_char_rlstm", 24e6),
    ],
)
def test_parameter_budget(name, budget):
    config = load_config(name)
    model = config.model.model_copy(update={"vocab_size": VOCAB[config.data.dataset]})
    n = count_parameters(model)  # built on the meta device: no memory, no training
    assert abs(n - budget) / budget < 0.02, f"{name}: {n:,} parameters, expected ~{budget:,.0f}"


@pytest.mark.parametrize("name", ["enwik8_rlstm", "enwik8_rlstm_96m", "text8_rlstm", "text8_rlstm_96m"])
def test_large_char_configs_follow_the_thesis(name):
    config = load_config(name)
    assert config.model.cell == "rlstm" and config.model.mogrifier_rounds > 0  # Mogrifier RLSTM
    assert config.model.num_layers == 6
    assert config.train.batch_size == 128 and config.train.bptt == 256
    assert config.train.optimizer.name == "radam"
    assert config.model.chrono_t_max is not None
    import math

    assert math.e**2 <= config.model.chrono_t_max <= math.e**5  # the thesis' tuning range for T_max
    assert config.train.averaging.method == "two_tailed"
    assert config.data.source.endswith(f"{config.data.dataset}.zip")


def test_ptb_char_config_follows_the_thesis():
    config = load_config("ptb_char_rlstm")
    assert config.model.num_layers == 2 and config.model.cell == "rlstm"
    assert config.train.batch_size == 128 and config.train.bptt == 200
    assert config.train.dropout_samples == 4
