"""The end-of-run summary printed by `megapairs demo`: what was made, and where."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from megapairs_assets.lib.storage import DataLayout
from resources.profiles import lineage_catalog


def demo_summary(home: Path, shards: list[str]) -> dict[str, object]:
    """Counts read back from the outputs and the catalog (not from the run's own memory)."""
    layout = DataLayout(home)
    catalog = lineage_catalog(home)
    images = catalog.query(
        "SELECT count(*) AS n FROM image_lineage WHERE shard IN (SELECT unnest(?))", [shards]
    )["n"][0]
    quarantine = catalog.query(
        "SELECT stage, reason, count(*) AS n FROM quarantine_log WHERE shard IN (SELECT unnest(?)) "
        "GROUP BY ALL ORDER BY n DESC",
        [shards],
    )
    pair_files = [layout.shard_table("mined_image_pairs", s) for s in shards]
    pair_tables = [pl.read_parquet(p) for p in pair_files if p.exists()]
    pairs = pl.concat(pair_tables) if pair_tables else pl.DataFrame()
    per_source = (
        pairs.explode("sources").group_by("sources").len().sort("sources")
        if pairs.height
        else pl.DataFrame({"sources": [], "len": []})
    )
    return {
        "images": int(images),
        "quarantine": quarantine,
        "pairs": pairs.height,
        "pairs_per_source": dict(per_source.iter_rows()),
        "example_pair_id": pairs["pair_id"][0] if pairs.height else None,
        "layout": layout,
    }


def print_summary(home: Path, shards: list[str], wall_s: float, run_id: str) -> None:
    s = demo_summary(home, shards)
    layout: DataLayout = s["layout"]  # type: ignore[assignment]
    print()
    print(f"done in {wall_s:.1f} s (run {run_id})")
    print(f"  images:      {s['images']} valid across {len(shards)} shards")
    quarantine: pl.DataFrame = s["quarantine"]  # type: ignore[assignment]
    print(f"  quarantined: {int(quarantine['n'].sum()) if quarantine.height else 0}")
    for row in quarantine.iter_rows(named=True):
        print(f"    {row['stage']}: {row['reason']} x{row['n']}")
    print(f"  mined pairs: {s['pairs']}  by source: {s['pairs_per_source']}")
    print(f"  outputs:     {layout.data_dir}")
    print(f"  catalog:     {layout.catalog_path}")
    if s["example_pair_id"]:
        print(f"  trace a pair: megapairs lineage {s['example_pair_id']}")
    print("  browse:      megapairs ui   (dagster dev on workspace.yaml, same instance)")
