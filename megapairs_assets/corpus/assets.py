"""Dagster wiring of the image corpus: one partition per shard, and a sensor for new shards."""

from pathlib import Path

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
from megapairs_assets.corpus.images import open_image_rgb
from megapairs_assets.corpus.sources import (
    ShardReadError,
    SourceSpec,
    iter_shard_records,
    list_shards,
)
from megapairs_assets.corpus.table import (
    build_shard_table,
    check_corpus,
    check_cross_shard_duplicates,
    shard_error_table,
)
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.partitions import (
    SHARD_BACKFILL_POLICY,
    SHARD_PARTITIONS_NAME,
    shard_partitions,
)
from megapairs_assets.progress import Progress
from megapairs_assets.storage import write_parquet_atomic
from resources.corpus import CorpusSourceResource
from resources.storage import LineageCatalogResource, StorageResource

ASSET_NAME = "image_corpus"
CODE_VERSION = "corpus-v1"
CORPUS_CHECKS = {
    "corpus_ids_unique": "Every image_id appears once (ids are corpus-unique by construction)",
    "corpus_rows_complete": "Required columns are filled and every image meets the size limits",
}
CROSS_SHARD_CHECKS = {
    "corpus_content_unique_across_shards": "No image repeats the exact bytes of another shard's",
}


@dg.asset(
    name=ASSET_NAME,
    partitions_def=shard_partitions,
    group_name="corpus",
    code_version=CODE_VERSION,
    kinds={"parquet", "duckdb"},
    backfill_policy=SHARD_BACKFILL_POLICY,
    check_specs=[
        *check_specs(ASSET_NAME, CORPUS_CHECKS, blocking=True),
        # Copies across shards are worth knowing about but poison nothing downstream.
        *check_specs(ASSET_NAME, CROSS_SHARD_CHECKS, blocking=False),
    ],
)
def image_corpus(
    context: dg.AssetExecutionContext,
    corpus_source: CorpusSourceResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """The image corpus of one shard: valid images with captions, and a quarantine table.

    Every input is read once and validated (decodable, size limits, duplicate keys and
    content). Rejected inputs get a quarantine row with a reason; the rest of the shard goes on.
    Output per shard: `images.parquet` (image_id, source_uri, caption, width, height,
    content_hash, ...) and `quarantine.parquet` (source_uri, reason, detail).
    """
    layout = storage.layout()
    spec, limits = corpus_source.spec(), corpus_source.limits()
    lineage = catalog.catalog()
    outcomes, per_shard, quarantine_all, previews = [], [], [], []
    for shard in partition_keys(context):
        recorder = StepRecorder(
            lineage, ASSET_NAME, context.run.run_id, CODE_VERSION, storage.profile, shard
        )
        with Progress(None, f"{ASSET_NAME}[{shard}]", "images", log=context.log.info) as progress:
            try:
                images, quarantine = build_shard_table(
                    shard, iter_shard_records(spec, shard), limits, on_progress=progress.update
                )
            except ShardReadError as error:
                context.log.warning(f"shard {shard} is unreadable: {error}")
                images = build_shard_table(shard, [], limits)[0]
                quarantine = shard_error_table(shard, _shard_uri(spec, shard), error)
        images_path, quarantine_path = layout.corpus_images(shard), layout.corpus_quarantine(shard)
        write_parquet_atomic(images, images_path)
        write_parquet_atomic(quarantine, quarantine_path)
        outcomes += check_corpus(images, limits.min_side_px)
        outcomes.append(check_cross_shard_duplicates(images, _other_shards(lineage, shard, images)))
        recorder.finish(
            config={"source": spec.__dict__, "limits": limits.__dict__},
            row_counts={"images": images.height, "quarantined": quarantine.height},
            output_paths={"images": str(images_path), "quarantine": str(quarantine_path)},
            rows={
                "image_lineage": images.select(
                    "image_id",
                    "shard",
                    "key",
                    "source_uri",
                    "caption",
                    "content_hash",
                    "width",
                    "height",
                ),
                "quarantine_log": quarantine.select(
                    pl.lit(ASSET_NAME).alias("stage"),
                    "shard",
                    "key",
                    "source_uri",
                    "reason",
                    "detail",
                ),
            },
        )
        per_shard.append(
            {"shard": shard, "images": images.height, "quarantined": quarantine.height}
        )
        quarantine_all.append(quarantine)
        if len(previews) < 12:
            previews += _preview_images(images.head(12 - len(previews)), limits)
    quarantine_frame = pl.concat(quarantine_all) if quarantine_all else pl.DataFrame()
    reasons = (
        quarantine_frame.group_by("reason").len().sort("len", descending=True)
        if quarantine_frame.height
        else pl.DataFrame({"reason": [], "len": []})
    )
    total = sum(row["images"] for row in per_shard)
    return dg.MaterializeResult(
        metadata={
            "dagster/row_count": total,
            "images": total,
            "quarantined": quarantine_frame.height,
            "shards": markdown_table(pl.DataFrame(per_shard)),
            "quarantine_by_reason": dg.MetadataValue.md(markdown_table(reasons)),
            "thumbnails": dg.MetadataValue.md(thumbnail_markdown(previews)),
            "path": dg.MetadataValue.path(str(layout.data_dir / ASSET_NAME)),
        },
        check_results=check_results(outcomes, ASSET_NAME, warning_checks=CROSS_SHARD_CHECKS),
    )


def _other_shards(lineage: LineageCatalog, shard: str, images: pl.DataFrame) -> pl.DataFrame:
    """Images of other shards, already in the catalog, that share a content hash with these."""
    return lineage.query(
        "SELECT image_id, content_hash FROM image_lineage "
        "WHERE shard <> ? AND content_hash IN (SELECT unnest(?))",
        [shard, images["content_hash"].to_list()],
    )


def _shard_uri(spec: SourceSpec, shard: str) -> str:
    """The file a whole-shard error points at (the tar itself for webdataset shards)."""
    return str(Path(spec.path) / f"{shard}.tar") if spec.kind == "webdataset" else spec.path


def _preview_images(images: pl.DataFrame, limits) -> list:
    previews = []
    for uri in images["source_uri"].to_list():
        try:
            previews.append(open_image_rgb(uri, limits, max_side_px=64))
        except Exception:  # a preview must never fail the asset
            continue
    return previews


@dg.sensor(
    name="new_shards_sensor",
    minimum_interval_seconds=60,
    default_status=dg.DefaultSensorStatus.RUNNING,
    asset_selection=[ASSET_NAME],
)
def new_shards_sensor(
    context: dg.SensorEvaluationContext, corpus_source: CorpusSourceResource
) -> dg.SensorResult | dg.SkipReason:
    """Registers shards that appeared in the corpus source and materializes their corpus."""
    try:
        found = list_shards(corpus_source.spec())
    except Exception as error:  # a bad source must not kill the sensor daemon
        return dg.SkipReason(f"corpus source unreadable: {error}")
    known = set(context.instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME))
    new = [shard for shard in found if shard not in known]
    if not new:
        return dg.SkipReason(f"no new shards ({len(found)} known)")
    return dg.SensorResult(
        run_requests=[dg.RunRequest(partition_key=shard) for shard in new],
        dynamic_partitions_requests=[shard_partitions.build_add_request(new)],
    )
