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

Every table, column and view carries a comment (`COMMENT ON`), so a reader with only the
`duckdb` package finds what each holds: `SELECT table_name, comment FROM duckdb_tables()`,
`duckdb_columns()`, `duckdb_views()`. Views for the questions people ask (the current version
of each partition, the inputs of a materialization and whether they are still current, the
quarantine with its runs, a pair's or a triplet's provenance) are declared in `views.py` and
created once the tables they read exist.

Reading it from another program: a DuckDB session open on the file, even read-only, stops
every writer (DuckDB allows one writing process, or many reading ones, never both), so a step
waits for it until `lock_timeout_s` and then fails. Short reads go through this class (or
`megapairs lineage --sql`); a long analysis session opens a copy (`snapshot`, `megapairs
lineage --snapshot PATH`).

Each access attaches the file to this thread's in-memory DuckDB (kept for the process) and
detaches it when done: the file and DuckDB's lock on it are released exactly as closing a
connection would, without paying for starting a DuckDB database every time (~10-20 ms, a
third of a no-change re-run's time before). Every write also counts up a generation number
kept in the lock file, so a reader can tell without opening the catalog whether anything was
written since it last looked: `read_with_versions` skips its second look when nothing was,
and a step's reads of its upstream partitions' newest records are answered from the last
read of that asset until another process writes (a process's own writes keep the answers
of the assets they did not touch).

Only a lock held by another program is waited for: DuckDB's "Could not set lock on file". A
file DuckDB cannot read (truncated, overwritten, a bad checksum) raises `CatalogDamagedError`
at once, saying to restore it from a backup or move it aside (a new catalog is started; the
tables stay, and re-materializing them records their lineage again). A catalog this process
may not write (a home archived on a read-only file system) is still read: read-only DuckDB
connections, and no lock file where none can be made; writing it is a `CatalogConfigError`.

A materialization is written in two steps: `begin` records it as `pending` before any output
is written, `complete` fills in what it did and replaces its partition's rows in one
transaction. A step killed in between leaves a `pending` record newer than the last complete
one, and `read_versions` refuses that partition until it is re-materialized: a table without
its catalog record is never read as if it were finished. A pending partition that a live step
of this machine is still writing (another run of the same home: it holds the partition's lock)
is waited for instead, up to `pending_wait_s`.

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
import errno
import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import sys
import tempfile
import threading
import time
import uuid
from collections.abc import Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lineage.id_lists import IN_IDS, id_list
from megapairs_assets.lineage.views import VIEWS, CatalogView

_LOG = logging.getLogger(__name__)
# A catalog held by another program this long gets one line on stderr saying who and what to do.
_HELD_WARNING_AFTER_S = 5.0
_MAX_ERROR_CHARS = 4000

# v1: the mining half's first release (no status column, no catalog_info table).
# v2: materializations.status; catalog_info; row tables declared by stages.
# v3: materializations.error; comments on every table and column; the views of views.py.
# v4: materializations.failed_checks (the blocking checks a complete partition failed).
SCHEMA_VERSION = 4

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
ALTER TABLE materializations ADD COLUMN IF NOT EXISTS error VARCHAR;
ALTER TABLE materializations ADD COLUMN IF NOT EXISTS failed_checks VARCHAR;
"""

# What the catalog's own tables hold, as comments in the database (see `_apply_docs`).
_CORE_DOCS: dict[str, tuple[str, dict[str, str]]] = {
    "catalog_info": (
        "Facts about this catalog file, e.g. key 'schema_version' (see lineage/catalog.py).",
        {"key": "the fact's name", "value": "its value"},
    ),
    "materializations": (
        "One record per materialization of an (asset, partition), append-only. The newest "
        "record of a partition (by started_at) is its current state; see the view "
        "current_materializations.",
        {
            "materialization_id": "unique id; row tables point at it",
            "asset": "the Dagster asset name",
            "partition": "the partition key (a shard, a training config, 'benchmark|retriever')",
            "run_id": "the Dagster run that wrote it ('' for a retirement record)",
            "code_version": "the asset's code version when it ran",
            "profile": "the settings profile (demo, paper, ...)",
            "config": "JSON: the settings that shaped the output",
            "model_ids": "JSON: role -> model id (name, revision, file) used",
            "input_versions": (
                "JSON: 'asset/partition' -> materialization_id of exactly what was read "
                "(one row per input: view materialization_inputs)"
            ),
            "row_counts": "JSON: table or counter name -> rows",
            "output_paths": "JSON: output name -> path or URL written",
            "started_at": "UTC start time",
            "duration_s": "seconds the step took (0 while pending, failed or retired)",
            "status": (
                "pending (begun, outputs may be half written), complete, failed (the step "
                "raised: outputs not trusted) or retired (the partition left the corpus)"
            ),
            "error": "for a failed record: the error the step raised",
            "failed_checks": (
                "for a complete record: the blocking asset checks its output failed, "
                "comma-separated (NULL: none). Readers that combine shards (training, held-out "
                "scores) leave such a partition out until it is re-materialized clean"
            ),
        },
    ),
}
_MATERIALIZATION_ID_DOC = (
    "the materialization (materializations.materialization_id) that wrote this row; a newer "
    "complete materialization of the partition replaces its rows"
)

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


class MissingTableError(FileNotFoundError):
    """A table the catalog records as complete is gone from storage (deleted or moved)."""


@dataclass(frozen=True)
class RowTable:
    """A row-level lineage table a stage declares next to its code.

    name: table name. columns: (column, DuckDB type) pairs, without `materialization_id`,
    which the catalog adds. partition_column: the column holding the partition key (a shard,
    a checkpoint name, a benchmark key...). scope_column: for tables several stages share, the
    column holding the writing asset's name; a materialization replaces only its own rows.
    description / column_docs: what the table and (column, text) each column hold; stored as
    comments in the catalog, where `megapairs lineage --schema` and any DuckDB client see them.
    """

    name: str
    columns: tuple[tuple[str, str], ...]
    partition_column: str = "shard"
    scope_column: str | None = None
    description: str = ""
    column_docs: tuple[tuple[str, str], ...] = ()

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
        description=(
            "Every input a stage rejected or skipped, with a reason code, for the current "
            "materialization of each (stage, shard); with its run: view quarantine_report."
        ),
        column_docs=(
            ("stage", "the asset that rejected or skipped the item"),
            ("shard", "the partition it belongs to"),
            ("key", "the item's key in its shard: an image key, or a pair id for generation"),
            ("source_uri", "where the item came from (NULL for rows that have none)"),
            ("reason", "a reason code, e.g. decode_error, no_caption (README, 'Bad input')"),
            ("detail", "what exactly was wrong"),
        ),
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
    failed_checks: tuple[str, ...] = ()


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


class ReadOnlyQueryError(ValueError):
    """A query given as read-only that is not exactly one reading statement."""


# DESCRIBE, SHOW and SUMMARIZE parse as SELECT; EXPLAIN ANALYZE of a write still meets a
# read-only connection (file) or a rolled-back transaction on a read-only attach (DuckLake).
_READ_STATEMENT_TYPES = (duckdb.StatementType.SELECT, duckdb.StatementType.EXPLAIN)


def require_one_read_statement(sql: str) -> None:
    """Refuse (ReadOnlyQueryError) any text that is not exactly one SELECT, EXPLAIN, DESCRIBE
    or SHOW statement, as DuckDB's own parser splits and classifies it: `SELECT 1; DELETE ...`
    and `COPY ... TO` never reach a connection. A syntax error raises DuckDB's ParserException.
    """
    statements = duckdb.extract_statements(sql)
    if len(statements) != 1 or statements[0].type not in _READ_STATEMENT_TYPES:
        kinds = ", ".join(statement.type.name for statement in statements) or "none"
        raise ReadOnlyQueryError(
            "the lineage catalog takes one read-only statement here (SELECT, EXPLAIN, "
            f"DESCRIBE or SHOW), got: {kinds}"
        )


# A user's query may read the catalog and nothing else: no files (COPY ... TO, read_csv),
# no other databases, no extensions; the configuration is locked so SET cannot undo it.
_SANDBOX_CONFIG = {
    "enable_external_access": False,
    "autoinstall_known_extensions": False,
    "autoload_known_extensions": False,
    "lock_configuration": True,
}


class CatalogConfigError(ConfigurationError):
    """The catalog location or its DuckDB extensions are not usable as configured."""


class CatalogDamagedError(CatalogConfigError):
    """The catalog file is damaged (truncated, overwritten, a bad checksum): waiting cannot
    help; it is restored from a backup or moved aside (the message says how)."""


# What DuckDB says when another process holds the file (duckdb 1.x: 'IO Error: Could not set
# lock on file "...": Conflicting lock is held in <program> (PID n)'): only this is worth
# waiting for. Any other IOException on opening is about the file itself.
_LOCK_CONFLICT = "Could not set lock on file"
# An opening refused by the file system, not by the file's content (strerror texts).
_FILE_SYSTEM_REFUSALS = (
    "Permission denied",
    "Read-only file system",
    "No space left on device",
    "Disk quota exceeded",
    "Too many open files",
)
# What DuckDB says of a file whose content is broken, also when a query meets a bad block.
_DAMAGE_MARKERS = (
    "Corrupt database file",
    "not a valid DuckDB database file",
    "Could not read enough bytes",
)
# Creating the lock file failed because this user may not write there.
_NOT_WRITABLE_ERRNOS = (errno.EROFS, errno.EACCES, errno.EPERM)


# How often a reader waiting for another run's partition looks again.
_PENDING_POLL_S = 0.5


def _listed(rows: Any) -> str:
    """'00001 (pending), 00003 (failed)' for rows (dicts or a frame) with partition, status."""
    if isinstance(rows, pl.DataFrame):
        rows = rows.iter_rows(named=True)
    return ", ".join(f"{row['partition']} ({row['status']})" for row in rows)


def _damage_reported(error: duckdb.Error) -> bool:
    return any(marker in str(error) for marker in _DAMAGE_MARKERS)


def _first_line(error: BaseException) -> str:
    lines = str(error).strip().splitlines()
    return lines[0] if lines else type(error).__name__


# -- the kept in-memory database catalog files are attached to -----------------------------------

# The name a catalog file is attached under: what `current_database()` says in its queries.
_ATTACHED = "megapairs_catalog"
# DuckDB's words when the file is already open in another database of this process.
_SAME_FILE_ATTACHED = "Unique file handle conflict"
_KEPT = threading.local()


def _kept_database() -> duckdb.DuckDBPyConnection:
    """This thread's in-memory DuckDB, which catalog files are attached to one access at a time.

    Starting a DuckDB database (its buffer pool, its threads) costs more than most catalog
    accesses; attaching a file to a running one costs a few milliseconds. One per thread, so
    threads never share an attachment; made again in a forked child.
    """
    kept = getattr(_KEPT, "database", None)
    if kept is None or kept[0] != os.getpid():
        kept = (os.getpid(), duckdb.connect())
        _KEPT.database = kept
        _KEPT.in_use = False
    return kept[1]


def _kept_in_use() -> bool:
    """Whether this thread has a catalog attached now (a nested access opens its own)."""
    return bool(getattr(_KEPT, "in_use", False)) and getattr(_KEPT, "database", (0,))[0] == (
        os.getpid()
    )


def _attach(
    database: duckdb.DuckDBPyConnection, path: str, read_only: bool
) -> duckdb.DuckDBPyConnection:
    """`path` attached to `database`; a cursor whose default database it is."""
    options = " (READ_ONLY)" if read_only else ""
    database.execute(f"ATTACH {_sql_literal(path)} AS {_ATTACHED}{options}")
    cursor = database.cursor()
    try:
        cursor.execute(f"USE {_ATTACHED}")
    except BaseException:
        cursor.close()
        _detach(database, None)
        raise
    return cursor


def _detach(database: duckdb.DuckDBPyConnection, cursor: duckdb.DuckDBPyConnection | None) -> None:
    """Detach the catalog file (DuckDB checkpoints it and lets go of the file and its lock).

    A database that cannot detach it is closed instead (closing always lets go), and the
    thread starts a new one next time: the file is never left held once the lock file is
    released.
    """
    if cursor is not None:
        cursor.close()  # ends any transaction left open, as closing a connection does
    try:
        database.execute(f"DETACH DATABASE IF EXISTS {_ATTACHED}")
    except duckdb.Error as error:
        _LOG.warning("lineage catalog: detaching failed (%s); closing its database", error)
        _KEPT.database = None
        with contextlib.suppress(duckdb.Error):
            database.close()


# -- what a reader saw last: the catalog's generation ----------------------------------------------

# Written by a connection that may change the records of every asset (a plain `connect()`).
_ALL_ASSETS: tuple[str, ...] = ("*",)
# (inode of the catalog file, writes counted in its lock file): equal tokens mean nothing was
# written in between through this class.
GenerationToken = tuple[int, int]
_COUNTER_BYTES = 8


@dataclass
class _NewestRecords:
    """An asset's newest record per partition, as read at `token`."""

    token: GenerationToken
    frame: pl.DataFrame


# (pid, catalog path) -> asset -> its newest records, valid while the generation is `token`.
_NEWEST: dict[tuple[int, str], dict[str, _NewestRecords]] = {}
_NEWEST_LOCK = threading.Lock()

_NEWEST_SQL = """
    SELECT partition,
           arg_max(materialization_id, started_at) AS materialization_id,
           arg_max(status, started_at) AS status,
           arg_max(run_id, started_at) AS run_id,
           max(started_at) AS started_at
    FROM materializations
    WHERE asset = ? AND partition {where}
    GROUP BY partition
"""


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
    lock is waited for, or how long a DuckLake commit conflict is retried. pending_wait_s: how
    long a reader waits for a partition another live step of this machine is writing
    (`read_versions`).
    """

    def __init__(
        self,
        path: Path | str,
        lock_timeout_s: float = 300.0,
        data_path: str | None = None,
        pending_wait_s: float = 3600.0,
    ) -> None:
        self.lock_timeout_s = lock_timeout_s
        self.pending_wait_s = pending_wait_s
        # The generation the last access of this object found (`_generation`), or None.
        self._seen: GenerationToken | None = None
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
    def connect(
        self, read_only: bool = False, config: Mapping[str, Any] | None = None
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """A short-lived connection (schema created or migrated on first use).

        File backend: exclusive, under the file lock; `read_only` opens the file read-only
        (after creating or migrating the schema if this process has not yet, and may). A
        catalog this process may not write (`writable`: a read-only file system) is read as
        it is, without a lock file of its own where it cannot create one; writing it is a
        `CatalogConfigError`. A file DuckDB finds damaged raises `CatalogDamagedError`, one
        another program holds is waited for until `lock_timeout_s`. DuckLake: a
        cursor on this process's attached lake; no lock, commits are checked for conflicts by
        DuckLake (`read_only` is not enforced there: see `read_only_query`). `config`: DuckDB
        settings for the file's connection (ignored on DuckLake).
        """
        with self._connect(read_only, config, writes=None if read_only else _ALL_ASSETS) as con:
            yield con

    @contextmanager
    def _connect(
        self,
        read_only: bool,
        config: Mapping[str, Any] | None,
        writes: Collection[str] | None,
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """`connect`, saying what the caller may write: None (nothing: a read), the assets
        whose records it may change, or `_ALL_ASSETS`. A writer counts up the catalog's
        generation (see `_generation`), keeping this process's cached reads of the assets it
        does not write."""
        if self.is_ducklake:
            with self._lake_cursor() as con:
                yield con
            return
        assert self.path is not None
        deadline = time.monotonic() + self.lock_timeout_s
        with self._lock_file(read_only) as lock_file:
            if lock_file is not None:
                self._acquire(lock_file, deadline)
            try:
                # Once per process and file (identified by inode, so a deleted and
                # re-created catalog is set up again), not on every short read.
                if self._schema_key() not in _SCHEMA_READY:
                    self._ensure_schema_once(deadline, optional=read_only and self.path.exists())
                with self._opened(deadline, read_only=read_only, config=config) as con:
                    self._seen = self._observe_generation(writes) if lock_file is not None else None
                    try:
                        yield con
                    except duckdb.IOException as error:
                        # A damaged block is often met only when a query reads it.
                        if _damage_reported(error):
                            raise self._damaged(error) from error
                        raise
            finally:
                if lock_file is not None:
                    fcntl.flock(lock_file, fcntl.LOCK_UN)

    def _lock_path(self) -> Path:
        assert self.path is not None
        return self.path.with_name(self.path.name + ".lock")

    def _generation(self, locked: bool) -> GenerationToken | None:
        """The catalog's generation: (its file's inode, the writes counted in its lock file).

        `locked`: the caller holds the lock file. Otherwise it is read under a shared lock
        taken without waiting; None while a writer holds it (or where there is no lock file
        to read: a read-only home), which readers take as "may have changed".
        """
        if self.path is None:
            return None
        try:
            fd = os.open(self._lock_path(), os.O_RDONLY)
        except OSError:
            return None
        try:
            if not locked:
                try:
                    fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
                except BlockingIOError:
                    return None
            counted = os.pread(fd, _COUNTER_BYTES, 0)
            inode = os.stat(self.path).st_ino
        except OSError:
            return None
        finally:
            os.close(fd)  # also lets go of the shared lock
        return inode, int.from_bytes(counted.ljust(_COUNTER_BYTES, b"\0"), "little")

    def _observe_generation(self, writes: Collection[str] | None) -> GenerationToken | None:
        """Under the lock, with the file open: the generation now. A writer (`writes`: the
        assets whose records it may change) first counts one more write, so every reader
        sees that something changed; this process's cached reads of assets it does not write
        stay valid (they were valid just before, and it writes nothing of theirs)."""
        token = self._generation(locked=True)
        if token is None or writes is None:
            return token
        written = (token[0], token[1] + 1)
        fd = os.open(self._lock_path(), os.O_RDWR)
        try:
            os.pwrite(fd, written[1].to_bytes(_COUNTER_BYTES, "little"), 0)
        finally:
            os.close(fd)
        with _NEWEST_LOCK:
            cached = _NEWEST.get(self._cache_key(), {})
            for asset, entry in list(cached.items()):
                if entry.token == token and asset not in writes and writes is not _ALL_ASSETS:
                    entry.token = written
                else:
                    del cached[asset]
        return written

    def _cache_key(self) -> tuple[int, str]:
        return os.getpid(), str(self.path)

    def writable(self) -> bool:
        """Whether this process may write the catalog file and its folder (where DuckDB puts
        its write-ahead log). False on a read-only file system or for a catalog owned by
        someone else; a catalog not created yet counts as writable (creating it says more)."""
        assert self.path is not None
        folder = self.path.parent
        if not folder.exists():
            return True
        if self.path.exists() and not os.access(self.path, os.W_OK):
            return False
        return os.access(folder, os.W_OK)

    @contextmanager
    def _lock_file(self, read_only: bool) -> Iterator[Any]:
        """The open lock file beside the catalog (`<catalog>.lock`), or None for a reader that
        can neither create it nor open it.

        A writer that cannot create it gets a `CatalogConfigError` naming the folder. A
        reader opens an existing lock file read-only (an exclusive `flock` needs no write
        access), so it still takes turns with this machine's writers; where there is none
        (a read-only file system, where nobody writes), it reads without: DuckDB's own lock
        on the file still keeps a reader and a writer of other processes apart.
        """
        assert self.path is not None
        lock_path = self.path.with_name(self.path.name + ".lock")
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            lock_file = open(lock_path, "a+")  # noqa: SIM115  (closed below)
        except OSError as error:
            if error.errno not in _NOT_WRITABLE_ERRNOS:
                raise
            if not read_only:
                raise CatalogConfigError(
                    f"lineage catalog {self.path} cannot be written here ({error.strerror}): "
                    "its folder is read-only for this user; reading it still works "
                    "(`megapairs lineage`, `megapairs status`); to run the pipeline, copy the "
                    "home to a folder you can write and point MEGAPAIRS_HOME there"
                ) from error
            try:
                lock_file = open(lock_path)  # noqa: SIM115  (closed below)
            except FileNotFoundError:
                lock_file = None
        try:
            yield lock_file
        finally:
            if lock_file is not None:
                lock_file.close()

    def _ensure_schema_once(self, deadline: float, optional: bool) -> None:
        """Create or migrate the schema. `optional` (a reader of an existing file): skip it
        when another program holds the file, so a report still reads beside a DuckDB session
        left open (readers may share the file; a writer may not)."""
        if optional and not self.writable():
            return  # an archived catalog is read as it is
        try:
            # A reader of an existing file tries once: another program holding it is no
            # reason to wait here.
            opened = self._opened(deadline, wait=not optional)
            con = opened.__enter__()
        except duckdb.IOException:
            if optional:
                return
            raise
        try:
            self._ensure_schema(con)
        except duckdb.IOException as error:
            if _damage_reported(error):
                raise self._damaged(error) from error
            raise
        finally:
            opened.__exit__(None, None, None)
        _SCHEMA_READY.add(self._schema_key())

    def _schema_key(self) -> tuple[str, int, frozenset[RowTable]]:
        assert self.path is not None
        inode = os.stat(self.path).st_ino if self.path.exists() else -1
        return (str(self.path), inode, _tables_key())

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
        _set_schema_version(con)
        _ensure_views_and_docs(lambda work: work(con))

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

    @contextmanager
    def _opened(
        self,
        deadline: float,
        read_only: bool = False,
        config: Mapping[str, Any] | None = None,
        wait: bool = True,
    ) -> Iterator[duckdb.DuckDBPyConnection]:
        """The catalog file open for one access (the caller holds the lock file).

        Attached to this thread's kept in-memory DuckDB and detached on leaving, which
        checkpoints it and releases the file as closing a connection does. A connection that
        needs settings of its own (`config`, a user's sandboxed query), or one opened while
        this thread already has a catalog attached, gets a database of its own, as before.
        `wait`: wait for another program holding the file (until `deadline`).
        """
        kept = None if config or _kept_in_use() else _kept_database()
        con = self._open(deadline, read_only=read_only, config=config, into=kept, wait=wait)
        if kept is None:
            try:
                yield con
            finally:
                con.close()
            return
        _KEPT.in_use = True
        try:
            yield con
        finally:
            _KEPT.in_use = False
            _detach(kept, con)

    def _open(
        self,
        deadline: float,
        read_only: bool = False,
        config: Mapping[str, Any] | None = None,
        into: duckdb.DuckDBPyConnection | None = None,
        wait: bool = True,
    ) -> duckdb.DuckDBPyConnection:
        """A connection to the file: its own database, or `into` with the file attached as
        `_ATTACHED` (a cursor whose default database it is)."""
        # Another program (not ours, so not holding our lock) may have the file open: a DuckDB
        # shell or notebook, even read-only, keeps every writer out until it closes.
        warn_at = time.monotonic() + _HELD_WARNING_AFTER_S
        while True:
            try:
                if into is None:
                    return duckdb.connect(
                        str(self.path), read_only=read_only, config=dict(config or {})
                    )
                return _attach(into, str(self.path), read_only)
            except duckdb.BinderException as error:
                if _SAME_FILE_ATTACHED not in str(error):
                    raise
                raise CatalogBusyError(
                    f"lineage catalog {self.path} is already open in this process with other "
                    f"settings ({_first_line(error)}); close that DuckDB connection, or query "
                    "through LineageCatalog.read_only_query / open a snapshot instead"
                ) from error
            except duckdb.ConnectionException as error:
                # This very process holds the file with other settings (a notebook's own
                # `duckdb.connect(path, read_only=True)`): waiting cannot help.
                raise CatalogBusyError(
                    f"lineage catalog {self.path} is already open in this process with other "
                    f"settings ({error}); close that DuckDB connection, or query through "
                    "LineageCatalog.read_only_query / open a snapshot instead"
                ) from error
            except duckdb.IOException as error:
                if _LOCK_CONFLICT not in str(error):
                    raise self._unopenable(error, read_only) from error
                if not wait:
                    raise
                held_by = str(error).split(". ")[0]
                if time.monotonic() > deadline:
                    raise CatalogBusyError(
                        f"lineage catalog {self.path} is held by another program: {held_by}. "
                        "Close other DuckDB sessions on this file (for long reads open a "
                        "copy: `megapairs lineage --snapshot PATH`)."
                    ) from error
                if warn_at is not None and time.monotonic() > warn_at:
                    print(
                        f"megapairs: waiting up to {self.lock_timeout_s:.0f} s for lineage "
                        f"catalog {self.path}: {held_by}. Close that DuckDB session; read a "
                        "copy instead (`megapairs lineage --snapshot PATH`).",
                        file=sys.stderr,
                        flush=True,
                    )
                    warn_at = None
                time.sleep(0.1)

    def _unopenable(self, error: duckdb.IOException, read_only: bool) -> CatalogConfigError:
        """The error for a catalog file DuckDB refused for a reason other than another
        program's lock: the file system refused it (permissions, a read-only or full disk),
        or the file itself is damaged."""
        text = _first_line(error)
        if any(reason in text for reason in _FILE_SYSTEM_REFUSALS):
            how = "read" if read_only else "opened for writing"
            return CatalogConfigError(
                f"lineage catalog {self.path} cannot be {how} here: {text}. Free the disk or fix "
                "the permissions, or point MEGAPAIRS_HOME at a folder you can write"
            )
        return self._damaged(error)

    def _damaged(self, error: duckdb.Error) -> CatalogDamagedError:
        return CatalogDamagedError(
            f"lineage catalog {self.path} is damaged (DuckDB: {_first_line(error)}). Restore "
            f"it from a backup, or move it aside (mv {self.path} {self.path}.damaged): the "
            "next run starts a new catalog, the tables under the data root stay, and "
            "re-materializing them (e.g. `megapairs demo`) records their lineage again; "
            "the lineage history in the damaged file is lost"
        )

    # -- reading from outside a step --------------------------------------------------------

    def read_only_query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Run a user's query without letting it change the catalog or touch anything else,
        and return its rows.

        The text must be one SELECT (or EXPLAIN, DESCRIBE, SHOW) statement, else
        `ReadOnlyQueryError`. It then runs on a connection of its own that cannot write and
        cannot reach files, other databases or extensions (DuckDB's `enable_external_access`
        off, configuration locked; a refused access raises `duckdb.PermissionException`).
        File backend: the file opened read-only under the lock, held for the query only, so a
        running pipeline waits milliseconds, not for a whole session. DuckLake: the lake
        attached READ_ONLY on a fresh in-memory DuckDB whose only readable paths are the
        lake's data files, inside a transaction that is rolled back.
        """
        require_one_read_statement(sql)
        if not self.is_ducklake:
            with self.connect(read_only=True, config=_SANDBOX_CONFIG) as con:
                return con.execute(sql, params or []).pl()
        assert self.url is not None and self.data_path is not None
        if self._lake_key() in _LAKES and not self.url.startswith(DUCKLAKE_PREFIX + "postgres:"):
            # A lake whose metadata is a local file (tests, a laptop) already attached by this
            # process cannot be attached a second time: query it as it is, in a transaction
            # that is rolled back (the one-read-statement rule above still holds).
            with self._lake_cursor() as cursor:
                cursor.execute("BEGIN TRANSACTION")
                try:
                    return cursor.execute(sql, params or []).pl()
                finally:
                    _rollback_quietly(cursor)
        con = _attach_lake(self.url, self.data_path, read_only=True)
        try:
            # Only now, after the extensions are loaded and Postgres reached: from here on
            # the connection reads the lake's data files and nothing else.
            con.execute(
                f"SET allowed_directories = [{_sql_literal(self.data_path)}]; "
                "SET enable_external_access = false; "
                "SET lock_configuration = true"
            )
            con.execute(f"USE {_LAKE_ALIAS}")
            con.execute("BEGIN TRANSACTION")
            try:
                return con.execute(sql, params or []).pl()
            finally:
                _rollback_quietly(con)
        finally:
            con.close()

    def snapshot(self, destination: Path | str) -> Path:
        """A consistent copy of the catalog file, for sessions that keep it open.

        Taken under the lock after a checkpoint (so the copy needs no write-ahead log); a
        running pipeline waits only for the copy. Open it with `duckdb.connect(path,
        read_only=True)` for as long as you like. A DuckLake catalog takes no file lock and
        needs no snapshot.
        """
        if self.is_ducklake:
            shipped = _shipped_ducklake_extension()
            load = f"LOAD '{shipped}'; " if shipped else "INSTALL ducklake; LOAD ducklake; "
            raise CatalogConfigError(
                f"{self.location} is a DuckLake catalog: readers never block its writers, so "
                'no snapshot is needed: query it with `megapairs lineage --sql "..."`, or in '
                f"duckdb attach it directly ({load}ATTACH '{redact(self.url or '')}' AS lake "
                f"(DATA_PATH '{self.data_path}', READ_ONLY))"
            )
        assert self.path is not None
        target = Path(destination)
        if target.exists() and target.resolve() == self.path.resolve():
            raise ValueError(f"a snapshot must not overwrite the catalog itself ({target})")
        target.parent.mkdir(parents=True, exist_ok=True)
        staging = target.with_name(f".{target.name}.{uuid.uuid4().hex}.tmp")
        wal, target_wal = (p.with_name(p.name + ".wal") for p in (self.path, target))
        try:
            if self.writable():
                with self.connect() as con:
                    con.execute("CHECKPOINT")
                    shutil.copyfile(self.path, staging)
                # A log left by an earlier snapshot's session would be replayed onto this copy.
                target_wal.unlink(missing_ok=True)
            else:
                # A catalog nobody here may write (an archived home) cannot be checkpointed:
                # the copy takes its write-ahead log along, if it has one.
                with self.connect(read_only=True):
                    shutil.copyfile(self.path, staging)
                    if wal.exists():
                        shutil.copyfile(wal, target_wal)
                    else:
                        target_wal.unlink(missing_ok=True)
            os.replace(staging, target)
        finally:
            staging.unlink(missing_ok=True)
        return target

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
            # Each view in a transaction of its own: one that no longer binds is skipped
            # without undoing the tables.
            _ensure_views_and_docs(lambda work: self._with_conflict_retry(work, database))
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
        _set_schema_version(con)

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

    def _write(self, work: Any, transaction: bool, assets: Collection[str] = _ALL_ASSETS) -> Any:
        """Run a write: under the file lock (in a transaction if asked), or as one DuckLake
        transaction retried on commit conflicts. `assets`: those whose records it changes."""
        if self.is_ducklake:
            return self._with_conflict_retry(work, self._lake())
        with self._connect(read_only=False, config=None, writes=assets) as con:
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

        self._write(work, transaction=False, assets=(materialization.asset,))

    def complete(
        self,
        materialization: MaterializationRecord,
        rows: Mapping[str, pl.DataFrame] | None = None,
        abandoned_error: str | None = None,
    ) -> list[str]:
        """Fill in a begun materialization and replace its partition's rows, in one transaction.

        `rows` maps a registered row table name to a frame with that table's columns except
        `materialization_id`, which is filled in here. A materialization never begun is
        inserted complete.

        `abandoned_error` (file catalog only; the caller holds the partition's step lock, so
        no other attempt at it is alive on this machine): then, on the same connection, the
        partition's older `pending` records are marked failed with this error; returns their
        ids. That bookkeeping failing is logged, never raised: the commit stands.
        """
        m = materialization
        if abandoned_error is not None and self.is_ducklake:
            raise ValueError("abandoned_error: DuckLake settles older attempts apart")

        def work(con: duckdb.DuckDBPyConnection) -> None:
            con.execute(
                "DELETE FROM materializations WHERE materialization_id = ?",
                [m.materialization_id],
            )
            self._insert(con, m, STATUS_COMPLETE)
            for table, frame in (rows or {}).items():
                self._replace_rows(con, table, frame, m)

        if abandoned_error is None:
            self._write(work, transaction=True, assets=(m.asset,))
            return []

        def work_then_settle(con: duckdb.DuckDBPyConnection) -> list[str]:
            con.execute("BEGIN TRANSACTION")
            try:
                work(con)
                con.execute("COMMIT")
            except Exception:
                _rollback_quietly(con)
                raise
            try:
                return self._settle_older(con, m, abandoned_error)
            except duckdb.Error as error:
                _LOG.warning(
                    "%s[%s]: could not settle older attempts: %s", m.asset, m.partition, error
                )
                return []

        return self._write(work_then_settle, transaction=False, assets=(m.asset,))

    @staticmethod
    def _settle_older(
        con: duckdb.DuckDBPyConnection, m: MaterializationRecord, error: str
    ) -> list[str]:
        """Mark failed the `pending` records of (asset, partition) begun no later than `m`."""
        rows = con.execute(
            "UPDATE materializations SET status = ?, error = coalesce(error, ?) "
            "WHERE asset = ? AND partition IS NOT DISTINCT FROM ? AND status = ? "
            "AND materialization_id <> ? AND started_at <= ? RETURNING materialization_id",
            [
                STATUS_FAILED,
                error[:_MAX_ERROR_CHARS],
                m.asset,
                m.partition,
                STATUS_PENDING,
                m.materialization_id,
                m.started_at,
            ],
        ).fetchall()
        return sorted(row[0] for row in rows)

    def fail(
        self,
        materialization_id: str,
        error: str | None = None,
        duration_s: float | None = None,
    ) -> None:
        """Mark a begun materialization failed (its step raised): its outputs are not trusted.

        `error`: what the step raised (kept, cut to a few thousand characters, for readers of
        the catalog); `duration_s`: how long it ran before failing.
        """
        detail = error[:_MAX_ERROR_CHARS] if error else None
        self._write(
            lambda con: con.execute(
                "UPDATE materializations SET status = ?, error = coalesce(?, error), "
                "duration_s = coalesce(?, duration_s) WHERE materialization_id = ?",
                [STATUS_FAILED, detail, duration_s, materialization_id],
            ),
            transaction=False,
        )

    def settle_pending(self, materialization_ids: Sequence[str], error: str) -> list[str]:
        """Mark failed those of `materialization_ids` still `pending` (attempts known to have
        ended without completing); a record that completed meanwhile is left as it is.
        Returns the ids it marked."""
        if not materialization_ids:
            return []
        ids = list(materialization_ids)
        placeholders = ", ".join("?" for _ in ids)

        def work(con: duckdb.DuckDBPyConnection) -> list[str]:
            still_pending = [
                row[0]
                for row in con.execute(
                    f"SELECT materialization_id FROM materializations WHERE status = ? "
                    f"AND materialization_id IN ({placeholders})",
                    [STATUS_PENDING, *ids],
                ).fetchall()
            ]
            if still_pending:
                marks = ", ".join("?" for _ in still_pending)
                con.execute(
                    f"UPDATE materializations SET status = ?, error = coalesce(error, ?) "
                    f"WHERE status = ? AND materialization_id IN ({marks})",
                    [STATUS_FAILED, error[:_MAX_ERROR_CHARS], STATUS_PENDING, *still_pending],
                )
            return still_pending

        return self._write(work, transaction=True)

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
            "output_paths, started_at, duration_s, status, failed_checks) "
            "VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
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
                ", ".join(m.failed_checks) or None,
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
                    f"DELETE FROM {table.name} WHERE {table.partition_column} {IN_IDS}",
                    [id_list(partitions)],
                )
                removed += before - con.execute(f"SELECT count(*) FROM {table.name}").fetchone()[0]
            live = con.execute(
                "SELECT asset, partition FROM materializations "
                f"WHERE asset {IN_IDS} AND partition {IN_IDS} "
                "GROUP BY asset, partition HAVING arg_max(status, started_at) <> ?",
                [id_list(assets), id_list(partitions), STATUS_RETIRED],
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
        """Run a read query and return a polars frame (read-only on a catalog this process
        may not write: an archived home on a read-only file system)."""
        return self._query_at(sql, params)[0]

    def _query_at(
        self, sql: str, params: list[Any] | None = None
    ) -> tuple[pl.DataFrame, GenerationToken | None]:
        """`query`, and the generation it read at (None: unknown)."""
        read_only = self.path is not None and not self.writable()
        reads = all(s.type in _READ_STATEMENT_TYPES for s in duckdb.extract_statements(sql))
        with self._connect(read_only, None, writes=None if reads else _ALL_ASSETS) as con:
            return con.execute(sql, params or []).pl(), self._seen

    def schema_version(self) -> int:
        """The catalog's schema version (1: a catalog from before versions were recorded)."""
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

    def partitions_failing_checks(self, asset: str) -> dict[str, str]:
        """The current partitions of `asset` whose newest record completed but failed blocking
        asset checks, and which checks. Readers that combine shards leave them out (and say
        so) until a clean re-materialization: Dagster stops a failing check's dependants only
        within its own run."""
        frame = self.query(
            "SELECT partition, arg_max_null(failed_checks, started_at) AS failed_checks "
            "FROM materializations WHERE asset = ? AND partition IS NOT NULL "
            "GROUP BY partition HAVING arg_max(status, started_at) = ? ORDER BY partition",
            [asset, STATUS_COMPLETE],
        )
        return {
            partition: checks
            for partition, checks in zip(
                frame["partition"].to_list(), frame["failed_checks"].to_list(), strict=True
            )
            if checks
        }

    def partitions_to_combine(self, asset: str) -> tuple[list[str], dict[str, str]]:
        """For a reader that combines every shard of `asset` (training, held-out scores): the
        current partitions that passed their blocking checks, and the ones held back (partition
        -> the checks it failed)."""
        held_back = self.partitions_failing_checks(asset)
        usable = [p for p in self.current_partitions(asset) if p not in held_back]
        return usable, held_back

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
            f"""
            SELECT partition, arg_max(materialization_id, started_at) AS materialization_id
            FROM materializations
            WHERE asset = ? AND partition {IN_IDS} AND status = 'complete'
            GROUP BY partition
            """,
            [asset, id_list(partitions)],
        )
        return dict(
            zip(frame["partition"].to_list(), frame["materialization_id"].to_list(), strict=True)
        )

    def read_versions(self, asset: str, partitions: list[str]) -> dict[str, str]:
        """The materialization id behind each partition's table on disk, for a reader.

        Raises `IncompleteCommitError` naming the partitions whose newest materialization is
        pending or failed (a step killed or failed after it may have replaced the table), and
        leaves out partitions never materialized. A pending partition that a live step of
        this machine is still writing (it holds the partition's lock, see
        `partition_lock_path`: another run of the same home) is waited for, saying so on
        stderr, for up to `pending_wait_s`; the error comes only when the writer has ended
        without completing it (killed) or the wait runs out.
        """
        return self._read_versions_at(asset, partitions)[0]

    def _read_versions_at(
        self, asset: str, partitions: list[str]
    ) -> tuple[dict[str, str], GenerationToken | None]:
        """`read_versions`, and the generation its answer holds at (None: unknown)."""
        if not partitions:
            return {}, None
        deadline = time.monotonic() + self.pending_wait_s
        announced: set[str] = set()
        second_look = False
        while True:
            frame, token = self._newest_records(asset, partitions)
            retired = frame.filter(pl.col("status") == STATUS_RETIRED)["partition"].to_list()
            if retired:
                raise IncompleteCommitError(
                    f"{asset}: {', '.join(retired)} left the corpus (retired), so its table is "
                    "no longer part of the dataset; materialize the shard again if it is back"
                )
            unfinished = frame.filter(pl.col("status") != STATUS_COMPLETE)
            if not unfinished.height:
                versions = dict(
                    zip(
                        frame["partition"].to_list(),
                        frame["materialization_id"].to_list(),
                        strict=True,
                    )
                )
                return versions, token
            writing = [
                row
                for row in unfinished.iter_rows(named=True)
                if row["status"] == STATUS_PENDING and self.being_written(asset, row["partition"])
            ]
            live = {row["partition"] for row in writing}
            ended = unfinished.filter(~pl.col("partition").is_in(list(live)))
            if ended.height:
                if not second_look and not ended.filter(pl.col("status") == STATUS_FAILED).height:
                    # A writer that completed and let go of its lock between the query and the
                    # lock check looks dead: look once more before calling it so.
                    second_look = True
                    continue
                raise IncompleteCommitError(
                    f"{asset}: the newest materialization of {_listed(ended)} did not "
                    "complete, so its table on disk is not trusted; re-materialize those "
                    "partitions"
                )
            second_look = False
            if time.monotonic() > deadline:
                raise IncompleteCommitError(
                    f"{asset}: {_listed(writing)} still being written by another run after "
                    f"{self.pending_wait_s:.0f} s; read it again once that run finishes"
                )
            for row in writing:
                if row["partition"] not in announced:
                    announced.add(row["partition"])
                    message = (
                        f"megapairs: {asset}[{row['partition']}] is being written by run "
                        f"{(row['run_id'] or '?')[:8]} (pending since {row['started_at']}); "
                        f"waiting up to {self.pending_wait_s:.0f} s for it to finish"
                    )
                    _LOG.info(message)
                    print(message, file=sys.stderr, flush=True)
            time.sleep(_PENDING_POLL_S)

    def _newest_records(
        self, asset: str, partitions: list[str]
    ) -> tuple[pl.DataFrame, GenerationToken | None]:
        """Each partition's newest record (materialization_id, status, run_id, started_at),
        and the generation it was read at (None: unknown).

        File catalog: the newest records of all the asset's partitions are read at once and
        kept for this process, and answer again while the catalog's generation says nothing
        was written since but by this process to other assets: a step reading its upstream
        partition for each of its shards opens the catalog once, not once per shard.
        """
        if self.path is None:
            frame = self.query(_NEWEST_SQL.format(where=IN_IDS), [asset, id_list(partitions)])
            return frame, None
        now = self._generation(locked=False)
        with _NEWEST_LOCK:
            cached = _NEWEST.get(self._cache_key(), {}).get(asset)
        if now is not None and cached is not None and cached.token == now:
            frame, token = cached.frame, now
        else:
            frame, token = self._query_at(_NEWEST_SQL.format(where="IS NOT NULL"), [asset])
            if token is not None:
                with _NEWEST_LOCK:
                    _NEWEST.setdefault(self._cache_key(), {})[asset] = _NewestRecords(token, frame)
        return frame.filter(pl.col("partition").is_in(partitions)), token

    def unchanged_since(self, token: GenerationToken | None) -> bool:
        """Whether nothing was written to the catalog (through this class) since an answer
        read at `token`; False when that cannot be told (DuckLake, a read-only home, a writer
        in progress)."""
        return token is not None and self._generation(locked=False) == token

    def partition_lock_path(self, asset: str, partition: str | None) -> Path | None:
        """The lock file a step holds while it materializes (asset, partition) on this machine
        (`megapairs_assets.lib.step.partition_lock`), beside a file catalog; None for
        DuckLake, whose steps run on many machines and take no such lock."""
        if self.path is None:
            return None
        digest = hashlib.blake2b((partition or "").encode(), digest_size=8).hexdigest()
        return self.path.parent / "locks" / f"{asset}-{digest}.lock"

    def being_written(self, asset: str, partition: str | None) -> bool:
        """Whether a live process of this machine holds (asset, partition)'s step lock now.

        The lock dies with its holder, so a pending record whose lock is free was left by a
        step that ended without completing it (killed). Always False on DuckLake (no lock)."""
        path = self.partition_lock_path(asset, partition)
        if path is None:
            return False
        try:
            lock_file = open(path)  # noqa: SIM115  (closed below)
        except OSError:
            return False  # never locked here (or unreadable: nothing to wait for)
        with lock_file:
            try:
                # Shared and released at once: a writer taking the lock meanwhile waits
                # microseconds.
                fcntl.flock(lock_file, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                return True
            fcntl.flock(lock_file, fcntl.LOCK_UN)
            return False

    def materializations(self, ids: list[str]) -> pl.DataFrame:
        """Materialization records by id."""
        return self.query(
            f"SELECT * FROM materializations WHERE materialization_id {IN_IDS}", [id_list(ids)]
        )

    def rows_for_ids(self, table: str, id_column: str, ids: list[str]) -> pl.DataFrame:
        """Rows of a row table whose `id_column` is in `ids` (a named read for stages)."""
        if table not in _ROW_TABLES:
            raise ValueError(f"unknown row table {table!r}")
        return self.query(f"SELECT * FROM {table} WHERE {id_column} {IN_IDS}", [id_list(ids)])


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
    before, token = catalog._read_versions_at(asset, partitions)
    if required:
        missing = sorted(set(partitions) - set(before))
        if missing:
            raise NotMaterializedError(
                f"{asset} {', '.join(missing)}: not materialized (no record in the lineage "
                f"catalog); materialize {asset} for these partitions first, or run a job that "
                "includes it (e.g. mine_and_generate)"
            )
    for _ in range(attempts):
        try:
            value = read()
        except MissingTableError:
            raise
        except FileNotFoundError as error:
            raise _missing_table(catalog, asset, before, error) from error
        # Nothing written since the versions were read: no need to open the catalog again.
        if catalog.unchanged_since(token):
            return value, before
        after, token = catalog._read_versions_at(asset, partitions)
        if after == before:
            return value, before
        before = after
    raise RuntimeError(
        f"{asset}: tables kept changing while being read ({attempts} attempts); another run is "
        "rewriting them; retry when it finishes"
    )


# -- schema version, views and comments ---------------------------------------------------------


def _set_schema_version(con: duckdb.DuckDBPyConnection) -> None:
    """Record this code's schema version, never lowering a newer one: an older release that
    opens a newer catalog adds what it knows (additively) and leaves the newer version."""
    known = con.execute("SELECT value FROM catalog_info WHERE key = 'schema_version'").fetchall()
    try:
        version = max((int(value) for (value,) in known), default=0)
    except ValueError:
        version = 0
    if version >= SCHEMA_VERSION and len(known) == 1:
        return
    # DELETE + INSERT, not INSERT OR REPLACE: DuckLake tables have no primary key.
    con.execute("DELETE FROM catalog_info WHERE key = 'schema_version'")
    con.execute(
        "INSERT INTO catalog_info VALUES ('schema_version', ?)",
        [str(max(version, SCHEMA_VERSION))],
    )


def _ensure_views_and_docs(run: Any) -> None:
    """Create the views whose tables exist and put every comment in place.

    `run(work)` runs `work(con)` on the catalog (a transaction of its own on DuckLake). A view
    is rewritten only when its definition changed (a fingerprint in `catalog_info`), and a
    comment only when it differs, so processes starting at once do not rewrite the catalog.
    A view that no longer binds (a stage renamed a column it reads) is left out with a log line:
    documentation never stops a step.
    """
    for view in VIEWS:
        try:
            created = run(lambda con, view=view: _ensure_view(con, view))
        except duckdb.Error as error:
            _LOG.warning("lineage catalog: view %s left out: %s", view.name, error)
            continue
        for column, text in view.column_docs if created else ():
            statement = f"COMMENT ON COLUMN {view.name}.{column} IS {_sql_literal(text)}"
            try:
                run(lambda con, statement=statement: con.execute(statement))
            except duckdb.Error:
                # DuckLake keeps no comments on a view's columns; the view's own comment and
                # views.py say the same.
                break
    run(_apply_table_docs)


def _view_fingerprint(view: CatalogView) -> str:
    text = json.dumps([view.sql, view.description, list(view.column_docs)])
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def _ensure_view(con: duckdb.DuckDBPyConnection, view: CatalogView) -> bool:
    """Create or replace `view` if its tables exist and it changed; True if it did."""
    relations = _relations(con)
    if not set(view.requires) <= relations:
        return False
    key, fingerprint = f"view:{view.name}", _view_fingerprint(view)
    recorded = con.execute("SELECT value FROM catalog_info WHERE key = ?", [key]).fetchall()
    if view.name in relations and recorded == [(fingerprint,)]:
        return False
    con.execute(f"CREATE OR REPLACE VIEW {view.name} AS {view.sql}")
    con.execute(f"COMMENT ON VIEW {view.name} IS {_sql_literal(view.description)}")
    con.execute("DELETE FROM catalog_info WHERE key = ?", [key])
    con.execute("INSERT INTO catalog_info VALUES (?, ?)", [key, fingerprint])
    return True


def _relations(con: duckdb.DuckDBPyConnection) -> set[str]:
    """Tables and views of the catalog's own database (not of other attached ones)."""
    return {
        name
        for (name,) in con.execute(
            "SELECT table_name FROM duckdb_tables() WHERE database_name = current_database() "
            "UNION ALL "
            "SELECT view_name FROM duckdb_views() "
            "WHERE database_name = current_database() AND NOT internal"
        ).fetchall()
    }


def schema_docs() -> dict[str, tuple[str, dict[str, str]]]:
    """table -> (description, column -> text) for the catalog's tables and declared row tables."""
    docs = {name: (text, dict(columns)) for name, (text, columns) in _CORE_DOCS.items()}
    for table in _ROW_TABLES.values():
        columns = dict(table.column_docs)
        columns.setdefault("materialization_id", _MATERIALIZATION_ID_DOC)
        docs[table.name] = (table.description, columns)
    return docs


def _apply_table_docs(con: duckdb.DuckDBPyConnection) -> None:
    """COMMENT ON each documented table and column that exists and differs."""
    tables = {
        name: comment
        for name, comment in con.execute(
            "SELECT table_name, comment FROM duckdb_tables() "
            "WHERE database_name = current_database()"
        ).fetchall()
    }
    columns = {
        (table, column): comment
        for table, column, comment in con.execute(
            "SELECT table_name, column_name, comment FROM duckdb_columns() "
            "WHERE database_name = current_database()"
        ).fetchall()
    }
    for table, (description, column_docs) in schema_docs().items():
        if table not in tables:
            continue
        if description and tables[table] != description:
            con.execute(f"COMMENT ON TABLE {table} IS {_sql_literal(description)}")
        for column, text in column_docs.items():
            if (table, column) in columns and columns[(table, column)] != text:
                con.execute(f"COMMENT ON COLUMN {table}.{column} IS {_sql_literal(text)}")


def _missing_table(
    catalog: LineageCatalog, asset: str, versions: dict[str, str], error: OSError
) -> MissingTableError:
    """The catalog says complete, the storage says gone: name the partitions, their recorded
    files that are missing (local ones can be checked), and the way out."""
    records = catalog.materializations(list(versions.values()))
    moved = _moved_data_root(records, error)
    if moved is not None:
        return MissingTableError(f"{asset}: {moved}")
    gone: list[str] = []
    for partition, paths in zip(records["partition"], records["output_paths"], strict=True):
        for path in json.loads(paths or "{}").values():
            if "://" not in str(path) and not Path(path).exists():
                gone.append(f"{partition}: {path}")
    if gone:
        what = "; ".join(sorted(gone)[:5]) + (f" and {len(gone) - 5} more" if len(gone) > 5 else "")
        partitions = sorted({line.split(":")[0] for line in gone})
    else:
        partitions = sorted(versions)
        what = f"{error} (read partitions {', '.join(partitions[:5])})"
    return MissingTableError(
        f"{asset}: a table the lineage catalog records as complete is missing: {what}. "
        f"Re-materialize {asset} for {', '.join(partitions[:5])}"
        + (f" (+{len(partitions) - 5} more)" if len(partitions) > 5 else "")
    )


def _moved_data_root(records: pl.DataFrame, error: OSError) -> str | None:
    """Where the read looked and where the catalog recorded the table differ only above the
    table's own folders: the data root moved (e.g. set one level too deep), so say so instead
    of suggesting a re-materialization. None when no recorded path explains the error."""
    text = str(getattr(error, "filename", None) or "") + " " + str(error)
    for partition, paths in zip(records["partition"], records["output_paths"], strict=True):
        for recorded in json.loads(paths or "{}").values():
            recorded = str(recorded)
            parts = recorded.rstrip("/").split("/")
            tail = "/".join(parts[-2:])  # <asset or shard>/<file>: the layout below the root
            for word in text.replace("'", " ").replace('"', " ").split():
                attempted = word.rstrip(".,;:)")
                # polars shortens a long path to "...<its end>": not where it looked, just less.
                if attempted.startswith("..."):
                    continue
                if attempted == recorded or not attempted.endswith("/" + tail):
                    continue
                common = 2
                ours, theirs = attempted.split("/"), parts
                while (
                    common < min(len(ours), len(theirs))
                    and ours[-common - 1] == theirs[-common - 1]
                ):
                    common += 1
                was, now = "/".join(theirs[:-common]), "/".join(ours[:-common])
                return (
                    f"{partition}'s table was recorded at {recorded}; the data root is now "
                    f"{now} (it was {was} then), so it reads {attempted}. Set MEGAPAIRS_DATA_ROOT "
                    "(or MEGAPAIRS_HOME) back to where the tables are, or move them; nothing "
                    "needs re-materializing"
                )
    return None


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


def _attach_lake(
    url: str, data_path: str, timeout_s: float = 60.0, read_only: bool = False
) -> duckdb.DuckDBPyConnection:
    """A new in-memory DuckDB with the lake attached as `_LAKE_ALIAS` (READ_ONLY if asked)."""
    database = duckdb.connect(config={"autoinstall_known_extensions": False})
    load_ducklake_extensions(database)
    if "://" in data_path:
        # Remote data files: load httpfs now, while loading is allowed (a read-only query's
        # connection turns extension loading off before DuckLake would autoload it).
        with contextlib.suppress(duckdb.Error):
            database.execute("LOAD httpfs")
    options = f"DATA_PATH {_sql_literal(data_path)}" + (", READ_ONLY" if read_only else "")
    statement = f"ATTACH {_sql_literal(url)} AS {_LAKE_ALIAS} ({options})"
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


def _shipped_ducklake_extension() -> Path | None:
    """The ducklake extension file the duckdb-extension-ducklake package installed for this
    duckdb (what a plain duckdb session LOADs offline), or None without the package."""
    try:
        import duckdb_extension_ducklake as module
    except ImportError:
        return None
    shipped = (
        Path(module.__file__).parent
        / "extensions"
        / f"v{duckdb.__version__}"
        / "ducklake.duckdb_extension"
    )
    return shipped if shipped.exists() else None


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
