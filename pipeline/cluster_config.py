"""The ``cluster`` section of a pipeline config: how a run's stages become Kubernetes pods.

No local stage reads it; :mod:`pipeline.k8s` builds the Jobs from it. Kubernetes quantities (``500m``,
``16Gi``) are validated here, images must be pinned (a tag or an ``@sha256`` digest, never ``latest``)
and names must be DNS labels.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import Field, model_validator

from models.config import StrictConfig

__all__ = ["ClusterConfig", "GpuPodResources", "PodResources", "Toleration", "quantity_value"]


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


class PodResources(StrictConfig):
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


class Toleration(StrictConfig):
    """A Kubernetes toleration, e.g. {key: nvidia.com/gpu, operator: Exists, effect: NoSchedule}."""

    key: str | None = Field(default=None, description="Taint key; null with operator Exists = every taint.")
    operator: Literal["Equal", "Exists"] = Field(default="Equal", description="Equal: key and value match; Exists: key only.")
    value: str | None = Field(default=None, description="Taint value (operator Equal).")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; null = every effect."
    )


# Per-pod defaults; a partial override (`--cluster.train.gpus 8`) keeps the other defaults of its pod.
_POD_DEFAULTS: dict[str, dict[str, Any]] = {
    "driver": {"cpu": "250m", "memory": "1Gi"},  # it imports torch (through the config)
    "prepare": {"cpu": "2", "memory": "8Gi"},
    "train": {"cpu": "8", "memory": "64Gi", "gpus": 1},
    "evaluate": {"cpu": "4", "memory": "32Gi", "gpus": 1},
}


class ClusterConfig(StrictConfig):
    """Running the pipeline on Kubernetes (``python -m pipeline k8s-manifest`` / ``drive``); unused locally."""

    image: str = Field(
        default="ghcr.io/rlm-pipeline/rlm-pipeline:0.1.0",
        description="Image of the train and evaluate pods (CUDA torch), pinned by tag or @sha256 digest, never 'latest'.",
    )
    cpu_image: str | None = Field(
        default="ghcr.io/rlm-pipeline/rlm-pipeline:0.1.0-cpu",
        description="Image of the pods without a GPU (driver, prepare, buckets, MLflow): the TORCH=cpu build; null = cluster.image.",
    )
    image_pull_policy: Literal["IfNotPresent", "Always"] = Field(
        default="Always", description="Pull policy; Always re-checks the tag's digest (layers stay cached)."
    )
    namespace: str = Field(default="rlm-pipeline", description="Namespace of every object of a pipeline.")
    run_name: str | None = Field(
        default=None, description="Name of the driver Job (and prefix of its stage Jobs); default the config name."
    )
    nodes: int = Field(default=1, ge=1, description="Train pods (nodes) of the Indexed train Job.")
    nproc_per_node: int | None = Field(default=None, ge=1, description="torchrun processes per train pod; null = cluster.train.gpus, or 1.")
    rdzv_port: int = Field(default=29500, ge=1024, le=65535, description="Port of the rendezvous on train pod 0.")
    driver: PodResources = Field(default_factory=lambda: PodResources(**_POD_DEFAULTS["driver"]), description="The driver pod.")
    prepare: PodResources = Field(default_factory=lambda: PodResources(**_POD_DEFAULTS["prepare"]), description="The prepare pod.")
    train: GpuPodResources = Field(default_factory=lambda: GpuPodResources(**_POD_DEFAULTS["train"]), description="Each train pod.")
    evaluate: GpuPodResources = Field(
        default_factory=lambda: GpuPodResources(**_POD_DEFAULTS["evaluate"]), description="The evaluate pod."
    )
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
    ttl_seconds_after_finished: int = Field(default=7 * 24 * 3600, ge=0, description="Seconds after which finished Jobs are deleted (default 7 days).")
    poll_seconds: float = Field(default=10.0, gt=0, description="Seconds between the driver's checks of its stage Jobs.")
    storage_url: str = Field(
        default="s3://rlm-pipeline", description="Object storage root: datasets/<dataset> and runs/<name>/<run>/checkpoints."
    )
    dataset_url: str | None = Field(
        default=None,
        description="fsspec URL where prepare publishes the data for train/evaluate; null = local only (the cluster "
        "uses <storage_url>/datasets/<dataset>).",
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
        for field in ("image", "cpu_image"):
            image = getattr(self, field)
            problem = image is not None and _image_problem(image)
            if problem:
                raise ValueError(f"cluster.{field} {image!r} is not pinned: {problem}; use a version tag or an @sha256 "
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
