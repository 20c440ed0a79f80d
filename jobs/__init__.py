"""Jobs: named selections of the asset graph that people launch and backfill."""

import dagster as dg

from megapairs_assets.partitions import shard_partitions

mining_half_job = dg.define_asset_job(
    name="mining_half",
    description="Corpus -> embeddings -> KNN graphs -> mined image pairs, for a range of shards.",
    selection=dg.AssetSelection.groups("corpus", "embeddings", "knn", "pairs"),
    partitions_def=shard_partitions,
)

corpus_job = dg.define_asset_job(
    name="corpus_only",
    description="Read, validate and quarantine shards (CPU only).",
    selection=dg.AssetSelection.groups("corpus"),
    partitions_def=shard_partitions,
)

all_jobs = [mining_half_job, corpus_job]
