"""What the training loop checkpoints, and how it gets it back: the state half of :class:`~pipeline.trainer.Trainer`.

:class:`TrainerCheckpoints` holds the trainer's checkpoint side (a mixin: it reads the trainer's
model, optimizer, averager, task and progress counters): the state every rank holds identically (DCP
writes it once: model, optimizer, averages, progress - step, data position, the task's own state, lr
scale, the last 2TA report), the per-rank state (RNG, the task's per-rank state such as the LM's
carried hidden state, the divergence guard), committing a checkpoint, restoring the newest (or best)
loadable one, resuming, and going back to the best one after a divergence (thesis §4.4). The DeepSpeed
engine overrides ``save_checkpoint`` / ``restore`` (its own files, the same progress and per-rank state).
"""

from __future__ import annotations

import json
import logging
import math
import time
from typing import Any

import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from pipeline.averaging import (
    AveragingReport,
    ExponentialAveraging,
    NoAveraging,
    NonMonotonicAveraging,
    TailAveraging,
    TwoTailedAveraging,
)
from pipeline.checkpoint import BackgroundSaver, CheckpointInfo, DCPCheckpointer, RetryPolicy
from pipeline.config import TrainConfig
from pipeline.errors import EXIT_DIVERGED, PipelineError
from pipeline.train_log import TRAIN_LOG_FILE

__all__ = ["TrainerCheckpoints", "TrainingDiverged", "build_averager", "build_optimizer"]

log = logging.getLogger("pipeline.trainer")


class TrainingDiverged(PipelineError, RuntimeError):
    """Raised when the loss keeps diverging after ``max_divergence_restarts`` restarts (exit code 6)."""

    exit_code = EXIT_DIVERGED


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    """The torch optimizer of ``train.optimizer`` over all of ``model``'s parameters (one param group).

    adam / radam use ``beta1``, ``beta2`` and ``eps``; sgd is plain SGD (no momentum, no weight decay: the
    L2 penalty is ``train.optimizer.l2_penalty``, added to the objective - for SGD the same update as
    AWD-LSTM's ``weight_decay``) and ignores them. Both engines build their optimizer here.
    """
    opt = train.optimizer
    if opt.name == "sgd":
        return torch.optim.SGD(model.parameters(), lr=opt.lr, momentum=0.0)
    kwargs = dict(lr=opt.lr, betas=(opt.beta1, opt.beta2), eps=opt.eps)
    if opt.name == "adam":
        return torch.optim.Adam(model.parameters(), **kwargs)
    return torch.optim.RAdam(model.parameters(), **kwargs)


def build_averager(model: torch.nn.Module, train: TrainConfig):
    avg = train.averaging
    params = list(model.parameters())
    if avg.method == "two_tailed":
        return TwoTailedAveraging(params, train.eval_every, reset_patience=avg.reset_patience, raw_fallback=avg.raw_fallback)
    if avg.method == "tail":
        return TailAveraging(params, start_step=avg.tail_start)
    if avg.method == "ema":
        return ExponentialAveraging(params, decay=avg.ema_decay)
    if avg.method == "nt_asgd":
        return NonMonotonicAveraging(params, nonmono=avg.nonmono)
    return NoAveraging(params)


class TrainerCheckpoints:
    """The checkpoint side of :class:`~pipeline.trainer.Trainer` (see the module docstring)."""

    # The learning-rate factor of the current step's batch (variable BPTT: window / bptt; else 1), see
    # _set_step_lr. Not checkpointed: every step sets it from its own batch before the optimizer steps.
    _step_lr_factor: float = 1.0
    # checkpoint.async_save's saver (None: every save is synchronous); see _open_background_saves.
    background_saves: BackgroundSaver | None = None

    def _retry_policy(self) -> RetryPolicy:
        ck = self.config.checkpoint
        return RetryPolicy(ck.retry_attempts, ck.retry_base_delay, ck.retry_max_delay)

    def _open_checkpointer(self):
        ck = self.config.checkpoint
        return DCPCheckpointer.open(
            self.config.checkpoint_url, self.ctx, storage_options=ck.storage_options, retry=self._retry_policy(),
            max_failed_saves=ck.max_failed_saves,
        )

    def _has_optimizer_state(self) -> bool:
        return bool(self.optimizer.state) or self.step > 0

    def _dcp_state(self, with_optimizer: bool | None = None) -> dict[str, Any]:
        """What every rank holds identically (DCP writes it once): model, optimizer, averages, progress.

        ``with_optimizer``: include the optimizer state (default: when it has any). Loading a checkpoint
        needs the structure it was saved with: the step-0 one has no optimizer state yet.
        """
        with_optim = self._has_optimizer_state() if with_optimizer is None else with_optimizer
        if with_optim:
            model_sd, optim_sd = get_state_dict(self.model, self.optimizer, options=StateDictOptions())
        else:  # a fresh optimizer has no state yet; get_state_dict would create it with a dummy step
            model_sd, optim_sd = self.model.state_dict(), {}
        return {
            "model": model_sd,
            "optimizer": optim_sd,
            "averager": self.averager.state_dict(),
            "progress": self._progress_state(),
        }

    def _progress_state(self) -> dict[str, Any]:
        """Where training stands (the same on every rank): step, data position, lr scale, last report."""
        progress = {
            "step": self.step,
            "stream": self.task.batches_state(),
            "lr_scale": self.lr_scale,
            "divergence_restarts": self.divergence_restarts,
            "tokens_seen": self.tokens_seen,
            "last_report": None if self.last_report is None else json.dumps(vars(self.last_report)),
        }
        task_state = self.task.state_dict()
        if task_state:  # absent for a stateless task (the LM): its checkpoints keep their old layout
            progress["task"] = json.dumps(task_state)
        return progress

    def _load_progress(self, progress: dict[str, Any], *, keep_lr_scale: bool = False) -> None:
        self.step = int(progress["step"])
        self.task.load_batches_state(progress["stream"])
        if "task" in progress:
            self.task.load_state_dict(json.loads(progress["task"]))
        self.tokens_seen = int(progress["tokens_seen"])
        if not keep_lr_scale:
            self.lr_scale = float(progress["lr_scale"])
            self.divergence_restarts = int(progress["divergence_restarts"])
        report = progress["last_report"]
        self.last_report = None if report is None else AveragingReport(**json.loads(report))
        self._report_step = None

    def _load_per_rank_state(self, per_rank: dict[str, Any]) -> None:
        torch.set_rng_state(per_rank["rng"])
        if "cuda_rng" in per_rank and self.device.type == "cuda":
            torch.cuda.set_rng_state(per_rank["cuda_rng"], self.device)
        if "divergence_guard" in per_rank:  # absent in checkpoints written before the guard existed
            self.guard.load_state_dict(per_rank["divergence_guard"])
        self.task.load_per_rank_state(per_rank, self.device)

    def _per_rank_state(self) -> dict[str, Any]:
        # The divergence guard is the same on every rank; kept here, where a missing entry is harmless.
        state = {"rng": torch.get_rng_state(), **self.task.per_rank_state(), "rank": self.ctx.rank,
                 "divergence_guard": self.guard.state_dict()}
        if self.device.type == "cuda":
            state["cuda_rng"] = torch.cuda.get_rng_state(self.device)
        return state

    def _checkpoint_meta(self) -> dict[str, Any]:
        """What the commit record says of a checkpoint: its step, and its reported validation loss when the
        averager evaluated at this very step (divergence recovery goes back to the lowest)."""
        evaluated_now = self.last_report is not None and self._report_step == self.step
        return {"step": self.step, "loss": self.last_report.loss if evaluated_now else None,
                "engine": self.engine_name, "time": time.time(), "optimizer_state": self._has_optimizer_state()}

    def _open_background_saves(self) -> BackgroundSaver | None:
        """The saver of background checkpoints (``checkpoint.async_save``, DCP engine; collective under
        torchrun: it creates its own process group). None: every save is synchronous (switched off, or the
        DeepSpeed engine, whose ``save_checkpoint`` writes from the engine's live state)."""
        if not self.config.checkpoint.async_save or not isinstance(self.checkpointer, DCPCheckpointer):
            return None
        return BackgroundSaver(self.ctx)

    def checkpoint_step(self, *, final: bool = False) -> None:
        """Checkpoint this step (collective). With background saves the state is copied to CPU memory here and
        committed (then old checkpoints pruned) while training goes on; the run's ``final`` save, and every
        save without them, is committed before this returns (:meth:`save_checkpoint`)."""
        saver = self.background_saves
        if saver is None or final:
            self.save_checkpoint(final=final)
            return
        ck = self.config.checkpoint
        saver.save(self.checkpointer, self.step, self._dcp_state(), self._per_rank_state(), self._checkpoint_meta(),
                   keep_last=ck.keep_last, keep_best=ck.keep_best)
        log.debug("checkpoint of step %d staged in %.3f s; committing in the background", self.step, saver.stall_s)

    def wait_for_checkpoint(self) -> None:
        """Block until the background save in flight, if any, has finished (every rank waits for its own part:
        the ranks' saves agree with each other on their own process group). Raises here what it raised:
        :class:`~pipeline.checkpoint.CheckpointSaveFailed` when saves kept failing, as a synchronous save would
        have, with the same exit code."""
        if self.background_saves is not None and self.background_saves.in_flight:
            self.background_saves.wait()
            log.debug("background checkpoint save finished in %.3f s", self.background_saves.save_s or 0.0)

    def save_checkpoint(self, *, final: bool = False) -> None:
        """Commit a checkpoint of this step before returning (collective), after the background save in flight;
        then prune old ones. ``final``: the run's last save, which must succeed
        (:class:`~pipeline.checkpoint.CheckpointSaveFailed` otherwise)."""
        self.wait_for_checkpoint()
        saved = self.checkpointer.save(self.step, self._dcp_state(), self._per_rank_state(), self._checkpoint_meta(),
                                       final=final)
        if saved is not None:
            self.checkpointer.prune(self.config.checkpoint.keep_last, self.config.checkpoint.keep_best)

    def restore(self, *, prefer: str = "newest", keep_lr_scale: bool = False) -> CheckpointInfo | None:
        """Load the newest (``prefer="best"``: lowest reported validation loss) loadable checkpoint, the same
        on all ranks, once the background save in flight has committed (a divergence goes back to the best
        checkpoint, which may be the one being written). Returns it, or None when there is none (raises when
        some exist but none loads)."""
        self.wait_for_checkpoint()
        templates: dict[str, dict[str, Any]] = {}

        def template_for(info: CheckpointInfo) -> dict[str, Any]:
            # Checkpoints written before the flag existed: the step-0 one alone has no optimizer state.
            templates[info.name] = self._dcp_state(with_optimizer=bool(info.meta.get("optimizer_state", info.step > 0)))
            return templates[info.name]

        found = self.checkpointer.load_latest(template_for, prefer=prefer)
        if found is None:
            return None
        info, per_rank = found
        template = templates[info.name]
        if template["optimizer"]:
            set_state_dict(self.model, self.optimizer, model_state_dict=template["model"],
                           optim_state_dict=template["optimizer"])
        else:
            self.model.load_state_dict(template["model"])
            self.optimizer = build_optimizer(self.model, self.train_cfg)  # back to a fresh optimizer
        self.averager.load_state_dict(template["averager"])
        self._load_progress(template["progress"], keep_lr_scale=keep_lr_scale)
        self._load_per_rank_state(per_rank)
        self._apply_lr()
        return info

    def restore_latest(self, *, keep_lr_scale: bool = False) -> int | None:
        """Load the newest loadable checkpoint (all ranks the same). Returns its step, or None."""
        info = self.restore(keep_lr_scale=keep_lr_scale)
        return None if info is None else info.step

    def _apply_lr(self) -> None:
        """Set every param group's lr to ``train.optimizer.lr`` x ``lr_scale`` (divergence decay) x the
        current step's factor (variable BPTT). Every group: AWD-LSTM rescaled ``param_groups[0]`` only.
        The DeepSpeed engine steps this same torch optimizer (ZeRO keeps its param groups), so this sets
        its lr too."""
        lr = self.train_cfg.optimizer.lr * self.lr_scale * self._step_lr_factor
        for group in self.optimizer.param_groups:
            group["lr"] = lr

    def _set_step_lr(self, batch: Any) -> None:
        """Before a step: apply the batch's learning-rate factor (``batch.lr_factor``: AWD-LSTM's variable
        BPTT rescales the lr by window length / bptt; batches without one count as 1). It is the same on
        every rank (the window lengths are), and it composes with ``lr_scale``."""
        factor = float(getattr(batch, "lr_factor", 1.0))
        if factor != self._step_lr_factor:
            self._step_lr_factor = factor
            self._apply_lr()

    def resume(self) -> bool:
        """Continue from the newest loadable checkpoint, if any. Returns whether it resumed.

        Raises :class:`~pipeline.checkpoint.UnreadableCheckpoints` when checkpoints exist but none can be
        loaded (never a silent fresh start; see :func:`run_train` for ``checkpoint.on_unreadable restart``).
        """
        info = self.restore()
        if info is None:
            return False
        dropped = self.train_log.truncate_after(info.step)
        if self.ctx.is_main:
            log.info("resumed from %s at step %d%s", self.checkpointer.storage.folder_url(info.name), info.step,
                     f" ({dropped} lines of later steps dropped from {TRAIN_LOG_FILE})" if dropped else "")
        return True

    # ----------------------------------------------------------------------------- loop

    def _recover_from_divergence(self, reason: str) -> None:
        """Thesis §4.4: reset weights and optimizer state to the best checkpoint (lowest reported validation
        loss) and multiply the learning rate by ``divergence_lr_decay``."""
        diverged_at = self.step + 1
        self.divergence_restarts += 1
        if self.divergence_restarts > self.train_cfg.max_divergence_restarts:
            raise TrainingDiverged(
                f"training diverged at step {diverged_at} ({reason}) after {self.divergence_restarts - 1} restarts; "
                "lower train.optimizer.lr or raise train.max_divergence_restarts"
            )
        self.lr_scale *= self.train_cfg.divergence_lr_decay
        restarts, scale = self.divergence_restarts, self.lr_scale
        info = self.restore(prefer="best", keep_lr_scale=True)
        if info is None:
            raise TrainingDiverged(f"training diverged at step {diverged_at} ({reason}) and there is no committed "
                                   "checkpoint to go back to")
        abandoned = self.checkpointer.abandon_newer_than(info)
        self.divergence_restarts, self.lr_scale = restarts, scale
        self._apply_lr()
        if self.ctx.is_main:
            loss = "none" if not math.isfinite(info.loss) else f"{info.loss:.4f}"
            log.warning(
                "divergence at step %d (%s): reloaded the best checkpoint %s (step %d, reported validation loss %s), "
                "learning rate scaled to %.4g x (restart %d of at most %d)%s",
                diverged_at, reason, self.checkpointer.storage.folder_url(info.name), info.step, loss, self.lr_scale,
                self.divergence_restarts, self.train_cfg.max_divergence_restarts,
                f"; set aside the newer checkpoints of the diverged run: {', '.join(abandoned)}" if abandoned else "",
            )
        self._log_line({"step": self.step, "divergence": {"at_step": diverged_at, "reason": reason,
                                                          "reloaded": info.name, "reloaded_step": info.step,
                                                          "lr_scale": self.lr_scale}})
        if self.tracker is not None:
            self.tracker.log_metrics({"divergence_restarts": self.divergence_restarts, "lr": self._lr(),
                                      "divergence/reloaded_step": info.step}, step=self.step)
