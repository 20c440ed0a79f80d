"""The one partitioning of the graph: shards of the image corpus, registered as they appear."""

import warnings

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
