"""A new user's flat folder of photos: more loose images than a shard holds become several shards.

`--corpus ~/Pictures/export` with 50,000 phone photos and no sub-folders used to be one giant
shard `root` (no parallelism, no per-shard resume). Beyond `shard_size` (1,000, the manifest's
rows per shard) the loose images are cut where their sorted names say (`cut_loose_images`):
`root`, then `root-<first image's key>` ..., while a folder of up to 1,000 keeps the one shard
`root` (existing homes unchanged). How the cut holds up as photos are added is in
test_corpus_flat_folder_growth.py.
"""

from __future__ import annotations

import pytest
from image_factory import (
    good_items,
    good_jpeg_bytes,
    good_png_bytes,
    write_image_folder,
    write_loose_photos,
)

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    DEFAULT_SHARD_SIZE,
    RawRecord,
    ShardReadError,
    SourceSpec,
    count_shard_records,
    cut_loose_images,
    derived_shard_id,
    iter_shard_records,
    list_shards,
    loose_shard_bounds,
    scan_source,
    shard_uri,
)
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import DataLayout, is_safe_partition_key
from megapairs_assets.lineage.catalog import LineageCatalog


def _read(spec: SourceSpec) -> dict[str, list[RawRecord]]:
    return {shard: list(iter_shard_records(spec, shard)) for shard in list_shards(spec)}


def _ids_and_keys(shards: dict[str, list[RawRecord]]) -> dict[str, list[str]]:
    return {shard: [r.key for r in records] for shard, records in shards.items()}


def test_a_flat_folder_beyond_a_shard_is_cut_by_name_with_captions_kept(tmp_path):
    photos = tmp_path / "export"
    captions = write_loose_photos(photos, 600, caption_every=7)
    spec = SourceSpec("folder", str(photos), shard_size=100)
    names = sorted(f"{key}.jpg" for key in captions)

    shards = _read(spec)

    cuts = cut_loose_images(names, 100)
    assert len(shards) >= 3  # 600 names at ~1 cut name in 100: several shards
    assert list(shards) == sorted(cut.shard_id for cut in cuts)
    assert all(is_safe_partition_key(shard) for shard in shards)
    fewest, most = loose_shard_bounds(100)
    assert all(fewest <= len(records) <= most for records in shards.values())
    # Each shard is named by its first image; the first shard is `root` whatever sorts first.
    for shard, records in shards.items():
        first = records[0].key
        assert shard == ("root" if first == "IMG_00000" else f"root-{first}")
    keys = sorted(record.key for records in shards.values() for record in records)
    assert keys == sorted(captions)  # every image once
    # Each caption (.txt, .caption or .json beside it) stays with its image across shards.
    read_captions = {r.key: r.caption for records in shards.values() for r in records}
    assert read_captions == captions
    assert all(r.error is None and r.data for records in shards.values() for r in records)
    # The progress total of each shard is what reading it yields.
    assert {shard: count_shard_records(spec, shard) for shard in shards} == {
        shard: len(records) for shard, records in shards.items()
    }
    # Listing and reading again give the same shards with the same images.
    assert _read(spec) == shards
    assert scan_source(spec).unread == []
    assert all(shard_uri(spec, shard) == str(photos) for shard in shards)


def test_up_to_a_shard_of_loose_images_stays_the_one_shard_root(tmp_path):
    photos = tmp_path / "export"
    write_loose_photos(photos, 1_000, caption_every=1_000)
    spec = SourceSpec("folder", str(photos))
    assert spec.shard_size == DEFAULT_SHARD_SIZE == 1_000
    assert list_shards(spec) == ["root"]
    assert count_shard_records(spec, "root") == 1_000
    assert len(list(iter_shard_records(spec, "root"))) == 1_000


def test_the_cut_of_loose_image_names():
    names = [f"IMG_{index:05d}.jpg" for index in range(50_000)]
    assert cut_loose_images([], 1_000) == []
    assert [c.shard_id for c in cut_loose_images(names[:1_000], 1_000)] == ["root"]
    cuts = cut_loose_images(names, 1_000)
    # Consecutive, covering every name once, the first always `root`.
    assert [(c.start, c.stop) for c in cuts] == list(
        zip([0, *(c.stop for c in cuts[:-1])], [*(c.start for c in cuts[1:]), 50_000], strict=True)
    )
    assert cuts[0].shard_id == "root"
    assert [c.shard_id for c in cuts[1:]] == [f"root-{names[c.start][:-4]}" for c in cuts[1:]]
    # About one shard per 1,000 to 1,300 images (a quarter-size piece joins the shard before).
    assert 50_000 / 1_400 < len(cuts) < 50_000 / 900
    assert loose_shard_bounds(1_000) == (250, 4_000)
    with pytest.raises(ValueError, match="positive"):
        cut_loose_images(names, 0)


def test_ids_of_unsafe_or_long_first_names_are_safe_and_distinct():
    names = sorted(["a.jpg", "my photo.jpg", "my_photo.jpg", "ünï.jpg", "x" * 200 + ".jpg"])
    # shard_size 1: every name starts a shard of its own.
    ids = [c.shard_id for c in cut_loose_images(names, 1)]
    assert ids[0] == "root" and len(set(ids)) == len(ids) == 5
    assert all(is_safe_partition_key(shard) for shard in ids)
    by_name = dict(zip(names, ids, strict=True))
    assert by_name["my_photo.jpg"] == "root-my_photo"
    assert by_name["my photo.jpg"].startswith("root-my_photo-")  # + a hash of the key
    assert by_name["ünï.jpg"].startswith("root-uni-")
    assert len(by_name["x" * 200 + ".jpg"]) <= 128


def test_split_loose_images_sit_beside_subfolder_shards(tmp_path):
    write_image_folder(tmp_path / "beach", good_items(2))
    write_loose_photos(tmp_path, 12)
    spec = SourceSpec("folder", str(tmp_path), shard_size=4)
    shards = _read(spec)
    loose = cut_loose_images([f"IMG_{index:05d}.jpg" for index in range(12)], 4)
    assert len(loose) > 1
    assert list(shards) == sorted(["beach", *(cut.shard_id for cut in loose)])
    assert len(shards["beach"]) == 2
    assert sum(len(records) for shard, records in shards.items() if shard != "beach") == 12
    # The top level's other entries are reported once by the source, never by a loose shard.
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    assert [r.uri.rsplit("/", 1)[-1] for r in scan_source(spec).unread] == ["notes.pdf"]
    assert _read(spec) == shards


def test_a_subfolder_named_like_a_loose_shard_is_refused_only_when_they_clash(tmp_path):
    names = [f"IMG_{index:05d}.jpg" for index in range(6)]
    head = cut_loose_images(names, 2)[1].shard_id  # the second shard, as 6 images are cut
    write_image_folder(tmp_path / head, good_items(1))
    write_image_folder(tmp_path / "root-trip", good_items(1))  # a shard, never a loose one
    write_image_folder(tmp_path / "root-my trip", good_items(1))  # read by its derived id
    derived = derived_shard_id("root-my trip")
    write_loose_photos(tmp_path, 2)
    spec = SourceSpec("folder", str(tmp_path), shard_size=2)
    # Two loose images fit one shard: they are `root`, and the subfolders are themselves.
    assert list_shards(spec) == sorted(["root", head, "root-trip", derived])
    for shard, folder in ((head, head), ("root-trip", "root-trip"), (derived, "root-my trip")):
        assert [r.key for r in iter_shard_records(spec, shard)] == ["000000000"]
        assert count_shard_records(spec, shard) == 1
        assert shard_uri(spec, shard) == str(tmp_path / folder)
    write_loose_photos(tmp_path, 6)  # now a loose shard is named like the subfolder: a clash
    with pytest.raises(ConfigurationError, match=head):
        list_shards(spec)


def test_a_subfolder_named_root_without_loose_images_is_read(tmp_path):
    write_image_folder(tmp_path / "root", good_items(2))
    spec = SourceSpec("folder", str(tmp_path))
    assert list_shards(spec) == ["root"]
    assert [r.key for r in iter_shard_records(spec, "root")] == ["000000000", "000000001"]
    assert count_shard_records(spec, "root") == 2


def test_a_shard_id_the_folder_no_longer_has_is_a_missing_shard(tmp_path):
    write_loose_photos(tmp_path, 12)
    spec = SourceSpec("folder", str(tmp_path), shard_size=4)
    shards = list_shards(spec)
    # A positional id of the older cut, a name that heads no shard, a shard that never was.
    for retired in ("root-00001", "root-IMG_00001", "root-holiday"):
        assert retired not in shards
        with pytest.raises(ShardReadError, match=f"not '{retired}'") as raised:
            list(iter_shard_records(spec, retired))
        assert raised.value.reason == "missing_shard"
        assert count_shard_records(spec, retired) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(ShardReadError, match="no loose images"):
        list(iter_shard_records(SourceSpec("folder", str(empty)), "root"))


def test_keys_do_not_depend_on_where_a_cut_falls(tmp_path):
    (tmp_path / "a.jpg").write_bytes(good_jpeg_bytes(1))
    (tmp_path / "twin.jpg").write_bytes(good_jpeg_bytes(2))
    (tmp_path / "twin.png").write_bytes(good_png_bytes(3))
    whole = _read(SourceSpec("folder", str(tmp_path), shard_size=3))
    cut = _read(SourceSpec("folder", str(tmp_path), shard_size=1))  # every image a shard
    assert _ids_and_keys(whole) == {"root": ["a", "twin", "twin.png"]}
    assert _ids_and_keys(cut) == {
        "root": ["a"],
        "root-twin": ["twin"],
        "root-twin.png": ["twin.png"],
    }


def test_the_corpus_step_builds_a_cut_shard(tmp_path):
    photos = tmp_path / "export"
    captions = write_loose_photos(photos, 7)
    spec = SourceSpec("folder", str(photos), shard_size=3)
    last = cut_loose_images([f"{key}.jpg" for key in sorted(captions)], 3)[-1]
    keys = sorted(captions)[last.start : last.stop]
    home = tmp_path / "home"
    lines: list[str] = []
    result = build_corpus_shard(
        last.shard_id,
        spec,
        ImageLimits(min_side_px=8),
        DataLayout(home),
        LineageCatalog(home / "catalog.duckdb"),
        log=lines.append,
    )
    images = result.rows["image_lineage"]
    assert last.shard_id == f"root-{keys[0]}"
    assert images["image_id"].to_list() == [f"{last.shard_id}/{key}" for key in keys]
    assert images["caption"].to_list() == [captions[key] for key in keys]
    assert result.row_counts["quarantined"] == 0
    total = f"{len(keys)}/{len(keys)}"
    assert any(total in line for line in lines), lines  # progress knew the total


def test_the_corpus_resource_cuts_at_the_same_size_as_the_source():
    from resources.corpus import CorpusSourceResource

    spec = CorpusSourceResource(kind="folder", path="photos").spec()
    assert spec.shard_size == DEFAULT_SHARD_SIZE
