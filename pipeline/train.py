"""The ``train`` stage: build the trainer the config asks for, hold the checkpoint lease, train.

The loop itself is :class:`pipeline.trainer.Trainer` (DDP or one process) or
:class:`pipeline.deepspeed_engine.DeepSpeedTrainer` (``train.engine: deepspeed``); what is trained is
the config's task (:mod:`pipeline.tasks`: ``lm`` or ``vae``). This module re-exports the trainer's
public names so that ``from pipeline.train import Trainer`` keeps working.
"""

from __future__ import annotations

import logging

from pipeline.checkpoint import CheckpointLease, UnreadableCheckpoints
from pipeline.config import PipelineConfig
from pipeline.deepspeed_engine import DeepSpeedTrainer
from pipeline.distributed import DistContext, on_main
from pipeline.tracking import dataset_tags
from pipeline.trainer import (
    Trainer,
    TrainingDiverged,
    TrainResult,
    build_averager,
    build_optimizer,
    memory_report,
    micro_batch_size,
)

__all__ = [
    "TrainingDiverged",
    "Trainer",
    "TrainResult",
    "build_averager",
    "build_optimizer",
    "memory_report",
    "micro_batch_size",
    "run_train",
    "trainer_class",
]

log = logging.getLogger(__name__)


def trainer_class(config: PipelineConfig) -> type[Trainer]:
    """The trainer of ``config.train.engine``: DDP (this module) or DeepSpeed."""
    if config.train.engine == "deepspeed":
        return DeepSpeedTrainer
    return Trainer


def _take_lease(trainer: Trainer) -> CheckpointLease | None:
    """Rank 0 takes the lease of the checkpoint location (collective: every rank raises if it could not)."""
    taken: list[CheckpointLease] = []  # the lease holds a thread: it stays on rank 0, never broadcast
    lease = CheckpointLease(trainer.checkpointer.storage, ttl=trainer.config.checkpoint.lease_ttl)
    on_main(trainer.ctx, lambda: taken.append(lease.acquire()))
    return taken[0] if taken else None


def run_train(config: PipelineConfig, tracker=None, ctx: DistContext | None = None) -> TrainResult:
    """The ``train`` stage on this rank, with the engine the config chooses (``train.engine``).

    Holds the checkpoint location's lease while it trains. When checkpoints exist but none can be
    loaded it fails (exit code 4), unless ``checkpoint.on_unreadable`` is ``restart``: then they are set
    aside (never deleted) and training starts again from step 0 with a freshly built trainer.
    """
    ctx = ctx or DistContext()
    trainer = trainer_class(config)(config, tracker, ctx)  # checks the config against the data first
    lease = None
    try:
        lease = _take_lease(trainer)
        trainer.checkpointer.lease = lease
        if tracker is not None:
            tracker.log_dict(trainer.manifest.model_dump(mode="json"), "dataset_manifest.json")
            tracker.set_tags(dataset_tags(trainer.manifest))
            tracker.log_metrics({"model/parameters": sum(p.numel() for p in trainer.model.parameters())})
        try:
            result = trainer.train()
        except UnreadableCheckpoints as err:
            if config.checkpoint.on_unreadable != "restart":
                raise
            set_aside = trainer.checkpointer.set_aside_all("checkpoint.on_unreadable restart")
            if ctx.is_main:
                log.warning("%s\ncheckpoint.on_unreadable is restart: set aside %s (SET_ASIDE.json, nothing "
                            "deleted); training starts again from step 0", err, ", ".join(set_aside))
            trainer.close()
            trainer = trainer_class(config)(config, tracker, ctx)  # pristine weights, optimizer and data
            trainer.checkpointer.lease = lease
            result = trainer.train()
    finally:
        trainer.close()
        if lease is not None:
            lease.release()
    del trainer  # drops the engine (DDP wrapper / DeepSpeed engine), which holds the process group
    return result
