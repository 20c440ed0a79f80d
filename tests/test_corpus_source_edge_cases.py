"""Corpus sources on the inputs a new user's first try brings: odd names, odd encodings, broken
manifests. Each one is read, or ends in one clear `ConfigurationError` / a row with a reason."""

from __future__ import annotations

import json
import os
from pathlib import Path

import image_factory as factory
import polars as pl
import pytest

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    SourceSpec,
    derived_shard_id,
    detect_source_kind,
    iter_shard_records,
    list_shards,
    scan_source,
    shard_uri,
)
from megapairs_assets.corpus.table import build_shard_table, check_corpus
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import DataLayout, is_safe_partition_key

LIMITS = ImageLimits()


def _table(spec: SourceSpec, shard: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    return build_shard_table(shard, iter_shard_records(spec, shard), LIMITS)


def _manifest_images(folder: Path, count: int) -> list[str]:
    (folder / "img").mkdir(parents=True, exist_ok=True)
    for index in range(count):
        (folder / "img" / f"{index}.jpg").write_bytes(factory.good_jpeg_bytes(index))
    return [f"img/{index}.jpg" for index in range(count)]


# --- 1. corrupt parquet manifests -----------------------------------------------------------


def _valid_parquet(folder: Path) -> Path:
    paths = _manifest_images(folder, 3)
    rows = [{"path": path, "caption": f"photo {i}"} for i, path in enumerate(paths)]
    return factory.write_manifest(folder / "good.parquet", rows)


@pytest.mark.parametrize("damage", ["cut_off", "csv_renamed"])
def test_a_corrupt_parquet_manifest_is_a_configuration_error(tmp_path, damage):
    good = _valid_parquet(tmp_path)
    broken = tmp_path / "broken.parquet"
    if damage == "cut_off":
        broken.write_bytes(good.read_bytes()[:300])
    else:
        pl.read_parquet(good).write_csv(broken)
    with pytest.raises(ConfigurationError) as error:
        list_shards(SourceSpec(kind="manifest", path=str(broken)))
    message = str(error.value)
    assert str(broken) in message
    assert "not a readable Parquet file" in message
    assert "PAR1" in message or "footer" in message  # polars' own words on what is wrong


# --- 2. mixed JSON types in a jsonl manifest ------------------------------------------------


def test_mixed_json_types_are_read_and_each_bad_value_gets_a_reason(tmp_path):
    paths = _manifest_images(tmp_path, 6)
    rows = [
        {"key": "text", "path": paths[0], "caption": "a plain caption"},
        {"key": "list", "path": paths[1], "caption": ["list", "caption"]},
        {"key": "number", "path": paths[2], "caption": 7},
        {"key": 42, "path": paths[3], "caption": "an integer key is fine", "extra": {"a": 1}},
        {"key": "bad_path", "path": 12345, "caption": "path is a number"},
        {"key": ["k"], "path": paths[5], "caption": "key is a list", "extra": [1, 2]},
    ]
    manifest = factory.write_manifest(tmp_path / "m.jsonl", rows)
    spec = SourceSpec(kind="manifest", path=str(manifest))
    assert list_shards(spec) == ["00000"]
    images, quarantine = _table(spec, "00000")
    kept = {row["key"]: row for row in images.iter_rows(named=True)}
    assert sorted(kept) == ["42", "list", "number", "text"]
    assert kept["text"]["caption"] == "a plain caption"
    assert kept["text"]["caption_issue"] is None
    # Never stringified: the list is not a caption '["list", "caption"]'.
    assert kept["list"]["caption"] is None
    assert kept["list"]["caption_issue"].startswith("bad_caption_value: 'caption' is a list")
    assert kept["number"]["caption"] is None
    assert "is a number (7)" in kept["number"]["caption_issue"]
    reasons = {row["key"]: row for row in quarantine.iter_rows(named=True)}
    assert reasons["bad_path"]["reason"] == "bad_manifest_value"
    assert "'path' is a number (12345), not text" in reasons["bad_path"]["detail"]
    # A key that is a list cannot name the item: the row keeps its row-number key and is refused.
    assert reasons["000000005"]["reason"] == "bad_manifest_value"
    assert "'key' is a list" in reasons["000000005"]["detail"]
    assert all(outcome.passed for outcome in check_corpus(images))


def test_mixed_integer_and_text_shards_keep_the_integer_padding(tmp_path):
    paths = _manifest_images(tmp_path, 3)
    rows = [
        {"path": paths[0], "caption": "a", "shard": 1},
        {"path": paths[1], "caption": "b", "shard": "named"},
        {"path": paths[2], "caption": "c", "shard": [1]},
    ]
    manifest = factory.write_manifest(tmp_path / "m.jsonl", rows)
    spec = SourceSpec(kind="manifest", path=str(manifest))
    assert list_shards(spec) == ["00001", "named", "unassigned"]
    _, quarantine = _table(spec, "unassigned")
    assert quarantine["reason"].to_list() == ["bad_manifest_value"]
    assert "'shard' is a list" in quarantine["detail"][0]


def test_a_list_caption_column_in_parquet_is_a_bad_value_not_text(tmp_path):
    paths = _manifest_images(tmp_path, 1)
    manifest = tmp_path / "m.parquet"
    pl.DataFrame({"path": paths, "caption": [["two", "words"]]}).write_parquet(manifest)
    images, _ = _table(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    assert images["caption"].to_list() == [None]
    assert images["caption_issue"][0].startswith("bad_caption_value: 'caption' is a list")


# --- 3. loose images beside a subfolder named root ------------------------------------------


def test_root_images_beside_a_root_subfolder_is_a_configuration_error(tmp_path):
    factory.write_image_folder(tmp_path / "root", factory.good_items(1))
    (tmp_path / "top.jpg").write_bytes(factory.good_jpeg_bytes(4))
    with pytest.raises(ConfigurationError, match="both would be shard 'root'"):
        list_shards(SourceSpec(kind="folder", path=str(tmp_path)))


# --- 4. byte-order marks ----------------------------------------------------------------------


def test_a_jsonl_manifest_with_a_utf8_bom_keeps_its_first_row(tmp_path):
    paths = _manifest_images(tmp_path, 2)
    lines = [json.dumps({"key": f"k{i}", "path": p, "caption": "x"}) for i, p in enumerate(paths)]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + "\n".join(lines).encode() + b"\n")
    spec = SourceSpec(kind="manifest", path=str(manifest))
    assert scan_source(spec).unread == []
    images, quarantine = _table(spec, "00000")
    assert images["key"].to_list() == ["k0", "k1"]
    assert quarantine.is_empty()


def test_a_bom_is_stripped_from_txt_captions(tmp_path):
    shard = tmp_path / "s"
    factory.write_image_folder(shard, [("a", factory.good_jpeg_bytes(1), None)])
    (shard / "a.txt").write_bytes(b"\xef\xbb\xbfa caption")
    (record,) = iter_shard_records(SourceSpec(kind="folder", path=str(tmp_path)), "s")
    assert record.caption == "a caption"
    assert record.caption_issue is None


# --- 5. shard names with spaces or non-ASCII letters ---------------------------------------


def test_folder_shards_with_unsafe_names_get_a_derived_id_and_are_read(tmp_path):
    for name in ["good", "my shard", "ünïcode", ".hidden"]:
        factory.write_image_folder(tmp_path / name, factory.good_items(2))
    spec = SourceSpec(kind="folder", path=str(tmp_path))
    scan = scan_source(spec)
    spaced, accented = derived_shard_id("my shard"), derived_shard_id("ünïcode")
    assert spaced is not None and spaced.startswith("my_shard-")
    assert accented is not None and accented.startswith("unicode-")
    assert scan.shards == sorted(["good", spaced, accented])
    # Only the hidden folder cannot be made safe; it is still reported, not dropped silently.
    assert [record.error.split(":")[0] for record in scan.unread] == ["unsafe_shard_id"]
    assert scan.unread[0].uri.endswith(".hidden")
    for shard in (spaced, accented):
        images, quarantine = _table(spec, shard)
        assert images.height == 2 and quarantine.is_empty()
        assert is_safe_partition_key(shard)
        assert DataLayout(tmp_path / "home").corpus_images(shard).parent.name == shard
    assert shard_uri(spec, spaced) == str(tmp_path / "my shard")


def test_derived_ids_are_stable_distinct_and_refuse_what_cannot_be_made_safe():
    assert derived_shard_id("00000") == "00000"
    assert derived_shard_id("a b") == derived_shard_id("a b")
    assert derived_shard_id("a b") != derived_shard_id("a_b") != derived_shard_id("a  b")
    assert derived_shard_id("a_b") == "a_b"  # a safe name never changes
    long_id = derived_shard_id("x " * 200)
    assert long_id is not None and is_safe_partition_key(long_id)
    assert is_safe_partition_key(derived_shard_id("日本語"))
    for hopeless in ["", ".", "..", ".hidden", "a/b", "a\x00b", "bad\udcffbyte"]:
        assert derived_shard_id(hopeless) is None


def test_tar_shards_with_spaces_are_read_and_upper_case_tar_is_accepted(tmp_path):
    factory.write_wds_shard(tmp_path / "part one.tar", factory.good_items(2))
    factory.write_wds_shard(tmp_path / "UPPER.TAR", factory.good_items(1, first_seed=5))
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    spaced = derived_shard_id("part one")
    assert list_shards(spec) == sorted(["UPPER", spaced])
    assert _table(spec, spaced)[0].height == 2
    images, _ = _table(spec, "UPPER")
    assert images["source_uri"][0].startswith(str((tmp_path / "UPPER.TAR").resolve()) + "#")
    assert detect_source_kind(tmp_path) == "webdataset"
    # Every later stage reads the pixels back from that uri (embedding, export, search).
    from megapairs_assets.corpus.images import read_uri_bytes

    assert read_uri_bytes(images["source_uri"][0])[:2] in (b"\xff\xd8", b"\x89P")


# --- 6. caption sidecar problems ------------------------------------------------------------


def test_a_malformed_json_sidecar_carries_its_own_reason(tmp_path):
    shard = tmp_path / "s"
    factory.write_image_folder(shard, [("a", factory.good_jpeg_bytes(1), None)])
    (shard / "a.json").write_text("{not json")
    spec = SourceSpec(kind="folder", path=str(tmp_path))
    images, quarantine = _table(spec, "s")
    row = images.row(0, named=True)
    assert (row["key"], row["caption"]) == ("a", None)
    assert row["caption_issue"].startswith("bad_caption_file: a.json is not valid JSON")
    assert "line 1 column 2" in row["caption_issue"]
    assert quarantine.is_empty()


def test_a_latin1_txt_caption_is_decoded_and_flagged(tmp_path):
    factory.write_tar_members(
        tmp_path / "00000.tar",
        [("a.jpg", factory.good_jpeg_bytes(1)), ("a.txt", "un café crème".encode("latin-1"))],
    )
    images, _ = _table(SourceSpec(kind="webdataset", path=str(tmp_path)), "00000")
    row = images.row(0, named=True)
    assert row["caption"] == "un café crème"
    assert "\ufffd" not in row["caption"]
    assert row["caption_issue"].startswith("caption_not_utf8: a.txt is not UTF-8 (byte 0xe9")
    assert "Windows-1252" in row["caption_issue"]


# --- 7. messages ------------------------------------------------------------------------------


def test_a_corpus_path_that_does_not_exist_says_so(tmp_path):
    missing = tmp_path / "nowhere"
    with pytest.raises(ConfigurationError, match=r"does not exist"):
        detect_source_kind(missing)
    for kind in ("webdataset", "folder", "manifest"):
        with pytest.raises(ConfigurationError, match=r"does not exist"):
            list_shards(SourceSpec(kind=kind, path=str(missing)))


def test_a_manifest_row_naming_a_folder_is_not_a_file(tmp_path):
    (tmp_path / "imgs").mkdir()
    manifest = factory.write_manifest(tmp_path / "m.jsonl", [{"key": "d", "path": "imgs"}])
    _, quarantine = _table(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    row = quarantine.row(0, named=True)
    assert row["reason"] == "not_a_file"
    assert "is a folder, not an image file" in row["detail"]


def test_a_manifest_row_naming_a_fifo_is_refused_without_blocking(tmp_path):
    os.mkfifo(tmp_path / "pipe.jpg")
    manifest = factory.write_manifest(tmp_path / "m.jsonl", [{"key": "p", "path": "pipe.jpg"}])
    _, quarantine = _table(SourceSpec(kind="manifest", path=str(manifest)), "00000")
    assert quarantine["reason"].to_list() == ["not_a_file"]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_an_empty_manifest_says_it_is_empty(tmp_path, suffix):
    manifest = tmp_path / f"m{suffix}"
    if suffix == ".jsonl":
        manifest.write_text("\n\n")
    else:
        pl.DataFrame(
            {"path": [], "caption": []}, schema={"path": pl.String, "caption": pl.String}
        ).write_parquet(manifest)
    with pytest.raises(ConfigurationError, match=r"is empty: it has no rows"):
        list_shards(SourceSpec(kind="manifest", path=str(manifest)))


def test_an_empty_folder_is_a_configuration_error(tmp_path):
    with pytest.raises(ConfigurationError, match=r"is empty"):
        list_shards(SourceSpec(kind="folder", path=str(tmp_path)))


def test_a_folder_read_as_images_that_holds_tar_shards_names_them(tmp_path):
    factory.write_wds_shard(tmp_path / "A.TAR", factory.good_items(1))
    with pytest.raises(ConfigurationError, match=r"A\.TAR is a webdataset \.tar shard"):
        list_shards(SourceSpec(kind="folder", path=str(tmp_path)))


def test_detect_source_kind_explains_a_file_that_is_not_a_manifest(tmp_path):
    (tmp_path / "list.csv").write_text("path\n")
    with pytest.raises(ConfigurationError, match=r"neither a manifest nor a \.tar shard"):
        detect_source_kind(tmp_path / "list.csv")
    (tmp_path / "m.JSONL").write_text("{}\n")
    assert detect_source_kind(tmp_path / "m.JSONL") == "manifest"


# --- 8. keys ----------------------------------------------------------------------------------


def test_webdataset_keys_keep_the_member_folders(tmp_path):
    members = [
        ("a/x.jpg", factory.good_jpeg_bytes(1)),
        ("a/x.txt", b"in a"),
        ("b/x.jpg", factory.good_jpeg_bytes(2)),
        ("sub/dir/deep.jpg", factory.good_jpeg_bytes(3)),
        ("./000000012.jpg", factory.good_jpeg_bytes(4)),
        ("000000013.jpg", factory.good_jpeg_bytes(5)),
    ]
    factory.write_tar_members(tmp_path / "00000.tar", members)
    images, quarantine = _table(SourceSpec(kind="webdataset", path=str(tmp_path)), "00000")
    assert quarantine.is_empty()
    captions = dict(zip(images["key"], images["caption"], strict=True))
    assert captions == {
        "000000012": None,
        "000000013": None,
        "a/x": "in a",
        "b/x": None,
        "sub/dir/deep": None,
    }
    assert "00000/sub/dir/deep" in images["image_id"].to_list()


def test_folder_images_sharing_a_stem_are_both_kept_and_others_keep_their_keys(tmp_path):
    shard = tmp_path / "s"
    factory.write_image_folder(shard, [("twin", factory.good_jpeg_bytes(1), "twins")])
    factory.write_image_folder(shard, [("twin", factory.good_png_bytes(2), None)], "png")
    factory.write_image_folder(shard, [("solo", factory.good_png_bytes(3), None)], "png")
    images, quarantine = _table(SourceSpec(kind="folder", path=str(tmp_path)), "s")
    assert quarantine.is_empty()
    # The first by name keeps the key it always had; only the later twin is named in full.
    assert sorted(images["key"].to_list()) == ["solo", "twin", "twin.png"]
    uris = dict(zip(images["key"], images["source_uri"], strict=True))
    assert uris["twin"].endswith("twin.jpg") and uris["twin.png"].endswith("twin.png")


def test_a_missing_corpus_with_a_close_sibling_name_suggests_it(tmp_path):
    (tmp_path / "photos_2024").mkdir()
    with pytest.raises(ConfigurationError, match=r"did you mean .*photos_2024\?"):
        detect_source_kind(tmp_path / "photo_2024")
    with pytest.raises(ConfigurationError) as raised:
        detect_source_kind(tmp_path / "unrelated")
    assert "did you mean" not in str(raised.value)
