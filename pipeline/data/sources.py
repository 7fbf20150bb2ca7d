"""Fetching and verifying raw corpora.

A *source* is an fsspec URL (``https://``, ``file://``, ``s3://``, ``memory://`` ...) or a local
path. It may name

* a single file: a zip or tar archive (``.tgz`` / ``.tar.gz`` / ``.tar``), a gzipped file or a
  plain file (the kind is sniffed from the first bytes, the name is only a hint), or
* a directory, or a URL prefix ending in ``/``, holding the member files side by side.

Members are looked up **by basename** (``ptb.train.txt`` is found at ``ptb/ptb.train.txt`` in
``ptb.zip``, at ``simple-examples/data/ptb.train.txt`` in ``simple-examples.tgz`` or directly in a
directory), and each member may also be stored gzipped as ``<name>.gz``.

Local sources (plain paths and ``file://``) are read in place. Everything else is downloaded into
``cache_dir`` under a temporary name and renamed into place only once the download is complete
and has passed the size / sha256 check; a cached file that verifies is reused without
re-downloading.

Verification uses :class:`SourceFacts`: the expected size / sha256 of the fetched file itself
(``archive``) and of each member after decompression (``members``, keyed by basename). Any fact
left ``None`` is not checked.

Two ways to read members: :func:`fetch_source` returns them whole (line corpora, a few MB);
:func:`pipeline.data.streaming.stream_member` hands one member to a sink chunk by chunk in a single pass
over the archive (the single-stream corpora, 10^8 bytes).
"""

from __future__ import annotations

import gzip
import hashlib
import logging
import os
import posixpath
import tarfile
import uuid
import zipfile
import zlib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from tqdm.auto import tqdm

from pipeline.errors import PipelineError

__all__ = [
    "DataError",
    "FileFacts",
    "SourceFacts",
    "FetchedSource",
    "fetch_source",
    "sha256_file",
    "sha256_bytes",
    "normalize_source",
    "is_local_source",
]

log = logging.getLogger(__name__)

CHUNK = 1 << 20
#: Reads / downloads at least this large get a progress bar (when progress is on).
PROGRESS_MIN_BYTES = 8 << 20

_CORRUPT_ERRORS: tuple[type[BaseException], ...] = (
    zipfile.BadZipFile,
    zipfile.LargeZipFile,
    tarfile.TarError,
    EOFError,
    zlib.error,
    gzip.BadGzipFile,
    NotImplementedError,  # zipfile: unsupported compression method
)
try:  # pragma: no cover - depends on the Python build
    import lzma as _lzma
    import bz2 as _bz2  # noqa: F401

    _CORRUPT_ERRORS = _CORRUPT_ERRORS + (_lzma.LZMAError,)
except ImportError:  # pragma: no cover
    pass


class DataError(PipelineError):
    """A data-stage failure; the message names the problem and how to fix it."""


@dataclass(frozen=True)
class FileFacts:
    """Expected facts about one file; ``None`` means "not checked"."""

    size: int | None = None
    sha256: str | None = None


@dataclass(frozen=True)
class SourceFacts:
    """What a source must look like to be accepted.

    ``archive``: facts about the fetched file itself (only for single-file sources).
    ``members``: facts about each member *after decompression*, keyed by member basename
    (e.g. ``"enwik8"``, ``"ptb.char.train.txt"`` - also applied when it is stored as ``.gz``).
    """

    archive: FileFacts | None = None
    members: Mapping[str, FileFacts] = field(default_factory=dict)


# --------------------------------------------------------------------------------------------
# small helpers


def sha256_bytes(data: bytes | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], *, progress: bool = False, desc: str | None = None) -> str:
    path = Path(path)
    h = hashlib.sha256()
    size = path.stat().st_size
    with open(path, "rb") as f, _bar(size, desc or f"sha256 {path.name}", progress) as bar:
        while chunk := f.read(CHUNK):
            h.update(chunk)
            bar.update(len(chunk))
    return h.hexdigest()


def _bar(total: int | None, desc: str, progress: bool) -> tqdm:
    disable = (not progress) or (total is not None and total < PROGRESS_MIN_BYTES)
    return tqdm(total=total, desc=desc, unit="B", unit_scale=True, unit_divisor=1024, disable=disable, leave=False)


def _protocol(source: str) -> str | None:
    if "://" in source:
        return source.split("://", 1)[0].lower()
    return None


def is_local_source(source: str) -> bool:
    return _protocol(source) in (None, "file", "local")


def normalize_source(source: str | os.PathLike[str]) -> str:
    """The canonical spelling of a source: local paths become absolute, URLs stay as given."""
    s = os.fspath(source)
    if _protocol(s) is None:
        return os.path.abspath(os.path.expanduser(s))
    return s


def _local_path(source: str) -> Path:
    proto = _protocol(source)
    if proto is None:
        return Path(source)
    return Path(source.split("://", 1)[1])


def _basename(url: str) -> str:
    path = url.split("://", 1)[-1].split("?", 1)[0].split("#", 1)[0]
    return posixpath.basename(path.rstrip("/"))


def _join(prefix: str, name: str) -> str:
    if _protocol(prefix) is None:
        return os.path.join(prefix, name)
    return prefix.rstrip("/") + "/" + name


def _url_to_fs(url: str) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url)
    except ImportError as err:
        raise DataError(
            f"cannot open {url}: the filesystem for '{_protocol(url)}://' needs an extra package ({err}); "
            "install it (e.g. `pip install s3fs` for s3://) or download the file and pass its local path"
        ) from err
    except Exception as err:  # unknown protocol, malformed URL
        raise DataError(f"cannot open source {url}: {type(err).__name__}: {err}; check the URL") from err


def _unreachable(url: str, err: BaseException) -> DataError:
    if isinstance(err, FileNotFoundError):
        return DataError(f"source not found: {url} does not exist; check the URL / path")
    return DataError(
        f"cannot reach source {url}: {type(err).__name__}: {err}; check the URL and your network, "
        "or download the file yourself and pass its local path"
    )


def _fmt(n: int) -> str:
    return f"{n:,}"


# --------------------------------------------------------------------------------------------
# verification


@dataclass
class _Origin:
    """Where a fetched file lives, for error messages."""

    url: str  # what the user asked for
    path: Path  # the local file we read
    cached: bool  # True: a download in the cache (the fix is to delete it)

    @property
    def fix(self) -> str:
        if self.cached:
            return f"delete {self.path} and retry"
        return f"replace {self.path} with an intact copy and retry"

    @property
    def what(self) -> str:
        return str(self.path) if not self.cached else f"{self.path} (downloaded from {self.url})"


def _check_size(what: str, actual: int, facts: FileFacts | None, fix: str) -> None:
    if facts is not None and facts.size is not None and actual != facts.size:
        raise DataError(
            f"{what} is corrupt or truncated (expected {_fmt(facts.size)} bytes, got {_fmt(actual)}); {fix}"
        )


def _check_sha(what: str, actual: str, facts: FileFacts | None, fix: str) -> None:
    if facts is not None and facts.sha256 is not None and actual.lower() != facts.sha256.lower():
        raise DataError(
            f"checksum mismatch for {what}: expected sha256 {facts.sha256.lower()}, got {actual}; {fix} "
            "(or pass verify_source=False if you deliberately use a different file)"
        )


def _file_verifies(path: Path, facts: FileFacts | None, progress: bool) -> tuple[bool, str]:
    """(ok, sha256) for a local file against ``facts``."""
    size = path.stat().st_size
    if facts is not None and facts.size is not None and size != facts.size:
        return False, ""
    digest = sha256_file(path, progress=progress)
    if facts is not None and facts.sha256 is not None and digest != facts.sha256.lower():
        return False, digest
    return True, digest


# --------------------------------------------------------------------------------------------
# fetching single files


def _remote_size(fs: Any, path: str) -> int | None:
    try:
        size = fs.size(path)
    except Exception:
        return None
    return int(size) if size is not None else None


def _cache_path(url: str, cache_dir: Path) -> Path:
    tag = hashlib.sha1(url.encode()).hexdigest()[:10]
    return cache_dir / f"{tag}-{_basename(url) or 'download'}"


def _download(url: str, dest: Path, facts: FileFacts | None, progress: bool) -> str:
    """Download ``url`` to ``dest`` atomically, checking ``facts``; returns the sha256."""
    fs, path = _url_to_fs(url)
    total = _remote_size(fs, path)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = dest.with_name(f".{dest.name}.part-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    h = hashlib.sha256()
    size = 0
    try:
        try:
            with fs.open(path, "rb") as src, open(tmp, "wb") as out, _bar(
                total, f"download {_basename(url)}", progress and (total is None or total >= PROGRESS_MIN_BYTES)
            ) as bar:
                while chunk := src.read(CHUNK):
                    out.write(chunk)
                    h.update(chunk)
                    size += len(chunk)
                    bar.update(len(chunk))
        except DataError:
            raise
        except Exception as err:
            raise _unreachable(url, err) from err
        digest = h.hexdigest()
        fix = "retry the download (the bad copy was discarded)"
        if facts is not None and facts.size is not None and size != facts.size:
            raise DataError(
                f"download of {url} is corrupt or truncated (expected {_fmt(facts.size)} bytes, got {_fmt(size)}); {fix}"
            )
        if total is not None and size != total:
            raise DataError(
                f"download of {url} is corrupt or truncated (expected {_fmt(total)} bytes, got {_fmt(size)}); {fix}"
            )
        _check_sha(f"the download of {url}", digest, facts, fix)
        os.replace(tmp, dest)
        log.info("downloaded %s (%s bytes) to %s", url, _fmt(size), dest)
        return digest
    finally:
        if tmp.exists():
            tmp.unlink()


def _fetch_file(url: str, cache_dir: Path, facts: FileFacts | None, progress: bool, *,
                hash_local: bool = True) -> tuple[_Origin, str | None]:
    """Make ``url`` available as a verified local file; returns (origin, sha256 of the file).

    ``hash_local=False``: a local file is only size-checked and its sha256 is None - the caller
    hashes it while reading it (:func:`stream_member`) and must check it against ``facts`` before
    trusting anything read. Downloads are always hashed here (while downloading).
    """
    if is_local_source(url):
        path = _local_path(url)
        if not path.is_file():
            if path.exists():
                raise DataError(f"source {url} is not a regular file")
            raise DataError(f"source not found: {url} does not exist; check the path")
        origin = _Origin(url, path, cached=False)
        _check_size(origin.what, path.stat().st_size, facts, origin.fix)
        if not hash_local:
            return origin, None
        digest = sha256_file(path, progress=progress)
        _check_sha(origin.what, digest, facts, origin.fix)
        return origin, digest

    dest = _cache_path(url, cache_dir)
    origin = _Origin(url, dest, cached=True)
    if dest.is_file():
        has_facts = facts is not None and (facts.size is not None or facts.sha256 is not None)
        ok, digest = _file_verifies(dest, facts, progress)
        if ok and not has_facts:
            # Nothing to check against but the remote size; an unreachable remote keeps the cache usable.
            fs, path = _url_to_fs(url)
            remote = _remote_size(fs, path)
            ok = remote is None or remote == dest.stat().st_size
        if ok:
            log.info("using cached %s (verified) for %s", dest, url)
            return origin, digest
        log.warning("cached %s does not verify; downloading %s again", dest, url)
    digest = _download(url, dest, facts, progress)
    return origin, digest


# --------------------------------------------------------------------------------------------
# containers


def _sniff(path: Path) -> str:
    """'zip', 'tar', 'gzip' (a single gzipped file) or 'plain'."""
    name = path.name.lower()
    with open(path, "rb") as f:
        head = f.read(512)
    tar_name = name.endswith((".tar", ".tgz", ".tar.gz", ".tbz2", ".tar.bz2", ".txz", ".tar.xz"))
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")) or name.endswith(".zip"):
        return "zip"
    if tar_name:
        return "tar"
    if head.startswith(b"\x1f\x8b"):
        try:
            with gzip.open(path, "rb") as g:
                inner = g.read(512)
        except _CORRUPT_ERRORS + (OSError,):
            return "gzip"  # reading it will report the corruption
        return "tar" if inner[257:262] == b"ustar" else "gzip"
    if head[257:262] == b"ustar":
        return "tar"
    return "plain"


def _read_all(f: IO[bytes], total: int | None, desc: str, progress: bool) -> bytes:
    parts: list[bytes] = []
    with _bar(total, desc, progress) as bar:
        while chunk := f.read(CHUNK):
            parts.append(chunk)
            bar.update(len(chunk))
    return b"".join(parts)


def _gunzip(data: bytes, desc: str, progress: bool) -> bytes:
    import io

    with gzip.GzipFile(fileobj=io.BytesIO(data), mode="rb") as g:
        return _read_all(g, None, desc, progress and len(data) >= PROGRESS_MIN_BYTES // 4)


@dataclass
class FetchedSource:
    """Raw member contents of a source, decompressed and verified."""

    source: str
    sha256: str | None  # of the fetched file; None for directory / prefix sources
    members: dict[str, bytes]  # requested basename -> content
    locations: dict[str, str]  # requested basename -> where it was found (for messages)


def _pick(names: list[str], wanted: str) -> tuple[str, bool] | None:
    """The entry of ``names`` whose basename is ``wanted`` (preferred) or ``wanted.gz``."""
    for candidate, gz in ((wanted, False), (wanted + ".gz", True)):
        hits = [n for n in names if posixpath.basename(n.rstrip("/")) == candidate and not n.endswith("/")]
        if hits:
            hits.sort(key=lambda n: (n.count("/"), n))
            if len(hits) > 1:
                log.warning("several members named %s (%s); using %s", candidate, ", ".join(hits), hits[0])
            return hits[0], gz
    return None


def _not_found(wanted: str, where: str, names: list[str]) -> DataError:
    shown = ", ".join(sorted(names)[:40]) + (" ..." if len(names) > 40 else "")
    return DataError(
        f"wrong layout: member '{wanted}' (or '{wanted}.gz') not found in {where}; it holds: {shown or '(nothing)'}; "
        "point the source at the canonical archive / directory for this dataset"
    )


def _member_facts(name: str, facts: SourceFacts | None) -> FileFacts | None:
    return facts.members.get(name) if facts is not None else None


def _check_member_size(name: str, size: int, facts: SourceFacts | None, where: str, fix: str) -> None:
    mf = _member_facts(name, facts)
    if mf is not None and mf.size is not None and size != mf.size:
        raise DataError(
            f"member '{name}' of {where} has the wrong size (expected {_fmt(mf.size)} bytes, got {_fmt(size)}): "
            f"the source is corrupt, truncated or not the canonical file; {fix} "
            "(or pass verify_source=False if you deliberately use a different file)"
        )


def _check_member_sha(name: str, digest: Callable[[], str], facts: SourceFacts | None, where: str, fix: str) -> None:
    """Check the member's sha256 (``digest()``, only called when the facts hold one)."""
    mf = _member_facts(name, facts)
    if mf is not None and mf.sha256 is not None:
        _check_sha(f"member '{name}' of {where}", digest(), mf, fix)


def _verify_member(name: str, data: bytes, facts: SourceFacts | None, where: str, fix: str) -> None:
    _check_member_size(name, len(data), facts, where, fix)
    _check_member_sha(name, lambda: sha256_bytes(data), facts, where, fix)


def _choose_member(names: list[str], wanted: str | None, where: str) -> tuple[str, bool]:
    """The archive member for ``wanted`` (None: the archive's only file) and whether it is gzipped."""
    if wanted is None:
        if len(names) != 1:
            raise DataError(f"{where} must hold exactly one file for this dataset, it holds: {', '.join(names)}")
        return names[0], names[0].endswith(".gz")
    hit = _pick(names, wanted)
    if hit is None:
        raise _not_found(wanted, where, names)
    return hit


def _read_zip(origin: _Origin, wanted: list[str | None], progress: bool) -> dict[str | None, tuple[bytes, str]]:
    out: dict[str | None, tuple[bytes, str]] = {}
    with zipfile.ZipFile(origin.path) as zf:
        infos = {i.filename: i for i in zf.infolist()}
        names = [n for n, i in infos.items() if not i.is_dir()]
        for w in wanted:
            member, gz = _choose_member(names, w, origin.what)
            info = infos[member]
            with zf.open(info) as f:
                data = _read_all(f, info.file_size, f"unzip {posixpath.basename(member)}", progress)
            if gz:
                data = _gunzip(data, f"gunzip {member}", progress)
            out[w] = (data, f"{origin.what}:{member}")
    return out


def _read_tar(origin: _Origin, wanted: list[str | None], progress: bool) -> dict[str | None, tuple[bytes, str]]:
    out: dict[str | None, tuple[bytes, str]] = {}
    with tarfile.open(origin.path, mode="r:*") as tf:
        members = {m.name: m for m in tf.getmembers() if m.isfile()}
        names = list(members)
        for w in wanted:
            member, gz = _choose_member(names, w, origin.what)
            f = tf.extractfile(members[member])
            assert f is not None
            data = _read_all(f, members[member].size, f"untar {posixpath.basename(member)}", progress)
            if len(data) != members[member].size:
                raise EOFError(f"member {member} is short")
            if gz:
                data = _gunzip(data, f"gunzip {member}", progress)
            out[w] = (data, f"{origin.what}:{member}")
    return out


def _single_file_name(origin: _Origin) -> str:
    return origin.path.name if not origin.cached else _basename(origin.url)


def _check_single_file_name(origin: _Origin, kind: str, wanted: str | None) -> None:
    """A single-file source is member ``wanted`` only if its name (less ``.gz``) says so."""
    name = _single_file_name(origin)
    inner = name[:-3] if kind == "gzip" and name.endswith(".gz") else name
    if wanted is not None and inner != wanted:
        raise _not_found(wanted, f"{origin.what} (a single {'gzipped ' if kind == 'gzip' else ''}file)", [name])


def _read_single(
    origin: _Origin, kind: str, wanted: list[str | None], progress: bool
) -> dict[str | None, tuple[bytes, str]]:
    """A plain or gzipped file: it *is* the one member (matched by its name without ``.gz``)."""
    name = _single_file_name(origin)
    out: dict[str | None, tuple[bytes, str]] = {}
    for w in wanted:
        _check_single_file_name(origin, kind, w)
        if kind == "gzip":
            with gzip.open(origin.path, "rb") as g:
                data = _read_all(g, None, f"gunzip {name}", progress and origin.path.stat().st_size >= PROGRESS_MIN_BYTES // 4)
        else:
            data = origin.path.read_bytes()
        out[w] = (data, origin.what)
    return out


def _is_directory(source: str) -> bool:
    if is_local_source(source):
        return _local_path(source).is_dir()
    if source.endswith("/"):
        return True
    if _protocol(source) in ("http", "https"):
        return False  # an HTTP "isdir" would fetch the whole body; prefixes must end in '/'
    fs, path = _url_to_fs(source)
    try:
        return bool(fs.isdir(path))
    except Exception:
        return False


def _list_dir(source: str) -> list[str]:
    try:
        if is_local_source(source):
            return sorted(p.name for p in _local_path(source).iterdir())
        fs, path = _url_to_fs(source)
        return sorted(posixpath.basename(str(p).rstrip("/")) for p in fs.ls(path, detail=False))
    except Exception:
        return []


def _exists(url: str) -> bool:
    if is_local_source(url):
        return _local_path(url).is_file()
    fs, path = _url_to_fs(url)
    try:
        return bool(fs.exists(path))
    except Exception as err:
        raise _unreachable(url, err) from err


def _read_directory(
    source: str, wanted: list[str | None], cache_dir: Path, facts: SourceFacts | None, progress: bool
) -> dict[str | None, tuple[bytes, str]]:
    out: dict[str | None, tuple[bytes, str]] = {}
    for w in wanted:
        if w is None:
            raise DataError(f"source {source} is a directory; this dataset needs a single text file (optionally .gz)")
        for candidate, gz in ((w, False), (w + ".gz", True)):
            url = _join(source, candidate)
            if _exists(url):
                break
        else:
            raise _not_found(w, f"directory {source}", _list_dir(source))
        file_facts = None if gz or facts is None else facts.members.get(w)
        origin, _ = _fetch_file(url, cache_dir, file_facts, progress)
        try:
            if gz:
                with gzip.open(origin.path, "rb") as g:
                    data = _read_all(g, None, f"gunzip {candidate}", progress)
            else:
                data = origin.path.read_bytes()
        except _CORRUPT_ERRORS as err:
            raise DataError(f"{origin.what} is corrupt or truncated ({type(err).__name__}: {err}); {origin.fix}") from err
        out[w] = (data, origin.what)
    return out


def fetch_source(
    source: str,
    wanted: list[str | None],
    *,
    cache_dir: str | os.PathLike[str],
    facts: SourceFacts | None = None,
    progress: bool = True,
) -> FetchedSource:
    """Fetch ``source`` and return the decompressed, verified contents of the ``wanted`` members.

    ``wanted`` lists member basenames; ``None`` means "the single file the source holds" (used by
    the generic ``text`` dataset). Raises :class:`DataError` for an unreachable source, a missing
    member (listing what is there), a corrupt / truncated archive or a size / checksum mismatch.
    """
    cache = Path(cache_dir)
    if _is_directory(source):
        got = _read_directory(source, wanted, cache, facts, progress)
        digest = None
        fix = f"fix the files in {source}"
    else:
        origin, digest = _fetch_file(source, cache, facts.archive if facts else None, progress)
        fix = origin.fix
        got = _read_members(origin, _sniff(origin.path), wanted, facts, progress)
    return _verified(source, digest, got, facts, fix)


def _verified(source: str, digest: str | None, got: dict[str | None, tuple[bytes, str]],
              facts: SourceFacts | None, fix: str) -> FetchedSource:
    """The members read, each checked against its facts."""
    members: dict[str, bytes] = {}
    locations: dict[str, str] = {}
    for w, (data, where) in got.items():
        key = w if w is not None else ""
        _verify_member(key, data, facts, where, fix)
        members[key] = data
        locations[key] = where
    return FetchedSource(source=source, sha256=digest, members=members, locations=locations)


def _read_members(origin: _Origin, kind: str, wanted: list[str | None], facts: SourceFacts | None,
                  progress: bool) -> dict[str | None, tuple[bytes, str]]:
    """The whole contents of the ``wanted`` members of a fetched (verified) file."""
    try:
        if kind == "zip":
            return _read_zip(origin, wanted, progress)
        if kind == "tar":
            return _read_tar(origin, wanted, progress)
        return _read_single(origin, kind, wanted, progress)
    except DataError:
        raise
    except _CORRUPT_ERRORS as err:
        raise _corrupt(origin, facts, err) from err


def _corrupt(origin: _Origin, facts: SourceFacts | None, err: BaseException) -> DataError:
    """The error for a source the archive / decompression code rejected (``err``)."""
    size = origin.path.stat().st_size
    expected = facts.archive.size if facts and facts.archive and facts.archive.size is not None else None
    sizes = (
        f"expected {_fmt(expected)} bytes, got {_fmt(size)}"
        if expected is not None and expected != size
        else f"{_fmt(size)} bytes; {type(err).__name__}: {err}"
    )
    return DataError(f"{origin.what} is corrupt or truncated ({sizes}); {origin.fix}")
