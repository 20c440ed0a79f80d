"""Where every asset stands, per partition, from the lineage catalog (`megapairs status`).

Plain code, no Dagster: the caller passes the partitions each asset should have (Dagster's
partition sets: a dynamic set's registered keys, a multi-partitioned asset's product of its
dimensions' keys) and the assets' order. For each asset it counts the partitions whose
newest record is complete (and of those, the ones that failed a blocking check or read an input
that has been re-materialized since), failed, pending (being written, or left by a killed step)
and retired, and the expected partitions with no record at all (missing); plus how many inputs
the asset's current materializations quarantined. `problems` lists each partition that needs
attention, with why.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field

import polars as pl

from megapairs_assets.lib.words import shortened
from megapairs_assets.lineage.catalog import LineageCatalog

# The newest record of each partition, and whether a complete one read an input version that is
# no longer its partition's newest (the input was re-materialized, failed or retired since).
_PARTITIONS_SQL = """
SELECT c.asset,
       c.partition,
       c.status,
       c.failed_checks,
       c.error,
       c.started_at,
       c.run_id,
       coalesce(bool_or(i.input_is_current = FALSE), FALSE) AS inputs_changed
FROM current_materializations AS c
LEFT JOIN materialization_inputs AS i ON i.materialization_id = c.materialization_id
GROUP BY ALL
ORDER BY c.asset, c.partition
"""
_QUARANTINED_SQL = "SELECT stage AS asset, count(*) AS n FROM quarantine_log GROUP BY stage"
_ERROR_CHARS = 160


@dataclass
class AssetStatus:
    """One asset's partitions by state (see the module docstring)."""

    asset: str
    expected: int | None  # None: the asset's partition set is not a list we know
    complete: int = 0
    failing_checks: int = 0
    inputs_changed: int = 0
    failed: int = 0
    pending: int = 0
    retired: int = 0
    missing: int = 0
    quarantined: int = 0
    last_started_at: str | None = None
    problems: list[str] = field(default_factory=list)

    @property
    def healthy(self) -> bool:
        return not (self.failing_checks or self.failed or self.pending or self.missing)

    def as_dict(self) -> dict:
        return {**asdict(self), "healthy": self.healthy}


def partition_states(catalog: LineageCatalog) -> pl.DataFrame:
    """The newest record of each (asset, partition) with `inputs_changed` (see module)."""
    return catalog.query(_PARTITIONS_SQL)


def asset_status(
    catalog: LineageCatalog,
    assets: Sequence[str],
    expected: Mapping[str, Sequence[str] | None],
) -> list[AssetStatus]:
    """Each of `assets` (in that order; assets only the catalog knows are added after), with
    `expected[asset]` the partitions it should have (None or absent: unknown)."""
    states = partition_states(catalog)
    quarantined = dict(catalog.query(_QUARANTINED_SQL).iter_rows())
    names = list(assets) + sorted(set(states["asset"].to_list()) - set(assets))
    report = []
    for name in names:
        rows = states.filter(pl.col("asset") == name)
        wanted = expected.get(name)
        status = AssetStatus(
            asset=name,
            expected=None if wanted is None else len(wanted),
            quarantined=int(quarantined.get(name, 0)),
        )
        wanted_set = None if wanted is None else set(wanted)  # many shards: no list scans
        for row in rows.iter_rows(named=True):
            _count(status, row, wanted_set)
        if wanted is not None:
            recorded = set(rows["partition"].to_list())
            absent = [partition for partition in wanted if partition not in recorded]
            status.missing = len(absent)
            status.problems += [f"{name}[{partition}]: never materialized" for partition in absent]
        if rows.height:
            status.last_started_at = str(rows["started_at"].max())
        report.append(status)
    return report


def _count(status: AssetStatus, row: dict, wanted: set[str] | None) -> None:
    target = f"{status.asset}[{row['partition']}]" if row["partition"] else status.asset
    state = row["status"]
    if state == "retired":
        status.retired += 1
        return
    if wanted is not None and row["partition"] not in wanted:
        return  # a partition no longer in the asset's set (a removed config): not counted
    if state == "complete":
        status.complete += 1
        if row["failed_checks"]:
            status.failing_checks += 1
            status.problems.append(f"{target}: failed blocking checks {row['failed_checks']}")
        if row["inputs_changed"]:
            status.inputs_changed += 1
    elif state == "failed":
        status.failed += 1
        error = shortened((row["error"] or "no error recorded").splitlines()[0], _ERROR_CHARS)
        status.problems.append(f"{target}: failed: {error}")
    elif state == "pending":
        status.pending += 1
        status.problems.append(
            f"{target}: pending since {row['started_at']} (running now, or killed: "
            "re-materialize it)"
        )


def format_status(report: Sequence[AssetStatus]) -> str:
    """A fixed-width table, then one line per problem."""
    columns = (
        ("asset", "asset"),
        ("expected", "expected"),
        ("complete", "complete"),
        ("failing checks", "failing_checks"),
        ("inputs changed", "inputs_changed"),
        ("failed", "failed"),
        ("pending", "pending"),
        ("missing", "missing"),
        ("retired", "retired"),
        ("quarantined", "quarantined"),
    )
    cells = [
        ["-" if getattr(s, key) is None else str(getattr(s, key)) for _, key in columns]
        for s in report
    ]
    widths = [
        max(len(title), *(len(row[i]) for row in cells)) if cells else len(title)
        for i, (title, _) in enumerate(columns)
    ]
    titles = [title for title, _ in columns]
    lines = ["  ".join(title.ljust(width) for title, width in zip(titles, widths, strict=True))]
    lines += [
        "  ".join(
            cell.ljust(width) if i == 0 else cell.rjust(width)
            for i, (cell, width) in enumerate(zip(row, widths, strict=True))
        )
        for row in cells
    ]
    problems = [line for s in report for line in s.problems]
    if problems:
        lines += ["", f"{len(problems)} partition(s) need attention:"]
        lines += [f"  {line}" for line in problems]
    else:
        lines += ["", "every expected partition is complete and passed its blocking checks"]
    return "\n".join(lines)
