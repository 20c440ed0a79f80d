"""Where the pipeline runs: the embedded default or a cluster, read from environment variables.

"Which models" (`MEGAPAIRS_PROFILE`: demo / paper) and "where it runs"
(`MEGAPAIRS_DEPLOYMENT`: embedded / cluster) are separate choices. The embedded deployment is
one machine: Dagster's SQLite instance under `$DAGSTER_HOME`, the lineage catalog as one DuckDB
file in the data root. The cluster deployment points the same code at engines a team runs:

- MEGAPAIRS_DEPLOYMENT: `embedded` (default) or `cluster`.
- MEGAPAIRS_POSTGRES_URL: Dagster instance storage, read by deployment/dagster.yaml
  (postgresql+psycopg2://dagster:<password>@db:5432/dagster).
- MEGAPAIRS_LINEAGE_CATALOG: DuckLake URL of the lineage catalog
  (ducklake:postgres:dbname=lineage host=db user=megapairs).
- MEGAPAIRS_LINEAGE_DATA_PATH: where DuckLake writes its Parquet files (/mnt/shared/lineage/).
- MEGAPAIRS_VLLM_BASE_URLS: generation servers, comma-separated, or one Service URL
  (http://vllm.megapairs.svc:8000/v1).
- MEGAPAIRS_GPU_NODE_SELECTOR: node labels for GPU steps, `key=value,...`
  (nvidia.com/gpu.present=true).
- MEGAPAIRS_GPU_TOLERATIONS: taints GPU steps tolerate, `key[=value]:Effect,...`
  (nvidia.com/gpu:NoSchedule).
- MEGAPAIRS_STEP_EXECUTOR: where a run's steps execute: `k8s` (one pod per step, placed by its
  `dagster-k8s/config` tag; the default inside a Kubernetes pod of a cluster deployment) or
  `process` (subprocesses of the run's own process; the default elsewhere, e.g. a cluster
  deployment's engines tried from one machine).

Postgres passwords belong in the URL's environment variable (a Kubernetes Secret), never in a
file of this repository.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lineage.catalog import is_ducklake_url
from resources.storage import LineageCatalogResource

DEPLOYMENTS = ("embedded", "cluster")
STEP_EXECUTORS = ("k8s", "process")


class ClusterConfigError(ConfigurationError):
    """A cluster setting is missing or malformed; the message names the variable."""


@dataclass(frozen=True)
class ClusterSettings:
    """Deployment settings of one process, from the environment (see the module's table)."""

    deployment: str = "embedded"
    postgres_url: str | None = None
    lineage_catalog: str | None = None
    lineage_data_path: str | None = None
    vllm_base_urls: tuple[str, ...] = ()
    gpu_node_selector: Mapping[str, str] = field(default_factory=dict)
    gpu_tolerations: tuple[Mapping[str, str], ...] = ()
    step_executor: str = "process"

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> ClusterSettings:
        """Read and check the settings; a cluster deployment must name its engines."""
        env = os.environ if env is None else env
        deployment = env.get("MEGAPAIRS_DEPLOYMENT", "embedded").strip() or "embedded"
        if deployment not in DEPLOYMENTS:
            raise ClusterConfigError(
                f"MEGAPAIRS_DEPLOYMENT must be one of {', '.join(DEPLOYMENTS)}, got {deployment!r}"
            )
        settings = cls(
            deployment=deployment,
            postgres_url=env.get("MEGAPAIRS_POSTGRES_URL") or None,
            lineage_catalog=env.get("MEGAPAIRS_LINEAGE_CATALOG") or None,
            lineage_data_path=env.get("MEGAPAIRS_LINEAGE_DATA_PATH") or None,
            vllm_base_urls=tuple(
                url.strip()
                for url in env.get("MEGAPAIRS_VLLM_BASE_URLS", "").split(",")
                if url.strip()
            ),
            gpu_node_selector=_parse_labels(env.get("MEGAPAIRS_GPU_NODE_SELECTOR", "")),
            gpu_tolerations=_parse_tolerations(env.get("MEGAPAIRS_GPU_TOLERATIONS", "")),
            step_executor=_step_executor(env, deployment),
        )
        settings.check()
        return settings

    @property
    def is_cluster(self) -> bool:
        return self.deployment == "cluster"

    def check(self) -> None:
        """Raise `ClusterConfigError` naming every missing or inconsistent variable."""
        if not self.is_cluster:
            return
        problems = []
        if not self.postgres_url:
            problems.append("MEGAPAIRS_POSTGRES_URL (Dagster instance storage) is not set")
        if not self.lineage_catalog or not is_ducklake_url(self.lineage_catalog):
            problems.append(
                "MEGAPAIRS_LINEAGE_CATALOG must be a DuckLake URL "
                "(ducklake:postgres:dbname=... host=... user=...)"
            )
        if not self.lineage_data_path:
            problems.append("MEGAPAIRS_LINEAGE_DATA_PATH (DuckLake data files) is not set")
        if problems:
            raise ClusterConfigError(
                "cluster deployment: "
                + "; ".join(problems)
                + " (deployment/README.md lists every variable and how to set it)"
            )

    def catalog_resource(self, home: Path) -> LineageCatalogResource:
        """The lineage catalog resource: DuckLake on a cluster, the DuckDB file otherwise."""
        if self.is_cluster and self.lineage_catalog:
            return LineageCatalogResource(
                path=self.lineage_catalog, data_path=self.lineage_data_path
            )
        return LineageCatalogResource(path=str(home / "catalog.duckdb"))

    def resource_overrides(self, home: Path) -> dict[str, Any]:
        """Resources that differ from the profile's on this deployment (empty when embedded)."""
        if not self.is_cluster:
            return {}
        return {"catalog": self.catalog_resource(home)}


def _parse_labels(text: str) -> dict[str, str]:
    labels = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise ClusterConfigError(
                f"MEGAPAIRS_GPU_NODE_SELECTOR: {item!r} is not key=value "
                "(labels are comma-separated)"
            )
        labels[key.strip()] = value.strip()
    return labels


def _parse_tolerations(text: str) -> tuple[dict[str, str], ...]:
    """`key[=value]:Effect,...` -> Kubernetes toleration dicts (Exists when no value)."""
    tolerations = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        selector, sep, effect = item.rpartition(":")
        if not sep or not selector or effect not in ("NoSchedule", "PreferNoSchedule", "NoExecute"):
            raise ClusterConfigError(
                f"MEGAPAIRS_GPU_TOLERATIONS: {item!r} is not key[=value]:NoSchedule|"
                "PreferNoSchedule|NoExecute"
            )
        key, has_value, value = selector.partition("=")
        toleration = {"key": key, "effect": effect}
        toleration.update(
            {"operator": "Equal", "value": value} if has_value else {"operator": "Exists"}
        )
        tolerations.append(toleration)
    return tuple(tolerations)


def _step_executor(env: Mapping[str, str], deployment: str) -> str:
    """MEGAPAIRS_STEP_EXECUTOR, else `k8s` for a cluster deployment running in a Kubernetes pod
    (Kubernetes sets KUBERNETES_SERVICE_HOST in every pod), else `process`."""
    chosen = env.get("MEGAPAIRS_STEP_EXECUTOR", "").strip()
    if not chosen:
        in_pod = bool(env.get("KUBERNETES_SERVICE_HOST"))
        return "k8s" if deployment == "cluster" and in_pod else "process"
    if chosen not in STEP_EXECUTORS:
        raise ClusterConfigError(
            f"MEGAPAIRS_STEP_EXECUTOR must be one of {', '.join(STEP_EXECUTORS)}, got {chosen!r}"
        )
    return chosen
