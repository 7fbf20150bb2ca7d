"""Pure builders: a validated :class:`~pipeline.config.PipelineConfig` -> Kubernetes objects.

Every function here returns plain dicts (what ``kubectl apply`` or the API takes as JSON) and
submits nothing; :mod:`pipeline.k8s.driver` submits them. Keeping the two apart means every field
of every object can be tested, schema-validated and security-scanned without a cluster.

The objects of one pipeline run:

* applied by the user (``python -m pipeline k8s-manifest``): the experiment config (ConfigMap), a
  ServiceAccount with a namespaced Role allowing only what the driver does, and the driver Job (or
  a CronJob whose job template is the driver Job, for nightly runs);
* created by the driver, in order: the ``prepare`` Job, a headless Service plus the Indexed
  ``train`` Job (one pod per node running ``torchrun``), the ``evaluate`` Job. They are owned by the
  driver Job (deleting it garbage-collects them) and labelled with its name.

Every pod runs as the image's non-root user with a read-only root filesystem (writable emptyDirs
for ``/work`` and ``/tmp``), no privilege escalation, no capabilities and the runtime's default
seccomp profile; only the driver mounts a service-account token. The train and evaluate pods run
``cluster.image`` (CUDA torch), every other pod the far smaller ``cluster.cpu_image`` (CPU torch).
"""

from __future__ import annotations

import functools
import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import yaml

from pipeline.config import ClusterConfig, PipelineConfig, PodResources
from pipeline.errors import EXIT_DRIVER_FAILED
from pipeline.errors import NON_RETRIABLE_EXIT_CODES as _NON_RETRIABLE_EXIT_CODES

__all__ = [
    "COMPLETION_INDEX_ANNOTATION",
    "CONFIG_FILE",
    "DRIVER_FAILED_EXIT_CODE",
    "LABEL",
    "NON_RETRIABLE_EXIT_CODES",
    "STAGES",
    "DriverRef",
    "ManifestNames",
    "build_configmap",
    "build_driver_cronjob",
    "build_driver_job",
    "build_minio_manifest",
    "build_mlflow_manifest",
    "build_namespace",
    "SCAN_EXCEPTIONS",
    "build_nightly_manifest",
    "build_pipeline_manifest",
    "build_rbac",
    "build_stage_job",
    "build_sweep_manifest",
    "build_train_service",
    "checkpoint_url",
    "cpu_image",
    "dataset_url",
    "dns_name",
    "driver_role_rules",
    "mlflow_uri",
    "render_yaml",
    "s3_endpoint",
    "stage_job_name",
]

Stage = Literal["prepare", "train", "evaluate"]
STAGES: tuple[Stage, ...] = ("prepare", "train", "evaluate")

LABEL = "rlm-pipeline"  # prefix of our labels and annotations
APP_LABELS = {"app.kubernetes.io/name": "rlm-pipeline", "app.kubernetes.io/managed-by": "rlm-pipeline"}
CONFIG_DIR = "/etc/rlm-pipeline"
CONFIG_FILE = f"{CONFIG_DIR}/config.yaml"
WORK_DIR = "/work"  # the writable scratch emptyDir of a stage pod (work dir, data, caches)
RUN_AS = 10001  # the non-root user and group of the image (Dockerfile)
COMPLETION_INDEX_ANNOTATION = "batch.kubernetes.io/job-completion-index"
# The pipeline CLI's exit codes for failures that retrying cannot fix (bad configuration, unreadable
# checkpoints, unwritable storage, divergence, a checkpoint location owned by another job), and the
# driver's when a stage failed for good: see pipeline.errors.
NON_RETRIABLE_EXIT_CODES: tuple[int, ...] = _NON_RETRIABLE_EXIT_CODES
DRIVER_FAILED_EXIT_CODE = EXIT_DRIVER_FAILED
MAX_JOB_NAME = 52  # Indexed Job pods are named <job>-<index>-<suffix>; hostnames <job>-<index> <= 63
MINIO_IMAGE = "quay.io/minio/minio:RELEASE.2025-04-22T22-12-26Z"
MLFLOW_ARTIFACTS_BUCKET = "mlflow-artifacts"
S3_SECRET_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")

# The security scanner's (checkov) findings we accept, each with why; the objects they apply to
# carry them as `checkov.io/skip<n>` annotations, so every exception is explained where it applies
# (tests/test_security_scan.py fails on any other finding).
SCAN_EXCEPTIONS: dict[str, str] = {
    "CKV_K8S_35": "object-storage credentials reach boto3 / MinIO as environment variables from a Secret "
                  "(secretKeyRef), never literal; both read them from the environment",
    "CKV_K8S_38": "the driver is the one pod that talks to the API server (a namespaced Role: Jobs, Services, "
                  "pod logs); every other pod has automountServiceAccountToken false",
    "CKV_K8S_43": "the image is pinned by version tag (validated: never latest); give cluster.image and "
                  "cluster.cpu_image as repo@sha256:... to pin a digest (the nightly workflow does)",
}


def _plain(builder: Callable[..., Any]) -> Callable[..., Any]:
    """The builder's result as plain, unshared JSON data: the pieces of an object share dicts
    (labels, env entries) while it is built; callers may then change any part of it freely."""

    @functools.wraps(builder)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        return json.loads(json.dumps(builder(*args, **kwargs)))

    return wrapper


# ---------------------------------------------------------------------------------------------
# names


def dns_name(text: str, limit: int = 40) -> str:
    """``text`` as a DNS label (``enwik8_rlstm`` -> ``enwik8-rlstm``): lower case, ``[a-z0-9-]``,
    starting with a letter, at most ``limit`` characters."""
    name = re.sub(r"[^a-z0-9-]+", "-", text.lower()).strip("-")
    name = re.sub(r"-{2,}", "-", name)
    if not name or not name[0].isalpha():
        name = f"r-{name}".rstrip("-")
    return name[:limit].rstrip("-")


def _child_name(parent: str, suffix: str, limit: int = MAX_JOB_NAME) -> str:
    """``<parent>-<suffix>`` shortened (with a hash of ``parent``) to ``limit`` characters."""
    name = f"{parent}-{suffix}"
    if len(name) <= limit:
        return name
    digest = hashlib.sha256(parent.encode()).hexdigest()[:6]
    keep = limit - len(suffix) - len(digest) - 2
    return f"{parent[:keep].rstrip('-')}-{digest}-{suffix}"


def stage_job_name(driver_name: str, stage: Stage) -> str:
    """The name of a stage Job (and of the train Service) of the driver Job ``driver_name``."""
    return _child_name(driver_name, stage)


@dataclass(frozen=True)
class ManifestNames:
    """Names of the objects a user applies for one experiment (one-apply or nightly)."""

    base: str  # the driver Job (one-apply) or CronJob (nightly)
    namespace: str
    account: str | None = None  # the driver's ServiceAccount when shared (a sweep's points); else <base>-driver

    @classmethod
    def of(cls, config: PipelineConfig, *, nightly: bool = False) -> ManifestNames:
        base = config.cluster.run_name or dns_name(config.name)
        return cls(base=f"{base}-nightly" if nightly else base, namespace=config.cluster.namespace)

    @property
    def configmap(self) -> str:
        return f"{self.base}-config"

    @property
    def service_account(self) -> str:
        return self.account or f"{self.base}-driver"


@dataclass(frozen=True)
class DriverRef:
    """The running driver Job: its stage Jobs are named after it and owned by it.

    ``name`` is also the pipeline run key (``PIPELINE_RUN_KEY``: one MLflow parent run for all
    stages and restarts) and names the run's checkpoint folder, so a re-applied driver of the same
    name resumes the same run, and every nightly CronJob run starts afresh.
    """

    name: str
    namespace: str
    uid: str | None  # None when not known (no owner references then, labels only)
    configmap: str


# ---------------------------------------------------------------------------------------------
# resolved endpoints and locations


def s3_endpoint(cluster: ClusterConfig) -> str:
    return cluster.s3_endpoint or f"http://minio.{cluster.namespace}.svc:9000"


def cpu_image(cluster: ClusterConfig) -> str:
    """The image of the pods without a GPU: ``cluster.cpu_image``, else ``cluster.image``."""
    return cluster.cpu_image or cluster.image


def mlflow_uri(cluster: ClusterConfig) -> str:
    return cluster.mlflow_uri or f"http://mlflow.{cluster.namespace}.svc:5000"


def dataset_url(config: PipelineConfig) -> str:
    return config.cluster.dataset_url or f"{config.cluster.storage_url.rstrip('/')}/datasets/{config.data.dataset}"


def checkpoint_url(config: PipelineConfig, driver: DriverRef) -> str:
    """The run's checkpoints: ``checkpoint.url`` if set, else ``<storage_url>/runs/<name>/<driver>/checkpoints``."""
    return config.checkpoint.url or f"{config.cluster.storage_url.rstrip('/')}/runs/{config.name}/{driver.name}/checkpoints"


# ---------------------------------------------------------------------------------------------
# pod pieces


def _labels(experiment: str, **extra: str) -> dict[str, str]:
    return {**APP_LABELS, f"{LABEL}/experiment": dns_name(experiment, 63), **{f"{LABEL}/{k}": v for k, v in extra.items()}}


def _resources(res: PodResources, gpus: int = 0) -> dict[str, Any]:
    requests: dict[str, Any] = {"cpu": res.cpu, "memory": res.memory}
    limits: dict[str, Any] = {"cpu": res.cpu_limit or res.cpu, "memory": res.memory_limit or res.memory}
    if gpus:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(gpus)  # extended resources: requests == limits
    return {"requests": requests, "limits": limits}


def _pod_security() -> dict[str, Any]:
    return {
        "runAsNonRoot": True,
        "runAsUser": RUN_AS,
        "runAsGroup": RUN_AS,
        "fsGroup": RUN_AS,
        "seccompProfile": {"type": "RuntimeDefault"},
    }


def _container_security() -> dict[str, Any]:
    return {
        "allowPrivilegeEscalation": False,
        "privileged": False,
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
        "capabilities": {"drop": ["ALL"]},
    }


def _secret_env(name: str, secret: str, key: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"secretKeyRef": {"name": secret, "key": key}}}


def _field_env(name: str, field_path: str) -> dict[str, Any]:
    return {"name": name, "valueFrom": {"fieldRef": {"fieldPath": field_path}}}


def _s3_env(cluster: ClusterConfig) -> list[dict[str, Any]]:
    return [
        {"name": "AWS_ENDPOINT_URL", "value": s3_endpoint(cluster)},
        {"name": "AWS_DEFAULT_REGION", "value": "us-east-1"},  # MinIO's default; boto3 needs one
        *(_secret_env(key, cluster.s3_secret, key) for key in S3_SECRET_KEYS),
    ]


def _runtime_env(cache: str = "/tmp/cache") -> list[dict[str, Any]]:
    # A read-only root filesystem: every cache goes to a writable emptyDir.
    return [
        {"name": "HOME", "value": "/tmp"},
        {"name": "XDG_CACHE_HOME", "value": cache},
        {"name": "MPLCONFIGDIR", "value": "/tmp/matplotlib"},
        {"name": "PYTHONUNBUFFERED", "value": "1"},
    ]


def _stage_env(config: PipelineConfig, driver: DriverRef, image: str) -> list[dict[str, Any]]:
    return [
        {"name": "PIPELINE_RUN_KEY", "value": driver.name},
        {"name": "MLFLOW_TRACKING_URI", "value": mlflow_uri(config.cluster)},
        {"name": "PIPELINE_IMAGE", "value": image},  # MLflow tag pipeline.image
        *_s3_env(config.cluster),
        *_runtime_env(cache=f"{WORK_DIR}/cache"),
    ]


def _stage_overrides(config: PipelineConfig, driver: DriverRef) -> list[str]:
    """Command-line overrides shared by every stage container: pod-local folders and shared stores."""
    return [
        "--config", CONFIG_FILE,
        "--work_dir", f"{WORK_DIR}/run",
        "--data.dir", f"{WORK_DIR}/data/{config.data.dataset}",
        "--data.cache_dir", f"{WORK_DIR}/downloads",
        "--checkpoint.url", checkpoint_url(config, driver),
        "--cluster.dataset_url", dataset_url(config),
    ]


def _volumes(configmap: str, cluster: ClusterConfig, *, scratch: bool, shm: bool) -> list[dict[str, Any]]:
    volumes: list[dict[str, Any]] = [
        {"name": "config", "configMap": {"name": configmap}},
        {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
    ]
    if scratch:
        volumes.append({"name": "work", "emptyDir": {"sizeLimit": cluster.scratch_size}})
    if shm:
        # torch / NCCL use /dev/shm; the runtime's default is 64 MiB.
        volumes.append({"name": "dshm", "emptyDir": {"medium": "Memory", "sizeLimit": cluster.shm_size}})
    return volumes


def _mounts(*, scratch: bool, shm: bool) -> list[dict[str, Any]]:
    mounts: list[dict[str, Any]] = [
        {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": "tmp", "mountPath": "/tmp"},
    ]
    if scratch:
        mounts.append({"name": "work", "mountPath": WORK_DIR})
    if shm:
        mounts.append({"name": "dshm", "mountPath": "/dev/shm"})
    return mounts


def _container(name: str, cluster: ClusterConfig, *, image: str, args: list[str], env: list[dict[str, Any]],
               resources: dict[str, Any], mounts: list[dict[str, Any]], command: list[str] | None = None) -> dict[str, Any]:
    container: dict[str, Any] = {"name": name, "image": image, "imagePullPolicy": cluster.image_pull_policy}
    if command is not None:
        container["command"] = command  # else the image's ENTRYPOINT: python -m pipeline
    container.update(args=args, env=env, resources=resources, volumeMounts=mounts,
                     securityContext=_container_security())
    return container


def _pod_failure_policy(preemption: Literal["Ignore", "FailJob"], exit_codes: tuple[int, ...]) -> dict[str, Any]:
    """Preemption first (a pod killed by preemption never counts as failed), then exit codes that
    no retry can fix (they apply to every container, init containers included)."""
    return {"rules": [
        {"action": preemption, "onPodConditions": [{"type": "DisruptionTarget", "status": "True"}]},
        {"action": "FailJob", "onExitCodes": {"operator": "In", "values": list(exit_codes)}},
    ]}


def _scan_exceptions(*checks: str, images: tuple[str, ...] = ()) -> dict[str, str]:
    """``checkov.io/skip<n>`` annotations for the accepted findings ``checks`` (see SCAN_EXCEPTIONS);
    the digest finding only while one of the object's ``images`` is pinned by tag alone."""
    ids = [c for c in checks if c != "CKV_K8S_43"]
    if any("@sha256:" not in image for image in images):
        ids.append("CKV_K8S_43")
    return {f"checkov.io/skip{i}": f"{check}={SCAN_EXCEPTIONS[check]}" for i, check in enumerate(sorted(ids), 1)}


def _owner_references(driver: DriverRef) -> list[dict[str, Any]]:
    if driver.uid is None:
        return []
    return [{"apiVersion": "batch/v1", "kind": "Job", "name": driver.name, "uid": driver.uid}]


# ---------------------------------------------------------------------------------------------
# the objects the driver creates


@_plain
def build_train_service(config: PipelineConfig, driver: DriverRef) -> dict[str, Any]:
    """Headless Service giving train pod ``i`` the DNS name ``<train-job>-<i>.<service>``, published
    before the pods are ready (the rendezvous happens before any readiness)."""
    name = stage_job_name(driver.name, "train")
    metadata: dict[str, Any] = {"name": name, "namespace": driver.namespace,
                                "labels": _labels(config.name, run=driver.name, stage="train")}
    if owners := _owner_references(driver):
        metadata["ownerReferences"] = owners
    port = config.cluster.rdzv_port
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": metadata,
        "spec": {
            "clusterIP": "None",
            "publishNotReadyAddresses": True,
            "selector": {f"{LABEL}/run": driver.name, f"{LABEL}/stage": "train"},
            "ports": [{"name": "rendezvous", "port": port, "targetPort": port, "protocol": "TCP"}],
        },
    }


def _train_env(config: PipelineConfig, driver: DriverRef) -> list[dict[str, Any]]:
    """torchrun reads every option from PET_* variables: a static rendezvous on pod 0 with the node
    rank = the pod's completion index, so ranks follow the stable pod names."""
    cluster = config.cluster
    job = stage_job_name(driver.name, "train")
    nproc = cluster.nproc_per_node or cluster.train.gpus or 1
    return [
        {"name": "PET_NNODES", "value": str(cluster.nodes)},
        {"name": "PET_NPROC_PER_NODE", "value": str(nproc)},
        _field_env("PET_NODE_RANK", f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"),
        {"name": "PET_RDZV_BACKEND", "value": "static"},
        {"name": "PET_MASTER_ADDR", "value": f"{job}-0.{job}.{driver.namespace}.svc"},
        {"name": "PET_MASTER_PORT", "value": str(cluster.rdzv_port)},
        {"name": "PET_RDZV_CONF", "value": "timeout=1800"},  # pods start (and pull images) at different times
        {"name": "PET_MAX_RESTARTS", "value": "0"},  # restarts are whole-Job, by the driver
    ]


@_plain
def build_stage_job(config: PipelineConfig, stage: Stage, driver: DriverRef, *,
                    attempt: int = 1, restarts_used: int = 0, preemptions: int = 0) -> dict[str, Any]:
    """The Job of one stage of the run ``driver``.

    ``prepare``: one CPU pod running ``python -m pipeline prepare`` (publishes the tokenised data to
    ``cluster.dataset_url``; nothing to do when it is already there and verifies).
    ``train``: an Indexed Job with one pod per node (``completions = parallelism = nodes``), each
    running ``torchrun`` with its completion index as node rank, after an init container fetched and
    verified the dataset. ``backoffLimit: 0``: any failure fails the whole Job, which the driver
    re-creates (resuming from the last committed checkpoint). Preemption: with one node the Job
    controller just replaces the pod (``Ignore``); with several the gang is broken, so the Job fails
    at once (``FailJob``) and the driver re-creates it without using up ``max_train_restarts``.
    ``evaluate``: one GPU pod, the dataset fetched by an init container.

    ``attempt`` / ``restarts_used`` / ``preemptions`` are recorded as annotations so that a
    restarted driver continues the count.
    """
    if stage not in STAGES:
        raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
    cluster = config.cluster
    name = stage_job_name(driver.name, stage)
    labels = _labels(config.name, run=driver.name, stage=stage)
    overrides = _stage_overrides(config, driver)
    gpu_stage = stage in ("train", "evaluate")
    image = cluster.image if gpu_stage else cpu_image(cluster)  # one image per pod: init containers share it
    env = _stage_env(config, driver, image)
    mounts = _mounts(scratch=True, shm=gpu_stage)
    pod: dict[str, Any] = {
        "restartPolicy": "Never",  # podFailurePolicy needs it; retries are new pods
        "automountServiceAccountToken": False,
        "securityContext": _pod_security(),
        "volumes": _volumes(driver.configmap, cluster, scratch=True, shm=gpu_stage),
    }
    spec: dict[str, Any] = {"ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished}

    if stage == "prepare":
        res = _resources(cluster.prepare)
        pod["containers"] = [_container("prepare", cluster, image=image, args=["prepare", *overrides], env=env,
                                        resources=res, mounts=mounts)]
        spec.update(backoffLimit=cluster.backoff_limit,
                    podFailurePolicy=_pod_failure_policy("Ignore", NON_RETRIABLE_EXIT_CODES))
    else:
        gpu_res = cluster.train if stage == "train" else cluster.evaluate
        fetch = _container("fetch-data", cluster, image=image, command=["python", "-m", "pipeline.k8s"],
                           args=["fetch-data", *overrides], env=env, resources=_resources(gpu_res),
                           mounts=_mounts(scratch=True, shm=False))
        pod["initContainers"] = [fetch]
        if cluster.node_selector:
            pod["nodeSelector"] = dict(cluster.node_selector)
        if cluster.tolerations:
            pod["tolerations"] = [t.model_dump(exclude_none=True) for t in cluster.tolerations]
        res = _resources(gpu_res, gpus=gpu_res.gpus)
        if stage == "evaluate":
            pod["containers"] = [_container("evaluate", cluster, image=image, args=["evaluate", *overrides], env=env,
                                            resources=res, mounts=mounts)]
            spec.update(backoffLimit=cluster.backoff_limit,
                        podFailurePolicy=_pod_failure_policy("Ignore", NON_RETRIABLE_EXIT_CODES))
        else:
            pod["subdomain"] = name  # with the headless Service of the same name: <job>-<i>.<name>
            pod["containers"] = [_container(
                "train", cluster, image=image, command=["python", "-m", "pipeline.k8s.launch"],
                args=["-m", "pipeline", "train", *overrides], env=[*env, *_train_env(config, driver)],
                resources=res, mounts=mounts,
            )]
            pod["containers"][0]["ports"] = [{"name": "rendezvous", "containerPort": cluster.rdzv_port, "protocol": "TCP"}]
            preemption: Literal["Ignore", "FailJob"] = "Ignore" if cluster.nodes == 1 else "FailJob"
            spec.update(
                completionMode="Indexed",
                completions=cluster.nodes,
                parallelism=cluster.nodes,
                backoffLimit=0,
                podReplacementPolicy="Failed",  # a replacement starts only once the old pod is gone
                podFailurePolicy=_pod_failure_policy(preemption, NON_RETRIABLE_EXIT_CODES),
            )
    spec["template"] = {"metadata": {"labels": labels}, "spec": pod}
    metadata: dict[str, Any] = {
        "name": name,
        "namespace": driver.namespace,
        "labels": labels,
        "annotations": {
            f"{LABEL}/attempt": str(attempt),
            f"{LABEL}/restarts-used": str(restarts_used),
            f"{LABEL}/preemptions": str(preemptions),
            **_scan_exceptions("CKV_K8S_35", images=(image,)),
        },
    }
    if owners := _owner_references(driver):
        metadata["ownerReferences"] = owners
    return {"apiVersion": "batch/v1", "kind": "Job", "metadata": metadata, "spec": spec}


# ---------------------------------------------------------------------------------------------
# the objects the user applies


@_plain
def build_configmap(config: PipelineConfig, names: ManifestNames) -> dict[str, Any]:
    """The resolved experiment config, mounted by the driver and every stage pod."""
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": names.configmap, "namespace": names.namespace, "labels": _labels(config.name)},
        "data": {"config.yaml": config.to_yaml()},
    }


def driver_role_rules() -> list[dict[str, Any]]:
    """Exactly what the driver does: stage Jobs (create, read, watch, delete), the train Service
    (create, read, delete), and reading the pods and logs of a failed stage."""
    return [
        {"apiGroups": ["batch"], "resources": ["jobs"], "verbs": ["create", "get", "watch", "delete"]},
        {"apiGroups": [""], "resources": ["services"], "verbs": ["create", "get", "delete"]},
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["list"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    ]


@_plain
def build_rbac(config: PipelineConfig, names: ManifestNames) -> list[dict[str, Any]]:
    """ServiceAccount, namespaced Role and RoleBinding of the driver."""
    meta = {"namespace": names.namespace, "labels": _labels(config.name)}
    return [
        {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": {"name": names.service_account, **meta},
         "automountServiceAccountToken": False},  # only the driver pod mounts it, explicitly
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role",
         "metadata": {"name": names.service_account, **meta}, "rules": driver_role_rules()},
        {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "RoleBinding",
         "metadata": {"name": names.service_account, **meta},
         "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.service_account},
         "subjects": [{"kind": "ServiceAccount", "name": names.service_account, "namespace": names.namespace}]},
    ]


def _driver_job_spec(config: PipelineConfig, names: ManifestNames) -> dict[str, Any]:
    cluster = config.cluster
    env = [
        # The driver learns its own Job from the labels the Job controller puts on its pod.
        _field_env("RLM_DRIVER_NAME", "metadata.labels['batch.kubernetes.io/job-name']"),
        _field_env("RLM_DRIVER_UID", "metadata.labels['batch.kubernetes.io/controller-uid']"),
        _field_env("RLM_NAMESPACE", "metadata.namespace"),
        {"name": "RLM_CONFIGMAP", "value": names.configmap},
        *_runtime_env(),
    ]
    container = _container("driver", cluster, image=cpu_image(cluster), command=["python", "-m", "pipeline.k8s"],
                           args=["drive", "--config", CONFIG_FILE], env=env,
                           resources=_resources(cluster.driver), mounts=_mounts(scratch=False, shm=False))
    pod = {
        "serviceAccountName": names.service_account,
        "automountServiceAccountToken": True,  # the only pod that talks to the API server
        "restartPolicy": "Never",
        "securityContext": _pod_security(),
        "containers": [container],
        "volumes": _volumes(names.configmap, cluster, scratch=False, shm=False),
    }
    return {
        "backoffLimit": cluster.backoff_limit,  # a crashed driver pod is replaced and adopts its stage Jobs
        "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
        "podFailurePolicy": _pod_failure_policy("Ignore", (*NON_RETRIABLE_EXIT_CODES, DRIVER_FAILED_EXIT_CODE)),
        "template": {"metadata": {"labels": _labels(config.name, role="driver")}, "spec": pod},
    }


@_plain
def build_driver_job(config: PipelineConfig, names: ManifestNames) -> dict[str, Any]:
    return {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": names.base, "namespace": names.namespace, "labels": _labels(config.name, role="driver"),
                     "annotations": _scan_exceptions("CKV_K8S_38", images=(cpu_image(config.cluster),))},
        "spec": _driver_job_spec(config, names),
    }


@_plain
def build_driver_cronjob(config: PipelineConfig, names: ManifestNames, schedule: str) -> dict[str, Any]:
    """A CronJob whose job template is the driver; runs never overlap (``Forbid``)."""
    if len(schedule.split()) != 5:
        raise ValueError(f"schedule {schedule!r} is not a cron expression of 5 fields, e.g. '0 3 * * *'")
    return {
        "apiVersion": "batch/v1",
        "kind": "CronJob",
        "metadata": {"name": names.base, "namespace": names.namespace, "labels": _labels(config.name, role="nightly"),
                     "annotations": _scan_exceptions("CKV_K8S_38", images=(cpu_image(config.cluster),))},
        "spec": {
            "schedule": schedule,
            "timeZone": "Etc/UTC",
            "concurrencyPolicy": "Forbid",
            "startingDeadlineSeconds": 3600,
            "successfulJobsHistoryLimit": 3,
            "failedJobsHistoryLimit": 3,
            "jobTemplate": {
                "metadata": {"labels": _labels(config.name, role="driver")},
                "spec": _driver_job_spec(config, names),
            },
        },
    }


@_plain
def build_pipeline_manifest(config: PipelineConfig) -> list[dict[str, Any]]:
    """Everything ``kubectl apply -f`` needs to run the whole pipeline once."""
    names = ManifestNames.of(config)
    return [build_configmap(config, names), *build_rbac(config, names), build_driver_job(config, names)]


@_plain
def build_nightly_manifest(config: PipelineConfig, schedule: str) -> list[dict[str, Any]]:
    """Like :func:`build_pipeline_manifest`, with a CronJob starting a fresh driver on ``schedule``."""
    names = ManifestNames.of(config, nightly=True)
    return [build_configmap(config, names), *build_rbac(config, names), build_driver_cronjob(config, names, schedule)]


@_plain
def build_sweep_manifest(configs: Sequence[PipelineConfig], sweep_name: str, key: str) -> list[dict[str, Any]]:
    """A sweep on Kubernetes: one ConfigMap and one driver Job per point (each runs prepare -> train ->
    evaluate of its config, as :func:`build_pipeline_manifest`), and one driver ServiceAccount, Role and
    RoleBinding named ``<sweep_name>-driver`` that all points share. Every object is labelled
    ``<LABEL>/sweep=<key>``, so ``kubectl get jobs -l`` lists a sweep; the points' configs carry
    ``tracking.sweep_key`` (their MLflow runs nest under the sweep run).
    """
    if not configs:
        raise ValueError("a sweep manifest needs at least one point")
    namespaces = {c.cluster.namespace for c in configs}
    if len(namespaces) != 1:
        raise ValueError(f"the points of a sweep must share one namespace, got {sorted(namespaces)}")
    shared = ManifestNames(base=dns_name(sweep_name, 50), namespace=namespaces.pop())
    objects = build_rbac(configs[0], shared)
    for obj in objects:  # the account serves every point: labelled with the experiment, not the first point
        obj["metadata"]["labels"][f"{LABEL}/experiment"] = dns_name(configs[0].tracking.experiment or configs[0].name, 63)
    bases = set()
    for config in configs:
        names = ManifestNames(base=ManifestNames.of(config).base, namespace=shared.namespace,
                              account=shared.service_account)
        if names.base in bases:
            raise ValueError(f"two points of the sweep have the driver name {names.base!r}; give them distinct "
                             "cluster.run_name values")
        bases.add(names.base)
        objects += [build_configmap(config, names), build_driver_job(config, names)]
    for obj in objects:
        obj["metadata"]["labels"][f"{LABEL}/sweep"] = key
    return objects


# ---------------------------------------------------------------------------------------------
# shared services: namespace, object storage, MLflow


@_plain
def build_namespace(cluster: ClusterConfig) -> list[dict[str, Any]]:
    """The namespace (enforcing the ``restricted`` Pod Security Standard every pod here meets) and
    its NetworkPolicies: no ingress to any pod except the object storage and MLflow from pods of
    the namespace, and train pods from the train pods (NCCL and the rendezvous use many ports)."""
    ns = cluster.namespace
    namespace = {
        "apiVersion": "v1",
        "kind": "Namespace",
        "metadata": {"name": ns, "labels": {
            **APP_LABELS,
            "pod-security.kubernetes.io/enforce": "restricted",
            "pod-security.kubernetes.io/warn": "restricted",
        }},
    }

    def policy(name: str, selector: dict[str, str], ingress: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "apiVersion": "networking.k8s.io/v1",
            "kind": "NetworkPolicy",
            "metadata": {"name": name, "namespace": ns, "labels": dict(APP_LABELS)},
            "spec": {"podSelector": {"matchLabels": selector} if selector else {}, "policyTypes": ["Ingress"],
                     "ingress": ingress},
        }

    in_namespace = [{"podSelector": {}}]
    return [
        namespace,
        policy("default-deny-ingress", {}, []),
        policy("minio-from-namespace", {"app.kubernetes.io/name": "minio"},
               [{"from": in_namespace, "ports": [{"protocol": "TCP", "port": 9000}, {"protocol": "TCP", "port": 9001}]}]),
        policy("mlflow-from-namespace", {"app.kubernetes.io/name": "mlflow"},
               [{"from": in_namespace, "ports": [{"protocol": "TCP", "port": 5000}]}]),
        policy("train-gang", {f"{LABEL}/stage": "train"},
               [{"from": [{"podSelector": {"matchLabels": {f"{LABEL}/stage": "train"}}}]}]),
    ]


def _probe(path: str, port: int, *, period: int = 10, failures: int = 3) -> dict[str, Any]:
    return {"httpGet": {"path": path, "port": port}, "periodSeconds": period, "failureThreshold": failures,
            "timeoutSeconds": 5}


def _service(name: str, namespace: str, labels: dict[str, str], ports: dict[str, int]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": {"name": name, "namespace": namespace, "labels": labels},
        "spec": {"selector": labels, "ports": [
            {"name": port_name, "port": port, "targetPort": port, "protocol": "TCP"} for port_name, port in ports.items()
        ]},
    }


def _bucket(url: str) -> str:
    return url.split("://", 1)[-1].split("/", 1)[0]


@_plain
def build_minio_manifest(cluster: ClusterConfig, *, storage: str = "100Gi") -> list[dict[str, Any]]:
    """A single-node MinIO (StatefulSet + Service) and a Job creating the pipeline's buckets.

    The root credentials are the ``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY`` keys of
    ``cluster.s3_secret``, the same Secret the pipeline's pods read.
    """
    ns = cluster.namespace
    labels = {**APP_LABELS, "app.kubernetes.io/name": "minio", "app.kubernetes.io/component": "object-storage"}
    container = {
        "name": "minio",
        "image": MINIO_IMAGE,
        "imagePullPolicy": cluster.image_pull_policy,
        "args": ["server", "/data", "--address", ":9000", "--console-address", ":9001", "--certs-dir", "/tmp/certs"],
        "env": [_secret_env("MINIO_ROOT_USER", cluster.s3_secret, S3_SECRET_KEYS[0]),
                _secret_env("MINIO_ROOT_PASSWORD", cluster.s3_secret, S3_SECRET_KEYS[1]),
                {"name": "HOME", "value": "/tmp"}],
        "ports": [{"name": "api", "containerPort": 9000, "protocol": "TCP"},
                  {"name": "console", "containerPort": 9001, "protocol": "TCP"}],
        "readinessProbe": _probe("/minio/health/ready", 9000),
        "livenessProbe": _probe("/minio/health/live", 9000, period=20),
        "resources": _resources(PodResources(cpu="1", memory="2Gi", cpu_limit="2", memory_limit="4Gi")),
        "volumeMounts": [{"name": "data", "mountPath": "/data"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _container_security(),
    }
    statefulset = {
        "apiVersion": "apps/v1",
        "kind": "StatefulSet",
        "metadata": {"name": "minio", "namespace": ns, "labels": labels,
                     "annotations": _scan_exceptions("CKV_K8S_35", images=(MINIO_IMAGE,))},
        "spec": {
            "serviceName": "minio",
            "replicas": 1,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "automountServiceAccountToken": False,
                "securityContext": _pod_security(),
                "containers": [container],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
            }},
            "volumeClaimTemplates": [{
                "metadata": {"name": "data"},
                "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}},
            }],
        },
    }
    buckets = [_bucket(cluster.storage_url), MLFLOW_ARTIFACTS_BUCKET]
    bucket_labels = {**labels, "app.kubernetes.io/component": "buckets"}
    bucket_job = {
        "apiVersion": "batch/v1",
        "kind": "Job",
        "metadata": {"name": "minio-buckets", "namespace": ns, "labels": bucket_labels,
                     "annotations": _scan_exceptions("CKV_K8S_35", images=(cpu_image(cluster),))},
        "spec": {
            "backoffLimit": 12,  # retried (with the Job's backoff) until MinIO is up
            "ttlSecondsAfterFinished": cluster.ttl_seconds_after_finished,
            "template": {"metadata": {"labels": bucket_labels}, "spec": {
                "restartPolicy": "Never",
                "automountServiceAccountToken": False,
                "securityContext": _pod_security(),
                "containers": [_container(
                    "buckets", cluster, image=cpu_image(cluster), command=["python", "-m", "pipeline.k8s"],
                    args=["create-buckets", *(f"s3://{b}" for b in buckets)],
                    env=[*_s3_env(cluster), *_runtime_env()],
                    resources=_resources(PodResources(cpu="100m", memory="256Mi")),
                    mounts=[{"name": "tmp", "mountPath": "/tmp"}],
                )],
                "volumes": [{"name": "tmp", "emptyDir": {"sizeLimit": "1Gi"}}],
            }},
        },
    }
    return [_service("minio", ns, labels, {"api": 9000, "console": 9001}), statefulset, bucket_job]


@_plain
def build_mlflow_manifest(cluster: ClusterConfig, *, storage: str = "10Gi") -> list[dict[str, Any]]:
    """The MLflow tracking server (``mlflow/serve.sh`` in the project image): SQLite on a
    PersistentVolumeClaim, artifacts proxied to ``s3://mlflow-artifacts`` in the object storage, so
    clients need no storage credentials; only this pod reads the Secret."""
    ns = cluster.namespace
    labels = {**APP_LABELS, "app.kubernetes.io/name": "mlflow", "app.kubernetes.io/component": "tracking"}
    # The server answers only Host headers it knows (DNS-rebinding protection): the Service's names,
    # and localhost for `kubectl port-forward svc/mlflow 5000`.
    hosts = ["mlflow", f"mlflow.{ns}", f"mlflow.{ns}.svc", f"mlflow.{ns}.svc.cluster.local", "localhost", "127.0.0.1"]
    allowed = ",".join(pattern for host in hosts for pattern in (host, f"{host}:*"))
    container = {
        "name": "mlflow",
        "image": cpu_image(cluster),
        "imagePullPolicy": cluster.image_pull_policy,
        "command": ["/app/mlflow/serve.sh"],
        "workingDir": "/tmp",
        "env": [
            {"name": "MLFLOW_BACKEND_STORE_URI", "value": "sqlite:////mlflow/mlflow.db"},
            {"name": "MLFLOW_ARTIFACTS_DESTINATION", "value": f"s3://{MLFLOW_ARTIFACTS_BUCKET}"},
            {"name": "MLFLOW_HOST", "value": "0.0.0.0"},
            {"name": "MLFLOW_PORT", "value": "5000"},
            {"name": "MLFLOW_WORKERS", "value": "2"},
            {"name": "MLFLOW_SERVER_ALLOWED_HOSTS", "value": allowed},
            {"name": "MLFLOW_S3_ENDPOINT_URL", "value": s3_endpoint(cluster)},
            *_s3_env(cluster),
            *_runtime_env(),
        ],
        "ports": [{"name": "http", "containerPort": 5000, "protocol": "TCP"}],
        "readinessProbe": _probe("/health", 5000),
        "livenessProbe": _probe("/health", 5000, period=20, failures=6),
        "resources": _resources(PodResources(cpu="500m", memory="2Gi", cpu_limit="2", memory_limit="4Gi")),
        "volumeMounts": [{"name": "db", "mountPath": "/mlflow"}, {"name": "tmp", "mountPath": "/tmp"}],
        "securityContext": _container_security(),
    }
    pvc = {
        "apiVersion": "v1",
        "kind": "PersistentVolumeClaim",
        "metadata": {"name": "mlflow-db", "namespace": ns, "labels": labels},
        "spec": {"accessModes": ["ReadWriteOnce"], "resources": {"requests": {"storage": storage}}},
    }
    deployment = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": "mlflow", "namespace": ns, "labels": labels,
                     "annotations": _scan_exceptions("CKV_K8S_35", images=(cpu_image(cluster),))},
        "spec": {
            "replicas": 1,
            "strategy": {"type": "Recreate"},  # SQLite on a ReadWriteOnce volume: one writer at a time
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {
                "automountServiceAccountToken": False,
                "securityContext": _pod_security(),
                "containers": [container],
                "volumes": [
                    {"name": "db", "persistentVolumeClaim": {"claimName": "mlflow-db"}},
                    {"name": "tmp", "emptyDir": {"sizeLimit": "4Gi"}},
                ],
            }},
        },
    }
    return [pvc, deployment, _service("mlflow", ns, labels, {"http": 5000})]


# ---------------------------------------------------------------------------------------------


class _ManifestDumper(yaml.SafeDumper):
    """Multi-line strings (the config in the ConfigMap) as literal blocks, readable in the manifest;
    no YAML anchors / aliases for repeated values (plain, self-contained objects)."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _str_representer(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_ManifestDumper.add_representer(str, _str_representer)


def render_yaml(objects: list[dict[str, Any]], header: str = "") -> str:
    """A multi-document YAML stream (``kubectl apply -f`` reads it), optionally after a comment header."""
    lines = "".join(f"# {line}\n".replace("# \n", "#\n") for line in header.splitlines()) if header else ""
    return lines + "---\n".join(
        yaml.dump(obj, Dumper=_ManifestDumper, sort_keys=False, width=120) for obj in objects
    )
