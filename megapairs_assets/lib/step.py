"""What one partition's work returns: the plain contract between stage logic and Dagster.

Every stage exposes a plain function `(partition key, inputs...) -> StepResult`. It reads its
inputs, writes its outputs (atomically, through `DataLayout`), and says what it did. The one
Dagster-side helper (`megapairs_assets.orchestration.shard_step`) runs it for each partition
of a run, records the result in the lineage catalog, and turns it into that partition's own
materialization (row count, preview, tables) and check results. Benchmarks and tests call the
plain function directly.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from megapairs_assets.lib.quality import CheckOutcome


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
    outputs: Mapping[str, Path] = field(default_factory=dict)
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
