"""Small helpers shared by the Dagster wiring of every stage (the only Dagster-aware helpers).

Stage logic returns plain `CheckOutcome`s, frames and counts; these helpers turn them into
asset-check results and UI metadata, and record each materialization in the lineage catalog.
"""

from __future__ import annotations

import base64
import io
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import polars as pl

from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)
from megapairs_assets.quality import CheckOutcome


def check_specs(
    asset_name: str, names: Mapping[str, str], blocking: bool
) -> list[dg.AssetCheckSpec]:
    """Check specs for an asset from {check name: description}."""
    return [
        dg.AssetCheckSpec(name, asset=asset_name, description=text, blocking=blocking)
        for name, text in names.items()
    ]


def merge_outcomes(outcomes: Iterable[CheckOutcome]) -> list[CheckOutcome]:
    """Combine outcomes of the same check over several partitions into one per check."""
    merged: dict[str, list[CheckOutcome]] = {}
    for item in outcomes:
        merged.setdefault(item.name, []).append(item)
    combined = []
    for name, items in merged.items():
        failing = [i for i in items if not i.passed]
        if not failing:
            combined.append(items[0])
            continue
        combined.append(
            CheckOutcome(
                name=name,
                passed=False,
                detail="; ".join(i.detail for i in failing),
                failing_rows=sum(i.failing_rows for i in failing),
                examples=tuple(e for i in failing for e in i.examples)[:5],
            )
        )
    return combined


def check_results(
    outcomes: Iterable[CheckOutcome], asset_name: str, warning_checks: Iterable[str] = ()
) -> list[dg.AssetCheckResult]:
    """Turn plain outcomes into Dagster check results (failures are errors, or warnings for
    the checks named in `warning_checks`)."""
    warnings = set(warning_checks)
    return [
        dg.AssetCheckResult(
            asset_key=asset_name,
            check_name=o.name,
            passed=o.passed,
            severity=dg.AssetCheckSeverity.WARN
            if o.name in warnings
            else dg.AssetCheckSeverity.ERROR,
            description=o.detail,
            metadata={"failing_rows": o.failing_rows, "examples": ", ".join(o.examples) or "-"},
        )
        for o in merge_outcomes(outcomes)
    ]


def markdown_table(frame: pl.DataFrame, max_rows: int = 10) -> str:
    """A small Markdown preview of a frame for the UI."""
    if frame.is_empty():
        return "_(empty)_"
    head = frame.head(max_rows)
    cells = [[_cell(v) for v in row] for row in head.rows()]
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def thumbnail_markdown(images: Sequence[Any], size_px: int = 64) -> str:
    """Inline PNG thumbnails (PIL images) as one Markdown line, for the asset's UI page."""
    parts = []
    for image in images:
        thumb = image.copy()
        thumb.thumbnail((size_px, size_px))
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(f"![thumb](data:image/png;base64,{encoded})")
    return " ".join(parts)


def partition_keys(context: dg.AssetExecutionContext) -> list[str]:
    """The shards this step covers (one, or a range when a backfill runs as one run)."""
    return list(context.partition_keys)


@dataclass
class StepRecorder:
    """Times one partition's work and records it in the lineage catalog."""

    catalog: LineageCatalog
    asset: str
    run_id: str
    code_version: str
    profile: str
    partition: str
    materialization_id: str = field(default_factory=new_materialization_id)
    _started: float = field(default_factory=time.perf_counter)
    _started_at: Any = field(default_factory=utc_now)

    def finish(
        self,
        *,
        config: Mapping[str, Any] | None = None,
        model_ids: Mapping[str, str] | None = None,
        input_versions: Mapping[str, str] | None = None,
        row_counts: Mapping[str, int] | None = None,
        output_paths: Mapping[str, str] | None = None,
        rows: Mapping[str, pl.DataFrame] | None = None,
    ) -> None:
        record = MaterializationRecord(
            asset=self.asset,
            partition=self.partition,
            run_id=self.run_id,
            code_version=self.code_version,
            profile=self.profile,
            started_at=self._started_at,
            duration_s=time.perf_counter() - self._started,
            config=config or {},
            model_ids=model_ids or {},
            input_versions=input_versions or {},
            row_counts=row_counts or {},
            output_paths=output_paths or {},
            materialization_id=self.materialization_id,
        )
        self.catalog.record(record, rows=rows)
