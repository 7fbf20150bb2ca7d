"""The one training loop: engines, accumulation, clipping, averaging, divergence recovery, checkpoints.

:class:`Trainer` trains any model family through its task (:mod:`pipeline.tasks`: the language model
or the sentence VAE), as one process or data-parallel under ``torchrun`` (DDP: NCCL on GPU, gloo on
CPU); each rank reads its own share of every global batch, so the global batch, the mean loss and
hence the learning-rate semantics are those of a single process. ``train.engine: deepspeed`` runs the
same loop on a DeepSpeed engine (ZeRO stage 1 or 2, see :mod:`pipeline.deepspeed_engine`, which
overrides the engine hooks of :class:`Trainer`).

One optimizer step:

1. per micro-batch (``grad_accum_steps`` slices of the rank's batch): the task's loss (LM:
   multi-sample dropout objective, thesis §4.3; VAE: the estimator's decoder + encoder surrogate) +
   optional L2 penalty, backward (DDP syncs on the last micro-batch);
   then the step's loss sums are all-reduced (with ``train.gradient_reduction`` flat, the default on CPU,
   together with the gradients: one collective per step, see :class:`pipeline.distributed.FlatGradients`);
2. clip the gradient norm; a divergence - a non-finite loss or gradient norm, or a loss above
   ``divergence_loss_factor`` times its lowest smoothed value (the same decision on every rank) -
   reloads the best checkpoint (by the reported validation loss) and multiplies the learning rate
   by ``divergence_lr_decay`` (thesis §4.4); the newer checkpoints of the diverged trajectory are
   set aside;
3. optimizer step, then ``averager.update()`` (2TA adds the new weights to both averages; the
   weights are identical on all ranks, so are the averages);
4. every ``eval_every`` steps the averager evaluates raw / short / long weights on the task's
   validation loss (each rank scores a shard, the sums are all-reduced: one consistent decision) and
   adapts (thesis Algorithm 2); every ``checkpoint_interval`` steps a checkpoint is committed (DCP
   through fsspec, see :mod:`pipeline.checkpoint.protocol`: digests, commit record, failed saves),
   in the background with ``checkpoint.async_save`` (:mod:`pipeline.checkpoint.async_save`: the state
   is copied to CPU memory at the step, one save in flight; a restore, the run's last save, the final
   model and the trainer's ``close`` wait for it first).

Everything needed to continue bit-exactly is checkpointed: model, optimizer, averager, data
position, the task's state (LM: per-rank carried hidden state; VAE: annealing / γ / phase), per-rank
RNG state, learning-rate scale, divergence guard and step. When checkpoints exist but none can be
loaded, training stops (exit code 4) unless ``checkpoint.on_unreadable`` is ``restart``; it never
starts over on its own.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from pipeline.averaging import AveragingReport
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.console import progress
from pipeline.data import load_manifest
from pipeline.distributed import DistContext, FlatGradients, all_reduce_sum, gather_objects, on_main
from pipeline.divergence import DivergenceGuard
from pipeline.final_model import FINAL_MODEL_FILE, final_model_step, publish_final_model, save_final_model
from pipeline.tasks import MicroBatchLoss, TrainingTask, build_task
from pipeline.tasks.lm_evaluation import bits_per_token
from pipeline.trainer_state import TrainerCheckpoints, TrainingDiverged, build_averager, build_optimizer
from pipeline.train_log import TRAIN_LOG_FILE, TrainLog

__all__ = [
    "TrainingDiverged",
    "Trainer",
    "TrainResult",
    "build_averager",
    "build_optimizer",
    "memory_report",
    "micro_batch_size",
]

log = logging.getLogger(__name__)


def _tensor_bytes(tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if isinstance(t, torch.Tensor))


def _tensors(tree: Any) -> list[torch.Tensor]:
    """Every tensor inside nested dicts / lists / tuples."""
    if isinstance(tree, torch.Tensor):
        return [tree]
    if isinstance(tree, dict):
        return [t for v in tree.values() for t in _tensors(v)]
    if isinstance(tree, (list, tuple)):
        return [t for v in tree for t in _tensors(v)]
    return []


def memory_report(model: torch.nn.Module, optimizer: torch.optim.Optimizer, averager: Any) -> dict[str, float]:
    """MiB held by parameters, optimizer state and weight averages on this rank (+ CUDA peak)."""
    optim_tensors = _tensors(dict(optimizer.state))
    avg_tensors = _tensors(averager.state_dict())
    mib = 1024.0**2
    report = {
        "params_mib": _tensor_bytes(model.parameters()) / mib,
        "optimizer_mib": _tensor_bytes(optim_tensors) / mib,
        "averages_mib": _tensor_bytes(avg_tensors) / mib,
    }
    if torch.cuda.is_available() and next(model.parameters()).is_cuda:
        report["cuda_max_allocated_mib"] = torch.cuda.max_memory_allocated() / mib
    return report


@dataclass
class TrainResult:
    step: int
    reported_loss: float | None
    reported_source: str | None
    divergence_restarts: int
    model_path: Path
    trained: bool = True  # False: the checkpoints had reached train.max_steps already (nothing to do)


def micro_batch_size(train: TrainConfig, world_size: int) -> int:
    """Rows (LM stripes, VAE sentences) per micro-batch on each rank: ``batch_size = micro x
    grad_accum_steps x world_size``."""
    local_batch, rest = divmod(train.batch_size, world_size)
    if rest:
        raise ValueError(f"train.batch_size {train.batch_size} is not divisible by the {world_size} ranks of this job")
    if local_batch % train.grad_accum_steps:
        raise ValueError(
            f"each rank's batch ({local_batch} rows) must be divisible by train.grad_accum_steps "
            f"({train.grad_accum_steps})"
        )
    return local_batch // train.grad_accum_steps


class Trainer(TrainerCheckpoints):
    """Owns the task (model family: data, loss, validation), model, optimizer, averager and checkpoints of
    one rank.

    The DDP engine (and a single process). Engines differ only in a few hooks, which
    :class:`pipeline.deepspeed_engine.DeepSpeedTrainer` overrides: ``_setup_engine`` (wrap the model,
    build the optimizer), ``_open_checkpointer``, ``_autocast``, ``_zero_grad`` /
    ``_accumulation_context`` / ``_backward`` / ``_reduce_step`` / ``_gradient_norm`` / ``_optimizer_step`` (one
    optimizer step over ``grad_accum_steps`` micro-batches), ``save_checkpoint`` / ``restore``
    (sharing ``_progress_state``, ``_per_rank_state``, ``_load_progress``, ``_load_per_rank_state``)
    and ``close``.
    """

    engine_name = "ddp"
    # Several gloo ranks with train.gradient_reduction flat (auto on CPU): the gradients live in one buffer
    # reduced by one all-reduce per step (pipeline.distributed.FlatGradients) instead of a DDP wrapper.
    flat_gradients: FlatGradients | None = None

    def __init__(self, config: PipelineConfig, tracker=None, ctx: DistContext | None = None) -> None:
        self.config = config
        self.tracker = tracker
        self.ctx = ctx or DistContext()
        self.train_cfg = cfg = config.train
        if cfg.engine != self.engine_name:
            raise ValueError(f"train.engine {cfg.engine!r} is not handled by this trainer; use pipeline.train.run_train")
        self.device = self.ctx.device
        if cfg.precision == "bf16" and self.device.type != "cuda":
            raise ValueError("train.precision bf16 needs a GPU (autocast on CUDA); use fp32 on CPU")
        self.micro_batch = micro_batch_size(cfg, self.ctx.world_size)
        self.manifest = load_manifest(config.data_dir)
        self.task: TrainingTask = build_task(config, self.manifest, self.ctx)  # checks the config against the data
        self.model_config = self.task.model_config
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = self.task.build_model().to(self.device)
        self.forward_module: torch.nn.Module = self.model
        self.optimizer: torch.optim.Optimizer
        self._setup_engine()
        self.averager = build_averager(self.model, cfg)
        self.checkpointer = self._open_checkpointer()
        self.background_saves = self._open_background_saves()
        self.step = 0
        self.lr_scale = 1.0
        self.divergence_restarts = 0
        self.tokens_seen = 0
        self.last_report: AveragingReport | None = None
        self._report_step: int | None = None  # the step last_report was measured at
        self.guard = DivergenceGuard(cfg.divergence_loss_factor)
        self.divergence: str | None = None  # why the last train_step diverged (None: it did not)
        self._step_metrics: dict[str, float] = {}  # the task's figures of the last step (mean over ranks)
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_log = TrainLog(config.run_dir / TRAIN_LOG_FILE, enabled=self.ctx.is_main)

    # ----------------------------------------------------------------------------- engine hooks

    def _seed_rank(self) -> None:
        """Different dropout masks per rank, reproducible per (seed, rank)."""
        torch.manual_seed(self.train_cfg.seed + 1_000_003 * self.ctx.rank)

    def _gradient_reduction(self) -> str | None:
        """How this job averages gradients over its ranks: ``flat``, ``ddp``, or None (a world of one)."""
        if not self.ctx.distributed:
            return None
        chosen = self.train_cfg.gradient_reduction
        has_buffers = next(self.model.buffers(), None) is not None
        if chosen == "auto":
            return "flat" if self.ctx.backend == "gloo" and not has_buffers else "ddp"
        if chosen == "flat" and has_buffers:
            raise ValueError("train.gradient_reduction flat: this model has buffers, which only DDP keeps equal on "
                             "every rank (it broadcasts them before each forward); use ddp or auto")
        return chosen

    def _setup_engine(self) -> None:
        """Wrap ``self.model`` for training (``self.forward_module``) and build ``self.optimizer``."""
        reduction = self._gradient_reduction()
        if reduction == "flat":
            self.flat_gradients = FlatGradients(self.ctx, self.model.parameters())
        elif reduction == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            self.forward_module = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        if self.ctx.is_main and reduction is not None:
            log.debug("gradients averaged over %d ranks by %s", self.ctx.world_size,
                      "one flat all-reduce per step" if reduction == "flat" else "DDP")
        self._seed_rank()
        self.optimizer = build_optimizer(self.model, self.train_cfg)

    def close(self) -> None:
        """Wait for a background checkpoint save in flight (training stopped on a request or an error: the
        save still commits; its failure is logged), then release what the engine holds (DDP's reducer
        holds the process group)."""
        if self.background_saves is not None:
            self.background_saves.close()
        self.forward_module = self.model

    # ----------------------------------------------------------------------------- state

    def _autocast(self):
        if self.train_cfg.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _validation_loss(self) -> float:
        """The task's validation loss of the current weights (nats/token), the same on every rank."""
        loss_sum, count = self.task.validation_loss(self.model)
        total, n = all_reduce_sum(self.ctx, [loss_sum, count])
        return total / n

    def _log_line(self, record: dict[str, Any]) -> None:
        self.train_log.append(record)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # One optimizer step over grad_accum_steps micro-batches: _zero_grad, then per micro-batch
    # (inside _accumulation_context) forward + _backward(objective), then _reduce_step (the step's
    # figures over the ranks; flat reduction: the gradients too), _gradient_norm and, when the loss and
    # the norm are finite, _optimizer_step.

    def _zero_grad(self) -> None:
        if self.flat_gradients is not None:
            self.flat_gradients.zero_()  # the gradients stay views into the one buffer all-reduced
        else:
            self.optimizer.zero_grad(set_to_none=True)

    def _accumulation_context(self, micro_step: int):
        """DDP all-reduces gradients on the last micro-batch only."""
        if micro_step < self.train_cfg.grad_accum_steps - 1 and self.forward_module is not self.model:
            return self.forward_module.no_sync()
        return contextlib.nullcontext()

    def _objective(self, loss: torch.Tensor) -> torch.Tensor:
        """What one micro-batch contributes to the step's gradient: its share of the mean loss (+ L2)."""
        cfg, accum = self.train_cfg, self.train_cfg.grad_accum_steps
        objective = loss / accum
        if cfg.optimizer.l2_penalty > 0:
            l2 = sum(p.pow(2).sum() for p in self.model.parameters())
            objective = objective + 0.5 * cfg.optimizer.l2_penalty * l2 / accum
        return objective

    def _backward(self, objective: torch.Tensor) -> None:
        objective.backward()

    def _reduce_step(self, values: list[float]) -> list[float]:
        """``values`` summed over the ranks; with flat gradient reduction the same all-reduce averages the
        gradients (DDP and DeepSpeed averaged them during backward)."""
        if self.flat_gradients is not None:
            return self.flat_gradients.all_reduce(values)
        return all_reduce_sum(self.ctx, values)

    def _gradient_norm(self) -> float:
        """Clip the accumulated gradient; returns its norm before clipping."""
        clip = self.train_cfg.optimizer.clip_norm
        return float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), clip if clip is not None else math.inf))

    def _optimizer_step(self) -> None:
        self.optimizer.step()

    def _skip_step(self) -> None:
        """A diverged step is not applied (its gradients are dropped with the reload that follows)."""

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (mean training loss over all ranks in nats/token, gradient norm).

        When the step diverged (:class:`~pipeline.divergence.DivergenceGuard`: non-finite, or the loss
        exploded) it is not applied, and ``self.divergence`` names why (the caller recovers).
        """
        cfg, task = self.train_cfg, self.task
        if task.before_step(self.step, self.model):
            self._restart_optimization()
        batch = task.next_batch()
        self._set_step_lr(batch)  # variable BPTT: lr x window / bptt (all param groups, x lr_scale)
        accum, micro = cfg.grad_accum_steps, self.micro_batch
        task.begin_step(batch, self.model, accum, micro)
        self.model.train()
        self._zero_grad()
        parts: list[MicroBatchLoss] = []
        for m in range(accum):
            with self._accumulation_context(m):
                with self._autocast():
                    part = task.micro_batch_loss(self.forward_module, batch, m, micro)
                self._backward(self._objective(part.objective))
            parts.append(part)
        if parts[0].weight is None:  # every micro-batch (and rank) counts the same: the mean of the means
            local_loss, local_weight = float(torch.stack([part.value for part in parts]).mean()), 1.0
        else:  # weighted by what the value is per (tokens): the global per-token figure, whatever the split
            local_loss = sum(float(part.value) * float(part.weight) for part in parts)
            local_weight = sum(float(part.weight) for part in parts)
        names = sorted(parts[0].metrics)
        local_metrics = [float(torch.stack([part.metrics[name].float() for part in parts]).mean()) for name in names]
        totals = self._reduce_step([local_loss, local_weight, float(task.batch_tokens(batch)), *local_metrics])
        grad_norm = self._gradient_norm()  # of the averaged gradient (flat reduction: averaged just above)
        loss_value = totals[0] / totals[1]
        self._batch_tokens = totals[2] / self.ctx.world_size  # per rank: tokens/s is summed over ranks below
        self._step_metrics = {name: value / self.ctx.world_size for name, value in zip(names, totals[3:])}
        self.divergence = self.guard.check(loss_value, grad_norm)  # the same decision on every rank
        if self.divergence is not None:
            self._skip_step()
            return loss_value, grad_norm
        self._optimizer_step()
        self.guard.accept(loss_value)
        self.averager.update()
        task.accept_step()
        self.step += 1
        self.tokens_seen += int(totals[2])
        return loss_value, grad_norm

    def _restart_optimization(self) -> None:
        """The task changed the weights (a decoder reset): optimizer moments and weight averages of the old
        weights no longer apply, so both start afresh (the learning-rate scale is kept)."""
        self._reset_optimizer_state()
        self.averager = build_averager(self.model, self.train_cfg)
        self.last_report, self._report_step = None, None
        if self.ctx.is_main:
            log.info("step %d: the task reset part of the model; optimizer state and weight averages start afresh",
                     self.step)

    def _reset_optimizer_state(self) -> None:
        self.optimizer.state.clear()

    def evaluate_and_adapt(self) -> AveragingReport:
        report = self.averager.evaluate_and_adapt(self._validation_loss)
        self.last_report = report
        self._report_step = self.step
        with self.averager.reported_weights():  # the weights valid/reported_loss scored
            self._task_eval_metrics = self.task.after_evaluation(self.step, self.model)
        return report

    def train(self) -> TrainResult:
        cfg = self.train_cfg
        resumed = self.resume()
        if not resumed:
            self._apply_lr()
            self.train_log.truncate_after(0)  # a log left by an earlier run whose checkpoints are gone
            self.checkpoint_step()  # step 0: divergence recovery always has somewhere to go back to
        elif self.step >= cfg.max_steps and self._final_model_saved():
            return self._nothing_to_do()
        if self.tracker is not None:
            self.tracker.confirm_stage(fresh_start=not resumed)
        # Memory of every rank, gathered so that rank 0 (the only one talking to MLflow) reports all.
        reports = gather_objects(self.ctx, memory_report(self.model, self.optimizer, self.averager))
        if self.tracker is not None:
            self.tracker.log_metrics(
                {f"memory/rank{r}/{k}": v for r, report in enumerate(reports) for k, v in report.items()}, step=self.step
            )
        if self.ctx.is_main:
            for r, report in enumerate(reports):
                log.debug("memory on rank %d (MiB): %s", r, {k: round(v, 1) for k, v in report.items()})
        with progress(cfg.max_steps, "train", "steps", initial=self.step, disable=not self.ctx.is_main) as bar:
            return self._train_loop(bar)

    def _train_loop(self, bar: Any) -> TrainResult:
        cfg = self.train_cfg
        window_loss, window_steps, window_tokens = 0.0, 0, 0
        window_metrics: dict[str, float] = {}
        window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            self.divergence = None
            loss, grad_norm = self.train_step()
            if self.divergence is None and not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self.divergence = f"non-finite loss or gradient (loss={loss}, grad norm={grad_norm})"
            if self.divergence is not None:
                self._recover_from_divergence(self.divergence)
                bar.update(self.step - bar.n)  # back to the checkpoint's step
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                window_metrics = {}
                window_start = time.perf_counter()
                continue
            bar.update(1)
            self._log_line({"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": self._lr()})
            self._last_grad_norm = grad_norm
            window_loss += loss
            window_steps += 1
            window_tokens += self._batch_tokens
            for name, value in self._step_metrics.items():
                window_metrics[name] = window_metrics.get(name, 0.0) + value
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                # Throughput of every rank, summed: the job's tokens per second.
                tokens_per_second = all_reduce_sum(self.ctx, [window_tokens / max(elapsed, 1e-9)])[0]
                metrics = {
                    "train/loss": window_loss / window_steps,
                    "train/grad_norm": grad_norm,
                    "lr": self._lr(),
                    "tokens_per_second": tokens_per_second,
                    "epoch": self.task.epoch,
                    **{f"train/{name}": total / window_steps for name, total in window_metrics.items()},
                }
                bar.set_postfix({"loss": round(metrics["train/loss"], 4), "tok/s": round(tokens_per_second)}, refresh=False)
                if self.ctx.is_main:
                    log.debug("step %d  loss %.4f  lr %.3g  %.0f tok/s", self.step, metrics["train/loss"], metrics["lr"],
                              tokens_per_second)
                if self.tracker is not None:
                    self.tracker.log_metrics(metrics, step=self.step)
                self._last_throughput = tokens_per_second
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                window_metrics = {}
                window_start = time.perf_counter()
            if self.step % cfg.eval_every == 0:
                eval_started = time.perf_counter()
                self._report(self.evaluate_and_adapt())
                window_start += time.perf_counter() - eval_started  # keep tokens/s a training-only figure
            if self.step % self.config.checkpoint_interval == 0 or self.step == cfg.max_steps:
                ckpt_started = time.perf_counter()
                self.checkpoint_step(final=self.step == cfg.max_steps)
                window_start += time.perf_counter() - ckpt_started
        return self.finish()

    def _final_model_saved(self) -> bool:
        """Is there a final model of this step already (every rank gets rank 0's answer)?"""
        return on_main(self.ctx, lambda: final_model_step(self.config)) == self.step

    def _nothing_to_do(self) -> TrainResult:
        """The checkpoints reached ``train.max_steps`` and the final model was saved: nothing is trained,
        saved, logged or registered again."""
        if self.ctx.is_main:
            log.info("train: nothing to do, the newest checkpoint is at step %d and train.max_steps is %d "
                     "(raise --train.max_steps to train further)", self.step, self.train_cfg.max_steps)
        report = self.last_report
        return TrainResult(
            step=self.step, reported_loss=report.loss if report else None, reported_source=report.source if report else None,
            divergence_restarts=self.divergence_restarts, model_path=self.config.run_dir / FINAL_MODEL_FILE, trained=False,
        )

    def _report(self, report: AveragingReport) -> None:
        metrics: dict[str, float] = {
            "valid/reported_loss": report.loss,
            "valid/reported_length": report.length,
            "averaging/short_length": report.short_length,
            "averaging/long_length": report.long_length,
            "lr": self._lr(),
        }
        if self.step % self.train_cfg.log_every != 0:
            # The training figures of the latest window, so that every evaluation step shows all of them
            # (a logging step has just logged them).
            metrics["train/grad_norm"] = getattr(self, "_last_grad_norm", None)
            metrics["tokens_per_second"] = getattr(self, "_last_throughput", None)
        for name in ("raw", "short", "long"):
            value = getattr(report, f"{name}_loss")
            if value is not None and math.isfinite(value):
                metrics[f"valid/{name}_loss"] = value
                if self.task.unit == "char":
                    metrics[f"valid/{name}_bpc"] = bits_per_token(value)
        if self.task.unit == "char" and math.isfinite(report.loss):
            metrics["valid/reported_bpc"] = bits_per_token(report.loss)
        metrics.update(getattr(self, "_task_eval_metrics", {}))
        if self.ctx.is_main:
            log.info(
                "eval @%d: reported %.4f (%s, length %d)  raw %s short %s long %s  S=%d L=%d  %s",
                self.step, report.loss, report.source, report.length, _fmt(report.raw_loss), _fmt(report.short_loss),
                _fmt(report.long_loss), report.short_length, report.long_length, report.event,
            )
        self._log_line({"step": self.step, "eval": vars(report)})
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.step)
        if self.config.tune.storage is not None:
            # An Optuna trial (`python -m pipeline tune`): report this evaluation to the study; pruned -> a
            # checkpoint of this step, then TrialPruned on every rank (the later stages are skipped).
            from pipeline.tune.reporting import report_evaluation

            report_evaluation(self, report)

    def finish(self) -> TrainResult:
        """Save the reported (2TA long-average, or raw while better) weights as the final model (rank 0), once
        every checkpoint has committed."""
        self.wait_for_checkpoint()
        path = self.config.run_dir / FINAL_MODEL_FILE
        report = self.last_report
        if self.ctx.is_main:
            with self.averager.reported_weights():
                save_final_model(
                    path, self.model, self.model_config,
                    {"step": self.step, "weights": report.source if report else "raw",
                     "averaging_length": report.length if report else 1,
                     "dataset": self.manifest.name, "unit": self.task.unit},
                    task=self.task.name,
                )
            publish_final_model(self.config, path)
            if self.tracker is not None:
                self.tracker.log_model(path, metadata={"step": self.step, "averaging_length": report.length if report else 1})
                self.tracker.log_training_plots(self.task.unit)
        return TrainResult(
            step=self.step, reported_loss=report.loss if report else None, reported_source=report.source if report else None,
            divergence_restarts=self.divergence_restarts, model_path=path,
        )


def _fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


