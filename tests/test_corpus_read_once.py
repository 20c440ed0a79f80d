"""The corpus step does no work twice: each image's bytes are hashed once, and a folder's
listing is made once per run, shared by the run's shards (`SourceListings`), never reused by a
later run.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from image_factory import (
    good_jpeg_bytes,
    not_an_image_bytes,
    truncated_jpeg_bytes,
    write_loose_photos,
)

from megapairs_assets.corpus import images as images_module
from megapairs_assets.corpus import sources
from megapairs_assets.corpus import table as table_module
from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    ShardReadError,
    SourceListings,
    SourceSpec,
    count_shard_records,
    cut_loose_images,
    iter_shard_records,
    scan_source,
)
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.corpus.table import build_shard_table
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog

LIMITS = ImageLimits(min_side_px=8)


@pytest.fixture
def listed_folders(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    """Every folder `_folder_entries` lists (a full listing: scandir, sort, sidecars)."""
    listed: list[Path] = []
    real = sources._folder_entries

    def recording(folder: Path) -> sources._FolderEntries:
        listed.append(Path(folder))
        return real(folder)

    monkeypatch.setattr(sources, "_folder_entries", recording)
    return listed


def test_each_image_is_hashed_once_and_its_digest_is_the_tables(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    shard = tmp_path / "mixed"
    shard.mkdir()
    files = {
        "a.jpg": good_jpeg_bytes(1),
        "b.jpg": good_jpeg_bytes(2),
        "copy_of_a.jpg": good_jpeg_bytes(1),  # duplicate_content
        "cut.jpg": truncated_jpeg_bytes(),  # decode_error
        "text.png": not_an_image_bytes(),  # decode_error
    }
    for name, data in files.items():
        (shard / name).write_bytes(data)
    hashed: list[bytes] = []
    real = images_module.content_hash

    def counting(data: bytes) -> str:
        hashed.append(data)
        return real(data)

    # The table builder imported the name; validation calls the module's own.
    monkeypatch.setattr(table_module, "content_hash", counting)
    monkeypatch.setattr(images_module, "content_hash", counting)
    spec = SourceSpec("folder", str(tmp_path))

    images, quarantine = build_shard_table("mixed", iter_shard_records(spec, "mixed"), LIMITS)

    assert sorted(hashed) == sorted(files.values())  # every record's bytes once, no more
    assert images["key"].to_list() == ["a", "b"]
    expected = [hashlib.sha256(files[f"{key}.jpg"]).hexdigest() for key in ("a", "b")]
    assert images["content_hash"].to_list() == expected
    reasons = dict(zip(quarantine["key"], quarantine["reason"], strict=True))
    assert reasons == {
        "copy_of_a": "duplicate_content",
        "cut": "decode_error",
        "text": "decode_error",
    }
    # Validation on its own (no digest handed over) still hashes the bytes itself.
    assert images_module.validate_image(files["b.jpg"], LIMITS).content_hash == expected[1]


def test_a_runs_shards_share_one_listing_of_a_flat_folder(
    tmp_path: Path, listed_folders: list[Path]
) -> None:
    photos = tmp_path / "export"
    captions = write_loose_photos(photos, 8, caption_every=2)
    spec = SourceSpec("folder", str(photos), shard_size=3)
    fresh = {
        shard: [(r.key, r.uri, r.caption) for r in iter_shard_records(spec, shard)]
        for shard in scan_source(spec).shards
    }
    listed_folders.clear()

    listings = SourceListings()
    shards = scan_source(spec, listings).shards
    counted = {shard: count_shard_records(spec, shard, listings) for shard in shards}
    shared = {
        shard: [(r.key, r.uri, r.caption) for r in iter_shard_records(spec, shard, listings)]
        for shard in shards
    }

    assert listed_folders == [photos]  # scan, then a count and a read per shard: one listing
    cut = cut_loose_images([f"{key}.jpg" for key in sorted(captions)], 3)
    assert len(shards) > 1
    assert shards == sorted(c.shard_id for c in cut)
    assert shared == fresh  # the same records, keys, uris and captions as unshared reads
    assert counted == {shard: len(records) for shard, records in shared.items()}
    assert {key for records in shared.values() for key, _, _ in records} == set(captions)


def test_the_corpus_step_lists_its_shard_once(tmp_path: Path, listed_folders: list[Path]) -> None:
    photos = tmp_path / "export"
    write_loose_photos(photos, 5)
    write_loose_photos(photos / "trip", 2)
    home = tmp_path / "home"
    layout, catalog = DataLayout(home), LineageCatalog(home / "catalog.duckdb")
    spec = SourceSpec("folder", str(photos), shard_size=3)
    last = cut_loose_images([f"IMG_{index:05d}.jpg" for index in range(5)], 3)[-1]
    assert last.shard_id != "root"

    for shard, images in ((last.shard_id, last.stop - last.start), ("trip", 2)):
        listed_folders.clear()
        result = build_corpus_shard(shard, spec, LIMITS, layout, catalog, log=lambda _: None)
        assert result.row_counts["images"] == images
        assert listed_folders == [photos if shard.startswith("root") else photos / "trip"]


def test_a_run_reads_its_snapshot_and_the_next_run_lists_again(tmp_path: Path) -> None:
    photos = tmp_path / "export"
    write_loose_photos(photos, 4)
    spec = SourceSpec("folder", str(photos), shard_size=2)
    listings = SourceListings()
    shards = scan_source(spec, listings).shards
    last = max(shards, key=lambda shard: [r.key for r in iter_shard_records(spec, shard)])
    assert len(shards) > 1 and last.startswith("root-")

    # While the run goes, one photo leaves and two arrive (before all others in name order).
    (photos / "IMG_00003.jpg").unlink()
    for name in ("A_new.jpg", "B_new.jpg"):
        (photos / name).write_bytes(good_jpeg_bytes(9 if name[0] == "A" else 10))

    # The run's shards keep the cut they were listed with: nothing moves between them, and
    # the photo that left is quarantined, not silently skipped.
    read = {shard: list(iter_shard_records(spec, shard, listings)) for shard in shards}
    assert sorted(r.key for records in read.values() for r in records) == [
        f"IMG_{index:05d}" for index in range(4)
    ]
    assert [(r.key, (r.error or "").split(":")[0]) for r in read[last]][-1] == (
        "IMG_00003",
        "missing_file",
    )
    # The next run (a new SourceListings, as each asset step makes) sees the folder as it is.
    next_run = SourceListings()
    names = ["A_new.jpg", "B_new.jpg", "IMG_00000.jpg", "IMG_00001.jpg", "IMG_00002.jpg"]
    cut = cut_loose_images(names, 2)
    assert scan_source(spec, next_run).shards == sorted(c.shard_id for c in cut)
    assert next(r.key for r in iter_shard_records(spec, "root", next_run)) == "A_new"
    assert count_shard_records(spec, cut[-1].shard_id, next_run) == cut[-1].stop - cut[-1].start
    # The shard named by the photo that left is gone: reading it is refused, not re-cut.
    assert last == "root-IMG_00003" and last not in {c.shard_id for c in cut}
    with pytest.raises(ShardReadError, match="missing_shard"):
        list(iter_shard_records(spec, last, next_run))


def test_folder_images_get_their_resolved_paths_with_the_folder_resolved_once(
    tmp_path: Path,
) -> None:
    real = tmp_path / "elsewhere" / "trip"
    real.mkdir(parents=True)
    (real / "a.jpg").write_bytes(good_jpeg_bytes(1))
    (tmp_path / "elsewhere" / "b.jpg").write_bytes(good_jpeg_bytes(2))
    (real / "b.jpg").symlink_to(tmp_path / "elsewhere" / "b.jpg")
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    (corpus / "trip").symlink_to(real)  # a shard folder reached through a link
    spec = SourceSpec("folder", str(corpus))
    records = list(iter_shard_records(spec, "trip"))
    assert [r.uri for r in records] == [
        str((corpus / "trip" / name).resolve()) for name in ("a.jpg", "b.jpg")
    ]
    assert records[1].uri == str(tmp_path / "elsewhere" / "b.jpg")
