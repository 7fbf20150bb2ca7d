"""One "train spec" per model family (as torchtitan's): how to build its task and evaluate its model.

``task_spec(config.task)`` is the only place that knows which families exist; the trainer, the
``evaluate`` stage and the final-model loader go through it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from torch import nn

from pipeline.config import PipelineConfig
from pipeline.data import DatasetManifest
from pipeline.distributed import DistContext
from pipeline.tasks.base import TrainingTask

__all__ = ["TASKS", "TaskSpec", "build_task", "task_spec"]

TASKS: tuple[str, ...] = ("lm", "vae")


@dataclass(frozen=True)
class TaskSpec:
    """What the pipeline needs of a model family besides the training loop."""

    name: str
    #: (config, manifest, ctx) -> the task of this rank (checks the config against the data first).
    build_task: Callable[[PipelineConfig, DatasetManifest, DistContext], TrainingTask]
    #: (final model, config, manifest) -> results with ``metrics() -> dict[str, float]`` (a dataclass).
    evaluate_final: Callable[[nn.Module, PipelineConfig, DatasetManifest], Any]
    #: The dataclass ``evaluate_final`` returns (results are re-read from eval_results.json with it).
    result_class: type
    #: (config, manifest) -> None; raises a ConfigError when the evaluation settings do not fit the data.
    check_evaluation_sizes: Callable[[PipelineConfig, DatasetManifest], None]
    #: manifest -> the unit of per-token losses ("char": bits per character are shown; "word").
    unit: Callable[[DatasetManifest], str]


def _lm_spec() -> TaskSpec:
    from pipeline.sizes import check_evaluation_sizes
    from pipeline.tasks.lm import LanguageModelTask
    from pipeline.tasks.lm_evaluation import EvaluationResult, evaluate_model

    return TaskSpec("lm", LanguageModelTask, lambda model, config, manifest: evaluate_model(model, config, manifest),
                    EvaluationResult, check_evaluation_sizes, lambda manifest: manifest.unit)


def _vae_spec() -> TaskSpec:
    from pipeline.tasks.vae import SentenceVAETask, VAEFinalResult, check_vae_evaluation_sizes, evaluate_final_vae

    return TaskSpec("vae", SentenceVAETask, evaluate_final_vae, VAEFinalResult, check_vae_evaluation_sizes,
                    lambda manifest: manifest.unit)


def task_spec(name: str) -> TaskSpec:
    """The spec of task ``name`` (``lm`` or ``vae``)."""
    if name == "lm":
        return _lm_spec()
    if name == "vae":
        return _vae_spec()
    raise ValueError(f"unknown task {name!r}; the tasks are: {', '.join(TASKS)}")


def build_task(config: PipelineConfig, manifest: DatasetManifest, ctx: DistContext) -> TrainingTask:
    """This rank's task for ``config.task``."""
    return task_spec(config.task).build_task(config, manifest, ctx)
