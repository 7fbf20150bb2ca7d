"""Submitting a sweep's objects (built by :func:`pipeline.k8s.builders.build_sweep_manifest`) to a cluster.

Kept apart from the builders (pure functions): this is the only code that talks to the API server for a
sweep. An object that exists already (the same sweep submitted again) is left as it is - a point's driver
Job still running or finished keeps its run - and reported as such.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

__all__ = ["api_client", "submit_objects"]

log = logging.getLogger("pipeline.sweep")

_CREATE = {
    ("v1", "ConfigMap"): ("CoreV1Api", "create_namespaced_config_map"),
    ("v1", "ServiceAccount"): ("CoreV1Api", "create_namespaced_service_account"),
    ("rbac.authorization.k8s.io/v1", "Role"): ("RbacAuthorizationV1Api", "create_namespaced_role"),
    ("rbac.authorization.k8s.io/v1", "RoleBinding"): ("RbacAuthorizationV1Api", "create_namespaced_role_binding"),
    ("batch/v1", "Job"): ("BatchV1Api", "create_namespaced_job"),
}


def api_client(api_server: str | None = None) -> Any:
    """A kubernetes ``ApiClient``: for ``api_server`` (e.g. ``kubectl proxy``'s URL), else from the
    kubeconfig (``$KUBECONFIG`` / ``~/.kube/config``), else the in-cluster service account."""
    from kubernetes import client, config

    if api_server:
        configuration = client.Configuration()
        configuration.host = api_server
        return client.ApiClient(configuration)
    try:
        config.load_kube_config()
    except config.ConfigException:
        config.load_incluster_config()
    return client.ApiClient()


def submit_objects(objects: Iterable[dict[str, Any]], api: Any) -> list[tuple[str, str]]:
    """Create each object in its namespace, in order; ``[(kind/name, "created" | "exists")]``.

    Raises ``ValueError`` for a kind this submitter does not create, and the API's ``ApiException`` for
    any refusal other than "already exists" (HTTP 409).
    """
    from kubernetes import client
    from kubernetes.client.exceptions import ApiException

    done = []
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key not in _CREATE:
            raise ValueError(f"cannot submit a {obj['apiVersion']} {obj['kind']}: not part of a sweep manifest")
        api_class, method = _CREATE[key]
        create = getattr(getattr(client, api_class)(api), method)
        what = f"{obj['kind']}/{obj['metadata']['name']}"
        try:
            create(namespace=obj["metadata"]["namespace"], body=obj)
            done.append((what, "created"))
        except ApiException as err:
            if err.status != 409:
                raise
            done.append((what, "exists"))
        log.info("%s %s", what, done[-1][1])
    return done
