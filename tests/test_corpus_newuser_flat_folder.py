"""A new user's flat folder of photos: more loose images than a shard holds become several shards.

`--corpus ~/Pictures/export` with 50,000 phone photos and no sub-folders used to be one giant
shard `root` (no parallelism, no per-shard resume). Beyond `shard_size` (1,000, the manifest's
rows per shard) the loose images are cut, in name order, into `root-00000`, `root-00001`, ...
while a folder of up to 1,000 keeps the one shard `root` (existing homes unchanged).
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
    iter_shard_records,
    list_shards,
    loose_image_shard_ids,
    scan_source,
    shard_uri,
)
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import DataLayout, is_safe_partition_key
from megapairs_assets.lineage.catalog import LineageCatalog


def _read(spec: SourceSpec) -> dict[str, list[RawRecord]]:
    return {shard: list(iter_shard_records(spec, shard)) for shard in list_shards(spec)}


def test_a_flat_folder_beyond_a_shard_is_cut_in_name_order_with_captions_kept(tmp_path):
    photos = tmp_path / "export"
    captions = write_loose_photos(photos, 2_100, caption_every=7)
    spec = SourceSpec("folder", str(photos))
    assert spec.shard_size == DEFAULT_SHARD_SIZE == 1_000

    shards = _read(spec)

    assert list(shards) == ["root-00000", "root-00001", "root-00002"]
    assert all(is_safe_partition_key(shard) for shard in shards)
    assert [len(records) for records in shards.values()] == [1_000, 1_000, 100]
    keys = [record.key for records in shards.values() for record in records]
    assert keys == sorted(captions)  # every image once, in name order across the cut
    assert shards["root-00001"][0].key == "IMG_01000"
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
    assert shard_uri(spec, "root-00001") == str(photos)


def test_up_to_a_shard_of_loose_images_stays_the_one_shard_root(tmp_path):
    photos = tmp_path / "export"
    write_loose_photos(photos, 1_000, caption_every=1_000)
    spec = SourceSpec("folder", str(photos))
    assert list_shards(spec) == ["root"]
    assert count_shard_records(spec, "root") == 1_000
    assert len(list(iter_shard_records(spec, "root"))) == 1_000


def test_shard_ids_of_loose_images():
    assert loose_image_shard_ids(0, 1_000) == ["root"]
    assert loose_image_shard_ids(1_000, 1_000) == ["root"]
    assert loose_image_shard_ids(1_001, 1_000) == ["root-00000", "root-00001"]
    assert len(loose_image_shard_ids(50_000, 1_000)) == 50
    with pytest.raises(ValueError, match="positive"):
        loose_image_shard_ids(5, 0)


def test_split_loose_images_sit_beside_subfolder_shards(tmp_path):
    write_image_folder(tmp_path / "beach", good_items(2))
    write_loose_photos(tmp_path, 5)
    spec = SourceSpec("folder", str(tmp_path), shard_size=2)
    shards = _read(spec)
    assert list(shards) == ["beach", "root-00000", "root-00001", "root-00002"]
    assert [len(records) for records in shards.values()] == [2, 2, 2, 1]
    # The top level's other entries are reported once by the source, never by a loose shard.
    (tmp_path / "notes.pdf").write_bytes(b"%PDF")
    assert [r.uri.rsplit("/", 1)[-1] for r in scan_source(spec).unread] == ["notes.pdf"]
    assert [len(list(iter_shard_records(spec, s))) for s in shards] == [2, 2, 2, 1]


def test_a_subfolder_named_like_a_loose_shard_is_refused_only_when_they_clash(tmp_path):
    write_image_folder(tmp_path / "root-00001", good_items(1))
    write_loose_photos(tmp_path, 2)
    spec = SourceSpec("folder", str(tmp_path), shard_size=2)
    # Two loose images fit one shard: they are `root`, and `root-00001` is the subfolder.
    assert list_shards(spec) == ["root", "root-00001"]
    assert [r.key for r in iter_shard_records(spec, "root-00001")] == ["000000000"]
    assert count_shard_records(spec, "root-00001") == 1
    assert shard_uri(spec, "root-00001") == str(tmp_path / "root-00001")
    write_loose_photos(tmp_path, 4)  # now cut into root-00000 and root-00001: a clash
    with pytest.raises(ConfigurationError, match="root-00001"):
        list_shards(spec)


def test_a_subfolder_named_root_without_loose_images_is_read(tmp_path):
    write_image_folder(tmp_path / "root", good_items(2))
    spec = SourceSpec("folder", str(tmp_path))
    assert list_shards(spec) == ["root"]
    assert [r.key for r in iter_shard_records(spec, "root")] == ["000000000", "000000001"]
    assert count_shard_records(spec, "root") == 2


def test_a_shard_id_the_folder_no_longer_has_is_a_missing_shard(tmp_path):
    write_loose_photos(tmp_path, 5)
    spec = SourceSpec("folder", str(tmp_path), shard_size=2)
    # `root` was this home's shard while the folder held at most 2 images; its images are now
    # read by the parts, so reading `root` again would count them twice.
    for retired in ("root", "root-00003"):
        with pytest.raises(ShardReadError, match="root-00000' to 'root-00002") as raised:
            list(iter_shard_records(spec, retired))
        assert raised.value.reason == "missing_shard"
        assert count_shard_records(spec, retired) is None


def test_keys_do_not_depend_on_where_a_cut_falls(tmp_path):
    (tmp_path / "a.jpg").write_bytes(good_jpeg_bytes(1))
    (tmp_path / "twin.jpg").write_bytes(good_jpeg_bytes(2))
    (tmp_path / "twin.png").write_bytes(good_png_bytes(3))
    whole = _read(SourceSpec("folder", str(tmp_path), shard_size=3))
    cut = _read(SourceSpec("folder", str(tmp_path), shard_size=2))
    assert [r.key for r in whole["root"]] == ["a", "twin", "twin.png"]
    assert {s: [r.key for r in records] for s, records in cut.items()} == {
        "root-00000": ["a", "twin"],
        "root-00001": ["twin.png"],
    }


def test_the_corpus_step_builds_a_cut_shard(tmp_path):
    photos = tmp_path / "export"
    captions = write_loose_photos(photos, 7)
    spec = SourceSpec("folder", str(photos), shard_size=3)
    home = tmp_path / "home"
    lines: list[str] = []
    result = build_corpus_shard(
        "root-00002",
        spec,
        ImageLimits(min_side_px=8),
        DataLayout(home),
        LineageCatalog(home / "catalog.duckdb"),
        log=lines.append,
    )
    images = result.rows["image_lineage"]
    assert images["image_id"].to_list() == ["root-00002/IMG_00006"]
    assert images["caption"].to_list() == [captions["IMG_00006"]]
    assert result.row_counts["quarantined"] == 0
    assert any("1/1" in line for line in lines), lines  # progress knew the total


def test_the_corpus_resource_cuts_at_the_same_size_as_the_source():
    from resources.corpus import CorpusSourceResource

    spec = CorpusSourceResource(kind="folder", path="photos").spec()
    assert spec.shard_size == DEFAULT_SHARD_SIZE
