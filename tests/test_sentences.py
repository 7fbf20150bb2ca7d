"""Sentence corpora (pipeline.data.sentences) and the sentence datasets (``sentences``, ``synthetic``):
real PTB against counts taken straight from the archive, small corpora against hand-written ids, and the
batcher's resume / sharding / coverage against an uninterrupted one-process run."""

from __future__ import annotations

import gzip
import json
import zipfile
from itertools import islice
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.data import (
    GENERATED,
    DataError,
    load_labels,
    load_manifest,
    load_tokens,
    load_vocab,
    prepare_dataset,
    verify_prepared,
)
from pipeline.data.datasets import SYNTHETIC_SENTENCES, SYNTHETIC_SYMBOLS
from pipeline.data.sentences import SentenceBatch, SentenceBatcher, SentenceCorpus, evaluation_batches

PTB_ZIP = Path(__file__).resolve().parents[2] / "shared" / "data" / "ptb" / "ptb.zip"


def ptb_lines(split: str) -> list[list[str]]:
    """The words of every line of a PTB split, read straight from the archive (independent of the pipeline)."""
    with zipfile.ZipFile(PTB_ZIP) as zf:
        text = zf.read(f"ptb/ptb.{split}.txt").decode()
    return [line.split() for line in text.split("\n") if line.strip()]


def write_corpus(folder: Path, splits: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for split, text in splits.items():
        (folder / f"{split}.txt").write_text(text, encoding="utf-8")
    return folder


def random_corpus(tmp_path: Path, num_train: int, seed: int = 0) -> Path:
    """A prepared ``sentences`` corpus of ``num_train`` random sentences of 1..12 words, with labels."""
    rng = np.random.default_rng(seed)
    words = [f"w{i}" for i in range(30)]

    def lines(n: int) -> str:
        return "".join(
            " ".join(rng.choice(words, size=int(rng.integers(1, 13)))) + f"\tauthor{i % 3}\n" for i in range(n)
        )

    source = write_corpus(tmp_path / "src", {"train": lines(num_train), "valid": lines(37), "test": lines(5)})
    out = tmp_path / "prepared"
    prepare_dataset("sentences", str(source), out, progress=False)
    return out


def same_batch(a: SentenceBatch, b: SentenceBatch) -> bool:
    return (torch.equal(a.inputs, b.inputs) and torch.equal(a.targets, b.targets) and torch.equal(a.mask, b.mask)
            and torch.equal(a.lengths, b.lengths) and a.labels == b.labels and torch.equal(a.indices, b.indices))


# ----------------------------------------------------------------------------------------------
# PTB (the existing ptb_word dataset)


def test_ptb_sentences_match_the_archive(ptb_word_dir: Path) -> None:
    train = ptb_lines("train")
    corpus = SentenceCorpus(ptb_word_dir, "train")
    assert len(corpus) == len(train) == 42_068
    assert corpus.lengths.tolist() == [len(words) + 1 for words in train]  # words + <eos>
    vocab = load_vocab(ptb_word_dir)
    assert corpus.bos_id == corpus.eos_id == vocab.index("<eos>")  # PTB has no <bos>
    assert corpus.unk_id == vocab.index("<unk>") and corpus.pad_id == 0 and corpus.labels is None
    for i in (0, 1, 12_345, len(train) - 1):
        assert [vocab[t] for t in corpus.sentence(i)] == train[i] + ["<eos>"]
    assert len(SentenceCorpus(ptb_word_dir, "valid")) == len(ptb_lines("valid")) == 3_370
    assert len(SentenceCorpus(ptb_word_dir, "test")) == len(ptb_lines("test")) == 3_761
    without_eos = SentenceCorpus(ptb_word_dir, "valid", include_eos=False)
    assert without_eos.lengths.tolist() == [len(words) for words in ptb_lines("valid")]


def test_ptb_truncation_to_35_tokens(ptb_word_dir: Path) -> None:
    full = np.array([len(words) + 1 for words in ptb_lines("train")])
    corpus = SentenceCorpus(ptb_word_dir, "train", max_length=35)
    assert len(corpus) == 42_068
    assert int((full > 35).sum()) == 4_144 and int(corpus.lengths.max()) == 35
    assert corpus.num_tokens == int(np.minimum(full, 35).sum()) == 900_564
    assert 1 - corpus.num_tokens / full.sum() == pytest.approx(0.0312, abs=1e-4)  # the thesis: ~3% of tokens lost
    longest = int(np.argmax(full))
    cut = corpus.batch([longest])
    vocab = load_vocab(ptb_word_dir)
    assert [vocab[t] for t in cut.targets[:, 0]] == ptb_lines("train")[longest][:35]  # a cut sentence loses <eos>


# ----------------------------------------------------------------------------------------------
# the sentences dataset


def test_labelled_corpus_ids_by_hand(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "src", {
        "train": "a b c\tx\na b\ty\n\nb\tx\n",  # the blank line is no sentence
        "valid": "a z\tx\n",  # z is not in train -> <unk>
        "test": "c\ty\n",
    })
    out = tmp_path / "prepared"
    manifest = prepare_dataset("sentences", str(source), out, progress=False)
    # train counts: b 3, <eos> 3, a 2, c 1, <unk> 0; ties keep first appearance (b before <eos>)
    assert load_vocab(out) == ["b", "<eos>", "a", "c", "<unk>"]
    assert load_tokens(out, "train").tolist() == [2, 0, 3, 1, 2, 0, 1, 0, 1]
    assert load_tokens(out, "valid").tolist() == [2, 4, 1]
    assert manifest.unit == "word" and manifest.vocab_size_cap is None and "labels" in manifest.extra_files
    assert load_labels(out, "train") == ["x", "y", "x"] and load_labels(out, "test") == ["y"]

    corpus = SentenceCorpus(out, "train")
    assert (corpus.bos_id, corpus.eos_id, corpus.unk_id) == (1, 1, 4)
    batch = corpus.batch([0, 1, 2])
    assert batch.targets.T.tolist() == [[2, 0, 3, 1], [2, 0, 1, 0], [0, 1, 0, 0]]
    assert batch.inputs.T.tolist() == [[1, 2, 0, 3], [1, 2, 0, 0], [1, 0, 0, 0]]
    assert batch.mask.T.tolist() == [[True] * 4, [True] * 3 + [False], [True] * 2 + [False] * 2]
    assert batch.lengths.tolist() == [4, 3, 2] and batch.num_tokens == 9
    assert batch.labels == ["x", "y", "x"] and batch.indices.tolist() == [0, 1, 2]
    assert batch.inputs.dtype == batch.targets.dtype == torch.int64 and batch.mask.dtype == torch.bool
    valid = SentenceCorpus(out, "valid", include_eos=False).batch([0])
    assert valid.targets.T.tolist() == [[2, 4]] and valid.inputs.T.tolist() == [[1, 2]] and valid.labels == ["x"]

    # the labels file is checked like the splits
    (out / "labels.json").write_text(json.dumps({"train": ["q", "y", "x"], "valid": ["x"], "test": ["y"]}))
    with pytest.raises(DataError, match="labels.json is damaged"):
        verify_prepared(out)


def test_vocab_cap_maps_the_rest_to_unk(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "src", {"train": "a b c\na b\nb\n", "valid": "c a\n", "test": "b\n"})
    out = tmp_path / "capped"
    manifest = prepare_dataset("sentences", str(source), out, progress=False, vocab_size_cap=3)
    assert load_vocab(out) == ["b", "<eos>", "<unk>"] and manifest.vocab_size_cap == 3
    assert load_tokens(out, "train").tolist() == [2, 0, 2, 1, 2, 0, 1, 0, 1]
    assert load_tokens(out, "valid").tolist() == [2, 2, 1]
    assert load_labels(out, "train") is None and SentenceCorpus(out, "train").labels is None
    with pytest.raises(DataError, match="vocab_size_cap"):  # the folder holds another cap
        prepare_dataset("sentences", str(source), out, progress=False, vocab_size_cap=4)
    prepare_dataset("sentences", str(source), out, progress=False, vocab_size_cap=4, force=True)
    assert load_vocab(out) == ["b", "<eos>", "a", "<unk>"]
    with pytest.raises(DataError, match="sentences only"):
        prepare_dataset("ptb_word", str(source), tmp_path / "ptb", progress=False, vocab_size_cap=10)


def test_single_gzipped_file_is_split_by_lines(tmp_path: Path) -> None:
    lines = [f"s{i} common" for i in range(40)]  # 90/5/5 of 40 lines: 36 / 2 / 2, in order
    path = tmp_path / "tweets.txt.gz"
    path.write_bytes(gzip.compress(("\n".join(lines) + "\n").encode()))
    out = tmp_path / "prepared"
    prepare_dataset("sentences", str(path), out, progress=False)
    vocab = load_vocab(out)

    def words(split: str) -> list[str]:
        corpus = SentenceCorpus(out, split, include_eos=False)
        return [" ".join(vocab[t] for t in corpus.sentence(i)) for i in range(len(corpus))]

    assert words("train") == lines[:36]
    assert words("valid") == ["<unk> common"] * 2 and words("test") == ["<unk> common"] * 2  # s36.. unseen in train


def test_old_manifest_without_the_new_fields_loads(tmp_path: Path) -> None:
    source = write_corpus(tmp_path / "src", {"train": "a b\n", "valid": "a\n", "test": "b\n"})
    out = tmp_path / "prepared"
    prepare_dataset("sentences", str(source), out, progress=False)
    raw = json.loads((out / "manifest.json").read_text())
    del raw["extra_files"], raw["vocab_size_cap"]
    (out / "manifest.json").write_text(json.dumps(raw))
    manifest = load_manifest(out)
    assert manifest.extra_files == {} and manifest.vocab_size_cap is None and load_labels(out, "train") is None


# ----------------------------------------------------------------------------------------------
# the synthetic dataset (thesis §5.7.1)


@pytest.fixture(scope="module")
def synthetic_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("synthetic") / "data"
    prepare_dataset("synthetic", GENERATED, out, progress=False)
    return out


def test_synthetic_is_deterministic_and_uniform(synthetic_dir: Path, tmp_path: Path) -> None:
    again = prepare_dataset("synthetic", GENERATED, tmp_path / "again", progress=False)
    manifest = load_manifest(synthetic_dir)
    assert {s: i.sha256 for s, i in again.splits.items()} == {s: i.sha256 for s, i in manifest.splits.items()}
    assert manifest.source == GENERATED and manifest.source_sha256 is None
    vocab = load_vocab(synthetic_dir)
    assert len(vocab) == SYNTHETIC_SYMBOLS + 1 == 10_001 and vocab[:3] == ["0", "1", "2"] and vocab[-1] == "<eos>"
    assert vocab[9_999] == "9999"

    corpus = SentenceCorpus(synthetic_dir, "train", include_eos=False)  # the optimum NLL is then ln 10000
    assert len(corpus) == SYNTHETIC_SENTENCES["train"] == 100_000 and set(corpus.lengths.tolist()) == {1}
    assert len(SentenceCorpus(synthetic_dir, "valid")) == len(SentenceCorpus(synthetic_dir, "test")) == 10_000
    batch = corpus.batch(np.arange(5))
    assert batch.inputs.tolist() == [[10_000] * 5] and batch.targets.shape == (1, 5)  # <bos> = the <eos> id
    symbols = corpus.batch(np.arange(len(corpus))).targets[0].numpy()
    counts = np.bincount(symbols, minlength=SYNTHETIC_SYMBOLS)
    assert len(counts) == SYNTHETIC_SYMBOLS  # never the <eos> id
    # Pearson's chi-square against uniform: 9,999 degrees of freedom, sd sqrt(2 * 9999) ~ 141
    expected = len(symbols) / SYNTHETIC_SYMBOLS
    chi2 = float(((counts - expected) ** 2 / expected).sum())
    assert abs(chi2 - (SYNTHETIC_SYMBOLS - 1)) < 5 * np.sqrt(2 * (SYNTHETIC_SYMBOLS - 1))
    valid = SentenceCorpus(synthetic_dir, "valid", include_eos=False).batch(np.arange(10)).targets[0]
    assert not torch.equal(valid, torch.from_numpy(symbols[:10]))  # the splits are separate draws


def test_synthetic_source_must_be_generated(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="generated"):
        prepare_dataset("synthetic", "https://example.com/synthetic.txt", tmp_path / "out", progress=False)


# ----------------------------------------------------------------------------------------------
# the batcher


def test_batcher_resumes_exactly_mid_epoch(tmp_path: Path) -> None:
    corpus = SentenceCorpus(random_corpus(tmp_path, 230), "train")  # 28 batches of 8 per epoch (6 dropped)
    uninterrupted = SentenceBatcher(corpus, 8, seed=3)
    expected = list(islice(uninterrupted, 40))
    assert uninterrupted.epoch == 1 and uninterrupted.position == 12

    first = SentenceBatcher(corpus, 8, seed=3)
    got = [first.next_batch() for _ in range(13)]
    saved = json.loads(json.dumps(first.state_dict()))  # checkpointed as JSON
    resumed = SentenceBatcher(corpus, 8, seed=3)
    resumed.load_state_dict(saved)
    got += [resumed.next_batch() for _ in range(27)]
    assert all(same_batch(a, b) for a, b in zip(got, expected, strict=True))
    assert (resumed.epoch, resumed.position) == (1, 12)

    other_seed = SentenceBatcher(corpus, 8, seed=4)
    assert not torch.equal(other_seed.next_batch().indices, expected[0].indices)
    with pytest.raises(ValueError, match="seed"):
        other_seed.load_state_dict(saved)


def test_ranks_take_contiguous_slices_of_the_global_batch(tmp_path: Path) -> None:
    corpus = SentenceCorpus(random_corpus(tmp_path, 100), "train")
    one = SentenceBatcher(corpus, 8, seed=1)
    ranks = [SentenceBatcher(corpus, 8, rank=r, world_size=2, seed=1) for r in range(2)]
    for _ in range(15):  # more than one epoch (12 batches)
        whole = one.next_batch()
        parts = [batcher.next_batch() for batcher in ranks]
        assert torch.equal(torch.cat([p.indices for p in parts]), whole.indices)
        assert [label for p in parts for label in p.labels] == whole.labels
        for part, columns in zip(parts, (slice(0, 4), slice(4, 8)), strict=True):
            steps = part.targets.shape[0]
            assert part.targets.shape[1] == 4
            assert torch.equal(part.targets, whole.targets[:steps, columns])
            assert torch.equal(part.inputs, whole.inputs[:steps, columns])
            assert not whole.mask[steps:, columns].any()  # the rest is the one-rank batch's padding
    with pytest.raises(ValueError, match="multiple of the 3 ranks"):
        SentenceBatcher(corpus, 8, rank=0, world_size=3)


def test_every_sentence_once_per_epoch_with_little_padding(tmp_path: Path) -> None:
    corpus = SentenceCorpus(random_corpus(tmp_path, 240), "train")
    batcher = SentenceBatcher(corpus, 8, seed=0)
    epochs = [[batcher.next_batch() for _ in range(batcher.batches_per_epoch)] for _ in range(2)]
    orders = [torch.cat([b.indices for b in epoch]) for epoch in epochs]
    for order in orders:
        assert sorted(order.tolist()) == list(range(240))
    assert not torch.equal(orders[0], orders[1])  # a new shuffle each epoch
    # bucketing: less padding than the same sentences in a random order
    padding = sum(int((~b.mask).sum()) for b in epochs[0])
    shuffled = np.random.default_rng(0).permutation(240).reshape(30, 8)
    random_padding = sum(int((~corpus.batch(rows).mask).sum()) for rows in shuffled)
    assert padding < random_padding / 4

    uneven = SentenceBatcher(SentenceCorpus(random_corpus(tmp_path / "uneven", 245), "train"), 8, seed=0)
    seen = torch.cat([uneven.next_batch().indices for _ in range(uneven.batches_per_epoch)])
    assert len(set(seen.tolist())) == len(seen) == 240  # an incomplete last batch (5 sentences) is dropped


def test_evaluation_batches_cover_each_sentence_once_across_ranks(tmp_path: Path) -> None:
    corpus = SentenceCorpus(random_corpus(tmp_path, 20), "valid")  # 37 sentences
    per_rank = [list(evaluation_batches(corpus, 5, rank=r, world_size=2)) for r in range(2)]
    indices = [i for batches in per_rank for b in batches for i in b.indices.tolist()]
    assert sorted(indices) == list(range(37))
    for batches in per_rank:
        lengths = torch.cat([b.lengths for b in batches])
        assert torch.equal(lengths, lengths.sort().values)  # sorted by length: little padding
        assert all(b.lengths.numel() <= 5 for b in batches)
        for b in batches:  # the same sentences as a plain corpus batch
            assert same_batch(b, corpus.batch(b.indices.numpy()))
    again = [list(evaluation_batches(corpus, 5, rank=r, world_size=2)) for r in range(2)]
    assert all(same_batch(a, b) for x, y in zip(per_rank, again, strict=True) for a, b in zip(x, y, strict=True))
    first = [i for r in range(2) for b in evaluation_batches(corpus, 4, rank=r, world_size=2, max_sentences=11)
             for i in b.indices.tolist()]
    assert sorted(first) == list(range(11))


def test_batch_size_errors_are_clear(tmp_path: Path) -> None:
    corpus = SentenceCorpus(random_corpus(tmp_path, 20), "train")
    with pytest.raises(ValueError, match="train.batch_size 21 is larger than the 20 train sentences"):
        SentenceBatcher(corpus, 21)
    with pytest.raises(ValueError, match="train.batch_size 0 must be a positive multiple"):
        SentenceBatcher(corpus, 0)
    with pytest.raises(ValueError, match="rank=2, world_size=2"):
        SentenceBatcher(corpus, 4, rank=2, world_size=2)
    with pytest.raises(ValueError, match="batch_size must be >= 1"):
        next(evaluation_batches(corpus, 0))
    saved = SentenceBatcher(corpus, 4).state_dict()
    with pytest.raises(ValueError, match="cannot resume: the saved batches had batch_size=4, this run has 2"):
        SentenceBatcher(corpus, 2).load_state_dict(saved)
    with pytest.raises(ValueError, match="out of range"):
        SentenceBatcher(corpus, 4).load_state_dict({**saved, "position": 5})  # 5 batches per epoch: 0..4
    with pytest.raises(ValueError, match="max_length must be >= 1"):
        SentenceCorpus(tmp_path / "prepared", "train", max_length=0)


# ----------------------------------------------------------------------------------------------
# the prepare stage and the dataset store


def test_prepare_stage_builds_once_then_finds_it_prepared(tmp_path: Path) -> None:
    import fsspec
    from conftest import tiny_vae_config

    from pipeline.config import validate_config
    from pipeline.prepare_stage import ensure_local_dataset, run_prepare_outcome

    synthetic = validate_config(tiny_vae_config(tmp_path / "syn", tmp_path / "syn" / "data", name="synthetic_vae_tiny"))
    manifest, built = run_prepare_outcome(synthetic)
    assert built and manifest.name == "synthetic" and manifest.source == GENERATED
    assert run_prepare_outcome(synthetic) == (manifest, False)  # already prepared: nothing rebuilt
    assert ensure_local_dataset(synthetic) == manifest

    # a one-sentence-per-line corpus at an fsspec prefix (a split may be gzipped), with a vocabulary cap
    fs = fsspec.filesystem("memory")
    prefix = f"memory://sentences-{tmp_path.name}/tweets/"
    fs.pipe(prefix + "train.txt", b"a b c\tdem\na b\trep\nb\tdem\n")
    fs.pipe(prefix + "valid.txt.gz", gzip.compress(b"c a\tdem\n"))
    fs.pipe(prefix + "test.txt", b"b\trep\n")
    raw = tiny_vae_config(tmp_path / "tw", tmp_path / "tw" / "data")
    raw["data"] = {"dataset": "sentences", "source": prefix, "dir": str(tmp_path / "tw" / "data"), "vocab_size_cap": 3}
    config = validate_config(raw)
    manifest, built = run_prepare_outcome(config)
    assert built and manifest.vocab_size == 3 and manifest.vocab_size_cap == 3
    assert load_tokens(config.data_dir, "valid").tolist() == [2, 2, 1]  # c and a are outside the cap: <unk>
    assert run_prepare_outcome(config) == (manifest, False)
    assert SentenceCorpus(config.data_dir, "valid").labels == ["dem"]
    fs.rm(prefix, recursive=True)


def test_labels_travel_through_the_dataset_store(tmp_path: Path) -> None:
    from pipeline.data.store import fetch_dataset, publish_dataset, verify_stored

    import fsspec

    out = random_corpus(tmp_path, 12)
    store = f"memory://store-{tmp_path.name}/datasets/tweets"  # an object store: no folders to create
    published = publish_dataset(out, store)
    assert verify_stored(store) == published
    fetched = tmp_path / "pod" / "data"
    assert fetch_dataset(store, fetched) == published
    assert SentenceCorpus(fetched, "train").labels == SentenceCorpus(out, "train").labels == load_labels(out, "train")
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{store}/labels.json", b"{}")
    with pytest.raises(DataError, match="labels.json has sha256"):
        verify_stored(store)
    fs.rm(f"memory://store-{tmp_path.name}", recursive=True)
