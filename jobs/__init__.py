"""Jobs: named selections of the asset graph that people launch and backfill."""

import dagster as dg

mining_half_job = dg.define_asset_job(
    name="mining_half",
    description="Corpus -> embeddings -> KNN graphs -> mined image pairs, for a range of shards.",
    selection=dg.AssetSelection.groups("corpus", "embeddings", "knn", "pairs"),
)

corpus_job = dg.define_asset_job(
    name="corpus_only",
    description="Read, validate and quarantine shards (CPU only).",
    selection=dg.AssetSelection.groups("corpus"),
)

corpus_and_embeddings_job = dg.define_asset_job(
    name="corpus_and_embeddings",
    description="Corpus and the three embedding tables: everything that is per shard only.",
    selection=dg.AssetSelection.groups("corpus", "embeddings"),
)

all_jobs = [mining_half_job, corpus_job, corpus_and_embeddings_job]
