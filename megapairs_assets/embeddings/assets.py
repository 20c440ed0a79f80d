"""Dagster wiring of the three embedding tables: one factory, one code path.

CLIP image (I), DINOv2 image (D) and caption text (T) embeddings differ only in which encoder
resource they use; everything else (reading the corpus, batching, normalising, writing,
checking, lineage) is `megapairs_assets.embeddings.compute`.
"""

from dataclasses import dataclass

import dagster as dg
import polars as pl

from megapairs_assets.asset_support import (
    StepRecorder,
    check_results,
    check_specs,
    markdown_table,
    partition_keys,
)
from megapairs_assets.corpus.assets import image_corpus
from megapairs_assets.embeddings.compute import check_embeddings, embed_rows, write_embedding_table
from megapairs_assets.partitions import SHARD_BACKFILL_POLICY, shard_partitions
from megapairs_assets.progress import Progress

CODE_VERSION = "embeddings-v1"
EMBEDDING_CHECKS = {
    "embeddings_finite": "No NaN or infinite values",
    "embeddings_unit_norm": "Every vector is L2-normalised (within float16 tolerance)",
    "embeddings_cover_inputs": "One row per valid input, no extra or duplicate ids",
}


@dataclass(frozen=True)
class EmbeddingTable:
    """One embedding table: its asset name, similarity source name and encoder resource key."""

    asset_name: str
    source: str
    encoder_key: str
    description: str


EMBEDDING_TABLES = (
    EmbeddingTable(
        "clip_image_embeddings",
        "clip_image",
        "clip_image_encoder",
        "CLIP (EVA-CLIP in the paper) image embeddings: same object or concept (source I).",
    ),
    EmbeddingTable(
        "dino_image_embeddings",
        "dino_image",
        "dino_image_encoder",
        "DINOv2 image embeddings: similar layout, texture, background (source D).",
    ),
    EmbeddingTable(
        "caption_text_embeddings",
        "caption_text",
        "caption_text_encoder",
        "Caption text embeddings: related described content (source T).",
    ),
)


def build_embedding_asset(table: EmbeddingTable) -> dg.AssetsDefinition:
    """The asset for one embedding table."""

    @dg.asset(
        name=table.asset_name,
        description=table.description
        + " float16, L2-normalised, keyed by image_id; one Parquet file per shard.",
        partitions_def=shard_partitions,
        deps=[image_corpus],
        group_name="embeddings",
        code_version=CODE_VERSION,
        kinds={"pytorch", "parquet"},
        pool="gpu",
        backfill_policy=SHARD_BACKFILL_POLICY,
        required_resource_keys={table.encoder_key, "device", "storage", "catalog", "corpus_source"},
        check_specs=check_specs(table.asset_name, EMBEDDING_CHECKS, blocking=True),
    )
    def _embedding_asset(context: dg.AssetExecutionContext) -> dg.MaterializeResult:
        resources = context.resources
        encoder_resource = getattr(resources, table.encoder_key)
        device, dtype = resources.device.torch_device(), resources.device.torch_dtype()
        layout, lineage = resources.storage.layout(), resources.catalog.catalog()
        limits = resources.corpus_source.limits()
        context.log.info(f"loading {encoder_resource.model_id} on {resources.device.describe()}")
        encoder = encoder_resource.load(device, dtype)
        shards = partition_keys(context)
        corpus_versions = lineage.latest_materialization_ids("image_corpus", shards)
        outcomes, per_shard, total_rows, total_s = [], [], 0, 0.0
        for shard in shards:
            recorder = StepRecorder(
                lineage,
                table.asset_name,
                context.run.run_id,
                CODE_VERSION,
                resources.storage.profile,
                shard,
            )
            rows = pl.read_parquet(layout.corpus_images(shard))
            with Progress(rows.height, f"{table.asset_name}[{shard}]", log=context.log.info) as p:
                result = embed_rows(
                    rows,
                    encoder,
                    limits,
                    encoder_resource.batch_size,
                    encoder_resource.num_workers,
                    device,
                    dtype,
                    on_progress=p.update,
                )
            path = layout.shard_table(table.asset_name, shard)
            write_embedding_table(path, result.ids, result.vectors, encoder.model_id)
            skipped = pl.DataFrame(
                result.skipped,
                schema={"image_id": pl.String, "reason": pl.String, "detail": pl.String},
                orient="row",
            )
            expected = rows.filter(~pl.col("image_id").is_in(skipped["image_id"].implode()))
            outcomes += check_embeddings(result.ids, result.vectors, expected["image_id"].to_list())
            recorder.finish(
                config={
                    "batch_size": encoder_resource.batch_size,
                    "dtype": str(dtype),
                    "device": str(device),
                },
                model_ids={table.source: encoder.model_id},
                input_versions={f"image_corpus/{shard}": corpus_versions.get(shard, "unknown")},
                row_counts={"embedded": len(result.ids), "skipped": skipped.height},
                output_paths={"embeddings": str(path)},
                rows={"quarantine_log": _skipped_rows(skipped, rows, table.asset_name, shard)},
            )
            per_shard.append(
                {
                    "shard": shard,
                    "rows": len(result.ids),
                    "skipped": skipped.height,
                    "items_per_s": round(result.items_per_s, 1),
                }
            )
            total_rows += len(result.ids)
            total_s += result.seconds
        return dg.MaterializeResult(
            metadata={
                "dagster/row_count": total_rows,
                "model_id": encoder.model_id,
                "dim": encoder.dim,
                "rows": total_rows,
                "items_per_s": round(total_rows / total_s, 1) if total_s else 0.0,
                "device": resources.device.describe(),
                "shards": dg.MetadataValue.md(markdown_table(pl.DataFrame(per_shard))),
                "path": dg.MetadataValue.path(str(layout.data_dir / table.asset_name)),
            },
            check_results=check_results(outcomes, table.asset_name),
        )

    return _embedding_asset


def _skipped_rows(
    skipped: pl.DataFrame, rows: pl.DataFrame, stage: str, shard: str
) -> pl.DataFrame:
    joined = skipped.join(rows.select("image_id", "key", "source_uri"), on="image_id", how="left")
    return joined.select(
        pl.lit(stage).alias("stage"),
        pl.lit(shard).alias("shard"),
        "key",
        "source_uri",
        "reason",
        "detail",
    )


embedding_assets = [build_embedding_asset(table) for table in EMBEDDING_TABLES]
