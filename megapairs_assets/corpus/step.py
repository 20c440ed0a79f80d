"""One shard of the image corpus, as plain work: read, validate, quarantine, write, check.

`build_corpus_shard` is what the `image_corpus` asset runs per partition; benchmarks and tests
call it directly. It also declares the corpus's row table in the lineage catalog.
"""

from __future__ import annotations

from collections.abc import Callable

import polars as pl

from megapairs_assets.corpus.images import ImageLimits, open_image_rgb
from megapairs_assets.corpus.sources import (
    ShardReadError,
    SourceListings,
    SourceSpec,
    count_shard_records,
    iter_shard_records,
    shard_uri,
)
from megapairs_assets.corpus.table import (
    CORPUS_COLUMN_DESCRIPTIONS,
    build_shard_table,
    check_corpus,
    check_cross_shard_duplicates,
    shard_error_table,
)
from megapairs_assets.lib.preview import markdown_table, thumbnail_markdown
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, read_parquet, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, RowTable, register_row_table
from megapairs_assets.lineage.id_lists import IN_IDS, id_list

ASSET_NAME = "image_corpus"
CORPUS_CHECKS = {
    "corpus_ids_unique": "Every image_id appears once (ids are corpus-unique by construction)",
    "corpus_rows_complete": "Required columns are filled and every image meets the size limits",
}
# Copies across shards are worth knowing about but poison nothing downstream (mining drops
# byte-identical targets and negatives itself).
CROSS_SHARD_CHECKS = {
    "corpus_content_unique_across_shards": "No image repeats the exact bytes of another shard's",
}

_IMAGE_LINEAGE_COLUMNS = (
    ("image_id", "VARCHAR"),
    ("shard", "VARCHAR"),
    ("key", "VARCHAR"),
    ("source_uri", "VARCHAR"),
    ("caption", "VARCHAR"),
    ("content_hash", "VARCHAR"),
    ("width", "INTEGER"),
    ("height", "INTEGER"),
)
IMAGE_LINEAGE = register_row_table(
    RowTable(
        "image_lineage",
        _IMAGE_LINEAGE_COLUMNS,
        description=(
            "Every valid image of the current image_corpus materialization of each shard "
            "(rejected inputs: quarantine_log, stage image_corpus)."
        ),
        # The same words as the corpus table's own column descriptions.
        column_docs=tuple(
            (name, CORPUS_COLUMN_DESCRIPTIONS[name]) for name, _ in _IMAGE_LINEAGE_COLUMNS
        ),
    )
)

_PREVIEW_IMAGES = 8


def build_corpus_shard(
    shard: str,
    spec: SourceSpec,
    limits: ImageLimits,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
    listings: SourceListings | None = None,
) -> StepResult:
    """Read and validate one shard; write its images and quarantine tables.

    `listings`: the folder listings the run's shards share (`SourceListings`: the asset makes
    one per step); None makes one for this shard, so its count and its read list it once.
    """
    listings = listings or SourceListings()
    # A total (tar headers, folder listing or manifest rows) gives the run log and bar an ETA.
    total = count_shard_records(spec, shard, listings)
    with Progress(total, f"{ASSET_NAME}[{shard}]", "items", log=log) as progress:
        try:
            records = iter_shard_records(spec, shard, listings)
            images, quarantine = build_shard_table(
                shard, records, limits, on_progress=progress.update
            )
        except ShardReadError as error:
            log(f"shard {shard} is unreadable: {error}")
            images = build_shard_table(shard, [], limits)[0]
            quarantine = shard_error_table(shard, shard_uri(spec, shard), error)
    images_path, quarantine_path = layout.corpus_images(shard), layout.corpus_quarantine(shard)
    write_parquet_atomic(images, images_path)
    write_parquet_atomic(quarantine, quarantine_path)
    outcomes = check_corpus(images, limits.min_side_px)
    outcomes.append(
        check_cross_shard_duplicates(images, other_shard_copies(catalog, shard, images))
    )
    reasons = quarantine.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    # Kept images whose caption is missing for a reason (or decoded by a guess): the image rows
    # say why in `caption_issue`; the count makes them visible without opening the table.
    caption_issues = int(images["caption_issue"].is_not_null().sum())
    if caption_issues:
        log(f"shard {shard}: {caption_issues} kept images have a caption issue (caption_issue)")
    return StepResult(
        partition=shard,
        outputs={"images": images_path, "quarantine": quarantine_path},
        row_counts={
            "images": images.height,
            "quarantined": quarantine.height,
            "caption_issues": caption_issues,
        },
        row_count_key="images",
        config={"source": spec.__dict__, "limits": limits.__dict__},
        rows={
            IMAGE_LINEAGE.name: images.select(name for name, _ in IMAGE_LINEAGE.columns),
            "quarantine_log": quarantine.select(
                pl.lit(ASSET_NAME).alias("stage"),
                "shard",
                "key",
                "source_uri",
                "reason",
                "detail",
            ),
        },
        outcomes=outcomes,
        preview=images.select("image_id", "caption", "width", "height").head(10),
        markdown={
            "quarantine_by_reason": markdown_table(reasons),
            "thumbnails": corpus_thumbnails(images, limits),
        },
    )


def other_shard_copies(catalog: LineageCatalog, shard: str, images: pl.DataFrame) -> pl.DataFrame:
    """Images of other shards, already in the catalog, that share a content hash with these."""
    return catalog.query(
        "SELECT image_id, content_hash FROM image_lineage "
        f"WHERE shard <> ? AND content_hash {IN_IDS}",
        [shard, id_list(images["content_hash"].to_list())],
    )


def content_hashes(catalog: LineageCatalog, image_ids: list[str]) -> pl.DataFrame:
    """image_id -> content_hash for the given ids (what mining needs to drop exact copies)."""
    return catalog.query(
        f"SELECT image_id, content_hash FROM image_lineage WHERE image_id {IN_IDS}",
        [id_list(image_ids)],
    )


def image_uris(catalog: LineageCatalog, image_ids: list[str]) -> dict[str, str]:
    """image_id -> source uri, for previews."""
    frame = catalog.query(
        f"SELECT image_id, source_uri FROM image_lineage WHERE image_id {IN_IDS}",
        [id_list(sorted(set(image_ids)))],
    )
    return dict(zip(frame["image_id"], frame["source_uri"], strict=True))


def corpus_thumbnails(images: pl.DataFrame, limits: ImageLimits) -> str:
    """The shard's first images as a small table: thumbnail, image_id, caption."""
    lines = ["| image | image_id | caption |", "|---|---|---|"]
    for row in images.head(_PREVIEW_IMAGES).iter_rows(named=True):
        try:
            image = open_image_rgb(row["source_uri"], limits, max_side_px=64)
        except Exception:  # a preview must never fail the asset
            continue
        caption = (row["caption"] or "_(no caption)_").replace("|", "\\|")
        lines.append(f"| {thumbnail_markdown([image])} | `{row['image_id']}` | {caption} |")
    return "\n".join(lines) if len(lines) > 2 else "_(no images)_"


def recheck_corpus_shard(shard: str, layout: DataLayout, catalog: LineageCatalog) -> list:
    """The corpus checks on the shard's table as it is on disk (read-only)."""
    config = latest_config(catalog, ASSET_NAME, shard)
    min_side_px = int(config.get("limits", {}).get("min_side_px", ImageLimits().min_side_px))
    images = read_parquet(layout.corpus_images(shard))
    outcomes = check_corpus(images, min_side_px)
    outcomes.append(
        check_cross_shard_duplicates(images, other_shard_copies(catalog, shard, images))
    )
    return outcomes


def latest_config(catalog: LineageCatalog, asset: str, partition: str) -> dict:
    """The config recorded by the newest complete materialization of (asset, partition)."""
    import json

    version = catalog.latest_materialization_ids(asset, [partition]).get(partition)
    if version is None:
        return {}
    record = catalog.materializations([version])
    return json.loads(record["config"][0]) if record.height else {}
