"""The ``evaluate`` stage: score the run's final (2TA) model and record the results.

What is scored is the task's (:mod:`pipeline.tasks`): the language model's cross-entropy with a
softmax temperature scan, optionally dynamic evaluation and Monte Carlo dropout, and its report
(``evaluation/report.md``, ``.csv``, ``.png``; :mod:`pipeline.tasks.lm_evaluation`), or the sentence VAE's
importance-sampled NLL, ELBO, KL, mutual information and active units
(:mod:`pipeline.tasks.vae_evaluation`). A model already evaluated with the same settings is not
evaluated again (``eval_results.json`` holds a fingerprint of the model file and the settings).
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline.config import PipelineConfig
from pipeline.data import load_manifest
from pipeline.errors import writing
from pipeline.final_model import (
    FINAL_MODEL_FILE,
    fetch_final_model,
    final_model_step,
    load_final_model,
    publish_final_model,
    save_final_model,
)
from pipeline.tasks import task_spec
from pipeline.tasks.lm_evaluation import EvaluationResult, bits_per_token, evaluate_model, evaluate_nll, scan_temperature

__all__ = [
    "FINAL_MODEL_FILE",
    "RESULTS_FILE",
    "EvaluationResult",
    "bits_per_token",
    "evaluate_model",
    "evaluate_nll",
    "evaluation_fingerprint",
    "fetch_final_model",
    "final_model_step",
    "load_final_model",
    "previous_evaluation",
    "publish_final_model",
    "run_evaluate",
    "save_final_model",
    "scan_temperature",
]

log = logging.getLogger(__name__)

RESULTS_FILE = "eval_results.json"
#: Folders of a result's artifact files that are kept as their MLflow artifact folder (others go to plots/).
ARTIFACT_FOLDERS = ("samples", "evaluation")


def evaluation_fingerprint(config: PipelineConfig, model_path: Path) -> dict[str, Any]:
    """What an evaluation's results depend on: the model file's sha256 and the evaluate settings."""
    digest = hashlib.sha256()
    with open(model_path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    fingerprint = {"model_sha256": digest.hexdigest(), "evaluate": config.evaluate.model_dump(mode="json"),
                   "data_dir": str(config.data_dir)}
    if config.task == "vae":  # an LM's fingerprint stays as it was before the VAE task existed
        fingerprint["vae_evaluate"] = config.vae.evaluate.model_dump(mode="json")
    return fingerprint


def previous_evaluation(config: PipelineConfig, fingerprint: dict[str, Any]):
    """The results already in ``<work_dir>/eval_results.json`` when they are for this model and these
    settings (then evaluating again would only repeat them); else None."""
    path = config.run_dir / RESULTS_FILE
    try:
        saved = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(saved, dict) or saved.get("fingerprint") != fingerprint:
        return None
    result_class = task_spec(config.task).result_class
    fields = {k: saved[k] for k in result_class.__dataclass_fields__ if k in saved}
    try:
        return result_class(**fields)
    except TypeError:
        return None


def run_evaluate(config: PipelineConfig, tracker=None, *, force: bool = False):
    """The ``evaluate`` stage: load the final (2TA) model of the run, score it, record the results.

    Returns the results (an object with ``metrics() -> dict[str, float]``) and whether it evaluated: a
    model already evaluated with the same settings is not evaluated again (nothing is logged; ``force``
    evaluates anyway).
    """
    spec = task_spec(config.task)
    manifest = load_manifest(config.data_dir)
    spec.check_evaluation_sizes(config, manifest)
    model_path = fetch_final_model(config)
    fingerprint = evaluation_fingerprint(config, model_path)
    previous = None if force else previous_evaluation(config, fingerprint)
    if previous is not None:
        log.info("evaluate: nothing to do, this final model was evaluated already (%s)", config.run_dir / RESULTS_FILE)
        return previous, False
    if tracker is not None:
        tracker.confirm_stage()
    model, payload = load_final_model(model_path)
    if payload.get("task", "lm") != config.task:
        raise ValueError(f"the final model at {model_path} was trained for task {payload.get('task', 'lm')!r} but the "
                         f"config's task is {config.task!r}: use the config it was trained with")
    started = time.perf_counter()
    result = spec.evaluate_final(model, config, manifest)
    metrics = result.metrics()
    log.info("evaluation (%s weights, %.1fs): %s", payload.get("weights", "?"), time.perf_counter() - started,
             json.dumps({k: round(v, 4) for k, v in metrics.items()}))
    with writing(config.run_dir / RESULTS_FILE):
        (config.run_dir / RESULTS_FILE).write_text(
            json.dumps({**asdict(result), "task": config.task, "metrics": metrics, "fingerprint": fingerprint},
                       indent=2))
    if tracker is not None:
        final = {f"final/{k}": v for k, v in metrics.items()}
        step = int(payload.get("step", 0))
        tracker.log_metrics(final, step=step)
        tracker.log_metrics(final, step=step, parent=True)  # the parent is what `compare` and the UI table show
        tracker.log_artifact(config.run_dir / RESULTS_FILE)
        tracker.log_summary_plot(metrics, spec.unit(manifest))
        for artifact in getattr(result, "artifacts", []):
            path = Path(artifact)
            # A file's folder names its artifact folder: samples/ (VAE), evaluation/ (the LM report); else plots/.
            tracker.log_artifact(path, path.parent.name if path.parent.name in ARTIFACT_FOLDERS else "plots")
        if config.task == "vae":
            tracker.log_pareto_plot()
    return result, True
