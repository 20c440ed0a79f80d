"""Step 6 of the method: triplets in the MegaPairs release schema, with row-level lineage.

One triplet per pair that kept enough instructions: `q_img` (query image), `q_text` (its
instructions; training samples one), `t_img` (target image) and `hns` (hard negatives, the
query image first). Image fields are paths relative to the export folder
(`images/<shard>/<key>.jpg`, see `common.image_relpath`), so the table and the exported images
travel together. Written as Parquet (with ids and generators beside the release fields) and as
JSON Lines (the four release fields only).

`megapairs lineage <triplet id>` reads the triplet lineage rows (lineage/report.py);
`generation_summary` is what the demo prints.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import polars as pl

from megapairs_assets.corpus.images import ImageLimits, open_image_rgb
from megapairs_assets.generation.common import (
    DESCRIPTIONS_ASSET,
    INSTRUCTIONS_ASSET,
    PAIRS_ASSET,
    TRIPLETS_ASSET,
    QuarantineLog,
    counts_by,
    export_dir,
    image_relpath,
    lookup_images,
    read_shard_table,
)
from megapairs_assets.generation.instruct import instruction_limits_for
from megapairs_assets.generation.settings import GenerationSettings
from megapairs_assets.lib.preview import thumbnail_markdown
from megapairs_assets.lib.quality import CheckOutcome, outcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import (
    DataLayout,
    DataPath,
    read_parquet,
    write_atomic,
    write_parquet_atomic,
)
from megapairs_assets.lineage.catalog import LineageCatalog, RowTable, register_row_table

TRIPLET_ID_PREFIX = "t-"
RELEASE_FIELDS = ("q_img", "q_text", "t_img", "hns")
_PREVIEW_TRIPLETS = 3

TRIPLET_SCHEMA = pl.Schema(
    {
        "triplet_id": pl.String,
        "pair_id": pl.String,
        "q_img": pl.String,
        "q_text": pl.List(pl.String),
        "t_img": pl.String,
        "hns": pl.List(pl.String),
        "query_id": pl.String,
        "target_id": pl.String,
        "hard_negative_ids": pl.List(pl.String),
        "sources": pl.List(pl.String),
        "description": pl.String,
        "description_generator": pl.String,
        "instruction_generator": pl.String,
    }
)
"""Release fields (q_img, q_text, t_img, hns) plus the ids and generators behind each row."""
RELEASE_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "triplet_id": "stable id of the triplet: 't-' + its pair_id",
    "q_img": "the query image, as a path relative to the export folder (images/...)",
    "q_text": "the instructions: each, with q_img, asks for t_img",
    "t_img": "the target image, as a path relative to the export folder",
    "hns": "hard negatives as relative paths: the query image first, then other targets of "
    "the same query",
}
"""The MegaPairs release fields (and our triplet id), as the export writes them."""
TRIPLET_COLUMN_DESCRIPTIONS: dict[str, str] = {
    **RELEASE_COLUMN_DESCRIPTIONS,
    "pair_id": "the mined pair behind the triplet (mined_image_pairs.pair_id)",
    "query_id": "image_id of q_img",
    "target_id": "image_id of t_img",
    "hard_negative_ids": "image_ids of hns, in the same order",
    "sources": "the similarity sources that proposed the pair",
    "description": "the pair description the instructions were written from",
    "description_generator": "who wrote the description (pair_descriptions.generator)",
    "instruction_generator": "who wrote the instructions (pair_instructions.generator)",
}

TRIPLET_CHECKS = {
    "hns_start_with_query": "hns[0] is the query image (q_img)",
    "target_not_in_hns": "t_img never appears among the hard negatives",
    "enough_q_text": "Every triplet has at least the minimum number of instructions (3)",
    "triplet_ids_unique": "Each triplet_id appears once",
    "image_paths_relative": "Image fields are relative paths under images/ (no '..', no root)",
}

TRIPLET_LINEAGE = register_row_table(
    RowTable(
        "triplet_lineage",
        (
            ("triplet_id", "VARCHAR"),
            ("pair_id", "VARCHAR"),
            ("shard", "VARCHAR"),
            ("query_id", "VARCHAR"),
            ("target_id", "VARCHAR"),
            ("hard_negative_ids", "VARCHAR[]"),
            ("instruction_count", "INTEGER"),
            ("description_generator", "VARCHAR"),
            ("description_model", "VARCHAR"),
            ("description_template", "VARCHAR"),
            ("word_num", "INTEGER"),
            ("description_request_key", "VARCHAR"),
            ("instruction_generator", "VARCHAR"),
            ("instruction_model", "VARCHAR"),
            ("instruction_template", "VARCHAR"),
            ("demo_ids", "VARCHAR[]"),
            ("instruction_request_key", "VARCHAR"),
            ("input_versions", "VARCHAR"),
            ("description_served_model", "VARCHAR"),
            ("instruction_served_model", "VARCHAR"),
        ),
        description=(
            "Every triplet of the current triplets materialization of each shard, with the "
            "generators behind its texts; joined with runs and image uris: view "
            "triplet_provenance."
        ),
        column_docs=(
            ("triplet_id", "'t-' + pair_id"),
            ("pair_id", "pair_lineage.pair_id it was made from"),
            ("shard", "the pair's shard (the partition that built it)"),
            ("query_id", "image id of q_img"),
            ("target_id", "image id of t_img"),
            ("hard_negative_ids", "image ids of hns; the first is the query image"),
            ("instruction_count", "how many instructions (q_text) it kept"),
            ("description_generator", "who wrote the pair description (model or heuristic)"),
            ("description_model", "the model id (name@revision or file) of the description"),
            ("description_template", "prompt template name#hash of the description"),
            ("word_num", "the WORD_NUM the description prompt asked for"),
            ("description_request_key", "cache key of the description request"),
            ("instruction_generator", "who wrote the instructions (model or heuristic)"),
            ("instruction_model", "the model id of the instructions"),
            ("instruction_template", "prompt template name#hash of the instructions"),
            ("demo_ids", "in-context demonstrations the instruction prompt showed"),
            ("instruction_request_key", "cache key of the instruction request"),
            ("input_versions", "JSON: 'asset/shard' -> materialization id of the tables read"),
            (
                "description_served_model",
                "the model the server said wrote the description (a server may serve "
                "description_model under another name, or another model); null for rows "
                "written before this was recorded",
            ),
            ("instruction_served_model", "likewise, for the instructions"),
        ),
    )
)


def triplet_id_for(pair_id: str) -> str:
    """A triplet's id: its pair id with a prefix, so `megapairs lineage` tells them apart."""
    return f"{TRIPLET_ID_PREFIX}{pair_id}"


def build_triplets_for_shard(
    shard: str,
    layout: DataLayout,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    *,
    log: Callable[[str], None] | None = None,
) -> StepResult:
    """Join one shard's pairs, descriptions and instructions into release-schema triplets.

    The shard's triplet count is logged once, by the shard step's summary of the returned
    result; `log` hears only what that summary does not say (instructions left without a mined
    pair, each quarantined as `pair_not_found`).
    """
    pairs, pair_versions = read_shard_table(catalog, layout, PAIRS_ASSET, shard)
    descriptions, description_versions = read_shard_table(
        catalog, layout, DESCRIPTIONS_ASSET, shard
    )
    instructions, instruction_versions = read_shard_table(
        catalog, layout, INSTRUCTIONS_ASSET, shard
    )
    versions = {**pair_versions, **description_versions, **instruction_versions}
    joined = (
        instructions.select(
            "pair_id",
            pl.col("instructions").alias("q_text"),
            pl.col("generator").alias("instruction_generator"),
            pl.col("model_id").alias("instruction_model"),
            _served_model(instructions).alias("instruction_served_model"),
            (pl.col("template_id") + "#" + pl.col("template_hash").str.slice(0, 12)).alias(
                "instruction_template"
            ),
            "demo_ids",
            pl.col("request_key").alias("instruction_request_key"),
        )
        .join(
            descriptions.select(
                "pair_id",
                "description",
                pl.col("generator").alias("description_generator"),
                pl.col("model_id").alias("description_model"),
                _served_model(descriptions).alias("description_served_model"),
                (pl.col("template_id") + "#" + pl.col("template_hash").str.slice(0, 12)).alias(
                    "description_template"
                ),
                "word_num",
                pl.col("request_key").alias("description_request_key"),
            ),
            on="pair_id",
            how="inner",
        )
        .join(
            pairs.select("pair_id", "query_id", "target_id", "sources", "hard_negative_ids"),
            on="pair_id",
            how="inner",
        )
        .sort("pair_id")
    )
    quarantine = QuarantineLog(TRIPLETS_ASSET, shard)
    orphans = sorted(set(instructions["pair_id"]) - set(joined["pair_id"]))
    for pair_id in orphans:
        quarantine.add(pair_id, None, "pair_not_found", "instructions without a mined pair")
    triplets = _release_rows(joined)
    parquet_path = layout.shard_table(TRIPLETS_ASSET, shard)
    jsonl_path = parquet_path.with_suffix(".jsonl")
    write_parquet_atomic(triplets, parquet_path)
    write_release_jsonl(triplets, jsonl_path)
    if orphans and log is not None:
        pairs_word = (
            "1 pair's instructions have"
            if len(orphans) == 1
            else f"{len(orphans)} pairs' instructions have"
        )
        log(f"{TRIPLETS_ASSET}[{shard}]: {pairs_word} no mined pair (quarantined: pair_not_found)")

    lineage_rows = joined.select(
        (pl.lit(TRIPLET_ID_PREFIX) + pl.col("pair_id")).alias("triplet_id"),
        "pair_id",
        pl.lit(shard).alias("shard"),
        "query_id",
        "target_id",
        "hard_negative_ids",
        pl.col("q_text").list.len().cast(pl.Int32).alias("instruction_count"),
        "description_generator",
        "description_model",
        "description_template",
        pl.col("word_num").cast(pl.Int32),
        "description_request_key",
        "instruction_generator",
        "instruction_model",
        "instruction_template",
        "demo_ids",
        "instruction_request_key",
        pl.lit(json.dumps(versions, sort_keys=True)).alias("input_versions"),
        "description_served_model",
        "instruction_served_model",
    )
    # The instruction template's minimum, as pair_instructions applied it (a user's template
    # may ask for fewer or more than the default three).
    min_instructions = instruction_limits_for(settings).min_instructions
    return StepResult(
        partition=shard,
        outputs={"triplets": parquet_path, "triplets_jsonl": jsonl_path},
        row_counts={"triplets": triplets.height},
        row_count_key="triplets",
        config={"min_instructions": min_instructions, "release_fields": list(RELEASE_FIELDS)},
        input_versions=versions,
        model_ids={
            "describe": settings.describe.backend.model_id,
            "instruct": settings.instruct.backend.model_id,
            "heuristic": settings.heuristic.model_id,
        },
        rows={TRIPLET_LINEAGE.name: lineage_rows, "quarantine_log": quarantine.frame()},
        outcomes=check_triplets(triplets, min_instructions),
        preview=triplets.select("triplet_id", "q_img", "q_text", "t_img").head(5),
        metadata={
            "pairs": pairs.height,
            "pairs_without_triplet": pairs.height - triplets.height,
            "instructions": int(triplets["q_text"].list.len().sum()) if triplets.height else 0,
            "description_generators": counts_by(triplets, "description_generator"),
            "instruction_generators": counts_by(triplets, "instruction_generator"),
        },
        markdown={"examples": triplet_examples_markdown(catalog, triplets)},
    )


def _served_model(table: pl.DataFrame) -> pl.Expr:
    """A generation table's `served_model` column; null for a table written before it existed
    (a re-run keeps such rows until their shard is generated again)."""
    if "served_model" in table.columns:
        return pl.col("served_model")
    return pl.lit(None, dtype=pl.String)


def _release_rows(joined: pl.DataFrame) -> pl.DataFrame:
    if joined.is_empty():
        return pl.DataFrame(schema=TRIPLET_SCHEMA)
    rows = []
    for row in joined.iter_rows(named=True):
        rows.append(
            {
                "triplet_id": triplet_id_for(row["pair_id"]),
                "pair_id": row["pair_id"],
                "q_img": image_relpath(row["query_id"]),
                "q_text": row["q_text"],
                "t_img": image_relpath(row["target_id"]),
                "hns": [image_relpath(i) for i in row["hard_negative_ids"]],
                "query_id": row["query_id"],
                "target_id": row["target_id"],
                "hard_negative_ids": row["hard_negative_ids"],
                "sources": row["sources"],
                "description": row["description"],
                "description_generator": row["description_generator"],
                "instruction_generator": row["instruction_generator"],
            }
        )
    return pl.DataFrame(rows, schema=TRIPLET_SCHEMA)


def write_release_jsonl(triplets: pl.DataFrame, path: DataPath) -> None:
    """The four release fields per line, in the table's order, atomically."""

    def write(tmp: Path) -> None:
        with tmp.open("w", encoding="utf-8") as out:
            for row in triplets.select(RELEASE_FIELDS).iter_rows(named=True):
                out.write(json.dumps(row, ensure_ascii=False) + "\n")

    write_atomic(path, write)


def check_triplets(triplets: pl.DataFrame, min_instructions: int) -> list[CheckOutcome]:
    """The blocking checks of triplets (names in TRIPLET_CHECKS)."""
    ids = triplets["triplet_id"]

    def failing(mask: pl.Expr) -> list[str]:
        return triplets.filter(mask)["triplet_id"].to_list()

    path_columns = pl.concat_list(pl.col("q_img"), pl.col("t_img"), pl.col("hns"))
    bad_path = path_columns.list.eval(
        ~pl.element().str.starts_with("images/") | pl.element().str.contains(r"(^|/)\.\.(/|$)")
    ).list.any()
    return [
        outcome(
            "hns_start_with_query",
            failing((pl.col("hns").list.first() != pl.col("q_img")).fill_null(True)),
            "hns[0] == q_img",
        ),
        outcome(
            "target_not_in_hns",
            failing(pl.col("hns").list.contains(pl.col("t_img")).fill_null(False)),
            "t_img not in hns",
        ),
        outcome(
            "enough_q_text",
            failing(pl.col("q_text").list.len() < min_instructions),
            f"at least {min_instructions} instructions per triplet",
        ),
        outcome(
            "triplet_ids_unique",
            ids.filter(ids.is_duplicated()).unique().to_list(),
            "triplet ids are unique",
        ),
        outcome("image_paths_relative", failing(bad_path.fill_null(True)), "relative image paths"),
    ]


def triplet_examples_markdown(
    catalog: LineageCatalog, triplets: pl.DataFrame, count: int = _PREVIEW_TRIPLETS
) -> str:
    """A few triplets a person reads at a glance: thumbnails, description, instructions.

    Model-written triplets come first when there are any (they are the interesting ones).
    """
    if triplets.is_empty():
        return "_(no triplets)_"
    ordered = triplets.sort(
        pl.col("description_generator").str.starts_with("heuristic"), "triplet_id"
    ).head(count)
    images = lookup_images(catalog, ordered["query_id"].to_list() + ordered["target_id"].to_list())
    blocks = []
    for row in ordered.iter_rows(named=True):
        pictures = []
        for image_id in (row["query_id"], row["target_id"]):
            try:
                pictures.append(
                    open_image_rgb(images[image_id]["source_uri"], ImageLimits(), max_side_px=96)
                )
            except Exception:  # a preview must never fail the asset
                continue
        queries = "\n".join(f"- {text}" for text in row["q_text"])
        blocks.append(
            f"**{row['triplet_id']}** query -> target: {thumbnail_markdown(pictures, 96)}\n\n"
            f"_{row['description_generator']}:_ {row['description']}\n\n"
            f"_instructions ({row['instruction_generator']}):_\n{queries}"
        )
    return "\n\n---\n\n".join(blocks)


# -- reports --------------------------------------------------------------------------------


def generation_summary(
    layout: DataLayout, shards: Sequence[str], export_root: DataPath | None = None
) -> str | None:
    """Lines for the demo's closing summary: triplet count, generators, one sample triplet.

    `export_root` defaults to the default export folder (`<data root>/data/triplet_export`).
    """
    triplets = _current_triplets(layout, shards)
    if triplets is None:
        return None
    lines = [
        f"  triplets:    {triplets.height} "
        f"({int(triplets['q_text'].list.len().sum()) if triplets.height else 0} instructions)"
    ]
    for column, label in (
        ("description_generator", "descriptions by"),
        ("instruction_generator", "instructions by"),
    ):
        counts = counts_by(triplets, column)
        listed = ", ".join(f"{k} x{v}" for k, v in counts.items())
        lines.append(f"    {label}: {listed or 'none'}")
    sample = _sample(triplets)
    if sample is not None:
        lines += [
            f"  sample triplet {sample['triplet_id']} ({sample['description_generator']}):",
            f"    q_img:  {sample['q_img']}",
            f"    q_text: {json.dumps(sample['q_text'], ensure_ascii=False)}",
            f"    t_img:  {sample['t_img']}",
            f"    hns:    {json.dumps(sample['hns'])}",
            f"  trace a triplet: megapairs lineage {sample['triplet_id']}",
        ]
    export_root = export_root or export_dir(layout, None)
    if (export_root / "README.md").is_file():
        lines.append(f"  export:      {export_root} (dataset card: README.md)")
    return "\n".join(lines)


def sample_query(
    layout: DataLayout, shards: Sequence[str], export_root: DataPath | None = None
) -> tuple[DataPath, str] | None:
    """The summary's sample triplet as a query to try a retriever with: its exported query
    image and first instruction; None before anything was exported."""
    triplets = _current_triplets(layout, shards)
    sample = _sample(triplets) if triplets is not None else None
    if sample is None or not sample["q_text"]:
        return None
    image = (export_root or export_dir(layout, None)) / sample["q_img"]
    return (image, sample["q_text"][0]) if image.is_file() else None


def _current_triplets(layout: DataLayout, shards: Sequence[str]) -> pl.DataFrame | None:
    paths = [layout.shard_table(TRIPLETS_ASSET, s) for s in shards]
    tables = [read_parquet(p) for p in paths if p.exists()]
    return pl.concat(tables) if tables else None


def _sample(triplets: pl.DataFrame) -> dict[str, Any] | None:
    """One triplet to show: a model-written one when there is any, else the first by id."""
    if not triplets.height:
        return None
    return triplets.sort(
        pl.col("description_generator").str.starts_with("heuristic"), "triplet_id"
    ).row(0, named=True)
