"""Content digests of checkpoint files and the commit record that holds them.

Every file of a checkpoint is hashed (sha256) *while it is written* (no second read of what may be
gigabytes in object storage) and the digests go into the commit record, the file written last::

    COMMITTED  {"format": 1, "algorithm": "sha256",
                "meta": {"step": 160, "loss": 2.62, "world_size": 2, "engine": "ddp", ...},
                "files": {"__0_0.distcp": {"sha256": "9f2c...", "size": 48213}, ".metadata": {...}, ...}}

On load every listed file is hashed again (sharded over the ranks) and compared before a byte of it
is used; a mismatch, a missing file or a size change names the file and rejects the checkpoint.
"""

from __future__ import annotations

import hashlib
import io
import json
import threading
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, BinaryIO

__all__ = [
    "COMMIT_FORMAT",
    "DigestingStream",
    "FileDigest",
    "DigestLedger",
    "digest_bytes",
    "digest_file",
    "digest_stream",
    "encode_commit_record",
    "decode_commit_record",
    "merge_digests",
    "mismatch",
]

COMMIT_FORMAT = 1
ALGORITHM = "sha256"
_CHUNK = 8 * 1024 * 1024


@dataclass(frozen=True)
class FileDigest:
    """sha256 (hex) and size in bytes of one file."""

    sha256: str
    size: int


def digest_bytes(data: bytes | bytearray | memoryview) -> FileDigest:
    return FileDigest(hashlib.sha256(data).hexdigest(), len(data))


def digest_stream(stream: BinaryIO) -> FileDigest:
    """Hash a readable binary stream from its current position to its end, in 8 MiB chunks."""
    h, size = hashlib.sha256(), 0
    while True:
        chunk = stream.read(_CHUNK)
        if not chunk:
            break
        h.update(chunk)
        size += len(chunk)
    return FileDigest(h.hexdigest(), size)


def digest_file(path: str | Path) -> FileDigest:
    with open(path, "rb") as f:
        return digest_stream(f)


def mismatch(filename: str, expected: FileDigest, found: FileDigest) -> str | None:
    """Why ``found`` is not the recorded ``expected`` digest of ``filename`` (None when they match)."""
    if found.size != expected.size:
        return f"{filename}: size {found.size} bytes, {expected.size} recorded when it was committed"
    if found.sha256 != expected.sha256:
        return (f"{filename}: sha256 {found.sha256[:12]}... differs from {expected.sha256[:12]}... recorded when "
                "it was committed (the file was altered or damaged)")
    return None


class DigestLedger:
    """Thread-safe ``filename -> FileDigest`` of what one rank wrote (DCP may write from several threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._digests: dict[str, FileDigest] = {}

    def record(self, filename: str, digest: FileDigest) -> None:
        with self._lock:
            self._digests[filename] = digest

    def rename(self, old: str, new: str) -> None:
        with self._lock:
            if old in self._digests:
                self._digests[new] = self._digests.pop(old)

    def digests(self) -> dict[str, FileDigest]:
        with self._lock:
            return dict(self._digests)


class DigestingStream(io.RawIOBase):
    """A writable stream that hashes everything written through it into ``ledger`` under ``filename``
    when it is closed (``tell`` and the rest are the wrapped stream's)."""

    def __init__(self, raw: Any, filename: str, ledger: DigestLedger) -> None:
        super().__init__()
        self._raw = raw
        self._filename = filename
        self._ledger = ledger
        self._hash = hashlib.sha256()
        self._size = 0

    def writable(self) -> bool:
        return True

    def write(self, b: Any) -> int:
        view = memoryview(b).cast("B")
        written = self._raw.write(view)
        if written is None:
            written = len(view)
        self._hash.update(view[:written])
        self._size += written
        return written

    def tell(self) -> int:
        return self._raw.tell()

    def flush(self) -> None:
        self._raw.flush()

    def fileno(self) -> int:
        return self._raw.fileno()

    def close(self) -> None:
        if not self.closed:
            self._ledger.record(self._filename, FileDigest(self._hash.hexdigest(), self._size))
        super().close()


def encode_commit_record(meta: Mapping[str, Any], files: Mapping[str, FileDigest]) -> bytes:
    record = {
        "format": COMMIT_FORMAT,
        "algorithm": ALGORITHM,
        "meta": dict(meta),
        "files": {name: asdict(d) for name, d in sorted(files.items())},
    }
    return json.dumps(record, indent=1).encode()


def decode_commit_record(payload: bytes) -> tuple[dict[str, Any], dict[str, FileDigest]] | None:
    """``(meta, files)`` of a commit record; None for an empty one (a checkpoint written before commit
    records held digests). Raises ``ValueError`` naming what is wrong with a damaged record."""
    if not payload.strip():
        return None
    try:
        record = json.loads(payload)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise ValueError(f"the commit record is not valid JSON ({err})") from None
    if not isinstance(record, dict) or record.get("algorithm") != ALGORITHM or not isinstance(record.get("files"), dict):
        raise ValueError("the commit record lacks its sha256 file digests")
    try:
        files = {str(name): FileDigest(str(d["sha256"]), int(d["size"])) for name, d in record["files"].items()}
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"the commit record has a malformed digest ({err})") from None
    meta = record.get("meta") if isinstance(record.get("meta"), dict) else {}
    return meta, files


def merge_digests(parts: Iterable[Mapping[str, FileDigest]]) -> dict[str, FileDigest]:
    """One mapping from every rank's; two ranks never write the same file name."""
    merged: dict[str, FileDigest] = {}
    for part in parts:
        for name, digest in part.items():
            if name in merged and merged[name] != digest:
                raise ValueError(f"two ranks wrote {name} with different contents")
            merged[name] = digest
    return merged
