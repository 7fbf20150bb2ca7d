"""The final model of a run: the reported (2TA) weights and the config that rebuilds them.

``<work_dir>/final_model.pt`` holds tensors and plain data only (read with ``weights_only=True``):
``model_config``, ``state_dict``, ``task`` (``lm`` or ``vae``; absent in files written before the VAE
task, meaning ``lm``), the training ``step`` and where the weights came from. When checkpoints live in
object storage the file is also published next to them (``<checkpoint.url>/final/``) so that an
``evaluate`` stage in another container finds it.
"""

from __future__ import annotations

import io
import logging
from pathlib import Path
from typing import Any

import torch
from pydantic import BaseModel
from torch import nn

from models import ModelConfig, RecurrentLM
from pipeline.config import PipelineConfig
from pipeline.errors import writing

__all__ = [
    "FINAL_MODEL_FILE",
    "build_model_from_payload",
    "fetch_final_model",
    "final_model_step",
    "load_final_model",
    "publish_final_model",
    "save_final_model",
]

log = logging.getLogger(__name__)

FINAL_MODEL_FILE = "final_model.pt"


def save_final_model(path: Path, model: nn.Module, model_config: BaseModel, extra: dict[str, Any], *,
                     task: str = "lm") -> None:
    """Write the reported weights with the config needed to rebuild the model (tensors + plain data only).

    ``task``: the model family (``lm``: :class:`~models.RecurrentLM`, ``vae``: :class:`~models.vae.SentenceVAE`).
    """
    payload = {
        "task": task,
        "model_config": model_config.model_dump(mode="json"),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        **extra,
    }
    buffer = io.BytesIO()  # serialised in memory: a failed file write then raises an OSError, not torch's own
    torch.save(payload, buffer)
    tmp = path.with_suffix(".tmp")
    try:
        with writing(path):
            tmp.write_bytes(buffer.getbuffer())
            tmp.replace(path)
    finally:
        tmp.unlink(missing_ok=True)  # a full or read-only disk leaves no half-written file behind


def build_model_from_payload(payload: dict[str, Any]) -> nn.Module:
    """The model a final-model payload describes, with its weights loaded."""
    task = payload.get("task", "lm")
    if task == "vae":
        from models.vae import SentenceVAE, VAEModelConfig

        model: nn.Module = SentenceVAE(VAEModelConfig.model_validate(payload["model_config"]))
    elif task == "lm":
        model = RecurrentLM(ModelConfig.model_validate(payload["model_config"]))
    else:
        raise ValueError(f"the final model was written for task {task!r}, which this version does not know")
    model.load_state_dict(payload["state_dict"])
    return model


def load_final_model(path: str | Path) -> tuple[nn.Module, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_final_model` (``weights_only=True``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    return build_model_from_payload(payload), payload


def _remote_final_model_url(config: PipelineConfig) -> str | None:
    """``<checkpoint.url>/final/final_model.pt`` when checkpoints live in object storage (other pods can read it)."""
    url = config.checkpoint_url
    if "://" not in url or url.startswith("file://"):
        return None
    return f"{url.rstrip('/')}/final/{FINAL_MODEL_FILE}"


def publish_final_model(config: PipelineConfig, path: Path) -> str | None:
    """Copy the final model next to the checkpoints in object storage, so that an ``evaluate`` stage in
    another container finds it; returns the URL (None for local checkpoints)."""
    url = _remote_final_model_url(config)
    if url is None:
        return None
    import fsspec

    from pipeline.checkpoint import RetryPolicy
    from pipeline.checkpoint.storage import retry_call

    ck = config.checkpoint
    policy = RetryPolicy(ck.retry_attempts, ck.retry_base_delay, ck.retry_max_delay)
    fs, remote = fsspec.core.url_to_fs(url, **ck.storage_options)
    retry_call(lambda: fs.put_file(str(path), remote), f"uploading the final model to {url}", policy)
    log.info("final model published to %s", url)
    return url


def fetch_final_model(config: PipelineConfig) -> Path:
    """The run's final model as a local file: ``<work_dir>/final_model.pt``, else downloaded from
    ``<checkpoint.url>/final/`` (written by a train stage in another container)."""
    model_path = config.run_dir / FINAL_MODEL_FILE
    if model_path.exists():
        return model_path
    url = _remote_final_model_url(config)
    hint = "run the train stage first (python -m pipeline train --config ...)"
    if url is None:
        raise FileNotFoundError(f"no trained model at {model_path}: {hint}")
    import fsspec

    fs, remote = fsspec.core.url_to_fs(url, **config.checkpoint.storage_options)
    try:
        if not fs.exists(remote):
            raise FileNotFoundError(f"no trained model at {model_path} nor at {url}: {hint}")
        model_path.parent.mkdir(parents=True, exist_ok=True)
        tmp = model_path.with_suffix(".download")
        try:
            fs.get_file(remote, str(tmp))
            tmp.replace(model_path)
        finally:
            tmp.unlink(missing_ok=True)
    except FileNotFoundError:
        raise
    except OSError as err:
        if err.errno is not None and err.filename is not None:  # the local disk (full, read-only): not storage
            raise
        raise FileNotFoundError(
            f"cannot read the trained model at {url}: {err}; check the storage endpoint and credentials"
        ) from err
    except Exception as err:
        raise FileNotFoundError(
            f"cannot read the trained model at {url}: {err}; check the storage endpoint and credentials"
        ) from err
    log.info("final model fetched from %s", url)
    return model_path


def final_model_step(config: PipelineConfig) -> int | None:
    """The training step of the run's final model (local, else fetched from object storage); None if
    there is none yet."""
    try:
        path = fetch_final_model(config)
    except FileNotFoundError:
        return None
    payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    return int(payload.get("step", -1))
