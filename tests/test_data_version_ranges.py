"""A partition's Dagster data version is its own content's, whatever range of shards it ran in."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from dagster._core.definitions.data_version import StaleStatus

from megapairs_assets.lib.quality import outcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.orchestration.partitions import shard_partitions
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions

STAGE = Stage("toy_table", "toy-v1", {"toy_rows_positive": "rows > 0"})
DATA_VERSION_TAG = "dagster/data_version"


def _assets(tmp_path: Path, content: dict[str, str], rows: int = 1) -> list[dg.AssetsDefinition]:
    """A shard asset writing `content[shard]` to a file, and a shard asset depending on it."""
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")

    def write(shard: str) -> StepResult:
        path = tmp_path / "toy" / f"{shard}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(content[shard])
        return StepResult(
            partition=shard,
            row_counts={"rows": rows},
            outputs={"table": path},
            outcomes=[outcome("toy_rows_positive", [] if rows > 0 else [shard], "rows > 0")],
        )

    @dg.asset(
        name=STAGE.asset_name,
        partitions_def=shard_partitions,
        code_version=STAGE.code_version,
        check_specs=STAGE.check_specs(),
    )
    def toy_table(context):  # unannotated: this module postpones annotations
        return materialize_partitions(context, STAGE, write, catalog, "test")

    @dg.asset(partitions_def=shard_partitions, deps=[toy_table], code_version="down-v1")
    def toy_downstream() -> None:
        return None

    return [toy_table, toy_downstream]


def _range(first: str, last: str) -> dict[str, str]:
    return {
        "dagster/asset_partition_range_start": first,
        "dagster/asset_partition_range_end": last,
    }


def _latest(instance: dg.DagsterInstance, partition: str) -> dg.AssetMaterialization:
    record = instance.get_latest_data_version_record(
        dg.AssetKey(STAGE.asset_name), is_source=False, partition_key=partition
    )
    assert record is not None and record.asset_materialization is not None
    return record.asset_materialization


def _version(instance: dg.DagsterInstance, partition: str) -> str:
    return _latest(instance, partition).tags[DATA_VERSION_TAG]


def _stale(instance: dg.DagsterInstance, assets: list, partition: str) -> StaleStatus:
    """The downstream partition's status, as the UI's "stale" badge computes it."""
    from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
    from dagster._core.definitions.data_version import CachingStaleStatusResolver
    from dagster._time import get_current_datetime

    graph = dg.Definitions(assets=assets).resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, view)
    return resolver.get_status(dg.AssetKey("toy_downstream"), partition)


def test_a_shard_keeps_its_content_version_alone_or_in_a_range(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00001", "00002"])
    assets = _assets(tmp_path, {"00001": "shard one", "00002": "shard two"})

    assert dg.materialize(assets, instance=instance, partition_key="00001").success
    alone = _version(instance, "00001")
    assert alone == _latest(instance, "00001").metadata["content_version"].value
    keys = list(_latest(instance, "00001").metadata)  # its own figures first, alone too
    assert keys.index("dagster/row_count") < keys.index("run_partitions")

    assert dg.materialize(assets, instance=instance, tags=_range("00001", "00002")).success
    assert _version(instance, "00001") == alone
    assert _version(instance, "00002") != alone  # its own content, not the range's
    assert _version(instance, "00002") == (
        _latest(instance, "00002").metadata["content_version"].value
    )
    # The latest event keeps the partition's metadata (its own first, then the range's) and
    # Dagster's provenance tags.
    latest = _latest(instance, "00002")
    assert latest.metadata["dagster/row_count"].value == 1
    assert latest.tags["dagster/code_version"] == STAGE.code_version
    keys = list(latest.metadata)
    assert keys.index("dagster/row_count") < keys.index("run_partitions")
    # The range's first event of each partition holds only the range's totals: a partition's
    # figures and thumbnails are stored once, not twice per shard.
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(STAGE.asset_name), asset_partitions=["00002"]),
        limit=10,
    ).records
    this_run = [r for r in records if r.run_id == records[0].run_id]
    first = this_run[-1].asset_materialization
    assert len(this_run) == 2 and first is not None
    assert "run_partitions" in first.metadata and "dagster/row_count" not in first.metadata

    # Re-mining the same bytes in another range leaves the dependants fresh.
    assert dg.materialize(assets[:1], instance=instance, tags=_range("00001", "00002")).success
    assert _version(instance, "00001") == alone
    assert _stale(instance, assets, "00001") == StaleStatus.FRESH
    assert _stale(instance, assets, "00002") == StaleStatus.FRESH

    # Changed bytes in a range make exactly that shard's dependant stale.
    changed = _assets(tmp_path, {"00001": "shard one, replaced", "00002": "shard two"})
    assert dg.materialize(changed[:1], instance=instance, tags=_range("00001", "00002")).success
    assert _version(instance, "00001") != alone
    assert _stale(instance, changed, "00001") == StaleStatus.STALE
    assert _stale(instance, changed, "00002") == StaleStatus.FRESH


def test_a_range_still_reports_its_checks_and_fails_on_a_blocking_one(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00001", "00002"])
    assets = _assets(tmp_path, {"00001": "a", "00002": "b"}, rows=0)
    result = dg.materialize(
        assets[:1], instance=instance, tags=_range("00001", "00002"), raise_on_error=False
    )
    assert not result.success
    (evaluation,) = result.get_asset_check_evaluations()
    assert not evaluation.passed
    assert evaluation.metadata["failing_partitions"].value == "00001, 00002"
    # Both partitions were still recorded, each with its own version and the failure named.
    for partition in ("00001", "00002"):
        latest = _latest(instance, partition)
        assert latest.tags[DATA_VERSION_TAG] == latest.metadata["content_version"].value
        assert latest.metadata["failing_blocking_checks"].value == "toy_rows_positive"


@pytest.mark.parametrize("partitions", [["00001"], ["00001", "00002", "00003"]])
def test_each_partition_is_recorded_last_with_its_own_version(
    tmp_path: Path, partitions: list[str]
) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", partitions)
    assets = _assets(tmp_path, {p: f"content of {p}" for p in partitions})
    tags = _range(partitions[0], partitions[-1]) if len(partitions) > 1 else {}
    kwargs = {"partition_key": partitions[0]} if len(partitions) == 1 else {}
    assert dg.materialize(assets[:1], instance=instance, tags=tags, **kwargs).success
    versions = {p: _version(instance, p) for p in partitions}
    assert len(set(versions.values())) == len(partitions)


def test_a_range_run_with_a_downstream_step_logs_no_data_version_mismatch(tmp_path: Path) -> None:
    """The range's own event carries the version the asset's newest materialization has, so a
    downstream step of the same run does not warn that they differ."""
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["00001", "00002", "00003"])
    assets = _assets(tmp_path, {"00001": "a", "00002": "b", "00003": "c"})
    result = dg.materialize(assets, instance=instance, tags=_range("00001", "00003"))
    assert result.success
    messages = [entry.user_message for entry in instance.all_logs(result.run_id)]
    assert messages and not [m for m in messages if "Data version mismatch" in m]
    assert len({_version(instance, p) for p in ("00001", "00002", "00003")}) == 3  # each its own


def test_a_range_given_backwards_fails_saying_so(tmp_path: Path) -> None:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(shard_partitions.name, ["00001", "00002"])
    assets = _assets(tmp_path, {"00001": "one", "00002": "two"})
    result = dg.materialize(
        assets[:1], instance=instance, tags=_range("00002", "00001"), raise_on_error=False
    )
    assert not result.success
    (failure,) = [e for e in result.all_events if e.is_step_failure]
    message = str(failure.step_failure_data.error.message)
    assert "00002..00001 holds no partition" in message and "start after its end" in message
