"""One shard of one embedding table, as plain work (the three tables share this one path)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import polars as pl
import torch

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.step import ASSET_NAME as CORPUS_ASSET
from megapairs_assets.embeddings.compute import (
    check_embeddings,
    embed_rows,
    write_embedding_table,
)
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.embeddings.sources import SimilaritySource
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, read_parquet
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions

EMBEDDING_CHECKS = {
    "embeddings_finite": "No NaN or infinite values",
    "embeddings_unit_norm": "Every vector is L2-normalised (within float16 tolerance)",
    "embeddings_cover_inputs": "One row per valid input, no extra or duplicate ids",
}


@dataclass(frozen=True)
class EmbeddingRun:
    """What every shard of one embedding step shares: the loaded model and its settings."""

    source: SimilaritySource
    encoder: LoadedEncoder
    batch_size: int
    num_workers: int | None
    device: torch.device
    dtype: torch.dtype
    limits: ImageLimits
    image_decode: str = "auto"


def embed_shard(
    shard: str,
    run: EmbeddingRun,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
) -> StepResult:
    """Embed one shard's valid images (or captions) and write its table."""
    asset_name = run.source.embedding_asset
    rows, versions = read_with_versions(
        catalog, CORPUS_ASSET, [shard], lambda: read_parquet(layout.corpus_images(shard))
    )
    with Progress(rows.height, f"{asset_name}[{shard}]", log=log) as progress:
        result = embed_rows(
            rows,
            run.encoder,
            run.limits,
            run.batch_size,
            run.num_workers,
            run.device,
            on_progress=progress.update,
            image_decode=run.image_decode,
        )
    path = layout.shard_table(asset_name, shard)
    write_embedding_table(path, result.ids, result.vectors, run.encoder.model_id)
    skipped = pl.DataFrame(
        result.skipped,
        schema={"image_id": pl.String, "reason": pl.String, "detail": pl.String},
        orient="row",
    )
    expected = rows.filter(~pl.col("image_id").is_in(skipped["image_id"].implode()))
    return StepResult(
        partition=shard,
        outputs={"embeddings": path},
        row_counts={"embedded": len(result.ids), "skipped": skipped.height},
        row_count_key="embedded",
        config={
            "batch_size": run.batch_size,
            "dtype": str(run.dtype),
            "device": str(run.device),
        },
        model_ids={run.source.name: run.encoder.model_id},
        input_versions={f"{CORPUS_ASSET}/{p}": v for p, v in versions.items()},
        rows={"quarantine_log": _skipped_rows(skipped, rows, asset_name, shard)},
        outcomes=check_embeddings(result.ids, result.vectors, expected["image_id"].to_list()),
        metadata={
            "model_id": run.encoder.model_id,
            "dim": run.encoder.dim,
            "items_per_s": round(result.items_per_s, 1),
        },
        preview=skipped.head(10) if skipped.height else None,
    )


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


def recheck_embedding_shard(
    source: SimilaritySource, shard: str, layout: DataLayout, catalog: LineageCatalog
) -> list:
    """The embedding checks on the shard's table as it is on disk (read-only)."""
    from megapairs_assets.embeddings.compute import read_embedding_table

    ids, vectors = read_embedding_table(layout.shard_table(source.embedding_asset, shard))
    corpus_ids = read_parquet(layout.corpus_images(shard), columns=["image_id", "source_uri"])
    skipped = catalog.query(
        "SELECT source_uri FROM quarantine_log WHERE stage = ? AND shard = ?",
        [source.embedding_asset, shard],
    )
    expected = corpus_ids.filter(~pl.col("source_uri").is_in(skipped["source_uri"].implode()))
    return check_embeddings(list(ids), vectors, expected["image_id"].to_list())
