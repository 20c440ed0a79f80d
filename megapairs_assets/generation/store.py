"""The response store: every finished model request, kept per shard so nothing is paid twice.

One SQLite file per (shard, step) under `<home>/cache/generation/<shard>/<step>.sqlite`, on
local disk even when the data root is an object store: SQLite needs a file system with locks,
and the store is a cache of responses keyed by request hash, not a table anyone reads (the
step tables are). A machine without the cache asks the model again for what it lacks, and
the same request key gives the same row. Parallel steps work on different shards, so no file
ever has two writers, and SQLite in WAL mode with `synchronous=FULL` makes each committed
batch durable: a process killed mid-run keeps every batch committed before the kill, and the
next run asks only for the rest.

Where the tables live apart from the home (`MEGAPAIRS_DATA_ROOT`: a shared folder or an object
store, as on a cluster, where each step may run in a fresh pod), the store is mirrored beside
them (`DataLayout.shared_cache_file`): a consistent snapshot (SQLite's backup API) is uploaded
in one atomic write at most every `MIRROR_EVERY_S` seconds while requests settle and once when
a step's requests are settled, and a store opened on a machine merges the mirror in first
(an `ok` answer wins over a failure), so a retried or rescheduled step asks the model only for
what no machine has answered yet.

The store is only a cache: a damaged file (`database disk image is malformed`: a disk fault, a
file cut short by a full disk or a copy) is moved aside as `<name>.corrupt-<UTC time>` (with
its `-wal`/`-shm` files), a warning names both files, and an empty store takes its place, so
the step asks the model again for what the damaged file held instead of failing every shard.

Rows are keyed by the request key (sha256 of model id, template hash, inputs, sampling
parameters and seed; see `backends.base.request_key`). A failed request keeps its attempt
count and last error; once `max_attempts` runs have failed it, it is `quarantined` and no
longer sent until released (`release_quarantined`).
"""

from __future__ import annotations

import logging
import os
import re
import sqlite3
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import closing, contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

from megapairs_assets.generation.backends.base import GenerationResult
from megapairs_assets.lib.storage import DataLayout, DataPath, write_atomic

STATUS_OK = "ok"
STATUS_FAILED = "failed"
STATUS_QUARANTINED = "quarantined"
CACHE_DIRNAME = "cache"
GENERATION_CACHE_DIRNAME = "generation"
_SAFE_NAME = re.compile(r"[^A-Za-z0-9._-]")
_LOOKUP_CHUNK = 900  # below SQLite's default bound-parameter limit
# How often a mirrored store is uploaded while requests settle: a killed pod loses at most this
# much of its answers, and a large store is not re-uploaded after every flush.
MIRROR_EVERY_S = 60.0
# (local store, mirror) -> the mirror version (size, mtime) whose rows the local store holds.
_KNOWN_MIRRORS: dict[tuple[str, str], tuple[int, float]] = {}
# SQLite's result codes for a damaged file (the low byte; extended codes add detail above it).
_CORRUPT_CODES = frozenset({sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB})
_SIDE_FILE_SUFFIXES = ("-wal", "-shm")
_LOG = logging.getLogger(__name__)
_T = TypeVar("_T")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
    key TEXT PRIMARY KEY,
    status TEXT NOT NULL,
    text TEXT,
    finish_reason TEXT,
    prompt_tokens INTEGER,
    completion_tokens INTEGER,
    attempts INTEGER NOT NULL,
    last_error TEXT,
    model_id TEXT,
    latency_s REAL,
    updated_at REAL
)
"""


def _mirror_version(mirror: DataPath) -> tuple[int, float]:
    """Size and modification time of a mirror: a changed pair means another upload."""
    info = mirror.stat()
    return int(info.st_size), float(info.st_mtime)


def open_store(
    layout: DataLayout,
    shard: str,
    step: str,
    max_attempts: int,
    log: Callable[[str], None] | None = None,
) -> ResponseStore:
    """The store of one shard and step, mirrored beside the tables when they live apart.

    log: where a warning about a damaged store goes (default: this module's logger).
    """
    mirror = layout.shared_cache_file("generation", shard, f"{_SAFE_NAME.sub('_', step)}.sqlite")
    return ResponseStore(store_path(layout, shard, step), max_attempts, mirror=mirror, log=log)


def is_corrupt(error: BaseException) -> bool:
    """Whether a SQLite error says the database file is damaged (not busy, not full)."""
    if not isinstance(error, sqlite3.DatabaseError):
        return False
    code = getattr(error, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in _CORRUPT_CODES
    text = str(error)
    return "malformed" in text or "not a database" in text


def store_path(layout: DataLayout, shard: str, step: str) -> Path:
    """Where a shard's responses for one step live: local, under the home (names made
    filesystem-safe); see the module docstring for why not under the data root."""
    return (
        layout.home
        / CACHE_DIRNAME
        / GENERATION_CACHE_DIRNAME
        / _SAFE_NAME.sub("_", shard)
        / f"{_SAFE_NAME.sub('_', step)}.sqlite"
    )


@dataclass(frozen=True)
class StoredResponse:
    """What the store knows about one request key."""

    key: str
    status: str
    text: str | None
    finish_reason: str | None
    prompt_tokens: int
    completion_tokens: int
    attempts: int
    last_error: str | None
    model_id: str | None


class ResponseStore:
    """Durable key -> response map for one shard and step; see the module docstring."""

    def __init__(
        self,
        path: Path,
        max_attempts: int = 3,
        mirror: DataPath | None = None,
        mirror_every_s: float = MIRROR_EVERY_S,
        log: Callable[[str], None] | None = None,
    ) -> None:
        if max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {max_attempts}")
        self.path = Path(path)
        self.max_attempts = max_attempts
        self.mirror = mirror
        self.mirror_every_s = mirror_every_s
        self.log = log or _LOG.warning
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._run(lambda con: con.execute(_SCHEMA))
        if mirror is not None and mirror.exists():
            # Only a mirror this process has not already taken in (or uploaded itself): a second
            # open of the same store (prefetch, then the step) downloads nothing.
            version = _mirror_version(mirror)
            if _KNOWN_MIRRORS.get((str(self.path), str(mirror))) != version:
                self._merge_mirror(mirror)
                _KNOWN_MIRRORS[(str(self.path), str(mirror))] = version
        self._mirrored_at = time.monotonic()

    def mirror_now(self) -> None:
        """Upload a consistent snapshot of the store to its mirror (no-op without one)."""
        if self.mirror is None:
            return

        def snapshot(target: Path) -> None:
            source = closing(sqlite3.connect(self.path, timeout=60.0))
            with source as origin, closing(sqlite3.connect(target)) as copy:
                origin.backup(copy)

        try:
            write_atomic(self.mirror, snapshot)
        except sqlite3.DatabaseError as error:
            if not is_corrupt(error):
                raise
            # The mirror keeps its last good snapshot; the damaged store starts afresh.
            self._replace_damaged(error)
            return
        self._mirrored_at = time.monotonic()
        _KNOWN_MIRRORS[(str(self.path), str(self.mirror))] = _mirror_version(self.mirror)

    def _merge_mirror(self, mirror: DataPath) -> None:
        """Take in the mirror's rows: new keys, and `ok` answers over local failures."""
        with tempfile.TemporaryDirectory(dir=self.path.parent) as scratch:
            copy = Path(scratch) / "mirror.sqlite"
            copy.write_bytes(mirror.read_bytes())
            problem = _damage(copy)
            if problem is not None:
                # A cache too: what it held is asked again; the next upload replaces it.
                self.log(
                    f"the shared generation cache {mirror} is damaged ({problem}); not merged "
                    "(its requests are sent to the model again, and the next upload replaces it)"
                )
                return

            def merge(con: sqlite3.Connection) -> None:
                con.execute("ATTACH DATABASE ? AS mirror", [str(copy)])
                con.execute(
                    "INSERT INTO responses SELECT * FROM mirror.responses WHERE true "
                    "ON CONFLICT(key) DO UPDATE SET status=excluded.status, text=excluded.text,"
                    " finish_reason=excluded.finish_reason,"
                    " prompt_tokens=excluded.prompt_tokens,"
                    " completion_tokens=excluded.completion_tokens,"
                    " attempts=excluded.attempts, last_error=excluded.last_error,"
                    " model_id=excluded.model_id, latency_s=excluded.latency_s,"
                    " updated_at=excluded.updated_at"
                    " WHERE excluded.status = ? AND responses.status != ?",
                    [STATUS_OK, STATUS_OK],
                )

            self._run(merge)

    def _run(self, operation: Callable[[sqlite3.Connection], _T]) -> _T:
        """Run `operation` in one transaction; on a damaged store, set the file aside (see
        the module docstring) and run it once more on a new, empty store."""
        try:
            with self._connect() as con:
                return operation(con)
        except sqlite3.DatabaseError as error:
            if not is_corrupt(error):
                raise
            self._replace_damaged(error)
        with self._connect() as con:
            return operation(con)

    def _replace_damaged(self, error: sqlite3.DatabaseError) -> None:
        """Move the damaged store (and its WAL files) aside and create an empty one."""
        stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
        aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}")
        number = 1
        while aside.exists():
            number += 1
            aside = self.path.with_name(f"{self.path.name}.corrupt-{stamp}-{number}")
        os.replace(self.path, aside)
        for suffix in _SIDE_FILE_SUFFIXES:
            side = self.path.with_name(self.path.name + suffix)
            if side.exists():  # beside the moved file, under the name SQLite looks for
                os.replace(side, aside.with_name(aside.name + suffix))
        self.log(
            f"the generation cache {self.path} is damaged ({error}); moved it to {aside} and "
            "started an empty one: the requests it held are sent to the model again"
        )
        with self._connect() as con:
            con.execute(_SCHEMA)

    @contextmanager
    def _connect(self) -> Iterator[sqlite3.Connection]:
        with closing(sqlite3.connect(self.path, timeout=60.0)) as con:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
            with con:  # one transaction: committed on success, rolled back on error
                yield con

    def get(self, keys: Iterable[str]) -> dict[str, StoredResponse]:
        """Stored rows for the keys that have one."""
        unique = list(dict.fromkeys(keys))

        def lookup(con: sqlite3.Connection) -> dict[str, StoredResponse]:
            found: dict[str, StoredResponse] = {}
            for start in range(0, len(unique), _LOOKUP_CHUNK):
                chunk = unique[start : start + _LOOKUP_CHUNK]
                marks = ",".join("?" * len(chunk))
                rows = con.execute(
                    "SELECT key, status, text, finish_reason, prompt_tokens, completion_tokens,"
                    f" attempts, last_error, model_id FROM responses WHERE key IN ({marks})",
                    chunk,
                )
                for row in rows:
                    found[row[0]] = StoredResponse(*row)
            return found

        return self._run(lookup)

    def record(self, results: Sequence[GenerationResult]) -> None:
        """Persist a batch of results in one transaction (successes replace failures)."""
        if not results:
            return
        now = time.time()

        def store(con: sqlite3.Connection) -> None:
            for result in results:
                if result.error is None:
                    con.execute(
                        "INSERT INTO responses VALUES (?,?,?,?,?,?,?,?,?,?,?) "
                        "ON CONFLICT(key) DO UPDATE SET status=excluded.status,"
                        " text=excluded.text, finish_reason=excluded.finish_reason,"
                        " prompt_tokens=excluded.prompt_tokens,"
                        " completion_tokens=excluded.completion_tokens,"
                        " attempts=responses.attempts + 1, last_error=NULL,"
                        " model_id=excluded.model_id, latency_s=excluded.latency_s,"
                        " updated_at=excluded.updated_at",
                        [
                            result.key,
                            STATUS_OK,
                            result.text,
                            result.finish_reason,
                            result.prompt_tokens,
                            result.completion_tokens,
                            1,
                            None,
                            result.model_id,
                            result.latency_s,
                            now,
                        ],
                    )
                else:
                    con.execute(
                        "INSERT INTO responses VALUES (?,?,NULL,NULL,0,0,1,?,?,?,?) "
                        "ON CONFLICT(key) DO UPDATE SET attempts=responses.attempts + 1,"
                        " last_error=excluded.last_error, latency_s=excluded.latency_s,"
                        " updated_at=excluded.updated_at,"
                        " status=CASE WHEN responses.attempts + 1 >= ? THEN ? ELSE ? END"
                        " WHERE responses.status != ?",
                        [
                            result.key,
                            STATUS_QUARANTINED if self.max_attempts <= 1 else STATUS_FAILED,
                            result.error,
                            result.model_id,
                            result.latency_s,
                            now,
                            self.max_attempts,
                            STATUS_QUARANTINED,
                            STATUS_FAILED,
                            STATUS_OK,
                        ],
                    )

        self._run(store)
        self._mirror_if_due()

    def _mirror_if_due(self) -> None:
        if self.mirror is not None and time.monotonic() - self._mirrored_at >= self.mirror_every_s:
            self.mirror_now()

    def release_quarantined(self) -> int:
        """Give quarantined requests a fresh set of attempts; returns how many."""
        return self._run(
            lambda con: (
                con.execute(
                    "UPDATE responses SET status=?, attempts=0 WHERE status=?",
                    [STATUS_FAILED, STATUS_QUARANTINED],
                ).rowcount
            )
        )

    def counts(self) -> dict[str, int]:
        """Rows per status (for metadata and tests)."""
        rows = self._run(
            lambda con: con.execute(
                "SELECT status, count(*) FROM responses GROUP BY status"
            ).fetchall()
        )
        return {status: int(count) for status, count in rows}


def _damage(path: Path) -> str | None:
    """What is wrong with the SQLite file at `path` (a full quick check), or None if sound."""
    try:
        with closing(sqlite3.connect(path)) as con:
            verdict = con.execute("PRAGMA quick_check").fetchall()
    except sqlite3.DatabaseError as error:
        if not is_corrupt(error):
            raise
        return str(error)
    if verdict == [("ok",)]:
        return None
    return "; ".join(str(row[0]) for row in verdict[:3])
