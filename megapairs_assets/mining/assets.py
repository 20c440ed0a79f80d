"""Dagster wiring of the mined image pairs (method.md §3)."""

import json

import dagster as dg
import polars as pl

from megapairs_assets.asset_support import (
    StepRecorder,
    check_results,
    check_specs,
    markdown_table,
    partition_keys,
    thumbnail_markdown,
)
from megapairs_assets.corpus.images import ImageLimits, open_image_rgb
from megapairs_assets.embeddings.assets import EMBEDDING_TABLES
from megapairs_assets.knn.assets import knn_asset_name
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.mining.pairs import check_pairs, mine_pairs, summarize_pairs
from megapairs_assets.partitions import SHARD_BACKFILL_POLICY, shard_partitions
from megapairs_assets.storage import write_parquet_atomic
from resources.mining import MiningResource
from resources.storage import LineageCatalogResource, StorageResource

ASSET_NAME = "mined_image_pairs"
CODE_VERSION = "mining-v1"
KNN_BY_SOURCE = {table.source: knn_asset_name(table) for table in EMBEDDING_TABLES}
PAIR_CHECKS = {
    "pairs_in_band": "Every score lies strictly inside its source's band",
    "negatives_start_with_query": "hard_negative_ids[0] is the query image",
    "target_not_in_negatives": "A pair's target is never among its hard negatives",
    "no_duplicate_pairs": "Each (query, target) appears once",
    "no_self_pairs": "A query is never its own target",
}


@dg.asset(
    name=ASSET_NAME,
    partitions_def=shard_partitions,
    deps=list(KNN_BY_SOURCE.values()),
    group_name="pairs",
    code_version=CODE_VERSION,
    kinds={"polars", "parquet"},
    backfill_policy=SHARD_BACKFILL_POLICY,
    check_specs=check_specs(ASSET_NAME, PAIR_CHECKS, blocking=True),
)
def mined_image_pairs(
    context: dg.AssetExecutionContext,
    mining: MiningResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """(query image, target image) pairs with hard negatives, mined from the three KNN graphs.

    A neighbour is a target when its score lies inside its source's band; a pair found by
    several sources is one row listing them all. Hard negatives are the other targets of the
    same query, the query image itself always first. Deterministic for a seed.
    """
    layout, lineage, params = storage.layout(), catalog.catalog(), mining.params()
    sources = list(params.bands)
    outcomes, summaries, previews = [], [], []
    for shard in partition_keys(context):
        recorder = StepRecorder(
            lineage, ASSET_NAME, context.run.run_id, CODE_VERSION, storage.profile, shard
        )
        neighbors = {
            source: pl.read_parquet(layout.shard_table(KNN_BY_SOURCE[source], shard))
            for source in sources
        }
        pairs = mine_pairs(neighbors, params)
        path = layout.shard_table(ASSET_NAME, shard)
        write_parquet_atomic(pairs, path)
        outcomes += check_pairs(pairs, params)
        knn_versions = {
            source: lineage.latest_materialization_ids(KNN_BY_SOURCE[source], [shard]).get(
                shard, "unknown"
            )
            for source in sources
        }
        summary = summarize_pairs(pairs, sources)
        recorder.finish(
            config={
                "bands": params.bands,
                "targets_per_source": params.targets_per_source,
                "hard_negatives": params.hard_negatives,
                "seed": params.seed,
                "query_fraction": params.query_fraction,
            },
            input_versions={f"{KNN_BY_SOURCE[s]}/{shard}": v for s, v in knn_versions.items()},
            row_counts={"pairs": pairs.height},
            output_paths={"pairs": str(path)},
            rows={"pair_lineage": _pair_lineage_rows(pairs, shard, sources, knn_versions)},
        )
        summaries.append({"shard": shard, **summary})
        if len(previews) < 4 and pairs.height:
            previews.append(_pair_preview(lineage, pairs.head(4 - len(previews))))
    total = sum(int(s.get("pairs", 0)) for s in summaries)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "pairs": total,
            "per_shard": dg.MetadataValue.md(markdown_table(pl.DataFrame(summaries))),
            "preview": dg.MetadataValue.md("\n\n".join(previews) or "_(no pairs)_"),
            "path": dg.MetadataValue.path(str(layout.data_dir / ASSET_NAME)),
        },
        check_results=check_results(outcomes, ASSET_NAME),
    )


def _pair_lineage_rows(
    pairs: pl.DataFrame, shard: str, sources: list[str], knn_versions: dict[str, str]
) -> pl.DataFrame:
    score_columns = [f"score_{s}" for s in sources]
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


def _pair_preview(lineage: LineageCatalog, pairs: pl.DataFrame) -> str:
    """Query, target and negatives as thumbnails, one line per pair, for the asset page."""
    ids = set(pairs["query_id"]) | set(pairs["target_id"])
    uris = lineage.query(
        "SELECT image_id, source_uri FROM image_lineage WHERE image_id IN (SELECT unnest(?))",
        [sorted(ids)],
    )
    uri_of = dict(zip(uris["image_id"], uris["source_uri"], strict=True))
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
