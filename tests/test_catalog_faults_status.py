"""`megapairs status` never calls a home complete when a run failed before recording its
partitions, nor when nothing is registered at all."""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.cli.instance import prepare_dagster_home
from megapairs_assets.cli.main import main
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME, shard_partitions
from megapairs_assets.orchestration.runs import shard_range_tags

ALL_CLEAR = "every expected partition is complete"


@pytest.fixture
def home(home: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # prepare_dagster_home sets DAGSTER_HOME for the process: restored after each test.
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    home.mkdir(parents=True)
    return home


def _record(asset: str, partition: str) -> MaterializationRecord:
    time.sleep(0.001)
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id="earlier-run",
        code_version="v1",
        profile="test",
        started_at=utc_now(),
        duration_s=0.1,
        materialization_id=new_materialization_id(),
    )


def _broken_generation_run(instance: dg.DagsterInstance, shards: list[str]) -> str:
    """A run of the generation steps over `shards` whose first step breaks before any
    per-partition work (a response cache that cannot be opened), as the real step did."""

    @dg.asset(name="pair_descriptions", partitions_def=shard_partitions)
    def broken() -> None:
        raise RuntimeError("database disk image is malformed")

    @dg.asset(name="pair_instructions", partitions_def=shard_partitions, deps=[broken])
    def never_reached() -> None:
        raise AssertionError("skipped: its upstream step failed")

    result = dg.materialize(
        [broken, never_reached],
        instance=instance,
        tags=shard_range_tags(shards),
        raise_on_error=False,
    )
    assert not result.success
    return result.run_id


def test_a_run_that_failed_before_recording_any_partition_is_counted(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = ["00000", "00001"]
    catalog = LineageCatalog(home / "catalog.duckdb")
    for asset in ("image_corpus", "pair_descriptions"):
        for shard in shards:
            catalog.record(_record(asset, shard))  # complete, from an earlier run
    catalog.begin(_record("clip_image_knn", "00000"))  # a step killed after it began
    prepare_dagster_home(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, shards)
        run_id = _broken_generation_run(instance, shards)

    assert main(["status", "--json"]) == 0
    report = {row["asset"]: row for row in json.loads(capsys.readouterr().out)}
    descriptions = report["pair_descriptions"]
    assert (descriptions["complete"], descriptions["failed"]) == (0, 2)
    assert not descriptions["healthy"]
    instructions = report["pair_instructions"]
    assert (instructions["failed"], instructions["missing"]) == (2, 0)
    assert report["image_corpus"]["healthy"]  # not in the run: untouched

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert ALL_CLEAR not in out
    assert (
        f"pair_descriptions[00000]: run {run_id[:8]} failed: RuntimeError: database disk image "
        "is malformed; its table is still the earlier one" in out
    )
    assert (
        f"pair_instructions[00001]: run {run_id[:8]} failed before it (step pair_descriptions "
        "failed: RuntimeError: database disk image is malformed)" in out
    )
    assert "clip_image_knn[00000]: left pending since" in out
    assert "by a step that ended without completing it (killed?)" in out

    # A later run that materializes a partition clears its failure.
    with dg.DagsterInstance.get() as instance:

        @dg.asset(name="pair_descriptions", partitions_def=shard_partitions)
        def fixed() -> None:
            catalog.record(_record("pair_descriptions", "00000"))

        dg.materialize([fixed], instance=instance, partition_key="00000")
    assert main(["status", "--json"]) == 0
    report = {row["asset"]: row for row in json.loads(capsys.readouterr().out)}
    assert (report["pair_descriptions"]["complete"], report["pair_descriptions"]["failed"]) == (
        1,
        1,
    )


def test_nothing_registered_is_not_called_complete(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    LineageCatalog(home / "catalog.duckdb").schema_version()  # a catalog with no record
    prepare_dagster_home(home)
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert ALL_CLEAR not in out
    assert "nothing is registered in this home yet" in out
    assert "megapairs demo" in out and "megapairs sync" in out

    # A run that died before it registered anything is named.
    with dg.DagsterInstance.get() as instance:

        @dg.asset
        def early() -> None:
            raise RuntimeError("killed early")

        run_id = dg.materialize([early], instance=instance, raise_on_error=False).run_id
        job = instance.get_run_by_id(run_id).job_name
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert f"The newest run, {run_id[:8]} ({job}), failed." in out


def test_records_without_any_registered_partition_are_flagged(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    LineageCatalog(home / "catalog.duckdb").record(_record("image_corpus", "00000"))
    prepare_dagster_home(home)  # a new instance: nothing registered
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert ALL_CLEAR not in out
    assert "no shard or training config is registered in the Dagster instance" in out


def test_a_table_the_failed_run_itself_recorded_is_not_called_the_earlier_one(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shards = ["00000", "00001"]
    catalog = LineageCatalog(home / "catalog.duckdb")
    prepare_dagster_home(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, shards)
        run_id = _broken_generation_run(instance, shards)
    # As a range step does: the partition's table is recorded complete, then the run fails.
    catalog.record(dataclasses.replace(_record("pair_descriptions", "00000"), run_id=run_id))
    catalog.record(_record("pair_descriptions", "00001"))  # an earlier run's table

    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "pair_descriptions[00000]: run" in out
    assert "the table on disk is the one this run wrote before failing" in out
    assert "pair_descriptions[00001]: run" in out and "still the earlier one" in out
