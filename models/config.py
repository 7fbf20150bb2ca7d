"""Model hyperparameters (validated with pydantic).

The field names are the public contract with ``pipeline/`` (YAML configs are
parsed straight into :class:`ModelConfig`), so keep them stable.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, field_validator, model_validator

__all__ = ["ModelConfig"]

_DROPOUT_FIELDS = ("input_dropout", "state_dropout", "cell_output_dropout", "output_dropout")


class ModelConfig(BaseModel):
    """Architecture of a :class:`models.lm.RecurrentLM`.

    ``vocab_size`` may be left as ``None`` in a config file; the pipeline fills
    it in from the dataset manifest (e.g. ``cfg.model_copy(update={"vocab_size": v})``
    or plain assignment, which is validated) before a model is built.
    """

    model_config = ConfigDict(extra="forbid", validate_assignment=True)

    cell: Literal["lstm", "rlstm"] = "rlstm"
    vocab_size: int | None = None
    hidden_size: int = 256
    num_layers: int = 2
    mogrifier_rounds: int = 0
    mogrifier_rank: int = 0
    capped_input_gate: bool = True
    tie_embeddings: bool = False
    input_dropout: float = 0.0
    state_dropout: float = 0.0
    cell_output_dropout: float = 0.0
    output_dropout: float = 0.0
    chrono_t_max: float | None = None
    forget_bias_init: float = 0.0

    @field_validator("vocab_size")
    @classmethod
    def _check_vocab_size(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"vocab_size must be > 0 (or None until filled in from the dataset), got {v}")
        return v

    @field_validator("hidden_size", "num_layers")
    @classmethod
    def _check_positive(cls, v: int, info) -> int:
        if v <= 0:
            raise ValueError(f"{info.field_name} must be > 0, got {v}")
        return v

    @field_validator("mogrifier_rounds")
    @classmethod
    def _check_rounds(cls, v: int) -> int:
        if v < 0:
            raise ValueError(f"mogrifier_rounds must be >= 0, got {v}")
        return v

    @field_validator(*_DROPOUT_FIELDS)
    @classmethod
    def _check_dropout(cls, v: float, info) -> float:
        if not (0.0 <= v < 1.0):  # also rejects NaN
            raise ValueError(f"{info.field_name} must be in [0, 1), got {v}")
        return v

    @field_validator("chrono_t_max")
    @classmethod
    def _check_chrono(cls, v: float | None) -> float | None:
        if v is not None and not (v > 2.0 and math.isfinite(v)):
            raise ValueError(f"chrono_t_max must be a finite number > 2 when set, got {v}")
        return v

    @field_validator("forget_bias_init")
    @classmethod
    def _check_forget_bias(cls, v: float) -> float:
        if not math.isfinite(v):
            raise ValueError(f"forget_bias_init must be finite, got {v}")
        return v

    @model_validator(mode="after")
    def _check_cell_options(self) -> "ModelConfig":
        if self.cell == "rlstm" and not self.capped_input_gate:
            raise ValueError(
                "capped_input_gate=False is not supported with cell='rlstm' "
                "(the RLSTM input gate is always capped at 1 - f); set capped_input_gate "
                "to true or use cell='lstm'"
            )
        return self

    def require_vocab_size(self) -> int:
        """Return ``vocab_size`` or raise a clear error if it was never filled in."""
        if self.vocab_size is None:
            raise ValueError(
                "vocab_size is not set: fill it in (> 0) from the dataset manifest before building the model"
            )
        return self.vocab_size
