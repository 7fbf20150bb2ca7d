"""Model families ("tasks") around the one training loop of :class:`pipeline.trainer.Trainer`.

* :mod:`pipeline.tasks.base` - the :class:`TrainingTask` protocol (the seam) and :class:`MicroBatchLoss`;
* :mod:`pipeline.tasks.lm` - recurrent language models (truncated BPTT, carried state, multi-sample
  dropout), evaluated by :mod:`pipeline.tasks.lm_evaluation`;
* :mod:`pipeline.tasks.vae` - sentence VAEs (estimators, MICMCO objectives, posterior-collapse
  remedies), evaluated by :mod:`pipeline.tasks.vae_evaluation`;
* :mod:`pipeline.tasks.specs` - one spec per family: :func:`task_spec`, :func:`build_task`.
"""

from pipeline.tasks.base import MicroBatchLoss, TrainingTask
from pipeline.tasks.specs import TASKS, TaskSpec, build_task, task_spec

__all__ = ["TASKS", "MicroBatchLoss", "TaskSpec", "TrainingTask", "build_task", "task_spec"]
