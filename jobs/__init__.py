"""Jobs: named selections of the asset graph that people launch and backfill.

A job runs assets of one partitioning: the shard-partitioned stages (mining, generation) go
together; training (one partition per named config) and scoring (retriever x benchmark) run
as their own jobs, chained by sensors (`rescore_trained_checkpoints` scores each new
checkpoint). `megapairs demo` runs the three in order.
"""

import dagster as dg

SHARD_GROUPS = ("corpus", "embeddings", "knn", "pairs")

mining_half_job = dg.define_asset_job(
    name="mining_half",
    description="Mine: corpus -> embeddings -> KNN graphs -> mined image pairs, per shard.",
    selection=dg.AssetSelection.groups(*SHARD_GROUPS),
)

generate_job = dg.define_asset_job(
    name="generate",
    description="Pair descriptions -> instructions -> triplets -> export, per shard.",
    selection=dg.AssetSelection.groups("generation"),
)

mine_and_generate_job = dg.define_asset_job(
    name="mine_and_generate",
    description="Every shard-partitioned asset: from the corpus to the exported triplets.",
    selection=dg.AssetSelection.groups(*SHARD_GROUPS, "generation"),
)

train_job = dg.define_asset_job(
    name="train",
    description="MMRet-CLIP checkpoints, one partition per named training config; each new "
    "checkpoint is then scored by the rescore_trained_checkpoints sensor.",
    selection=dg.AssetSelection.assets("mmret_clip_checkpoint"),
)

evaluate_job = dg.define_asset_job(
    name="evaluate",
    description="Benchmark scores, one partition per (retriever, benchmark).",
    selection=dg.AssetSelection.assets("benchmark_scores"),
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

all_jobs = [
    mining_half_job,
    generate_job,
    mine_and_generate_job,
    train_job,
    evaluate_job,
    corpus_job,
    corpus_and_embeddings_job,
]
