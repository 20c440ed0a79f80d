"""The DuckDB lineage catalog: records, partition replacement, and many writer processes."""

from __future__ import annotations

import multiprocessing as mp
from pathlib import Path

import duckdb
import polars as pl
import pytest

from megapairs_assets.lineage.catalog import (
    CatalogBusyError,
    LineageCatalog,
    MaterializationRecord,
    RowTable,
    register_row_table,
    utc_now,
)

# A row table of this test's own, shaped like the corpus's image rows: these tests exercise the
# catalog, not a stage's declaration, and the spawned writer processes (which import this
# module) declare it too without importing any stage code.
TEST_IMAGES = register_row_table(
    RowTable(
        "catalog_test_images",
        (
            ("image_id", "VARCHAR"),
            ("shard", "VARCHAR"),
            ("key", "VARCHAR"),
            ("source_uri", "VARCHAR"),
            ("caption", "VARCHAR"),
            ("content_hash", "VARCHAR"),
            ("width", "INTEGER"),
            ("height", "INTEGER"),
        ),
    )
)


def _record(asset: str, partition: str) -> MaterializationRecord:
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id="run-1",
        code_version="v1",
        profile="test",
        started_at=utc_now(),
        duration_s=0.1,
        row_counts={"images": 2},
    )


def _images(shard: str, n: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"{shard}/{i:04d}" for i in range(n)],
            "shard": [shard] * n,
            "key": [f"{i:04d}" for i in range(n)],
            "source_uri": [f"/data/{shard}.tar#{i:04d}.jpg" for i in range(n)],
            "caption": ["a cat"] * n,
            "content_hash": [f"h{shard}{i}" for i in range(n)],
            "width": [64] * n,
            "height": [64] * n,
        }
    )


def test_record_and_replace_partition_rows(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    catalog.record(_record("image_corpus", "00000"), rows={TEST_IMAGES.name: _images("00000", 3)})
    catalog.record(_record("image_corpus", "00001"), rows={TEST_IMAGES.name: _images("00001", 2)})
    # Re-materializing shard 00000 with fewer rows replaces its rows, keeps the other shard's.
    second = _record("image_corpus", "00000")
    catalog.record(second, rows={TEST_IMAGES.name: _images("00000", 1)})
    counts = catalog.query(
        "SELECT shard, count(*) AS n FROM catalog_test_images GROUP BY shard ORDER BY shard"
    )
    assert counts.rows() == [("00000", 1), ("00001", 2)]
    assert catalog.latest_materialization_ids("image_corpus", ["00000"]) == {
        "00000": second.materialization_id
    }
    history = catalog.query("SELECT count(*) AS n FROM materializations")["n"][0]
    assert history == 3  # materialization history is append-only


def test_failed_write_leaves_no_partial_rows(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    catalog.record(_record("image_corpus", "00000"), rows={TEST_IMAGES.name: _images("00000", 3)})
    broken = _images("00000", 2).drop("content_hash").with_columns(pl.lit(1).alias("nonexistent"))
    # duckdb.Error is the base of every DuckDB error (its binder error class has moved between
    # versions); the message shows it is the unknown column that was refused, not something else.
    with pytest.raises(duckdb.Error, match='column with name "nonexistent"'):
        catalog.record(_record("image_corpus", "00000"), rows={TEST_IMAGES.name: broken})
    # The transaction rolled back: the old rows and only the first materialization remain.
    assert catalog.query("SELECT count(*) AS n FROM catalog_test_images")["n"][0] == 3
    assert catalog.query("SELECT count(*) AS n FROM materializations")["n"][0] == 1


def _write_many(path: str, shard: str, n_records: int) -> None:
    catalog = LineageCatalog(Path(path))
    for _ in range(n_records):
        catalog.record(_record("image_corpus", shard), rows={TEST_IMAGES.name: _images(shard, 5)})


def test_parallel_writer_processes_lose_nothing(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    shards = [f"{i:05d}" for i in range(6)]
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_write_many, args=(str(path), s, 5)) for s in shards]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=120)
        assert p.exitcode == 0
    catalog = LineageCatalog(path)
    assert catalog.query("SELECT count(*) AS n FROM materializations")["n"][0] == 30
    per_shard = catalog.query("SELECT shard, count(*) AS n FROM catalog_test_images GROUP BY shard")
    assert sorted(per_shard.rows()) == [(s, 5) for s in shards]


def test_lock_timeout_names_the_file(tmp_path: Path) -> None:
    import fcntl

    path = tmp_path / "catalog.duckdb"
    with open(path.with_name(path.name + ".lock"), "a+") as held:
        fcntl.flock(held, fcntl.LOCK_EX)
        # flock is per open file description, so a second open in this process contends.
        with pytest.raises(CatalogBusyError, match=r"catalog\.duckdb"):
            LineageCatalog(path, lock_timeout_s=0.2).query("SELECT 1")


def test_a_partition_that_now_has_no_rows_loses_its_old_ones(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    catalog.record(_record("image_corpus", "00000"), rows={TEST_IMAGES.name: _images("00000", 3)})
    catalog.record(_record("image_corpus", "00001"), rows={TEST_IMAGES.name: _images("00001", 2)})
    # Shard 00000 became unreadable: its new materialization brings no image rows at all.
    catalog.record(_record("image_corpus", "00000"), rows={TEST_IMAGES.name: _images("00000", 0)})
    counts = catalog.query("SELECT shard, count(*) AS n FROM catalog_test_images GROUP BY shard")
    assert counts.rows() == [("00001", 2)]


def test_retired_partitions_leave_the_dataset_until_materialized_again(tmp_path: Path) -> None:
    from megapairs_assets.lineage.catalog import IncompleteCommitError

    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    for shard in ("a", "b"):
        catalog.record(_record("triplets", shard))
        catalog.record(_record("embeddings", shard))
    catalog.record(_record("checkpoint", "b"))  # another partitioning that happens to share "b"
    failed = _record("triplets", "c")
    catalog.begin(failed)
    catalog.fail(failed.materialization_id)

    catalog.retire_partitions(["b"], assets=["triplets", "embeddings"])
    catalog.retire_partitions(["b"], assets=["triplets", "embeddings"])  # re-running is a no-op

    assert catalog.current_partitions("triplets") == ["a"]  # "c" never completed
    assert catalog.retired_partitions("triplets") == ["b"]
    assert catalog.current_partitions("embeddings") == ["a"]
    assert catalog.current_partitions("checkpoint") == ["b"]  # not a shard asset: untouched
    retirements = catalog.query(
        "SELECT count(*) AS n FROM materializations WHERE status = 'retired'"
    )["n"][0]
    assert retirements == 2
    with pytest.raises(IncompleteCommitError, match="left the corpus"):
        catalog.read_versions("triplets", ["b"])

    catalog.record(_record("triplets", "b"))  # the shard came back and was materialized again
    assert catalog.current_partitions("triplets") == ["a", "b"]
    assert catalog.retired_partitions("triplets") == []
