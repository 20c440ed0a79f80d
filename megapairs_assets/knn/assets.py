"""Dagster wiring of the KNN graphs: each shard's images against the defined corpus, per source."""

from typing import Any

import dagster as dg

from megapairs_assets.corpus.step import ASSET_NAME as CORPUS_ASSET
from megapairs_assets.embeddings.sources import SOURCES, SimilaritySource
from megapairs_assets.knn.search import KNN_COLUMN_DESCRIPTIONS, describe_backend
from megapairs_assets.knn.step import KNN_CHECKS, KnnRun, plan_knn_step
from megapairs_assets.orchestration.partitions import (
    CORPUS_WIDE_AUTOMATION,
    shard_asset_options,
    step_placement,
)
from megapairs_assets.orchestration.settings_version import fields, settings_code_version
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions

# The index parameters that change which neighbours an approximate index returns.
_INDEX_FIELDS = {"flat": (), "ivf": ("nlist", "nprobe"), "hnsw": ("hnsw_m", "ef_search")}


def knn_settings(resources: Any) -> dict[str, Any]:
    """What decides a graph: k and the index kind with its recall parameters (not the search
    backend, GPU use or batch sizes: exact search gives the same neighbours on any of them)."""
    index = resources.knn_index
    return fields(index, ("k", "kind", *_INDEX_FIELDS.get(index.kind, ())))


def knn_stage(source: SimilaritySource) -> Stage:
    """The stage of one source's KNN graph."""
    return Stage(
        source.knn_asset,
        "knn-v2",
        KNN_CHECKS,
        settings=knn_settings,
        columns=KNN_COLUMN_DESCRIPTIONS,
    )


def build_knn_asset(source: SimilaritySource) -> dg.AssetsDefinition:
    """The KNN graph asset over one source's embedding table."""
    stage = knn_stage(source)

    @dg.asset(
        name=source.knn_asset,
        description=f"KNN graph over {source.embedding_asset}: for each image of the shard, its "
        "k nearest images in the corpus (the corpus source's current shards) by cosine "
        "similarity, self excluded. Long format: query_id, rank, neighbor_id, score.",
        # Every shard searches the whole corpus, so it depends on all embedding partitions.
        deps=[dg.AssetDep(source.embedding_asset, partition_mapping=dg.AllPartitionMapping())],
        kinds={"faiss", "pytorch", "parquet"},
        pool="gpu",
        automation_condition=CORPUS_WIDE_AUTOMATION,
        required_resource_keys={"knn_index", "storage", "catalog", "corpus_source"},
        check_specs=stage.check_specs(),
        **shard_asset_options("knn", stage.code_version, **step_placement(1, "96Gi")),
    )
    def _knn_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resources = context.resources
        layout, lineage = resources.storage.layout(), resources.catalog.catalog()
        knn = resources.knn_index
        spec = knn.spec()
        # The corpus: the source's shards whose corpus and embedding tables have been made. A
        # shard registered while this run waited (its corpus or embedding step still to come)
        # is searched by the run its embeddings start, not counted here as a missing table; a
        # recorded table that is gone or damaged still fails `knn_corpus_complete`.
        listed = resources.corpus_source.shard_ids()
        ingested = set(lineage.current_partitions(CORPUS_ASSET)) & set(
            lineage.current_partitions(source.embedding_asset)
        )
        corpus_shards = [shard for shard in listed if shard in ingested]
        if len(corpus_shards) < len(listed):
            waiting = [shard for shard in listed if shard not in ingested]
            context.log.info(
                f"{source.knn_asset}: {len(waiting)} shards of the corpus source have no corpus "
                f"or {source.embedding_asset} table yet (e.g. {waiting[0]}); searched without "
                "them until they are embedded"
            )
        run = KnnRun(
            source=source,
            corpus_shards=corpus_shards,
            spec=spec,
            k=knn.k,
            allow_partial_corpus=knn.allow_partial_corpus,
            # What Dagster shows as the code version, with this run's settings (as shard_step
            # records it), so a run-config override of k or the index never reuses a graph.
            code_version=settings_code_version(stage.code_version, stage.settings(resources)),
            # The resource's switch; read with a default until every resource has the field.
            reuse_unchanged=knn.reuse_unchanged,
        )
        if not run.reuse_unchanged:
            context.log.info(f"{source.knn_asset}: reuse_unchanged is off; searching all")
        # Shards whose inputs are unchanged keep their graphs (knn/reuse.py); the corpus index
        # is built only when a shard has to be searched.
        step = plan_knn_step(
            context.partition_keys, run, layout, lineage, context.log.info, context.log.warning
        )
        result = materialize_partitions(
            context,
            stage,
            step,
            lineage,
            resources.storage.profile,
            run_metadata={
                "index": f"{spec.kind}, {describe_backend(spec)}",
                "corpus_version": step.state.corpus_version,
            },
        )
        if not step.index_built:
            context.log.info(
                f"{source.knn_asset}: every shard's inputs were unchanged; the index was not built"
            )
        return result

    return _knn_asset


knn_assets = [build_knn_asset(source) for source in SOURCES]
knn_stages = [knn_stage(source) for source in SOURCES]
