"""The typed configuration schema of a pipeline run.

One schema validates every field of every stage: unknown keys and wrong types are rejected
with a message that names the field (pydantic's ``extra="forbid"`` plus field validators).
The same schema generates the command-line options (see :mod:`pipeline.cli`) and is saved,
resolved, with every run (``resolved_config.yaml`` in the work dir and MLflow params).
"""

from __future__ import annotations

import functools
import importlib.resources
import os
import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, Field, ValidationError, model_validator

from models.config import ModelConfig, StrictConfig
from pipeline.cluster_config import ClusterConfig, GpuPodResources, PodResources, Toleration, quantity_value
from pipeline.errors import EXIT_CONFIG, PipelineError
from pipeline.tune_config import TuneTrialConfig
from pipeline.vae_config import VAEConfig

__all__ = [
    "AveragingConfig",
    "ClusterConfig",
    "GpuPodResources",
    "PodResources",
    "Toleration",
    "quantity_value",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "DynamicEvalConfig",
    "EvaluateConfig",
    "MCDropoutConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "TrackingConfig",
    "TrainConfig",
    "flatten_config",
    "config_purpose",
    "load_config",
    "shipped_config_names",
    "shipped_config_purposes",
]


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot be used; the message names the field and the fix."""

    exit_code = EXIT_CONFIG


class DataConfig(StrictConfig):
    """Where the corpus comes from and where its token arrays go."""

    dataset: Literal["enwik8", "text8", "ptb_word", "ptb_char", "text", "sentences", "synthetic"] = Field(
        description="Corpus: enwik8, text8, ptb_word, ptb_char, text (any text file, one token per byte), sentences "
        "(one sentence per line, optional TAB label) or synthetic (thesis §5.7.1: one of 10,000 symbols per sentence)."
    )
    source: str = Field(
        description="URL or path of the corpus archive / folder / text file; 'sample' = the bundled WikiText-2 excerpt."
    )
    dir: str | None = Field(
        default=None, description="Local folder of the tokenised arrays; null = data/<dataset> under the current folder."
    )
    cache_dir: str | None = Field(default=None, description="Download cache folder; null = .downloads next to the data folder.")
    vocab_size_cap: int | None = Field(
        default=None, gt=1, description="sentences: keep the most frequent train words (incl. <eos>, <unk>); others "
        "become <unk>; null = all."
    )
    verify_source: bool = Field(
        default=True, description="Check the download's size and sha256 against the known values; false = use it as is."
    )


class OptimizerConfig(StrictConfig):
    """Optimizer and the gradient-side regularisers."""

    name: Literal["adam", "radam", "sgd"] = Field(
        default="radam", description="adam, radam (Rectified Adam, thesis §4.4) or sgd (plain SGD, no momentum: AWD-LSTM, lr 30)."
    )
    lr: float = Field(default=2e-3, gt=0, description="Base learning rate (lowered by train.divergence_lr_decay after a divergence).")
    beta1: float = Field(default=0.0, ge=0, lt=1, description="Adam beta1, the first-moment decay; the thesis uses 0 (RMSProp-like).")
    beta2: float = Field(default=0.999, gt=0, lt=1, description="Adam beta2, the second-moment decay.")
    eps: float = Field(default=1e-9, gt=0, description="Adam epsilon (added to the denominator).")
    clip_norm: float | None = Field(default=10.0, gt=0, description="Clip the global gradient L2 norm to this; null = no clipping.")
    l2_penalty: float = Field(default=0.0, ge=0, description="L2 regularisation: adds l2_penalty * 0.5 * sum(w^2) to the loss; 0 = none.")


class AveragingConfig(StrictConfig):
    """Weight averaging: Two-Tailed Averaging (default), TA, EMA or NT-ASGD."""

    method: Literal["two_tailed", "tail", "ema", "nt_asgd", "none"] = Field(
        default="two_tailed", description="two_tailed (thesis Alg. 2), tail (eq. 3.2), ema (eq. 3.1), nt_asgd (AWD-LSTM "
        "non-monotonically triggered averaging) or none (raw weights)."
    )
    reset_patience: int | None = Field(
        default=3, ge=1, description="2TA: reset an average not improved for this many evaluations; null = never reset."
    )
    raw_fallback: bool = Field(default=True, description="2TA: report the raw weights while they are at least as good as the long average.")
    tail_start: int | None = Field(default=None, ge=0, description="tail: optimizer step at which averaging starts (required by method tail).")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="ema: decay rate beta of eq. 3.1, e.g. 0.999 (required by method ema).")
    nonmono: int = Field(
        default=5, ge=1, description="nt_asgd: n, start averaging once a raw validation loss is worse than the best "
        "before the last n evaluations."
    )

    @model_validator(mode="after")
    def _method_parameters(self) -> AveragingConfig:
        if self.method == "tail" and self.tail_start is None:
            raise ValueError("averaging.method 'tail' needs averaging.tail_start (the step at which averaging starts)")
        if self.method == "ema" and self.ema_decay is None:
            raise ValueError("averaging.method 'ema' needs averaging.ema_decay (e.g. 0.999)")
        return self


class TrainConfig(StrictConfig):
    """Truncated BPTT training."""

    batch_size: int = Field(default=128, gt=0, description="Global batch size: contiguous token stripes, split evenly across ranks.")
    bptt: int = Field(default=200, gt=0, description="Truncated BPTT window in tokens (one optimizer step per window).")
    max_steps: int = Field(default=1000, gt=0, description="Train until this optimizer step (counted across resumes).")
    dropout_samples: int = Field(default=1, ge=1, description="D: dropout samples per window in the multi-sample dropout objective (thesis §4.3).")
    eval_every: int = Field(default=1000, gt=0, description="E: evaluate on validation (and adapt 2TA) every this many optimizer steps.")
    eval_tokens: int | None = Field(
        default=None, gt=0, description="Validation tokens scored by each evaluation during training; null = all."
    )
    eval_batch_size: int = Field(default=64, gt=0, description="Batch size (stripes) of the evaluations during training.")
    log_every: int = Field(default=50, gt=0, description="Optimizer steps between training-loss log lines (and train/* metrics).")
    seed: int = Field(default=0, description="Random seed of the parameter init and the dropout masks.")
    divergence_lr_decay: float = Field(
        default=0.9, gt=0, lt=1, description="On a divergence: reload the best checkpoint, multiply lr by this (thesis §4.4)."
    )
    max_divergence_restarts: int = Field(default=10, ge=0, description="Give up (exit code 6) after this many divergence restarts.")
    divergence_loss_factor: float | None = Field(
        default=5.0, gt=1, description="Also a divergence: a training loss above this times its lowest smoothed value; "
        "null = only NaN/inf.",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)
    ar_alpha: float = Field(
        default=0.0, ge=0, description="AWD-LSTM AR: add alpha * mean(output^2) of the dropped summed layer output "
        "(lm); 0 = off."
    )
    tar_beta: float = Field(
        default=0.0, ge=0, description="AWD-LSTM TAR: add beta * mean((h_t+1 - h_t)^2) of the undropped summed layer "
        "output (lm); 0 = off."
    )
    variable_bptt: bool = Field(
        default=False, description="AWD-LSTM variable BPTT (lm): window ~ N(bptt, or bptt/2 w.p. 0.05; std), lr x "
        "window/bptt."
    )
    variable_bptt_std: float = Field(default=5.0, ge=0, description="variable_bptt: standard deviation of the window length.")
    variable_bptt_min: int = Field(default=5, ge=1, description="variable_bptt: shortest window in tokens.")

    engine: Literal["ddp", "deepspeed"] = Field(
        default="ddp", description="ddp: torch DDP under torchrun (or one process); deepspeed: a DeepSpeed ZeRO engine."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where to train: cuda, cpu, or auto (CUDA when available).")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="fp32, or bf16 autocast on GPU (weights stay fp32).")
    grad_accum_steps: int = Field(
        default=1, ge=1, description="Split each rank's batch into this many micro-batches (same global batch, less memory)."
    )
    zero_stage: Literal[1, 2] = Field(default=1, description="deepspeed: ZeRO stage 1 (shards optimizer state) or 2 (also gradients).")
    gradient_reduction: Literal["auto", "ddp", "flat"] = Field(
        default="auto", description="ddp engine, several ranks: how gradients are averaged. flat = one all-reduce per "
        "step of one gradient buffer that also carries the step's loss sums (one collective per step; a few % "
        "faster than ddp on busy CPU cores; same weights); ddp = torch DDP, bucketed all-reduces overlapping "
        "backward (for NCCL); auto = flat on CPU (gloo) unless the model has buffers (DDP broadcasts them), else ddp.",
    )

    @model_validator(mode="after")
    def _reduction_of_the_engine(self) -> TrainConfig:
        if self.engine == "deepspeed" and self.gradient_reduction == "flat":
            raise ValueError("train.gradient_reduction flat is a ddp-engine option: DeepSpeed reduces gradients itself "
                             "(use auto)")
        return self


class CheckpointConfig(StrictConfig):
    """Where and how often checkpoints are committed."""

    url: str | None = Field(
        default=None, description="Checkpoint folder: fsspec URL (path, s3://bucket/prefix, memory://); null = <work_dir>/checkpoints."
    )
    every: int | None = Field(default=None, gt=0, description="Optimizer steps between checkpoints; null = train.eval_every.")
    keep_last: int = Field(default=2, ge=1, description="Keep this many newest committed checkpoints (older ones are deleted).")
    keep_best: bool = Field(default=True, description="Also keep the checkpoint with the best reported validation loss.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options, e.g. {client_kwargs: {endpoint_url: ...}}; no secrets (use env vars)."
    )
    retry_attempts: int = Field(default=5, ge=1, description="Tries per checkpoint save / read on transient storage errors.")
    retry_base_delay: float = Field(default=1.0, ge=0, description="Seconds of the first retry backoff (doubles each try).")
    retry_max_delay: float = Field(default=30.0, ge=0, description="Longest retry backoff in seconds.")
    max_failed_saves: int = Field(
        default=3, ge=1, description="Stop the run after this many failed saves in a row; the last save must succeed.",
    )
    on_unreadable: Literal["fail", "restart"] = Field(
        default="fail", description="Checkpoints exist but none loads: fail (exit code 4), or restart from step 0 "
        "setting them aside.",
    )
    lease_ttl: float = Field(
        default=60.0, ge=1, description="Seconds without a heartbeat before another job may take over the checkpoint "
        "folder.",
    )
    async_save: bool = Field(
        default=True, description="Save in the background: the state is copied to CPU memory at the step (one more "
        "copy of model + optimizer + averages in RAM) and training goes on while it is written and committed; one "
        "save in flight at most, the run's last save waits. false = training waits for every save. DeepSpeed "
        "always saves synchronously.",
    )


class TemperatureScan(StrictConfig):
    """Softmax temperatures T tried on the validation set (logits / T; one pass computes all of them)."""

    # The default range covers deepmind/lamb's scan after inverting its convention (lamb multiplies the
    # logits by t, tried from 1.06 down to 0.80: T = 1/t in [0.943, 1.25]); see pipeline.tasks.lm_evaluation.
    min: float = Field(default=0.8, gt=0, description="Lowest softmax temperature T tried (logits are divided by T).")
    max: float = Field(
        default=1.25, gt=0, description="Highest softmax temperature T tried (lamb's multiplier t = 1/T: 0.8 is T 1.25)."
    )
    num: int = Field(default=46, ge=1, description="Temperatures tried, evenly spaced from min to max (plus 1.0).")

    @model_validator(mode="after")
    def _ordered(self) -> TemperatureScan:
        if self.max < self.min:
            raise ValueError(f"evaluate.temperature.max ({self.max}) must be >= evaluate.temperature.min ({self.min})")
        return self


class DynamicEvalConfig(StrictConfig):
    """Dynamic evaluation (Krause et al. 2017; thesis §4.5 and Table 2.6)."""

    enabled: bool = Field(default=False, description="Also report valid/test with dynamic evaluation (slow: batch 1).")
    max_time_steps: int | None = Field(
        default=None, gt=0, description="Window in tokens between weight updates; null = the thesis' largest, 50 "
        "(char) or 20 (word)."
    )
    tune_window: bool = Field(default=False, description="Also tune the window in [1, max_time_steps] (Table 2.6).")
    stripes: int = Field(default=1, gt=0, description="Batch size: stripes of the evaluated stream (the thesis: 1).")
    grad_batch_size: int = Field(
        default=64, gt=0, description="Training sequences per batch of the mean-squared-gradient statistics (thesis: 1024)."
    )
    grad_tokens: int | None = Field(
        default=100_000, gt=0, description="Training tokens read for the gradient statistics; null = the whole split."
    )
    trials: int = Field(default=20, ge=1, description="Optuna TPE trials tuning the rates and epsilon on validation.")
    tune_tokens: int = Field(default=20_000, gt=0, description="Validation prefix (tokens) each tuning trial scores.")
    learning_rate: float | None = Field(
        default=None, gt=0, description="Fixed learning rate eta; null = tuned in [1e-6, 1e-3]."
    )
    decay_rate: float | None = Field(default=None, ge=0, description="Fixed decay lambda; null = tuned in [1e-6, 1e-2].")
    epsilon: float | None = Field(default=None, gt=0, description="Fixed epsilon; null = tuned in [1e-8, 1e-2].")


class MCDropoutConfig(StrictConfig):
    """Monte Carlo dropout evaluation: arithmetic and geometric means over masks."""

    samples: int = Field(default=0, ge=0, description="Dropout masks averaged per token (thesis: 200); 0 = off.")
    rate_multiplier: float = Field(
        default=1.0, ge=0, description="Every *_dropout and weight_drop rate of the model times this (capped below 1)."
    )


class EvaluateConfig(StrictConfig):
    """Final evaluation with the reported (2TA long-average) weights."""

    batch_size: int = Field(default=16, gt=0, description="Batch size (stripes) of the final evaluation.")
    bptt: int = Field(default=200, gt=0, description="Window in tokens of the final evaluation (state carried across windows).")
    max_tokens: int | None = Field(default=None, gt=0, description="Score at most this many tokens of each split (valid, test); null = all.")
    temperature: TemperatureScan = Field(default_factory=TemperatureScan)
    dynamic: DynamicEvalConfig = Field(default_factory=DynamicEvalConfig)
    mc_dropout: MCDropoutConfig = Field(default_factory=MCDropoutConfig)


class TrackingConfig(StrictConfig):
    """MLflow tracking."""

    enabled: bool = Field(default=True, description="Log params, metrics and artifacts to MLflow; false = no tracking.")
    uri: str | None = Field(
        default=None,
        # The real default is pipeline.tracking's default_tracking_uri: next to the run folders, not in one.
        description="Tracking URI; null = $MLFLOW_TRACKING_URI, else sqlite:///<work_dir>/../mlflow.db "
        "(runs/mlflow.db by default).",
    )
    experiment: str | None = Field(default=None, description="MLflow experiment name; null = the config name.")
    run_key: str | None = Field(
        default=None,
        description="Stages (pods) with the same key share one parent run; null = $PIPELINE_RUN_KEY; $MLFLOW_RUN_ID "
        "overrides.",
    )
    sweep_key: str | None = Field(
        default=None, description="Nest this pipeline run under the sweep (or study) run tagged pipeline.sweep_key=<key> in "
        "the same experiment (`python -m pipeline sweep` sets it); null = a top-level run."
    )
    system_metrics: bool = Field(default=True, description="Log CPU, memory and GPU utilisation as system/* metrics.")
    system_metrics_interval: float = Field(default=10.0, gt=0, description="Seconds between system metric samples.")
    plots: bool = Field(default=True, description="Log learning-curve, averaging-length and summary plots as artifacts.")
    register_model: bool = Field(
        default=True, description="Log the reported (2TA) model and register it under the experiment name."
    )
    request_timeout: float = Field(default=10.0, gt=0, description="Seconds one call to the tracking server may take.")
    retry_max_delay: float = Field(
        default=30.0, gt=0, description="Longest wait in seconds between retries while the tracking server is unreachable."
    )
    flush_timeout: float = Field(
        default=60.0, ge=0, description="Seconds to wait at a stage's end for an unreachable server; the rest is sent "
        "by the next stage or `flush`.",
    )


class PipelineConfig(StrictConfig):
    """A whole experiment: data, model, training, evaluation, tracking and how it runs on a cluster."""

    name: str = Field(description="Experiment name: names the work dir and the MLflow experiment.")
    task: Literal["lm", "vae"] = Field(
        default="lm", description="Model family: lm (recurrent language model, section model) or vae (sentence VAE, "
        "section vae)."
    )
    work_dir: str | None = Field(default=None, description="Local folder of this run (resolved config, logs, checkpoints); null = runs/<name>.")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)
    vae: VAEConfig = Field(default_factory=VAEConfig, description="The sentence VAE (task vae only).")
    tune: TuneTrialConfig = Field(
        default_factory=TuneTrialConfig, description="Set by `python -m pipeline tune` on its trials (Optuna "
        "reporting and pruning); leave unset.",
    )

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"name {self.name!r} must be non-empty without slashes or spaces (it names folders)")
        _check_task_fields(self)
        if self.model.tie_embeddings and self.model.vocab_size is not None and self.model.vocab_size <= 0:
            raise ValueError("model.vocab_size must be positive")
        return self

    # Resolved paths: relative defaults are anchored at the current directory.
    @property
    def run_dir(self) -> Path:
        return Path(self.work_dir or os.path.join("runs", self.name))

    @property
    def data_dir(self) -> Path:
        return Path(self.data.dir or os.path.join("data", self.data.dataset))

    @property
    def checkpoint_url(self) -> str:
        return self.checkpoint.url or str(self.run_dir / "checkpoints")

    @property
    def checkpoint_interval(self) -> int:
        return self.checkpoint.every or self.train.eval_every

    def tracked_params(self) -> dict[str, Any]:
        """The flattened config without the fields its task does not use (the MLflow params of a run)."""
        unused = _unused_fields(self)
        return {k: v for k, v in flatten_config(self).items()
                if not any(k == u or k.startswith(u + ".") for u in unused)}

    def mlflow_params(self) -> dict[str, str]:
        """:meth:`tracked_params` as text, as MLflow stores them (None as ``null``)."""
        return {k: "null" if v is None else str(v) for k, v in self.tracked_params().items()}

    def to_yaml(self) -> str:
        """The resolved config as YAML, without the fields its task does not use (they are at their defaults)."""
        tree = self.model_dump(mode="json")
        for dotted in _unused_fields(self):
            *parents, leaf = dotted.split(".")
            node = tree
            for key in parents:
                node = node.get(key, {})
            node.pop(leaf, None)
        for section in [k for k, v in tree.items() if v == {}]:
            del tree[section]
        return yaml.safe_dump(tree, sort_keys=False)


# Fields only the language model uses; a VAE config may not set them to anything but their defaults
# (a resolved config, which lists every field with its default, stays valid).
_LM_ONLY_FIELDS: dict[str, tuple[str, ...]] = {
    "model": tuple(ModelConfig.model_fields),
    "train": ("bptt", "dropout_samples", "eval_tokens", "ar_alpha", "tar_beta", "variable_bptt", "variable_bptt_std",
              "variable_bptt_min"),
    "evaluate": ("batch_size", "bptt", "max_tokens", "temperature", "dynamic", "mc_dropout"),
}


def _unused_fields(config: PipelineConfig) -> list[str]:
    """The dotted fields the config's task does not read (the other model family's)."""
    if config.task == "lm":
        return ["vae"]
    return [f"{section}.{name}" for section, names in _LM_ONLY_FIELDS.items() for name in names]


@functools.cache
def _section_defaults() -> dict[str, Any]:
    """The flattened defaults of the sections whose fields belong to one task (computed once)."""
    defaults: dict[str, Any] = {}
    for section, cls in (("vae", VAEConfig), ("model", ModelConfig), ("train", TrainConfig), ("evaluate", EvaluateConfig)):
        defaults.update(flatten_config(cls(), prefix=f"{section}."))
    return defaults


def _check_task_fields(config: PipelineConfig) -> None:
    """VAE-only fields on an LM config, and LM-only fields on a VAE config, are refused by name (a field at its
    default is fine: a resolved config lists every field)."""
    defaults = _section_defaults()
    values = flatten_config(config)
    for dotted in _unused_fields(config):
        matches = [k for k in values if k == dotted or k.startswith(dotted + ".")]
        for key in matches:
            if values[key] != defaults.get(key):
                if config.task == "lm":
                    raise ValueError(f"{key}: a sentence-VAE field, which task lm does not use (got {values[key]!r}); "
                                     "remove it, or set task: vae")
                raise ValueError(
                    f"{key}: a language-model field, which task vae does not use (got {values[key]!r}); remove it (the "
                    "VAE's settings are under vae: vae.model, vae.objective, vae.data, vae.evaluate)"
                )


def _configs_dir() -> Path:
    return Path(str(importlib.resources.files("pipeline") / "configs"))


def shipped_config_names() -> list[str]:
    """Names of the experiment configs shipped in ``pipeline/configs``."""
    return sorted(p.stem for p in _configs_dir().glob("*.yaml"))


PURPOSE_WIDTH = 110  # characters of a config's one-line purpose (`python -m pipeline configs`)


def config_purpose(yaml_text: str, width: int = PURPOSE_WIDTH) -> str:
    """The one-line purpose of a config file: the first sentence of its leading comment.

    A sentence longer than ``width`` is cut, outside parentheses, at its last ``;`` ``:`` or opening
    parenthesis that fits and keeps at least half of ``width``, else at its last ``,`` that fits, else at
    a word with ``...``. ``""`` without a comment.
    """
    lines: list[str] = []
    for line in yaml_text.splitlines():
        text = line.strip()
        if not text.startswith("#"):
            if text or lines:
                break
            continue
        lines.append(text.lstrip("#").strip())
    comment = " ".join(part for part in lines if part)
    # A sentence ends at . ! or ? before a capital: "thesis ch. 4" and "e.g. ../data" do not end one.
    sentence = re.split(r"(?<=[.!?])\s+(?=[A-Z])", comment, maxsplit=1)[0].rstrip(".")
    if len(sentence) <= width:
        return sentence
    depth, strong, weak = 0, [], []
    for i, char in enumerate(sentence):
        if char in "([{":
            if depth == 0 and i > 0 and sentence[i - 1] == " ":
                strong.append(i - 1)
            depth += 1
        elif char in ")]}":
            depth = max(0, depth - 1)
        elif depth == 0 and char in ",;:" and sentence[i + 1 : i + 2] == " ":
            (weak if char == "," else strong).append(i)
    # A colon or parenthesis ends a phrase ("... ~48M parameters (thesis ...)"); a comma may split a list.
    cut = max([c for c in strong if width // 2 <= c <= width] or [c for c in weak if c <= width]
              or [c for c in strong if c <= width] or [0])
    if cut:
        return sentence[:cut].rstrip(" ,;:")
    return sentence[: width - 3].rsplit(" ", 1)[0] + "..."


def shipped_config_purposes() -> dict[str, str]:
    """``{name: one-line purpose}`` of every shipped config, by name (see :func:`config_purpose`)."""
    return {name: config_purpose((_configs_dir() / f"{name}.yaml").read_text()) for name in shipped_config_names()}


def _resolve_config_path(name_or_path: str | os.PathLike) -> Path:
    path = Path(name_or_path)
    if path.suffix in (".yaml", ".yml") or path.exists():
        if not path.exists():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        return path
    shipped = _configs_dir() / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    raise ConfigError(
        f"unknown config {str(name_or_path)!r}: give a YAML path or one of the shipped configs: "
        + ", ".join(shipped_config_names())
    )


def set_dotted(tree: dict[str, Any], dotted: str, value: Any) -> None:
    """Set ``tree['a']['b'] = value`` for ``dotted == 'a.b'``, creating dicts on the way."""
    *parents, leaf = dotted.split(".")
    node = tree
    for key in parents:
        child = node.setdefault(key, {})
        if not isinstance(child, dict):
            raise ConfigError(f"cannot set {dotted!r}: {key!r} is not a section")
        node = child
    node[leaf] = value


def _format_validation_error(err: ValidationError, origin: str) -> str:
    lines = [f"invalid configuration ({origin}):"]
    for item in err.errors():
        field = ".".join(str(p) for p in item["loc"]) or "<root>"
        msg = item["msg"]
        if item["type"] == "extra_forbidden":
            msg = "unknown field (check the spelling; `python -m pipeline <stage> --help` lists every field)"
        if not item["loc"] and item["type"] == "value_error":  # a check across fields: its message names them
            lines.append(f"  {msg.removeprefix('Value error, ')}")
            continue
        lines.append(f"  {field}: {msg} (got {item.get('input')!r})" if item["type"] != "missing" else f"  {field}: {msg}")
    return "\n".join(lines)


def validate_config(raw: dict[str, Any], origin: str = "<dict>") -> PipelineConfig:
    """Validate a raw mapping into a :class:`PipelineConfig`, raising :class:`ConfigError` on problems."""
    if not isinstance(raw, dict):
        raise ConfigError(f"invalid configuration ({origin}): the top level must be a mapping, got {type(raw).__name__}")
    try:
        return PipelineConfig.model_validate(raw)
    except ValidationError as err:
        raise ConfigError(_format_validation_error(err, origin)) from None


def load_config(name_or_path: str | os.PathLike, overrides: dict[str, Any] | None = None) -> PipelineConfig:
    """Load a shipped config by name (e.g. ``ptb_char_rlstm``) or a YAML file, apply dotted overrides, validate."""
    path = _resolve_config_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        raise ConfigError(f"config file {str(path)!r} is not valid YAML: {err}") from None
    for dotted, value in (overrides or {}).items():
        set_dotted(raw, dotted, value)
    return validate_config(raw, origin=str(path))


def flatten_config(config: BaseModel | dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Flatten to ``{'train.optimizer.lr': 0.002, ...}`` (MLflow params, comparison tables)."""
    tree = config.model_dump(mode="json") if isinstance(config, BaseModel) else config
    flat: dict[str, Any] = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and value:
            flat.update(flatten_config(value, prefix=f"{dotted}."))
        else:
            flat[dotted] = value
    return flat
