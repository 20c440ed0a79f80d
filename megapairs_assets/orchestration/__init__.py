"""The Dagster edge: partitions, the one shard step helper, UI metadata."""
