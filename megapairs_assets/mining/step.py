"""One shard's mined image pairs, as plain work: read the three KNN graphs, mine, write, check."""

from __future__ import annotations

import json
from collections.abc import Callable

import polars as pl

from megapairs_assets.corpus.images import ImageLimits, open_image_rgb
from megapairs_assets.corpus.step import content_hashes, image_uris
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.knn.step import read_knn_tables
from megapairs_assets.lib.preview import histogram_markdown, markdown_table, thumbnail_markdown
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, read_parquet, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.lineage.id_lists import IN_IDS, id_list
from megapairs_assets.mining.pair_table import PAIR_LINEAGE
from megapairs_assets.mining.pairs import (
    IDENTICAL_CONTENT_CHECK,
    IDENTICAL_CONTENT_CHECK_DESCRIPTION,
    MiningParams,
    band_positions,
    check_pairs,
    empty_source_notes,
    keep_current_images,
    knn_image_ids,
    mine_pairs,
    score_column,
    summarize_pairs,
)

ASSET_NAME = "mined_image_pairs"
PAIR_CHECKS = {
    "pairs_in_band": "Every score lies strictly inside its source's band",
    "negatives_start_with_query": "hard_negative_ids[0] is the query image",
    "target_not_in_negatives": "A pair's target is never among its hard negatives",
    "no_duplicate_pairs": "Each (query, target) appears once",
    "no_self_pairs": "A query is never its own target",
    IDENTICAL_CONTENT_CHECK: IDENTICAL_CONTENT_CHECK_DESCRIPTION,
}

_PREVIEW_PAIRS = 4
_PREVIEW_CAPTION_CHARS = 48
# Summary keys renamed for the UI, where "queries" alone does not say what was counted.
_METADATA_NAMES = {"queries": "query_images_with_pairs"}


def mine_shard(
    shard: str,
    params: MiningParams,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
) -> StepResult:
    """Mine one shard's pairs from its three KNN tables and write them."""
    sources = list(params.bands)
    neighbors, versions = read_knn_tables(
        [source_named(s) for s in sources], shard, layout, catalog
    )
    # Exact copies (same bytes, other ids) are never a pair or a negative of each other.
    hashes = content_hashes(catalog, sorted(knn_image_ids(neighbors)))
    # image_lineage holds exactly the current corpus: ids missing there left it since the graph
    # was built (a retired shard, a rebuilt corpus table).
    neighbors, outside_corpus = keep_current_images(neighbors, set(hashes["image_id"]))
    if outside_corpus:
        log(
            f"{ASSET_NAME}[{shard}]: {outside_corpus} KNN rows name images no longer in the "
            "corpus (left out); re-materialize the KNN graphs to search the current corpus"
        )
    pairs = mine_pairs(neighbors, params, hashes)
    positions = band_positions(neighbors, params)
    path = layout.shard_table(ASSET_NAME, shard)
    write_parquet_atomic(pairs, path)
    knn_versions = {s: versions[f"{source_named(s).knn_asset}/{shard}"] for s in sources}
    summary = summarize_pairs(pairs, sources)
    # Only when a source gave nothing, and why (the shard's count is logged by the caller).
    notes = "; ".join(empty_source_notes(positions, pairs))
    if notes:
        log(f"{ASSET_NAME}[{shard}]: {pairs.height} pairs; {notes}")
    return StepResult(
        partition=shard,
        outputs={"pairs": path},
        row_counts={"pairs": pairs.height},
        row_count_key="pairs",
        config={
            "bands": params.bands,
            "targets_per_source": params.targets_per_source,
            "hard_negatives": params.hard_negatives,
            "seed": params.seed,
            "query_fraction": params.query_fraction,
        },
        input_versions=versions,
        rows={PAIR_LINEAGE.name: pair_lineage_rows(pairs, shard, sources, knn_versions)},
        outcomes=check_pairs(pairs, params, hashes),
        metadata={
            # The pair count is already the row count (`rows_pairs`, `dagster/row_count`);
            # pairs per source are `pairs_from_<source>` (numbers the UI can plot).
            **{
                _METADATA_NAMES.get(k, k): v
                for k, v in summary.items()
                if isinstance(v, int | float | str) and k != "pairs"
            },
            "knn_rows_outside_corpus": outside_corpus,
        },
        markdown={
            "band_positions": markdown_table(positions),
            "score_distribution": markdown_table(score_distribution(pairs, sources)),
            # Where each band cuts its source's neighbour scores (short: shown inline).
            **{
                f"knn_score_histogram_{source}": histogram_markdown(
                    neighbors[source]["score"], label=f"{source} score", band=params.bands[source]
                )
                for source in sources
                if source in neighbors
            },
            "thumbnails": pair_thumbnails(catalog, pairs.head(_PREVIEW_PAIRS)),
        },
        preview=pair_preview(catalog, pairs),
    )


def pair_lineage_rows(
    pairs: pl.DataFrame, shard: str, sources: list[str], knn_versions: dict[str, str]
) -> pl.DataFrame:
    score_columns = [score_column(s) for s in sources]
    return pairs.select(
        "pair_id",
        "query_id",
        "target_id",
        pl.lit(shard).alias("shard"),
        "sources",
        pl.struct(score_columns).struct.json_encode().alias("scores"),
        "hard_negative_ids",
        pl.lit(json.dumps(knn_versions, sort_keys=True)).alias("knn_versions"),
    )


def score_distribution(pairs: pl.DataFrame, sources: list[str]) -> pl.DataFrame:
    """Per source: count and quantiles of the scores of the pairs it found."""
    rows = []
    for source in sources:
        scores = pairs[score_column(source)].drop_nulls()
        row: dict[str, object] = {"source": source, "pairs": scores.len()}
        for q in (0.0, 0.25, 0.5, 0.75, 1.0):
            row[f"q{int(q * 100)}"] = float(scores.quantile(q)) if scores.len() else None
        rows.append(row)
    return pl.DataFrame(rows)


def pair_preview(catalog: LineageCatalog, pairs: pl.DataFrame, max_rows: int = 10) -> pl.DataFrame:
    """The first pairs with their captions and scores, readable at a glance.

    Narrow enough for the asset page: one `scores` column ("clip_image 0.9953") instead of a
    mostly empty column per source, and captions cut to a line.
    """
    head = pairs.head(max_rows)
    if not head.height:
        return head
    captions = catalog.query(
        f"SELECT image_id, caption FROM image_lineage WHERE image_id {IN_IDS}",
        [id_list(sorted(set(head["query_id"]) | set(head["target_id"])))],
    ).with_columns(pl.col("caption").map_elements(_short_caption, return_dtype=pl.String))
    score_columns = [c for c in head.columns if c.startswith("score_")]
    scores = pl.concat_str(
        [
            pl.when(pl.col(c).is_not_null()).then(
                pl.format("{} {}", pl.lit(c.removeprefix("score_")), pl.col(c).round(4))
            )
            for c in score_columns
        ],
        separator="; ",
        ignore_nulls=True,
    )
    return (
        head.select("query_id", "target_id", scores.alias("scores"))
        .join(
            captions.rename({"image_id": "query_id", "caption": "query_caption"}),
            on="query_id",
            how="left",
        )
        .join(
            captions.rename({"image_id": "target_id", "caption": "target_caption"}),
            on="target_id",
            how="left",
        )
        .select("query_id", "query_caption", "target_id", "target_caption", "scores")
    )


def _short_caption(caption: str) -> str:
    if len(caption) <= _PREVIEW_CAPTION_CHARS:
        return caption
    return caption[: _PREVIEW_CAPTION_CHARS - 3] + "..."


def pair_thumbnails(catalog: LineageCatalog, pairs: pl.DataFrame) -> str:
    """Query and target as thumbnails, one line per pair, for the asset page."""
    if not pairs.height:
        return "_(no pairs)_"
    uri_of = image_uris(catalog, list(pairs["query_id"]) + list(pairs["target_id"]))
    lines = []
    for row in pairs.iter_rows(named=True):
        images = []
        for image_id in (row["query_id"], row["target_id"]):
            try:
                images.append(open_image_rgb(uri_of[image_id], ImageLimits(), max_side_px=64))
            except Exception:  # a preview must never fail the asset
                continue
        lines.append(
            f"{thumbnail_markdown(images)} `{row['query_id']}` -> `{row['target_id']}` "
            f"({', '.join(row['sources'])})"
        )
    return "\n\n".join(lines)


def recheck_pairs_shard(
    shard: str, layout: DataLayout, catalog: LineageCatalog, params: MiningParams
) -> list:
    """The pair checks on the shard's table as it is on disk (read-only)."""
    pairs = read_parquet(layout.shard_table(ASSET_NAME, shard))
    ids = sorted(
        set(pairs["query_id"])
        | set(pairs["target_id"])
        | set(pairs["hard_negative_ids"].explode().drop_nulls())
    )
    return check_pairs(pairs, params, content_hashes(catalog, ids))
