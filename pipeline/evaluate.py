"""Evaluation: cross-entropy, bits per character / perplexity, softmax temperature scan.

Evaluation uses the standard deterministic dropout approximation (``model.eval()``), carries the
recurrent state across windows of contiguous stripes, and scans softmax temperatures on the
validation set in a single pass (every window's logits are scored at all temperatures), as in
deepmind/lamb's evaluation. The test set is then scored with and without the tuned temperature.
"""

from __future__ import annotations

import hashlib
import io
import json
import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from models import ModelConfig, RecurrentLM, detach_state
from pipeline.config import PipelineConfig
from pipeline.data import DatasetManifest, evaluation_windows, load_manifest, load_tokens
from pipeline.errors import writing

__all__ = [
    "fetch_final_model",
    "publish_final_model",
    "EvaluationResult",
    "bits_per_token",
    "evaluate_nll",
    "evaluation_fingerprint",
    "final_model_step",
    "load_final_model",
    "previous_evaluation",
    "run_evaluate",
    "scan_temperature",
]

log = logging.getLogger(__name__)

FINAL_MODEL_FILE = "final_model.pt"
RESULTS_FILE = "eval_results.json"


def bits_per_token(nats: float) -> float:
    """Convert a mean cross-entropy in nats to bits (bpc for character-level corpora)."""
    return nats / math.log(2)


def _limit(tokens: np.ndarray, max_tokens: int | None) -> np.ndarray:
    return tokens if max_tokens is None else tokens[: max_tokens + 1]


@torch.no_grad()
def evaluate_nll(
    model: RecurrentLM,
    tokens: np.ndarray,
    *,
    batch_size: int,
    bptt: int,
    max_tokens: int | None = None,
    temperatures: list[float] | tuple[float, ...] = (1.0,),
    progress_desc: str | None = None,
) -> tuple[list[float], int]:
    """Mean negative log-likelihood (nats/token) of ``tokens`` at each temperature, and the token count.

    ``tokens``: 1-D array of token ids. The model runs in eval mode (no dropout); its training mode
    is restored afterwards. ``progress_desc``: show progress (tokens scored) under this name.
    """
    from pipeline.console import progress

    was_training = model.training
    model.eval()
    tokens = _limit(tokens, max_tokens)
    bar = progress(max(len(tokens) - 1, 0), progress_desc or "", "tok", disable=progress_desc is None, leave=False)
    try:
        temps = torch.tensor(list(temperatures), dtype=torch.float32)
        totals = torch.zeros(len(temps), dtype=torch.float64)
        count = 0
        state = None
        for batch in evaluation_windows(tokens, batch_size, bptt):
            if state is None or batch.reset_state:
                state = model.initial_state(batch.inputs.shape[1])
            logits, state = model(batch.inputs, state)
            state = detach_state(state)
            targets = batch.targets.reshape(-1)
            flat = logits.reshape(-1, logits.shape[-1])
            for k, t in enumerate(temps.tolist()):
                # Scoring every temperature from the same logits costs one log_softmax each, not a pass each.
                nll = F.cross_entropy(flat / t, targets, reduction="sum")
                totals[k] += nll.double()
            count += targets.numel()
            bar.update(targets.numel())
        if count == 0:
            raise ValueError("nothing to evaluate: the token array is shorter than one window")
        return (totals / count).tolist(), count
    finally:
        bar.close()
        model.train(was_training)


def scan_temperature(
    model: RecurrentLM,
    valid_tokens: np.ndarray,
    *,
    batch_size: int,
    bptt: int,
    t_min: float,
    t_max: float,
    num: int,
    max_tokens: int | None = None,
    progress_desc: str | None = None,
) -> tuple[float, dict[float, float]]:
    """The softmax temperature in ``linspace(t_min, t_max, num)`` (plus 1.0) minimising validation NLL."""
    grid = sorted({round(float(t), 6) for t in np.linspace(t_min, t_max, num)} | {1.0})
    losses, _ = evaluate_nll(model, valid_tokens, batch_size=batch_size, bptt=bptt, max_tokens=max_tokens, temperatures=grid,
                             progress_desc=progress_desc)
    table = dict(zip(grid, losses))
    best = min(grid, key=lambda t: (table[t], abs(t - 1.0)))
    return best, table


@dataclass
class EvaluationResult:
    """Final metrics of a model; ``*_nll`` in nats/token, ``*_bits`` in bits/token (bpc), ``*_ppl`` perplexity."""

    unit: str
    temperature: float
    valid_nll: float
    test_nll: float
    valid_nll_tuned: float
    test_nll_tuned: float
    valid_tokens: int
    test_tokens: int

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {
            "temperature": self.temperature,
            "valid_nll": self.valid_nll,
            "test_nll": self.test_nll,
            "valid_nll_tuned_temperature": self.valid_nll_tuned,
            "test_nll_tuned_temperature": self.test_nll_tuned,
        }
        if self.unit == "char":
            for key in ("valid", "test"):
                out[f"{key}_bpc"] = bits_per_token(getattr(self, f"{key}_nll"))
                out[f"{key}_bpc_tuned_temperature"] = bits_per_token(getattr(self, f"{key}_nll_tuned"))
        else:
            for key in ("valid", "test"):
                out[f"{key}_ppl"] = math.exp(getattr(self, f"{key}_nll"))
                out[f"{key}_ppl_tuned_temperature"] = math.exp(getattr(self, f"{key}_nll_tuned"))
        return out


def evaluate_model(model: RecurrentLM, config: PipelineConfig, manifest: DatasetManifest) -> EvaluationResult:
    """Score valid and test with and without the validation-tuned softmax temperature."""
    ev = config.evaluate
    valid = load_tokens(config.data_dir, "valid")
    test = load_tokens(config.data_dir, "test")
    best_t, table = scan_temperature(
        model, valid, batch_size=ev.batch_size, bptt=ev.bptt, max_tokens=ev.max_tokens,
        t_min=ev.temperature.min, t_max=ev.temperature.max, num=ev.temperature.num, progress_desc="evaluate valid (T scan)",
    )
    (valid_nll_1,), valid_count = evaluate_nll(
        model, valid, batch_size=ev.batch_size, bptt=ev.bptt, max_tokens=ev.max_tokens, temperatures=(1.0,),
        progress_desc="evaluate valid",
    )
    (test_nll_1, test_nll_t), test_count = evaluate_nll(
        model, test, batch_size=ev.batch_size, bptt=ev.bptt, max_tokens=ev.max_tokens, temperatures=(1.0, best_t),
        progress_desc="evaluate test",
    )
    return EvaluationResult(
        unit=manifest.unit, temperature=best_t, valid_nll=valid_nll_1, test_nll=test_nll_1,
        valid_nll_tuned=table[best_t], test_nll_tuned=test_nll_t, valid_tokens=valid_count, test_tokens=test_count,
    )


def save_final_model(path: Path, model: RecurrentLM, model_config: ModelConfig, extra: dict[str, Any]) -> None:
    """Write the reported weights with the config needed to rebuild the model (tensors + plain data only)."""
    payload = {
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


def load_final_model(path: str | Path) -> tuple[RecurrentLM, dict[str, Any]]:
    """Rebuild the model saved by :func:`save_final_model` (``weights_only=True``)."""
    payload = torch.load(path, map_location="cpu", weights_only=True)
    model = RecurrentLM(ModelConfig.model_validate(payload["model_config"]))
    model.load_state_dict(payload["state_dict"])
    return model, payload


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


def evaluation_fingerprint(config: PipelineConfig, model_path: Path) -> dict[str, Any]:
    """What an evaluation's results depend on: the model file's sha256 and the evaluate settings."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return {"model_sha256": digest.hexdigest(), "evaluate": config.evaluate.model_dump(mode="json"),
            "data_dir": str(config.data_dir)}


def previous_evaluation(config: PipelineConfig, fingerprint: dict[str, Any]) -> EvaluationResult | None:
    """The results already in ``<work_dir>/eval_results.json`` when they are for this model and these
    settings (then evaluating again would only repeat them); else None."""
    path = config.run_dir / RESULTS_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    fields = {k: saved[k] for k in EvaluationResult.__dataclass_fields__ if k in saved}
    try:
        return EvaluationResult(**fields)
    except TypeError:
        return None


def run_evaluate(config: PipelineConfig, tracker=None, *, force: bool = False) -> tuple[EvaluationResult, bool]:
    """The ``evaluate`` stage: load the final (2TA) model of the run, score it, record the results.

    Returns the results and whether it evaluated: a model already evaluated with the same settings is
    not evaluated again (nothing is logged; ``force`` evaluates anyway).
    """
    from pipeline.sizes import check_evaluation_sizes  # sizes imports the config and data modules only

    manifest = load_manifest(config.data_dir)
    check_evaluation_sizes(config, manifest)
    model_path = fetch_final_model(config)
    fingerprint = evaluation_fingerprint(config, model_path)
    previous = None if force else previous_evaluation(config, fingerprint)
    if previous is not None:
        log.info("evaluate: nothing to do, this final model was evaluated already (%s)", config.run_dir / RESULTS_FILE)
        return previous, False
    if tracker is not None:
        tracker.confirm_stage()
    model, payload = load_final_model(model_path)
    started = time.perf_counter()
    result = evaluate_model(model, config, manifest)
    metrics = result.metrics()
    log.info("evaluation (%s weights, %.1fs): %s", payload.get("weights", "?"), time.perf_counter() - started,
             json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    with writing(config.run_dir / RESULTS_FILE):
        (config.run_dir / RESULTS_FILE).write_text(
            json.dumps({**asdict(result), "metrics": metrics, "fingerprint": fingerprint}, indent=2))
    if tracker is not None:
        final = {f"final/{k}": v for k, v in metrics.items()}
        step = int(payload.get("step", 0))
        tracker.log_metrics(final, step=step)
        tracker.log_metrics(final, step=step, parent=True)  # the parent is what `compare` and the UI table show
        tracker.log_artifact(config.run_dir / RESULTS_FILE)
        tracker.log_summary_plot(metrics, manifest.unit)
    return result, True
