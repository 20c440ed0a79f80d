"""Benchmark scores as rows of the lineage catalog, and the reads built on them.

`benchmark_scores` holds the latest materialization of each (retriever, benchmark) partition:
one row per metric scored, one per skipped split (why, and the path looked at) and one per
server file written. `partition` is the Dagster multi-partition key; the catalog replaces a
partition's rows when it is scored again.
"""

from __future__ import annotations

import polars as pl

from megapairs_assets.lineage.catalog import LineageCatalog, RowTable, register_row_table

# A score row's status: scored (metrics computed), skipped (data missing) or submission (files
# for a benchmark's evaluation server written, no public answers).
STATUS_SCORED, STATUS_SKIPPED, STATUS_SUBMISSION = "scored", "skipped", "submission"

SCORES_TABLE = register_row_table(
    RowTable(
        "benchmark_scores",
        (
            ("partition", "VARCHAR"),
            ("retriever_id", "VARCHAR"),
            ("benchmark", "VARCHAR"),
            ("split", "VARCHAR"),
            ("metric", "VARCHAR"),
            ("value", "DOUBLE"),
            ("status", "VARCHAR"),
            ("detail", "VARCHAR"),
            ("gallery_version", "VARCHAR"),
            ("queries", "BIGINT"),
            ("gallery_images", "BIGINT"),
        ),
        partition_column="partition",
        description=(
            "The current scores of each (benchmark, retriever) partition: one row per metric, "
            "per skipped split and per server file written."
        ),
        column_docs=(
            ("partition", "the Dagster multi-partition key 'benchmark|retriever'"),
            ("retriever_id", "the retriever scored (checkpoint or open_clip name)"),
            ("benchmark", "benchmark family: circo, cirr, fashioniq, genecis, heldout"),
            ("split", "the split or sub-task scored"),
            ("metric", "e.g. R@1, mAP@5 (NULL on a skipped row)"),
            ("value", "the score in percent"),
            ("status", "scored, skipped or submission"),
            ("detail", "why a split was skipped, or the file written"),
            ("gallery_version", "fingerprint of the gallery embedded"),
            ("queries", "queries scored"),
            ("gallery_images", "gallery size"),
        ),
    )
)

HELDOUT_METRICS = ("R@1", "R@5", "R@10", "mAP@5")


def scores_for(catalog: LineageCatalog, benchmark_family: str) -> pl.DataFrame:
    """Every retriever's latest scored rows of one benchmark family ("circo", "heldout", ...)."""
    return catalog.query(
        f"SELECT retriever_id, benchmark, split, metric, value, queries FROM {SCORES_TABLE.name} "
        "WHERE benchmark = ? AND status = ? ORDER BY retriever_id, split, metric",
        [benchmark_family, STATUS_SCORED],
    )


def heldout_summary_lines(
    catalog: LineageCatalog, base_retriever_id: str | None = None
) -> list[str]:
    """Lines for the demo's summary: each retriever's held-out scores, the base model first.

    Empty when nothing has been scored on the held-out benchmark yet.
    """
    rows = scores_for(catalog, "heldout")
    if rows.height == 0:
        return []
    lines = []
    retrievers = sorted(set(rows["retriever_id"]), key=lambda r: (r != base_retriever_id, r))
    for retriever_id in retrievers:
        mine = rows.filter(pl.col("retriever_id") == retriever_id)
        value = dict(zip(mine["metric"], mine["value"], strict=True))
        figures = ", ".join(f"{m} {value[m]:.1f}" for m in HELDOUT_METRICS if m in value)
        role = "base" if retriever_id == base_retriever_id else "trained"
        lines.append(
            f"held-out scores ({role} {retriever_id}, {int(mine['queries'][0])} queries): {figures}"
        )
    return lines
