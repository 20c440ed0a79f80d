"""The lineage catalog as a data engineer meets it with nothing but `duckdb`: documented tables
and views, stale and failed versions, older catalogs, and reading it while the pipeline writes."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from datetime import datetime, timedelta
from pathlib import Path

import duckdb
import polars as pl
import pytest

import megapairs_assets.lineage.catalog as catalog_module
from megapairs_assets.lineage.catalog import (
    QUARANTINE_LOG,
    SCHEMA_VERSION,
    CatalogBusyError,
    LineageCatalog,
    MaterializationRecord,
    MissingTableError,
    ReadOnlyQueryError,
    RowTable,
    read_with_versions,
    register_row_table,
)
from megapairs_assets.lineage.views import VIEWS, CatalogView

DOCUMENTED = register_row_table(
    RowTable(
        "newuser_documented_rows",
        (("item_id", "VARCHAR"), ("shard", "VARCHAR")),
        description="rows of a documented test table",
        column_docs=(("item_id", "the item's id"),),
    )
)
T0 = datetime(2026, 1, 1, 12, 0, 0)


def record(
    catalog: LineageCatalog,
    asset: str,
    partition: str,
    minute: int,
    inputs: dict[str, str] | None = None,
    rows: dict[str, pl.DataFrame] | None = None,
) -> str:
    m = MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id=f"run-{minute}",
        code_version=f"{asset}-v1",
        profile="test",
        started_at=T0 + timedelta(minutes=minute),
        duration_s=1.0,
        input_versions=inputs or {},
    )
    catalog.record(m, rows)
    return m.materialization_id


def begin(catalog: LineageCatalog, asset: str, partition: str, minute: int) -> str:
    m = MaterializationRecord(
        asset, partition, f"run-{minute}", "v1", "test", T0 + timedelta(minutes=minute), 0.0
    )
    catalog.begin(m)
    return m.materialization_id


def quarantine(stage: str, shard: str, key: str, reason: str) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "stage": [stage],
            "shard": [shard],
            "key": [key],
            "source_uri": [f"/c/{shard}.tar#{key}.jpg"],
            "reason": [reason],
            "detail": ["why"],
        }
    )


def reader(path: Path) -> duckdb.DuckDBPyConnection:
    """What a user does: the duckdb package, read-only, nothing of ours."""
    return duckdb.connect(str(path), read_only=True)


def test_a_plain_duckdb_reader_finds_every_table_column_and_view_documented(
    tmp_path: Path,
) -> None:
    path = tmp_path / "catalog.duckdb"
    record(LineageCatalog(path), "image_corpus", "00000", 0)
    con = reader(path)
    tables = dict(
        con.execute(
            "SELECT table_name, comment FROM duckdb_tables() WHERE comment IS NOT NULL"
        ).fetchall()
    )
    assert {"materializations", "catalog_info", QUARANTINE_LOG.name, DOCUMENTED.name} <= set(tables)
    assert tables[DOCUMENTED.name] == "rows of a documented test table"
    undocumented = con.execute(
        "SELECT table_name, column_name FROM duckdb_columns() WHERE comment IS NULL "
        "AND table_name IN ('materializations', 'catalog_info', 'quarantine_log')"
    ).fetchall()
    assert undocumented == []
    docs = dict(
        con.execute(
            "SELECT column_name, comment FROM duckdb_columns() WHERE table_name = ?",
            [DOCUMENTED.name],
        ).fetchall()
    )
    assert docs["item_id"] == "the item's id"
    assert "materializations.materialization_id" in docs["materialization_id"]
    views = dict(
        con.execute("SELECT view_name, comment FROM duckdb_views() WHERE NOT internal").fetchall()
    )
    # Views over stage tables this test never declared are left out, the others are there.
    assert {"current_materializations", "materialization_inputs", "quarantine_report"} <= set(views)
    assert all(views[name] for name in views)


def test_the_views_show_stale_inputs_failed_attempts_and_quarantine_runs(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path)
    first = record(catalog, "image_corpus", "00000", 0)
    pairs = record(catalog, "mined_image_pairs", "00000", 1, {"image_corpus/00000": first})
    second = record(
        catalog,
        "image_corpus",
        "00000",
        2,
        rows={QUARANTINE_LOG.name: quarantine("image_corpus", "00000", "k1", "decode_error")},
    )
    attempt = begin(catalog, "mined_image_pairs", "00000", 3)
    catalog.fail(attempt, error="ValueError: bad band", duration_s=2.5)
    con = reader(path)
    read = con.execute(
        "SELECT input_asset, input_partition, input_materialization_id, input_is_current, "
        "input_current_materialization_id FROM materialization_inputs "
        "WHERE materialization_id = ?",
        [pairs],
    ).fetchall()
    assert read == [("image_corpus", "00000", first, False, second)]
    current = {
        row[0]: row[1:]
        for row in con.execute(
            "SELECT asset, status, error, records, last_complete_materialization_id "
            "FROM current_materializations"
        ).fetchall()
    }
    assert current["image_corpus"] == ("complete", None, 2, second)
    assert current["mined_image_pairs"] == ("failed", "ValueError: bad band", 2, pairs)
    assert con.execute(
        "SELECT duration_s FROM materializations WHERE materialization_id = ?", [attempt]
    ).fetchone() == (2.5,)
    assert con.execute(
        "SELECT key, reason, run_id FROM quarantine_report WHERE shard = '00000'"
    ).fetchall() == [("k1", "decode_error", "run-2")]


_V1_SCHEMA = """
CREATE TABLE materializations (materialization_id VARCHAR PRIMARY KEY, asset VARCHAR NOT NULL,
  partition VARCHAR, run_id VARCHAR, code_version VARCHAR, profile VARCHAR, config VARCHAR,
  model_ids VARCHAR, input_versions VARCHAR, row_counts VARCHAR, output_paths VARCHAR,
  started_at TIMESTAMP, duration_s DOUBLE);
CREATE TABLE quarantine_log (stage VARCHAR, shard VARCHAR, key VARCHAR, source_uri VARCHAR,
  reason VARCHAR, detail VARCHAR, materialization_id VARCHAR);
INSERT INTO materializations VALUES ('m1', 'image_corpus', '00000', 'r', 'corpus-v1', 'demo',
  '{}', '{}', '{}', '{}', '{}', '2026-01-01 00:00:00', 1.0);
INSERT INTO materializations VALUES ('m2', 'mined_image_pairs', '00000', 'r', 'mining-v1',
  'demo', '{}', '{}', '{"image_corpus/00000": "m1"}', '{}', '{}', '2026-01-01 00:01:00', 1.0);
"""


def test_a_v1_catalog_gains_status_error_views_and_docs(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    old = duckdb.connect(str(path))
    old.execute(_V1_SCHEMA)
    old.close()
    catalog = LineageCatalog(path)
    assert catalog.schema_version() == SCHEMA_VERSION
    assert catalog.read_versions("mined_image_pairs", ["00000"]) == {"00000": "m2"}
    con = reader(path)
    assert con.execute("SELECT DISTINCT status, error FROM materializations").fetchall() == [
        ("complete", None)
    ]
    assert con.execute(
        "SELECT input_is_current FROM materialization_inputs WHERE materialization_id = 'm2'"
    ).fetchall() == [(True,)]
    assert (
        con.execute(
            "SELECT comment FROM duckdb_columns() WHERE table_name = 'materializations' "
            "AND column_name = 'status'"
        )
        .fetchone()[0]
        .startswith("pending")
    )


def test_a_newer_catalog_keeps_its_schema_version(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    LineageCatalog(path).schema_version()
    con = duckdb.connect(str(path))
    con.execute("UPDATE catalog_info SET value = '99' WHERE key = 'schema_version'")
    con.close()
    catalog_module._SCHEMA_READY.clear()  # as a new process would
    assert LineageCatalog(path).schema_version() == 99


def test_a_view_that_no_longer_binds_is_left_out_and_never_stops_a_step(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    broken = CatalogView(
        "broken_view", "reads a renamed column", "SELECT nope FROM catalog_info", ("catalog_info",)
    )
    monkeypatch.setattr(catalog_module, "VIEWS", (*VIEWS, broken))
    path = tmp_path / "catalog.duckdb"
    record(LineageCatalog(path), "image_corpus", "00000", 0)
    views = {
        name for (name,) in reader(path).execute("SELECT view_name FROM duckdb_views()").fetchall()
    }
    assert "current_materializations" in views and "broken_view" not in views


HOLD_OPEN = textwrap.dedent(
    """
    import sys, time, duckdb
    con = duckdb.connect(sys.argv[1], read_only=True)
    print(con.execute("SELECT count(*) FROM materializations").fetchone()[0], flush=True)
    time.sleep(30)
    """
)


def _hold_open(path: Path) -> tuple[subprocess.Popen[str], str]:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLD_OPEN, str(path)], stdout=subprocess.PIPE, text=True
    )
    return holder, holder.stdout.readline().strip()


def test_a_session_left_open_blocks_writers_and_a_snapshot_does_not(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path, lock_timeout_s=1.0)
    record(catalog, "image_corpus", "00000", 0)
    monkeypatch.setattr(catalog_module, "_HELD_WARNING_AFTER_S", 0.2)
    holder, _ = _hold_open(path)
    try:
        # Readers share the file with the session, even a new process's first read (whose
        # schema step needs a writer); a writer waits, says why, then fails.
        catalog_module._SCHEMA_READY.clear()
        assert catalog.read_only_query("SELECT count(*) AS n FROM materializations")["n"][0] == 1
        with pytest.raises(CatalogBusyError, match="--snapshot"):
            record(catalog, "image_corpus", "00001", 1)
    finally:
        holder.kill()
        holder.wait()
    waited = capsys.readouterr().err
    assert "waiting up to 1 s for lineage catalog" in waited and "Conflicting lock" in waited
    snapshot = catalog.snapshot(tmp_path / "copies" / "snapshot.duckdb")
    holder, seen = _hold_open(snapshot)
    try:
        record(catalog, "image_corpus", "00002", 2)  # the live file is free
        assert seen == "1"
    finally:
        holder.kill()
        holder.wait()
    assert catalog.query("SELECT count(*) AS n FROM materializations")["n"][0] == 2
    with pytest.raises(ValueError, match="overwrite the catalog"):
        catalog.snapshot(path)


def test_a_notebook_connection_in_the_same_process_gets_a_clear_error(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path, lock_timeout_s=30.0)
    record(catalog, "image_corpus", "00000", 0)
    notebook = reader(path)
    try:
        with pytest.raises(CatalogBusyError, match="already open in this process"):
            record(catalog, "image_corpus", "00001", 1)  # fails at once, no 30 s wait
    finally:
        notebook.close()
    record(catalog, "image_corpus", "00001", 1)


def test_read_only_queries_cannot_change_the_catalog(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path)
    record(catalog, "image_corpus", "00000", 0)
    assert catalog.read_only_query("SELECT count(*) AS n FROM materializations")["n"][0] == 1
    with pytest.raises(ReadOnlyQueryError, match="read-only"):
        catalog.read_only_query("DELETE FROM materializations")
    assert catalog.query("SELECT count(*) AS n FROM materializations")["n"][0] == 1


def test_ducklake_gets_the_same_views_and_rolls_back_a_read_only_query(tmp_path: Path) -> None:
    catalog = LineageCatalog(
        f"ducklake:{tmp_path / 'meta.ducklake'}", data_path=str(tmp_path / "lake")
    )
    try:
        first = record(catalog, "image_corpus", "00000", 0)
        record(catalog, "mined_image_pairs", "00000", 1, {"image_corpus/00000": first})
        record(catalog, "image_corpus", "00000", 2)
        stale = catalog.read_only_query(
            "SELECT input_is_current FROM materialization_inputs WHERE asset = 'mined_image_pairs'"
        )
        assert stale["input_is_current"].to_list() == [False]
        with pytest.raises(ReadOnlyQueryError):
            catalog.read_only_query("DELETE FROM materializations")
        assert catalog.query("SELECT count(*) AS n FROM materializations")["n"][0] == 3
        assert catalog.schema_version() == SCHEMA_VERSION
    finally:
        catalog.close()


def test_a_table_recorded_complete_but_gone_names_the_partition_and_the_fix(
    tmp_path: Path,
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    present, missing = (tmp_path / "knn" / f"{shard}.parquet" for shard in ("00000", "00001"))
    present.parent.mkdir()
    pl.DataFrame({"x": [1]}).write_parquet(present)
    for shard, path in (("00000", present), ("00001", missing)):
        catalog.record(
            MaterializationRecord(
                "clip_image_knn", shard, "r", "v", "test", T0, 1.0, output_paths={"knn": str(path)}
            )
        )
    with pytest.raises(MissingTableError) as raised:
        read_with_versions(
            catalog,
            "clip_image_knn",
            ["00000", "00001"],
            lambda: [pl.read_parquet(p) for p in (present, missing)],
        )
    message = str(raised.value)
    assert f"00001: {missing}" in message and str(present) not in message
    assert message.endswith("Re-materialize clip_image_knn for 00001")
    assert isinstance(raised.value, FileNotFoundError)  # existing handlers still catch it
