"""The one partitioning of the graph: shards of the image corpus, registered as they appear."""

import dagster as dg

SHARD_PARTITIONS_NAME = "shards"
shard_partitions = dg.DynamicPartitionsDefinition(name=SHARD_PARTITIONS_NAME)
