"""Streaming one member of a fetched source (:mod:`pipeline.data.sources`) to a :class:`MemberSink`.

:func:`stream_member` makes a single pass over the archive: reading, sha256 of the archive, inflating, CRC /
sha256 of the member and the sink's work run at the same time on separate threads (hashlib, zlib, file I/O
and numpy release the GIL), and nothing the size of the member is ever held in memory (the single-stream
corpora enwik8 / text8, 10^8 bytes). Verification and errors are those of :mod:`pipeline.data.sources`:
a wrong archive digest is reported first, even when it caused a later error.
"""

from __future__ import annotations

import hashlib
import logging
import os
import posixpath
import queue
import struct
import threading
import zipfile
import zlib
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NoReturn, Protocol

from pipeline.data.sources import (
    _CORRUPT_ERRORS,
    DataError,
    FetchedSource,
    FileFacts,
    SourceFacts,
    _Origin,
    _bar,
    _check_member_sha,
    _check_member_size,
    _check_sha,
    _check_single_file_name,
    _choose_member,
    _corrupt,
    _fetch_file,
    _is_directory,
    _member_facts,
    _read_members,
    _single_file_name,
    _sniff,
    _verified,
    fetch_source,
    sha256_file,
)

__all__ = ["MemberSink", "StreamedMember", "stream_member", "STREAM_READ", "STREAM_PIECE_MAX"]

log = logging.getLogger(__name__)

#: Bytes read from the fetched file per step of the streaming reader.
STREAM_READ = 1 << 20
#: The most bytes one inflate step hands on (bounds memory on highly compressible members).
STREAM_PIECE_MAX = 4 << 20
#: Items in flight on each queue between the streaming threads (bounds memory, keeps them in step).
_QUEUE_DEPTH = 8
#: A zip local file header (APPNOTE 4.3.7): signature, 22 bytes not needed here, name length, extra field
#: length; the member's data follows the name and the extra field.
_ZIP_LOCAL_HEADER = struct.Struct("<4s22xHH")
_ZIP_ENCRYPTED = 0x1
_END = object()  # end of a queue's items


class MemberSink(Protocol):
    """Receives one member of a source from :func:`stream_member`, in order."""

    def open(self, size: int, location: str) -> None:
        """Called once, before the first chunk: the member's size in bytes and where it was found."""

    def write(self, chunk: bytes | memoryview) -> None:
        """The member's next bytes (only valid during the call)."""


@dataclass(frozen=True)
class StreamedMember:
    """What :func:`stream_member` read and verified."""

    source: str
    sha256: str | None  # of the fetched file; None for a directory / prefix source
    location: str  # where the member was found (for messages)
    size: int  # bytes of the member (after decompression)


@dataclass(frozen=True)
class _MemberSpan:
    """Where a member's bytes lie in the fetched file and how they are stored there."""

    name: str  # the member's basename
    location: str
    start: int  # file offset of its (compressed) data
    stored_size: int  # bytes of (compressed) data in the file
    size: int  # bytes after decompression
    deflated: bool  # raw deflate (zip method 8); else stored as is
    crc32: int | None  # the zip directory's CRC-32 of the member, checked after reading
    whole_file: bool  # the member is the whole file: its sha256 is the file's


def _zip_span(origin: _Origin, wanted: str | None) -> _MemberSpan | None:
    """The span of member ``wanted`` in a zip; None when it is not stored or deflated (encrypted,
    bzip2 / lzma, a ``.gz`` inside): such members are read whole by ``zipfile`` instead."""
    with zipfile.ZipFile(origin.path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
    member, gz = _choose_member([n for n, i in infos.items() if not i.is_dir()], wanted, origin.what)
    info = infos[member]
    if gz or info.flag_bits & _ZIP_ENCRYPTED or info.compress_type not in (zipfile.ZIP_STORED, zipfile.ZIP_DEFLATED):
        return None
    with open(origin.path, "rb") as f:
        f.seek(info.header_offset)
        header = f.read(_ZIP_LOCAL_HEADER.size)
    if len(header) != _ZIP_LOCAL_HEADER.size or not header.startswith(zipfile.stringFileHeader):
        raise zipfile.BadZipFile(f"bad local file header for member {member!r}")
    _, name_length, extra_length = _ZIP_LOCAL_HEADER.unpack(header)
    return _MemberSpan(
        name=posixpath.basename(member),
        location=f"{origin.what}:{member}",
        start=info.header_offset + _ZIP_LOCAL_HEADER.size + name_length + extra_length,
        stored_size=info.compress_size,
        size=info.file_size,
        deflated=info.compress_type == zipfile.ZIP_DEFLATED,
        crc32=info.CRC,
        whole_file=False,
    )


def _plain_span(origin: _Origin, wanted: str | None) -> _MemberSpan:
    """A plain file is its own one member."""
    _check_single_file_name(origin, "plain", wanted)
    size = origin.path.stat().st_size
    return _MemberSpan(name=_single_file_name(origin), location=origin.what, start=0, stored_size=size, size=size,
                       deflated=False, crc32=None, whole_file=True)


class _Cancelled(Exception):
    """The main thread gave up on the stream (an error or an interrupt): a worker thread just ends."""


def _put(items: queue.Queue, item: object, stop: threading.Event) -> None:
    while not stop.is_set():
        try:
            items.put(item, timeout=0.1)
            return
        except queue.Full:
            pass
    raise _Cancelled


def _get(items: queue.Queue, stop: threading.Event) -> Any:
    while not stop.is_set():
        try:
            return items.get(timeout=0.1)
        except queue.Empty:
            pass
    raise _Cancelled


def _inflate(decoder: Any, data: bytes | memoryview) -> Iterator[bytes]:
    """Inflate ``data`` in pieces of at most :data:`STREAM_PIECE_MAX` bytes."""
    while True:
        piece = decoder.decompress(data, STREAM_PIECE_MAX)
        if piece:
            yield piece
        data = decoder.unconsumed_tail
        # A piece shorter than the cap with no input left: zlib has nothing more to give for now.
        if decoder.eof or (not data and len(piece) < STREAM_PIECE_MAX):
            return


class _Digests:
    """The integrity digests of one stream, updated on the digest thread."""

    def __init__(self, *, archive: bool, member_crc: bool, member_sha: bool) -> None:
        self.archive = hashlib.sha256() if archive else None  # the whole fetched file
        self.member_sha = hashlib.sha256() if member_sha else None
        self.member_crc: int | None = 0 if member_crc else None
        self.error: BaseException | None = None

    @property
    def wants_member(self) -> bool:
        return self.member_sha is not None or self.member_crc is not None


_ARCHIVE, _MEMBER = "archive", "member"


def _digest_items(items: queue.Queue, digests: _Digests, stop: threading.Event) -> None:
    """Digest thread: feed (what, bytes) items to the digests until the end marker."""
    try:
        while (item := _get(items, stop)) is not _END:
            what, data = item
            if what == _ARCHIVE:
                assert digests.archive is not None
                digests.archive.update(data)
                continue
            if digests.member_crc is not None:
                digests.member_crc = zlib.crc32(data, digests.member_crc)
            if digests.member_sha is not None:
                digests.member_sha.update(data)
    except _Cancelled:
        pass
    except BaseException as err:  # pragma: no cover - hashlib / zlib do not fail on bytes
        digests.error = err
        stop.set()


def _read_span(path: Path, span: _MemberSpan, digests: _Digests, pieces: queue.Queue, to_digest: queue.Queue,
               stop: threading.Event) -> None:
    """Reader thread: one sequential pass over the file - every block to the archive digest (when it
    is hashed), the member's part inflated into pieces for the digests and for the main thread.
    Ends with the end marker on both queues, or an exception on ``pieces``."""
    try:
        decoder = zlib.decompressobj(-zlib.MAX_WBITS) if span.deflated else None
        span_end = span.start + span.stored_size
        first, last = (0, path.stat().st_size) if digests.archive is not None else (span.start, span_end)
        produced = 0
        with open(path, "rb", buffering=0) as f:
            f.seek(first)
            pos = first
            while pos < last:
                block = f.read(min(STREAM_READ, last - pos))
                if not block:
                    raise EOFError(f"{path} ended at byte {pos:,}, expected {last:,} bytes")
                if digests.archive is not None:
                    _put(to_digest, (_ARCHIVE, block), stop)
                lo, hi = max(pos, span.start), min(pos + len(block), span_end)
                if lo < hi:
                    data = memoryview(block)[lo - pos : hi - pos]
                    for piece in _inflate(decoder, data) if decoder is not None else (data,):
                        produced += len(piece)
                        if produced > span.size:
                            raise zipfile.BadZipFile(
                                f"member {span.name!r} holds more than the {span.size:,} bytes its directory entry says"
                            )
                        if digests.wants_member:
                            _put(to_digest, (_MEMBER, piece), stop)
                        _put(pieces, piece, stop)
                pos += len(block)
        if decoder is not None and not decoder.eof:
            raise EOFError("Compressed file ended before the end-of-stream marker was reached")
        if produced != span.size:
            raise EOFError(f"member {span.name!r} holds {produced:,} bytes, its directory entry says {span.size:,}")
        _put(to_digest, _END, stop)
        _put(pieces, _END, stop)
    except _Cancelled:
        pass
    except BaseException as err:
        try:
            _put(pieces, err, stop)
        except _Cancelled:
            pass


def _run_stream(path: Path, span: _MemberSpan, digests: _Digests, sink: MemberSink, progress: bool) -> None:
    """Stream ``span`` of ``path`` into ``sink``: the reader and digest threads run alongside the sink
    (this thread); the first error anywhere stops all three and is raised here."""
    stop = threading.Event()
    pieces: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    to_digest: queue.Queue = queue.Queue(_QUEUE_DEPTH)
    workers = [
        threading.Thread(target=_digest_items, args=(to_digest, digests, stop), name="stream-digest", daemon=True),
        threading.Thread(target=_read_span, args=(path, span, digests, pieces, to_digest, stop), name="stream-read",
                         daemon=True),
    ]
    for worker in workers:
        worker.start()
    try:
        with _bar(span.size, f"read {span.name}", progress) as bar:
            while (piece := _get(pieces, stop)) is not _END:
                if isinstance(piece, BaseException):
                    raise piece
                sink.write(piece)
                bar.update(len(piece))
    except BaseException as err:
        stop.set()
        if not isinstance(err, _Cancelled):  # _Cancelled: the digest thread failed, its error is raised below
            raise
    finally:
        for worker in workers:
            worker.join()
    if digests.error is not None:  # pragma: no cover - see _digest_items
        raise digests.error


def _feed_whole(fetched: FetchedSource, wanted: str | None, sink: MemberSink) -> StreamedMember:
    """Hand a member that was read whole to ``sink`` (sources :func:`stream_member` cannot stream)."""
    key = wanted if wanted is not None else ""
    data, where = fetched.members[key], fetched.locations[key]
    sink.open(len(data), where)
    view = memoryview(data)
    for at in range(0, len(data), STREAM_PIECE_MAX):
        sink.write(view[at : at + STREAM_PIECE_MAX])
    return StreamedMember(source=fetched.source, sha256=fetched.sha256, location=where, size=len(data))


def _raise_root_cause(origin: _Origin, facts: FileFacts | None, digest: str | None, err: Exception) -> NoReturn:
    """Raise why reading the fetched file failed: an archive checksum mismatch when there is one (a
    damaged download explains any later error), else ``err`` - as a :class:`DataError` when the
    archive / decompression code rejected the file."""
    if digest is None and facts is not None and facts.sha256 is not None:
        try:
            _check_sha(origin.what, sha256_file(origin.path), facts, origin.fix)
        except DataError as mismatch:
            raise mismatch from err
    if isinstance(err, _CORRUPT_ERRORS):
        raise _corrupt(origin, SourceFacts(archive=facts), err) from err
    raise err


def stream_member(
    source: str,
    wanted: str | None,
    sink: MemberSink,
    *,
    cache_dir: str | os.PathLike[str],
    facts: SourceFacts | None = None,
    progress: bool = True,
) -> StreamedMember:
    """Fetch ``source`` and hand member ``wanted`` (``None``: the single file it holds) to ``sink``,
    verified like :func:`fetch_source` - archive size and sha256, member size and sha256 (or, when no
    sha256 of the member is known, the zip's CRC-32 of it).

    A zip member stored or deflated, or a plain file, is streamed: one sequential read of the file
    whose blocks go to the archive's sha256 (on a digest thread) and, inflated, to the member's
    CRC-32 / sha256 (same thread) and to ``sink`` (this thread). Each file is hashed once: a local
    file while it is streamed, a download while it is downloaded (a cached one before it is used).
    Other layouts (tar, gzip, directories, other zip methods) are read whole, then handed over.

    ``sink`` sees the data before the checks that need all of it (checksums, CRC) are done: when
    this raises, whatever it wrote must be discarded. A checksum mismatch of the archive is reported
    in preference to any error it may have caused (a corrupt member, a wrong size). Raises
    :class:`DataError` like :func:`fetch_source`.
    """
    cache = Path(cache_dir)
    if _is_directory(source):
        fetched = fetch_source(source, [wanted], cache_dir=cache, facts=facts, progress=progress)
        return _feed_whole(fetched, wanted, sink)
    archive_facts = facts.archive if facts else None
    origin, digest = _fetch_file(source, cache, archive_facts, progress, hash_local=False)
    key = wanted if wanted is not None else ""
    member_facts = _member_facts(key, facts)
    try:
        kind = _sniff(origin.path)
        span = _zip_span(origin, wanted) if kind == "zip" else _plain_span(origin, wanted) if kind == "plain" else None
        if span is None:
            if digest is None:
                digest = sha256_file(origin.path, progress=progress)
                _check_sha(origin.what, digest, archive_facts, origin.fix)
            got = _read_members(origin, kind, [wanted], facts, progress)
            return _feed_whole(_verified(source, digest, got, facts, origin.fix), wanted, sink)
        _check_member_size(key, span.size, facts, span.location, origin.fix)
        member_sha_checked = member_facts is not None and member_facts.sha256 is not None
        digests = _Digests(
            archive=digest is None,
            # The zip's CRC-32 only when no sha256 of the member is checked: that checks the same bytes, better.
            member_crc=span.crc32 is not None and not member_sha_checked,
            member_sha=member_sha_checked and not span.whole_file,  # a whole file's sha256 is the archive's
        )
        sink.open(span.size, span.location)
        _run_stream(origin.path, span, digests, sink, progress)
    except Exception as err:
        _raise_root_cause(origin, archive_facts, digest, err)
    if digests.archive is not None:
        digest = digests.archive.hexdigest()
        _check_sha(origin.what, digest, archive_facts, origin.fix)
    assert digest is not None
    if digests.member_crc is not None and digests.member_crc != span.crc32:
        raise _corrupt(origin, facts, zipfile.BadZipFile(f"Bad CRC-32 for file {span.name!r}"))
    file_digest = digest
    _check_member_sha(
        key,
        lambda: file_digest if span.whole_file else digests.member_sha.hexdigest(),  # type: ignore[union-attr]
        facts, span.location, origin.fix,
    )
    return StreamedMember(source=source, sha256=digest, location=span.location, size=span.size)
