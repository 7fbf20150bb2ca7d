"""The ``train`` stage: truncated BPTT with Two-Tailed Averaging, checkpoints and divergence recovery.

Runs as one process or data-parallel under ``torchrun`` (DDP: NCCL on GPU, gloo on CPU). Each rank
reads its own contiguous block of batch stripes (``BatchStream(rank, world_size)``), so the global
batch, the mean loss and hence the learning-rate semantics are those of a single process.
``train.engine: deepspeed`` runs the same loop on a DeepSpeed engine (ZeRO stage 1 or 2, see
:mod:`pipeline.deepspeed_engine`, which overrides the engine hooks of :class:`Trainer`);
:func:`run_train` picks the trainer from the config.

The loop (one optimizer step per BPTT window, hidden state carried across windows):

1. per micro-batch (``grad_accum_steps`` slices of the rank's stripes): multi-sample dropout
   objective (thesis §4.3) + optional L2 penalty, backward (DDP syncs on the last micro-batch);
2. clip the gradient norm; a divergence - a non-finite loss or gradient norm, or a loss above
   ``divergence_loss_factor`` times its lowest smoothed value (the same decision on every rank) -
   reloads the best checkpoint (by the reported validation loss) and multiplies the learning rate
   by ``divergence_lr_decay`` (thesis §4.4); the newer checkpoints of the diverged trajectory are
   set aside;
3. optimizer step, then ``averager.update()`` (2TA adds the new weights to both averages; the
   weights are identical on all ranks, so are the averages);
4. every ``eval_every`` steps the averager evaluates raw / short / long weights on validation (each
   rank scores a shard, the sums are all-reduced: one consistent decision) and adapts (thesis
   Algorithm 2); every ``checkpoint_interval`` steps a checkpoint is committed (DCP through fsspec,
   see :mod:`pipeline.checkpoint.protocol`: digests, commit record, failed saves).

Everything needed to continue bit-exactly is checkpointed: model, optimizer, averager, data
position, per-rank carried hidden state and RNG state, learning-rate scale, divergence guard and
step. When checkpoints exist but none can be loaded, training stops (exit code 4) unless
``checkpoint.on_unreadable`` is ``restart``; it never starts over on its own.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict, set_state_dict

from models import ModelConfig, RecurrentLM, detach_state, multi_sample_loss
from pipeline.averaging import (
    AveragingReport,
    ExponentialAveraging,
    NoAveraging,
    TailAveraging,
    TwoTailedAveraging,
)
from pipeline.checkpoint import CheckpointInfo, CheckpointLease, DCPCheckpointer, RetryPolicy, UnreadableCheckpoints
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.console import progress
from pipeline.data import BatchStream, DatasetManifest, load_manifest, load_tokens
from pipeline.distributed import DistContext, all_reduce_sum, gather_objects, on_main
from pipeline.divergence import DivergenceGuard
from pipeline.errors import EXIT_DIVERGED, PipelineError
from pipeline.evaluate import FINAL_MODEL_FILE, bits_per_token, evaluate_nll, publish_final_model, save_final_model
from pipeline.sizes import check_training_sizes
from pipeline.tracking import dataset_tags
from pipeline.train_log import TRAIN_LOG_FILE, TrainLog

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


class TrainingDiverged(PipelineError, RuntimeError):
    """Raised when the loss keeps diverging after ``max_divergence_restarts`` restarts (exit code 6)."""

    exit_code = EXIT_DIVERGED


def build_optimizer(model: torch.nn.Module, train: TrainConfig) -> torch.optim.Optimizer:
    opt = train.optimizer
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
    return NoAveraging(params)


def model_config_for(config: PipelineConfig, manifest: DatasetManifest) -> ModelConfig:
    """The model config with the vocabulary size taken from the dataset manifest."""
    if config.model.vocab_size not in (None, manifest.vocab_size):
        raise ValueError(
            f"model.vocab_size is {config.model.vocab_size} but dataset {manifest.name} has {manifest.vocab_size} "
            "symbols: remove model.vocab_size from the config (it is filled in from the data)"
        )
    return config.model.model_copy(update={"vocab_size": manifest.vocab_size})


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
    """Stripes per micro-batch on each rank: ``batch_size = micro x grad_accum_steps x world_size``."""
    local_batch, rest = divmod(train.batch_size, world_size)
    if rest:
        raise ValueError(f"train.batch_size {train.batch_size} is not divisible by the {world_size} ranks of this job")
    if local_batch % train.grad_accum_steps:
        raise ValueError(
            f"each rank's batch ({local_batch} stripes) must be divisible by train.grad_accum_steps "
            f"({train.grad_accum_steps})"
        )
    return local_batch // train.grad_accum_steps


def _shard(tokens: np.ndarray, ctx: DistContext, limit: int | None) -> np.ndarray:
    """This rank's contiguous share of the (first ``limit``) validation tokens."""
    if limit is not None:
        tokens = tokens[: limit + 1]
    bounds = np.linspace(0, len(tokens), ctx.world_size + 1).astype(np.int64)
    return tokens[bounds[ctx.rank] : bounds[ctx.rank + 1]]


class Trainer:
    """Owns the model, optimizer, averager, data stream and checkpoints of one rank.

    The DDP engine (and a single process). Engines differ only in a few hooks, which
    :class:`pipeline.deepspeed_engine.DeepSpeedTrainer` overrides: ``_setup_engine`` (wrap the model,
    build the optimizer), ``_open_checkpointer``, ``_autocast``, ``_zero_grad`` /
    ``_accumulation_context`` / ``_backward`` / ``_gradient_norm`` / ``_optimizer_step`` (one
    optimizer step over ``grad_accum_steps`` micro-batches), ``save_checkpoint`` / ``restore``
    (sharing ``_progress_state``, ``_per_rank_state``, ``_load_progress``, ``_load_per_rank_state``)
    and ``close``.
    """

    engine_name = "ddp"

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
        check_training_sizes(config, self.manifest, self.ctx.world_size)
        self.model_config = model_config_for(config, self.manifest)
        torch.manual_seed(cfg.seed)  # identical initial weights on every rank
        self.model = RecurrentLM(self.model_config).to(self.device)
        self.forward_module: torch.nn.Module = self.model
        self.optimizer: torch.optim.Optimizer
        self._setup_engine()
        self.averager = build_averager(self.model, cfg)
        self.stream = BatchStream(
            load_tokens(config.data_dir, "train"), cfg.batch_size, cfg.bptt, rank=self.ctx.rank,
            world_size=self.ctx.world_size,
        )
        self.valid_shard = _shard(load_tokens(config.data_dir, "valid"), self.ctx, cfg.eval_tokens)
        self.checkpointer = self._open_checkpointer()
        self.step = 0
        self.lr_scale = 1.0
        self.divergence_restarts = 0
        self.tokens_seen = 0
        self.last_report: AveragingReport | None = None
        self._report_step: int | None = None  # the step last_report was measured at
        self.guard = DivergenceGuard(cfg.divergence_loss_factor)
        self.divergence: str | None = None  # why the last train_step diverged (None: it did not)
        self.states: list | None = None  # carried hidden state per micro-batch, rows = D * micro_batch
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_log = TrainLog(config.run_dir / TRAIN_LOG_FILE, enabled=self.ctx.is_main)

    # ----------------------------------------------------------------------------- engine hooks

    def _seed_rank(self) -> None:
        """Different dropout masks per rank, reproducible per (seed, rank)."""
        torch.manual_seed(self.train_cfg.seed + 1_000_003 * self.ctx.rank)

    def _setup_engine(self) -> None:
        """Wrap ``self.model`` for training (``self.forward_module``) and build ``self.optimizer``."""
        if self.ctx.distributed:
            from torch.nn.parallel import DistributedDataParallel

            self.forward_module = DistributedDataParallel(
                self.model, device_ids=[self.device.index] if self.device.type == "cuda" else None
            )
        self._seed_rank()
        self.optimizer = build_optimizer(self.model, self.train_cfg)

    def _retry_policy(self) -> RetryPolicy:
        ck = self.config.checkpoint
        return RetryPolicy(ck.retry_attempts, ck.retry_base_delay, ck.retry_max_delay)

    def _open_checkpointer(self):
        ck = self.config.checkpoint
        return DCPCheckpointer.open(
            self.config.checkpoint_url, self.ctx, storage_options=ck.storage_options, retry=self._retry_policy(),
            max_failed_saves=ck.max_failed_saves,
        )

    def close(self) -> None:
        """Release what the engine holds (DDP's reducer holds the process group)."""
        self.forward_module = self.model

    # ----------------------------------------------------------------------------- state

    def _autocast(self):
        if self.train_cfg.precision == "bf16":
            return torch.autocast("cuda", dtype=torch.bfloat16)
        return contextlib.nullcontext()

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
        return {
            "step": self.step,
            "stream": self.stream.state_dict(),
            "lr_scale": self.lr_scale,
            "divergence_restarts": self.divergence_restarts,
            "tokens_seen": self.tokens_seen,
            "last_report": None if self.last_report is None else json.dumps(vars(self.last_report)),
        }

    def _load_progress(self, progress: dict[str, Any], *, keep_lr_scale: bool = False) -> None:
        self.step = int(progress["step"])
        self.stream.load_state_dict(progress["stream"])
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
        hidden = per_rank["hidden"]
        self.states = None if hidden is None else [
            [(h[i].to(self.device), h[i + 1].to(self.device)) for i in range(0, len(h), 2)] for h in hidden
        ]

    def _per_rank_state(self) -> dict[str, Any]:
        hidden = None
        if self.states is not None:
            hidden = [[t.detach().cpu().clone() for pair in state for t in pair] for state in self.states]
        # The divergence guard is the same on every rank; kept here, where a missing entry is harmless.
        state = {"rng": torch.get_rng_state(), "hidden": hidden, "rank": self.ctx.rank,
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

    def save_checkpoint(self, *, final: bool = False) -> None:
        """Commit a checkpoint of this step (collective), then prune old ones. ``final``: the run's last save,
        which must succeed (:class:`~pipeline.checkpoint.CheckpointSaveFailed` otherwise)."""
        saved = self.checkpointer.save(self.step, self._dcp_state(), self._per_rank_state(), self._checkpoint_meta(),
                                       final=final)
        if saved is not None:
            self.checkpointer.prune(self.config.checkpoint.keep_last, self.config.checkpoint.keep_best)

    def restore(self, *, prefer: str = "newest", keep_lr_scale: bool = False) -> CheckpointInfo | None:
        """Load the newest (``prefer="best"``: lowest reported validation loss) loadable checkpoint, the same
        on all ranks. Returns it, or None when there is none (raises when some exist but none loads)."""
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
        for group in self.optimizer.param_groups:
            group["lr"] = self.train_cfg.optimizer.lr * self.lr_scale

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

    def _validation_loss(self) -> float:
        nll, count = 0.0, 0
        if len(self.valid_shard) > 1:
            (nll,), count = evaluate_nll(
                self.model, self.valid_shard, batch_size=max(1, self.train_cfg.eval_batch_size // self.ctx.world_size),
                bptt=self.config.evaluate.bptt,
            )
        total, n = all_reduce_sum(self.ctx, [nll * count, float(count)])
        return total / n

    def _log_line(self, record: dict[str, Any]) -> None:
        self.train_log.append(record)

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

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    # One optimizer step over grad_accum_steps micro-batches: _zero_grad, then per micro-batch
    # (inside _accumulation_context) forward + _backward(objective), then _gradient_norm and, when
    # the loss and the norm are finite, _optimizer_step.

    def _zero_grad(self) -> None:
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
        cfg = self.train_cfg
        batch = self.stream.next_batch()
        inputs, targets = batch.inputs.to(self.device), batch.targets.to(self.device)
        accum, micro = cfg.grad_accum_steps, self.micro_batch
        if self.states is None or batch.reset_state:
            self.states = [self.model.initial_state(micro * cfg.dropout_samples, device=self.device) for _ in range(accum)]
        self.model.train()
        self._zero_grad()
        losses, new_states = [], []
        for m in range(accum):
            cols = slice(m * micro, (m + 1) * micro)
            with self._accumulation_context(m):
                with self._autocast():
                    loss, state = multi_sample_loss(
                        self.forward_module, inputs[:, cols], targets[:, cols], self.states[m], cfg.dropout_samples
                    )
                self._backward(self._objective(loss))
            losses.append(loss.detach().float())
            new_states.append(detach_state(state))
        grad_norm = self._gradient_norm()
        local_loss = float(torch.stack(losses).mean())
        loss_value = all_reduce_sum(self.ctx, [local_loss])[0] / self.ctx.world_size
        self.divergence = self.guard.check(loss_value, grad_norm)  # the same decision on every rank
        if self.divergence is not None:
            self._skip_step()
            return loss_value, grad_norm
        self._optimizer_step()
        self.guard.accept(loss_value)
        self.averager.update()
        self.states = new_states
        self.step += 1
        self.tokens_seen += batch.targets.numel() * self.ctx.world_size
        return loss_value, grad_norm

    def evaluate_and_adapt(self) -> AveragingReport:
        report = self.averager.evaluate_and_adapt(self._validation_loss)
        self.last_report = report
        self._report_step = self.step
        return report

    def train(self) -> TrainResult:
        cfg = self.train_cfg
        resumed = self.resume()
        if not resumed:
            self._apply_lr()
            self.train_log.truncate_after(0)  # a log left by an earlier run whose checkpoints are gone
            self.save_checkpoint()  # step 0: divergence recovery always has somewhere to go back to
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
                window_start = time.perf_counter()
                continue
            bar.update(1)
            self._log_line({"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": self._lr()})
            self._last_grad_norm = grad_norm
            window_loss += loss
            window_steps += 1
            window_tokens += cfg.batch_size // self.ctx.world_size * cfg.bptt
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                # Throughput of every rank, summed: the job's tokens per second.
                tokens_per_second = all_reduce_sum(self.ctx, [window_tokens / max(elapsed, 1e-9)])[0]
                metrics = {
                    "train/loss": window_loss / window_steps,
                    "train/grad_norm": grad_norm,
                    "lr": self._lr(),
                    "tokens_per_second": tokens_per_second,
                    "epoch": self.stream.epoch,
                }
                bar.set_postfix({"loss": round(metrics["train/loss"], 4), "tok/s": round(tokens_per_second)}, refresh=False)
                if self.ctx.is_main:
                    log.debug("step %d  loss %.4f  lr %.3g  %.0f tok/s", self.step, metrics["train/loss"], metrics["lr"],
                              tokens_per_second)
                if self.tracker is not None:
                    self.tracker.log_metrics(metrics, step=self.step)
                self._last_throughput = tokens_per_second
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                window_start = time.perf_counter()
            if self.step % cfg.eval_every == 0:
                eval_started = time.perf_counter()
                self._report(self.evaluate_and_adapt())
                window_start += time.perf_counter() - eval_started  # keep tokens/s a training-only figure
            if self.step % self.config.checkpoint_interval == 0 or self.step == cfg.max_steps:
                ckpt_started = time.perf_counter()
                self.save_checkpoint(final=self.step == cfg.max_steps)
                window_start += time.perf_counter() - ckpt_started
        return self.finish()

    def _final_model_saved(self) -> bool:
        """Is there a final model of this step already (every rank gets rank 0's answer)?"""
        from pipeline.evaluate import final_model_step

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
                if self.manifest.unit == "char":
                    metrics[f"valid/{name}_bpc"] = bits_per_token(value)
        if self.manifest.unit == "char" and math.isfinite(report.loss):
            metrics["valid/reported_bpc"] = bits_per_token(report.loss)
        if self.ctx.is_main:
            log.info(
                "eval @%d: reported %.4f (%s, length %d)  raw %s short %s long %s  S=%d L=%d  %s",
                self.step, report.loss, report.source, report.length, _fmt(report.raw_loss), _fmt(report.short_loss),
                _fmt(report.long_loss), report.short_length, report.long_length, report.event,
            )
        self._log_line({"step": self.step, "eval": vars(report)})
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.step)

    def finish(self) -> TrainResult:
        """Save the reported (2TA long-average, or raw while better) weights as the final model (rank 0)."""
        path = self.config.run_dir / FINAL_MODEL_FILE
        report = self.last_report
        if self.ctx.is_main:
            with self.averager.reported_weights():
                save_final_model(
                    path, self.model, self.model_config,
                    {"step": self.step, "weights": report.source if report else "raw",
                     "averaging_length": report.length if report else 1,
                     "dataset": self.manifest.name, "unit": self.manifest.unit},
                )
            publish_final_model(self.config, path)
            if self.tracker is not None:
                self.tracker.log_model(path, metadata={"step": self.step, "averaging_length": report.length if report else 1})
                self.tracker.log_training_plots(self.manifest.unit)
        return TrainResult(
            step=self.step, reported_loss=report.loss if report else None, reported_source=report.source if report else None,
            divergence_restarts=self.divergence_restarts, model_path=path,
        )


def _fmt(loss: float | None) -> str:
    return "-" if loss is None else f"{loss:.4f}"


def trainer_class(config: PipelineConfig) -> type[Trainer]:
    """The trainer of ``config.train.engine``: DDP (this module) or DeepSpeed."""
    if config.train.engine == "deepspeed":
        from pipeline.deepspeed_engine import DeepSpeedTrainer

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
