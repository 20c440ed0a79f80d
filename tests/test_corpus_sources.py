"""The three corpus source layouts: which shards they list and which records they yield."""

from __future__ import annotations

import json
from pathlib import Path

import image_factory as factory
import pytest

from megapairs_assets.corpus.images import ImageLimits, open_image_rgb
from megapairs_assets.corpus.sources import (
    ShardReadError,
    SourceSpec,
    iter_shard_records,
    list_shards,
    scan_source,
)
from megapairs_assets.lib.errors import ConfigurationError

LIMITS = ImageLimits()


def _records(spec: SourceSpec, shard_id: str) -> dict:
    return {record.key: record for record in iter_shard_records(spec, shard_id)}


# --- webdataset -----------------------------------------------------------------------------


def test_webdataset_lists_tar_stems_sorted_and_stable_as_shards_arrive(tmp_path):
    factory.write_wds_shard(tmp_path / "00002.tar", factory.good_items(1))
    factory.write_wds_shard(tmp_path / "00000.tar", factory.good_items(1))
    (tmp_path / "00000_stats.json").write_text("{}")
    (tmp_path / "00000.parquet").write_bytes(b"")
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    assert list_shards(spec) == ["00000", "00002"]
    factory.write_wds_shard(tmp_path / "00001.tar", factory.good_items(1))
    assert list_shards(spec) == ["00000", "00001", "00002"]


def test_webdataset_groups_members_by_key_with_txt_captions(tmp_path):
    items = factory.good_items(3)
    tar_path = factory.write_wds_shard(tmp_path / "00000.tar", items)
    records = _records(SourceSpec(kind="webdataset", path=str(tmp_path)), "00000")
    assert list(records) == [key for key, _, _ in items]
    for key, image_bytes, caption in items:
        record = records[key]
        assert record.caption == caption
        assert record.data == image_bytes
        assert record.error is None
        assert record.uri == f"{tar_path.resolve()}#{key}.jpg"
    # The uri is what embedding stages hand back to open_image_rgb.
    assert open_image_rgb(records["000000001"].uri, LIMITS).size == factory.GOOD_SIZE_PX


def test_webdataset_caption_falls_back_to_json(tmp_path):
    image = factory.good_jpeg_bytes(2)
    caption_json = json.dumps({"caption": "from json", "status": "success"}).encode()
    factory.write_tar_members(tmp_path / "00000.tar", [("b.jpg", image), ("b.json", caption_json)])
    both = [("c.jpg", image), ("c.txt", b"from txt"), ("c.json", caption_json)]
    factory.write_tar_members(tmp_path / "00001.tar", both)
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    assert [record.caption for record in iter_shard_records(spec, "00000")] == ["from json"]
    assert [record.caption for record in iter_shard_records(spec, "00001")] == ["from txt"]


def test_webdataset_key_without_image_and_repeated_keys(tmp_path):
    items = [
        ("a", factory.good_jpeg_bytes(1), "first a"),
        ("b", None, "caption only"),
        ("a", factory.good_jpeg_bytes(2), "second a"),
    ]
    factory.write_wds_shard(tmp_path / "00000.tar", items)
    records = list(iter_shard_records(SourceSpec(kind="webdataset", path=str(tmp_path)), "00000"))
    assert [record.key for record in records] == ["a", "b", "a"]
    assert [record.caption for record in records] == ["first a", "caption only", "second a"]
    assert records[1].data is None
    assert records[1].error.startswith("missing_image:")


def test_webdataset_unknown_shard_raises(tmp_path):
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    with pytest.raises(ShardReadError) as missing:
        list(iter_shard_records(spec, "99999"))
    assert missing.value.reason == "missing_shard"


# --- folder ---------------------------------------------------------------------------------


def test_folder_subfolders_and_top_level_images_are_shards(tmp_path):
    factory.write_image_folder(tmp_path / "beach", factory.good_items(2))
    factory.write_image_folder(tmp_path / "city", factory.good_items(1, first_seed=5))
    (tmp_path / "empty").mkdir()
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "readme.txt").write_text("not an image")
    (tmp_path / "cover.png").write_bytes(factory.good_png_bytes(9))
    spec = SourceSpec(kind="folder", path=str(tmp_path))
    assert list_shards(spec) == ["beach", "city", "root"]
    assert list(_records(spec, "root")) == ["cover"]
    assert list(_records(spec, "city")) == ["000000005"]


def test_folder_captions_come_from_txt_or_json_sidecars(tmp_path):
    shard = tmp_path / "s"
    factory.write_image_folder(shard, [("with_txt", factory.good_jpeg_bytes(1), "from txt")])
    factory.write_image_folder(shard, [("with_json", factory.good_jpeg_bytes(2), None)])
    (shard / "with_json.json").write_text(json.dumps({"caption": "from json", "w": 64}))
    factory.write_image_folder(shard, [("bare", factory.good_png_bytes(3), None)], "png")
    records = _records(SourceSpec(kind="folder", path=str(tmp_path)), "s")
    assert {key: record.caption for key, record in records.items()} == {
        "bare": None,
        "with_json": "from json",
        "with_txt": "from txt",
    }
    assert records["bare"].uri == str((shard / "bare.png").resolve())
    assert records["bare"].data == factory.good_png_bytes(3)


def test_folder_with_root_images_and_a_root_subfolder_is_refused(tmp_path):
    factory.write_image_folder(tmp_path / "root", factory.good_items(1))
    (tmp_path / "top.jpg").write_bytes(factory.good_jpeg_bytes(4))
    with pytest.raises(ConfigurationError, match="root"):
        list_shards(SourceSpec(kind="folder", path=str(tmp_path)))


# --- manifest -------------------------------------------------------------------------------


def _manifest_rows(folder: Path, count: int) -> list[dict]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    rows = []
    for index in range(count):
        (folder / "img" / f"{index}.jpg").write_bytes(factory.good_jpeg_bytes(index))
        rows.append({"path": f"img/{index}.jpg", "caption": f"photo {index}"})
    return rows


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_manifest_without_shard_column_is_cut_by_shard_size(tmp_path, suffix, monkeypatch):
    manifest = factory.write_manifest(tmp_path / f"m{suffix}", _manifest_rows(tmp_path, 5))
    spec = SourceSpec(kind="manifest", path=str(manifest), shard_size=2)
    assert list_shards(spec) == ["00000", "00001", "00002"]
    # Relative paths resolve against the manifest's folder, not the working directory.
    monkeypatch.chdir(tmp_path.parent)
    records = list(iter_shard_records(spec, "00001"))
    assert [record.key for record in records] == ["000000002", "000000003"]
    assert [record.caption for record in records] == ["photo 2", "photo 3"]
    assert records[0].uri == str((tmp_path / "img" / "2.jpg").resolve())
    assert records[0].data == factory.good_jpeg_bytes(2)


def test_manifest_shard_and_key_columns_are_used(tmp_path):
    rows = _manifest_rows(tmp_path, 4)
    for index, row in enumerate(rows):
        row.update(id=f"item-{index}", shard=index % 2)
    manifest = factory.write_manifest(tmp_path / "m.parquet", rows)
    spec = SourceSpec(kind="manifest", path=str(manifest))
    assert list_shards(spec) == ["00000", "00001"]
    assert list(_records(spec, "00001")) == ["item-1", "item-3"]


def test_manifest_can_point_into_tar_shards(tmp_path):
    factory.write_wds_shard(tmp_path / "shards" / "00000.tar", factory.good_items(2))
    rows = [{"key": "k", "path": "shards/00000.tar#000000001.jpg", "caption": "in a tar"}]
    manifest = factory.write_manifest(tmp_path / "m.jsonl", rows)
    (record,) = iter_shard_records(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    assert record.error is None
    assert record.data == factory.good_jpeg_bytes(1)


def test_manifest_missing_files_and_urls_become_error_records(tmp_path):
    rows = [
        {"key": "gone", "path": "nowhere/x.jpg", "caption": "lost"},
        {"key": "web", "url": "http://example.com/y.jpg", "caption": "online"},
    ]
    manifest = factory.write_manifest(tmp_path / "m.jsonl", rows)
    records = _records(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    assert records["gone"].data is None
    assert records["gone"].error.startswith("missing_file:")
    assert records["web"].error.startswith("remote_uri: download shards first")
    assert records["web"].uri == "http://example.com/y.jpg"


def test_manifest_needs_a_path_or_url_column(tmp_path):
    manifest = factory.write_manifest(tmp_path / "m.jsonl", [{"file": "a.jpg", "caption": "x"}])
    with pytest.raises(ConfigurationError, match="needs a 'path' or 'url' column"):
        list_shards(SourceSpec(kind="manifest", path=str(manifest)))


def test_malformed_manifest_lines_are_reported_and_the_rest_is_read(tmp_path):
    rows = _manifest_rows(tmp_path, 4)
    good = [json.dumps(row) for row in rows]
    # Line 2 is broken JSON, line 4 a JSON string: both set aside, with their line numbers.
    lines = [good[0], "{broken", good[1], '"just a string"', "", good[2], good[3]]
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    spec = SourceSpec(kind="manifest", path=str(manifest), shard_size=3)
    scan = scan_source(spec)
    reasons = {record.uri: record.error for record in scan.unread}
    assert set(reasons) == {f"{manifest}:2", f"{manifest}:4"}
    assert all(error.startswith("bad_manifest_line") for error in reasons.values())
    assert "line 2 is not JSON" in reasons[f"{manifest}:2"]
    # A bad line keeps its row number: the rows after it get the keys they would have had.
    keys = [key for shard in scan.shards for key in _records(spec, shard)]
    assert keys == ["000000000", "000000002", "000000004", "000000005"]


def test_a_manifest_with_no_readable_line_names_the_problem(tmp_path):
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("{broken\nnot json either\n", encoding="utf-8")
    with pytest.raises(ConfigurationError, match=r"2 lines are not JSON objects, first line 1"):
        list_shards(SourceSpec(kind="manifest", path=str(manifest)))
