"""One shard of one embedding table, as plain work (the three tables share this one path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass

import polars as pl
import torch

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.step import ASSET_NAME as CORPUS_ASSET
from megapairs_assets.embeddings.compute import (
    EmbeddingResult,
    check_embeddings,
    embed_row_groups,
    write_embedding_table,
)
from megapairs_assets.embeddings.encoders import LoadedEncoder
from megapairs_assets.embeddings.sources import SimilaritySource
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, read_parquet
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions

# Corpus rows per input stream (see `embed_shards`): about ten img2dataset shards, so the
# pipeline's start-up is paid once per ten, and the rows' metadata stays a few hundred MB at most.
STREAM_WINDOW_ROWS = 100_000

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
    (result,) = embed_shards([shard], run, layout, catalog, log)
    return result


def embed_shards(
    shards: Sequence[str],
    run: EmbeddingRun,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
    window_rows: int = STREAM_WINDOW_ROWS,
) -> Iterator[StepResult]:
    """`embed_shard` for each of `shards`, in order, through one input pipeline per window.

    Shards are taken in windows of about `window_rows` corpus rows (at least one shard): the
    window's rows go through `embed_row_groups` as one stream, so decode workers, reader threads
    and the device queue do not start again for each shard, and each shard's table is written
    as soon as its last row is done. A window bounds the corpus rows held in memory.
    """
    window: list[tuple[str, pl.DataFrame, dict[str, str]]] = []
    for index, shard in enumerate(shards):
        try:
            rows, versions = read_with_versions(
                catalog,
                CORPUS_ASSET,
                [shard],
                lambda shard=shard: read_parquet(layout.corpus_images(shard)),
                required=True,
            )
        except Exception:
            # The shards before it are embedded and handed out first; the error then surfaces
            # when this shard is asked for, so it fails this shard, not the first of its window.
            if window:
                yield from _embed_window(window, run, layout, log)
            raise
        window.append((shard, rows, versions))
        if sum(rows.height for _, rows, _ in window) >= window_rows or index == len(shards) - 1:
            yield from _embed_window(window, run, layout, log)
            window = []


def _embed_window(
    window: list[tuple[str, pl.DataFrame, dict[str, str]]],
    run: EmbeddingRun,
    layout: DataLayout,
    log: Callable[[str], None],
) -> Iterator[StepResult]:
    asset_name = run.source.embedding_asset
    shards = [shard for shard, _, _ in window]
    label = shards[0] if len(shards) == 1 else f"{shards[0]}..{shards[-1]}"
    inputs = {shard: (rows, versions) for shard, rows, versions in window}
    total = sum(rows.height for _, rows, _ in window)
    with Progress(total, f"{asset_name}[{label}]", log=log) as progress:
        results = embed_row_groups(
            [(shard, rows) for shard, rows, _ in window],
            run.encoder,
            run.limits,
            run.batch_size,
            run.num_workers,
            run.device,
            on_progress=progress.update,
            image_decode=run.image_decode,
        )
        for shard, result in results:
            rows, versions = inputs.pop(shard)
            yield _shard_result(shard, rows, versions, result, run, layout)


def _shard_result(
    shard: str,
    rows: pl.DataFrame,
    versions: dict[str, str],
    result: EmbeddingResult,
    run: EmbeddingRun,
    layout: DataLayout,
) -> StepResult:
    """Write one shard's table and describe it."""
    asset_name = run.source.embedding_asset
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
