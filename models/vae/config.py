"""Architecture of a sentence VAE (thesis ch. 5), validated with pydantic.

``vocab_size`` and ``unk_id`` may be left as ``None`` in a config file; the pipeline fills them in
from the prepared data before a model is built (``word_dropout > 0`` needs ``unk_id``).
"""

from __future__ import annotations

import math
from typing import Literal

from pydantic import Field, field_validator, model_validator

from models.config import (
    StrictConfig,
    check_dropout,
    check_positive,
    check_rounds,
    check_vocab_size,
    required_vocab_size,
)

__all__ = ["VAEModelConfig"]

CellType = Literal["lstm", "rlstm", "gru", "elman"]

_DROPOUT_FIELDS = ("embedding_dropout", "word_dropout", "input_dropout", "state_dropout", "output_dropout")


class VAEModelConfig(StrictConfig):
    """Encoder, latent and decoder of a :class:`models.vae.model.SentenceVAE`."""


    architecture: Literal["recurrent", "mlp"] = Field(
        default="recurrent",
        description="recurrent: bidirectional recurrent encoder + recurrent LM decoder (thesis §5.7.2); mlp: the "
        "synthetic-task model of §5.7.1 (embedding + tanh MLPs, one-symbol sentences).",
    )
    vocab_size: int | None = Field(
        default=None, description="Vocabulary size (embeddings and softmax); null = from the dataset manifest."
    )
    embedding_size: int = Field(default=128, description="Token embedding size of the encoder and the decoder.")
    hidden_size: int = Field(default=128, description="Hidden size of the recurrent layers / MLP layers.")
    encoder_cell: CellType = Field(
        default="lstm", description="Cell of the bidirectional encoder layer: lstm, rlstm, gru or elman."
    )
    decoder_cell: CellType = Field(default="lstm", description="Cell of the decoder layer: lstm, rlstm, gru or elman.")
    mogrifier_rounds: int = Field(
        default=0, description="Mogrifier rounds in the encoder and decoder recurrent layers (eq. 2.2); 0 = none."
    )
    latent: Literal["gaussian", "categorical", "vq"] = Field(
        default="gaussian",
        description="gaussian: diagonal normal q(z|x), standard normal prior; categorical: num_latents independent "
        "categoricals, uniform prior; vq: VQ-VAE (van den Oord et al. 2017, thesis §5.A), num_latents latents "
        "quantised to one of num_categories codes each (a codebook per latent, code size "
        "categorical_embedding_size), point-mass q(z|x), uniform prior (KL = n ln m, fixed); trains with "
        "estimator elbo, 1 sample.",
    )
    latent_size: int = Field(default=40, description="Dimensions of the Gaussian latent.")
    num_latents: int = Field(default=8, description="Number n of categorical / VQ latents (thesis VQ range 1-8).")
    num_categories: int = Field(
        default=10, description="Categories m of each categorical latent / codes of each VQ latent (thesis VQ range "
        "2-20)."
    )
    categorical_embedding_size: int = Field(
        default=16,
        description="Decoder embedding size of each categorical latent's value (the n embeddings are concatenated); "
        "for vq the size e of each code vector (the encoder outputs n*e values).",
    )
    vq_beta: float = Field(
        default=0.25,
        description="vq only: β, the weight of the commitment loss β||z_e - sg(e)||² in the encoder loss; a finite "
        "number >= 0 (van den Oord et al.: 0.25; thesis tuning range 0.01-20).",
    )
    vq_decay: float | None = Field(
        default=0.99,
        description="vq only: decay of the exponential moving averages that update the codebook, in [0, 1) (thesis "
        "tuning range 0.9-0.99999); null = no EMA: the codebook is a parameter trained by the codebook loss "
        "||sg(z_e) - e||².",
    )
    min_std: float = Field(
        default=1e-4, description="Floor of the Gaussian posterior std: std = softplus(raw) + min_std."
    )
    embedding_dropout: float = Field(
        default=0.0, description="Decoder: dropout rate of the token embeddings (element-wise), in [0, 1)."
    )
    word_dropout: float = Field(
        default=0.0,
        description="Decoder: probability of replacing an input token (not the leading <bos>) by <unk> (Bowman et "
        "al.), in [0, 1).",
    )
    input_dropout: float = Field(
        default=0.0,
        description="Decoder: dropout rate of the recurrent layer's input (token embedding and latent), in [0, 1).",
    )
    state_dropout: float = Field(
        default=0.0,
        description="Decoder: variational dropout rate of the recurrent state (one mask per sequence), in [0, 1).",
    )
    output_dropout: float = Field(
        default=0.0, description="Decoder: dropout rate of the recurrent layer's output, before the softmax, in [0, 1)."
    )
    shared_dropout_mask: bool = Field(
        default=True,
        description="The K latent samples of a sentence share one decoder dropout mask (thesis Fig. 5.12); false = "
        "independent masks per sample.",
    )
    unk_id: int | None = Field(
        default=None, description="Id of <unk> (word dropout's replacement); null = from the dataset."
    )

    _check_vocab_size = field_validator("vocab_size")(check_vocab_size)
    _check_positive = field_validator(
        "embedding_size", "hidden_size", "latent_size", "num_latents", "categorical_embedding_size"
    )(check_positive)
    _check_rounds = field_validator("mogrifier_rounds")(check_rounds)
    _check_dropout = field_validator(*_DROPOUT_FIELDS)(check_dropout)

    @field_validator("num_categories")
    @classmethod
    def _check_categories(cls, v: int) -> int:
        if v < 2:
            raise ValueError(f"num_categories must be >= 2, got {v}")
        return v

    @field_validator("vq_beta")
    @classmethod
    def _check_vq_beta(cls, v: float) -> float:
        if not (math.isfinite(v) and v >= 0.0):
            raise ValueError(f"vq_beta (the VQ commitment weight) must be a finite number >= 0, got {v}")
        return v

    @field_validator("vq_decay")
    @classmethod
    def _check_vq_decay(cls, v: float | None) -> float | None:
        if v is not None and not 0.0 <= v < 1.0:
            raise ValueError(
                f"vq_decay must be in [0, 1) (the thesis tuned it in 0.9-0.99999), or null to train the codebook "
                f"by gradient instead of by moving averages; got {v}"
            )
        return v

    @field_validator("min_std")
    @classmethod
    def _check_min_std(cls, v: float) -> float:
        if not v > 0.0 or v == float("inf"):
            raise ValueError(f"min_std must be a finite number > 0, got {v}")
        return v

    @field_validator("unk_id")
    @classmethod
    def _check_unk_id(cls, v: int | None) -> int | None:
        if v is not None and v < 0:
            raise ValueError(f"unk_id must be >= 0, got {v}")
        return v

    @model_validator(mode="after")
    def _check_architecture_options(self) -> VAEModelConfig:
        if self.architecture == "mlp":
            unused = [name for name in (*_DROPOUT_FIELDS, "mogrifier_rounds") if getattr(self, name)]
            if unused:
                raise ValueError(
                    f"architecture 'mlp' has no recurrent decoder: {', '.join(unused)} must be 0 (or use "
                    "architecture 'recurrent')"
                )
        return self

    def require_vocab_size(self) -> int:
        """Return ``vocab_size`` or raise a clear error if it was never filled in."""
        return required_vocab_size(self.vocab_size)
