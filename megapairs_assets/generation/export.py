"""The release folder: triplets with their images at 512x512, and a generated dataset card.

Layout of the export folder (default `<data root>/data/triplet_export`):

    README.md                    dataset card, regenerated from every exported current shard
    triplets/<shard>.jsonl       release fields only (q_img, q_text, t_img, hns)
    triplets/<shard>.parquet     release fields plus triplet_id
    images/<shard>/<key>.jpg     every image a triplet names, resized to side x side
    shards/<shard>.json          one shard's figures (what the card is built from)

Image paths in the triplet files are relative to the folder, so it can be moved or uploaded
as is. The folder may be a prefix on an object store (under a URL data root, or a URL
`export_dir`): every file is then one object, written with one PUT; only the lock that keeps
parallel shards from interleaving card rewrites is local (under `<home>/locks/`). MegaPairs
released its images resized to 512x512 (method.md §6); the side is a setting.
An image that cannot be read drops the triplets that name it, each with a quarantine row.
Re-exporting skips images already written at the right size. A shard that left the corpus
(retired) is withdrawn from the folder by the next export: its triplet files and figures, and
its images that no remaining triplet names (its tables under `data/` stay).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import polars as pl
from filelock import FileLock
from PIL import Image

from megapairs_assets.corpus.images import ImageLimits, ImageRejected, open_image_rgb
from megapairs_assets.generation.common import (
    EXPORT_ASSET,
    TRIPLETS_ASSET,
    QuarantineLog,
    counts_by,
    export_dir,
    image_relpath,
    lookup_images,
    read_shard_table,
)
from megapairs_assets.generation.settings import GenerationSettings
from megapairs_assets.generation.triplets import RELEASE_FIELDS, write_release_jsonl
from megapairs_assets.lib.preview import thumbnail_markdown
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.quality import CheckOutcome, outcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import (
    DataLayout,
    DataPath,
    is_local,
    read_parquet,
    write_atomic,
    write_parquet_atomic,
)
from megapairs_assets.lineage.catalog import LineageCatalog

CARD_NAME = "README.md"
EXPORT_CHECKS = {
    "export_paths_exist": "Every image path in the exported triplets exists in the export",
    "export_images_sized": "Every exported image of the shard is side x side pixels",
}
_WRITE_THREADS = 4


def export_triplets_for_shard(
    shard: str,
    layout: DataLayout,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    *,
    log: Callable[[str], None] | None = None,
) -> StepResult:
    """Export one shard's triplets and images, then regenerate the dataset card."""
    triplets, versions = read_shard_table(catalog, layout, TRIPLETS_ASSET, shard)
    root = export_dir(layout, settings.export.export_dir)
    side = settings.export.image_side_px
    quarantine = QuarantineLog(EXPORT_ASSET, shard)
    image_ids = sorted(
        set(triplets["query_id"])
        | set(triplets["target_id"])
        | set(triplets["hard_negative_ids"].explode().drop_nulls())
    )
    sources = lookup_images(catalog, image_ids)
    failed: dict[str, str] = {}
    with Progress(len(image_ids), f"export {shard}", unit="images", log=log) as progress:

        def export_one(image_id: str) -> tuple[str, str | None]:
            error = _export_image(
                sources.get(image_id), root / image_relpath(image_id), side, settings
            )
            progress.update(1)
            return image_id, error

        with ThreadPoolExecutor(_WRITE_THREADS) as pool:
            for image_id, error in pool.map(export_one, image_ids):
                if error is not None:
                    failed[image_id] = error

    exported = triplets
    if failed:
        uses_failed = (
            pl.col("query_id").is_in(list(failed))
            | pl.col("target_id").is_in(list(failed))
            | pl.col("hard_negative_ids").list.eval(pl.element().is_in(list(failed))).list.any()
        )
        for row in triplets.filter(uses_failed).iter_rows(named=True):
            bad = [
                i
                for i in [row["query_id"], row["target_id"], *row["hard_negative_ids"]]
                if i in failed
            ]
            quarantine.add(
                row["triplet_id"],
                sources.get(bad[0], {}).get("source_uri"),
                "export_image_unreadable",
                f"{bad[0]}: {failed[bad[0]]}",
            )
        exported = triplets.filter(~uses_failed)

    jsonl_path = root / "triplets" / f"{shard}.jsonl"
    parquet_path = root / "triplets" / f"{shard}.parquet"
    write_release_jsonl(exported, jsonl_path)
    write_parquet_atomic(exported.select("triplet_id", *RELEASE_FIELDS), parquet_path)
    figures = _shard_figures(shard, exported, settings, catalog, versions)
    write_atomic(
        root / "shards" / f"{shard}.json",
        lambda tmp: tmp.write_text(json.dumps(figures, indent=2, sort_keys=True)),
    )
    card = write_dataset_card(
        root, settings, layout, retired=catalog.retired_partitions(EXPORT_ASSET)
    )
    return StepResult(
        partition=shard,
        outputs={"jsonl": jsonl_path, "parquet": parquet_path, "card": card},
        row_counts={"exported_triplets": exported.height, "images": len(image_ids) - len(failed)},
        row_count_key="exported_triplets",
        config={"image_side_px": side, "export_dir": str(root), "licence": settings.export.licence},
        input_versions=versions,
        rows={"quarantine_log": quarantine.frame()},
        outcomes=check_export(root, exported, [i for i in image_ids if i not in failed], side),
        metadata={"dropped_triplets": triplets.height - exported.height, "export_dir": str(root)},
        markdown={
            "exported_example": exported_example_markdown(root, exported),
            "dataset_card": _read_text(card),
        },
        preview=exported.select("triplet_id", *RELEASE_FIELDS).head(5),
    )


_EXAMPLE_THUMB_PX = 96


def exported_example_markdown(root: DataPath, exported: pl.DataFrame) -> str:
    """The first exported triplet as a user of the release sees it: its instructions and the
    exported query, target and negative images (read back from the export, not the corpus)."""
    if exported.is_empty():
        return "_(nothing exported)_"
    row = exported.row(0, named=True)
    roles = [("query", row["q_img"]), ("target", row["t_img"])]
    roles += [(f"negative {n}", path) for n, path in enumerate(row["hns"][1:], start=1)]
    pictures, names = [], []
    for role, relative in roles:
        try:
            with (root / relative).open("rb") as handle, Image.open(handle) as picture:
                pictures.append(picture.convert("RGB"))
            names.append(role)
        except (OSError, ValueError):  # a preview must never fail the asset
            continue
    instructions = "\n".join(f"- {text}" for text in row["q_text"])
    return (
        f"**{row['triplet_id']}** ({', '.join(names)}): "
        f"{thumbnail_markdown(pictures, _EXAMPLE_THUMB_PX)}\n\n{instructions}"
    )


def _read_text(path: DataPath) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except OSError as error:  # shown in the UI only; the card's own check is the file's presence
        return f"_(dataset card not readable: {error})_"


def _export_image(
    source: dict[str, Any] | None, target: DataPath, side: int, settings: GenerationSettings
) -> str | None:
    """Write one image at side x side unless it is already there; returns an error or None."""
    if _has_size(target, side):
        return None
    if source is None:
        return "not in the catalog's image rows"
    try:
        picture = open_image_rgb(source["source_uri"], ImageLimits(), max_side_px=2 * side)
    except ImageRejected as error:
        return f"{error.reason}: {error.detail}"
    resized = picture.resize((side, side), Image.Resampling.BICUBIC)
    write_atomic(
        target,
        lambda tmp: resized.save(tmp, format="JPEG", quality=settings.export.jpeg_quality),
    )
    return None


def _has_size(path: DataPath, side: int) -> bool:
    return _image_size(path) == (side, side)


def _image_size(path: DataPath) -> tuple[int, int] | None:
    """(width, height) of the image at `path` (a file or an object), None if absent or
    unreadable. PIL reads the header only; an object is fetched with one GET."""
    try:
        with path.open("rb") as handle, Image.open(handle) as existing:
            return existing.size
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _exists(root: DataPath, relpaths: set[str]) -> set[str]:
    """Which of `relpaths` exist under `root`: a stat each on local disk; on an object store
    one listing per image folder named (a HEAD per image would be a request per image)."""
    if is_local(root):
        return {p for p in relpaths if (root / p).is_file()}
    fs, base = root.fs, root.path.rstrip("/")
    found: set[str] = set()
    for folder in sorted({p.rpartition("/")[0] for p in relpaths}):
        try:
            listed = fs.find(f"{base}/{folder}")
        except FileNotFoundError:
            continue
        found.update(key.removeprefix(f"{base}/") for key in listed)
    return relpaths & found


def check_export(
    root: DataPath, exported: pl.DataFrame, image_ids: list[str], side: int
) -> list[CheckOutcome]:
    """The blocking checks of the export (names in EXPORT_CHECKS)."""
    rows = list(exported.select("triplet_id", "q_img", "t_img", "hns").iter_rows(named=True))
    named = {p for row in rows for p in [row["q_img"], row["t_img"], *row["hns"]]}
    present = _exists(root, named)
    missing = [
        f"{row['triplet_id']}: {path}"
        for row in rows
        for path in [row["q_img"], row["t_img"], *row["hns"]]
        if path not in present
    ]
    with ThreadPoolExecutor(_WRITE_THREADS) as pool:
        relpaths = [image_relpath(i) for i in image_ids]
        sizes = pool.map(lambda relpath: _image_size(root / relpath), relpaths)
        wrong_size = [i for i, size in zip(image_ids, sizes, strict=True) if size != (side, side)]
    return [
        outcome("export_paths_exist", missing, "every image path resolves inside the export"),
        outcome("export_images_sized", wrong_size, f"images are {side}x{side}"),
    ]


def _shard_figures(
    shard: str,
    exported: pl.DataFrame,
    settings: GenerationSettings,
    catalog: LineageCatalog,
    versions: dict[str, str],
) -> dict[str, Any]:
    """One shard's numbers for the card, read from its triplets and their lineage rows."""
    lineage = catalog.rows_for_ids(
        "triplet_lineage", "triplet_id", exported["triplet_id"].to_list()
    )
    templates: dict[str, int] = {}
    models: dict[str, int] = {}
    if lineage.height:
        for column in ("description_template", "instruction_template"):
            for name, count in counts_by(lineage, column).items():
                templates[name] = templates.get(name, 0) + count
        for column in ("description_model", "instruction_model"):
            for name, count in counts_by(lineage, column).items():
                models[name] = models.get(name, 0) + count
    sources = counts_by(exported.explode("sources"), "sources") if exported.height else {}
    return {
        "shard": shard,
        "triplets": exported.height,
        "instructions": int(exported["q_text"].list.len().sum()) if exported.height else 0,
        "images": len(
            set(exported["q_img"]) | set(exported["t_img"]) | set(exported["hns"].explode())
        )
        if exported.height
        else 0,
        "source_mix": sources,
        "description_generators": counts_by(exported, "description_generator"),
        "instruction_generators": counts_by(exported, "instruction_generator"),
        "models": models,
        "templates": templates,
        "input_versions": versions,
        "image_side_px": settings.export.image_side_px,
    }


def write_dataset_card(
    root: DataPath,
    settings: GenerationSettings,
    layout: DataLayout,
    retired: Sequence[str] = (),
) -> DataPath:
    """Withdraw `retired` shards from the folder, then (re)write README.md from every shard's
    figures; safe when shards export in parallel on one machine (a lock under `<home>/locks/`,
    local even when the folder is on an object store; machines that export at once each write
    a whole card, the last one wins)."""
    path = root / CARD_NAME
    lock = card_lock_path(layout, root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(lock)):
        withdraw_shards(root, retired)
        figures = [json.loads(p.read_text()) for p in sorted((root / "shards").glob("*.json"))]
        text = render_card(figures, settings)
        write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return path


def withdraw_shards(root: DataPath, shards: Sequence[str]) -> list[str]:
    """Take shards out of the release folder: their triplet files and figures, then their
    images that no remaining triplet names (a current shard's triplets may name an image of a
    withdrawn one until it is mined again). Returns the shards that had files here."""
    withdrawn = []
    for shard in shards:
        files = [
            root / "triplets" / f"{shard}.jsonl",
            root / "triplets" / f"{shard}.parquet",
            root / "shards" / f"{shard}.json",
        ]
        present = [file for file in files if file.exists()]
        for file in present:
            file.unlink()
        if present:
            withdrawn.append(shard)
    if not withdrawn:
        return []
    named: set[str] = set()
    for table in (root / "triplets").glob("*.parquet"):
        frame = read_parquet(table, columns=["q_img", "t_img", "hns"])
        named |= set(frame["q_img"]) | set(frame["t_img"])
        named |= set(frame["hns"].explode().drop_nulls())
    for shard in withdrawn:
        folder = image_relpath(f"{shard}/-").rpartition("/")[0]  # images/<safe shard name>
        for image in (root / folder).glob("*.jpg"):
            if f"{folder}/{image.name}" not in named:
                image.unlink()
    return withdrawn


def card_lock_path(layout: DataLayout, root: DataPath) -> Path:
    """The local lock file of one export folder's card (named by a hash of the folder)."""
    digest = hashlib.blake2b(str(root).encode(), digest_size=8).hexdigest()
    return layout.home / "locks" / f"triplet_export-card-{digest}.lock"


def _sum_maps(figures: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for shard in figures:
        for name, count in shard.get(key, {}).items():
            total[name] = total.get(name, 0) + int(count)
    return dict(sorted(total.items(), key=lambda item: (-item[1], item[0])))


def _table(counts: dict[str, int], header: str) -> str:
    if not counts:
        return "_(none)_"
    lines = [f"| {header} | rows |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in counts.items()]
    return "\n".join(lines)


def render_card(figures: list[dict[str, Any]], settings: GenerationSettings) -> str:
    """The dataset card's Markdown from per-shard figures (plain function, tested directly)."""
    triplets = sum(int(f["triplets"]) for f in figures)
    instructions = sum(int(f["instructions"]) for f in figures)
    description_generators = _sum_maps(figures, "description_generators")
    instruction_generators = _sum_maps(figures, "instruction_generators")
    heuristic_descriptions = sum(
        n for name, n in description_generators.items() if name.startswith("heuristic")
    )
    heuristic_instructions = sum(
        n for name, n in instruction_generators.items() if name.startswith("heuristic")
    )
    caption_based = sum(n for name, n in description_generators.items() if "caption-based" in name)
    side = settings.export.image_side_px
    return f"""# {settings.export.dataset_name}

Composed-image-retrieval triplets made by the megapairs pipeline, an open implementation of
the MegaPairs data synthesis method (Zhou et al., arXiv 2412.14475), from {len(figures)}
shard(s). (No date here, so the same inputs give the same card byte for byte; the lineage
catalog records when each shard was made.)

## Counts

- triplets: {triplets}
- instructions: {instructions} ({instructions / triplets if triplets else 0:.2f} per triplet)
- image size: {side}x{side} (resized, as the MegaPairs release)

## What made the text

Descriptions:

{_table(description_generators, "generator")}

Instructions:

{_table(instruction_generators, "generator")}

- {heuristic_descriptions} of {triplets} descriptions and {heuristic_instructions} of
  {triplets} instruction lists come from the caption heuristic (fixed sentence patterns over
  the two captions, no model).
- {caption_based} descriptions were written by a text-only model from the two captions
  ("caption-based"): it never saw the images.

Models (descriptions and instruction lists written):

{_table(_sum_maps(figures, "models"), "model id")}

Templates (id#hash):

{_table(_sum_maps(figures, "templates"), "template")}

## Source mix of the pairs

Which similarity sources proposed each pair (a pair can have several):

{_table(_sum_maps(figures, "source_mix"), "source")}

## Format

`triplets/<shard>.jsonl`, one object per line: `q_img` (query image path), `q_text` (list of
instructions; sample one per training step), `t_img` (target image path), `hns` (hard
negative image paths, `hns[0]` is always the query image). Paths are relative to this folder.
`triplets/<shard>.parquet` holds the same fields plus `triplet_id`; `megapairs lineage
<triplet_id>` on the producing machine prints the full chain behind a row.

## Licence

{settings.export.licence}
"""
