"""The release export keeps up with its inputs: a corpus shard replaced in place refreshes exactly
the pictures that changed, an image the catalog no longer has is never counted as exported, and
images no exported triplet names any more leave the folder (on local disk and on an object
store), while a re-run with nothing changed rewrites nothing."""

from __future__ import annotations

import hashlib
import os
import uuid
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import (
    STEPS,
    http_settings,
    make_world,
    record_rows,
    run_all,
    write_pairs,
)
from PIL import Image

from megapairs_assets.generation.common import (
    EXPORT_ASSET,
    image_relpath,
)
from megapairs_assets.generation.export import (
    NAMED_IMAGES_SUFFIX,
    remove_unused_images,
)

SIDE_PX = 32  # small images keep the tests fast; the logic does not depend on the side
LONG_AGO_NS = 1_000_000_000 * 10**9  # 2001: any rewrite moves a file's mtime past this


def export(world, settings, shard):
    return run_all(world, settings, shard, STEPS[-1:])[EXPORT_ASSET]


def written_and_removed(result) -> tuple[int, int]:
    return result.metadata["images_written"], result.metadata["orphaned_images_removed"]


def settings_for(server: ChatServer, export_dir: str):
    settings = http_settings(server.base_url)
    return replace(
        settings,
        export=replace(settings.export, image_side_px=SIDE_PX, export_dir=export_dir),
    )


def named_by(root, shard: str) -> set[str]:
    """Every image path the exported triplets of `shard` name."""
    with (root / "triplets" / f"{shard}.parquet").open("rb") as handle:
        frame = pl.read_parquet(handle)
    return {
        p for row in frame.iter_rows(named=True) for p in [row["q_img"], row["t_img"], *row["hns"]]
    }


def exported_images(root: Path) -> set[str]:
    return {p.relative_to(root).as_posix() for p in (root / "images").rglob("*.jpg")}


def age_every_image(root: Path) -> dict[str, int]:
    """Set every exported image's mtime far into the past; returns path -> that mtime."""
    for relpath in exported_images(root):
        os.utime(root / relpath, ns=(LONG_AGO_NS, LONG_AGO_NS))
    return {relpath: LONG_AGO_NS for relpath in exported_images(root)}


def mtimes(root: Path) -> dict[str, int]:
    return {relpath: (root / relpath).stat().st_mtime_ns for relpath in exported_images(root)}


def rerecord_corpus(world, shard: str, repaint: dict[str, tuple[int, int, int]], drop=()) -> None:
    """A new image_corpus materialization of `shard` with the same keys: the images in
    `repaint` replaced in place by a plain picture of that colour (new content hash), the ids in
    `drop` gone."""
    rows = world.catalog.query("SELECT * FROM image_lineage WHERE shard = ?", [shard])
    rows = rows.drop("materialization_id").filter(~pl.col("image_id").is_in(list(drop)))
    hashes = {}
    for image_id, colour in repaint.items():
        path = Path(rows.filter(pl.col("image_id") == image_id)["source_uri"][0])
        with Image.open(path) as old:
            size = old.size
        Image.new("RGB", size, colour).save(path)
        hashes[image_id] = hashlib.sha256(path.read_bytes()).hexdigest()
    rows = rows.with_columns(
        pl.col("image_id")
        .replace_strict(hashes, default=pl.col("content_hash"))
        .alias("content_hash")
    )
    record_rows(world.catalog, "image_corpus", shard, rows={"image_lineage": rows})


def centre_colour(path) -> tuple[int, ...]:
    with path.open("rb") as handle, Image.open(handle) as image:
        return image.convert("RGB").getpixel((SIDE_PX // 2, SIDE_PX // 2))


def close_to(colour, expected, tolerance=12) -> bool:
    return all(abs(a - b) <= tolerance for a, b in zip(colour, expected, strict=True))


def id_of(relpath: str, world) -> str:
    return next(i for i in world.image_ids if image_relpath(i) == relpath)


def test_a_shard_replaced_in_place_refreshes_exactly_the_changed_pictures(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(6,))
    root = tmp_path / "out"
    with ChatServer() as server:
        settings = settings_for(server, str(root))
        first = run_all(world, settings, "00000")[EXPORT_ASSET]
        assert first.metadata["images_written"] == len(exported_images(root)) > 4

        # Nothing changed: nothing is rewritten.
        before = age_every_image(root)
        again = export(world, settings, "00000")
        assert written_and_removed(again) == (0, 0)
        assert mtimes(root) == before

        # Two pictures replaced under the same keys (same ids, sizes and triplets); a third
        # file as an exporter without source stamps wrote it (no JPEG comment).
        replaced = sorted(named_by(root, "00000"))[:2]
        colours = {replaced[0]: (255, 0, 0), replaced[1]: (0, 0, 255)}
        for relpath in replaced:
            assert not close_to(centre_colour(root / relpath), colours[relpath])
        rerecord_corpus(world, "00000", {id_of(p, world): c for p, c in colours.items()})
        unstamped = sorted(named_by(root, "00000") - set(replaced))[0]
        with Image.open(root / unstamped) as picture:
            plain = picture.convert("RGB")
        plain.info.pop("comment")  # Pillow would otherwise carry the comment over
        plain.save(root / unstamped, format="JPEG")
        before = age_every_image(root)
        refreshed = export(world, settings, "00000")

    assert all(o.passed for o in refreshed.outcomes)
    assert refreshed.metadata["images_written"] == 3
    after = mtimes(root)
    assert {p for p in after if after[p] != before[p]} == {*replaced, unstamped}
    for relpath, colour in colours.items():
        assert close_to(centre_colour(root / relpath), colour)
    with Image.open(root / unstamped) as picture:
        assert picture.info["comment"].decode().startswith("megapairs source sha256:")

    # And a re-run after the refresh rewrites nothing (the export step calls no model).
    before = age_every_image(root)
    assert written_and_removed(export(world, settings, "00000")) == (0, 0)
    assert mtimes(root) == before


def test_a_changed_jpeg_quality_re_encodes_every_picture_once(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(4,))
    root = tmp_path / "out"
    with ChatServer() as server:
        settings = settings_for(server, str(root))
        first = run_all(world, settings, "00000")[EXPORT_ASSET]
        lower = replace(settings, export=replace(settings.export, jpeg_quality=40))
        before = age_every_image(root)
        redone = export(world, lower, "00000")
        assert redone.metadata["images_written"] == first.metadata["images_written"] > 0
        assert all(mtimes(root)[p] != before[p] for p in before)
        assert written_and_removed(export(world, lower, "00000")) == (0, 0)


def test_an_image_the_catalog_no_longer_has_is_never_counted_as_exported(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(0,))
    i = world.image_ids
    # Two triplets over disjoint images; the first one's target then leaves the catalog.
    write_pairs(
        world.layout,
        world.catalog,
        "00000",
        [(i[0], i[1], [i[0], i[2]]), (i[4], i[5], [i[4], i[6]])],
    )
    root = tmp_path / "out"
    with ChatServer() as server:
        settings = settings_for(server, str(root))
        run_all(world, settings, "00000")
        assert exported_images(root) == {image_relpath(n) for n in i[:3] + i[4:7]}
        rerecord_corpus(world, "00000", {}, drop={i[1]})
        result = export(world, settings, "00000")

    log = result.rows["quarantine_log"]
    assert log.height == 1 and log["reason"].to_list() == ["export_image_not_in_catalog"]
    assert log["detail"][0] == f"{i[1]}: not in the catalog's image rows"
    assert result.row_count == 1
    # The file left from the first export is not counted as exported: the triplet naming it
    # is dropped, and so are the pictures only that triplet named.
    assert exported_images(root) == named_by(root, "00000") == {image_relpath(n) for n in i[4:7]}
    assert result.metadata["orphaned_images_removed"] == 3
    assert result.row_counts["images"] == 3
    assert all(o.passed for o in result.outcomes)


def test_a_re_export_after_the_shard_changed_removes_the_images_no_shard_names(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(8, 3), images_per_shard=12)
    root = tmp_path / "out"
    with ChatServer() as server:
        settings = settings_for(server, str(root))
        for shard in world.shards:
            run_all(world, settings, shard)
        old_00000 = named_by(root, "00000")
        named_00001 = named_by(root, "00001")
        on_disk_before = exported_images(root)
        assert on_disk_before == old_00000 | named_00001

        # 00000 is mined again with other pairs, among four of its own images only; its last
        # export is as one from before image lists existed (what it named is read from its
        # triplet file then).
        (root / "shards" / f"00000{NAMED_IMAGES_SUFFIX}").unlink()
        own = world.image_ids[:12]
        write_pairs(
            world.layout,
            world.catalog,
            "00000",
            [
                (own[4], own[5], [own[4], own[6], own[7]]),
                (own[6], own[7], [own[6], own[4], own[5]]),
                (own[5], own[4], [own[5], own[6], own[7]]),
            ],
        )
        result = run_all(world, settings, "00000")[EXPORT_ASSET]
        new_00000 = named_by(root, "00000")

        # Every image left is named by a current triplet, of either shard, and every named
        # one is there; the count removed is what left the folder.
        on_disk = exported_images(root)
        assert on_disk == new_00000 | named_00001
        assert result.metadata["orphaned_images_removed"] == len(on_disk_before - on_disk) > 0
        # Its own images that only 00001 names stay; the rest of its own folder that nothing
        # names goes, and so do images in 00001's folder that only 00000's old triplets named.
        gone = on_disk_before - on_disk
        assert {p for p in on_disk if p.startswith("images/00000/")} - new_00000
        assert {p for p in gone if p.startswith("images/00000/")}
        assert {p for p in gone if p.startswith("images/00001/")}
        assert not gone & (named_00001 | new_00000)
        assert all(o.passed for o in result.outcomes)

        # Idempotent: the same export again rewrites and removes nothing.
        before = age_every_image(root)
        again = export(world, settings, "00000")
    assert written_and_removed(again) == (0, 0)
    assert mtimes(root) == before
    assert sorted(p.name for p in (root / "shards").iterdir()) == [
        f"{shard}{ext}" for shard in world.shards for ext in (NAMED_IMAGES_SUFFIX, ".json")
    ]


def test_the_sweep_keeps_what_an_export_under_way_or_an_older_export_names(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(6, 5))
    root = tmp_path / "out"
    with ChatServer() as server:
        settings = settings_for(server, str(root))
        for shard in world.shards:
            run_all(world, settings, shard)
    named = named_by(root, "00000") | named_by(root, "00001")
    # A folder exported before image lists existed: 00001 has its triplet file only.
    (root / "shards" / f"00001{NAMED_IMAGES_SUFFIX}").unlink()
    # An export of shard 00009 under way: its list names a picture it has already written,
    # but its triplet file does not exist yet.
    claimed, stray = "images/00000/000009000.jpg", "images/00000/000009001.jpg"
    for relpath in (claimed, stray):
        Image.new("RGB", (SIDE_PX, SIDE_PX)).save(root / relpath)
    pl.DataFrame({"image_path": [claimed]}).write_parquet(
        root / "shards" / f"00009{NAMED_IMAGES_SUFFIX}"
    )
    # Nor may a sweep delete outside the image folders, whatever its candidates say.
    outside = root / "README.md"
    assert outside.is_file()

    removed = remove_unused_images(root, exported_images(root) | {"README.md", "../home"})
    assert removed == 1
    assert exported_images(root) == named | {claimed}
    assert outside.is_file()


@pytest.fixture
def memory_folder():
    """An export folder on fsspec's in-memory object store, removed afterwards."""
    from upath import UPath

    folder = UPath(f"memory://bucket/export-{uuid.uuid4().hex[:8]}")
    yield folder
    if folder.exists():
        folder.fs.rm(folder.path, recursive=True)


def test_on_an_object_store_stale_pictures_are_refreshed_and_unused_ones_removed(
    tmp_path, memory_folder
):
    world = make_world(tmp_path, pairs_per_shard=(6,))
    root = memory_folder
    with ChatServer() as server:
        settings = settings_for(server, str(root))
        first = run_all(world, settings, "00000")[EXPORT_ASSET]
        assert all(o.passed for o in first.outcomes)
        named = named_by(root, "00000")
        listed = {key.removeprefix(f"{root.path}/") for key in root.fs.find(f"{root.path}/images")}
        assert listed == named

        stray = "images/00000/000000999.jpg"
        with (root / stray).open("wb") as handle:
            Image.new("RGB", (SIDE_PX, SIDE_PX)).save(handle, format="JPEG")
        replaced = sorted(named)[0]
        rerecord_corpus(world, "00000", {id_of(replaced, world): (0, 255, 0)})
        created = {p: root.fs.info(f"{root.path}/{p}")["created"] for p in named}
        refreshed = export(world, settings, "00000")
        assert refreshed.metadata["images_written"] == 1
        # A file no export ever named is not the export's: it is left alone (a sweep reads
        # only what this shard named before, so a backfill never reads every shard's list).
        assert refreshed.metadata["orphaned_images_removed"] == 0
        assert (root / stray).exists()
        assert close_to(centre_colour(root / replaced), (0, 255, 0))
        changed = {p for p in named if root.fs.info(f"{root.path}/{p}")["created"] != created[p]}
        assert changed == {replaced}

        again = export(world, settings, "00000")
    assert written_and_removed(again) == (0, 0)


def test_a_first_export_of_each_shard_reads_no_other_shards_image_list(tmp_path, monkeypatch):
    """A backfill stays linear: with nothing previously named, a shard's export has no
    candidates to sweep, so it never reads the other shards' lists."""
    import megapairs_assets.generation.export as export_module

    sweeps: list[int] = []
    original = export_module._named_among
    monkeypatch.setattr(
        export_module,
        "_named_among",
        lambda root, wanted: sweeps.append(len(wanted)) or original(root, wanted),
    )
    world = make_world(tmp_path, pairs_per_shard=(12, 2))  # 00000 names 00001 images
    with ChatServer() as server:
        settings = settings_for(server, str(tmp_path / "out"))
        for shard in world.shards:
            assert all(o.passed for o in run_all(world, settings, shard)[EXPORT_ASSET].outcomes)
    assert sweeps == []
