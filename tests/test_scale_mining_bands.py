"""Why a source gives no pairs: where its neighbours' scores fell against its band.

At 9,000 images of a corpus whose captions repeat (~47 images per caption), every one of a
query's k=20 caption neighbours was an exact caption copy (cosine 1.0), so the caption source
went from ~2,900 pairs at 2,000 images to none, silently. Mining now counts, per source, the
neighbours below, inside and above the band, and says so when a source with neighbours gave
nothing.
"""

from __future__ import annotations

import polars as pl

from megapairs_assets.mining.pairs import (
    MiningParams,
    band_positions,
    empty_source_notes,
    mine_pairs,
)

PARAMS = MiningParams(bands={"clip_image": (0.5, 0.9), "caption_text": (0.5, 0.9)})


def knn(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    """A long KNN frame from (query, neighbour, score), ranks in the order given per query."""
    ranks: dict[str, int] = {}
    out = []
    for query, neighbor, score in rows:
        out.append((query, ranks.get(query, 0), neighbor, score))
        ranks[query] = ranks.get(query, 0) + 1
    return pl.DataFrame(
        out,
        schema={
            "query_id": pl.String,
            "rank": pl.Int16,
            "neighbor_id": pl.String,
            "score": pl.Float32,
        },
        orient="row",
    )


def test_counts_each_neighbour_once_by_where_it_fell() -> None:
    neighbors = {
        # The query itself (a self row) is not a neighbour; 0.9 sits on the edge: above.
        "clip_image": knn([("q", "q", 1.0), ("q", "a", 0.95), ("q", "b", 0.9), ("q", "c", 0.7)]),
        "caption_text": knn([("q", "a", 0.5), ("q", "b", 0.2), ("r", "a", 0.6)]),
    }
    positions = band_positions(neighbors, PARAMS)
    assert positions.select("source", "neighbours", "below", "inside", "above").rows() == [
        ("clip_image", 3, 0, 1, 2),
        ("caption_text", 3, 2, 1, 0),
    ]
    assert positions["band"].to_list() == ["(0.5, 0.9)", "(0.5, 0.9)"]


def test_a_source_of_only_duplicates_is_named_with_its_counts() -> None:
    neighbors = {
        "clip_image": knn([("q", "a", 0.7), ("r", "b", 0.8)]),
        "caption_text": knn([("q", "a", 1.0), ("q", "b", 1.0), ("r", "c", 0.95)]),
    }
    pairs = mine_pairs(neighbors, PARAMS)
    assert pairs.height == 2
    notes = empty_source_notes(band_positions(neighbors, PARAMS), pairs)
    assert len(notes) == 1
    assert notes[0].startswith("caption_text gave no pairs: of its 3 neighbours, 3 scored at")
    assert "duplicates" in notes[0]


def test_a_source_scoring_under_its_band_is_told_so() -> None:
    neighbors = {
        "clip_image": knn([("q", "a", 0.7)]),
        "caption_text": knn([("q", "a", 0.1), ("q", "b", 0.2)]),
    }
    pairs = mine_pairs(neighbors, PARAMS)
    (note,) = empty_source_notes(band_positions(neighbors, PARAMS), pairs)
    assert "0 scored at or above its band (0.5, 0.9) and 2 at or below it" in note
    assert "scores run lower than the band" in note


def test_no_note_when_every_source_with_neighbours_gave_pairs() -> None:
    neighbors = {"clip_image": knn([("q", "a", 0.7)])}  # caption_text has no table at all
    positions = band_positions(neighbors, PARAMS)
    assert positions.filter(pl.col("source") == "caption_text")["neighbours"].item() == 0
    assert empty_source_notes(positions, mine_pairs(neighbors, PARAMS)) == []


def test_mine_shard_shows_band_positions_and_names_an_empty_source(tmp_path) -> None:
    """The step's page gets the band table; its one log line names the source that gave none."""
    from datetime import UTC, datetime

    from megapairs_assets.corpus.step import IMAGE_LINEAGE
    from megapairs_assets.embeddings.sources import source_named
    from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
    from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
    from megapairs_assets.mining.step import mine_shard

    layout = DataLayout(tmp_path)
    catalog = LineageCatalog(layout.catalog_path)

    def record(asset: str, rows: dict | None = None) -> None:
        started = datetime.now(UTC).replace(tzinfo=None)
        catalog.record(MaterializationRecord(asset, "s", "run", "v1", "demo", started, 0.0), rows)

    ids = ["s/q", "s/a", "s/b"]
    images = pl.DataFrame(
        {
            "image_id": ids,
            "shard": ["s"] * 3,
            "key": ["q", "a", "b"],
            "source_uri": [f"/nowhere/{i}.jpg" for i in ids],
            "caption": ["same caption"] * 3,
            "content_hash": [f"h{i}" for i in ids],
            "width": [64] * 3,
            "height": [48] * 3,
        },
        schema_overrides={"width": pl.Int32, "height": pl.Int32},
    )
    record("image_corpus", {IMAGE_LINEAGE.name: images})
    graphs = {
        "clip_image": knn([("s/q", "s/a", 0.7), ("s/q", "s/b", 0.6)]),
        "caption_text": knn([("s/q", "s/a", 1.0), ("s/q", "s/b", 1.0)]),
    }
    for name, frame in graphs.items():
        asset = source_named(name).knn_asset
        write_parquet_atomic(frame, layout.shard_table(asset, "s"))
        record(asset)
    logged: list[str] = []

    result = mine_shard("s", PARAMS, layout, catalog, log=logged.append)

    assert result.row_counts["pairs"] == 2
    table = result.markdown["band_positions"]
    assert "| caption_text | (0.5, 0.9) | 2 | 0 | 0 | 2 |" in table
    assert "| clip_image | (0.5, 0.9) | 2 | 0 | 2 | 0 |" in table
    assert logged == [
        "mined_image_pairs[s]: 2 pairs; caption_text gave no pairs: of its 2 neighbours, 2 "
        "scored at or above its band (0.5, 0.9) and 0 at or below it; near or exact duplicates "
        "(e.g. repeated captions) fill its k nearest; a larger KNN k reaches the neighbours "
        "past them"
    ]
