"""GPU steps on Kubernetes, rendered through dagster-k8s's public API (no cluster needed), the
cluster settings read from the environment, and the deployment files' shapes."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from megapairs_assets.orchestration.k8s import K8S_CONFIG_TAG, k8s_op_tags, step_resource_tags
from resources.cluster import ClusterConfigError, ClusterSettings
from resources.storage import LineageCatalogResource

dagster_k8s_job = pytest.importorskip("dagster_k8s.job")

DEPLOYMENT = Path(__file__).resolve().parents[1] / "deployment"
CLUSTER_ENV = {
    "MEGAPAIRS_DEPLOYMENT": "cluster",
    "MEGAPAIRS_POSTGRES_URL": "postgresql://dagster:secret@db:5432/dagster",
    "MEGAPAIRS_LINEAGE_CATALOG": "ducklake:postgres:dbname=lineage host=db user=megapairs",
    "MEGAPAIRS_LINEAGE_DATA_PATH": "/mnt/shared/lineage",
    "MEGAPAIRS_GPU_NODE_SELECTOR": "cloud.google.com/gke-accelerator=nvidia-h100-80gb,pool=gpu",
    "MEGAPAIRS_GPU_TOLERATIONS": "nvidia.com/gpu:NoSchedule,dedicated=ml:NoExecute",
    "MEGAPAIRS_VLLM_BASE_URLS": "http://vllm-0:8000/v1, http://vllm-1:8000/v1",
}


def _render_step_pod(asset: dg.AssetsDefinition) -> object:
    """The pod spec dagster-k8s's step launcher would submit for this asset's op."""
    tags = {key: value for key, value in asset.op.tags.items() if isinstance(value, str)}
    user_config = dagster_k8s_job.get_user_defined_k8s_config(tags)
    job_config = dagster_k8s_job.DagsterK8sJobConfig(
        job_image="registry.example/megapairs:test",
        dagster_home="/opt/dagster/dagster_home",
        instance_config_map="dagster-instance",
    )
    job = dagster_k8s_job.construct_dagster_k8s_job(
        job_config,
        args=["dagster", "api", "execute_step"],
        job_name="dagster-step-test",
        user_defined_k8s_config=user_config,
        component="step_worker",
    )
    return job.spec.template.spec


def _asset_with(op_tags: dict) -> dg.AssetsDefinition:
    @dg.asset(name="gpu_step", op_tags=op_tags)
    def gpu_step() -> None:
        return None

    return gpu_step


def test_gpu_step_pod_requests_gpu_memory_and_lands_on_gpu_nodes() -> None:
    settings = ClusterSettings.from_env(CLUSTER_ENV)
    tags = step_resource_tags(gpu=2, memory="48Gi", cpu="12")
    asset = _asset_with(k8s_op_tags(tags, settings.gpu_node_selector, settings.gpu_tolerations))
    pod = _render_step_pod(asset)
    (container,) = pod.containers
    assert container.image == "registry.example/megapairs:test"
    assert container.resources.requests == {"nvidia.com/gpu": "2", "memory": "48Gi", "cpu": "12"}
    assert container.resources.limits == {"nvidia.com/gpu": "2", "memory": "48Gi"}
    assert pod.node_selector == {
        "cloud.google.com/gke-accelerator": "nvidia-h100-80gb",
        "pool": "gpu",
    }
    tolerations = sorted((t.key, t.operator, t.value, t.effect) for t in pod.tolerations)
    assert tolerations == [
        ("dedicated", "Equal", "ml", "NoExecute"),
        ("nvidia.com/gpu", "Exists", None, "NoSchedule"),
    ]


def test_cpu_step_gets_memory_but_no_gpu_placement() -> None:
    settings = ClusterSettings.from_env(CLUSTER_ENV)
    tags = step_resource_tags(memory="8Gi")
    pod = _render_step_pod(
        _asset_with(k8s_op_tags(tags, settings.gpu_node_selector, settings.gpu_tolerations))
    )
    (container,) = pod.containers
    assert container.resources.requests == {"memory": "8Gi"}
    assert "nvidia.com/gpu" not in (container.resources.limits or {})
    assert not pod.node_selector and not pod.tolerations
    assert k8s_op_tags({}) == {}


def test_tag_is_the_one_dagster_k8s_reads() -> None:
    assert K8S_CONFIG_TAG == dagster_k8s_job.USER_DEFINED_K8S_CONFIG_KEY


def test_cluster_settings_name_every_missing_variable() -> None:
    assert not ClusterSettings.from_env({}).is_cluster
    with pytest.raises(ClusterConfigError) as error:
        ClusterSettings.from_env({"MEGAPAIRS_DEPLOYMENT": "cluster"})
    for variable in (
        "MEGAPAIRS_POSTGRES_URL",
        "MEGAPAIRS_LINEAGE_CATALOG",
        "MEGAPAIRS_LINEAGE_DATA_PATH",
    ):
        assert variable in str(error.value)
    with pytest.raises(ClusterConfigError, match="MEGAPAIRS_GPU_TOLERATIONS"):
        ClusterSettings.from_env({**CLUSTER_ENV, "MEGAPAIRS_GPU_TOLERATIONS": "gpu:Sometimes"})
    with pytest.raises(ClusterConfigError, match="MEGAPAIRS_DEPLOYMENT"):
        ClusterSettings.from_env({"MEGAPAIRS_DEPLOYMENT": "cloud"})


def test_cluster_settings_give_a_ducklake_catalog(tmp_path: Path) -> None:
    settings = ClusterSettings.from_env(CLUSTER_ENV)
    assert settings.vllm_base_urls == ("http://vllm-0:8000/v1", "http://vllm-1:8000/v1")
    resource = settings.resource_overrides(tmp_path)["catalog"]
    assert isinstance(resource, LineageCatalogResource)
    catalog = resource.catalog()  # nothing connects until the first read or write
    assert catalog.is_ducklake and catalog.data_path == "/mnt/shared/lineage/"
    assert ClusterSettings.from_env({}).resource_overrides(tmp_path) == {}


def test_dagster_yaml_template_loads_as_a_postgres_instance_config() -> None:
    from dagster._core.instance.config import dagster_instance_config

    text = (DEPLOYMENT / "dagster.yaml").read_text()
    config = yaml.safe_load(text)
    assert set(config["storage"]) == {"postgres"}
    assert config["storage"]["postgres"]["postgres_url"] == {"env": "MEGAPAIRS_POSTGRES_URL"}
    assert config["concurrency"]["runs"]["max_concurrent_runs"] > 0
    limits = {limit["key"] for limit in config["concurrency"]["runs"]["tag_concurrency_limits"]}
    assert "dagster/backfill" in limits
    # Dagster's own validation of the file (schema of every section), without connecting.
    validated, _ = dagster_instance_config(str(DEPLOYMENT), config_filename="dagster.yaml")
    assert validated["concurrency"]["pools"]["granularity"] == "op"


def test_helm_values_have_the_chart_shape_we_rely_on() -> None:
    # The official chart (dagster/dagster) is not on PyPI, so its values.schema.json cannot be
    # checked offline; this checks the keys our deployment sets against the chart's documented
    # layout, and that they agree with the other deployment files.
    values = yaml.safe_load((DEPLOYMENT / "helm-values.yaml").read_text())
    (location,) = values["dagster-user-deployments"]["deployments"]
    assert location["image"]["repository"] and location["image"]["tag"]
    assert location["dagsterApiGrpcArgs"][:2] == ["-m", "megapairs_assets.definitions"]
    assert location["port"] == 3030
    env_names = {item["name"] for item in location["env"]}
    assert {"MEGAPAIRS_DEPLOYMENT", "MEGAPAIRS_PROFILE", "MEGAPAIRS_HOME"} <= env_names
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    assert values["postgresql"]["enabled"] is False
    assert values["global"]["postgresqlSecretName"]
    queued = values["dagsterDaemon"]["runCoordinator"]
    assert queued["enabled"] is True and queued["type"] == "QueuedRunCoordinator"
    dockerfile = (DEPLOYMENT / "Dockerfile").read_text()
    assert "EXPOSE 3030" in dockerfile


def test_every_shared_local_path_is_on_a_volume_every_pod_mounts() -> None:
    # A local path that pods share (DuckLake's files, a data root that is not a URL) must sit on
    # a mounted volume in the code location's pod and in every run and step pod; otherwise each
    # pod writes to its own disk and the others never see the files.
    values = yaml.safe_load((DEPLOYMENT / "helm-values.yaml").read_text())
    (location,) = values["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in location["env"]}
    shared = [
        env[name]
        for name in ("MEGAPAIRS_LINEAGE_DATA_PATH", "MEGAPAIRS_DATA_ROOT")
        if name in env and "://" not in env[name]
    ]
    assert shared, "the lineage catalog's data path is a local path here"
    run_config = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    for mounts, volumes in (
        (location["volumeMounts"], location["volumes"]),
        (run_config["containerConfig"]["volumeMounts"], run_config["podSpecConfig"]["volumes"]),
    ):
        declared = {volume["name"] for volume in volumes}
        for path in shared:
            covering = [m for m in mounts if path.startswith(m["mountPath"].rstrip("/") + "/")]
            assert covering, f"{path} is not under a mounted volume"
            assert covering[0]["name"] in declared


def test_vllm_manifest_is_a_deployment_and_service_with_gpus_per_model() -> None:
    documents = [d for d in yaml.safe_load_all((DEPLOYMENT / "vllm.yaml").read_text()) if d]
    deployments = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Deployment"}
    services = {d["metadata"]["name"]: d for d in documents if d["kind"] == "Service"}
    assert set(deployments) == set(services) == {"vllm-describe", "vllm-instruct"}
    for name, deployment in deployments.items():
        assert deployment["spec"]["replicas"] >= 2
        (container,) = deployment["spec"]["template"]["spec"]["containers"]
        assert container["command"] == ["vllm"] and container["args"][0] == "serve"
        assert container["resources"]["limits"]["nvidia.com/gpu"]
        selector = deployment["spec"]["selector"]["matchLabels"]
        assert selector.items() <= deployment["spec"]["template"]["metadata"]["labels"].items()
        service = services[name]
        assert service["spec"]["selector"] == selector
        assert service["spec"]["ports"][0]["targetPort"] == container["ports"][0]["containerPort"]
