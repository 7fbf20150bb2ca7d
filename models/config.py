"""Model hyperparameters (validated with pydantic).

The field names are the public contract with ``pipeline/`` (YAML configs are
parsed straight into :class:`ModelConfig`), so keep them stable.
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationInfo, field_validator, model_validator

__all__ = ["ModelConfig", "StrictConfig", "check_dropout", "check_positive", "check_rounds", "check_vocab_size", "required_vocab_size"]

# Every dropout-like rate of the LM: the fields named ``*_dropout`` and ``weight_drop`` (Monte Carlo dropout
# evaluation scales exactly these by name).
_DROPOUT_FIELDS = (
    "input_dropout", "state_dropout", "cell_output_dropout", "output_dropout", "embedding_dropout", "weight_drop",
)


class StrictConfig(BaseModel):
    """A config section: unknown fields are errors (naming the field), assignments are validated."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True)


# Field checks shared by the model configs (this one and models.vae.VAEModelConfig).
def check_vocab_size(v: int | None) -> int | None:
    if v is not None and v <= 0:
        raise ValueError(f"vocab_size must be > 0 (or None until filled in from the dataset), got {v}")
    return v


def check_positive(v: int, info: ValidationInfo) -> int:
    if v <= 0:
        raise ValueError(f"{info.field_name} must be > 0, got {v}")
    return v


def check_rounds(v: int) -> int:
    if v < 0:
        raise ValueError(f"mogrifier_rounds must be >= 0, got {v}")
    return v


def check_dropout(v: float, info: ValidationInfo) -> float:
    if not (0.0 <= v < 1.0):  # also rejects NaN
        raise ValueError(f"{info.field_name} must be in [0, 1), got {v}")
    return v


def required_vocab_size(vocab_size: int | None) -> int:
    """``vocab_size``, or a clear error if it was never filled in."""
    if vocab_size is None:
        raise ValueError("vocab_size is not set: fill it in (> 0) from the dataset manifest before building the model")
    return vocab_size


class ModelConfig(StrictConfig):
    """Architecture of a :class:`models.lm.RecurrentLM`.

    ``vocab_size`` may be left as ``None`` in a config file; the pipeline fills
    it in from the dataset manifest (e.g. ``cfg.model_copy(update={"vocab_size": v})``
    or plain assignment, which is validated) before a model is built.
    """

    cell: Literal["lstm", "rlstm", "gru", "elman"] = Field(
        default="rlstm",
        description="Recurrent cell: lstm (thesis eq. 2.1), rlstm (Rewired LSTM, §4.1), gru (torch.nn.GRUCell "
        "equations) or elman (vanilla tanh RNN).",
    )
    vocab_size: int | None = Field(
        default=None, description="Vocabulary size (embedding and softmax rows); null = from the dataset manifest."
    )
    hidden_size: int = Field(
        default=256, description="Hidden size n of every layer; also the embedding size unless embedding_size is set."
    )
    embedding_size: int | None = Field(
        default=None,
        description="Embedding size e (AWD-LSTM: 400); null = hidden_size. When it differs from hidden_size, layer 1 "
        "reads e-dim embeddings and a linear projection maps the summed layer output to e before the softmax.",
    )
    num_layers: int = Field(default=2, description="Recurrent layers L; each reads the sum of the lower layers' outputs.")
    mogrifier_rounds: int = Field(
        default=0, description="Mogrifier rounds gating input and state before each cell (eq. 2.2); 0 = none."
    )
    mogrifier_rank: int = Field(
        default=0, description="Rank of the Mogrifier matrices; 0 (or >= their sizes) = full rank."
    )
    capped_input_gate: bool = Field(
        default=True,
        description="Cap the input gate at 1 - f; only cell lstm can turn it off (rlstm always caps; gru and elman "
        "have no input gate).",
    )
    tie_embeddings: bool = Field(default=False, description="Use the input embedding as the softmax (output) embedding.")
    input_dropout: float = Field(default=0.0, description="Dropout rate of the input embeddings, in [0, 1).")
    state_dropout: float = Field(
        default=0.0, description="Variational dropout rate of the recurrent state (one mask per layer per window)."
    )
    cell_output_dropout: float = Field(
        default=0.0, description="Dropout rate of each layer's output, before the residual and output sums."
    )
    output_dropout: float = Field(default=0.0, description="Dropout rate of the summed layer outputs, before the softmax.")
    embedding_dropout: float = Field(
        default=0.0,
        description="AWD-LSTM embedding dropout: drop whole words (embedding rows) with this rate, one mask per "
        "forward call shared by all occurrences, kept rows x 1/(1-p); in [0, 1).",
    )
    weight_drop: float = Field(
        default=0.0,
        description="AWD-LSTM weight drop (DropConnect) rate of the recurrent hidden-to-hidden matrices, one mask per "
        "layer per forward call (all time steps); in [0, 1). The Mogrifier matrices are not dropped.",
    )
    cell_implementation: Literal["sequence", "autograd"] = Field(
        default="sequence",
        description="How lstm / rlstm layers are differentiated in training: sequence = one autograd node per layer "
        "and window with a hand-derived backward through time (weight gradients as one matrix multiply over all "
        "steps; models.bptt); autograd = the per-step reference that autograd differentiates (needed for double "
        "backward / forward-mode AD). Same function, equal to rounding; gru / elman always use autograd.",
    )
    compile_cell_steps: bool = Field(
        default=False,
        description="With cell_implementation sequence: fuse each time step's pointwise work with torch.compile "
        "(meant for GPUs, where a step is otherwise a dozen kernel launches; compiling takes seconds per process).",
    )
    chrono_t_max: float | None = Field(
        default=None,
        description="Chrono init of the forget bias (gru: update gate), ln U(1, T_max - 1), T_max > 2; null = "
        "forget_bias_init. Not for elman.",
    )
    forget_bias_init: float = Field(
        default=0.0,
        description="Constant initial forget-gate bias (gru: update gate), used when chrono_t_max is null; elman: 0.",
    )

    _check_vocab_size = field_validator("vocab_size")(check_vocab_size)
    _check_positive = field_validator("hidden_size", "num_layers")(check_positive)
    _check_rounds = field_validator("mogrifier_rounds")(check_rounds)

    _check_dropout = field_validator(*_DROPOUT_FIELDS)(check_dropout)

    @field_validator("embedding_size")
    @classmethod
    def _check_embedding_size(cls, v: int | None) -> int | None:
        if v is not None and v <= 0:
            raise ValueError(f"embedding_size must be > 0 (or null = hidden_size), got {v}")
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
        if self.cell in ("gru", "elman") and not self.capped_input_gate:
            raise ValueError(
                f"capped_input_gate=False does not apply to cell={self.cell!r} (it has no input gate); "
                "leave capped_input_gate at true"
            )
        if self.cell == "elman" and (self.chrono_t_max is not None or self.forget_bias_init != 0.0):
            raise ValueError(
                "chrono_t_max / forget_bias_init do not apply to cell='elman' (it has no forget gate); "
                "leave chrono_t_max null and forget_bias_init 0"
            )
        return self

    @property
    def embedding_dim(self) -> int:
        """The embedding size e: ``embedding_size``, or ``hidden_size`` when that is null."""
        return self.hidden_size if self.embedding_size is None else self.embedding_size

    def require_vocab_size(self) -> int:
        """Return ``vocab_size`` or raise a clear error if it was never filled in."""
        return required_vocab_size(self.vocab_size)
