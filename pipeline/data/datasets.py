"""Per-dataset facts and tokenisers.

| dataset    | source layout (members by basename)                      | tokens                         | ids    | unit |
|------------|-----------------------------------------------------------|--------------------------------|--------|------|
| ``enwik8`` | zip holding ``enwik8`` (100,000,000 bytes)                | one per byte, vocab 256        | uint8  | char |
| ``text8``  | zip holding ``text8`` (100,000,000 chars, ``a-z`` + space) | ``' '`` = 0, ``a``..``z`` = 1..26 | uint8  | char |
| ``ptb_word``| ``ptb.{train,valid,test}.txt``                           | ``line.split() + ['<eos>']``   | uint16 | word |
| ``ptb_char``| ``ptb.char.{train,valid,test}.txt`` (each maybe ``.gz``)  | ``line.split() + ['<eos>']``   | uint8  | char |
| ``text``   | any single text file, optionally gzipped                  | one per byte, vocab 256        | uint8  | char |
| ``sentences`` | ``train.txt`` / ``valid.txt`` / ``test.txt`` (each maybe ``.gz``) or one file | ``line.split() + ['<eos>']``, optional ``TAB label`` | uint16/32 | word |
| ``synthetic`` | generated (thesis §5.7.1), no download                  | one of 10,000 symbols + ``<eos>`` | uint16 | word |

Single-stream corpora (``enwik8``, ``text8``, ``text``) are split 90% / 5% / 5% in order
(integer arithmetic: train = N*90//100, valid = N*5//100, test = the rest - exactly
90M / 5M / 5M on the 100M-byte files). Line corpora come with their own splits; their vocabulary
is built from train only, ordered by decreasing train frequency (ties: first appearance), and a
valid/test token outside it is an error.

``sentences`` is any one-sentence-per-line corpus: a folder (or URL prefix) with the three split
files, or a single file split 90% / 5% / 5% by lines in order. A line may end in ``<TAB>label`` (e.g.
the author of a tweet); the labels are kept per split in ``labels.json``. Its vocabulary comes from
train, most frequent first, optionally capped (``vocab_size_cap`` words including ``<eos>`` and
``<unk>``); any other word - in train, valid or test - becomes ``<unk>``. ``synthetic`` is the task of
thesis §5.7.1: every sentence is a single symbol drawn uniformly from 10,000 (ids 0..9999, vocab
``"0".."9999"`` then ``<eos>``), 100,000 / 10,000 / 10,000 sentences from a fixed seed.

Byte vocabularies are ``[chr(0), ..., chr(255)]`` (id == byte value; ``bytes(ids)`` decodes).

The single-stream corpora are tokenised chunk by chunk (:class:`StreamTokeniser`, ``DatasetSpec.stream``)
while the archive is read, so the prepare stage never holds the 10^8-byte member in memory (see
:func:`pipeline.data.streaming.stream_member`); ``DatasetSpec.tokenise`` is the same map on a whole member.
"""

from __future__ import annotations

import string
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import numpy as np
from tqdm.auto import tqdm

from pipeline.data.sources import DataError, FileFacts, SourceFacts

__all__ = [
    "DATASETS",
    "SPLITS",
    "EOS",
    "GENERATED",
    "UNK",
    "DatasetSpec",
    "get_spec",
    "DEFAULT_SOURCES",
    "CANONICAL_FACTS",
    "SAMPLE_TEXT_PATH",
    "BYTE_VOCAB",
    "TEXT8_VOCAB",
    "split_lengths",
    "split_by_fractions",
    "StreamTokeniser",
    "ByteStreamTokens",
    "Text8StreamTokens",
    "byte_tokens",
    "text8_tokens",
    "line_tokens",
    "encode_lines",
    "synthetic_sentences",
    "tokenise_sentences",
]

DATASETS: tuple[str, ...] = ("enwik8", "text8", "ptb_word", "ptb_char", "text", "sentences", "synthetic")
SPLITS: tuple[str, ...] = ("train", "valid", "test")
EOS = "<eos>"
UNK = "<unk>"
#: The source of the generated datasets (``synthetic``): nothing is downloaded.
GENERATED = "generated"
SYNTHETIC_SYMBOLS = 10_000
SYNTHETIC_SENTENCES: dict[str, int] = {"train": 100_000, "valid": 10_000, "test": 10_000}
SYNTHETIC_SEED = 20_231_115
SENTENCE_FILES: dict[str, str] = {"train": "train.txt", "valid": "valid.txt", "test": "test.txt"}
#: Split percentages for single-stream corpora.
SPLIT_PERCENT: tuple[int, int, int] = (90, 5, 5)

#: The WikiText-2 excerpt shipped with the package (see ``pipeline/sample_data/README.md``).
SAMPLE_TEXT_PATH: Path = Path(__file__).resolve().parent.parent / "sample_data" / "wikitext2_sample.txt.gz"

# ---------------------------------------------------------------------------------------------
# canonical facts

_M = 100_000_000

#: Known facts about the canonical sources. PTB shas were computed from the Mikolov files
#: (word: ``ptb.zip``/``simple-examples``; char: ``simple-examples/data/ptb.char.*``), decompressed.
CANONICAL_FACTS: dict[str, SourceFacts] = {
    "enwik8": SourceFacts(
        archive=FileFacts(size=36_445_475),
        members={
            "enwik8": FileFacts(
                size=_M, sha256="2b49720ec4d78c3c9fabaee6e4179a5e997302b3a70029f30f2d582218c024a8"
            )
        },
    ),
    # text8: no published sha256; the archive size (31,344,016 bytes) is the one TensorFlow's
    # word2vec tutorial checks; the member must be exactly 10^8 characters of a-z and space.
    "text8": SourceFacts(archive=FileFacts(size=31_344_016), members={"text8": FileFacts(size=_M)}),
    "ptb_word": SourceFacts(
        members={
            "ptb.train.txt": FileFacts(
                size=5_101_618, sha256="fcea919f6cf83f35d4d00c6cbf08040d13d4155226340912e2fef9c9c4102cbf"
            ),
            "ptb.valid.txt": FileFacts(
                size=399_782, sha256="c9fe6985fe0d4ccb578183407d7668fc6066c20700cb4cf87d8ff1cc34df1bf2"
            ),
            "ptb.test.txt": FileFacts(
                size=449_945, sha256="dd65dff31e70846b2a6030a87482edcd5d199130cdcfa1f3dccbb033728deee0"
            ),
        }
    ),
    "ptb_char": SourceFacts(
        members={
            "ptb.char.train.txt": FileFacts(
                size=10_034_964, sha256="e313d91425e06c4f0a8fb6e881dcce0c291f2a0e9f4dda54833069b122f91da9"
            ),
            "ptb.char.valid.txt": FileFacts(
                size=786_084, sha256="21661f63ec355085879458b6524644d4add5573541b4be14fb52ab2e2e995eb8"
            ),
            "ptb.char.test.txt": FileFacts(
                size=884_846, sha256="1ef5607ac3c463b16e38bfe7900dd3bfc91de5a96e0f21e7eab5188b465b8ebe"
            ),
        }
    ),
    "text": SourceFacts(),
    "sentences": SourceFacts(),
    "synthetic": SourceFacts(),
}

_SIMPLE_EXAMPLES = "http://www.fit.vutbr.cz/~imikolov/rnnlm/simple-examples.tgz"

#: Where each corpus is published (``text`` defaults to the shipped sample).
DEFAULT_SOURCES: dict[str, str] = {
    "enwik8": "http://mattmahoney.net/dc/enwik8.zip",
    "text8": "http://mattmahoney.net/dc/text8.zip",
    "ptb_word": _SIMPLE_EXAMPLES,
    "ptb_char": _SIMPLE_EXAMPLES,
    "text": str(SAMPLE_TEXT_PATH),
    "synthetic": GENERATED,
}

# ---------------------------------------------------------------------------------------------
# tokenisers

BYTE_VOCAB: list[str] = [chr(i) for i in range(256)]
TEXT8_VOCAB: list[str] = [" ", *string.ascii_lowercase]

_PROGRESS_MIN_CHARS = 8 << 20


def split_lengths(num_tokens: int, what: str) -> dict[str, int]:
    """Tokens per split of a single stream of ``num_tokens``, cut by :data:`SPLIT_PERCENT` in order
    (train = N*90//100, valid = N*5//100, test = the rest); :class:`DataError` if a split gets < 2."""
    n_train = num_tokens * SPLIT_PERCENT[0] // 100
    n_valid = num_tokens * SPLIT_PERCENT[1] // 100
    lengths = {"train": n_train, "valid": n_valid, "test": num_tokens - n_train - n_valid}
    for split, length in lengths.items():
        if length < 2:
            raise DataError(
                f"{what} is too small ({num_tokens:,} tokens): its {split} split would hold {length} tokens; "
                "use a larger file"
            )
    return lengths


def split_by_fractions(ids: np.ndarray, what: str) -> dict[str, np.ndarray]:
    """Cut a 1-D stream into train/valid/test by :func:`split_lengths` (views, no copies)."""
    lengths = split_lengths(int(ids.shape[0]), what)
    n_train, n_valid = lengths["train"], lengths["valid"]
    return {"train": ids[:n_train], "valid": ids[n_train : n_train + n_valid], "test": ids[n_train + n_valid :]}


Chunk = bytes | memoryview


class StreamTokeniser:
    """Maps a byte stream to token ids chunk by chunk (one token per byte, in order).

    Content errors (a byte outside the alphabet) do not stop the stream: they are remembered and
    raised by :meth:`check` once the whole stream was read and the source verified, so that a
    corrupt download is reported as such and not as a stray character.
    """

    #: The vocabulary, index == token id.
    vocab: list[str] = BYTE_VOCAB
    #: dtype of the ids.
    dtype: np.dtype = np.dtype(np.uint8)

    def __call__(self, chunk: Chunk) -> Chunk | np.ndarray:
        """The ids of ``chunk`` (valid until the next call: implementations may reuse one buffer)."""
        raise NotImplementedError

    def check(self, what: str) -> None:
        """Raise a :class:`DataError` naming ``what`` if the stream held anything the map rejects."""


class ByteStreamTokens(StreamTokeniser):
    """id == byte value: each chunk is its own ids (no copy)."""

    def __call__(self, chunk: Chunk) -> Chunk:
        return chunk


class Text8StreamTokens(StreamTokeniser):
    """``' '`` -> 0, ``'a'``..``'z'`` -> 1..26; any other byte is reported by :meth:`check`.

    Computed with whole-array arithmetic instead of a 256-entry table lookup (several times faster:
    the comparisons and subtractions are vectorised, a gather is not): ``(byte - 96) & 63`` maps
    ``'a'``..``'z'`` (97..122) to 1..26 and ``' '`` (32, wrapping to 192) to 0; a byte is valid
    when ``byte - 97`` (wrapping) is below 26 or it is a space.
    """

    vocab = TEXT8_VOCAB

    def __init__(self) -> None:
        # Scratch arrays reused between chunks (no allocation per chunk); ``_ids`` is what a call returns.
        self._ids = np.empty(0, dtype=np.uint8)
        self._letter_offset = np.empty(0, dtype=np.uint8)
        self._valid = np.empty(0, dtype=bool)
        self._space = np.empty(0, dtype=bool)
        self._offset = 0  # stream offset of the next chunk
        self._first_bad: tuple[int, int] | None = None  # (offset, byte) of the first byte outside the alphabet
        self._bad_count = 0

    def __call__(self, chunk: Chunk) -> np.ndarray:
        raw = np.frombuffer(chunk, dtype=np.uint8)
        n = raw.shape[0]
        if self._ids.shape[0] < n:
            self._ids, self._letter_offset = np.empty(n, dtype=np.uint8), np.empty(n, dtype=np.uint8)
            self._valid, self._space = np.empty(n, dtype=bool), np.empty(n, dtype=bool)
        ids, letter_offset, valid, space = self._ids[:n], self._letter_offset[:n], self._valid[:n], self._space[:n]
        np.subtract(raw, ord("a"), out=letter_offset)  # uint8 wraps: 'a'..'z' -> 0..25, anything else >= 26
        np.less(letter_offset, 26, out=valid)
        np.equal(raw, ord(" "), out=space)
        np.logical_or(valid, space, out=valid)
        if not valid.all():
            bad = np.flatnonzero(~valid)
            if self._first_bad is None:
                self._first_bad = (self._offset + int(bad[0]), int(raw[bad[0]]))
            self._bad_count += int(bad.size)
        np.subtract(raw, ord("a") - 1, out=ids)
        np.bitwise_and(ids, 63, out=ids)  # ' ' - 96 wraps to 192, & 63 -> 0; 1..26 stay
        self._offset += n
        return ids

    def check(self, what: str) -> None:
        if self._first_bad is None:
            return
        pos, byte = self._first_bad
        raise DataError(
            f"{what} contains a character outside text8's alphabet: {chr(byte)!r} (byte 0x{byte:02x}) at offset "
            f"{pos:,} ({self._bad_count:,} such bytes in all); text8 holds only 'a'-'z' and ' '. Use the canonical "
            "text8.zip, or prepare this file as dataset 'text' (byte level)"
        )


def byte_tokens(data: bytes) -> np.ndarray:
    """One token per byte, id == byte value (uint8, a zero-copy view of ``data``)."""
    return np.frombuffer(data, dtype=np.uint8)


def text8_tokens(data: bytes, what: str = "text8") -> np.ndarray:
    """``' '`` -> 0, ``'a'``..``'z'`` -> 1..26; any other byte is a :class:`DataError`."""
    tokens = Text8StreamTokens()
    ids = tokens(data)
    tokens.check(what)
    return ids


def line_tokens(text: str, *, progress: bool = False, desc: str = "tokenise") -> list[str]:
    """Each line -> ``line.split() + ['<eos>']``.

    Lines end at ``\n``. What follows the last ``\n`` is a line only if it holds a token: the
    Mikolov PTB char files end in ``"\n "`` and that trailing space is not a sentence, so every
    PTB split gets exactly one ``<eos>`` per sentence (42,068 in train, as at word level).
    """
    lines = text.split("\n")
    if lines and not lines[-1].strip():
        lines.pop()
    out: list[str] = []
    disable = not progress or len(text) < _PROGRESS_MIN_CHARS
    for line in tqdm(lines, desc=desc, unit="line", disable=disable, leave=False):
        out.extend(line.split())
        out.append(EOS)
    return out


def build_vocab(tokens: list[str]) -> list[str]:
    """Train vocabulary, most frequent first (ties: first appearance)."""
    return [tok for tok, _ in Counter(tokens).most_common()]


def _id_dtype(vocab_size: int, minimum: type[np.unsignedinteger]) -> np.dtype:
    for dt in (np.uint8, np.uint16, np.uint32):
        if np.dtype(dt).itemsize >= np.dtype(minimum).itemsize and vocab_size <= np.iinfo(dt).max + 1:
            return np.dtype(dt)
    raise DataError(f"vocabulary of {vocab_size:,} tokens is too large")


def encode_lines(
    tokens: list[str], index: dict[str, int], dtype: np.dtype, *, split: str, where: str
) -> np.ndarray:
    ids = np.fromiter((index.get(t, -1) for t in tokens), dtype=np.int64, count=len(tokens))
    missing = np.flatnonzero(ids < 0)
    if missing.size:
        pos = int(missing[0])
        line = sum(1 for t in tokens[:pos] if t == EOS) + 1
        raise DataError(
            f"{split} split ({where}) line {line:,}: token {tokens[pos]!r} is not in the training vocabulary "
            f"({missing.size:,} unknown tokens in all); valid/test may only use train words (rare words are <unk> "
            "in the Mikolov preprocessing) - is the source the canonical preprocessed PTB?"
        )
    return ids.astype(dtype)


# ---------------------------------------------------------------------------------------------
# dataset specs


@dataclass(frozen=True)
class Tokenised:
    splits: dict[str, np.ndarray]
    vocab: list[str]
    labels: dict[str, list[str]] | None = None  # per split, one label per sentence (``sentences`` with TAB labels)


@dataclass(frozen=True)
class DatasetSpec:
    name: str
    unit: Literal["char", "word"]
    #: Members to fetch (basenames); ``None`` = the single file the source holds.
    members: tuple[str | None, ...]
    tokenise: Callable[[dict[str, bytes], dict[str, str], bool], Tokenised]
    description: str
    #: Single-stream corpora: a new chunk-by-chunk tokeniser of the one member (the prepare stage
    #: streams the source through it); ``None``: the members are read whole and ``tokenise``d.
    stream: Callable[[], StreamTokeniser] | None = None

    @property
    def facts(self) -> SourceFacts:
        return CANONICAL_FACTS[self.name]

    @property
    def default_source(self) -> str:
        return DEFAULT_SOURCES[self.name]


def _key(member: str | None) -> str:
    return member if member is not None else ""


def _stream_tokeniser(
    make: Callable[[], StreamTokeniser],
) -> Callable[[dict[str, bytes], dict[str, str], bool], Tokenised]:
    """``DatasetSpec.tokenise`` of a single-stream corpus: its chunk tokeniser applied to the whole member."""

    def tokenise(members: dict[str, bytes], where: dict[str, str], progress: bool) -> Tokenised:
        (key,) = members
        tokens = make()
        ids = np.frombuffer(tokens(members[key]), dtype=tokens.dtype)
        tokens.check(where[key])
        return Tokenised(split_by_fractions(ids, where[key]), list(tokens.vocab))

    return tokenise


def _lines_tokeniser(
    files: dict[str, str], minimum: type[np.unsignedinteger]
) -> Callable[[dict[str, bytes], dict[str, str], bool], Tokenised]:
    def tokenise(members: dict[str, bytes], where: dict[str, str], progress: bool) -> Tokenised:
        texts: dict[str, list[str]] = {}
        for split in SPLITS:
            member = files[split]
            try:
                text = members[member].decode("utf-8")
            except UnicodeDecodeError as err:
                raise DataError(f"{where[member]} is not UTF-8 text ({err}); is this the right file?") from err
            texts[split] = line_tokens(text, progress=progress, desc=f"tokenise {member}")
        vocab = build_vocab(texts["train"])
        index = {tok: i for i, tok in enumerate(vocab)}
        dtype = _id_dtype(len(vocab), minimum)
        splits = {
            split: encode_lines(toks, index, dtype, split=split, where=where[files[split]])
            for split, toks in texts.items()
        }
        for split, arr in splits.items():
            if arr.shape[0] < 2:
                raise DataError(f"{where[files[split]]} holds {arr.shape[0]} tokens; a split needs at least 2")
        return Tokenised(splits, vocab)

    return tokenise


def _sentence_lines(text: str) -> tuple[list[list[str]], list[str] | None]:
    """Lines -> (words per line, labels or None); ``words<TAB>label``; blank lines are skipped."""
    sentences: list[list[str]] = []
    labels: list[str] = []
    for line in text.split("\n"):
        words, tab, label = line.partition("\t")
        if not words.strip():
            continue
        sentences.append(words.split())
        labels.append(label.strip() if tab else "")
    return sentences, (labels if any(labels) else None)


def tokenise_sentences(members: dict[str, bytes], where: dict[str, str], progress: bool, *,
                       vocab_size_cap: int | None = None) -> Tokenised:
    """The ``sentences`` dataset: three split files, or one file split 90/5/5 by lines (see the module doc)."""
    texts: dict[str, str] = {}
    for member, data in members.items():
        try:
            texts[member] = data.decode("utf-8")
        except UnicodeDecodeError as err:
            raise DataError(f"{where[member]} is not UTF-8 text ({err}); is this the right file?") from err
    if len(texts) == 1:  # one file: cut its lines 90/5/5 in order
        (member,) = texts
        lines, labels = _sentence_lines(texts[member])
        n = len(lines)
        bounds = {"train": (0, n * 90 // 100), "valid": (n * 90 // 100, n * 95 // 100), "test": (n * 95 // 100, n)}
        per_split = {split: (lines[a:b], None if labels is None else labels[a:b]) for split, (a, b) in bounds.items()}
        wheres = {split: f"{where[member]} ({split} lines)" for split in SPLITS}
    else:
        per_split = {split: _sentence_lines(texts[SENTENCE_FILES[split]]) for split in SPLITS}
        wheres = {split: where[SENTENCE_FILES[split]] for split in SPLITS}
    for split, (lines, _) in per_split.items():
        if not lines:
            raise DataError(f"{wheres[split]} holds no sentences; every split needs at least one")
    counts = Counter(word for line in per_split["train"][0] for word in line)
    counts[EOS] = len(per_split["train"][0])
    counts.setdefault(UNK, 0)
    vocab = [tok for tok, _ in counts.most_common()]
    if vocab_size_cap is not None and len(vocab) > vocab_size_cap:
        if vocab_size_cap < 2:
            raise DataError(f"vocab_size_cap {vocab_size_cap} leaves no room for <eos> and <unk>; use at least 2")
        kept = [tok for tok in vocab if tok not in (EOS, UNK)][: vocab_size_cap - 2]
        keep = set(kept) | {EOS, UNK}
        vocab = [tok for tok in vocab if tok in keep]
    index = {tok: i for i, tok in enumerate(vocab)}
    unk = index[UNK]
    dtype = _id_dtype(len(vocab), np.uint16)
    splits: dict[str, np.ndarray] = {}
    for split, (lines, _) in per_split.items():
        ids = [index.get(word, unk) for line in lines for word in (*line, EOS)]
        splits[split] = np.asarray(ids, dtype=dtype)
    has_labels = any(labels is not None for _, labels in per_split.values())
    labels = {split: (labs if labs is not None else [""] * len(lines)) for split, (lines, labs) in per_split.items()}
    return Tokenised(splits, vocab, labels if has_labels else None)


def synthetic_sentences() -> Tokenised:
    """The synthetic task of thesis §5.7.1: one uniform symbol of 10,000 per sentence, then ``<eos>``."""
    rng = np.random.default_rng(SYNTHETIC_SEED)
    vocab = [str(i) for i in range(SYNTHETIC_SYMBOLS)] + [EOS]
    splits = {}
    for split in SPLITS:
        symbols = rng.integers(0, SYNTHETIC_SYMBOLS, size=SYNTHETIC_SENTENCES[split], dtype=np.int64)
        stream = np.stack([symbols, np.full_like(symbols, SYNTHETIC_SYMBOLS)], axis=1).reshape(-1)
        splits[split] = stream.astype(np.uint16)
    return Tokenised(splits, vocab)


def _not_fetched(members: dict[str, bytes], where: dict[str, str], progress: bool) -> Tokenised:
    raise AssertionError("prepare_dataset tokenises sentences / synthetic itself")  # pragma: no cover


_PTB_WORD = {s: f"ptb.{s}.txt" for s in SPLITS}
_PTB_CHAR = {s: f"ptb.char.{s}.txt" for s in SPLITS}

_SPECS: dict[str, DatasetSpec] = {
    "enwik8": DatasetSpec(
        "enwik8", "char", ("enwik8",), _stream_tokeniser(ByteStreamTokens),
        "Hutter prize enwik8: 10^8 bytes of Wikipedia XML", stream=ByteStreamTokens,
    ),
    "text8": DatasetSpec(
        "text8", "char", ("text8",), _stream_tokeniser(Text8StreamTokens),
        "text8: 10^8 characters of cleaned Wikipedia, a-z and space", stream=Text8StreamTokens,
    ),
    "ptb_word": DatasetSpec(
        "ptb_word", "word", tuple(_PTB_WORD.values()), _lines_tokeniser(_PTB_WORD, np.uint16),
        "Penn Treebank, Mikolov preprocessing, word level (10k vocabulary)",
    ),
    "ptb_char": DatasetSpec(
        "ptb_char", "char", tuple(_PTB_CHAR.values()), _lines_tokeniser(_PTB_CHAR, np.uint8),
        "Penn Treebank, Mikolov preprocessing, character level (50 symbols incl. <eos>)",
    ),
    "text": DatasetSpec(
        "text", "char", (None,), _stream_tokeniser(ByteStreamTokens),
        "any text file (optionally gzipped), one token per byte", stream=ByteStreamTokens,
    ),
    "sentences": DatasetSpec(
        "sentences", "word", tuple(SENTENCE_FILES.values()), _not_fetched,
        "one sentence per line (optional TAB label), a folder of train/valid/test.txt or one file",
    ),
    "synthetic": DatasetSpec(
        "synthetic", "word", (), _not_fetched, "thesis §5.7.1: one of 10,000 uniform symbols per sentence (generated)",
    ),
}
assert tuple(_SPECS) == DATASETS


def get_spec(name: str) -> DatasetSpec:
    """The spec of dataset ``name``; :class:`DataError` listing the valid names otherwise."""
    try:
        return _SPECS[name]
    except (KeyError, TypeError):
        raise DataError(f"unknown dataset {name!r}; valid datasets: {', '.join(DATASETS)}") from None
