"""Two per-partition costs that grew with a medium corpus, each against its old form.

    python -m benchmarks.bench_corpus_scale [--images 9000] [--shards 18] [--lookup-ids 7800]

1. Catalog lookup by a long id list (mining's content hashes, generation's image rows): the
   ids bound as one JSON string (`corpus.id_lists`, now) against a Python list parameter
   (before), on a catalog holding `--images` image rows. DuckDB's client tried to import pandas
   for every string of a list, so the old form cost ~0.17 ms per id where pandas is absent.
2. Listing a folder corpus's shards (every KNN step and the demo do it): stopping at each
   sub-folder's first image (now) against reading every sub-folder in full (before).

Both forms run in the same process on the same data; the ratio is before / now. Writes
benchmarks/results/corpus_scale.json. Other work on a shared machine makes figures noisy;
the ratios are what to compare.
"""

from __future__ import annotations

import argparse
import random
import statistics
import tempfile
import time
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import polars as pl

from benchmarks._machine import write_result
from megapairs_assets.corpus import sources
from megapairs_assets.corpus.step import IMAGE_LINEAGE, content_hashes
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
from megapairs_assets.lineage.id_lists import IN_IDS, id_list


def best_of(repeats: int, work: Callable[[], object]) -> tuple[float, object]:
    """The fastest of `repeats` timings of `work` (seconds) and its last answer."""
    times, answer = [], None
    for _ in range(repeats):
        started = time.perf_counter()
        answer = work()
        times.append(time.perf_counter() - started)
    return min(times), answer


def image_ids(images: int, shards: int) -> list[str]:
    per_shard = max(1, images // shards)
    return [f"shard{n // per_shard:03d}/{n:09d}" for n in range(images)]


def catalog_with_images(folder: Path, ids: list[str]) -> LineageCatalog:
    """A lineage catalog holding one image_lineage row per id."""
    catalog = LineageCatalog(folder / "catalog.duckdb")
    rows = pl.DataFrame(
        {
            "image_id": ids,
            "shard": [i.split("/")[0] for i in ids],
            "key": [i.split("/")[1] for i in ids],
            "source_uri": [f"/corpus/{i}.jpg" for i in ids],
            "caption": ["a small red circle on a grey background"] * len(ids),
            "content_hash": [f"{n:064x}" for n in range(len(ids))],
            "width": [128] * len(ids),
            "height": [96] * len(ids),
        },
        schema_overrides={"width": pl.Int32, "height": pl.Int32},
    )
    record = MaterializationRecord(
        asset="image_corpus",
        partition="all",
        run_id="bench",
        code_version="bench",
        profile="demo",
        started_at=datetime.now(UTC).replace(tzinfo=None),
        duration_s=0.0,
    )
    catalog.record(record, {IMAGE_LINEAGE.name: rows})
    return catalog


def bench_lookup(folder: Path, images: int, shards: int, lookup_ids: int) -> dict:
    ids = image_ids(images, shards)
    catalog = catalog_with_images(folder, ids)
    # One shard's KNN tables name ids from every shard (~7,800 distinct ids at 9,000 images
    # with k=20 and three sources); mining asks for them sorted and unique.
    wanted = sorted(random.Random(0).sample(ids, min(lookup_ids, images)))
    sql = "SELECT image_id, content_hash FROM image_lineage WHERE image_id "

    def before() -> int:
        return catalog.query(sql + "IN (SELECT unnest(?))", [wanted]).height

    def now() -> int:
        return content_hashes(catalog, wanted).height

    now_s, now_rows = best_of(3, now)
    before_s, before_rows = best_of(2, before)
    json_rows = catalog.query(sql + IN_IDS, [id_list(wanted)]).height
    assert now_rows == before_rows == json_rows, (now_rows, before_rows, json_rows)
    print(
        f"id lookup, {len(wanted)} ids over {images} image rows: before {before_s * 1e3:.0f} ms, "
        f"now {now_s * 1e3:.0f} ms, ratio {before_s / now_s:.1f}x"
    )
    return {
        "ids": len(wanted),
        "catalog_images": images,
        "rows_found": now_rows,
        "before_s": round(before_s, 4),
        "now_s": round(now_s, 4),
        "ratio": round(before_s / now_s, 1),
    }


def write_folder_corpus(root: Path, images: int, shards: int) -> None:
    """Image and caption files named as a folder corpus holds them (bytes do not matter to a
    listing)."""
    per_shard = max(1, images // shards)
    for n in range(images):
        shard = root / f"shard{n // per_shard:03d}"
        shard.mkdir(parents=True, exist_ok=True)
        (shard / f"{n:09d}.jpg").write_bytes(b"\xff\xd8\xff")
        (shard / f"{n:09d}.txt").write_text("a caption")


def bench_listing(folder: Path, images: int, shards: int) -> dict:
    root = folder / "corpus"
    write_folder_corpus(root, images, shards)
    subfolders = [entry for entry in sorted(root.iterdir()) if entry.is_dir()]

    def before() -> list[str]:
        return [sub.name for sub in subfolders if sources._folder_entries(sub).images]

    def now() -> list[str]:
        return [sub.name for sub in subfolders if sources._holds_an_image(sub)]

    now_s, now_shards = best_of(5, now)
    before_s, before_shards = best_of(3, before)
    assert now_shards == before_shards
    scan_s = statistics.median(
        best_of(1, lambda: sources.scan_source(sources.SourceSpec("folder", str(root))))[0]
        for _ in range(3)
    )
    print(
        f"corpus listing, {images} images in {len(subfolders)} folders: before "
        f"{before_s * 1e3:.0f} ms, now {now_s * 1e3:.1f} ms, ratio {before_s / now_s:.0f}x "
        f"(whole scan_source now {scan_s * 1e3:.1f} ms)"
    )
    return {
        "images": images,
        "shards": len(subfolders),
        "before_s": round(before_s, 4),
        "now_s": round(now_s, 5),
        "scan_source_s": round(scan_s, 5),
        "ratio": round(before_s / now_s, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--images", type=int, default=9000)
    parser.add_argument("--shards", type=int, default=18)
    parser.add_argument("--lookup-ids", type=int, default=7800)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="bench_corpus_scale_") as tmp:
        folder = Path(tmp)
        lookup = bench_lookup(folder, args.images, args.shards, args.lookup_ids)
        listing = bench_listing(folder, args.images, args.shards)
    path = write_result("corpus_scale", {"id_lookup": lookup, "corpus_listing": listing})
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
