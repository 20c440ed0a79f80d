"""The one Dagster-side helper every partitioned asset uses to run its stage's plain step.

A stage exposes a plain function `partition key -> StepResult` (megapairs_assets.lib.step).
`materialize_partitions` runs it for each partition the Dagster step covers (one, or a range
when a backfill runs many shards in one run so models load once), and for each partition:

1. records the materialization as pending in the lineage catalog before any output is written;
2. runs the plain step;
3. completes the catalog record with what it did and its row-level lineage, in one transaction
   (a failure marks it failed; a kill leaves it pending, and readers then refuse that table);
4. attaches that partition's own metadata (row count, preview, tables) to its materialization.

Check outcomes of all partitions are merged into one result per check (Dagster 1.13 takes one
result per check per step); a failure names the partitions that failed. Run totals are
reported apart, under `run_*` keys.

Each partition's materialization carries a data version made from the content it wrote
(`lib.step.content_version`), so Dagster marks downstream partitions stale when an upstream
table changed (a shard replaced in place) and not when a re-run wrote the same bytes, whatever
range the shard ran in. Dagster 1.13 gives every partition of a range step the one data version
of the step's output (dagster-io/dagster#18123), so a range step records, right after that
output, one more materialization per partition: the same metadata and provenance tags, with
the partition's own data version (the latest materialization is what staleness reads). Check
results follow those, so they describe the latest materializations. Each partition's version is
also in its metadata (`content_version`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import dagster as dg
import polars as pl

from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.quality import CheckOutcome, merged_detail
from megapairs_assets.lib.step import StepResult, content_version, run_recorded
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.orchestration.automation import FAILING_BLOCKING_CHECKS_KEY, NO_FAILURE
from megapairs_assets.orchestration.runs import run_has_ended
from megapairs_assets.orchestration.settings_version import (
    SETTINGS_VERSION_KEY,
    SettingsOf,
    settings_code_version,
    settings_hash,
)


@dataclass(frozen=True)
class Stage:
    """What Dagster needs to know about one asset's stage, declared once.

    checks: blocking checks, name -> description. warning_checks: non-blocking ones (a
    failure shows as a warning and stops nothing downstream). settings: the resource settings
    that change what the stage writes (see orchestration/settings_version.py); the code
    location folds them into the asset's code version. columns: what each column of the
    stage's main table means, shown with its column schema in the UI (declared beside the
    table's schema in the stage's own module).
    """

    asset_name: str
    code_version: str
    checks: Mapping[str, str] = field(default_factory=dict)
    warning_checks: Mapping[str, str] = field(default_factory=dict)
    settings: SettingsOf | None = None
    columns: Mapping[str, str] = field(default_factory=dict)

    def check_specs(self) -> list[dg.AssetCheckSpec]:
        blocking = [
            dg.AssetCheckSpec(name, asset=self.asset_name, description=text, blocking=True)
            for name, text in self.checks.items()
        ]
        warnings = [
            dg.AssetCheckSpec(name, asset=self.asset_name, description=text, blocking=False)
            for name, text in self.warning_checks.items()
        ]
        return blocking + warnings


def materialize_partitions(
    context: dg.AssetExecutionContext,
    stage: Stage,
    step: Callable[[str], StepResult],
    catalog: LineageCatalog,
    profile: str,
    run_metadata: Mapping[str, Any] | None = None,
) -> Iterator[StepEvent]:
    """Run `step` for each partition of this Dagster step; see the module docstring.

    The work is done before this returns; what it returns is the step's events for Dagster
    (an asset returns it as it is).
    """
    partitioned = context.assets_def.partitions_def is not None
    partitions: list[str | None] = list(context.partition_keys) if partitioned else [None]
    if not partitions:
        # A range given backwards (`range_start` after `range_end`): Dagster hands the step
        # an empty range rather than refusing it.
        tags = context.run.tags
        raise dg.Failure(
            f"{stage.asset_name}: the run's partition range "
            f"{tags.get('dagster/asset_partition_range_start', '?')}.."
            f"{tags.get('dagster/asset_partition_range_end', '?')} holds no partition: is its "
            "start after its end? Give the earlier partition as "
            "dagster/asset_partition_range_start"
        )
    results: list[StepResult] = []
    versions: dict[str, str] = {}
    own_metadata: dict[str, dict[str, Any]] = {}
    started = time.perf_counter()
    # Across a range (a backfill runs up to 64 shards per step): done/total, rate and ETA in the
    # run log, whatever progress the stage itself reports within a shard (log only: the stage's
    # own bar is the one a terminal shows).
    over_range = Progress(
        len(partitions) if len(partitions) > 1 else None,
        f"{stage.asset_name} partitions",
        unit="partitions",
        log=context.log.info if len(partitions) > 1 else None,
        bar=False,
    )
    for partition in partitions:
        result = _run_one(context, stage, step, catalog, profile, partition)
        over_range.update(1)
        results.append(result)
        versions[partition or ""] = content_version(result)
        if partition is not None:
            failing_blocking = [
                o.name for o in result.outcomes if not o.passed and o.name in stage.checks
            ]
            metadata = {
                **partition_metadata(result, stage.asset_name, stage.columns),
                "content_version": versions[partition],
                # Per partition, what the step's merged check results cannot say; automation
                # holds back this partition's dependants while it is set (automation.py).
                FAILING_BLOCKING_CHECKS_KEY: ", ".join(failing_blocking) or NO_FAILURE,
            }
            own_metadata[partition] = metadata
    over_range.close()
    elapsed_s = time.perf_counter() - started
    totals: dict[str, Any] = {
        "run_partitions": len(results),
        "run_rows": sum(r.row_count for r in results),
        "run_seconds": round(elapsed_s, 2),
        **(run_metadata or {}),
    }
    if partitions == [None] and results:
        totals.update(partition_metadata(results[0], stage.asset_name, stage.columns))
    totals.update(_run_settings_metadata(context, stage))
    checks = check_results(stage, results)
    if len(versions) == 1:
        # One partition: its own figures first, then the step's (as a range's own events).
        own = next(iter(own_metadata.values()), {})
        return _single_step_events(
            dg.MaterializeResult(
                metadata={**own, **totals},
                check_results=checks,
                data_version=dg.DataVersion(next(iter(versions.values()))),
            )
        )
    return _range_step_events(context, totals, versions, checks, own_metadata)


# The event tag holding a materialization's data version (dagster's DATA_VERSION_TAG, which
# staleness reads; not exported by `dagster`).
DATA_VERSION_TAG = "dagster/data_version"

StepEvent = dg.MaterializeResult | dg.AssetMaterialization | dg.AssetCheckResult


def _single_step_events(result: dg.MaterializeResult) -> Iterator[StepEvent]:
    yield result


def _range_step_events(
    context: dg.AssetExecutionContext,
    totals: Mapping[str, Any],
    versions: Mapping[str, str],
    checks: list[dg.AssetCheckResult],
    own_metadata: Mapping[str, Mapping[str, Any]],
) -> Iterator[StepEvent]:
    """A range step's events: its output (one materialization per partition, all with one data
    version and the range's totals), then each partition again with its own data version and
    metadata (its own figures first, then the range's), then the checks.

    The second events copy the first ones' provenance tags from the instance (they are stored
    once the output is handled, before this generator resumes). Only the second events carry a
    partition's figures, thumbnails and tables: the first would store them twice per shard. A
    partition whose first event cannot be read back still gets its own version, with the
    provenance Dagster needs to compare code versions.
    """
    # Dagster gives every partition of this event one data version; the events below give each
    # its own. This one takes the last partition's, which is also what the asset's newest
    # materialization will carry: a downstream step of this run then finds the version it was
    # told equal to the asset's latest, and Dagster logs no "data version mismatch".
    yield dg.MaterializeResult(
        metadata=dict(totals), data_version=dg.DataVersion(list(versions.values())[-1])
    )
    key = context.assets_def.key
    first_events = _this_runs_materializations(context, key, list(versions))
    for partition, version in versions.items():
        event = first_events.get(partition)
        metadata = {**own_metadata.get(partition, {}), **totals, "content_version": version}
        if event is None:
            context.log.warning(
                f"{key.to_user_string()}[{partition}]: its materialization was not found to copy; "
                "recording its data version without input provenance"
            )
            code_version = context.assets_def.code_versions_by_key.get(key)
            tags = {"dagster/code_version": code_version} if code_version else {}
        else:
            tags = dict(event.tags or {})
        tags[DATA_VERSION_TAG] = version
        tags["dagster/data_version_is_user_provided"] = "true"
        yield dg.AssetMaterialization(key, partition=partition, metadata=metadata, tags=tags)
    yield from checks


def _this_runs_materializations(
    context: dg.AssetExecutionContext, key: dg.AssetKey, partitions: list[str]
) -> dict[str, dg.AssetMaterialization]:
    """partition -> the latest materialization of `key` this run recorded for it."""
    records = context.instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=key, asset_partitions=partitions),
        limit=2 * len(partitions),
    ).records
    latest: dict[str, dg.AssetMaterialization] = {}
    for record in records:  # newest first
        if record.run_id == context.run.run_id and record.partition_key not in latest:
            event = record.asset_materialization
            if event is not None and record.partition_key is not None:
                latest[record.partition_key] = event
    return latest


def _run_settings_metadata(context: dg.AssetExecutionContext, stage: Stage) -> dict[str, Any]:
    """The settings version this run wrote with, and a warning when run config made it differ
    from the code location's (Dagster records the code location's code version either way)."""
    if stage.settings is None:
        return {}
    run_version = settings_hash(stage.settings(context.resources))
    spec = context.assets_def.specs_by_key[context.assets_def.key]
    defined = spec.metadata.get(SETTINGS_VERSION_KEY)
    if defined is not None and defined != run_version:
        context.log.warning(
            f"{stage.asset_name}: this run's settings (version {run_version}) differ from the "
            f"code location's ({defined}), e.g. through run config; Dagster still shows these "
            "partitions as made with the code location's settings. Re-materialize them without "
            "the override to return to those."
        )
    return {SETTINGS_VERSION_KEY: run_version}


def _run_one(
    context: dg.AssetExecutionContext,
    stage: Stage,
    step: Callable[[str], StepResult],
    catalog: LineageCatalog,
    profile: str,
    partition: str | None,
) -> StepResult:
    # The catalog records the code version Dagster shows (stage version + settings hash), as
    # this run's settings made it: run config overrides included.
    code_version = (
        settings_code_version(stage.code_version, stage.settings(context.resources))
        if stage.settings is not None
        else stage.code_version
    )
    result = run_recorded(
        step,
        partition,
        asset=stage.asset_name,
        code_version=code_version,
        run_id=context.run.run_id,
        profile=profile,
        catalog=catalog,
        log=context.log.info,
        blocking_checks=stage.checks,
        # DuckLake: older pending attempts are settled once the shared instance says their run
        # is over (a file catalog knows it from its lock).
        run_finished=lambda run_id: run_has_ended(context.instance, run_id),
    )
    failing = [o.name for o in result.outcomes if not o.passed]
    counted = (result.row_count_label or result.row_count_key or "rows").replace("_", " ")
    context.log.info(
        f"{stage.asset_name}[{partition}]: {result.row_count} {counted}"
        + (f"; failing checks: {', '.join(failing)}" if failing else "")
    )
    return result


def partition_metadata(
    result: StepResult, asset: str, column_descriptions: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """One partition's own metadata for its materialization event, with the links from the
    Dagster event to the lineage catalog (its record id, the command that prints its chain)."""
    metadata: dict[str, Any] = {"dagster/row_count": result.row_count}
    if result.materialization_id is not None:
        metadata["lineage_materialization_id"] = result.materialization_id
        target = f"{asset}[{result.partition}]" if result.partition else asset
        metadata["lineage"] = f"megapairs lineage '{target}'"
    if result.model_ids:
        metadata["model_ids"] = dg.MetadataValue.json(dict(result.model_ids))
    if result.input_versions:
        metadata["input_versions"] = dg.MetadataValue.json(dict(result.input_versions))
    schema = _output_column_schema(result, column_descriptions or {})
    if schema is not None:
        metadata["dagster/column_schema"] = schema
    metadata.update({f"rows_{name}": int(n) for name, n in result.row_counts.items()})
    metadata.update(
        {k: round(v, 4) if isinstance(v, float) else v for k, v in result.metadata.items()}
    )
    for name, text in result.markdown.items():
        metadata[name] = dg.MetadataValue.md(text)
    if result.preview is not None:
        metadata["preview"] = preview_table(result.preview)
    for name, path in result.outputs.items():
        metadata[f"path_{name}"] = dg.MetadataValue.path(str(path))
    failing = [o.name for o in result.outcomes if not o.passed]
    metadata["failing_checks"] = ", ".join(failing) or "none"
    return metadata


def _output_column_schema(
    result: StepResult, descriptions: Mapping[str, str]
) -> dg.TableSchema | None:
    """The columns of the partition's first Parquet output, from its footer, with what each
    means (Dagster shows them on the asset page and tracks column changes); None when it
    writes no Parquet table."""
    # The stage's table, not a side table of rejects (training writes no other Parquet).
    parquet = [
        path
        for name, path in result.outputs.items()
        if str(path).endswith(".parquet") and name != "quarantine"
    ]
    if not parquet:
        return None
    try:
        with parquet[0].open("rb") as handle:
            schema = pl.read_parquet_schema(handle)
    except (OSError, ValueError, pl.exceptions.PolarsError):  # metadata never fails the asset
        return None
    return dg.TableSchema(
        columns=[
            dg.TableColumn(name, str(dtype), description=descriptions.get(name))
            for name, dtype in schema.items()
        ]
    )


_MAX_CELL_CHARS = 80


def preview_table(frame: pl.DataFrame, max_rows: int = 10) -> dg.TableMetadataValue:
    """A frame's first rows as a table the UI shows inline (Markdown hides behind a link)."""
    head = frame.head(max_rows)
    columns = [dg.TableColumn(name, _table_type(dtype)) for name, dtype in head.schema.items()]
    records = [
        dg.TableRecord({name: _table_value(value) for name, value in row.items()})
        for row in head.iter_rows(named=True)
    ]
    return dg.MetadataValue.table(records=records, schema=dg.TableSchema(columns=columns))


def _table_type(dtype: pl.DataType) -> str:
    if dtype.is_integer():
        return "int"
    if dtype.is_float():
        return "float"
    if dtype == pl.Boolean:
        return "bool"
    return "string"


def _table_value(value: Any) -> str | int | float | bool:
    if value is None:
        return "-"
    if isinstance(value, float):
        return round(value, 4)
    if isinstance(value, bool | int):
        return value
    text = ", ".join(str(v) for v in value) if isinstance(value, list) else str(value)
    # A long cell (an instruction list, a description) would make its column one word wide and
    # the table hundreds of pixels tall; the full value is in the table itself.
    return text if len(text) <= _MAX_CELL_CHARS else text[: _MAX_CELL_CHARS - 1] + "…"


def check_results(stage: Stage, results: Iterable[StepResult]) -> list[dg.AssetCheckResult]:
    """One result per declared check, merged over partitions, naming failing partitions."""
    by_check: dict[str, list[tuple[str, CheckOutcome]]] = {}
    for result in results:
        for item in result.outcomes:
            by_check.setdefault(item.name, []).append((result.partition, item))
    declared = {**stage.checks, **stage.warning_checks}
    undeclared = sorted(set(by_check) - set(declared))
    if undeclared:
        raise ValueError(f"{stage.asset_name}: outcomes for undeclared checks {undeclared}")
    check_list = []
    for name in declared:
        items = by_check.get(name, [])
        failing = [(p, o) for p, o in items if not o.passed]
        partitions = [p for p, _ in items]
        description = merged_detail(items)
        check_list.append(
            dg.AssetCheckResult(
                asset_key=stage.asset_name,
                check_name=name,
                passed=not failing,
                severity=dg.AssetCheckSeverity.WARN
                if name in stage.warning_checks
                else dg.AssetCheckSeverity.ERROR,
                description=description,
                metadata={
                    "partitions_checked": ", ".join(partitions) or "-",
                    "failing_partitions": ", ".join(p for p, _ in failing) or "-",
                    "failing_rows": sum(o.failing_rows for _, o in failing),
                    "examples": ", ".join(e for _, o in failing for e in o.examples[:5]) or "-",
                    # Machine-readable per-partition details (`megapairs check` prints them).
                    "failures_by_partition": dg.MetadataValue.json(
                        {p: o.detail for p, o in failing}
                    ),
                },
            )
        )
    return check_list
