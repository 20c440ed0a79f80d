"""What one partition's work returns: the plain contract between stage logic and Dagster.

Every stage exposes a plain function `(partition key, inputs...) -> StepResult`. It reads its
inputs, writes its outputs (atomically, through `DataLayout`), and says what it did. The one
Dagster-side helper (`megapairs_assets.orchestration.shard_step`) runs it for each partition
of a run, records the result in the lineage catalog, and turns it into that partition's own
materialization (row count, preview, tables) and check results. Benchmarks and tests call the
plain function directly.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)


@dataclass
class StepResult:
    """One partition's work, described in plain values.

    partition: the partition key (a shard id, a checkpoint name, ...).
    outputs: name -> path of each table written.
    row_counts: name -> row count; `row_count_key` names the one shown as the row count.
    config / model_ids: the settings and model ids that shaped the output (lineage).
    input_versions: "asset/partition" -> materialization id of exactly what was read.
    rows: catalog row table name -> frame of that table's rows for this partition.
    outcomes: the stage's check outcomes for this partition.
    preview: a small frame shown on the asset page.
    metadata: extra plain values for the UI (numbers, strings).
    markdown: name -> Markdown text for the UI (tables, thumbnails; see lib/preview.py).
    """

    partition: str
    outputs: Mapping[str, Path | Any] = field(default_factory=dict)  # Path or UPath
    row_counts: Mapping[str, int] = field(default_factory=dict)
    row_count_key: str | None = None
    config: Mapping[str, Any] = field(default_factory=dict)
    model_ids: Mapping[str, str] = field(default_factory=dict)
    input_versions: Mapping[str, str] = field(default_factory=dict)
    rows: Mapping[str, pl.DataFrame] = field(default_factory=dict)
    outcomes: list[CheckOutcome] = field(default_factory=list)
    preview: pl.DataFrame | None = None
    metadata: Mapping[str, Any] = field(default_factory=dict)
    markdown: Mapping[str, str] = field(default_factory=dict)

    @property
    def row_count(self) -> int:
        """The partition's headline row count (the named count, else the first)."""
        if self.row_count_key is not None:
            return int(self.row_counts.get(self.row_count_key, 0))
        return int(next(iter(self.row_counts.values()), 0))


def run_recorded(
    step: Callable[[str], StepResult],
    partition: str | None,
    *,
    asset: str,
    code_version: str,
    run_id: str,
    profile: str,
    catalog: LineageCatalog,
) -> StepResult:
    """Run one partition's step between a pending and a complete catalog record.

    The record is `pending` before any output is written and completed, with the step's row
    lineage, in one transaction after; a step that raises is marked failed. This is the whole
    commit protocol; the Dagster helper and the benchmarks' plain path both use it.
    """
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
        raise
    catalog.complete(
        replace(
            record,
            duration_s=time.perf_counter() - started,
            config=result.config,
            model_ids=result.model_ids,
            input_versions=result.input_versions,
            row_counts=result.row_counts,
            output_paths={name: str(path) for name, path in result.outputs.items()},
        ),
        rows=result.rows,
    )
    return result


class StepStream:
    """A stream of results, one per partition, handed out as a per-partition step.

    For stages whose partitions share one input pipeline (embeddings: one loader across
    shards), the stream yields each partition's result in the order `materialize_partitions`
    asks for them. A partition's outputs are written when its result is asked for (the stream
    is suspended in between), so `run_recorded`'s pending record still comes first.
    """

    def __init__(self, results: Iterator[StepResult]) -> None:
        self._results = results

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
        return result
