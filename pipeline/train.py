"""The ``train`` stage: truncated BPTT with Two-Tailed Averaging, checkpoints and divergence recovery.

The loop (one optimizer step per BPTT window of contiguous batch stripes, hidden state carried
across windows):

1. multi-sample dropout objective (thesis §4.3) + optional L2 penalty, backward, clip the
   gradient norm;
2. a non-finite loss or gradient norm reloads the last committed checkpoint and multiplies the
   learning rate by ``divergence_lr_decay`` (thesis §4.4);
3. optimizer step, then ``averager.update()`` (2TA adds the new weights to both averages);
4. every ``eval_every`` steps the averager evaluates raw / short / long weights on validation and
   adapts (thesis Algorithm 2); every ``checkpoint_interval`` steps a checkpoint is committed.

Everything needed to continue bit-exactly is checkpointed: model, optimizer, averager, data
position, carried hidden state, RNG state, learning-rate scale and step.
"""

from __future__ import annotations

import json
import logging
import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from models import ModelConfig, RecurrentLM, detach_state, multi_sample_loss
from pipeline.averaging import (
    AveragingReport,
    ExponentialAveraging,
    NoAveraging,
    TailAveraging,
    TwoTailedAveraging,
)
from pipeline.checkpoint import CheckpointStore
from pipeline.config import PipelineConfig, TrainConfig
from pipeline.data import BatchStream, DatasetManifest, load_manifest, load_tokens
from pipeline.evaluate import FINAL_MODEL_FILE, bits_per_token, evaluate_nll, save_final_model

__all__ = ["TrainingDiverged", "Trainer", "TrainResult", "build_averager", "build_optimizer", "run_train"]

log = logging.getLogger(__name__)

TRAIN_LOG_FILE = "train_log.jsonl"


class TrainingDiverged(RuntimeError):
    """Raised when the loss keeps going non-finite after ``max_divergence_restarts`` restarts."""


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


@dataclass
class TrainResult:
    step: int
    reported_loss: float | None
    reported_source: str | None
    divergence_restarts: int
    model_path: Path


class Trainer:
    """Single-process trainer; owns the model, optimizer, averager, data stream and checkpoints."""

    def __init__(self, config: PipelineConfig, tracker=None) -> None:
        self.config = config
        self.tracker = tracker
        self.train_cfg = config.train
        self.manifest = load_manifest(config.data_dir)
        self.model_config = model_config_for(config, self.manifest)
        torch.manual_seed(self.train_cfg.seed)
        self.model = RecurrentLM(self.model_config)
        self.optimizer = build_optimizer(self.model, self.train_cfg)
        self.averager = build_averager(self.model, self.train_cfg)
        self.stream = BatchStream(load_tokens(config.data_dir, "train"), self.train_cfg.batch_size, self.train_cfg.bptt)
        self.valid_tokens = load_tokens(config.data_dir, "valid")
        self.store = CheckpointStore(config.checkpoint_url)
        self.step = 0
        self.lr_scale = 1.0
        self.divergence_restarts = 0
        self.tokens_seen = 0
        self.last_report: AveragingReport | None = None
        self.state = None  # carried hidden state, batch = dropout_samples * batch_size
        config.run_dir.mkdir(parents=True, exist_ok=True)
        self.train_log = config.run_dir / TRAIN_LOG_FILE

    # ----------------------------------------------------------------------------- state

    def state_dict(self) -> dict[str, Any]:
        return {
            "step": self.step,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "averager": self.averager.state_dict(),
            "stream": self.stream.state_dict(),
            "hidden": None if self.state is None else [t.clone() for pair in self.state for t in pair],
            "rng": torch.get_rng_state(),
            "lr_scale": self.lr_scale,
            "divergence_restarts": self.divergence_restarts,
            "tokens_seen": self.tokens_seen,
            "last_report": None if self.last_report is None else vars(self.last_report).copy(),
        }

    def load_state_dict(self, state: dict[str, Any], *, keep_lr_scale: bool = False) -> None:
        self.step = state["step"]
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.averager.load_state_dict(state["averager"])
        self.stream.load_state_dict(state["stream"])
        hidden = state["hidden"]
        self.state = None if hidden is None else [(hidden[i], hidden[i + 1]) for i in range(0, len(hidden), 2)]
        torch.set_rng_state(state["rng"])
        if not keep_lr_scale:
            self.lr_scale = state["lr_scale"]
            self.divergence_restarts = state["divergence_restarts"]
        self.tokens_seen = state["tokens_seen"]
        self.last_report = None if state["last_report"] is None else AveragingReport(**state["last_report"])
        self._apply_lr()

    def _apply_lr(self) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = self.train_cfg.optimizer.lr * self.lr_scale

    def save_checkpoint(self) -> None:
        self.store.save(self.step, self.state_dict())
        self.store.prune(self.train_cfg.keep_checkpoints)

    def resume(self) -> bool:
        """Continue from the newest committed checkpoint, if any. Returns whether it resumed."""
        found = self.store.load_latest()
        if found is None:
            return False
        step, state = found
        self.load_state_dict(state)
        log.info("resumed from %s/step-%08d", self.store.url, step)
        return True

    # ----------------------------------------------------------------------------- loop

    def _validation_loss(self) -> float:
        (nll,), _ = evaluate_nll(
            self.model, self.valid_tokens, batch_size=self.train_cfg.eval_batch_size, bptt=self.config.evaluate.bptt,
            max_tokens=self.train_cfg.eval_tokens,
        )
        return nll

    def _log_line(self, record: dict[str, Any]) -> None:
        with self.train_log.open("a") as f:
            f.write(json.dumps(record) + "\n")

    def _recover_from_divergence(self, loss: float, grad_norm: float) -> None:
        self.divergence_restarts += 1
        if self.divergence_restarts > self.train_cfg.max_divergence_restarts:
            raise TrainingDiverged(
                f"loss went non-finite at step {self.step + 1} (loss={loss}, grad norm={grad_norm}) after "
                f"{self.divergence_restarts - 1} restarts; lower train.optimizer.lr or raise train.max_divergence_restarts"
            )
        self.lr_scale *= self.train_cfg.divergence_lr_decay
        found = self.store.load_latest()
        if found is None:
            raise TrainingDiverged("loss went non-finite and there is no committed checkpoint to go back to")
        step, state = found
        self.load_state_dict(state, keep_lr_scale=True)
        log.warning(
            "non-finite loss (loss=%s, grad norm=%s): reloaded step %d, learning rate scaled to %.4g x (restart %d)",
            loss, grad_norm, step, self.lr_scale, self.divergence_restarts,
        )
        if self.tracker is not None:
            self.tracker.log_metrics({"divergence_restarts": self.divergence_restarts, "lr": self._lr()}, step=self.step)

    def _lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    def train_step(self) -> tuple[float, float]:
        """One optimizer step; returns (training loss in nats/token, gradient norm before clipping)."""
        cfg = self.train_cfg
        batch = self.stream.next_batch()
        rows = batch.inputs.shape[1] * cfg.dropout_samples
        if self.state is None or batch.reset_state:
            self.state = self.model.initial_state(rows)
        self.model.train()
        loss, new_state = multi_sample_loss(self.model, batch.inputs, batch.targets, self.state, cfg.dropout_samples)
        objective = loss
        if cfg.optimizer.l2_penalty > 0:
            objective = objective + 0.5 * cfg.optimizer.l2_penalty * sum(p.pow(2).sum() for p in self.model.parameters())
        self.optimizer.zero_grad(set_to_none=True)
        objective.backward()
        max_norm = cfg.optimizer.clip_norm if cfg.optimizer.clip_norm is not None else math.inf
        grad_norm = float(torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm))
        loss_value = float(loss.detach())
        if not (math.isfinite(loss_value) and math.isfinite(grad_norm)):
            return loss_value, grad_norm
        self.optimizer.step()
        self.averager.update()
        self.state = detach_state(new_state)
        self.step += 1
        self.tokens_seen += batch.targets.numel()
        return loss_value, grad_norm

    def evaluate_and_adapt(self) -> AveragingReport:
        report = self.averager.evaluate_and_adapt(self._validation_loss)
        self.last_report = report
        return report

    def train(self) -> TrainResult:
        cfg = self.train_cfg
        if not self.resume():
            self._apply_lr()
            self.save_checkpoint()  # step 0: divergence recovery always has somewhere to go back to
        window_loss, window_steps, window_tokens = 0.0, 0, 0
        window_start = time.perf_counter()
        while self.step < cfg.max_steps:
            loss, grad_norm = self.train_step()
            if not (math.isfinite(loss) and math.isfinite(grad_norm)):
                self._recover_from_divergence(loss, grad_norm)
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                window_start = time.perf_counter()
                continue
            self._log_line({"step": self.step, "loss": loss, "grad_norm": grad_norm, "lr": self._lr()})
            window_loss += loss
            window_steps += 1
            window_tokens += cfg.batch_size * cfg.bptt
            if self.step % cfg.log_every == 0 or self.step == cfg.max_steps:
                elapsed = time.perf_counter() - window_start
                metrics = {
                    "train/loss": window_loss / window_steps,
                    "train/grad_norm": grad_norm,
                    "lr": self._lr(),
                    "tokens_per_second": window_tokens / max(elapsed, 1e-9),
                    "epoch": self.stream.epoch,
                }
                log.info("step %d  loss %.4f  lr %.3g  %.0f tok/s", self.step, metrics["train/loss"], metrics["lr"],
                         metrics["tokens_per_second"])
                if self.tracker is not None:
                    self.tracker.log_metrics(metrics, step=self.step)
                window_loss, window_steps, window_tokens = 0.0, 0, 0
                window_start = time.perf_counter()
            if self.step % cfg.eval_every == 0:
                eval_started = time.perf_counter()
                report = self.evaluate_and_adapt()
                self._report(report)
                window_start += time.perf_counter() - eval_started  # keep tokens/s a training-only figure
            if self.step % cfg.checkpoint_interval == 0 or self.step == cfg.max_steps:
                self.save_checkpoint()
        return self.finish()

    def _report(self, report: AveragingReport) -> None:
        metrics: dict[str, float] = {
            "valid/reported_loss": report.loss,
            "valid/reported_length": report.length,
            "averaging/short_length": report.short_length,
            "averaging/long_length": report.long_length,
        }
        for name in ("raw", "short", "long"):
            value = getattr(report, f"{name}_loss")
            if value is not None and math.isfinite(value):
                metrics[f"valid/{name}_loss"] = value
                if self.manifest.unit == "char":
                    metrics[f"valid/{name}_bpc"] = bits_per_token(value)
        log.info(
            "eval @%d: reported %.4f (%s, length %d)  raw %s short %s long %s  S=%d L=%d  %s",
            self.step, report.loss, report.source, report.length, report.raw_loss, report.short_loss,
            report.long_loss, report.short_length, report.long_length, report.event,
        )
        self._log_line({"step": self.step, "eval": vars(report)})
        if self.tracker is not None:
            self.tracker.log_metrics(metrics, step=self.step)

    def finish(self) -> TrainResult:
        """Save the reported (2TA long-average, or raw while better) weights as the final model."""
        path = self.config.run_dir / FINAL_MODEL_FILE
        report = self.last_report
        with self.averager.reported_weights():
            save_final_model(
                path, self.model, self.model_config,
                {"step": self.step, "weights": report.source if report else "raw",
                 "averaging_length": report.length if report else 1,
                 "dataset": self.manifest.name, "unit": self.manifest.unit},
            )
        if self.tracker is not None:
            self.tracker.log_artifact(path, "model")
        return TrainResult(
            step=self.step, reported_loss=report.loss if report else None, reported_source=report.source if report else None,
            divergence_restarts=self.divergence_restarts, model_path=path,
        )


def run_train(config: PipelineConfig, tracker=None) -> TrainResult:
    """The ``train`` stage."""
    trainer = Trainer(config, tracker)
    if tracker is not None:
        tracker.log_dict(trainer.manifest.model_dump(mode="json"), "dataset_manifest.json")
        tracker.log_metrics({"model/parameters": sum(p.numel() for p in trainer.model.parameters())})
    return trainer.train()
