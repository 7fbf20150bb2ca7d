"""The DeepSpeed engine of the ``train`` stage (``train.engine: deepspeed``, ZeRO stage 1 or 2).

:class:`DeepSpeedTrainer` is the DDP :class:`~pipeline.trainer.Trainer` with its engine hooks replaced;
the loop, the objective (multi-sample dropout + L2 penalty), the carried hidden state, Two-Tailed
Averaging, divergence recovery and evaluation are the same code:

* ``deepspeed.initialize(model, optimizer=<our torch Adam / RAdam / SGD>, config=deepspeed_config(...))``,
  with the DeepSpeed config derived from the typed schema (:func:`deepspeed_config`): micro-batch,
  gradient accumulation and global batch consistent with ``train.batch_size``, the world size and
  ``train.grad_accum_steps``; clipping from ``train.optimizer.clip_norm``; ZeRO stage from
  ``train.zero_stage``; bf16 only for ``train.precision: bf16`` on GPU.
* Each micro-batch runs forward through the engine, ``engine.backward`` and ``engine.step`` (the
  optimizer steps at the accumulation boundary, after clipping; a non-finite gradient norm makes
  ZeRO skip the update and the trainer reload the last committed checkpoint with lr x
  ``divergence_lr_decay``).
* The learning rate lives in the param groups of that torch optimizer, which the ZeRO optimizer
  wraps and steps: ``Trainer._apply_lr`` sets it there (base lr x divergence ``lr_scale`` x the
  step's variable-BPTT factor, every group), exactly as for DDP; DeepSpeed has no lr scheduler here.
* ZeRO 1/2 shards optimizer state (and gradients) but keeps the parameters replicated, so the
  weight averager lives on every rank and sees the same weights everywhere; its state, the progress
  and the per-rank RNG / hidden state go into the checkpoint next to DeepSpeed's files
  (:mod:`pipeline.checkpoint.ds`: saved locally, uploaded, ``COMMITTED`` written last).
* On CPU DeepSpeed runs with ``DS_ACCELERATOR=cpu`` (set here when unset; it must be set before
  ``deepspeed`` is imported) over the job's gloo process group, and compiles no ops.
"""

from __future__ import annotations

import contextlib
import gc
import logging
import math
import os
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist

from pipeline.checkpoint.ds import DeepSpeedCheckpointer, rank_file, safe_checkpoint_engine
from pipeline.checkpoint.errors import CheckpointError
from pipeline.checkpoint.storage import CheckpointInfo
from pipeline.config import TrainConfig
from pipeline.trainer import Trainer, build_optimizer, micro_batch_size

__all__ = ["DeepSpeedTrainer", "deepspeed_config", "import_deepspeed"]

log = logging.getLogger(__name__)

TRAINER_STATE_FILE = "trainer_state.pt"


def deepspeed_config(train: TrainConfig, world_size: int, device: torch.device | str = "cpu") -> dict[str, Any]:
    """The DeepSpeed config of a run, derived from the typed schema (nothing else is read)."""
    device = torch.device(device)
    clip = train.optimizer.clip_norm
    return {
        "train_batch_size": train.batch_size,
        "train_micro_batch_size_per_gpu": micro_batch_size(train, world_size),
        "gradient_accumulation_steps": train.grad_accum_steps,
        "gradient_clipping": float(clip) if clip is not None else 0.0,
        "zero_optimization": {"stage": train.zero_stage},
        "bf16": {"enabled": train.precision == "bf16" and device.type == "cuda"},
        # The optimizer is ours (torch Adam / RAdam / SGD from train.optimizer), not one DeepSpeed builds.
        "zero_allow_untested_optimizer": True,
        "steps_per_print": 2**31 - 1,  # the trainer logs; DeepSpeed stays quiet
        "wall_clock_breakdown": False,
    }


def import_deepspeed(device: torch.device):
    """``import deepspeed`` for ``device``: on CPU with ``DS_ACCELERATOR=cpu`` (set here when unset)."""
    wanted = "cpu" if device.type == "cpu" else "cuda"
    current = os.environ.get("DS_ACCELERATOR")
    if current is None:
        if wanted == "cpu":
            os.environ["DS_ACCELERATOR"] = "cpu"  # read when deepspeed picks its accelerator
    elif current != wanted:
        raise ValueError(f"DS_ACCELERATOR is {current!r} but train.device is {device.type}; unset DS_ACCELERATOR")
    import deepspeed
    from deepspeed.accelerator import get_accelerator

    if get_accelerator().device_name() != wanted:
        raise ValueError(
            f"DeepSpeed picked the {get_accelerator().device_name()!r} accelerator but train.device is {device.type}; "
            f"set DS_ACCELERATOR={wanted} before deepspeed is first imported"
        )
    if wanted == "cpu":
        # DeepSpeed's shared-memory all-reduce for CPU inference would be compiled (tens of seconds, a
        # C++ toolchain) when its communication backend starts; training all-reduces through gloo.
        deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    if not log.isEnabledFor(logging.DEBUG):
        logging.getLogger("DeepSpeed").setLevel(logging.WARNING)
    return deepspeed


class DeepSpeedTrainer(Trainer):
    """The training loop of :class:`~pipeline.trainer.Trainer` on a DeepSpeed engine (ZeRO stage 1 or 2)."""

    engine_name = "deepspeed"

    # ----------------------------------------------------------------------------- engine

    def _setup_engine(self) -> None:
        cfg = self.train_cfg
        deepspeed = import_deepspeed(self.device)
        self._own_process_group = False
        if not dist.is_initialized():  # a world of one (no torchrun): DeepSpeed still wants a process group
            dist.init_process_group(
                "nccl" if self.device.type == "cuda" else "gloo", store=dist.HashStore(), rank=0, world_size=1,
                device_id=self.device if self.device.type == "cuda" else None,
            )
            self._own_process_group = True
            for key, value in (("RANK", "0"), ("LOCAL_RANK", "0"), ("WORLD_SIZE", "1")):
                os.environ.setdefault(key, value)  # what DeepSpeed reads where torchrun would set it
        self._seed_rank()
        optimizer = build_optimizer(self.model, cfg)
        self.ds_config = deepspeed_config(cfg, self.ctx.world_size, self.device)
        engine, _, _, _ = deepspeed.initialize(model=self.model, optimizer=optimizer, config=self.ds_config)
        engine.checkpoint_engine = safe_checkpoint_engine(engine._config)
        self.engine = engine
        self.forward_module = engine
        # Our torch optimizer: ZeRO hands it this rank's flat fp32 partition; the lr lives in its param groups.
        self.optimizer = optimizer

    def _open_checkpointer(self) -> DeepSpeedCheckpointer:
        ck = self.config.checkpoint
        return DeepSpeedCheckpointer.open(
            self.config.checkpoint_url, self.ctx, storage_options=ck.storage_options, retry=self._retry_policy(),
            max_failed_saves=ck.max_failed_saves,
        )

    def close(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            with contextlib.suppress(Exception):
                engine.destroy()
            self.engine = None
        self.forward_module = self.model
        if getattr(self, "_own_process_group", False) and dist.is_initialized():
            gc.collect()
            dist.destroy_process_group()
            self._own_process_group = False

    def _autocast(self):
        return contextlib.nullcontext()  # bf16 is DeepSpeed's (ds_config["bf16"]), not autocast

    # ----------------------------------------------------------------------------- one step

    def _zero_grad(self) -> None:
        pass  # the engine clears gradients after each optimizer step

    def _accumulation_context(self, micro_step: int):
        return contextlib.nullcontext()  # the engine reduces gradients at the accumulation boundary

    def _backward(self, objective: torch.Tensor) -> None:
        # _objective already divides by grad_accum_steps (as the DDP path does).
        self.engine.backward(objective, scale_wrt_gas=False)
        self.engine.step()  # an optimizer step (clip, update, zero grads) at the accumulation boundary only

    def _gradient_norm(self) -> float:
        norm = self.engine.get_global_grad_norm()
        return math.nan if norm is None else float(norm)

    def _optimizer_step(self) -> None:
        pass  # engine.step() stepped at the boundary (ZeRO skips the update itself on a non-finite norm)

    # ----------------------------------------------------------------------------- checkpoints

    def save_checkpoint(self, *, final: bool = False) -> None:
        meta = {**self._checkpoint_meta(), "zero_stage": self.train_cfg.zero_stage}

        def write_local(folder: Path, tag: str) -> None:
            self.engine.save_checkpoint(str(folder), tag=tag, save_latest=False)
            tag_dir = folder / tag
            tag_dir.mkdir(parents=True, exist_ok=True)
            if self.ctx.is_main:  # the averages are the same on every rank: saved once
                torch.save({"averager": self.averager.state_dict(), "progress": self._progress_state()},
                           tag_dir / TRAINER_STATE_FILE)
            torch.save(self._per_rank_state(), tag_dir / rank_file(self.ctx.rank))

        saved = self.checkpointer.save(self.step, write_local, meta, final=final)
        if saved is not None:
            self.checkpointer.prune(self.config.checkpoint.keep_last, self.config.checkpoint.keep_best)

    def restore(self, *, prefer: str = "newest", keep_lr_scale: bool = False) -> CheckpointInfo | None:
        """Load the newest (or best) loadable checkpoint (all ranks the same). Returns it, or None."""

        def read_local(folder: Path, tag: str) -> tuple[dict[str, Any], dict[str, Any]]:
            path, _ = self.engine.load_checkpoint(
                str(folder), tag=tag, load_module_strict=True, load_optimizer_states=True,
                load_lr_scheduler_states=False,
            )
            if path is None:
                raise CheckpointError(f"no DeepSpeed module states in checkpoint {tag}")
            tag_dir = folder / tag
            state = torch.load(tag_dir / TRAINER_STATE_FILE, map_location="cpu", weights_only=True)
            per_rank = torch.load(tag_dir / rank_file(self.ctx.rank), map_location="cpu", weights_only=True)
            return state, per_rank

        found = self.checkpointer.load_latest(read_local, prefer=prefer)
        if found is None:
            return None
        info, (state, per_rank) = found
        self.averager.load_state_dict(state["averager"])
        self._load_progress(state["progress"], keep_lr_scale=keep_lr_scale)
        self._load_per_rank_state(per_rank)
        self._apply_lr()  # the loaded optimizer state carries the lr of the save; ours includes lr_scale
        return info
