"""The lineage catalog: a DuckDB file recording every materialization and row-level lineage.

DuckDB lets one process at a time open a database file for writing, while Dagster's
multiprocess executor runs each step in its own process. Every access therefore takes an
exclusive OS file lock (`fcntl.flock` on `<catalog>.lock`) and holds the DuckDB connection only
for the few milliseconds of one write or read. Writers in parallel steps queue on the lock
instead of failing, and no long-lived connection ever blocks another process. If something
outside this project holds the database (a DuckDB shell left open), the connection is retried
until `lock_timeout_s`, then a clear error names the file.

The catalog owns two tables; stages declare their own row tables next to their code
(`RowTable` + `register_row_table`) and the catalog creates them on first use:

- `materializations`: one row per (asset, partition) materialization: materialization_id,
  asset, partition, run_id, code_version, profile, config (JSON), model_ids (JSON),
  input_versions (JSON: upstream "asset/partition" -> materialization_id actually read),
  row_counts (JSON), output_paths (JSON), started_at, duration_s, status. Append-only.
- `quarantine_log`: stage, shard, key, source_uri, reason, detail, materialization_id: every
  rejected input or skipped row of any stage.

A materialization is written in two steps: `begin` records it as `pending` before any output
is written, `complete` fills in what it did and replaces its partition's rows in one
transaction. A step killed in between leaves a `pending` record newer than the last complete
one, and `read_version` refuses that partition until it is re-materialized: a table without
its catalog record is never read as if it were finished.

Row tables hold the latest materialization of each partition: completing a materialization
replaces the partition's rows (scoped by the table's partition column and, for tables shared
by stages, its scope column) in the same transaction, even when it brings no rows.

Two backends serve the same API, chosen by the location given to `LineageCatalog`:

- a file path: the embedded default, one DuckDB file guarded by the file lock above (one
  machine);
- a DuckLake URL (`ducklake:postgres:dbname=lineage host=db user=megapairs`, with `data_path`
  naming where DuckLake writes its Parquet files): the catalog database lives in PostgreSQL,
  so steps on many machines write at once with no file lock. DuckLake commits optimistically
  and retries conflicting commits itself; a conflict it gives up on is retried here by
  re-running the whole operation (every write is idempotent: it deletes by id before it
  inserts). DuckLake has no PRIMARY KEY or INSERT OR REPLACE, so the schema is created
  without constraints and uniqueness comes from those delete-then-insert transactions.
  The ducklake and postgres extensions are loaded offline from the PyPI packages
  `duckdb-extension-ducklake` / `duckdb-extension-postgres` (their version must equal
  duckdb's), falling back to DuckDB's own INSTALL where those packages are absent.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from megapairs_assets.lib.errors import ConfigurationError

# v1: the mining half's first release (no status column, no catalog_info table).
# v2: materializations.status; catalog_info; row tables declared by stages.
SCHEMA_VERSION = 2

_CORE_SQL = """
CREATE TABLE IF NOT EXISTS catalog_info (key VARCHAR PRIMARY KEY, value VARCHAR);
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
ALTER TABLE materializations ADD COLUMN IF NOT EXISTS status VARCHAR DEFAULT 'complete';
"""

STATUS_PENDING, STATUS_COMPLETE, STATUS_FAILED = "pending", "complete", "failed"
# A partition that left the corpus: a record with this status, newer than any before it, says
# its tables (still on disk) are no longer part of the dataset.
STATUS_RETIRED = "retired"


class NotMaterializedError(RuntimeError):
    """A step's upstream partition has never been materialized."""


class CatalogBusyError(RuntimeError):
    """The catalog could not be opened within the timeout."""


class IncompleteCommitError(RuntimeError):
    """A partition's newest materialization never completed: its table cannot be trusted."""


@dataclass(frozen=True)
class RowTable:
    """A row-level lineage table a stage declares next to its code.

    name: table name. columns: (column, DuckDB type) pairs, without `materialization_id`,
    which the catalog adds. partition_column: the column holding the partition key (a shard,
    a checkpoint name, a benchmark key...). scope_column: for tables several stages share, the
    column holding the writing asset's name; a materialization replaces only its own rows.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    partition_column: str = "shard"
    scope_column: str | None = None

    def create_sql(self) -> str:
        cols = ", ".join(f"{name} {kind}" for name, kind in self.columns)
        return f"CREATE TABLE IF NOT EXISTS {self.name} ({cols}, materialization_id VARCHAR)"

    def migrate_sql(self) -> list[str]:
        """Additive migration: columns added to a declaration appear in older catalogs."""
        return [
            f"ALTER TABLE {self.name} ADD COLUMN IF NOT EXISTS {name} {kind}"
            for name, kind in self.columns
        ]


_ROW_TABLES: dict[str, RowTable] = {}
# Catalog files whose schema this process has created or migrated, with the tables declared then.
_SCHEMA_READY: set[tuple[str, int, frozenset[RowTable]]] = set()


def _tables_key() -> frozenset[RowTable]:
    return frozenset(_ROW_TABLES.values())


def register_row_table(table: RowTable) -> RowTable:
    """Declare a row table (idempotent for the same declaration); returns it for assignment."""
    known = _ROW_TABLES.get(table.name)
    if known is not None and known != table:
        raise ValueError(f"row table {table.name!r} is already declared differently")
    _ROW_TABLES[table.name] = table
    return table


def registered_row_tables() -> dict[str, RowTable]:
    return dict(_ROW_TABLES)


QUARANTINE_LOG = register_row_table(
    RowTable(
        "quarantine_log",
        (
            ("stage", "VARCHAR"),
            ("shard", "VARCHAR"),
            ("key", "VARCHAR"),
            ("source_uri", "VARCHAR"),
            ("reason", "VARCHAR"),
            ("detail", "VARCHAR"),
        ),
        partition_column="shard",
        scope_column="stage",
    )
)


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


def _json(value: Mapping[str, Any]) -> str:
    return json.dumps(dict(value), default=str, sort_keys=True)


DUCKLAKE_PREFIX = "ducklake:"
_LAKE_ALIAS = "megapairs_lake"
# DuckLake refuses constraints; the schema it gets is the same without them.
_CORE_SQL_NO_CONSTRAINTS = re.sub(r"\s+PRIMARY KEY", "", _CORE_SQL)


class CatalogConfigError(ConfigurationError):
    """The catalog location or its DuckDB extensions are not usable as configured."""


def is_ducklake_url(location: str | Path) -> bool:
    """True for a DuckLake catalog URL (`ducklake:postgres:...`), False for a file path."""
    return str(location).startswith(DUCKLAKE_PREFIX)


def redact(location: str) -> str:
    """The location with any `password=...` hidden, for logs and error messages."""
    return re.sub(r"(password=)\S+", r"\1***", location)


class LineageCatalog:
    """Reads and writes the lineage catalog, safe across processes (and machines on DuckLake).

    path: a DuckDB file path (embedded default, file-locked) or a DuckLake URL
    (`ducklake:postgres:<libpq connection string>`). data_path: where DuckLake writes its data
    files (required with a DuckLake URL, ignored for a file). lock_timeout_s: how long a file
    lock is waited for, or how long a DuckLake commit conflict is retried.
    """

    def __init__(
        self, path: Path | str, lock_timeout_s: float = 300.0, data_path: str | None = None
    ) -> None:
        self.lock_timeout_s = lock_timeout_s
        self.is_ducklake = is_ducklake_url(path)
        self.url: str | None = str(path) if self.is_ducklake else None
        self.path: Path | None = None if self.is_ducklake else Path(path)
        self.data_path: str | None = None
        if self.is_ducklake:
            if not data_path:
                raise CatalogConfigError(
                    f"DuckLake catalog {redact(str(path))} needs a data path (where its Parquet "
                    "files go), e.g. MEGAPAIRS_LINEAGE_DATA_PATH=<data root>/lineage/"
                )
            self.data_path = data_path if data_path.endswith("/") else data_path + "/"

    @property
    def location(self) -> str:
        """Where the catalog lives, for messages (passwords hidden)."""
        if self.url is not None:
            return f"{redact(self.url)} (data {self.data_path})"
        return str(self.path)

    @contextmanager
    def connect(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection (schema created or migrated on first use).

        File backend: exclusive, under the file lock. DuckLake: a cursor on this process's
        attached lake; no lock, commits are checked for conflicts by DuckLake.
        """
        if self.is_ducklake:
            with self._lake_cursor() as con:
                yield con
            return
        assert self.path is not None
        self.path.parent.mkdir(parents=True, exist_ok=True)
        lock_path = self.path.with_name(self.path.name + ".lock")
        deadline = time.monotonic() + self.lock_timeout_s
        with open(lock_path, "a+") as lock_file:
            self._acquire(lock_file, deadline)
            try:
                con = self._open(deadline)
                try:
                    # Once per process and file (identified by inode, so a deleted and
                    # re-created catalog is set up again), not on every short read.
                    ready_key = (str(self.path), os.stat(self.path).st_ino, _tables_key())
                    if ready_key not in _SCHEMA_READY:
                        self._ensure_schema(con)
                        _SCHEMA_READY.add(ready_key)
                    yield con
                finally:
                    con.close()
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)

    def close(self) -> None:
        """Detach this process's DuckLake connection (a no-op for the file backend)."""
        if self.is_ducklake:
            _close_lake(self._lake_key())

    @staticmethod
    def _ensure_schema(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(_CORE_SQL)
        for table in _ROW_TABLES.values():
            con.execute(table.create_sql())
            for statement in table.migrate_sql():
                con.execute(statement)
        con.execute(
            "INSERT OR REPLACE INTO catalog_info VALUES ('schema_version', ?)",
            [str(SCHEMA_VERSION)],
        )

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

    # -- DuckLake -------------------------------------------------------------------------

    def _lake_key(self) -> tuple[int, str, str]:
        assert self.url is not None and self.data_path is not None
        return (os.getpid(), self.url, self.data_path)

    def _lake(self) -> duckdb.DuckDBPyConnection:
        """This process's attached lake, its schema ensured for every declared table."""
        key = self._lake_key()
        database = _attached_lake(key)
        missing = _lake_tables_missing(key)
        if missing:
            self._with_conflict_retry(self._ensure_lake_schema, database)
            _LAKE_TABLES_ENSURED.setdefault(key, set()).update(missing)
        return database

    @contextmanager
    def _lake_cursor(self) -> Iterator[duckdb.DuckDBPyConnection]:
        cursor = self._lake().cursor()
        try:
            cursor.execute(f"USE {_LAKE_ALIAS}")
            yield cursor
        finally:
            cursor.close()

    @staticmethod
    def _ensure_lake_schema(con: duckdb.DuckDBPyConnection) -> None:
        con.execute(_CORE_SQL_NO_CONSTRAINTS)
        for table in _ROW_TABLES.values():
            con.execute(table.create_sql())
            for statement in table.migrate_sql():
                con.execute(statement)
        known = con.execute(
            "SELECT value FROM catalog_info WHERE key = 'schema_version'"
        ).fetchall()
        if known != [(str(SCHEMA_VERSION),)]:
            con.execute("DELETE FROM catalog_info WHERE key = 'schema_version'")
            con.execute(
                "INSERT INTO catalog_info VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )

    def _with_conflict_retry(self, work: Any, database: duckdb.DuckDBPyConnection) -> Any:
        """Run `work(con)` in one DuckLake transaction; re-run it when the commit conflicts."""
        deadline = time.monotonic() + self.lock_timeout_s
        attempt = 0
        while True:
            cursor = database.cursor()
            try:
                cursor.execute(f"USE {_LAKE_ALIAS}")
                cursor.execute("BEGIN TRANSACTION")
                result = work(cursor)
                cursor.execute("COMMIT")
                return result
            except duckdb.Error as error:
                _rollback_quietly(cursor)
                if not _is_commit_conflict(error) or time.monotonic() > deadline:
                    raise
            finally:
                cursor.close()
            attempt += 1
            # Jittered exponential backoff: writers that collided spread out.
            time.sleep(min(1.0, 0.02 * 2**attempt) * (0.5 + _jitter()))

    def _write(self, work: Any, transaction: bool) -> Any:
        """Run a write: under the file lock (in a transaction if asked), or as one DuckLake
        transaction retried on commit conflicts."""
        if self.is_ducklake:
            return self._with_conflict_retry(work, self._lake())
        with self.connect() as con:
            if not transaction:
                return work(con)
            con.execute("BEGIN TRANSACTION")
            try:
                result = work(con)
                con.execute("COMMIT")
                return result
            except Exception:
                con.execute("ROLLBACK")
                raise

    # -- writes ---------------------------------------------------------------------------

    def begin(self, materialization: MaterializationRecord) -> None:
        """Record a materialization as `pending`, before any of its outputs is written."""

        def work(con: duckdb.DuckDBPyConnection) -> None:
            if self.is_ducklake:  # no primary key: a retried begin must not add a second row
                con.execute(
                    "DELETE FROM materializations WHERE materialization_id = ?",
                    [materialization.materialization_id],
                )
            self._insert(con, materialization, STATUS_PENDING)

        self._write(work, transaction=False)

    def complete(
        self,
        materialization: MaterializationRecord,
        rows: Mapping[str, pl.DataFrame] | None = None,
    ) -> None:
        """Fill in a begun materialization and replace its partition's rows, in one transaction.

        `rows` maps a registered row table name to a frame with that table's columns except
        `materialization_id`, which is filled in here. A materialization never begun is
        inserted complete.
        """
        m = materialization

        def work(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "DELETE FROM materializations WHERE materialization_id = ?",
                [m.materialization_id],
            )
            self._insert(con, m, STATUS_COMPLETE)
            for table, frame in (rows or {}).items():
                self._replace_rows(con, table, frame, m)

        self._write(work, transaction=True)

    def fail(self, materialization_id: str) -> None:
        """Mark a begun materialization failed (its step raised): its outputs are not trusted."""
        self._write(
            lambda con: con.execute(
                "UPDATE materializations SET status = ? WHERE materialization_id = ?",
                [STATUS_FAILED, materialization_id],
            ),
            transaction=False,
        )

    def record(
        self,
        materialization: MaterializationRecord,
        rows: Mapping[str, pl.DataFrame] | None = None,
    ) -> None:
        """Record a finished materialization in one step (`begin` + `complete`)."""
        self.complete(materialization, rows)

    @staticmethod
    def _insert(con: duckdb.DuckDBPyConnection, m: MaterializationRecord, status: str) -> None:
        con.execute(
            "INSERT INTO materializations (materialization_id, asset, partition, run_id, "
            "code_version, profile, config, model_ids, input_versions, row_counts, "
            "output_paths, started_at, duration_s, status) VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            [
                m.materialization_id,
                m.asset,
                m.partition,
                m.run_id,
                m.code_version,
                m.profile,
                _json(m.config),
                _json(m.model_ids),
                _json(m.input_versions),
                _json(m.row_counts),
                _json(m.output_paths),
                m.started_at,
                m.duration_s,
                status,
            ],
        )

    @staticmethod
    def _replace_rows(
        con: duckdb.DuckDBPyConnection,
        table_name: str,
        frame: pl.DataFrame,
        materialization: MaterializationRecord,
    ) -> None:
        table = _ROW_TABLES.get(table_name)
        if table is None:
            raise ValueError(
                f"unknown row table {table_name!r}; declared: {sorted(_ROW_TABLES)} "
                "(declare it with register_row_table next to the stage's code)"
            )
        where, params = f"{table.partition_column} = ?", [materialization.partition]
        if table.scope_column:
            where += f" AND {table.scope_column} = ?"
            params.append(materialization.asset)
        con.execute(f"DELETE FROM {table.name} WHERE {where}", params)
        if frame.height:
            frame = frame.with_columns(
                pl.lit(materialization.materialization_id).alias("materialization_id")
            )
            arrow_rows = frame.to_arrow()  # noqa: F841  (DuckDB reads the local by name)
            columns = ", ".join(frame.columns)
            con.execute(f"INSERT INTO {table.name} ({columns}) SELECT {columns} FROM arrow_rows")

    def retire_partitions(self, partitions: list[str], assets: Sequence[str]) -> int:
        """Take partitions that left the corpus out of the dataset; their history stays.

        Their row-level lineage is removed, and each of `assets` (the shard-partitioned ones)
        that has a record of such a partition gets a newer `retired` record, so readers of
        "the current partitions" (training, scoring, `check --existing`, the export's card)
        leave them out; their files stay on disk until a user deletes them. A partition that
        comes back is current again once materialized. Returns the row-table rows removed.
        Older materialization records are kept, so `megapairs lineage` still explains an
        old id.
        """
        if not partitions:
            return 0
        now = utc_now()

        def work(con: duckdb.DuckDBPyConnection) -> int:
            removed = 0
            for table in _ROW_TABLES.values():
                before = con.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
                con.execute(
                    f"DELETE FROM {table.name} WHERE {table.partition_column} "
                    "IN (SELECT unnest(?))",
                    [partitions],
                )
                removed += before - con.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
            live = con.execute(
                "SELECT asset, partition FROM materializations "
                "WHERE asset IN (SELECT unnest(?)) AND partition IN (SELECT unnest(?)) "
                "GROUP BY asset, partition HAVING arg_max(status, started_at) <> ?",
                [list(assets), partitions, STATUS_RETIRED],
            ).fetchall()
            for asset, partition in live:
                self._insert(
                    con,
                    MaterializationRecord(asset, partition, "", "", "", now, 0.0),
                    STATUS_RETIRED,
                )
            return removed

        return self._write(work, transaction=True)

    # -- reads ----------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Run a read query and return a polars frame."""
        with self.connect() as con:
            return con.execute(sql, params or []).pl()

    def schema_version(self) -> int:
        frame = self.query("SELECT value FROM catalog_info WHERE key = 'schema_version'")
        return int(frame["value"][0]) if frame.height else 1

    def current_partitions(self, asset: str) -> list[str]:
        """The partitions of `asset` that are part of the dataset: materialized completely at
        least once and not retired since. (A partition whose newest attempt failed is still
        listed: its reader refuses it with the reason, see `read_versions`.)"""
        return self.query(
            "SELECT partition FROM materializations WHERE asset = ? AND partition IS NOT NULL "
            "GROUP BY partition "
            "HAVING arg_max(status, started_at) <> ? AND bool_or(status = ?) ORDER BY partition",
            [asset, STATUS_RETIRED, STATUS_COMPLETE],
        )["partition"].to_list()

    def retired_partitions(self, asset: str) -> list[str]:
        """The partitions of `asset` whose newest record is a retirement."""
        return self.query(
            "SELECT partition FROM materializations WHERE asset = ? AND partition IS NOT NULL "
            "GROUP BY partition HAVING arg_max(status, started_at) = ? ORDER BY partition",
            [asset, STATUS_RETIRED],
        )["partition"].to_list()

    def latest_materialization_ids(self, asset: str, partitions: list[str]) -> dict[str, str]:
        """Newest complete materialization id of `asset` for each partition that has one."""
        if not partitions:
            return {}
        frame = self.query(
            """
            SELECT partition, arg_max(materialization_id, started_at) AS materialization_id
            FROM materializations
            WHERE asset = ? AND partition IN (SELECT unnest(?)) AND status = 'complete'
            GROUP BY partition
            """,
            [asset, partitions],
        )
        return dict(
            zip(frame["partition"].to_list(), frame["materialization_id"].to_list(), strict=True)
        )

    def read_versions(self, asset: str, partitions: list[str]) -> dict[str, str]:
        """The materialization id behind each partition's table on disk, for a reader.

        Raises `IncompleteCommitError` naming the partitions whose newest materialization is
        pending or failed (a step killed or failed after it may have replaced the table), and
        leaves out partitions never materialized.
        """
        if not partitions:
            return {}
        frame = self.query(
            """
            SELECT partition,
                   arg_max(materialization_id, started_at) AS materialization_id,
                   arg_max(status, started_at) AS status
            FROM materializations
            WHERE asset = ? AND partition IN (SELECT unnest(?))
            GROUP BY partition
            """,
            [asset, partitions],
        )
        retired = frame.filter(pl.col("status") == STATUS_RETIRED)["partition"].to_list()
        if retired:
            raise IncompleteCommitError(
                f"{asset}: {', '.join(retired)} left the corpus (retired), so its table is no "
                "longer part of the dataset; materialize the shard again if it is back"
            )
        unfinished = frame.filter(pl.col("status") != STATUS_COMPLETE)
        if unfinished.height:
            listed = ", ".join(
                f"{p} ({s})"
                for p, s in zip(unfinished["partition"], unfinished["status"], strict=True)
            )
            raise IncompleteCommitError(
                f"{asset}: the newest materialization of {listed} did not complete, so its "
                "table on disk is not trusted; re-materialize those partitions"
            )
        return dict(
            zip(frame["partition"].to_list(), frame["materialization_id"].to_list(), strict=True)
        )

    def materializations(self, ids: list[str]) -> pl.DataFrame:
        """Materialization records by id."""
        return self.query(
            "SELECT * FROM materializations WHERE materialization_id IN (SELECT unnest(?))",
            [ids],
        )

    def rows_for_ids(self, table: str, id_column: str, ids: list[str]) -> pl.DataFrame:
        """Rows of a row table whose `id_column` is in `ids` (a named read for stages)."""
        if table not in _ROW_TABLES:
            raise ValueError(f"unknown row table {table!r}")
        return self.query(
            f"SELECT * FROM {table} WHERE {id_column} IN (SELECT unnest(?))", [list(ids)]
        )


def read_with_versions(
    catalog: LineageCatalog,
    asset: str,
    partitions: list[str],
    read: Any,
    attempts: int = 3,
    required: bool = False,
) -> tuple[Any, dict[str, str]]:
    """Call `read()` and return its value with the versions of exactly what it read.

    The versions are looked up before and after the read; if another run replaced one of the
    tables meanwhile, the read is repeated (a reader never records a version it did not read).
    `required`: every partition must have been materialized, else `NotMaterializedError`
    names them before anything is read (a step's own upstream partition, say).
    """
    if required:
        missing = sorted(set(partitions) - set(catalog.read_versions(asset, partitions)))
        if missing:
            raise NotMaterializedError(
                f"{asset} {', '.join(missing)}: not materialized (no record in the lineage "
                f"catalog); materialize {asset} for these partitions first, or run a job that "
                "includes it (e.g. mine_and_generate)"
            )
    for _ in range(attempts):
        before = catalog.read_versions(asset, partitions)
        value = read()
        if catalog.read_versions(asset, partitions) == before:
            return value, before
    raise RuntimeError(
        f"{asset}: tables kept changing while being read ({attempts} attempts); another run is "
        "rewriting them; retry when it finishes"
    )


# -- DuckLake connections, one attached lake per (process, url, data path) ----------------------

_LAKES: dict[tuple[int, str, str], duckdb.DuckDBPyConnection] = {}
_LAKE_TABLES_ENSURED: dict[tuple[int, str, str], set[str]] = {}
_LAKES_LOCK = threading.Lock()
# DuckDB's Python package ships the postgres extension under the file name `postgres`, but its
# entry point is `postgres_scanner`, which DuckDB derives from the file name it loads.
_PACKAGED_EXTENSIONS = (
    ("duckdb_extension_ducklake", "ducklake", "ducklake"),
    ("duckdb_extension_postgres", "postgres", "postgres_scanner"),
)


def _lake_tables_missing(key: tuple[int, str, str]) -> set[str]:
    wanted = {"materializations", "catalog_info", *_ROW_TABLES}
    return wanted - _LAKE_TABLES_ENSURED.get(key, set())


def _attached_lake(key: tuple[int, str, str]) -> duckdb.DuckDBPyConnection:
    """This process's in-memory DuckDB with the lake attached (made on first use)."""
    with _LAKES_LOCK:
        database = _LAKES.get(key)
        if database is None:
            database = _attach_lake(url=key[1], data_path=key[2])
            _LAKES[key] = database
        return database


def _attach_lake(url: str, data_path: str, timeout_s: float = 60.0) -> duckdb.DuckDBPyConnection:
    database = duckdb.connect(config={"autoinstall_known_extensions": False})
    load_ducklake_extensions(database)
    statement = f"ATTACH {_sql_literal(url)} AS {_LAKE_ALIAS} (DATA_PATH {_sql_literal(data_path)})"
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            database.execute(statement)
            return database
        except duckdb.Error as error:
            # Processes attaching a new lake at once race to create its metadata tables in
            # Postgres; the losers see the winner's tables when they try again.
            racing = any(s in str(error) for s in ("already exists", "duplicate key"))
            if not racing or time.monotonic() > deadline:
                database.close()
                raise CatalogConfigError(
                    f"could not attach DuckLake catalog {redact(url)} (data {data_path}): {error}"
                ) from error
            time.sleep(0.05 + 0.2 * _jitter())


def _close_lake(key: tuple[int, str, str]) -> None:
    with _LAKES_LOCK:
        database = _LAKES.pop(key, None)
        _LAKE_TABLES_ENSURED.pop(key, None)
    if database is not None:
        database.close()


def load_ducklake_extensions(con: duckdb.DuckDBPyConnection) -> None:
    """Load the ducklake and postgres extensions, offline from their PyPI packages if present.

    Without the packages, DuckDB's own INSTALL (a download) is the fallback. A package whose
    version differs from duckdb's is an error naming the pin to install.
    """
    version = f"v{duckdb.__version__}"
    for module_name, file_stem, load_name in _PACKAGED_EXTENSIONS:
        try:
            module = __import__(module_name)
        except ImportError:
            con.execute(f"INSTALL {load_name}")
            con.execute(f"LOAD {load_name}")
            continue
        shipped_dir = Path(module.__file__).parent / "extensions"
        shipped = shipped_dir / version / f"{file_stem}.duckdb_extension"
        if not shipped.exists():
            found = sorted(p.name for p in shipped_dir.glob("v*"))
            package = module_name.replace("_", "-")
            raise CatalogConfigError(
                f"{package} ships {found} but duckdb is {version}: install "
                f"{package}=={duckdb.__version__} (or duckdb at the package's version)"
            )
        con.execute(f"LOAD {_sql_literal(str(_named_as(shipped, load_name, version)))}")


def _named_as(shipped: Path, load_name: str, version: str) -> Path:
    """`shipped`, reachable under `<load_name>.duckdb_extension` (a symlink when renamed)."""
    if shipped.stem == load_name:
        return shipped
    link_dir = (
        Path(
            os.environ.get("MEGAPAIRS_DUCKDB_EXTENSION_DIR")
            or Path(tempfile.gettempdir()) / f"megapairs-duckdb-extensions-{os.getuid()}"
        )
        / version
    )
    link_dir.mkdir(parents=True, exist_ok=True)
    link = link_dir / f"{load_name}.duckdb_extension"
    if not (link.is_symlink() and link.resolve() == shipped.resolve()):
        # Made under a unique name and renamed: processes starting at once never see half a link.
        staging = link_dir / f".{load_name}.{os.getpid()}.{uuid.uuid4().hex}"
        os.symlink(shipped, staging)
        os.replace(staging, link)
    return link


def _sql_literal(text: str) -> str:
    return "'" + text.replace("'", "''") + "'"


def _rollback_quietly(con: duckdb.DuckDBPyConnection) -> None:
    with contextlib.suppress(duckdb.Error):  # a failed COMMIT has already ended the transaction
        con.execute("ROLLBACK")


def _is_commit_conflict(error: duckdb.Error) -> bool:
    text = str(error).lower()
    return isinstance(error, duckdb.TransactionException) or "conflict" in text


def _jitter() -> float:
    return uuid.uuid4().int % 1000 / 1000
