"""The lineage catalog: a DuckDB file recording every materialization and row-level lineage.

DuckDB lets one process at a time open a database file for writing, while Dagster's
multiprocess executor runs each step in its own process. Every access therefore takes an
exclusive OS file lock (`fcntl.flock` on `<catalog>.lock`) and holds the DuckDB connection only
for the few milliseconds of one write or read. Writers in parallel steps queue on the lock
instead of failing, and no long-lived connection ever blocks another process. If something
outside this project holds the database (a DuckDB shell left open), the connection is retried
until `lock_timeout_s`, then a clear error names the file.

Tables (all ids are strings):

- `materializations`: one row per (asset, partition) materialization: materialization_id,
  asset, partition, run_id, code_version, profile, config (JSON), model_ids (JSON),
  input_versions (JSON: upstream "asset/partition" -> materialization_id), row_counts (JSON),
  output_paths (JSON), started_at, duration_s. Append-only: history is kept.
- `image_lineage`: image_id, shard, key, source_uri, caption, content_hash, width, height,
  materialization_id (the image_corpus materialization that produced the row).
- `quarantine_log`: stage, shard, key, source_uri, reason, detail, materialization_id.
- `pair_lineage`: pair_id, query_id, target_id, shard, sources (list), scores (JSON: source ->
  score), hard_negative_ids (list, the query image first), knn_versions (JSON: source -> KNN
  materialization_id), materialization_id.

Row tables hold the latest materialization of each partition: re-materializing a partition
replaces its rows in the same transaction that adds them.
"""

from __future__ import annotations

import fcntl
import json
import time
import uuid
from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

SCHEMA_SQL = """
CREATE TABLE IF NOT EXISTS materializations (
    materialization_id VARCHAR PRIMARY KEY,
    asset VARCHAR NOT NULL,
    partition VARCHAR,
    run_id VARCHAR,
    code_version VARCHAR,
    profile VARCHAR,
    config VARCHAR,
    model_ids VARCHAR,
    input_versions VARCHAR,
    row_counts VARCHAR,
    output_paths VARCHAR,
    started_at TIMESTAMP,
    duration_s DOUBLE
);
CREATE TABLE IF NOT EXISTS image_lineage (
    image_id VARCHAR, shard VARCHAR, key VARCHAR, source_uri VARCHAR, caption VARCHAR,
    content_hash VARCHAR, width INTEGER, height INTEGER, materialization_id VARCHAR
);
CREATE TABLE IF NOT EXISTS quarantine_log (
    stage VARCHAR, shard VARCHAR, key VARCHAR, source_uri VARCHAR, reason VARCHAR,
    detail VARCHAR, materialization_id VARCHAR
);
CREATE TABLE IF NOT EXISTS pair_lineage (
    pair_id VARCHAR, query_id VARCHAR, target_id VARCHAR, shard VARCHAR, sources VARCHAR[],
    scores VARCHAR, hard_negative_ids VARCHAR[], knn_versions VARCHAR, materialization_id VARCHAR
);
"""

# The row tables a materialization may replace. Its rows replace exactly the rows of the same
# shard (and, for quarantine_log, the same stage = asset), even when it brings none: a shard
# that became unreadable leaves no stale rows behind.
_ROW_TABLES = ("image_lineage", "quarantine_log", "pair_lineage")


class CatalogBusyError(RuntimeError):
    """The catalog could not be opened within the timeout."""


@dataclass(frozen=True)
class MaterializationRecord:
    """What one materialization of one (asset, partition) did."""

    asset: str
    partition: str | None
    run_id: str
    code_version: str
    profile: str
    started_at: datetime
    duration_s: float
    config: Mapping[str, Any] = field(default_factory=dict)
    model_ids: Mapping[str, str] = field(default_factory=dict)
    input_versions: Mapping[str, str] = field(default_factory=dict)
    row_counts: Mapping[str, int] = field(default_factory=dict)
    output_paths: Mapping[str, str] = field(default_factory=dict)
    materialization_id: str = field(default_factory=lambda: uuid.uuid4().hex)


def new_materialization_id() -> str:
    """A fresh id; assets take one before writing so row lineage can point at it."""
    return uuid.uuid4().hex


def utc_now() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class LineageCatalog:
    """Reads and writes the lineage catalog at `path`, safe across processes."""

    def __init__(self, path: Path, lock_timeout_s: float = 300.0) -> None:
        self.path = Path(path)
        self.lock_timeout_s = lock_timeout_s

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """An exclusive, short-lived connection (schema created on first use)."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        deadline = time.monotonic() + self.lock_timeout_s
        with open(lock_path, "a+") as lock_file:
            self._acquire(lock_file, deadline)
            try:
                con = self._open(deadline)
                try:
                    con.execute(SCHEMA_SQL)
                    yield con
                finally:
                    con.close()
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _acquire(self, lock_file: Any, deadline: float) -> None:
        while True:
            try:
                fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
                return
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise CatalogBusyError(
                        f"lineage catalog {self.path} stayed locked for {self.lock_timeout_s:.0f} s"
                    ) from None
                time.sleep(0.02)

    def _open(self, deadline: float) -> duckdb.DuckDBPyConnection:
        # Another program (not ours, so not holding our lock) may have the file open.
        while True:
            try:
                return duckdb.connect(str(self.path))
            except duckdb.IOException as error:
                if time.monotonic() > deadline:
                    raise CatalogBusyError(
                        f"lineage catalog {self.path} is held by another program: {error}. "
                        "Close other DuckDB sessions on this file."
                    ) from error
                time.sleep(0.1)

    # -- writes ---------------------------------------------------------------------------

    def record(
        self,
        materialization: MaterializationRecord,
        rows: Mapping[str, pl.DataFrame] | None = None,
    ) -> None:
        """Append a materialization and replace its partition's rows, in one transaction.

        `rows` maps a row table name (image_lineage, quarantine_log, pair_lineage) to a frame
        with that table's columns except `materialization_id`, which is filled in here.
        """
        m = materialization
        with self.connect() as con:
            con.execute("BEGIN TRANSACTION")
            try:
                con.execute(
                    "INSERT INTO materializations VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?)",
                    [
                        m.materialization_id,
                        m.asset,
                        m.partition,
                        m.run_id,
                        m.code_version,
                        m.profile,
                        json.dumps(dict(m.config), default=str, sort_keys=True),
                        json.dumps(dict(m.model_ids), sort_keys=True),
                        json.dumps(dict(m.input_versions), sort_keys=True),
                        json.dumps(dict(m.row_counts), sort_keys=True),
                        json.dumps(dict(m.output_paths), sort_keys=True),
                        m.started_at,
                        m.duration_s,
                    ],
                )
                for table, frame in (rows or {}).items():
                    self._replace_rows(con, table, frame, m)
                con.execute("COMMIT")
            except Exception:
                con.execute("ROLLBACK")
                raise

    @staticmethod
    def _replace_rows(
        con: duckdb.DuckDBPyConnection,
        table: str,
        frame: pl.DataFrame,
        materialization: MaterializationRecord,
    ) -> None:
        if table not in _ROW_TABLES:
            raise ValueError(f"unknown row table {table!r}; expected one of {list(_ROW_TABLES)}")
        if table == "quarantine_log":
            con.execute(
                "DELETE FROM quarantine_log WHERE stage = ? AND shard = ?",
                [materialization.asset, materialization.partition],
            )
        else:
            con.execute(f"DELETE FROM {table} WHERE shard = ?", [materialization.partition])
        if frame.height:
            frame = frame.with_columns(
                pl.lit(materialization.materialization_id).alias("materialization_id")
            )
            arrow_rows = frame.to_arrow()  # noqa: F841  (DuckDB reads the local by name)
            columns = ", ".join(frame.columns)
            con.execute(f"INSERT INTO {table} ({columns}) SELECT {columns} FROM arrow_rows")

    # -- reads ----------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Run a read query and return a polars frame."""
        with self.connect() as con:
            return con.execute(sql, params or []).pl()

    def latest_materialization_ids(self, asset: str, partitions: list[str]) -> dict[str, str]:
        """Newest materialization id of `asset` for each partition that has one."""
        if not partitions:
            return {}
        frame = self.query(
            """
            SELECT partition, arg_max(materialization_id, started_at) AS materialization_id
            FROM materializations WHERE asset = ? AND partition IN (SELECT unnest(?))
            GROUP BY partition
            """,
            [asset, partitions],
        )
        return dict(
            zip(frame["partition"].to_list(), frame["materialization_id"].to_list(), strict=True)
        )
