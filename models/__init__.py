"""Recurrent language models (LSTM / RLSTM / GRU / Elman cells, Mogrifier, residual LM, multi-sample objective,
AWD-LSTM regularisers)
and, in :mod:`models.vae`, sentence VAEs (latents, encoders, decoders, estimators, objectives, remedies)."""

from .cells import ElmanCell, GRUCell, LSTMCell, RLSTMCell
from .config import ModelConfig
from .lm import LMState, RecurrentLM, RNNOutputs, count_parameters, detach_state
from .mogrifier import Mogrifier, RecurrentLayer
from .objectives import LMObjective, multi_sample_loss, multi_sample_nll, multi_sample_objective
from .regularizers import (
    activation_regularization,
    drop_connect,
    embedding_dropout,
    temporal_activation_regularization,
)

__all__ = [
    "ModelConfig",
    "RecurrentLM",
    "LMState",
    "detach_state",
    "count_parameters",
    "LSTMCell",
    "RLSTMCell",
    "GRUCell",
    "ElmanCell",
    "Mogrifier",
    "RecurrentLayer",
    "multi_sample_nll",
    "multi_sample_loss",
    "multi_sample_objective",
    "LMObjective",
    "RNNOutputs",
    "activation_regularization",
    "temporal_activation_regularization",
    "drop_connect",
    "embedding_dropout",
]
