"""Running the pipeline on Kubernetes.

* :mod:`pipeline.k8s.builders`: pure functions, config -> Kubernetes objects (dicts).
* :mod:`pipeline.k8s.driver`: the in-cluster driver that submits them and waits (``kubernetes`` client).
* :mod:`pipeline.k8s.commands`: ``drive``, ``k8s-manifest``, ``fetch-data``, ``create-buckets``
  (``python -m pipeline.k8s <command>``, or ``python -m pipeline <command>`` once registered).
* :mod:`pipeline.k8s.launch`: ``torchrun`` that keeps the workers' exit code (train pods).
* :mod:`pipeline.k8s.shipped`: regenerates the manifests shipped in ``k8s/``.

See ``k8s/README.md`` for how to use them. Importing this package does not import the
``kubernetes`` client or torch.
"""

from pipeline.k8s.builders import (
    DriverRef,
    ManifestNames,
    build_driver_cronjob,
    build_driver_job,
    build_minio_manifest,
    build_mlflow_manifest,
    build_namespace,
    build_nightly_manifest,
    build_pipeline_manifest,
    build_stage_job,
    build_train_service,
    render_yaml,
)

__all__ = [
    "DriverRef",
    "ManifestNames",
    "build_driver_cronjob",
    "build_driver_job",
    "build_minio_manifest",
    "build_mlflow_manifest",
    "build_namespace",
    "build_nightly_manifest",
    "build_pipeline_manifest",
    "build_stage_job",
    "build_train_service",
    "render_yaml",
]
