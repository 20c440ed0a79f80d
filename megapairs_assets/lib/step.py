"""What one partition's work returns: the plain contract between stage logic and Dagster.

Every stage exposes a plain function `(partition key, inputs...) -> StepResult`. It reads its
inputs, writes its outputs (atomically, through `DataLayout`), and says what it did. The one
Dagster-side helper (`megapairs_assets.orchestration.shard_step`) runs it for each partition
of a run, records the result in the lineage catalog, and turns it into that partition's own
materialization (row count, preview, tables) and check results. Benchmarks and tests call the
plain function directly.
"""

from __future__ import annotations

import fcntl
import hashlib
import time
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.storage import file_fingerprint
from megapairs_assets.lineage.catalog import (
    STATUS_PENDING,
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)

# What a record left `pending` by a killed attempt says once a later attempt settles it.
ABANDONED_ERROR = (
    "abandoned: its process ended (killed?) before it completed; settled by the later "
    "attempt {materialization_id}"
)


@dataclass
class StepResult:
    """One partition's work, described in plain values.

    partition: the partition key (a shard id, a checkpoint name, ...).
    outputs: name -> path of each table written.
    row_counts: name -> row count; `row_count_key` names the one shown as the row count;
      `row_count_label`, the words the step's log line puts after it (default: the key), e.g.
      "reused" for a table kept as it was, whose counts are those of the run that made it.
    config / model_ids: the settings and model ids that shaped the output (lineage).
    input_versions: "asset/partition" -> materialization id of exactly what was read.
    rows: catalog row table name -> frame of that table's rows for this partition.
    outcomes: the stage's check outcomes for this partition.
    preview: a small frame shown on the asset page.
    metadata: extra plain values for the UI (numbers, strings).
    markdown: name -> Markdown text for the UI (tables, thumbnails; see lib/preview.py).
    materialization_id: the catalog record it was committed as (set by `run_recorded`).
    """

    partition: str
    outputs: Mapping[str, Path | Any] = field(default_factory=dict)  # Path or UPath
    row_counts: Mapping[str, int] = field(default_factory=dict)
    row_count_key: str | None = None
    row_count_label: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    model_ids: Mapping[str, str] = field(default_factory=dict)
    input_versions: Mapping[str, str] = field(default_factory=dict)
    rows: Mapping[str, pl.DataFrame] = field(default_factory=dict)
    outcomes: list[CheckOutcome] = field(default_factory=list)
    preview: pl.DataFrame | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    markdown: Mapping[str, str] = field(default_factory=dict)
    materialization_id: str | None = None

    @property
    def row_count(self) -> int:
        """The partition's headline row count (the named count, else the first)."""
        if self.row_count_key is not None:
            return int(self.row_counts.get(self.row_count_key, 0))
        return int(next(iter(self.row_counts.values()), 0))


def content_version(result: StepResult) -> str:
    """A version of what one partition's step wrote: a hash over its output files' content.

    Equal when a re-run wrote the same bytes (so nothing downstream is stale), different when
    the content changed (a shard replaced in place, new model answers), whatever the run.
    """
    lines = []
    for name, path in sorted(result.outputs.items()):
        try:
            lines.append(f"{name}={file_fingerprint(path)}")
        except OSError:  # unreadable right after writing it: call it changed, never fail here
            lines.append(f"{name}=unreadable-{new_materialization_id()}")
    return hashlib.sha256("\n".join(lines).encode()).hexdigest()[:32]


def run_recorded(
    step: Callable[[str], StepResult],
    partition: str | None,
    *,
    asset: str,
    code_version: str,
    run_id: str,
    profile: str,
    catalog: LineageCatalog,
    log: Callable[[str], None] | None = None,
    blocking_checks: Collection[str] | None = None,
    run_finished: Callable[[str], bool] | None = None,
) -> StepResult:
    """Run one partition's step between a pending and a complete catalog record.

    The record is `pending` before any output is written and completed, with the step's row
    lineage, in one transaction after; a step that raises is marked failed. This is the whole
    commit protocol; the Dagster helper and the benchmarks' plain path both use it.

    Two runs of the same (asset, partition) on one machine take turns (`partition_lock`): the
    second waits, then materializes again, so the table on disk, the newest catalog record and
    the row lineage always come from the same attempt. Once the attempt ends, the `pending`
    records older attempts left (killed before they completed) are marked failed, as abandoned.
    On DuckLake (no machine-wide lock) only the older attempts whose run `run_finished` says
    has ended are settled; without it they stay pending (see `settle_abandoned`).

    The complete record names the blocking checks the partition failed (`blocking_checks`: the
    stage's blocking check names; None counts every failing outcome), so readers that combine
    shards can leave it out.
    """
    with partition_lock(catalog, asset, partition, log):
        started_at, started = utc_now(), time.perf_counter()
        record = MaterializationRecord(
            asset=asset,
            partition=partition,
            run_id=run_id,
            code_version=code_version,
            profile=profile,
            started_at=started_at,
            duration_s=0.0,
            materialization_id=new_materialization_id(),
        )
        catalog.begin(record)
        try:
            result = step(partition or "")
        except BaseException as error:
            # Kept in the catalog, so a reader learns why without the run's log.
            catalog.fail(
                record.materialization_id,
                error=f"{type(error).__name__}: {error}",
                duration_s=time.perf_counter() - started,
            )
            settle_abandoned(catalog, record, log, run_finished)
            raise
        completed = replace(
            record,
            duration_s=time.perf_counter() - started,
            config=result.config,
            model_ids=result.model_ids,
            input_versions=result.input_versions,
            row_counts=result.row_counts,
            output_paths={name: str(path) for name, path in result.outputs.items()},
            failed_checks=tuple(
                o.name
                for o in result.outcomes
                if not o.passed and (blocking_checks is None or o.name in blocking_checks)
            ),
        )
        if catalog.path is None:
            catalog.complete(completed, rows=result.rows)
            settle_abandoned(catalog, record, log, run_finished)
        else:
            # A file catalog: under the partition lock every older attempt has ended, so the
            # commit settles them on the same connection (one catalog access, not two).
            settled = catalog.complete(
                completed,
                rows=result.rows,
                abandoned_error=ABANDONED_ERROR.format(
                    materialization_id=record.materialization_id
                ),
            )
            _log_settled(record, settled, log)
        return replace(result, materialization_id=record.materialization_id)


def partition_lock_path(catalog: LineageCatalog, asset: str, partition: str | None) -> Path | None:
    """The lock file of one (asset, partition), beside a file catalog; None for DuckLake.
    The catalog knows where (its readers check whether a pending partition is being written)."""
    return catalog.partition_lock_path(asset, partition)


@contextmanager
def partition_lock(
    catalog: LineageCatalog,
    asset: str,
    partition: str | None,
    log: Callable[[str], None] | None = None,
) -> Iterator[None]:
    """Hold (asset, partition) exclusively while it is materialized on this machine.

    An OS file lock beside the catalog file: a second run of the same partition waits (saying
    so) instead of writing the same table at the same time, and a killed holder releases it
    with its process, so no lock outlives a crash. A DuckLake catalog (steps on many machines)
    takes no lock here.
    """
    path = partition_lock_path(catalog, asset, partition)
    if path is None:
        yield
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a+") as lock_file:
        try:
            fcntl.flock(lock_file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            if log is not None:
                log(f"{asset}[{partition}]: another run is materializing it; waiting for it")
            fcntl.flock(lock_file, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


def settle_abandoned(
    catalog: LineageCatalog,
    record: MaterializationRecord,
    log: Callable[[str], None] | None = None,
    run_finished: Callable[[str], bool] | None = None,
) -> list[str]:
    """Mark failed the `pending` records of older attempts at the same (asset, partition).

    File catalog: called while holding `partition_lock`, when every other attempt on this
    machine has ended, so a record still pending belongs to a process killed before it
    completed. DuckLake catalog (steps on many machines, no lock): a pending record may be a
    live step elsewhere, so only those whose run has ended are settled: an earlier attempt of
    this same run (a retried step), or a run `run_finished(run_id)` says is over (the Dagster
    instance, which every machine shares, knows); without `run_finished` they are left.
    Bookkeeping only (readers already follow the newest record), so a catalog that refuses is
    logged, not raised. Returns the ids marked.
    """
    if catalog.path is None and run_finished is None:
        return []
    error = ABANDONED_ERROR.format(materialization_id=record.materialization_id)
    try:
        older = catalog.query(
            "SELECT materialization_id, run_id FROM materializations "
            "WHERE asset = ? AND partition IS NOT DISTINCT FROM ? AND status = ? "
            "AND materialization_id <> ? AND started_at <= ?",
            [
                record.asset,
                record.partition,
                STATUS_PENDING,
                record.materialization_id,
                record.started_at,
            ],
        )
        ended = [
            materialization_id
            for materialization_id, run_id in older.iter_rows()
            if catalog.path is not None
            or run_id == record.run_id
            or (run_finished is not None and run_finished(run_id))
        ]
        settled = catalog.settle_pending(ended, error)
    except Exception as error:  # bookkeeping must never fail a finished step
        if log is not None:
            log(f"{record.asset}[{record.partition}]: could not settle older attempts: {error}")
        return []
    _log_settled(record, settled, log)
    return settled


def _log_settled(
    record: MaterializationRecord, settled: list[str], log: Callable[[str], None] | None
) -> None:
    if settled and log is not None:
        log(
            f"{record.asset}[{record.partition}]: {len(settled)} earlier attempt(s) never "
            "completed (killed); marked failed"
        )


class StepStream:
    """A stream of results, one per partition, handed out as a per-partition step.

    For stages whose partitions share one input pipeline (embeddings: one loader across
    shards), the stream yields each partition's result in the order `materialize_partitions`
    asks for them. A partition's outputs are written when its result is asked for (the stream
    is suspended in between), so `run_recorded`'s pending record still comes first. Given the
    run's `partitions`, the stream is run to its end once the last one is handed out, so what
    a generator does after its last result (a progress line, closing its loader) happens
    within the step rather than whenever the generator is collected.
    """

    def __init__(
        self, results: Iterator[StepResult], partitions: Sequence[str] | None = None
    ) -> None:
        self._results = results
        self._last = partitions[-1] if partitions else None

    def __call__(self, partition: str) -> StepResult:
        try:
            result = next(self._results)
        except StopIteration:
            raise RuntimeError(f"the step's stream ended before partition {partition!r}") from None
        if result.partition != partition:
            raise RuntimeError(
                f"the step's stream gave partition {result.partition!r} where {partition!r} "
                "was asked for: partitions must be asked for in the stream's order"
            )
        if partition == self._last:
            for extra in self._results:
                raise RuntimeError(
                    f"the step's stream gave partition {extra.partition!r} after the run's last, "
                    f"{partition!r}"
                )
        return result
