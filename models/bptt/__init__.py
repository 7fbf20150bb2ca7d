"""Hand-derived backpropagation through time for whole recurrent layers (LSTM and RLSTM, with or without a
Mogrifier): one autograd function per layer call (:mod:`.sequence`), the cells' pointwise steps
(:mod:`.cells`) and the Mogrifier's rounds (:mod:`.mogrifier`). :class:`models.mogrifier.RecurrentLayer`
uses it by default (``implementation="sequence"``); ``implementation="autograd"`` keeps the per-step
reference that autograd differentiates."""

from .mogrifier import MogrifierParams
from .sequence import SEQUENCE_CELLS, SequenceSpec, recurrent_sequence

__all__ = ["SEQUENCE_CELLS", "MogrifierParams", "SequenceSpec", "recurrent_sequence"]
