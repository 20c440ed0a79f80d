"""Dagster wiring of the KNN graphs: each shard's images against the defined corpus, per source."""

import dagster as dg

from megapairs_assets.embeddings.sources import SOURCES, SimilaritySource
from megapairs_assets.knn.search import describe_backend
from megapairs_assets.knn.step import KNN_CHECKS, build_corpus_index, knn_shard
from megapairs_assets.orchestration.partitions import (
    DOWNSTREAM_AUTOMATION,
    shard_asset_options,
    step_placement,
)
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions


def build_knn_asset(source: SimilaritySource) -> dg.AssetsDefinition:
    """The KNN graph asset over one source's embedding table."""
    stage = Stage(source.knn_asset, "knn-v2", KNN_CHECKS)

    @dg.asset(
        name=source.knn_asset,
        description=f"KNN graph over {source.embedding_asset}: for each image of the shard, its "
        "k nearest images in the corpus (the corpus source's current shards) by cosine "
        "similarity, self excluded. Long format: query_id, rank, neighbor_id, score.",
        # Every shard searches the whole corpus, so it depends on all embedding partitions.
        deps=[dg.AssetDep(source.embedding_asset, partition_mapping=dg.AllPartitionMapping())],
        kinds={"faiss", "pytorch", "parquet"},
        pool="gpu",
        automation_condition=DOWNSTREAM_AUTOMATION,
        required_resource_keys={"knn_index", "storage", "catalog", "corpus_source"},
        check_specs=stage.check_specs(),
        **shard_asset_options("knn", stage.code_version, **step_placement(1, "96Gi")),
    )
    def _knn_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resources = context.resources
        layout, lineage = resources.storage.layout(), resources.catalog.catalog()
        knn = resources.knn_index
        corpus_shards = resources.corpus_source.shard_ids()
        spec = knn.spec()
        corpus = build_corpus_index(source, corpus_shards, spec, layout, lineage)
        context.log.info(
            f"{spec.kind} index over {len(corpus.ids)} vectors of {len(corpus.versions)} shards"
            + (f"; missing: {corpus.missing_shards}" if corpus.missing_shards else "")
        )
        return materialize_partitions(
            context,
            stage,
            lambda shard: knn_shard(
                shard, corpus, knn.k, layout, knn.allow_partial_corpus, context.log.info
            ),
            lineage,
            resources.storage.profile,
            run_metadata={
                "index": f"{spec.kind}, {describe_backend(spec)}",
                "corpus_version": corpus.corpus_version,
            },
        )

    return _knn_asset


knn_assets = [build_knn_asset(source) for source in SOURCES]
