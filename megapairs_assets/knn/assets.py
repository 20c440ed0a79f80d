"""Dagster wiring of the KNN graphs: each shard's images against the whole corpus, per source."""

import dagster as dg
import numpy as np
import polars as pl

from megapairs_assets.asset_support import (
    StepRecorder,
    check_results,
    check_specs,
    markdown_table,
    partition_keys,
)
from megapairs_assets.embeddings.assets import EMBEDDING_TABLES, EmbeddingTable
from megapairs_assets.embeddings.compute import read_embedding_table
from megapairs_assets.knn.search import build_index, check_knn, search_neighbors
from megapairs_assets.partitions import (
    SHARD_BACKFILL_POLICY,
    SHARD_PARTITIONS_NAME,
    shard_partitions,
)
from megapairs_assets.progress import Progress
from megapairs_assets.storage import DataLayout, write_parquet_atomic

CODE_VERSION = "knn-v1"
KNN_CHECKS = {
    "knn_no_self_neighbors": "A query is never its own neighbour",
    "knn_ranks_contiguous": "Each query's ranks are 0..n-1",
    "knn_scores_non_increasing": "Scores never rise with rank within a query",
    "knn_scores_are_cosines": "Scores lie in [-1, 1] (unit vectors)",
    "knn_at_most_k_per_query": "At most k neighbours per query",
    "knn_rows_sorted": "Rows are stored by query_id, then rank",
}


def knn_asset_name(table: EmbeddingTable) -> str:
    return f"{table.source}_knn"


def load_corpus_vectors(
    layout: DataLayout, asset_name: str, shards: list[str]
) -> tuple[np.ndarray, np.ndarray, list[str]]:
    """Concatenate the embedding tables of every shard that has one: (ids, vectors, shards used)."""
    ids, vectors, used = [], [], []
    for shard in shards:
        path = layout.shard_table(asset_name, shard)
        if path.exists():
            shard_ids, shard_vectors = read_embedding_table(path)
            ids.append(shard_ids)
            vectors.append(shard_vectors)
            used.append(shard)
    if not ids:
        raise FileNotFoundError(
            f"no {asset_name} tables found under {layout.data_dir / asset_name}"
        )
    return np.concatenate(ids), np.concatenate(vectors), used


def build_knn_asset(table: EmbeddingTable) -> dg.AssetsDefinition:
    """The KNN graph asset over one embedding table."""
    asset_name = knn_asset_name(table)

    @dg.asset(
        name=asset_name,
        description=f"KNN graph over {table.asset_name}: for each image of the shard, its k "
        "nearest images in the whole corpus by cosine similarity (self excluded). Long format: "
        "query_id, rank, neighbor_id, score.",
        partitions_def=shard_partitions,
        # Every shard searches the whole corpus, so it depends on all embedding partitions.
        deps=[dg.AssetDep(table.asset_name, partition_mapping=dg.AllPartitionMapping())],
        group_name="knn",
        code_version=CODE_VERSION,
        kinds={"faiss", "parquet"},
        pool="gpu",
        backfill_policy=SHARD_BACKFILL_POLICY,
        required_resource_keys={"knn_index", "storage", "catalog"},
        check_specs=check_specs(asset_name, KNN_CHECKS, blocking=True),
    )
    def _knn_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resources = context.resources
        layout, lineage = resources.storage.layout(), resources.catalog.catalog()
        spec, k = resources.knn_index.spec(), resources.knn_index.k
        all_shards = sorted(context.instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME))
        corpus_ids, corpus_vectors, used = load_corpus_vectors(layout, table.asset_name, all_shards)
        if missing := sorted(set(all_shards) - set(used)):
            context.log.warning(f"{len(missing)} shards have no {table.asset_name} yet: {missing}")
        context.log.info(f"building {spec.kind} index over {len(corpus_ids)} vectors")
        index = build_index(corpus_vectors, spec)
        input_versions = {
            f"{table.asset_name}/{shard}": version
            for shard, version in lineage.latest_materialization_ids(table.asset_name, used).items()
        }
        position = {image_id: i for i, image_id in enumerate(corpus_ids.tolist())}
        outcomes, per_shard, score_samples = [], [], []
        for shard in partition_keys(context):
            recorder = StepRecorder(
                lineage,
                asset_name,
                context.run.run_id,
                CODE_VERSION,
                resources.storage.profile,
                shard,
            )
            shard_ids, _ = read_embedding_table(layout.shard_table(table.asset_name, shard))
            rows = np.fromiter((position[i] for i in shard_ids.tolist()), dtype=np.int64)
            with Progress(
                len(rows), f"{asset_name}[{shard}]", "queries", log=context.log.info
            ) as p:
                neighbors = search_neighbors(
                    index,
                    corpus_ids,
                    corpus_vectors[rows],
                    corpus_ids[rows],
                    k,
                    spec,
                    on_progress=p.update,
                )
            path = layout.shard_table(asset_name, shard)
            write_parquet_atomic(neighbors, path)
            outcomes += check_knn(neighbors, k)
            recorder.finish(
                config={"k": k, "index": spec.__dict__, "corpus_size": len(corpus_ids)},
                input_versions=input_versions,
                row_counts={"queries": len(rows), "edges": neighbors.height},
                output_paths={"knn": str(path)},
            )
            per_shard.append({"shard": shard, "queries": len(rows), "edges": neighbors.height})
            score_samples.append(neighbors["score"])
        scores = pl.concat(score_samples) if score_samples else pl.Series([], dtype=pl.Float32)
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": int(sum(r["edges"] for r in per_shard)),
                "index": spec.kind + (" (GPU)" if spec.use_gpu else " (CPU)"),
                "k": k,
                "corpus_size": len(corpus_ids),
                "score_percentiles": dg.MetadataValue.md(_percentile_table(scores)),
                "shards": dg.MetadataValue.md(markdown_table(pl.DataFrame(per_shard))),
                "path": dg.MetadataValue.path(str(layout.data_dir / asset_name)),
            },
            check_results=check_results(outcomes, asset_name),
        )

    return _knn_asset


def _percentile_table(scores: pl.Series) -> str:
    """Neighbour-score distribution: what a person tunes the mining bands against."""
    if scores.is_empty():
        return "_(no neighbours)_"
    qs = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    frame = pl.DataFrame({"quantile": qs, "score": [scores.quantile(q) for q in qs]})
    return markdown_table(frame)


knn_assets = [build_knn_asset(table) for table in EMBEDDING_TABLES]
