"""Sentence corpora for the sentence VAE: sentences of a prepared split, length-bucketed batches.

A prepared sentence corpus (``ptb_word``, ``sentences``, ``synthetic``) is a token stream in which
every sentence ends with ``<eos>``; :class:`SentenceCorpus` cuts it at the ``<eos>`` tokens. A
sentence's *targets* are its words followed by ``<eos>`` (``include_eos``; without it, e.g. for the
synthetic task whose optimum is then ln 10000, the words only), cut to ``max_length`` tokens (the thesis
truncated PTB sentences to 35 tokens, losing 3% of the tokens; a cut sentence loses its ``<eos>``).
The decoder's *inputs* are ``<bos>`` and then the targets shifted by one; ``<bos>`` is the ``<eos>``
id unless the vocabulary has a ``<bos>`` (a sentence starts after the previous one's end, as in LM
practice).

Batches are time-major (:class:`SentenceBatch`: ``inputs`` / ``targets`` [T, B] int64, ``mask`` [T, B],
``lengths`` [B]), padded with id 0 where ``mask`` is False. :class:`SentenceBatcher` draws training
batches: each epoch the sentences are shuffled (from ``(seed, epoch)``), sorted by length within
chunks of 100 batches (little padding, still random), cut into global batches of ``batch_size``
sentences (an incomplete last one is dropped) whose order is shuffled again; rank ``r`` of ``W`` takes
the contiguous slice ``[r B/W, (r+1) B/W)`` of every global batch, so the ranks' batches together are
exactly the one-process batch. The position within the epoch is its state: exact resume.
:func:`evaluation_batches` covers the first ``max_sentences`` sentences once, each rank a contiguous
share, sorted by length.
"""

from __future__ import annotations

import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pipeline.data.datasets import EOS, UNK
from pipeline.data.prepare import load_labels, load_tokens, load_vocab

__all__ = ["SentenceBatch", "SentenceBatcher", "SentenceCorpus", "bos_eos_ids", "evaluation_batches"]

BOS = "<bos>"
PAD_ID = 0
BUCKET_BATCHES = 100  # sentences are sorted by length within chunks of this many batches


def bos_eos_ids(vocab: Sequence[str]) -> tuple[int, int]:
    """``(bos_id, eos_id)`` of a sentence corpus' vocabulary: ``<bos>`` is ``<eos>`` when it has no ``<bos>``.
    Raises ValueError when it has no ``<eos>`` (not a sentence corpus)."""
    vocab = list(vocab)
    if EOS not in vocab:
        raise ValueError(f"the vocabulary has no {EOS}: not a sentence corpus")
    eos_id = vocab.index(EOS)
    return (vocab.index(BOS) if BOS in vocab else eos_id), eos_id


@dataclass
class SentenceBatch:
    """A padded, time-major batch of sentences.

    ``inputs`` [T, B] int64: ``<bos>`` then the targets shifted by one; ``targets`` [T, B] int64: the
    sentence tokens; ``mask`` [T, B] bool: real target positions; ``lengths`` [B] int64 (= ``mask.sum(0)``,
    >= 1); ``labels``: one per sentence when the corpus has a label column, else None; ``indices`` [B]:
    which sentences of the corpus these are.
    """

    inputs: torch.Tensor
    targets: torch.Tensor
    mask: torch.Tensor
    lengths: torch.Tensor
    labels: list[str] | None = None
    indices: torch.Tensor | None = None  # [B] int64: the sentences' ids in their corpus

    @property
    def num_tokens(self) -> int:
        """Target tokens in the batch."""
        return int(self.lengths.sum())


class SentenceCorpus:
    """The sentences of one split of a prepared corpus (``data_dir``), as target-token arrays.

    ``starts`` / ``lengths`` [N] int64: where each sentence's targets begin in the split's token stream
    and how many there are (words, + ``<eos>`` when ``include_eos``, at most ``max_length``; empty
    sentences are skipped). ``labels``: one per sentence (the TAB label column) or None. ``bos_id``,
    ``eos_id``, ``unk_id`` (None without ``<unk>``), ``pad_id`` (0), ``vocab_size``.
    """

    def __init__(self, data_dir: str | os.PathLike[str], split: str, *, max_length: int | None = None,
                 include_eos: bool = True) -> None:
        if max_length is not None and max_length < 1:
            raise ValueError(f"max_length must be >= 1, got {max_length}")
        vocab = load_vocab(data_dir)
        if EOS not in vocab:
            raise ValueError(f"{data_dir} has no {EOS} token: it is not a sentence corpus (use ptb_word, sentences or "
                             "synthetic)")
        self.split = split
        self.vocab_size = len(vocab)
        self.bos_id, self.eos_id = bos_eos_ids(vocab)
        self.unk_id: int | None = vocab.index(UNK) if UNK in vocab else None
        self.pad_id = PAD_ID
        self.include_eos = include_eos
        self.max_length = max_length
        stream = np.asarray(load_tokens(data_dir, split), dtype=np.int64)
        ends = np.flatnonzero(stream == self.eos_id)
        starts = np.concatenate([[0], ends[:-1] + 1]) if len(ends) else np.zeros(0, dtype=np.int64)
        stops = ends + 1 if include_eos else ends  # exclusive end of the targets
        lengths = stops - starts
        if max_length is not None:
            lengths = np.minimum(lengths, max_length)
        keep = lengths > 0  # without <eos>, an empty line has nothing to predict
        labels = load_labels(data_dir, split)
        self._stream = stream
        self.starts = starts[keep]
        self.lengths = lengths[keep]
        self.labels = None if labels is None else [label for label, k in zip(labels, keep, strict=True) if k]

    def __len__(self) -> int:
        """Number of (non-empty) sentences."""
        return len(self.starts)

    @property
    def num_tokens(self) -> int:
        """Target tokens of all the split's sentences (after truncation)."""
        return int(self.lengths.sum())

    def sentence(self, index: int) -> np.ndarray:
        """The target tokens of sentence ``index``."""
        start = int(self.starts[index])
        return self._stream[start : start + int(self.lengths[index])]

    def batch(self, indices: Sequence[int] | np.ndarray) -> SentenceBatch:
        """The padded batch of sentences ``indices`` (in that order)."""
        indices = np.asarray(indices, dtype=np.int64)
        lengths = self.lengths[indices]
        steps = int(lengths.max()) if len(indices) else 0
        targets = np.full((len(indices), steps), self.pad_id, dtype=np.int64)
        positions = np.arange(steps)
        mask = positions[None, :] < lengths[:, None]
        # Gather all target tokens at once: row b, column t <- stream[start_b + t] where t < length_b.
        gather = self.starts[indices][:, None] + positions[None, :]
        targets[mask] = self._stream[gather[mask]]
        inputs = np.full_like(targets, self.pad_id)
        if steps:
            inputs[:, 0] = self.bos_id
            inputs[:, 1:] = np.where(mask[:, 1:], targets[:, :-1], self.pad_id)
        return SentenceBatch(
            inputs=torch.from_numpy(np.ascontiguousarray(inputs.T)),
            targets=torch.from_numpy(np.ascontiguousarray(targets.T)),
            mask=torch.from_numpy(np.ascontiguousarray(mask.T)),
            lengths=torch.from_numpy(lengths.copy()),
            labels=None if self.labels is None else [self.labels[i] for i in indices],
            indices=torch.from_numpy(indices.copy()),
        )


def _rank_slice(size: int, rank: int, world_size: int) -> slice:
    bounds = np.linspace(0, size, world_size + 1).astype(np.int64)
    return slice(int(bounds[rank]), int(bounds[rank + 1]))


class SentenceBatcher:
    """Length-bucketed training batches of a :class:`SentenceCorpus`, resumable, sharded over ranks.

    ``batch_size`` is global (sentences); each rank gets ``batch_size // world_size`` of every batch.
    """

    def __init__(self, corpus: SentenceCorpus, batch_size: int, *, rank: int = 0, world_size: int = 1,
                 seed: int = 0) -> None:
        if world_size < 1 or not 0 <= rank < world_size:
            raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
        if batch_size < 1 or batch_size % world_size:
            raise ValueError(f"train.batch_size {batch_size} must be a positive multiple of the {world_size} ranks: "
                             "each rank takes an equal share of every batch of sentences")
        if len(corpus) < batch_size:
            raise ValueError(f"train.batch_size {batch_size} is larger than the {len(corpus):,} {corpus.split} "
                             "sentences; lower train.batch_size")
        self.corpus = corpus
        self.batch_size = batch_size
        self.rank, self.world_size = rank, world_size
        self.seed = seed
        self.batches_per_epoch = len(corpus) // batch_size
        self._epoch = 0
        self._position = 0
        self._plan: np.ndarray | None = None  # [batches_per_epoch, batch_size] sentence ids of the epoch

    @property
    def epoch(self) -> int:
        """Completed epochs (0 during the first)."""
        return self._epoch

    @property
    def position(self) -> int:
        """Index of the next batch within the epoch."""
        return self._position

    def epoch_plan(self, epoch: int) -> np.ndarray:
        """The global batches of ``epoch``: [batches_per_epoch, batch_size] sentence ids."""
        rng = np.random.default_rng([self.seed, epoch])
        order = rng.permutation(len(self.corpus))
        chunk = self.batch_size * BUCKET_BATCHES
        for lo in range(0, len(order), chunk):  # a loop over chunks (of thousands of sentences), not sentences
            part = order[lo : lo + chunk]
            order[lo : lo + chunk] = part[np.argsort(self.corpus.lengths[part], kind="stable")]
        batches = order[: self.batches_per_epoch * self.batch_size].reshape(self.batches_per_epoch, self.batch_size)
        return batches[rng.permutation(self.batches_per_epoch)]

    def next_batch(self) -> SentenceBatch:
        """This rank's share of the next global batch."""
        if self._plan is None:
            self._plan = self.epoch_plan(self._epoch)
        rows = self._plan[self._position][_rank_slice(self.batch_size, self.rank, self.world_size)]
        self._position += 1
        if self._position == self.batches_per_epoch:
            self._epoch, self._position, self._plan = self._epoch + 1, 0, None
        return self.corpus.batch(rows)

    def __iter__(self) -> Iterator[SentenceBatch]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict[str, Any]:
        """The position (global, independent of the number of ranks) and what it is valid for; JSON-safe."""
        return {"epoch": self._epoch, "position": self._position, "num_sentences": len(self.corpus),
                "batch_size": self.batch_size, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue where the saved batcher stopped (the corpus, batch size and seed must match; the number of
        ranks may differ, the position is global)."""
        for key, mine in (("num_sentences", len(self.corpus)), ("batch_size", self.batch_size), ("seed", self.seed)):
            if key in state and int(state[key]) != mine:
                raise ValueError(f"cannot resume: the saved batches had {key}={state[key]}, this run has {mine}")
        epoch, position = int(state["epoch"]), int(state["position"])
        if epoch < 0 or not 0 <= position < self.batches_per_epoch:
            raise ValueError(f"cannot resume: position {position} of epoch {epoch} is out of range "
                             f"({self.batches_per_epoch} batches per epoch)")
        self._epoch, self._position, self._plan = epoch, position, None


def evaluation_batches(corpus: SentenceCorpus, batch_size: int, *, rank: int = 0, world_size: int = 1,
                       max_sentences: int | None = None) -> Iterator[SentenceBatch]:
    """The first ``max_sentences`` sentences (all when None) once: rank ``rank`` scores a contiguous share,
    sorted by length, in batches of ``batch_size`` sentences."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if world_size < 1 or not 0 <= rank < world_size:
        raise ValueError(f"need 0 <= rank < world_size, got rank={rank}, world_size={world_size}")
    total = len(corpus) if max_sentences is None else min(len(corpus), max_sentences)
    share = np.arange(total, dtype=np.int64)[_rank_slice(total, rank, world_size)]
    share = share[np.argsort(corpus.lengths[share], kind="stable")]
    for lo in range(0, len(share), batch_size):
        yield corpus.batch(share[lo : lo + batch_size])


