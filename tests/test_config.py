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
    from pipeline.cli_options import schema_overrides

    overrides = schema_overrides(args)
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


def _schema_models(model, seen=None):
    """``model`` and every model reachable from its fields (sections, list items such as tolerations)."""
    import typing

    from pydantic import BaseModel

    seen = seen if seen is not None else {}
    seen.setdefault(model, None)
    for info in model.model_fields.values():
        stack = [info.annotation]
        while stack:
            annotation = stack.pop()
            if isinstance(annotation, type) and issubclass(annotation, BaseModel):
                if annotation not in seen:
                    _schema_models(annotation, seen)
            else:
                stack.extend(typing.get_args(annotation))
    return list(seen)


def test_every_leaf_field_has_a_one_line_description():
    from pydantic import BaseModel

    models = _schema_models(PipelineConfig)
    assert {m.__name__ for m in models} >= {"ModelConfig", "TrainConfig", "OptimizerConfig", "TemperatureScan",
                                            "ClusterConfig", "PodResources", "GpuPodResources", "Toleration"}
    missing = []
    for model in models:
        for name, info in model.model_fields.items():
            if isinstance(info.annotation, type) and issubclass(info.annotation, BaseModel):
                continue  # a section: its class docstring describes it
            text = (info.description or "").strip()
            if not text or "\n" in text:
                missing.append(f"{model.__name__}.{name}")
    assert not missing, f"fields without a one-line description: {missing}"


def test_tracking_uri_help_names_the_real_default():
    description = PipelineConfig.model_fields["tracking"].annotation.model_fields["uri"].description
    # The tracker falls back to $MLFLOW_TRACKING_URI, then to a SQLite store next to the run folders
    # (runs/mlflow.db for the default work_dir runs/<name>), not inside the run's own folder.
    assert "$MLFLOW_TRACKING_URI" in description
    assert "runs/mlflow.db" in description and "<work_dir>/mlflow.db" not in description
