"""A prepared dataset in object storage: publish a verified folder, check it in place, fetch it back.

When the stages run in different containers (Kubernetes), the ``prepare`` stage publishes the
tokenised folder to a shared store (``cluster.dataset_url``, e.g. ``s3://bucket/datasets/enwik8``)
and every ``train`` / ``evaluate`` pod fetches it into its own local folder before use.

Store layout: the files of a prepared folder (see :mod:`pipeline.data.prepare`) under one fsspec
URL. ``manifest.json`` is the commit marker: it is uploaded last, and deleted first when a dataset
is published again, so a store with a manifest always holds the files that manifest describes.
Whatever is read from the store is checked against the sha256 recorded in its manifest.

Endpoint, credentials and options come from the environment (``AWS_ENDPOINT_URL``,
``AWS_ACCESS_KEY_ID``, ...) or ``storage_options``, never from code.
"""

from __future__ import annotations

import hashlib
import logging
import os
import shutil
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

from pipeline.data.prepare import (
    MANIFEST_NAME,
    VOCAB_NAME,
    DatasetManifest,
    _move_into_place,
    parse_manifest,
    verify_prepared,
)
from pipeline.data.sources import CHUNK, DataError

__all__ = ["ensure_bucket", "fetch_dataset", "publish_dataset", "read_stored_manifest", "verify_stored"]

log = logging.getLogger(__name__)

T = TypeVar("T")

_REPUBLISH_HINT = "publish it again with `python -m pipeline prepare --config ... --force`"


def _open_store(url: str, storage_options: dict[str, Any] | None) -> tuple[Any, str]:
    import fsspec

    try:
        return fsspec.core.url_to_fs(url, **(storage_options or {}))
    except ImportError as err:
        raise DataError(f"cannot open dataset store {url}: its filesystem needs an extra package ({err})") from err
    except Exception as err:
        raise DataError(f"cannot open dataset store {url}: {type(err).__name__}: {err}; check cluster.dataset_url") from err


def _attempt(fn: Callable[[], T], what: str, url: str, attempts: int) -> T:
    """``fn()`` retried with backoff (flaky storage); a final failure becomes a :class:`DataError`."""
    from pipeline.checkpoint.storage import RetryPolicy, retry_call

    try:
        return retry_call(fn, what, RetryPolicy(attempts=attempts, base_delay=1.0, max_delay=15.0))
    except DataError:
        raise
    except Exception as err:
        raise DataError(
            f"{what} failed ({type(err).__name__}: {err}); check that the store {url} is reachable and that the "
            "credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL) are set"
        ) from err


def _file_names(manifest: DatasetManifest) -> list[str]:
    return [info.file for info in manifest.files()] + [VOCAB_NAME]


def read_stored_manifest(
    url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 3
) -> DatasetManifest | None:
    """The manifest of the dataset published at ``url``, or None when nothing is published there."""
    fs, root = _open_store(url, storage_options)
    path = f"{root.rstrip('/')}/{MANIFEST_NAME}"

    def read() -> bytes | None:
        try:
            return fs.cat_file(path)
        except FileNotFoundError:
            return None

    raw = _attempt(read, f"reading {url}/{MANIFEST_NAME}", url, attempts)
    if raw is None:
        return None
    return parse_manifest(raw, f"{url}/{MANIFEST_NAME}", _REPUBLISH_HINT)


def verify_stored(url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 3) -> DatasetManifest | None:
    """The stored manifest if every split at ``url`` matches its sha256 (streamed, nothing is kept
    locally) and the vocabulary file exists; None when nothing is published; :class:`DataError` when
    the store is damaged."""
    manifest = read_stored_manifest(url, storage_options, attempts=attempts)
    if manifest is None:
        return None
    fs, root = _open_store(url, storage_options)
    for info in manifest.files():
        path = f"{root.rstrip('/')}/{info.file}"

        def digest(path: str = path) -> str | None:
            h = hashlib.sha256()
            try:
                with fs.open(path, "rb") as f:
                    while chunk := f.read(CHUNK):
                        h.update(chunk)
            except FileNotFoundError:
                return None
            return h.hexdigest()

        actual = _attempt(digest, f"checking {url}/{info.file}", url, attempts)
        if actual != info.sha256:
            found = "is missing" if actual is None else f"has sha256 {actual}, the manifest says {info.sha256}"
            raise DataError(f"the dataset at {url} is damaged: {info.file} {found}; {_REPUBLISH_HINT}")
    if not _attempt(lambda: fs.exists(f"{root.rstrip('/')}/{VOCAB_NAME}"), f"checking {url}/{VOCAB_NAME}", url, attempts):
        raise DataError(f"the dataset at {url} is damaged: {VOCAB_NAME} is missing; {_REPUBLISH_HINT}")
    return manifest


def _ensure_bucket(fs: Any, root: str) -> None:
    protocols = fs.protocol if isinstance(fs.protocol, (tuple, list)) else (fs.protocol,)
    if "s3" in protocols:  # other filesystems have no buckets
        bucket = root.split("/", 1)[0]
        if not fs.exists(bucket):
            fs.mkdir(bucket)


def ensure_bucket(url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 5) -> None:
    """Create the bucket of an ``s3://`` URL if it does not exist (a fresh MinIO has none)."""
    fs, root = _open_store(url, storage_options)
    _attempt(lambda: _ensure_bucket(fs, root), f"creating the bucket of {url}", url, attempts)


def publish_dataset(
    local_dir: str | os.PathLike[str], url: str, storage_options: dict[str, Any] | None = None, *, attempts: int = 5
) -> DatasetManifest:
    """Upload the prepared folder ``local_dir`` (verified first) to ``url``; manifest last."""
    manifest = verify_prepared(local_dir)
    fs, root = _open_store(url, storage_options)
    root = root.rstrip("/")
    ensure_bucket(url, storage_options, attempts=attempts)

    def drop_manifest() -> None:
        # Un-commit first: while files are replaced, readers see "not published", never a mix.
        if fs.exists(f"{root}/{MANIFEST_NAME}"):
            fs.rm_file(f"{root}/{MANIFEST_NAME}")

    _attempt(drop_manifest, f"removing the old manifest at {url}", url, attempts)
    for name in _file_names(manifest) + [MANIFEST_NAME]:
        source = str(Path(local_dir) / name)
        _attempt(lambda s=source, n=name: fs.put_file(s, f"{root}/{n}"), f"uploading {name} to {url}", url, attempts)
    log.info("dataset %s published to %s", manifest.name, url)
    return manifest


def fetch_dataset(
    url: str, local_dir: str | os.PathLike[str], storage_options: dict[str, Any] | None = None, *, attempts: int = 5
) -> DatasetManifest:
    """Download the dataset published at ``url`` into ``local_dir`` and verify it there.

    The files land in a hidden sibling folder that replaces ``local_dir`` only after every sha256
    matched, so a failed or damaged download leaves ``local_dir`` as it was.
    """
    manifest = read_stored_manifest(url, storage_options, attempts=attempts)
    if manifest is None:
        raise DataError(
            f"no dataset is published at {url} (no {MANIFEST_NAME}); run the prepare stage with this "
            "cluster.dataset_url first (`python -m pipeline prepare --config ...`)"
        )
    fs, root = _open_store(url, storage_options)
    root = root.rstrip("/")
    out = Path(local_dir).expanduser().absolute()
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.fetch-", dir=out.parent))
    try:
        for name in _file_names(manifest) + [MANIFEST_NAME]:
            _attempt(lambda n=name: fs.get_file(f"{root}/{n}", str(tmp / n)), f"downloading {url}/{name}", url, attempts)
        try:
            fetched = verify_prepared(tmp)
        except DataError as err:
            raise DataError(f"the dataset downloaded from {url} does not verify ({err}); {_REPUBLISH_HINT}") from None
        if fetched != manifest:
            raise DataError(f"the dataset at {url} changed while it was downloaded; fetch it again")
        _move_into_place(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    log.info("dataset %s fetched from %s into %s", manifest.name, url, out)
    return manifest
