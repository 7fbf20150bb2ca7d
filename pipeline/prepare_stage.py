"""The ``prepare`` stage: download, verify and tokenise the configured corpus (idempotent), and the
shared dataset store of multi-container runs.

Locally the tokenised arrays live in ``config.data_dir``. With ``cluster.dataset_url`` set (the
Kubernetes pipeline sets it), ``prepare`` also publishes them there - or skips all work when a
matching dataset is already published and verifies - and :func:`ensure_local_dataset` gives every
``train`` / ``evaluate`` container a verified local copy, fetched from the store when needed.
"""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig
from pipeline.data import SAMPLE_TEXT_PATH, DataError, DatasetManifest, load_manifest, prepare_dataset, verify_prepared
from pipeline.data.datasets import GENERATED
from pipeline.data.prepare import MANIFEST_NAME
from pipeline.data.sources import normalize_source
from pipeline.data.store import fetch_dataset, publish_dataset, verify_stored

__all__ = ["ensure_local_dataset", "resolve_source", "run_prepare", "run_prepare_outcome"]

log = logging.getLogger(__name__)


def resolve_source(config: PipelineConfig) -> str:
    """The data source URL; ``sample`` is the WikiText-2 excerpt shipped with the package."""
    return str(SAMPLE_TEXT_PATH) if config.data.source == "sample" else config.data.source


def _check_matches(manifest: DatasetManifest, config: PipelineConfig, where: str, fix: str) -> DatasetManifest:
    """``manifest`` if it holds the configured dataset from the configured source, else a DataError."""
    source = resolve_source(config)
    source = source if source == GENERATED else normalize_source(source)
    if manifest.name != config.data.dataset or manifest.source != source:
        raise DataError(
            f"{where} holds dataset {manifest.name!r} prepared from {manifest.source}, but this config wants "
            f"{config.data.dataset!r} from {source}; {fix}"
        )
    if manifest.vocab_size_cap != config.data.vocab_size_cap:
        raise DataError(
            f"{where} holds dataset {manifest.name!r} prepared with vocab_size_cap {manifest.vocab_size_cap}, but this "
            f"config has data.vocab_size_cap {config.data.vocab_size_cap}; {fix}"
        )
    return manifest


def _published(config: PipelineConfig) -> DatasetManifest | None:
    """The dataset already published at ``cluster.dataset_url`` if it matches and verifies, else None."""
    url = config.cluster.dataset_url
    assert url is not None
    try:
        stored = verify_stored(url, config.checkpoint.storage_options)
    except DataError as err:
        log.warning("%s; preparing and publishing it again", err)
        return None
    if stored is None:
        return None
    fix = "set cluster.dataset_url to another location, or replace it with `prepare --force`"
    return _check_matches(stored, config, f"the dataset store {url}", fix)


def run_prepare(config: PipelineConfig, *, force: bool = False) -> DatasetManifest:
    """Prepare the dataset into ``config.data_dir``; with ``cluster.dataset_url`` also publish it there.

    Skips everything when the store already holds this dataset and every file verifies (unless
    ``force``); a damaged store is rebuilt; a store holding another dataset is a :class:`DataError`.
    """
    url = config.cluster.dataset_url
    if url is not None and not force:
        stored = _published(config)
        if stored is not None:
            log.info("dataset %s already published at %s and verified; nothing to do", stored.name, url)
            return stored
    manifest = prepare_dataset(
        config.data.dataset,
        resolve_source(config),
        config.data_dir,
        cache_dir=config.data.cache_dir,
        force=force,
        verify_source=config.data.verify_source,
        vocab_size_cap=config.data.vocab_size_cap,
    )
    log.info(
        "dataset %s ready in %s: %s", manifest.name, config.data_dir,
        ", ".join(f"{k} {v.num_tokens:,} tokens" for k, v in manifest.splits.items()),
    )
    if url is not None:
        publish_dataset(config.data_dir, url, config.checkpoint.storage_options)
    return manifest


def run_prepare_outcome(config: PipelineConfig, *, force: bool = False) -> tuple[DatasetManifest, bool]:
    """:func:`run_prepare`, and whether it (re)built anything: False when the prepared data was already
    there and verified (then the stage had nothing to do)."""
    manifest_path = config.data_dir / MANIFEST_NAME
    before = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    manifest = run_prepare(config, force=force)
    after = manifest_path.stat().st_mtime_ns if manifest_path.exists() else None
    return manifest, force or (after is not None and before != after)


def ensure_local_dataset(config: PipelineConfig) -> DatasetManifest:
    """A verified local copy of the configured dataset in ``config.data_dir``.

    1. A local copy that verifies (sha256 of every split) and holds this dataset is used as it is.
    2. Otherwise, with ``cluster.dataset_url`` set, the published dataset is downloaded, verified
       and moved into place (a local copy that does not verify is replaced).
    3. Otherwise a :class:`DataError` says how to get the data.
    """
    out = config.data_dir
    url = config.cluster.dataset_url
    fix = "delete it, or point data.dir at another folder"
    if (out / MANIFEST_NAME).is_file():
        # Another dataset in the folder is never replaced; a damaged copy of this one is, from the store.
        _check_matches(load_manifest(out), config, f"the data folder {out}", fix)
        try:
            return verify_prepared(out)
        except DataError as err:
            if url is None:
                raise
            log.warning("%s; fetching the dataset again from %s", err, url)
    elif out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise DataError(f"{out} exists but is not a prepared dataset (no {MANIFEST_NAME}), so it is left alone; {fix}")
    if url is None:
        raise DataError(
            f"no prepared {config.data.dataset} data in {out}: run the prepare stage first "
            "(`python -m pipeline prepare --config ...`), or set cluster.dataset_url to the store a prepare "
            "stage published it to"
        )
    manifest = fetch_dataset(url, out, config.checkpoint.storage_options)
    return _check_matches(manifest, config, f"the dataset store {url}", "set cluster.dataset_url to the store of this dataset")
