"""The pure builders: config -> Kubernetes objects, field by field (no cluster, no client)."""

from __future__ import annotations

import pytest

from pipeline.config import ConfigError, load_config
from pipeline.k8s import builders
from pipeline.k8s.builders import (
    COMPLETION_INDEX_ANNOTATION,
    CONFIG_FILE,
    LABEL,
    DriverRef,
    ManifestNames,
    build_minio_manifest,
    build_mlflow_manifest,
    build_namespace,
    build_nightly_manifest,
    build_pipeline_manifest,
    build_stage_job,
    build_train_service,
    dns_name,
    stage_job_name,
)

DRIVER = DriverRef(name="enwik8-rlstm", namespace="ml", uid="0b3c-uid", configmap="enwik8-rlstm-config")


def config(**cluster):
    overrides = {f"cluster.{k}": v for k, v in cluster.items()}
    return load_config("enwik8_rlstm", {"cluster.namespace": "ml", **overrides})


def pod_spec(job):
    return job["spec"]["template"]["spec"]


def env_of(container) -> dict:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def all_containers(pod):
    return pod.get("initContainers", []) + pod["containers"]


def test_names_are_dns_labels_and_short_enough_for_indexed_pod_hostnames():
    assert dns_name("enwik8_rlstm") == "enwik8-rlstm"
    assert dns_name("96M__Model") == "r-96m-model"
    assert stage_job_name("enwik8-rlstm", "train") == "enwik8-rlstm-train"
    # CronJob-made driver names are long: <cronjob>-<8 digits>; stage names stay unique and <= 52
    long_driver = "a" * 40 + "-nightly-29012345"
    names = {stage: stage_job_name(long_driver, stage) for stage in builders.STAGES}
    assert all(len(n) <= 52 and n.endswith(stage) for stage, n in names.items())
    assert stage_job_name(long_driver.replace("29012345", "29012346"), "train") != names["train"]


def test_train_job_is_an_indexed_gang_running_torchrun_with_a_static_rendezvous_on_pod_0():
    cfg = config(nodes=4, **{"train.gpus": 8})
    job = build_stage_job(cfg, "train", DRIVER)
    spec, pod = job["spec"], pod_spec(job)
    assert spec["completionMode"] == "Indexed"
    assert spec["completions"] == spec["parallelism"] == 4
    assert spec["backoffLimit"] == 0  # any failure fails the Job: restarts are whole-gang, by the driver
    assert spec["podReplacementPolicy"] == "Failed"
    assert spec["ttlSecondsAfterFinished"] == cfg.cluster.ttl_seconds_after_finished
    assert pod["restartPolicy"] == "Never"
    assert pod["subdomain"] == job["metadata"]["name"] == "enwik8-rlstm-train"

    (train,) = pod["containers"]
    assert train["command"] == ["python", "-m", "pipeline.k8s.launch"]
    assert train["args"][:3] == ["-m", "pipeline", "train"]
    env = env_of(train)
    assert env["PET_NNODES"] == "4" and env["PET_NPROC_PER_NODE"] == "8"
    assert env["PET_NODE_RANK"] == {"fieldRef": {"fieldPath": f"metadata.annotations['{COMPLETION_INDEX_ANNOTATION}']"}}
    assert env["PET_RDZV_BACKEND"] == "static"
    assert env["PET_MASTER_ADDR"] == "enwik8-rlstm-train-0.enwik8-rlstm-train.ml.svc"
    assert env["PET_MASTER_PORT"] == str(cfg.cluster.rdzv_port)
    assert env["PET_MAX_RESTARTS"] == "0"
    assert train["ports"] == [{"name": "rendezvous", "containerPort": cfg.cluster.rdzv_port, "protocol": "TCP"}]


def test_train_service_is_headless_publishes_unready_pods_and_selects_only_this_runs_train_pods():
    cfg = config(nodes=2)
    service = build_train_service(cfg, DRIVER)
    job = build_stage_job(cfg, "train", DRIVER)
    assert service["metadata"]["name"] == pod_spec(job)["subdomain"]
    assert service["spec"]["clusterIP"] == "None"
    assert service["spec"]["publishNotReadyAddresses"] is True
    pod_labels = job["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert service["spec"]["selector"] == {f"{LABEL}/run": DRIVER.name, f"{LABEL}/stage": "train"}
    assert service["metadata"]["ownerReferences"][0]["uid"] == DRIVER.uid


def test_gpu_requests_equal_limits_and_shm_is_a_memory_volume():
    cfg = config(**{"train.gpus": 8, "train.cpu": "32", "train.memory": "256Gi", "train.cpu_limit": "48",
                    "shm_size": "32Gi"})
    job = build_stage_job(cfg, "train", DRIVER)
    pod = pod_spec(job)
    resources = pod["containers"][0]["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"] == "8"
    assert resources["requests"]["cpu"] == "32" and resources["limits"]["cpu"] == "48"
    assert resources["requests"]["memory"] == resources["limits"]["memory"] == "256Gi"
    shm = next(v for v in pod["volumes"] if v["name"] == "dshm")
    assert shm["emptyDir"] == {"medium": "Memory", "sizeLimit": "32Gi"}
    assert {"name": "dshm", "mountPath": "/dev/shm"} in pod["containers"][0]["volumeMounts"]
    # the init container fetching data asks for no GPU
    assert "nvidia.com/gpu" not in pod["initContainers"][0]["resources"]["limits"]
    # CPU-only training is possible: no GPU resource at all
    cpu_pod = pod_spec(build_stage_job(config(**{"train.gpus": 0}), "train", DRIVER))
    assert "nvidia.com/gpu" not in cpu_pod["containers"][0]["resources"]["limits"]
    assert env_of(cpu_pod["containers"][0])["PET_NPROC_PER_NODE"] == "1"


def test_tolerations_and_node_selector_go_to_the_gpu_pods_only():
    cfg = config(node_selector={"nvidia.com/gpu.product": "H100"},
                 tolerations=[{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}])
    for stage in ("train", "evaluate"):
        pod = pod_spec(build_stage_job(cfg, stage, DRIVER))
        assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "H100"}
        assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    prepare = pod_spec(build_stage_job(cfg, "prepare", DRIVER))
    assert "nodeSelector" not in prepare and "tolerations" not in prepare


def test_pod_failure_policies_tell_preemption_from_config_errors():
    def rules(job):
        return job["spec"]["podFailurePolicy"]["rules"]

    preempted = {"type": "DisruptionTarget", "status": "True"}
    # Exit codes no retry can fix: config (2), unreadable checkpoints (4), unwritable storage (5), divergence (6),
    # a checkpoint location owned by another job (7).
    config_error = {"operator": "In", "values": [2, 4, 5, 6, 7, 8]}
    single = rules(build_stage_job(config(nodes=1), "train", DRIVER))
    gang = rules(build_stage_job(config(nodes=2), "train", DRIVER))
    # one node: the Job controller replaces a preempted pod itself, not counted against backoffLimit
    assert single[0] == {"action": "Ignore", "onPodConditions": [preempted]}
    # several nodes: the gang is broken, fail the Job at once; the driver re-creates it without using the budget
    assert gang[0] == {"action": "FailJob", "onPodConditions": [preempted]}
    for stage in ("prepare", "evaluate"):
        stage_rules = rules(build_stage_job(config(), stage, DRIVER))
        assert stage_rules[0]["action"] == "Ignore" and stage_rules[0]["onPodConditions"] == [preempted]
    for r in (single, gang, rules(build_stage_job(config(), "prepare", DRIVER))):
        assert r[1] == {"action": "FailJob", "onExitCodes": config_error}


def test_every_stage_runs_the_cli_on_the_mounted_config_with_pod_local_folders_and_shared_stores():
    cfg = config(storage_url="s3://bucket")
    for stage in builders.STAGES:
        job = build_stage_job(cfg, stage, DRIVER)
        pod = pod_spec(job)
        main = pod["containers"][0]
        args = main["args"]
        assert stage in args and args[args.index("--config") + 1] == CONFIG_FILE
        assert args[args.index("--checkpoint.url") + 1] == "s3://bucket/runs/enwik8_rlstm/enwik8-rlstm/checkpoints"
        assert args[args.index("--cluster.dataset_url") + 1] == "s3://bucket/datasets/enwik8"
        assert args[args.index("--work_dir") + 1].startswith("/work/")
        env = env_of(main)
        assert env["PIPELINE_RUN_KEY"] == DRIVER.name  # one MLflow parent run for every stage and restart
        assert env["MLFLOW_TRACKING_URI"] == "http://mlflow.ml.svc:5000"
        image = cfg.cluster.cpu_image if stage == "prepare" else cfg.cluster.image
        assert {c["image"] for c in all_containers(pod)} == {image}  # one image per pod
        assert env["PIPELINE_IMAGE"] == image  # MLflow tag pipeline.image
        assert env["AWS_ENDPOINT_URL"] == "http://minio.ml.svc:9000"
        for key in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
            assert env[key] == {"secretKeyRef": {"name": "rlm-pipeline-s3", "key": key}}
        assert job["metadata"]["ownerReferences"] == [
            {"apiVersion": "batch/v1", "kind": "Job", "name": DRIVER.name, "uid": DRIVER.uid}]
        assert job["metadata"]["labels"][f"{LABEL}/run"] == DRIVER.name
        assert {v["name"]: v for v in pod["volumes"]}["config"] == {"name": "config", "configMap": {"name": DRIVER.configmap}}
        if stage != "prepare":  # train / evaluate fetch and verify the dataset first
            (fetch,) = pod["initContainers"]
            assert fetch["command"] == ["python", "-m", "pipeline.k8s"] and fetch["args"][0] == "fetch-data"
            assert fetch["args"][1:] == args[args.index("--config"):]
    # an explicit checkpoint.url wins (shared by every run of this config)
    explicit = load_config("enwik8_rlstm", {"checkpoint.url": "s3://mine/ck"})
    train_args = pod_spec(build_stage_job(explicit, "train", DRIVER))["containers"][0]["args"]
    assert train_args[train_args.index("--checkpoint.url") + 1] == "s3://mine/ck"


def test_no_owner_references_without_a_driver_uid():
    job = build_stage_job(config(), "prepare", DriverRef("d", "ml", None, "d-config"))
    assert "ownerReferences" not in job["metadata"]
    assert job["metadata"]["labels"][f"{LABEL}/run"] == "d"


def test_every_pod_is_locked_down():
    cfg = config()
    objects = [*build_pipeline_manifest(cfg), *build_nightly_manifest(cfg, "0 3 * * *"),
               *build_minio_manifest(cfg.cluster), *build_mlflow_manifest(cfg.cluster),
               *(build_stage_job(cfg, stage, DRIVER) for stage in builders.STAGES)]
    pods = []
    for obj in objects:
        spec = obj.get("spec", {})
        template = spec.get("template") or spec.get("jobTemplate", {}).get("spec", {}).get("template")
        if template:
            pods.append((obj["metadata"]["name"], template["spec"]))
    assert len(pods) == 8  # driver Job, CronJob, MinIO, buckets Job, MLflow, 3 stages
    for name, pod in pods:
        assert pod["securityContext"]["runAsNonRoot"] is True, name
        assert pod["securityContext"]["runAsUser"] >= 10000, name
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert pod["automountServiceAccountToken"] is (name.endswith("rlstm") or name.endswith("nightly")), name
        for container in all_containers(pod):
            sc = container["securityContext"]
            assert sc["allowPrivilegeEscalation"] is False and sc["privileged"] is False, name
            assert sc["readOnlyRootFilesystem"] is True, name
            assert sc["capabilities"] == {"drop": ["ALL"]}, name
            res = container["resources"]
            assert {"cpu", "memory"} <= res["requests"].keys() and {"cpu", "memory"} <= res["limits"].keys(), name
            assert not container["image"].endswith(":latest"), name
            mounts = {m["mountPath"] for m in container["volumeMounts"]}
            assert "/tmp" in mounts, name  # the writable places of a read-only root filesystem
            for env in container.get("env", []):  # credentials only through Secrets
                if env["name"].endswith(("_KEY_ID", "SECRET_ACCESS_KEY", "ROOT_USER", "PASSWORD", "TOKEN")):
                    assert "secretKeyRef" in env["valueFrom"], (name, env)


def test_driver_job_finds_itself_through_the_downward_api_and_fails_for_good_on_its_own_verdicts():
    cfg = config()
    configmap, account, role, binding, driver = build_pipeline_manifest(cfg)
    names = ManifestNames.of(cfg)
    assert driver["kind"] == "Job" and driver["metadata"]["name"] == names.base == "enwik8-rlstm"
    pod = pod_spec(driver)
    assert pod["serviceAccountName"] == account["metadata"]["name"] == binding["subjects"][0]["name"]
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "pipeline.k8s"]
    assert container["args"] == ["drive", "--config", CONFIG_FILE]
    env = env_of(container)
    assert env["RLM_DRIVER_NAME"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/job-name']"}}
    assert env["RLM_DRIVER_UID"] == {"fieldRef": {"fieldPath": "metadata.labels['batch.kubernetes.io/controller-uid']"}}
    assert env["RLM_CONFIGMAP"] == configmap["metadata"]["name"]
    rules = driver["spec"]["podFailurePolicy"]["rules"]
    assert rules[1]["onExitCodes"]["values"] == [2, 4, 5, 6, 7, 8, builders.DRIVER_FAILED_EXIT_CODE]
    assert driver["spec"]["ttlSecondsAfterFinished"] == cfg.cluster.ttl_seconds_after_finished
    # the ConfigMap holds the resolved config: the driver and every stage load exactly this
    assert load_config("enwik8_rlstm", {"cluster.namespace": "ml"}).to_yaml() == configmap["data"]["config.yaml"]


def test_role_allows_only_what_the_driver_does():
    rules = {tuple(r["resources"]): set(r["verbs"]) for r in builders.driver_role_rules()}
    assert rules == {("jobs",): {"create", "get", "watch", "delete"}, ("services",): {"create", "get", "delete"},
                     ("pods",): {"list"}, ("pods/log",): {"get"}}
    for rule in builders.driver_role_rules():
        assert "*" not in rule["verbs"] and "*" not in rule["resources"]
        assert "secrets" not in rule["resources"]


def test_nightly_cronjob_never_overlaps_and_its_template_is_the_driver():
    cfg = config()
    *_, cronjob = build_nightly_manifest(cfg, "0 3 * * *")
    one_apply_driver = build_pipeline_manifest(cfg)[-1]
    assert cronjob["kind"] == "CronJob" and cronjob["spec"]["concurrencyPolicy"] == "Forbid"
    assert cronjob["spec"]["schedule"] == "0 3 * * *"
    template = cronjob["spec"]["jobTemplate"]["spec"]
    # same driver, its own ConfigMap / ServiceAccount (the nightly config may differ)
    assert pod_spec({"spec": template})["serviceAccountName"] == "enwik8-rlstm-nightly-driver"
    assert template["podFailurePolicy"] == one_apply_driver["spec"]["podFailurePolicy"]
    with pytest.raises(ValueError, match="5 fields"):
        build_nightly_manifest(cfg, "daily")


def test_namespace_enforces_restricted_pods_and_denies_ingress_by_default():
    namespace, deny, *allows = build_namespace(config().cluster)
    assert namespace["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert deny["spec"] == {"podSelector": {}, "policyTypes": ["Ingress"], "ingress": []}
    allowed = {p["metadata"]["name"]: p["spec"] for p in allows}
    assert allowed["train-gang"]["podSelector"] == {"matchLabels": {f"{LABEL}/stage": "train"}}
    assert [p["port"] for p in allowed["mlflow-from-namespace"]["ingress"][0]["ports"]] == [5000]


def test_mlflow_server_runs_serve_sh_with_sqlite_on_a_volume_and_proxied_s3_artifacts():
    pvc, deployment, service = build_mlflow_manifest(config().cluster)
    pod = deployment["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    assert container["command"] == ["/app/mlflow/serve.sh"]
    env = env_of(container)
    assert env["MLFLOW_BACKEND_STORE_URI"] == "sqlite:////mlflow/mlflow.db"
    assert env["MLFLOW_ARTIFACTS_DESTINATION"] == "s3://mlflow-artifacts"
    assert "mlflow.ml.svc:*" in env["MLFLOW_SERVER_ALLOWED_HOSTS"].split(",")
    assert {"name": "db", "persistentVolumeClaim": {"claimName": pvc["metadata"]["name"]}} in pod["volumes"]
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    assert service["spec"]["ports"][0]["port"] == 5000
    assert container["readinessProbe"]["httpGet"] == {"path": "/health", "port": 5000}


def test_minio_takes_its_root_credentials_from_the_pipelines_secret_and_a_job_creates_the_buckets():
    service, statefulset, buckets = build_minio_manifest(config(storage_url="s3://data-bucket/x").cluster)
    env = env_of(statefulset["spec"]["template"]["spec"]["containers"][0])
    assert env["MINIO_ROOT_USER"] == {"secretKeyRef": {"name": "rlm-pipeline-s3", "key": "AWS_ACCESS_KEY_ID"}}
    assert env["MINIO_ROOT_PASSWORD"] == {"secretKeyRef": {"name": "rlm-pipeline-s3", "key": "AWS_SECRET_ACCESS_KEY"}}
    assert statefulset["spec"]["volumeClaimTemplates"][0]["metadata"]["name"] == "data"
    args = buckets["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args == ["create-buckets", "s3://data-bucket", "s3://mlflow-artifacts"]


def test_scan_exceptions_are_annotated_where_they_apply_and_the_digest_one_only_without_a_digest():
    tagged = build_stage_job(config(), "train", DRIVER)["metadata"]["annotations"]
    assert {v.split("=")[0] for k, v in tagged.items() if k.startswith("checkov.io/skip")} == {"CKV_K8S_35", "CKV_K8S_43"}
    digest = "ghcr.io/org/rlm-pipeline@sha256:" + "a" * 64
    pinned = build_stage_job(config(image=digest), "train", DRIVER)["metadata"]["annotations"]
    assert {v.split("=")[0] for k, v in pinned.items() if k.startswith("checkov.io/skip")} == {"CKV_K8S_35"}
    driver = build_pipeline_manifest(config())[-1]["metadata"]["annotations"]
    assert any(v.startswith("CKV_K8S_38=") for v in driver.values())
    # the driver runs the CPU image: its digest decides, not the GPU image's
    gpu_pinned = build_pipeline_manifest(config(image=digest))[-1]["metadata"]["annotations"]
    assert any(v.startswith("CKV_K8S_43=") for v in gpu_pinned.values())
    pinned_driver = build_pipeline_manifest(config(cpu_image=digest))[-1]["metadata"]["annotations"]
    assert not any(v.startswith("CKV_K8S_43=") for v in pinned_driver.values())


def test_pods_without_a_gpu_run_the_cpu_image_and_the_gpu_pods_the_cuda_image():
    cfg = config(image="reg/rlm:1.2", cpu_image="reg/rlm:1.2-cpu")
    images = {stage: {c["image"] for c in all_containers(pod_spec(build_stage_job(cfg, stage, DRIVER)))}
              for stage in builders.STAGES}
    assert images == {"prepare": {"reg/rlm:1.2-cpu"}, "train": {"reg/rlm:1.2"}, "evaluate": {"reg/rlm:1.2"}}
    for objects in (build_pipeline_manifest(cfg), build_nightly_manifest(cfg, "0 3 * * *"),
                    build_mlflow_manifest(cfg.cluster), build_minio_manifest(cfg.cluster)[2:]):
        pods = [(o["spec"] if "template" in o["spec"] else o["spec"]["jobTemplate"]["spec"])["template"]["spec"]
                for o in objects if o["kind"] in ("Job", "CronJob", "Deployment")]
        assert pods and {c["image"] for pod in pods for c in all_containers(pod)} == {"reg/rlm:1.2-cpu"}
    # cpu_image null: one image for every pod
    one = config(image="reg/rlm:1.2", cpu_image=None)
    assert pod_spec(build_stage_job(one, "prepare", DRIVER))["containers"][0]["image"] == "reg/rlm:1.2"
    assert build_pipeline_manifest(one)[-1]["spec"]["template"]["spec"]["containers"][0]["image"] == "reg/rlm:1.2"


@pytest.mark.parametrize("overrides, message", [
    ({"cluster.image": "ghcr.io/org/rlm-pipeline:latest"}, "'latest' is not a pinned version"),
    ({"cluster.image": "ghcr.io/org/rlm-pipeline"}, "neither a tag nor an @sha256 digest"),
    ({"cluster.image": "repo@sha256:abc"}, "not sha256:<64 hex digits>"),
    ({"cluster.cpu_image": "ghcr.io/org/rlm:latest"}, "cluster.cpu_image 'ghcr.io/org/rlm:latest' is not pinned"),
    ({"cluster.cpu_image": "ghcr.io/org/rlm-pipeline"}, "neither a tag nor an @sha256 digest"),
    ({"cluster.namespace": "ML_team"}, "cluster.namespace 'ML_team' must be a DNS label"),
    ({"cluster.train.cpu": "lots"}, "cpu 'lots' is not a Kubernetes quantity"),
    ({"cluster.train.memory": "64Gi", "cluster.train.memory_limit": "32Gi"}, "memory request 64Gi exceeds its limit 32Gi"),
    ({"cluster.nproc_per_node": 4, "cluster.train.gpus": 2}, "exceeds cluster.train.gpus"),
    ({"cluster.nodes": 0}, "cluster.nodes"),
    ({"cluster.tolerations": [{"key": "x", "effect": "Sometimes"}]}, "cluster.tolerations.0.effect"),
])
def test_bad_cluster_settings_are_rejected_naming_the_field_and_fix(overrides, message):
    with pytest.raises(ConfigError) as err:
        load_config("enwik8_rlstm", overrides)
    assert message in str(err.value)


def test_a_partial_pod_override_keeps_the_other_defaults_of_that_pod():
    cluster = load_config("enwik8_rlstm", {"cluster.train.gpus": 8, "cluster.driver.memory": "2Gi"}).cluster
    assert (cluster.train.cpu, cluster.train.memory, cluster.train.gpus) == ("8", "64Gi", 8)
    assert (cluster.driver.cpu, cluster.driver.memory) == ("250m", "2Gi")


def test_built_objects_share_no_dicts_and_render_without_yaml_aliases():
    job = build_stage_job(config(), "train", DRIVER)
    job["spec"]["template"]["metadata"]["labels"]["extra"] = "x"
    assert "extra" not in job["metadata"]["labels"]
    text = builders.render_yaml([job, *build_minio_manifest(config().cluster)])
    assert "&id" not in text and "*id" not in text
