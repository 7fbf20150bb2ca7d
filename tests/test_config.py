"""The typed config schema and the CLI generated from it."""

from __future__ import annotations

import pytest
import yaml

from pipeline.cli import build_parser, main, schema_options
from pipeline.config import (
    ConfigError,
    PipelineConfig,
    flatten_config,
    load_config,
    shipped_config_names,
    validate_config,
)

MINIMAL = {"name": "x", "data": {"dataset": "text", "source": "sample"}}


def test_every_shipped_config_validates():
    names = shipped_config_names()
    for required in ("demo", "enwik8_rlstm", "text8_rlstm", "ptb_char_rlstm", "ptb_char_tiny"):
        assert required in names
    for name in names:
        config = load_config(name)
        assert config.name
        # The resolved config survives a YAML round trip unchanged (it is saved with every run).
        again = validate_config(yaml.safe_load(config.to_yaml()))
        assert again == config


def test_unknown_key_is_rejected_naming_the_field():
    raw = {**MINIMAL, "train": {"optimizer": {"learning_rate": 0.1}}}
    with pytest.raises(ConfigError) as err:
        validate_config(raw)
    assert "train.optimizer.learning_rate" in str(err.value)
    assert "unknown field" in str(err.value)


def test_wrong_type_is_rejected_naming_the_field():
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "train": {"batch_size": "many"}})
    assert "train.batch_size" in str(err.value)
    with pytest.raises(ConfigError) as err:
        validate_config({**MINIMAL, "model": {"state_dropout": 1.5}})
    assert "model.state_dropout" in str(err.value)


def test_missing_required_field_is_named():
    with pytest.raises(ConfigError) as err:
        validate_config({"name": "x", "data": {"dataset": "text"}})
    assert "data.source" in str(err.value)


def test_averaging_methods_need_their_parameters():
    with pytest.raises(ConfigError, match="tail_start"):
        validate_config({**MINIMAL, "train": {"averaging": {"method": "tail"}}})
    with pytest.raises(ConfigError, match="ema_decay"):
        validate_config({**MINIMAL, "train": {"averaging": {"method": "ema"}}})
    ok = validate_config({**MINIMAL, "train": {"averaging": {"method": "ema", "ema_decay": 0.99}}})
    assert ok.train.averaging.ema_decay == 0.99


def test_unknown_config_name_lists_the_shipped_ones():
    with pytest.raises(ConfigError) as err:
        load_config("no_such_config")
    assert "demo" in str(err.value)


def test_cli_options_are_generated_from_the_schema():
    options = dict(schema_options())
    assert "train.optimizer.lr" in options
    assert "model.mogrifier_rounds" in options
    assert "train.averaging.reset_patience" in options
    # Every leaf of the schema is an option: compare with the flattened default config.
    flat = flatten_config(validate_config(MINIMAL))
    assert set(flat) == set(options)
    args = build_parser().parse_args(
        ["train", "--config", "demo", "--train.optimizer.lr", "0.01", "--model.chrono_t_max", "null"]
    )
    from pipeline.cli import _overrides

    overrides = _overrides(args)
    assert overrides == {"train.optimizer.lr": 0.01, "model.chrono_t_max": None}
    config = load_config("demo", overrides)
    assert config.train.optimizer.lr == 0.01 and config.model.chrono_t_max is None


def test_cli_rejects_bad_override_with_exit_code_2(capsys):
    assert main(["train", "--config", "demo", "--train.batch_size", "-3"]) == 2
    assert "train.batch_size" in capsys.readouterr().err


def test_flatten_config_names_every_leaf():
    config = validate_config(MINIMAL)
    flat = flatten_config(config)
    assert flat["train.optimizer.name"] == "radam"
    assert flat["data.source"] == "sample"
    assert all(not isinstance(v, dict) or v == {} for v in flat.values())  # empty mappings are leaves
    assert flat["checkpoint.storage_options"] == {}


def test_paths_default_under_the_name(tmp_path):
    config = validate_config({**MINIMAL, "work_dir": str(tmp_path / "w")})
    assert config.checkpoint_url == str(tmp_path / "w" / "checkpoints")
    assert isinstance(config, PipelineConfig)
