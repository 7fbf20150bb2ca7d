"""Data stage: fetch + verify corpora, tokenise them into ``.npy`` splits, and batch them.

Quick use::

    from pipeline.data import prepare_dataset, load_tokens, BatchStream, SAMPLE_TEXT_PATH

    manifest = prepare_dataset("text", str(SAMPLE_TEXT_PATH), "data/sample")
    stream = BatchStream(load_tokens("data/sample", "train"), batch_size=16, bptt=64)
    batch = stream.next_batch()          # batch.inputs / batch.targets: [64, 16] int64

See :mod:`pipeline.data.sources` (source URLs, archive layouts, cache), :mod:`pipeline.data.streaming`
(one member streamed through read / hash / inflate threads), :mod:`pipeline.data.datasets`
(per-dataset tokenisation and canonical facts), :mod:`pipeline.data.prepare` (output folder and
manifest), :mod:`pipeline.data.batches` (truncated-BPTT batching) and :mod:`pipeline.data.sentences`
(sentence corpora of ``ptb_word`` / ``sentences`` / ``synthetic``: padded, length-bucketed sentence
batches for the sentence VAE; imported from there).
"""

from pipeline.data.batches import Batch, BatchStream, evaluation_windows, num_eval_targets
from pipeline.data.datasets import (
    CANONICAL_FACTS,
    DATASETS,
    DEFAULT_SOURCES,
    EOS,
    GENERATED,
    SAMPLE_TEXT_PATH,
    UNK,
    SPLITS,
)
from pipeline.data.prepare import (
    DatasetManifest,
    SplitInfo,
    load_labels,
    load_manifest,
    load_tokens,
    load_vocab,
    prepare_dataset,
    verify_prepared,
)
from pipeline.data.sources import DataError, FileFacts, SourceFacts

__all__ = [
    "DATASETS",
    "SPLITS",
    "EOS",
    "UNK",
    "GENERATED",
    "DEFAULT_SOURCES",
    "CANONICAL_FACTS",
    "SAMPLE_TEXT_PATH",
    "DataError",
    "FileFacts",
    "SourceFacts",
    "SplitInfo",
    "DatasetManifest",
    "prepare_dataset",
    "load_manifest",
    "load_tokens",
    "load_labels",
    "load_vocab",
    "verify_prepared",
    "Batch",
    "BatchStream",
    "evaluation_windows",
    "num_eval_targets",
]
