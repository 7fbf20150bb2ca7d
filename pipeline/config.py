"""The typed configuration schema of a pipeline run.

One schema validates every field of every stage: unknown keys and wrong types are rejected
with a message that names the field (pydantic's ``extra="forbid"`` plus field validators).
The same schema generates the command-line options (see :mod:`pipeline.cli`) and is saved,
resolved, with every run (``resolved_config.yaml`` in the work dir and MLflow params).
"""

from __future__ import annotations

import importlib.resources
import os
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from models.config import ModelConfig
from pipeline.errors import EXIT_CONFIG, PipelineError

__all__ = [
    "AveragingConfig",
    "CheckpointConfig",
    "ConfigError",
    "DataConfig",
    "EvaluateConfig",
    "OptimizerConfig",
    "PipelineConfig",
    "TrackingConfig",
    "TrainConfig",
    "flatten_config",
    "load_config",
    "shipped_config_names",
]


class ConfigError(PipelineError, ValueError):
    """A configuration that cannot be used; the message names the field and the fix."""

    exit_code = EXIT_CONFIG


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True)


class DataConfig(_Strict):
    """Where the corpus comes from and where its token arrays go."""

    dataset: Literal["enwik8", "text8", "ptb_word", "ptb_char", "text"] = Field(
        description="Corpus kind: enwik8, text8, ptb_word, ptb_char or text (any text file, one token per byte)."
    )
    source: str = Field(
        description="fsspec URL or local path of the canonical archive / directory / text file. "
        "The special value 'sample' means the small WikiText-2 sample shipped with the package."
    )
    dir: str | None = Field(
        default=None, description="Local folder for the tokenised arrays; default <work_root>/data/<dataset>."
    )
    cache_dir: str | None = Field(default=None, description="Download cache; default next to the data dir.")
    verify_source: bool = Field(default=True, description="Check size and sha256 of the download against known facts.")


class OptimizerConfig(_Strict):
    """Optimizer and the gradient-side regularisers."""

    name: Literal["adam", "radam"] = Field(default="radam", description="Adam or Rectified Adam (thesis §4.4).")
    lr: float = Field(default=2e-3, gt=0, description="Base learning rate.")
    beta1: float = Field(default=0.0, ge=0, lt=1, description="First-moment decay; the thesis uses 0 (RMSProp-like).")
    beta2: float = Field(default=0.999, gt=0, lt=1, description="Second-moment decay.")
    eps: float = Field(default=1e-9, gt=0, description="Adam epsilon.")
    clip_norm: float | None = Field(default=10.0, gt=0, description="Clip the global gradient norm to this; null disables.")
    l2_penalty: float = Field(default=0.0, ge=0, description="Adds l2_penalty * 0.5 * sum(w^2) to the loss.")


class AveragingConfig(_Strict):
    """Weight averaging: Two-Tailed Averaging (default) or the TA / EMA baselines."""

    method: Literal["two_tailed", "tail", "ema", "none"] = Field(
        default="two_tailed", description="two_tailed (thesis Alg. 2), tail (eq. 3.2), ema (eq. 3.1) or none."
    )
    reset_patience: int | None = Field(
        default=3, ge=1, description="2TA: reset an average that has not improved for this many evaluations; null disables."
    )
    raw_fallback: bool = Field(default=True, description="2TA: report the raw weights while they beat the long average.")
    tail_start: int | None = Field(default=None, ge=0, description="tail: optimizer step at which averaging starts.")
    ema_decay: float | None = Field(default=None, gt=0, lt=1, description="ema: decay rate beta of eq. 3.1.")

    @model_validator(mode="after")
    def _method_parameters(self) -> AveragingConfig:
        if self.method == "tail" and self.tail_start is None:
            raise ValueError("averaging.method 'tail' needs averaging.tail_start (the step at which averaging starts)")
        if self.method == "ema" and self.ema_decay is None:
            raise ValueError("averaging.method 'ema' needs averaging.ema_decay (e.g. 0.999)")
        return self


class TrainConfig(_Strict):
    """Truncated BPTT training."""

    batch_size: int = Field(default=128, gt=0, description="Global batch size (number of contiguous stripes).")
    bptt: int = Field(default=200, gt=0, description="Truncated BPTT window length.")
    max_steps: int = Field(default=1000, gt=0, description="Optimizer steps to train for.")
    dropout_samples: int = Field(default=1, ge=1, description="D of the multi-sample dropout objective (thesis §4.3).")
    eval_every: int = Field(default=1000, gt=0, description="E: evaluate (and adapt 2TA) every this many steps.")
    eval_tokens: int | None = Field(
        default=None, gt=0, description="Validation tokens used by evaluations during training; null = all."
    )
    eval_batch_size: int = Field(default=64, gt=0, description="Batch size of evaluations during training.")
    log_every: int = Field(default=50, gt=0, description="Steps between training-loss log lines.")
    seed: int = Field(default=0, description="Seed of parameter init and dropout masks.")
    divergence_lr_decay: float = Field(
        default=0.9, gt=0, lt=1, description="On a divergence, reload the best checkpoint and multiply lr by this (thesis §4.4)."
    )
    max_divergence_restarts: int = Field(default=10, ge=0, description="Give up after this many divergence restarts.")
    divergence_loss_factor: float | None = Field(
        default=5.0, gt=1, description="Also a divergence: a step whose training loss exceeds this multiple of the "
        "lowest smoothed training loss so far (a loss that explodes without becoming non-finite); null disables.",
    )
    optimizer: OptimizerConfig = Field(default_factory=OptimizerConfig)
    averaging: AveragingConfig = Field(default_factory=AveragingConfig)

    engine: Literal["ddp", "deepspeed"] = Field(
        default="ddp", description="ddp: torch DDP under torchrun (or a single process); deepspeed: a DeepSpeed engine."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="auto picks CUDA when available.")
    precision: Literal["fp32", "bf16"] = Field(default="fp32", description="bf16: autocast on GPU (fp32 weights).")
    grad_accum_steps: int = Field(
        default=1, ge=1, description="Split each rank's batch into this many micro-batches (same global batch and lr)."
    )
    zero_stage: Literal[1, 2] = Field(default=1, description="deepspeed: ZeRO stage (optimizer / + gradient sharding).")


class CheckpointConfig(_Strict):
    """Where and how often checkpoints are committed."""

    url: str | None = Field(
        default=None, description="fsspec URL (local path, s3://bucket/prefix, memory://); default <work_dir>/checkpoints."
    )
    every: int | None = Field(default=None, gt=0, description="Steps between checkpoints; default train.eval_every.")
    keep_last: int = Field(default=2, ge=1, description="Keep this many newest committed checkpoints ...")
    keep_best: bool = Field(default=True, description="... plus the one with the best reported validation loss.")
    storage_options: dict[str, Any] = Field(
        default_factory=dict, description="fsspec options (e.g. {client_kwargs: {endpoint_url: ...}}); no secrets here."
    )
    retry_attempts: int = Field(default=5, ge=1, description="Tries per save / read against flaky storage.")
    retry_base_delay: float = Field(default=1.0, ge=0, description="First backoff delay in seconds (doubles each try).")
    retry_max_delay: float = Field(default=30.0, ge=0, description="Longest backoff delay in seconds.")
    max_failed_saves: int = Field(
        default=3, ge=1, description="Stop the run when this many saves in a row have failed (each after its retries); "
        "the run's last save must always succeed.",
    )
    on_unreadable: Literal["fail", "restart"] = Field(
        default="fail", description="When checkpoints exist but none can be loaded: fail (exit code 4, nothing is "
        "touched) or restart from step 0 (they are set aside with SET_ASIDE.json, never deleted).",
    )
    lease_ttl: float = Field(
        default=60.0, ge=1, description="Seconds without a heartbeat after which another job may take over this "
        "checkpoint location (a job heartbeats every lease_ttl / 6 s).",
    )


class TemperatureScan(_Strict):
    """Softmax temperatures tried on the validation set (one pass computes all of them)."""

    min: float = Field(default=0.8, gt=0)
    max: float = Field(default=1.2, gt=0)
    num: int = Field(default=41, ge=1)

    @model_validator(mode="after")
    def _ordered(self) -> TemperatureScan:
        if self.max < self.min:
            raise ValueError(f"evaluate.temperature.max ({self.max}) must be >= evaluate.temperature.min ({self.min})")
        return self


class EvaluateConfig(_Strict):
    """Final evaluation with the reported (2TA long-average) weights."""

    batch_size: int = Field(default=16, gt=0, description="Evaluation batch size (stripes).")
    bptt: int = Field(default=200, gt=0, description="Evaluation window length (state carried across windows).")
    max_tokens: int | None = Field(default=None, gt=0, description="Evaluate at most this many tokens per split; null = all.")
    temperature: TemperatureScan = Field(default_factory=TemperatureScan)


class TrackingConfig(_Strict):
    """MLflow tracking."""

    enabled: bool = Field(default=True, description="Log to MLflow.")
    uri: str | None = Field(
        default=None,
        description="Tracking URI; default $MLFLOW_TRACKING_URI, else a SQLite store sqlite:///<work_dir>/mlflow.db.",
    )
    experiment: str | None = Field(default=None, description="Experiment name; default the config name.")
    run_key: str | None = Field(
        default=None,
        description="Names one pipeline run across stages and pods: stages with the same key log under one parent "
        "run (tag pipeline.run_key). Default $PIPELINE_RUN_KEY; $MLFLOW_RUN_ID (a parent run id) wins over both.",
    )
    system_metrics: bool = Field(default=True, description="Log CPU, memory and GPU utilisation as system/* metrics.")
    system_metrics_interval: float = Field(default=10.0, gt=0, description="Seconds between system metric samples.")
    plots: bool = Field(default=True, description="Log learning-curve, averaging-length and summary plots as artifacts.")
    register_model: bool = Field(
        default=True, description="Log the reported (2TA) model with mlflow.pytorch and register it under the experiment name."
    )
    request_timeout: float = Field(default=10.0, gt=0, description="Seconds one call to the tracking server may take.")
    retry_max_delay: float = Field(
        default=30.0, gt=0, description="Longest wait between retries while the tracking server is unreachable."
    )
    flush_timeout: float = Field(
        default=60.0, ge=0, description="At the end of a stage, wait this long for an unreachable server; what is "
        "still unsent is then kept in <work_dir>/mlflow_pending.jsonl and sent by the next stage or `python -m pipeline flush`.",
    )


_QUANTITY_SCALE = {"Ki": 2.0**10, "Mi": 2.0**20, "Gi": 2.0**30, "Ti": 2.0**40, "Pi": 2.0**50, "Ei": 2.0**60,
                   "m": 1e-3, "k": 1e3, "M": 1e6, "G": 1e9, "T": 1e12, "P": 1e15, "E": 1e18}


def quantity_value(text: str, field: str) -> float:
    """The numeric value of a Kubernetes quantity (``500m`` -> 0.5, ``4Gi`` -> 4 * 2**30)."""
    suffix = next((s for s in _QUANTITY_SCALE if text.endswith(s)), "")
    number = text[: len(text) - len(suffix)]
    if not number.replace(".", "", 1).isdigit() or not number[0].isdigit():
        raise ValueError(f"{field} {text!r} is not a Kubernetes quantity (e.g. 4, 500m, 16Gi)")
    return float(number) * _QUANTITY_SCALE.get(suffix, 1.0)


def _is_dns_label(value: str) -> bool:
    allowed = set("abcdefghijklmnopqrstuvwxyz0123456789-")
    return bool(value) and value[0].isalpha() and set(value) <= allowed and not value.endswith("-")


def _image_problem(image: str) -> str | None:
    """Why ``image`` is not pinned (no tag or digest, or 'latest'), or None."""
    name, _, digest = image.partition("@")
    if digest and not (digest.startswith("sha256:") and len(digest) == 71 and all(c in "0123456789abcdef" for c in digest[7:])):
        return f"its digest {digest!r} is not sha256:<64 hex digits>"
    last = name.rsplit("/", 1)[-1]
    tag = last.partition(":")[2]
    if not name or " " in image or not (tag or digest):
        return "it has neither a tag nor an @sha256 digest"
    if tag == "latest" and not digest:
        return "'latest' is not a pinned version"
    return None


class PodResources(_Strict):
    """CPU and memory of one pod (Kubernetes quantities); a limit defaults to its request."""

    cpu: str = Field(default="1", description="CPU request, e.g. 8 or 500m.")
    memory: str = Field(default="4Gi", description="Memory request, e.g. 16Gi.")
    cpu_limit: str | None = Field(default=None, description="CPU limit; default the request.")
    memory_limit: str | None = Field(default=None, description="Memory limit; default the request.")

    @model_validator(mode="before")
    @classmethod
    def _numbers_as_quantities(cls, data: Any) -> Any:
        # `--cluster.train.cpu 32` arrives as the YAML number 32; Kubernetes quantities are strings.
        if isinstance(data, dict):
            return {k: str(v) if isinstance(v, (int, float)) and not isinstance(v, bool) and k != "gpus" else v
                    for k, v in data.items()}
        return data

    @model_validator(mode="after")
    def _requests_within_limits(self) -> PodResources:
        for kind in ("cpu", "memory"):
            request, limit = getattr(self, kind), getattr(self, f"{kind}_limit") or getattr(self, kind)
            if quantity_value(request, kind) > quantity_value(limit, f"{kind}_limit"):
                raise ValueError(f"{kind} request {request} exceeds its limit {limit}; raise {kind}_limit or lower {kind}")
        return self


class GpuPodResources(PodResources):
    """CPU, memory and NVIDIA GPUs of one pod (GPU requests = limits)."""

    gpus: int = Field(default=1, ge=0, description="nvidia.com/gpu per pod; 0 runs on CPU.")


class Toleration(_Strict):
    """A Kubernetes toleration, e.g. {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}."""

    key: str | None = None
    operator: Literal["Equal", "Exists"] = "Equal"
    value: str | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None


# Per-pod defaults; a partial override (`--cluster.train.gpus 8`) keeps the other defaults of its pod.
_POD_DEFAULTS: dict[str, dict[str, Any]] = {
    "driver": {"cpu": "250m", "memory": "1Gi"},  # it imports torch (through the config)
    "prepare": {"cpu": "2", "memory": "8Gi"},
    "train": {"cpu": "8", "memory": "64Gi", "gpus": 1},
    "evaluate": {"cpu": "4", "memory": "32Gi", "gpus": 1},
}


class ClusterConfig(_Strict):
    """Running the pipeline on Kubernetes (``python -m pipeline k8s-manifest`` / ``drive``); unused locally."""

    image: str = Field(
        default="ghcr.io/rlm-pipeline/rlm-pipeline:0.1.0",
        description="Container image with a pinned tag or @sha256 digest (never 'latest').",
    )
    image_pull_policy: Literal["IfNotPresent", "Always"] = Field(
        default="Always", description="Pull policy; Always re-checks the tag's digest (layers stay cached)."
    )
    namespace: str = Field(default="rlm-pipeline", description="Namespace of every object of a pipeline.")
    run_name: str | None = Field(
        default=None, description="Name of the driver Job (and prefix of its stage Jobs); default the config name."
    )
    nodes: int = Field(default=1, ge=1, description="Train pods (nodes) of the Indexed train Job.")
    nproc_per_node: int | None = Field(default=None, ge=1, description="torchrun processes per pod; default train.gpus or 1.")
    rdzv_port: int = Field(default=29500, ge=1024, le=65535, description="Port of the rendezvous on train pod 0.")
    driver: PodResources = Field(default_factory=lambda: PodResources(**_POD_DEFAULTS["driver"]))
    prepare: PodResources = Field(default_factory=lambda: PodResources(**_POD_DEFAULTS["prepare"]))
    train: GpuPodResources = Field(default_factory=lambda: GpuPodResources(**_POD_DEFAULTS["train"]))
    evaluate: GpuPodResources = Field(default_factory=lambda: GpuPodResources(**_POD_DEFAULTS["evaluate"]))
    shm_size: str = Field(default="8Gi", description="Size of /dev/shm (memory emptyDir) in train and evaluate pods.")
    scratch_size: str = Field(default="100Gi", description="Size limit of the writable /work emptyDir of a stage pod.")
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the GPU pods (train, evaluate) need.")
    tolerations: list[Toleration] = Field(default_factory=list, description="Tolerations of the GPU pods.")
    max_train_restarts: int = Field(
        default=3, ge=0, description="Re-create a failed train Job (resuming from the last checkpoint) at most this often."
    )
    max_preemption_restarts: int = Field(
        default=50, ge=0, description="Separate bound on re-creations after preemption (these do not use max_train_restarts)."
    )
    backoff_limit: int = Field(default=2, ge=0, description="Pod retries of the driver, prepare and evaluate Jobs.")
    ttl_seconds_after_finished: int = Field(default=7 * 24 * 3600, ge=0, description="Finished Jobs are deleted after this.")
    poll_seconds: float = Field(default=10.0, gt=0, description="The driver checks stage Job conditions this often.")
    storage_url: str = Field(
        default="s3://rlm-pipeline", description="Object storage root: datasets/<dataset> and runs/<name>/<run>/checkpoints."
    )
    dataset_url: str | None = Field(
        default=None,
        description="Where prepare publishes the tokenised data and train/evaluate fetch it (fsspec URL); null locally "
        "(local data only); in the cluster default <storage_url>/datasets/<data.dataset>.",
    )
    s3_endpoint: str | None = Field(
        default=None, description="S3 endpoint of the stage pods (AWS_ENDPOINT_URL); default the in-cluster MinIO."
    )
    s3_secret: str = Field(
        default="rlm-pipeline-s3", description="Secret holding AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY (never literal)."
    )
    mlflow_uri: str | None = Field(default=None, description="MLflow server of the pods; default http://mlflow.<namespace>.svc:5000.")

    @model_validator(mode="before")
    @classmethod
    def _pod_defaults(cls, data: Any) -> Any:
        if isinstance(data, dict):
            data = {**data, **{pod: {**_POD_DEFAULTS[pod], **data[pod]}
                               for pod in _POD_DEFAULTS if isinstance(data.get(pod), dict)}}
        return data

    @model_validator(mode="after")
    def _valid_names(self) -> ClusterConfig:
        problem = _image_problem(self.image)
        if problem:
            raise ValueError(f"cluster.image {self.image!r} is not pinned: {problem}; use a version tag or an @sha256 "
                             "digest, e.g. ghcr.io/org/rlm-pipeline:0.1.0")
        for field in ("namespace", "run_name"):
            value = getattr(self, field)
            if value is not None and (len(value) > 40 or not _is_dns_label(value)):
                raise ValueError(f"cluster.{field} {value!r} must be a DNS label of at most 40 characters: lower-case "
                                 "letters, digits and '-', starting with a letter")
        for field in ("shm_size", "scratch_size"):
            quantity_value(getattr(self, field), f"cluster.{field}")
        if self.nproc_per_node and self.train.gpus and self.nproc_per_node > self.train.gpus:
            raise ValueError(f"cluster.nproc_per_node ({self.nproc_per_node}) exceeds cluster.train.gpus "
                             f"({self.train.gpus}): use one process per GPU")
        return self


class PipelineConfig(_Strict):
    """A whole experiment: data, model, training, evaluation, tracking and how it runs on a cluster."""

    name: str = Field(description="Experiment name (used for the work dir and the MLflow experiment).")
    work_dir: str | None = Field(default=None, description="Local folder for this run; default runs/<name>.")
    data: DataConfig
    model: ModelConfig = Field(default_factory=ModelConfig)
    train: TrainConfig = Field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = Field(default_factory=CheckpointConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)
    cluster: ClusterConfig = Field(default_factory=ClusterConfig)

    @model_validator(mode="after")
    def _consistent(self) -> PipelineConfig:
        if not self.name or any(c in self.name for c in "/\\ "):
            raise ValueError(f"name {self.name!r} must be non-empty without slashes or spaces (it names folders)")
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

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.model_dump(mode="json"), sort_keys=False)


def _configs_dir() -> Path:
    return Path(str(importlib.resources.files("pipeline") / "configs"))


def shipped_config_names() -> list[str]:
    """Names of the experiment configs shipped in ``pipeline/configs``."""
    return sorted(p.stem for p in _configs_dir().glob("*.yaml"))


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
