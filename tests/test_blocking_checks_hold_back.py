"""A shard that failed a blocking check stays out of readers that combine shards.

Dagster stops a failing blocking check's dependants within its own run only; a later training
or scoring run reads every current shard. The catalog therefore records the blocking checks a
partition failed, and training and held-out scoring leave that partition out, saying so, until
it is re-materialized clean.
"""

from __future__ import annotations

from pathlib import Path

import duckdb
import polars as pl
import pytest
from test_training_support import triplet_rows, write_images

from megapairs_assets.evaluation.step import read_triplets
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.lineage.report import lineage_report
from megapairs_assets.training.data import TripletDataError
from megapairs_assets.training.names import TRIPLETS_ASSET
from megapairs_assets.training.step import read_triplet_shards

BLOCKING = {"hns_start_with_query": "hns[0] is the query image"}


def _commit_triplets(
    layout: DataLayout, catalog: LineageCatalog, shard: str, rows: pl.DataFrame, *, passed: bool
) -> StepResult:
    def step(partition: str) -> StepResult:
        path = layout.shard_table(TRIPLETS_ASSET, partition)
        write_parquet_atomic(rows, path)
        outcomes = [
            CheckOutcome("hns_start_with_query", passed, "ok" if passed else "2 rows violate"),
            CheckOutcome("a_warning_only", False, "warnings never hold a shard back"),
        ]
        return StepResult(
            partition,
            outputs={"triplets": path},
            row_counts={"rows": rows.height},
            outcomes=outcomes,
        )

    return run_recorded(
        step,
        shard,
        asset=TRIPLETS_ASSET,
        code_version="t",
        run_id=f"run-{shard}-{passed}",
        profile="demo",
        catalog=catalog,
        blocking_checks=BLOCKING,
    )


@pytest.fixture
def two_shards(tmp_path: Path) -> tuple[DataLayout, LineageCatalog, pl.DataFrame]:
    layout = DataLayout(tmp_path / "home")
    catalog = LineageCatalog(tmp_path / "home" / "catalog.duckdb")
    rows = triplet_rows(write_images(tmp_path / "images", 6), 6)
    _commit_triplets(layout, catalog, "00000", rows, passed=True)
    _commit_triplets(layout, catalog, "00001", rows, passed=False)
    return layout, catalog, rows


def test_training_and_scoring_leave_out_a_failing_shard(two_shards) -> None:
    layout, catalog, rows = two_shards
    assert catalog.partitions_to_combine(TRIPLETS_ASSET) == (
        ["00000"],
        {"00001": "hns_start_with_query"},  # the warning is not recorded as blocking
    )
    logged: list[str] = []
    frame, versions = read_triplet_shards(layout, catalog, logged.append)
    assert frame.height == rows.height and list(versions) == [f"{TRIPLETS_ASSET}/00000"]
    assert any("00001" in line and "hns_start_with_query" in line for line in logged)
    scored, scored_versions = read_triplets(layout, catalog)
    assert scored is not None and scored.height == rows.height
    assert list(scored_versions) == [f"{TRIPLETS_ASSET}/00000"]


def test_a_clean_rematerialization_brings_the_shard_back(two_shards) -> None:
    layout, catalog, rows = two_shards
    _commit_triplets(layout, catalog, "00001", rows, passed=True)
    assert catalog.partitions_to_combine(TRIPLETS_ASSET) == (["00000", "00001"], {})
    frame, versions = read_triplet_shards(layout, catalog)
    assert frame.height == 2 * rows.height and len(versions) == 2


def test_nothing_to_train_on_names_the_held_back_shards(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "home")
    catalog = LineageCatalog(tmp_path / "home" / "catalog.duckdb")
    rows = triplet_rows(write_images(tmp_path / "images", 4), 4)
    _commit_triplets(layout, catalog, "00000", rows, passed=False)
    with pytest.raises(TripletDataError, match="1 held back by failing blocking checks"):
        read_triplet_shards(layout, catalog)


def test_lineage_shows_the_failed_checks(two_shards) -> None:
    _, catalog, _ = two_shards
    text = lineage_report(catalog, f"{TRIPLETS_ASSET}[00001]")
    assert "failed blocking checks: hns_start_with_query" in text
    current = catalog.query(
        "SELECT partition, failed_checks FROM current_materializations WHERE asset = ? "
        "ORDER BY partition",
        [TRIPLETS_ASSET],
    )
    assert current["failed_checks"].to_list() == [None, "hns_start_with_query"]


def test_a_catalog_from_before_the_column_is_migrated(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    with duckdb.connect(str(path)) as con:  # the v3 layout: no failed_checks column
        con.execute(
            "CREATE TABLE materializations (materialization_id VARCHAR PRIMARY KEY, "
            "asset VARCHAR NOT NULL, partition VARCHAR, run_id VARCHAR, code_version VARCHAR, "
            "profile VARCHAR, config VARCHAR, model_ids VARCHAR, input_versions VARCHAR, "
            "row_counts VARCHAR, output_paths VARCHAR, started_at TIMESTAMP, duration_s DOUBLE, "
            "status VARCHAR DEFAULT 'complete', error VARCHAR)"
        )
        con.execute(
            "INSERT INTO materializations (materialization_id, asset, partition, started_at, "
            "duration_s, status) VALUES ('m1', ?, '00000', now(), 1.0, 'complete')",
            [TRIPLETS_ASSET],
        )
    catalog = LineageCatalog(path)
    assert catalog.partitions_to_combine(TRIPLETS_ASSET) == (["00000"], {})
    assert catalog.schema_version() == 4


def test_current_view_shows_no_old_error_once_a_partition_completes(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "home")
    catalog = LineageCatalog(tmp_path / "home" / "catalog.duckdb")

    def broken(partition: str) -> StepResult:
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError):
        run_recorded(
            broken,
            "00000",
            asset=TRIPLETS_ASSET,
            code_version="t",
            run_id="r1",
            profile="demo",
            catalog=catalog,
        )
    rows = triplet_rows(write_images(tmp_path / "images", 4), 4)
    _commit_triplets(layout, catalog, "00000", rows, passed=True)
    current = catalog.query("SELECT status, error FROM current_materializations")
    assert current.rows() == [("complete", None)]
