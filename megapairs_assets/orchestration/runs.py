"""Launching one run over many shards (the CLI's in-process runs)."""

from __future__ import annotations

# Dagster exposes no public constant for the partition-range tags a ranged run carries; these
# are the tag names its backfills and `dagster asset materialize --partition-range` set.
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"


def shard_range_tags(shards: list[str]) -> dict[str, str]:
    """Tags that make one run cover shards[0]..shards[-1] (in partition-set order)."""
    return {PARTITION_RANGE_START_TAG: shards[0], PARTITION_RANGE_END_TAG: shards[-1]}
