"""The demo summary counts pairs for every configured source, a source that mined none too."""

from __future__ import annotations

from pathlib import Path

import polars as pl

from megapairs_assets.cli.summary import mining_summary
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog


def test_a_source_with_no_pairs_is_counted_as_zero(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path)
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    pairs = pl.DataFrame(
        {
            "pair_id": ["p1", "p2"],
            "sources": [["clip_image"], ["clip_image", "dino_image"]],
            "score_clip_image": [0.99, 0.98],
            "score_dino_image": [None, 0.95],
            "score_caption_text": pl.Series([None, None], dtype=pl.Float32),
        }
    )
    write_parquet_atomic(pairs, layout.shard_table("mined_image_pairs", "00000"))
    catalog.query("SELECT 1")  # creates the catalog's tables
    summary = mining_summary(layout, catalog, ["00000"])
    assert summary["pairs_per_source"] == {"caption_text": 0, "clip_image": 2, "dino_image": 1}
