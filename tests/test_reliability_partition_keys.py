"""Issue 7, item 1: a shard id never becomes a path outside the data root.

Shard ids are born in the corpus source (tar stems, subfolder names, a manifest's `shard`
column) and become file names in `DataLayout`. Unsafe ids are reported where they are born and
refused again where paths are made.
"""

from __future__ import annotations

from pathlib import Path

import image_factory as factory
import pytest

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    SourceSpec,
    iter_shard_records,
    list_shards,
    scan_source,
)
from megapairs_assets.corpus.table import (
    SOURCE_REPORT_SHARD,
    build_shard_table,
    source_report_table,
)
from megapairs_assets.lib.storage import DataLayout, is_safe_partition_key, write_parquet_atomic

ESCAPING_SHARD = "../../../escape_m"
UNSAFE_KEYS = ["..", ".", "", "../escape", "a/b", "/abs", ".hidden", "a b", "x" * 129, "a\x00b"]
SAFE_KEYS = ["00000", "root", "unassigned", "shard-1.v2_a", "x" * 128]


def _escaping_manifest(folder: Path) -> SourceSpec:
    (folder / "images").mkdir(parents=True)
    (folder / "images" / "good.jpg").write_bytes(factory.good_jpeg_bytes(0))
    (folder / "images" / "evil.jpg").write_bytes(factory.good_jpeg_bytes(1))
    rows = [
        {"key": "good", "path": "images/good.jpg", "caption": "kept", "shard": "a"},
        {"key": "evil", "path": "images/evil.jpg", "caption": "climbs", "shard": ESCAPING_SHARD},
    ]
    return SourceSpec(kind="manifest", path=str(factory.write_manifest(folder / "m.jsonl", rows)))


def test_manifest_shard_that_climbs_out_is_reported_not_listed(tmp_path):
    spec = _escaping_manifest(tmp_path / "src")
    scan = scan_source(spec)
    assert scan.shards == list_shards(spec) == ["a"]
    report = source_report_table(scan.unread)
    assert report.height == 1
    row = report.row(0, named=True)
    assert (row["shard"], row["key"], row["reason"]) == (
        SOURCE_REPORT_SHARD,
        "evil",
        "unsafe_shard_id",
    )
    assert row["source_uri"].endswith("images/evil.jpg")
    assert ESCAPING_SHARD in row["detail"] and spec.path in row["detail"]


def test_reading_an_unsafe_shard_id_is_a_clear_error(tmp_path):
    spec = _escaping_manifest(tmp_path / "src")
    with pytest.raises(ValueError, match="not safe as a file name"):
        iter_shard_records(spec, ESCAPING_SHARD)


def test_a_corpus_run_over_a_hostile_manifest_writes_only_under_its_home(tmp_path):
    """The issue's recipe: every listed shard is built and written; nothing lands outside."""
    spec = _escaping_manifest(tmp_path / "src")
    home = tmp_path / "deep" / "er" / "home"
    layout = DataLayout(home)
    for shard in list_shards(spec):
        images, quarantine = build_shard_table(
            shard, iter_shard_records(spec, shard), ImageLimits()
        )
        write_parquet_atomic(images, layout.corpus_images(shard))
        write_parquet_atomic(quarantine, layout.corpus_quarantine(shard))
        write_parquet_atomic(images, layout.shard_table("clip_image_embeddings", shard))
    written = sorted(tmp_path.rglob("*.parquet"))
    assert written and all(path.is_relative_to(home) for path in written), written


def test_webdataset_shard_named_dot_dot_is_reported_not_listed(tmp_path):
    factory.write_wds_shard(tmp_path / "00000.tar", factory.good_items(1))
    factory.write_wds_shard(tmp_path / "...tar", factory.good_items(1, first_seed=5))
    scan = scan_source(SourceSpec(kind="webdataset", path=str(tmp_path)))
    assert scan.shards == ["00000"]
    report = source_report_table(scan.unread)
    assert report["reason"].to_list() == ["unsafe_shard_id"]
    assert report["source_uri"][0] == str(tmp_path.resolve() / "...tar")
    assert "'..'" in report["detail"][0]


def test_folder_subfolders_get_safe_ids_and_only_hidden_ones_are_reported(tmp_path):
    from megapairs_assets.corpus.sources import derived_shard_id

    for name in ["good", "has space", ".hidden"]:
        factory.write_image_folder(tmp_path / name, factory.good_items(1))
    scan = scan_source(SourceSpec(kind="folder", path=str(tmp_path)))
    assert sorted(scan.shards) == sorted(["good", derived_shard_id("has space")])
    assert all(is_safe_partition_key(shard) for shard in scan.shards)
    report = source_report_table(scan.unread)
    assert [Path(uri).name for uri in report["source_uri"]] == [".hidden"]
    assert set(report["reason"]) == {"unsafe_shard_id"}


@pytest.mark.parametrize("key", UNSAFE_KEYS)
def test_data_layout_refuses_unsafe_partition_keys(tmp_path, key):
    layout = DataLayout(tmp_path)
    assert not is_safe_partition_key(key)
    for make_path in (
        layout.corpus_images,
        layout.corpus_quarantine,
        lambda shard: layout.shard_table("mined_image_pairs", shard),
        lambda name: layout.shard_table(name, "00000"),
    ):
        with pytest.raises(ValueError, match="not safe as a file name"):
            make_path(key)


@pytest.mark.parametrize("key", SAFE_KEYS)
def test_data_layout_accepts_safe_keys_inside_their_asset_folder(tmp_path, key):
    layout = DataLayout(tmp_path)
    assert layout.corpus_images(key) == tmp_path / "data" / "image_corpus" / key / "images.parquet"
    assert layout.shard_table("clip_image_embeddings", key).parent == (
        tmp_path / "data" / "clip_image_embeddings"
    )


def test_data_layout_refuses_a_shard_folder_that_links_outside(tmp_path):
    layout = DataLayout(tmp_path / "home")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    corpus_dir = tmp_path / "home" / "data" / "image_corpus"
    corpus_dir.mkdir(parents=True)
    (corpus_dir / "00007").symlink_to(outside, target_is_directory=True)
    with pytest.raises(ValueError, match="outside"):
        layout.corpus_images("00007")
    assert layout.corpus_source_report().parent == corpus_dir
