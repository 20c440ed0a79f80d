"""The one partitioning of the graph (shards of the image corpus), and the asset options every
shard-partitioned asset shares."""

import warnings
from typing import Any

import dagster as dg

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
# for a partition whose parent updated and that is not already in progress or failed upstream.
DOWNSTREAM_AUTOMATION = dg.AutomationCondition.eager()


def shard_asset_options(group: str, code_version: str, **extra: Any) -> dict[str, Any]:
    """The decorator arguments every shard-partitioned asset shares."""
    return {
        "partitions_def": shard_partitions,
        "backfill_policy": SHARD_BACKFILL_POLICY,
        "group_name": group,
        "code_version": code_version,
        **extra,
    }
