"""The release folder: triplets with their images at 512x512, and a generated dataset card.

Layout of the export folder (default `<data root>/data/triplet_export`):

    README.md                    dataset card, regenerated from every exported current shard
    triplets/<shard>.jsonl       release fields only (q_img, q_text, t_img, hns)
    triplets/<shard>.parquet     release fields plus triplet_id
    images/<shard>/<key>.jpg     every image a triplet names, resized to side x side
    shards/<shard>.json          one shard's figures (what the card is built from)
    shards/<shard>.images.parquet  the image paths the shard's triplets name (see below)
    shards/unused/*.parquet      the sweep journal: images exports stopped naming (see below)

Image paths in the triplet files are relative to the folder, so it can be moved or uploaded
as is. The folder may be a prefix on an object store (under a URL data root, or a URL
`export_dir`): every file is then one object, written with one PUT; only the lock that keeps
parallel shards from interleaving card rewrites is local (under `<home>/locks/`). MegaPairs
released its images resized to 512x512 (method.md §6); the side is a setting.
An image that cannot be read, or that the catalog no longer has (its shard was retired),
drops the triplets that name it, each with a quarantine row.

Re-exporting skips an image only when the file there has the right size and was made from the
same source bytes at the same JPEG quality: each JPEG carries the corpus content hash of its
source and the quality in its comment, so a changed quality setting re-encodes them and a
corpus shard replaced in place under the same keys gets its pictures refreshed (one header
read per image decides). Images no exported triplet names any more are removed: each export
adds those its previous export named (or it was about to name) and this one does not to the
folder's sweep journal (`shards/unused/`), and a sweep removes the journal's images no shard
names. A shard that left the corpus (retired) is withdrawn by the next export: its triplet
files, figures and image list, its images going to the journal (its tables under `data/` stay).

Which images are in use is decided in one place (`remove_unused_images`), from the shards'
image lists: an export first adds the images it is about to name to its shard's list (before it
writes or skips any image), and narrows the list to what it exported once its triplet files
are written, so the lists always cover what an exported or half-exported triplet file names,
and a sweep running at the same time (on another shard, even another machine) leaves an
export's images alone. The one gap: an export that starts after the sweep read its shard's
list and newly names an image the sweep then deletes. Its blocking check `export_paths_exist`
then fails (a re-run writes the image again); on one machine always, as the lock holds that
check back until the sweep is done; across machines unless that whole export ended before the
delete. A folder exported before these lists existed falls back to reading the triplet files
of the shards that have no list.

A sweep reads every shard's list once, so it is not run per export (that made a step that
re-exports every shard read shards x shards lists): an export sweeps only when the journal has
grown to SWEEP_PENDING_FRACTION of all lists' entries, so its cost follows the images that
changed, not the shard count. Until then up to that fraction of the folder's images may be
ones no triplet names (harmless to a reader, who goes by the triplet files);
`sweep_unused_images` sweeps at once, e.g. before the folder is published. The journal is
written before a list narrows and removed after its images are decided, so a crash anywhere
leaves it for the next sweep, and a first export (nothing named before) adds nothing to it.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
import uuid
from collections.abc import Callable, Collection, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
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
from megapairs_assets.lineage.report import served_as_other_model

CARD_NAME = "README.md"
EXPORT_CHECKS = {
    "export_paths_exist": "Every image path in the exported triplets exists in the export",
    "export_images_sized": "Every exported image of the shard is side x side pixels",
}
_WRITE_THREADS = 4
NAMED_IMAGES_SUFFIX = ".images.parquet"
"""`shards/<shard>.images.parquet`: one column, `image_path`, relative to the folder."""
_NAMED_IMAGES_COLUMN = "image_path"
_SOURCE_STAMP = "megapairs source sha256:"
"""Prefix of the JPEG comment naming the corpus content hash an exported image was made from."""
# The only paths a sweep may delete: what `image_relpath` makes (its parts never start with a
# dot, so never `..`), whatever a triplet or image-list file says.
_EXPORT_IMAGE_PATH = re.compile(r"images/[A-Za-z0-9_-][A-Za-z0-9._-]*/[A-Za-z0-9._-]+\.jpg")
SWEEP_JOURNAL_DIR = "shards/unused"
"""`shards/unused/<token>-<count>.parquet`: the sweep journal, images exports may have stopped
naming (column `image_path`); one file per export that had any, written once, removed by the
sweep that decided them."""
SWEEP_PENDING_FRACTION = 0.01
"""A sweep reads every shard's image list, so it waits until the journal's entries are at least
this fraction of all lists' entries: each journal entry then costs about 1 / (this x the mean
list length) list reads whatever the shard count (1/15 at 1,500 images a shard), and the
images left in the folder that no triplet names stay below about this fraction of it."""
_JOURNAL_NAME = re.compile(r"[0-9a-f]{32}-([0-9]+)\.parquet")


def export_triplets_for_shard(
    shard: str,
    layout: DataLayout,
    catalog: LineageCatalog,
    settings: GenerationSettings,
    *,
    log: Callable[[str], None] | None = None,
    write_card: bool = True,
) -> StepResult:
    """Export one shard's triplets and images, then regenerate the dataset card (unless
    `write_card` is False: a step over many shards writes it once, after its last shard, since
    each card reads every shard's figures)."""
    triplets, versions = read_shard_table(catalog, layout, TRIPLETS_ASSET, shard)
    root = export_dir(layout, settings.export.export_dir)
    side = settings.export.image_side_px
    quarantine = QuarantineLog(EXPORT_ASSET, shard)
    image_ids = _image_ids(triplets)
    sources = lookup_images(catalog, image_ids)
    # Before any image is written or skipped, the shard's image list covers both what its last
    # export named and what this one may name, so no sweep removes either meanwhile.
    named_before = _read_named_images(root, shard)
    listed = named_before | {image_relpath(i) for i in image_ids}
    if listed != named_before:
        _write_named_images(root, shard, listed)
    failed: dict[str, str] = {}
    written = 0
    with Progress(len(image_ids), f"export {shard}", unit="images", log=log) as progress:

        def export_one(image_id: str) -> tuple[str, str | None, bool]:
            error, wrote = _export_image(
                sources.get(image_id), root / image_relpath(image_id), side, settings
            )
            progress.update(1)
            return image_id, error, wrote

        with ThreadPoolExecutor(_WRITE_THREADS) as pool:
            for image_id, error, wrote in pool.map(export_one, image_ids):
                written += wrote
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
                "export_image_unreadable" if bad[0] in sources else "export_image_not_in_catalog",
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
    named_now = set(_named_paths(exported).to_list())
    # Possibly unused now: what this shard named before, or was about to name, and no longer
    # does (in any folder; another shard may still name it): they wait in the sweep journal.
    # A first export of a shard whose images all exported has none, so a backfill reads no
    # other shard's list.
    _narrow_named_images(root, layout, shard, listed, named_now)
    update = update_release_folder(
        root,
        settings,
        layout,
        retired=catalog.retired_partitions(EXPORT_ASSET),
        write_card=write_card,
    )
    card = update.card
    # An image only dropped triplets named was just removed as unused: check what is named.
    exported_ids = _image_ids(exported)
    return StepResult(
        partition=shard,
        outputs={"jsonl": jsonl_path, "parquet": parquet_path, "card": card},
        row_counts={"exported_triplets": exported.height, "images": len(exported_ids)},
        row_count_key="exported_triplets",
        config={"image_side_px": side, "export_dir": str(root), "licence": settings.export.licence},
        input_versions=versions,
        rows={"quarantine_log": quarantine.frame()},
        outcomes=check_export(root, exported, exported_ids, side),
        metadata={
            "dropped_triplets": triplets.height - exported.height,
            "images_written": written,
            "orphaned_images_removed": update.images_removed,
            "export_dir": str(root),
        },
        markdown={
            "exported_example": exported_example_markdown(root, exported),
            "dataset_card": _read_text(card)
            if write_card
            else f"_(written once per step, after its last shard, which shows it: `{card}`)_",
        },
        preview=exported.select("triplet_id", *RELEASE_FIELDS).head(5),
    )


def _image_ids(triplets: pl.DataFrame) -> list[str]:
    """Every image id the triplets name (query, target, hard negatives), sorted."""
    return sorted(
        set(triplets["query_id"])
        | set(triplets["target_id"])
        | set(triplets["hard_negative_ids"].explode().drop_nulls())
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
) -> tuple[str | None, bool]:
    """Write one image at side x side unless the file there is that size and was made from the
    same source bytes; returns (an error or None, whether the file was written)."""
    if source is None:  # e.g. its shard was retired; a file left from before proves nothing
        return "not in the catalog's image rows", False
    stamp = _source_stamp(source, settings.export.jpeg_quality)
    if _image_header(target) == ((side, side), stamp):
        return None, False
    try:
        picture = open_image_rgb(source["source_uri"], ImageLimits(), max_side_px=2 * side)
    except ImageRejected as error:
        return f"{error.reason}: {error.detail}", False
    resized = picture.resize((side, side), Image.Resampling.BICUBIC)
    write_atomic(
        target,
        lambda tmp: resized.save(
            tmp, format="JPEG", quality=settings.export.jpeg_quality, comment=stamp
        ),
    )
    return None, True


def _source_stamp(source: dict[str, Any], jpeg_quality: int) -> str:
    """The JPEG comment of an image exported from `source` (a catalog image row) at
    `jpeg_quality`: a changed quality setting re-encodes the pictures, as a changed side does."""
    return f"{_SOURCE_STAMP}{source.get('content_hash') or 'unknown'} jpeg quality {jpeg_quality}"


def _image_header(path: DataPath) -> tuple[tuple[int, int], str | None] | None:
    """((width, height), JPEG comment) of the image at `path` (a file or an object), None if
    absent or unreadable. PIL reads the header only, which holds the comment; an object is
    fetched with one GET."""
    try:
        with path.open("rb") as handle, Image.open(handle) as existing:
            comment = existing.info.get("comment")
            if isinstance(comment, bytes):
                comment = comment.decode("utf-8", "replace")
            return existing.size, comment
    except (OSError, ValueError, Image.DecompressionBombError):
        return None


def _image_size(path: DataPath) -> tuple[int, int] | None:
    """(width, height) of the image at `path`, None if absent or unreadable."""
    header = _image_header(path)
    return header[0] if header else None


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
    served_as: dict[str, int] = {}
    if lineage.height:
        for column in ("description_template", "instruction_template"):
            for name, count in counts_by(lineage, column).items():
                templates[name] = templates.get(name, 0) + count
        for column in ("description_model", "instruction_model"):
            for name, count in counts_by(lineage, column).items():
                models[name] = models.get(name, 0) + count
        served_as = _served_as(lineage)
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
        "served_as": served_as,
        "templates": templates,
        "input_versions": versions,
        "image_side_px": settings.export.image_side_px,
    }


@dataclass(frozen=True)
class FolderUpdate:
    """What `update_release_folder` did."""

    card: DataPath
    withdrawn: list[str]
    images_removed: int


def update_release_folder(
    root: DataPath,
    settings: GenerationSettings,
    layout: DataLayout,
    retired: Sequence[str] = (),
    candidates: Collection[str] = (),
    write_card: bool = True,
    force_sweep: bool = False,
) -> FolderUpdate:
    """Withdraw `retired` shards, add their images and `candidates` to the sweep journal, sweep
    it when due (always with `force_sweep`; see `sweep_unused_images`), then (re)write README.md
    from every shard's figures. Safe when shards export in parallel on one machine (a lock
    under `<home>/locks/`, local even when the folder is on an object store; machines that
    export at once each write a whole card, the last one wins; the image lists keep their
    images safe from each other's sweeps). With `write_card` False the card is left as it is (a
    later call writes it)."""
    path = root / CARD_NAME
    with _folder_lock(layout, root):
        withdrawn = withdraw_shards(root, retired)
        _write_journal(root, candidates)
        removed = _sweep_journal(root, layout, force=force_sweep)
        if write_card:
            # Threads: on an object store each shard's figures are one request.
            with ThreadPoolExecutor(_WRITE_THREADS) as pool:
                figures = list(
                    pool.map(
                        lambda p: json.loads(p.read_text()),
                        sorted((root / "shards").glob("*.json")),
                    )
                )
            text = render_card(figures, settings)
            write_atomic(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return FolderUpdate(card=path, withdrawn=withdrawn, images_removed=removed)


def withdraw_shards(root: DataPath, shards: Sequence[str]) -> list[str]:
    """Take shards' triplet files, figures and image lists out of the release folder; returns
    the shards that had files here. Their images (those in their image folders and those their
    lists named) go to the sweep journal first, so a crash half-way leaves them waiting for a
    sweep: a current shard's triplets may still name an image of a withdrawn one until it is
    mined again. The caller holds the folder's lock."""
    withdrawn: list[str] = []
    for shard in shards:
        files = [
            root / "triplets" / f"{shard}.jsonl",
            root / "triplets" / f"{shard}.parquet",
            root / "shards" / f"{shard}.json",
            _named_images_path(root, shard),
        ]
        present = [file for file in files if file.exists()]
        if not present:
            continue
        _write_journal(root, _read_named_images(root, shard) | images_in_folder(root, shard))
        for file in present:
            file.unlink()
        withdrawn.append(shard)
    return withdrawn


def images_in_folder(root: DataPath, shard: str) -> set[str]:
    """The exported images of `shard`'s own images (`images/<shard>/*.jpg`, one listing),
    as paths relative to the folder."""
    folder = image_relpath(f"{shard}/-").rpartition("/")[0]  # images/<safe shard name>
    return {f"{folder}/{image.name}" for image in (root / folder).glob("*.jpg")}


def note_unused_images(root: DataPath, layout: DataLayout, paths: Collection[str]) -> None:
    """Add `paths` (images an export may have stopped naming, relative to the folder) to the
    folder's sweep journal: one new file, written once, under the folder's lock (a sweep
    removes the journal's empty folder under that lock). Nothing when `paths` is empty."""
    if not any(_EXPORT_IMAGE_PATH.fullmatch(p) for p in paths):
        return
    with _folder_lock(layout, root):
        _write_journal(root, paths)


def sweep_unused_images(root: DataPath, layout: DataLayout) -> int:
    """Sweep the folder's journal now, however little waits in it (e.g. before the folder is
    published); returns how many images were removed. Exports sweep it only when due."""
    with _folder_lock(layout, root):
        return _sweep_journal(root, layout, force=True)


def _narrow_named_images(
    root: DataPath, layout: DataLayout, shard: str, listed: set[str], named_now: set[str]
) -> None:
    """Narrow `shard`'s image list from `listed` to `named_now`, the images it drops going to
    the sweep journal first (a crash in between leaves them waiting, not forgotten). Both
    under the folder's lock: a sweep between the two would find them still named, keep them
    and drop their journal entry, leaving them in the folder for good. (A sweep on another
    machine can still do that in the moment between the two writes: an image kept, never one
    lost.)"""
    if named_now == listed:
        return
    with _folder_lock(layout, root):
        _write_journal(root, listed - named_now)
        _write_named_images(root, shard, named_now)


def _folder_lock(layout: DataLayout, root: DataPath) -> FileLock:
    lock = card_lock_path(layout, root)
    lock.parent.mkdir(parents=True, exist_ok=True)
    return FileLock(str(lock))


def _write_journal(root: DataPath, paths: Collection[str]) -> None:
    """One new journal file naming `paths` (only those a sweep may delete); its name carries
    the count, so deciding whether a sweep is due reads no journal."""
    wanted = sorted({p for p in paths if _EXPORT_IMAGE_PATH.fullmatch(p)})
    if not wanted:
        return
    frame = pl.DataFrame({_NAMED_IMAGES_COLUMN: wanted}, schema={_NAMED_IMAGES_COLUMN: pl.String})
    name = f"{uuid.uuid4().hex}-{len(wanted)}.parquet"
    write_parquet_atomic(frame, root / SWEEP_JOURNAL_DIR / name)


def _sweep_journal(root: DataPath, layout: DataLayout, force: bool) -> int:
    """Remove the journal's images that no shard names, when a sweep is due (or `force`), then
    the journal files it read; returns how many images were removed. The caller holds the
    folder's lock. A sweep reads every shard's image list once, so it waits until the images
    waiting are at least SWEEP_PENDING_FRACTION of the lists' entries as the last sweep on
    this machine counted them (no count yet: due). A crash leaves the journal files, and the
    next sweep decides them again; a journal file another machine's sweep removed meanwhile
    was decided by that sweep."""
    journal = {
        path: int(match.group(1))
        for path in (root / SWEEP_JOURNAL_DIR).glob("*.parquet")
        if (match := _JOURNAL_NAME.fullmatch(path.name))
    }
    waiting = sum(journal.values())
    if not waiting or not (force or _sweep_due(layout, root, waiting)):
        return 0

    def journal_paths(path: DataPath) -> list[str]:
        try:
            return _paths_in_list(path).to_list()
        except FileNotFoundError:
            return []

    with ThreadPoolExecutor(_WRITE_THREADS) as pool:
        wanted = {p for paths in pool.map(journal_paths, sorted(journal)) for p in paths}
    removed, list_entries = _remove_unused(root, wanted)
    if list_entries:
        text = json.dumps({"list_entries": list_entries})
        write_atomic(_sweep_hint_path(layout, root), lambda tmp: tmp.write_text(text))
    for path in journal:
        try:
            path.unlink()
        except FileNotFoundError:
            continue
    if is_local(root):  # object stores have no folders; keep `shards/` as exports leave it
        with contextlib.suppress(OSError):  # not empty (a journal written since) or gone
            (root / SWEEP_JOURNAL_DIR).rmdir()
    return removed


def _sweep_due(layout: DataLayout, root: DataPath, waiting: int) -> bool:
    """Whether `waiting` journal entries are worth a sweep (see `_sweep_journal`)."""
    try:
        list_entries = int(json.loads(_sweep_hint_path(layout, root).read_text())["list_entries"])
    except (OSError, ValueError, KeyError, TypeError):
        return True
    return waiting >= SWEEP_PENDING_FRACTION * list_entries


def _sweep_hint_path(layout: DataLayout, root: DataPath) -> Path:
    """Where this machine keeps how many entries the folder's lists had at its last sweep:
    only a hint of when the next sweep is due, never of what it removes."""
    return layout.home / "locks" / f"triplet_export-sweep-{_folder_digest(root)}.json"


def remove_unused_images(root: DataPath, candidates: Iterable[str]) -> int:
    """Delete those of `candidates` (image paths relative to the folder) that no shard of the
    folder names; returns how many were deleted. The one place that decides which export
    images are in use (see the module docstring)."""
    return _remove_unused(root, set(candidates))[0]


def _remove_unused(root: DataPath, candidates: set[str]) -> tuple[int, int]:
    """`remove_unused_images`, also returning how many entries the lists it read had."""
    wanted = {p for p in candidates if _EXPORT_IMAGE_PATH.fullmatch(p)}
    if not wanted:
        return 0, 0
    named, list_entries = _named_among(root, wanted)
    removed = 0
    for relpath in sorted(wanted - named):
        try:
            (root / relpath).unlink()
        except FileNotFoundError:  # never written (its source failed), or removed meanwhile
            continue
        removed += 1
    return removed, list_entries


def _named_among(root: DataPath, wanted: set[str]) -> tuple[set[str], int]:
    """Which of `wanted` some shard names: its image list, or for a shard without one (exported
    before lists existed) its triplet file; and how many entries those had. One read per
    shard, in parallel."""
    lists = {
        p.name.removesuffix(NAMED_IMAGES_SUFFIX): p
        for p in (root / "shards").glob(f"*{NAMED_IMAGES_SUFFIX}")
    }
    sources: list[tuple[DataPath, Callable[[DataPath], pl.Series]]] = [
        (path, _paths_in_list) for path in lists.values()
    ]
    sources += [
        (table, _paths_in)
        for table in (root / "triplets").glob("*.parquet")
        if table.name.removesuffix(".parquet") not in lists
    ]
    keys = sorted(wanted)

    def named_in(source: tuple[DataPath, Callable[[DataPath], pl.Series]]) -> tuple[set[str], int]:
        path, read = source
        try:
            paths = read(path)
        except FileNotFoundError:  # withdrawn meanwhile
            return set(), 0
        return set(paths.filter(paths.is_in(keys)).to_list()), paths.len()

    named: set[str] = set()
    entries = 0
    with ThreadPoolExecutor(_WRITE_THREADS) as pool:
        for found, count in pool.map(named_in, sources):
            named |= found
            entries += count
    return named, entries


def _named_images_path(root: DataPath, shard: str) -> DataPath:
    return root / "shards" / f"{shard}{NAMED_IMAGES_SUFFIX}"


def _read_named_images(root: DataPath, shard: str) -> set[str]:
    """The images `shard`'s export names (or was about to, if it stopped half-way): its list,
    else (exported before lists existed) its triplet file, else nothing."""
    for path, read in (
        (_named_images_path(root, shard), _paths_in_list),
        (root / "triplets" / f"{shard}.parquet", _paths_in),
    ):
        try:
            return set(read(path).to_list())
        except FileNotFoundError:
            continue
    return set()


def _write_named_images(root: DataPath, shard: str, paths: set[str]) -> None:
    frame = pl.DataFrame(
        {_NAMED_IMAGES_COLUMN: sorted(paths)}, schema={_NAMED_IMAGES_COLUMN: pl.String}
    )
    write_parquet_atomic(frame, _named_images_path(root, shard))


def _paths_in_list(path: DataPath) -> pl.Series:
    return read_parquet(path, columns=[_NAMED_IMAGES_COLUMN])[_NAMED_IMAGES_COLUMN]


def _paths_in(table: DataPath) -> pl.Series:
    """Every image path an exported triplet file names."""
    return _named_paths(read_parquet(table, columns=["q_img", "t_img", "hns"]))


def _named_paths(frame: pl.DataFrame) -> pl.Series:
    """The distinct image paths of release rows (q_img, t_img, hns)."""
    columns = [frame["q_img"], frame["t_img"], frame["hns"].explode()]
    return pl.concat([column.rename("path") for column in columns]).drop_nulls().unique()


def card_lock_path(layout: DataLayout, root: DataPath) -> Path:
    """The local lock file of one export folder's card (named by a hash of the folder)."""
    return layout.home / "locks" / f"triplet_export-card-{_folder_digest(root)}.lock"


def _folder_digest(root: DataPath) -> str:
    return hashlib.blake2b(str(root).encode(), digest_size=8).hexdigest()


def _sum_maps(figures: list[dict[str, Any]], key: str) -> dict[str, int]:
    total: dict[str, int] = {}
    for shard in figures:
        for name, count in shard.get(key, {}).items():
            total[name] = total.get(name, 0) + int(count)
    return dict(sorted(total.items(), key=lambda item: (-item[1], item[0])))


def _served_as(lineage: pl.DataFrame) -> dict[str, int]:
    """`model id -> served model` counts of texts whose server said another model answered
    (served under another name, or another model altogether); empty when all agree."""
    counts: dict[str, int] = {}
    for configured, served in (
        ("description_model", "description_served_model"),
        ("instruction_model", "instruction_served_model"),
    ):
        if served not in lineage.columns:  # a catalog from before served models were kept
            continue
        for (model, answered), group in lineage.group_by([configured, served]):
            if served_as_other_model(model, answered):
                name = f"{model} -> {answered}"
                counts[name] = counts.get(name, 0) + group.height
    return counts


def _table(counts: dict[str, int], header: str) -> str:
    if not counts:
        return "_(none)_"
    lines = [f"| {header} | rows |", "|---|---|"]
    lines += [f"| {name} | {count} |" for name, count in counts.items()]
    return "\n".join(lines)


def _served_as_section(served_as: dict[str, int]) -> str:
    """The card's note on texts whose server answered as another model; nothing when none."""
    if not served_as:
        return ""
    return (
        "\nThe server answered as another model for some texts (model id -> the model the "
        "server named):\n\n" + _table(served_as, "model id -> served model") + "\n"
    )


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
{_served_as_section(_sum_maps(figures, "served_as"))}
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
