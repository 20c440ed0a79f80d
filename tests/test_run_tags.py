"""Our copy of Dagster's partition-range tag names must match the ones Dagster reads."""

from dagster._core.storage.tags import (  # private on purpose: this test pins the names
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from megapairs_assets.orchestration.runs import shard_range_tags


def test_range_tags_are_dagsters() -> None:
    assert shard_range_tags(["a", "b", "c"]) == {
        ASSET_PARTITION_RANGE_START_TAG: "a",
        ASSET_PARTITION_RANGE_END_TAG: "c",
    }
