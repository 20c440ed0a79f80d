"""The one partitioning of the graph (shards of the image corpus), and the asset options every
shard-partitioned asset shares."""

import warnings
from collections.abc import Iterable
from typing import Any

import dagster as dg

from megapairs_assets.orchestration.automation import (
    corpus_wide_automation,
    downstream_automation,
)
from megapairs_assets.orchestration.k8s import k8s_op_tags, step_resource_tags
from resources.cluster import ClusterSettings

# Every asset sets backfill_policy, which Dagster 1.13 marks beta; the warning, repeated per
# asset, says nothing a user can act on.
warnings.filterwarnings("ignore", message=".*backfill_policy.*is currently in beta")

SHARD_PARTITIONS_NAME = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARD_PARTITIONS_NAME)

# One policy for every shard-partitioned asset (Dagster warns when a job mixes policies):
# a backfill of many shards becomes runs of up to 64 shards, so each GPU step loads its model
# once per 64 shards, while separate runs still spread over the run queue and the `gpu` pool.
SHARD_BACKFILL_POLICY = dg.BackfillPolicy.multi_run(max_partitions_per_run=64)

# Downstream assets refresh themselves when an upstream partition is new or changed, once a
# user turns on the automation sensor (`megapairs_automation`, off by default): eager() asks
# for a partition whose parent updated and that is not already in progress, and never for one
# whose upstream partition failed a blocking check (automation.py).
DOWNSTREAM_AUTOMATION = downstream_automation()
# The KNN graphs read every shard's embeddings: they also wait for inputs about to be redone.
CORPUS_WIDE_AUTOMATION = corpus_wide_automation()


def step_placement(gpu: int = 0, memory: str | None = None) -> dict[str, Any]:
    """The dagster-k8s op tags that request what a step needs, and on a cluster the asset tags
    saying it.

    On a cluster (`MEGAPAIRS_DEPLOYMENT=cluster`) the k8s executor reads the op tags; GPU steps
    also get the node selector and tolerations from the environment. Elsewhere the op tags are
    inert, and the asset tags (shown on each asset's page) are left out: "gpu: 8, 192Gi" on a
    laptop's demo would describe a machine the step does not run on.
    """
    settings = ClusterSettings.from_env()
    tags = step_resource_tags(gpu=gpu, memory=memory)
    return {
        "tags": tags if settings.is_cluster else {},
        "op_tags": k8s_op_tags(tags, settings.gpu_node_selector, settings.gpu_tolerations),
    }


def shard_asset_options(group: str, code_version: str, **extra: Any) -> dict[str, Any]:
    """The decorator arguments every shard-partitioned asset shares."""
    return {
        "partitions_def": shard_partitions,
        "backfill_policy": SHARD_BACKFILL_POLICY,
        "group_name": group,
        "code_version": code_version,
        **extra,
    }


def shard_asset_names(assets: Iterable[dg.AssetsDefinition]) -> list[str]:
    """The names of the shard-partitioned assets among `assets` (what a retired shard leaves)."""
    return sorted(
        key.to_user_string()
        for asset in assets
        if asset.partitions_def == shard_partitions
        for key in asset.keys
    )
