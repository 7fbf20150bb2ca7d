"""The data stage: fetch, verify, tokenise and write a dataset folder - atomically and idempotently.

Output folder layout::

    output_dir/
        train.npy  valid.npy  test.npy   # 1-D token ids (np.save; uint8 or uint16), mmap-loadable
        vocab.json                       # JSON list of token strings, index == id
        labels.json                      # sentences with TAB labels only: {split: [label per sentence]}
        manifest.json                    # DatasetManifest: provenance, sizes and sha256 of every split

The folder is built as a hidden sibling (``.<name>.tmp-*``) and moved into place with
``os.replace`` only when complete, so a failure at any point leaves no partial output (and, with
``force=True``, leaves the previous output untouched).

The single-stream corpora (enwik8, text8, text) are prepared in one pass: the archive member is
streamed (:func:`pipeline.data.streaming.stream_member`: read, hashed and inflated on worker
threads), mapped chunk by chunk and written straight into the three split files, each hashed
while it is written; the source is verified once all of it was read, before the folder is moved
into place. Every split file is byte for byte what ``np.save`` writes.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import os
import shutil
import tempfile
import uuid
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from pipeline.data.datasets import (
    GENERATED,
    SPLITS,
    DatasetSpec,
    StreamTokeniser,
    Tokenised,
    get_spec,
    split_lengths,
    synthetic_sentences,
    tokenise_sentences,
)
from pipeline.data.sources import (
    DataError,
    SourceFacts,
    _is_directory,
    fetch_source,
    normalize_source,
    sha256_file,
)
from pipeline.data.streaming import stream_member

__all__ = [
    "FORMAT_VERSION",
    "MANIFEST_NAME",
    "VOCAB_NAME",
    "SplitInfo",
    "DatasetManifest",
    "prepare_dataset",
    "load_manifest",
    "load_tokens",
    "load_labels",
    "load_vocab",
    "verify_prepared",
]

log = logging.getLogger(__name__)

FORMAT_VERSION = 1
MANIFEST_NAME = "manifest.json"
VOCAB_NAME = "vocab.json"
LABELS_NAME = "labels.json"


class SplitInfo(BaseModel):
    model_config = ConfigDict(extra="forbid")

    file: str
    num_tokens: int
    dtype: str
    sha256: str


class DatasetManifest(BaseModel):
    """What a prepared dataset folder holds and where it came from."""

    model_config = ConfigDict(extra="forbid")

    name: str
    unit: Literal["char", "word"]  # char -> report bits per character, word -> perplexity
    source: str  # as requested; local paths made absolute
    source_sha256: str | None  # sha256 of the fetched file; None for a directory / URL prefix source
    vocab_size: int
    splits: dict[str, SplitInfo]
    format_version: int
    created_at: str  # ISO 8601, UTC
    # Files besides the splits and the vocabulary (``labels`` -> labels.json); absent in older manifests.
    extra_files: dict[str, SplitInfo] = {}
    # ``sentences``: the vocabulary size cap it was prepared with (None = uncapped); absent in older manifests.
    vocab_size_cap: int | None = None

    def files(self) -> list[SplitInfo]:
        """Every data file the manifest describes (splits, then extra files), each with its sha256."""
        return [*self.splits.values(), *self.extra_files.values()]


_REBUILD_HINT = "rebuild it with prepare_dataset(..., force=True) / `--force`, or delete {dir}"


# ---------------------------------------------------------------------------------------------
# reading


def load_manifest(output_dir: str | os.PathLike[str]) -> DatasetManifest:
    """The manifest of a prepared folder; :class:`DataError` if missing or invalid."""
    out = Path(output_dir)
    path = out / MANIFEST_NAME
    if not path.is_file():
        raise DataError(
            f"{out} is not a prepared dataset ({MANIFEST_NAME} not found); run the prepare stage "
            "(prepare_dataset / `rlm-pipeline prepare`) first"
        )
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path} is unreadable ({err}); {_REBUILD_HINT.format(dir=out)}") from err
    return parse_manifest(raw, str(path), _REBUILD_HINT.format(dir=out))


def parse_manifest(raw: bytes, where: str, fix: str) -> DatasetManifest:
    """A manifest from its JSON bytes (read from ``where``); :class:`DataError` ending in ``fix`` when
    invalid or written by a newer format."""
    try:
        manifest = DatasetManifest.model_validate_json(raw)
    except (ValidationError, ValueError) as err:
        raise DataError(f"{where} is invalid ({err}); {fix}") from err
    if manifest.format_version > FORMAT_VERSION:
        raise DataError(
            f"{where} has format version {manifest.format_version}, this code reads up to {FORMAT_VERSION}; "
            f"update the code or {fix}"
        )
    return manifest


def _split_info(manifest: DatasetManifest, split: str, out: Path) -> SplitInfo:
    try:
        return manifest.splits[split]
    except KeyError:
        raise DataError(f"{out} has no split {split!r}; it has: {', '.join(manifest.splits)}") from None


def load_tokens(output_dir: str | os.PathLike[str], split: str, *, verify: bool = False) -> np.ndarray:
    """A read-only memory map of ``split``'s token ids (checked against the manifest)."""
    out = Path(output_dir)
    manifest = load_manifest(out)
    info = _split_info(manifest, split, out)
    path = out / info.file
    if not path.is_file():
        raise DataError(f"{path} is missing; {_REBUILD_HINT.format(dir=out)}")
    if verify:
        _verify_split(path, info, out)
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
    except (ValueError, OSError) as err:
        raise DataError(f"{path} cannot be read ({err}); {_REBUILD_HINT.format(dir=out)}") from err
    if arr.ndim != 1 or arr.shape[0] != info.num_tokens or str(arr.dtype) != info.dtype:
        raise DataError(
            f"{path} holds {arr.dtype}{list(arr.shape)}, the manifest says {info.dtype}[{info.num_tokens}]; "
            f"{_REBUILD_HINT.format(dir=out)}"
        )
    return arr


def load_vocab(output_dir: str | os.PathLike[str]) -> list[str]:
    """The vocabulary (index == token id)."""
    out = Path(output_dir)
    manifest = load_manifest(out)
    path = out / VOCAB_NAME
    try:
        vocab = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise DataError(f"{path} is missing; {_REBUILD_HINT.format(dir=out)}") from None
    except (ValueError, OSError) as err:
        raise DataError(f"{path} is invalid ({err}); {_REBUILD_HINT.format(dir=out)}") from err
    if not isinstance(vocab, list) or not all(isinstance(t, str) for t in vocab) or len(vocab) != manifest.vocab_size:
        raise DataError(
            f"{path} does not hold a list of {manifest.vocab_size} strings; {_REBUILD_HINT.format(dir=out)}"
        )
    return vocab


def _verify_split(path: Path, info: SplitInfo, out: Path) -> None:
    if not path.is_file():
        raise DataError(f"{path} is missing; {_REBUILD_HINT.format(dir=out)}")
    actual = sha256_file(path)
    if actual != info.sha256:
        raise DataError(
            f"{path} is damaged: sha256 {actual} does not match the manifest's {info.sha256}; "
            f"{_REBUILD_HINT.format(dir=out)}"
        )


def verify_prepared(output_dir: str | os.PathLike[str]) -> DatasetManifest:
    """Recompute the sha256 of every split (and check the vocabulary); :class:`DataError` on mismatch."""
    out = Path(output_dir)
    manifest = load_manifest(out)
    for split in SPLITS:
        _split_info(manifest, split, out)
    for info in manifest.files():
        _verify_split(out / info.file, info, out)
    load_vocab(out)
    return manifest


def load_labels(output_dir: str | os.PathLike[str], split: str) -> list[str] | None:
    """The per-sentence labels of ``split`` (``sentences`` corpora with a TAB label column), or None."""
    out = Path(output_dir)
    info = load_manifest(out).extra_files.get("labels")
    if info is None:
        return None
    try:
        labels = json.loads((out / info.file).read_text(encoding="utf-8"))[split]
    except (OSError, ValueError, KeyError) as err:
        raise DataError(f"{out / info.file} is unreadable ({err}); {_REBUILD_HINT.format(dir=out)}") from err
    return [str(label) for label in labels]


# ---------------------------------------------------------------------------------------------
# writing


def _existing(out: Path, name: str, source: str, force: bool,
              vocab_size_cap: int | None = None) -> DatasetManifest | None:
    """The verified manifest to reuse, or None to build; raises when ``out`` must not be touched."""
    if not out.exists():
        return None
    if not out.is_dir():
        raise DataError(f"output path {out} exists and is not a directory; remove it or choose another output_dir")
    has_manifest = (out / MANIFEST_NAME).exists()
    if not has_manifest:
        if any(out.iterdir()):
            raise DataError(
                f"output_dir {out} is not empty and holds no {MANIFEST_NAME}: it is not a prepared dataset, so it is "
                "left alone; choose a new / empty output_dir or delete it yourself"
            )
        return None
    if force:
        return None
    manifest = load_manifest(out)
    if manifest.name != name or manifest.source != source:
        raise DataError(
            f"{out} already holds dataset {manifest.name!r} prepared from {manifest.source}, but {name!r} from "
            f"{source} was requested; choose another output_dir, or pass force=True / `--force` to replace it"
        )
    if manifest.vocab_size_cap != vocab_size_cap:
        raise DataError(
            f"{out} holds {name!r} prepared with vocab_size_cap {manifest.vocab_size_cap}, but {vocab_size_cap} was "
            "requested; choose another output_dir, or pass force=True / `--force` to rebuild it"
        )
    manifest = verify_prepared(out)
    log.info("dataset %s in %s already prepared, verified", name, out)
    return manifest


def npy_header(dtype: np.dtype, length: int) -> bytes:
    """The header ``np.save`` writes before a 1-D C-order array of ``length`` items of ``dtype``."""
    header = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        header, {"descr": np.lib.format.dtype_to_descr(np.dtype(dtype)), "fortran_order": False, "shape": (length,)}
    )
    return header.getvalue()


class _SplitFiles:
    """Writes one token stream into ``<split>.npy`` files as it arrives - the first ``lengths[split]``
    ids to the first split of ``lengths``, and so on - hashing every file while it is written: no
    copy of the stream is kept and no file is read back."""

    def __init__(self, folder: Path, lengths: dict[str, int], dtype: np.dtype) -> None:
        self._folder = folder
        self._dtype = np.dtype(dtype)
        self._lengths = lengths
        self._pending = list(lengths)  # splits not opened yet, in stream order
        self.infos: dict[str, SplitInfo] = {}  # the splits written completely
        self._split = ""
        self._file: io.FileIO | None = None
        self._hash = hashlib.sha256()
        self._left = 0  # bytes the open split still needs

    def write(self, ids: bytes | memoryview | np.ndarray) -> None:
        """The stream's next ids (``dtype`` items)."""
        data = memoryview(ids).cast("B")
        while data:
            if self._file is None:
                self._open_next(len(data))
            part = data[: self._left]
            self._hash.update(part)
            self._file.write(part)  # type: ignore[union-attr]
            self._left -= len(part)
            data = data[len(part) :]
            if self._left == 0:
                self._close_split()

    def finish(self) -> dict[str, SplitInfo]:
        """Every split's file info, once the whole stream was written (trailing splits of 0 ids are written here)."""
        while self._file is None and self._pending:
            self._open_next(0)
            if self._left == 0:
                self._close_split()
        if self._file is not None or self._pending:
            raise DataError(f"the token stream ended {self._left:,} bytes short of split {self._split!r}")
        return self.infos

    def close(self) -> None:
        """Release the open file (after an error; the folder is discarded)."""
        if self._file is not None:
            self._file.close()
            self._file = None

    def _open_next(self, incoming: int) -> None:
        if not self._pending:
            raise DataError(f"the token stream holds more ids than its splits ({incoming:,} bytes left over)")
        self._split = self._pending.pop(0)
        length = self._lengths[self._split]
        header = npy_header(self._dtype, length)
        self._file = io.FileIO(self._folder / f"{self._split}.npy", "w")
        self._file.write(header)
        self._hash = hashlib.sha256(header)
        self._left = length * self._dtype.itemsize

    def _close_split(self) -> None:
        assert self._file is not None
        self._file.close()
        self._file = None
        self.infos[self._split] = SplitInfo(
            file=f"{self._split}.npy", num_tokens=self._lengths[self._split], dtype=str(self._dtype),
            sha256=self._hash.hexdigest(),
        )


def _write_arrays(folder: Path, splits: dict[str, np.ndarray]) -> dict[str, SplitInfo]:
    """Write whole split arrays (the corpora read whole) in ``np.save``'s format, hashed while written."""
    infos: dict[str, SplitInfo] = {}
    for split in SPLITS:
        arr = np.ascontiguousarray(splits[split])
        files = _SplitFiles(folder, {split: int(arr.shape[0])}, arr.dtype)
        try:
            files.write(arr)
            infos.update(files.finish())
        finally:
            files.close()
    return infos


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _move_into_place(tmp: Path, out: Path) -> None:
    if not out.exists():
        os.replace(tmp, out)
        return
    trash = out.with_name(f".{out.name}.old-{uuid.uuid4().hex[:8]}")
    os.replace(out, trash)
    try:
        os.replace(tmp, out)
    except BaseException:
        os.replace(trash, out)
        raise
    shutil.rmtree(trash, ignore_errors=True)


@dataclass(frozen=True)
class _Written:
    """The data files of a folder under construction, and what its manifest needs to know besides."""

    splits: dict[str, SplitInfo]
    vocab: list[str]
    source_sha256: str | None
    labels: SplitInfo | None = None


class _TokenSink:
    """Tokenises a streamed member chunk by chunk into the split files of ``folder``."""

    def __init__(self, folder: Path, tokens: StreamTokeniser) -> None:
        self._folder = folder
        self._tokens = tokens
        self.files: _SplitFiles | None = None

    def open(self, size: int, location: str) -> None:
        self.files = _SplitFiles(self._folder, split_lengths(size, location), self._tokens.dtype)

    def write(self, chunk: bytes | memoryview) -> None:
        assert self.files is not None
        self.files.write(self._tokens(chunk))


def _stream_splits(spec: DatasetSpec, source: str, folder: Path, cache: Path, facts: SourceFacts | None,
                   progress: bool) -> _Written:
    """A single-stream corpus: its one member streamed through the tokeniser into the split files."""
    assert spec.stream is not None
    (member,) = spec.members
    tokens = spec.stream()
    sink = _TokenSink(folder, tokens)
    try:
        streamed = stream_member(source, member, sink, cache_dir=cache, facts=facts, progress=progress)
        tokens.check(streamed.location)
        assert sink.files is not None
        return _Written(sink.files.finish(), list(tokens.vocab), streamed.sha256)
    finally:
        if sink.files is not None:
            sink.files.close()


def _tokenise(name: str, source: str, cache: Path, facts: SourceFacts | None, progress: bool,
              vocab_size_cap: int | None) -> tuple[Tokenised, str | None]:
    """Fetch and tokenise ``source`` as dataset ``name``: (tokenised splits, sha256 of the fetched file)."""
    if name == "synthetic":
        return synthetic_sentences(), None
    spec = get_spec(name)
    members: list[str | None] = list(spec.members)
    if name == "sentences" and not _is_directory(source):
        members = [None]  # one file, split by lines
    fetched = fetch_source(source, members, cache_dir=cache, facts=facts, progress=progress)
    if name == "sentences":
        tokenised = tokenise_sentences(fetched.members, fetched.locations, progress, vocab_size_cap=vocab_size_cap)
    else:
        tokenised = spec.tokenise(fetched.members, fetched.locations, progress)
    return tokenised, fetched.sha256


def _tokenise_splits(name: str, source: str, folder: Path, cache: Path, facts: SourceFacts | None, progress: bool,
                     vocab_size_cap: int | None) -> _Written:
    """The corpora read whole (line corpora, generated ones): tokenised in memory, then written."""
    tokenised, source_sha = _tokenise(name, source, cache, facts, progress, vocab_size_cap)
    labels = None
    if tokenised.labels is not None:
        (folder / LABELS_NAME).write_text(json.dumps(tokenised.labels, ensure_ascii=True), encoding="utf-8")
        labels = SplitInfo(file=LABELS_NAME, num_tokens=sum(len(v) for v in tokenised.labels.values()), dtype="json",
                           sha256=sha256_file(folder / LABELS_NAME))
    return _Written(_write_arrays(folder, tokenised.splits), tokenised.vocab, source_sha, labels)


def _write_manifest(folder: Path, name: str, unit: str, source: str, written: _Written,
                    vocab_size_cap: int | None) -> DatasetManifest:
    """Write the vocabulary, then the manifest (last: it describes the files already there)."""
    (folder / VOCAB_NAME).write_text(json.dumps(written.vocab, ensure_ascii=True), encoding="utf-8")
    manifest = DatasetManifest(
        name=name,
        unit=unit,  # type: ignore[arg-type]
        source=source,
        source_sha256=written.source_sha256,
        vocab_size=len(written.vocab),
        splits=written.splits,
        format_version=FORMAT_VERSION,
        created_at=datetime.now(timezone.utc).isoformat(timespec="seconds"),
        extra_files={"labels": written.labels} if written.labels is not None else {},
        vocab_size_cap=vocab_size_cap,
    )
    (folder / MANIFEST_NAME).write_text(manifest.model_dump_json(indent=2) + "\n", encoding="utf-8")
    return manifest


def prepare_dataset(
    name: str,
    source: str,
    output_dir: str | os.PathLike[str],
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    force: bool = False,
    verify_source: bool = True,
    progress: bool = True,
    expected: SourceFacts | None = None,
    vocab_size_cap: int | None = None,
) -> DatasetManifest:
    """Fetch ``source``, verify it, tokenise it as dataset ``name`` and write ``output_dir``.

    ``source``: an fsspec URL or local path of the archive / directory / text file (see
    :mod:`pipeline.data.sources`; canonical URLs are in ``DEFAULT_SOURCES``).
    ``cache_dir``: where remote downloads are kept (default ``<output_dir>/../.downloads``).
    ``force``: rebuild even if ``output_dir`` already holds this dataset and verifies.
    ``verify_source``: check the source against known size / sha256 facts (``False``: no checks,
    for deliberately modified copies; the content checks of the tokenisers still apply).
    ``expected``: the facts to check instead of the canonical ones in ``CANONICAL_FACTS`` (e.g. for
    a mirror with a different archive, or the small archives the tests build).
    ``vocab_size_cap``: ``sentences`` only - keep this many most frequent train words (incl. ``<eos>``
    and ``<unk>``); the others become ``<unk>``. ``synthetic`` is generated (``source`` must be
    ``generated``); nothing is downloaded.

    Idempotent: if ``output_dir`` holds a manifest for the same dataset and source whose files
    verify, nothing is rebuilt and that manifest is returned. A folder that does not verify, or
    that holds another dataset, is a :class:`DataError` (fix: ``force=True`` or delete it).
    """
    spec = get_spec(name)
    if name == "synthetic" and source != GENERATED:
        raise DataError(
            f"dataset synthetic is generated, not downloaded: set its source to {GENERATED!r} (got {source!r})"
        )
    source_id = GENERATED if name == "synthetic" else normalize_source(source)
    out = Path(output_dir).expanduser().absolute()
    if vocab_size_cap is not None and name != "sentences":
        raise DataError(
            f"vocab_size_cap applies to dataset sentences only, not {name!r}; remove it (data.vocab_size_cap)"
        )
    existing = _existing(out, name, source_id, force, vocab_size_cap)
    if existing is not None:
        return existing

    cache = Path(cache_dir).expanduser().absolute() if cache_dir is not None else out.parent / ".downloads"
    facts = (expected if expected is not None else spec.facts) if verify_source else None
    log.info("preparing %s from %s", name, source_id)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.tmp-", dir=out.parent))
    try:
        tmp.chmod(0o777 & ~_umask())  # mkdtemp makes it 0700; the result should look like a plain mkdir
        if spec.stream is not None:
            written = _stream_splits(spec, source_id, tmp, cache, facts, progress)
        else:
            written = _tokenise_splits(name, source_id, tmp, cache, facts, progress, vocab_size_cap)
        manifest = _write_manifest(tmp, name, spec.unit, source_id, written, vocab_size_cap)
        if not force and (out / MANIFEST_NAME).exists():
            # Someone else (another rank / process) finished first: keep theirs if it verifies.
            theirs = _existing(out, name, source_id, force=False, vocab_size_cap=vocab_size_cap)
            if theirs is not None:
                return theirs
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info(
        "prepared %s in %s: %s", name, out,
        ", ".join(f"{k} {v.num_tokens:,} tokens" for k, v in manifest.splits.items()),
    )
    return manifest
