"""Training pipeline stages for recurrent language models.

Stages (each a CLI command, ``python -m pipeline <stage> --config <name-or-yaml>``):
``prepare`` (download, verify, tokenise), ``train`` (truncated BPTT with Two-Tailed Averaging,
resumable checkpoints), ``evaluate`` (bpc / perplexity with a tuned softmax temperature) and
``run`` (all three in sequence).
"""

__version__ = "0.1.0"
