"""The ``prepare`` stage: download, verify and tokenise the configured corpus (idempotent)."""

from __future__ import annotations

import logging

from pipeline.config import PipelineConfig
from pipeline.data import SAMPLE_TEXT_PATH, DatasetManifest, prepare_dataset

__all__ = ["resolve_source", "run_prepare"]

log = logging.getLogger(__name__)


def resolve_source(config: PipelineConfig) -> str:
    """The data source URL; ``sample`` is the WikiText-2 excerpt shipped with the package."""
    return str(SAMPLE_TEXT_PATH) if config.data.source == "sample" else config.data.source


def run_prepare(config: PipelineConfig, *, force: bool = False) -> DatasetManifest:
    manifest = prepare_dataset(
        config.data.dataset,
        resolve_source(config),
        config.data_dir,
        cache_dir=config.data.cache_dir,
        force=force,
        verify_source=config.data.verify_source,
    )
    log.info(
        "dataset %s ready in %s: %s", manifest.name, config.data_dir,
        ", ".join(f"{k} {v.num_tokens:,} tokens" for k, v in manifest.splits.items()),
    )
    return manifest
