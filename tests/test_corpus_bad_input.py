"""Bad corpus inputs are quarantined with the right reason (or converted), never fatal.

One webdataset shard mixes good images with every kind of bad input; the tests check what a
user would see in the images and quarantine tables built from it.
"""

from __future__ import annotations

import multiprocessing
import time
from pathlib import Path

import image_factory as factory
import numpy as np
import polars as pl
import pytest

from megapairs_assets.corpus.images import (
    ImageLimits,
    ImageRejected,
    clean_caption,
    close_tar_cache,
    decode_image,
    open_image_rgb,
    validate_image,
)
from megapairs_assets.corpus.sources import (
    RawRecord,
    ShardReadError,
    SourceSpec,
    iter_shard_records,
)
from megapairs_assets.corpus.table import (
    CORPUS_SCHEMA,
    QUARANTINE_SCHEMA,
    build_shard_table,
    check_corpus,
    shard_error_table,
)

LIMITS = ImageLimits()
GOOD_KEYS = ["000000000", "000000001", "000000002", "000000003"]
CONVERTED_KEYS = ["cmyk", "rgba", "gray", "sixteen_bit", "rotated"]
CAPTION_KEYS = ["empty_caption", "long_caption"]
EXPECTED_REASONS = {
    "truncated": "decode_error",
    "not_an_image": "decode_error",
    "one_pixel": "too_small",
    "huge": "too_large",
    "no_image": "missing_image",
}


@pytest.fixture(scope="module")
def mixed_shard(tmp_path_factory: pytest.TempPathFactory) -> tuple[pl.DataFrame, pl.DataFrame]:
    """(images, quarantine) built from one shard holding good rows and every bad input."""
    items = [
        *factory.good_items(4),
        ("truncated", factory.truncated_jpeg_bytes(), "cut short"),
        ("not_an_image", factory.not_an_image_bytes(), "text under an image name"),
        ("one_pixel", factory.tiny_png_bytes(), "a dot"),
        ("huge", factory.huge_png_bytes(), "a bomb"),
        ("no_image", None, "a caption without its image"),
        ("cmyk", factory.cmyk_jpeg_bytes(), "print colours"),
        ("rgba", factory.rgba_png_bytes(), "half transparent"),
        ("gray", factory.grayscale_png_bytes(), "a gray ramp"),
        ("sixteen_bit", factory.sixteen_bit_png_bytes(), "a deep ramp"),
        ("rotated", factory.rotated_jpeg_bytes(), "taken sideways"),
        ("empty_caption", factory.good_jpeg_bytes(50), "   \n "),
        ("long_caption", factory.good_jpeg_bytes(51), factory.long_caption(10_000)),
        ("000000001", factory.good_jpeg_bytes(52), "same key, other picture"),
        ("copy_of_first", factory.good_jpeg_bytes(0), "same picture, other key"),
    ]
    folder = tmp_path_factory.mktemp("mixed")
    factory.write_wds_shard(folder / "00000.tar", items)
    spec = SourceSpec(kind="webdataset", path=str(folder))
    return build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)


def _row(images: pl.DataFrame, key: str) -> dict:
    return images.filter(pl.col("key") == key).row(0, named=True)


def _quarantined(quarantine: pl.DataFrame, key: str) -> dict:
    rows = quarantine.filter(pl.col("key") == key)
    assert rows.height == 1, f"expected one quarantine row for {key}, got {rows.height}"
    return rows.row(0, named=True)


@pytest.mark.parametrize(("key", "reason"), sorted(EXPECTED_REASONS.items()))
def test_each_bad_input_is_quarantined_with_its_reason(mixed_shard, key, reason):
    images, quarantine = mixed_shard
    assert _quarantined(quarantine, key)["reason"] == reason
    assert key not in images["key"].to_list()


def test_good_rows_of_the_shard_are_all_kept(mixed_shard):
    images, quarantine = mixed_shard
    expected = sorted(f"00000/{key}" for key in GOOD_KEYS + CONVERTED_KEYS + CAPTION_KEYS)
    assert images["image_id"].to_list() == expected
    assert images.schema == CORPUS_SCHEMA
    assert quarantine.schema == QUARANTINE_SCHEMA
    assert all(outcome.passed for outcome in check_corpus(images))


def test_repeated_key_keeps_the_first_image(mixed_shard):
    images, quarantine = mixed_shard
    first = decode_image(factory.good_jpeg_bytes(1), LIMITS)
    kept = _row(images, "000000001")
    assert kept["caption"] == "photo 1"
    assert kept["content_hash"] == first.content_hash
    assert _quarantined(quarantine, "000000001")["reason"] == "duplicate_key"
    # Both copies share one member name; reading the kept row's uri must give the first copy.
    reread = np.asarray(open_image_rgb(kept["source_uri"], LIMITS))
    assert np.array_equal(reread, np.asarray(first.image))


def test_repeated_content_is_quarantined_naming_the_kept_image(mixed_shard):
    _, quarantine = mixed_shard
    row = _quarantined(quarantine, "copy_of_first")
    assert row["reason"] == "duplicate_content"
    assert "00000/000000000" in row["detail"]


def test_quarantine_rows_point_at_the_source_member(mixed_shard):
    _, quarantine = mixed_shard
    uri = _quarantined(quarantine, "truncated")["source_uri"]
    assert uri.endswith("00000.tar#truncated.jpg")


def test_huge_image_is_rejected_from_its_header_fast():
    started_s = time.perf_counter()
    with pytest.raises(ImageRejected) as rejected:
        decode_image(factory.huge_png_bytes(), LIMITS)
    assert time.perf_counter() - started_s < 1.0
    assert rejected.value.reason == "too_large"
    # The pixel data of this one is garbage: only a header-based decision says too_large.
    with pytest.raises(ImageRejected) as header_only:
        decode_image(factory.huge_png_header_only_bytes(), LIMITS)
    assert header_only.value.reason == "too_large"


def test_cmyk_comes_out_rgb_in_the_right_colour(mixed_shard):
    images, _ = mixed_shard
    row = _row(images, "cmyk")
    picture = np.asarray(open_image_rgb(row["source_uri"], LIMITS), dtype=int)
    assert row["original_mode"] == "CMYK"
    red, green, blue = picture.reshape(-1, 3).mean(axis=0)
    assert red > 200 and green < 50 and blue < 50


def test_transparent_pixels_are_composited_on_white(mixed_shard):
    images, _ = mixed_shard
    picture = open_image_rgb(_row(images, "rgba")["source_uri"], LIMITS)
    assert picture.mode == "RGB"
    width, height = picture.size
    assert picture.getpixel((2, height // 2)) == (255, 255, 255)
    assert picture.getpixel((width - 3, height // 2)) == factory.RGBA_OPAQUE_RGB


@pytest.mark.parametrize("key", ["gray", "sixteen_bit"])
def test_gray_ramps_keep_their_tones(mixed_shard, key):
    images, _ = mixed_shard
    row = _row(images, key)
    picture = np.asarray(open_image_rgb(row["source_uri"], LIMITS), dtype=int)
    assert picture.shape[2] == 3
    assert (picture[..., 0] == picture[..., 2]).all()
    middle_row = picture[picture.shape[0] // 2, :, 0]
    # Black on the left, mid gray in the middle, white on the right: not clipped to white.
    assert middle_row[0] < 10
    assert 100 < middle_row[len(middle_row) // 2] < 160
    assert middle_row[-1] > 245


def test_sixteen_bit_mode_is_recorded(mixed_shard):
    images, _ = mixed_shard
    assert _row(images, "sixteen_bit")["original_mode"].startswith("I")


def test_exif_orientation_is_applied(mixed_shard):
    images, _ = mixed_shard
    row = _row(images, "rotated")
    picture = open_image_rgb(row["source_uri"], LIMITS)
    assert (row["width"], row["height"]) == (64, 32)  # as stored in the file
    assert picture.size == (32, 64)  # as meant to be seen


def test_empty_caption_keeps_the_image_with_null_caption(mixed_shard):
    images, quarantine = mixed_shard
    assert _row(images, "empty_caption")["caption"] is None
    assert "empty_caption" not in quarantine["key"].to_list()


def test_long_caption_is_cut_at_a_word_boundary(mixed_shard):
    images, _ = mixed_shard
    row = _row(images, "long_caption")
    original = factory.long_caption(10_000)
    assert row["caption_truncated"] is True
    assert len(row["caption"]) <= LIMITS.max_caption_chars
    assert original.startswith(row["caption"])
    assert original[len(row["caption"])] == " "


def test_caption_control_characters_are_removed():
    cleaned, truncated = clean_caption("\x00a red\tcar\x07 on\nthe road \x1b", LIMITS)
    assert cleaned == "a red car on the road"
    assert truncated is False
    assert clean_caption(" \x00\n ", LIMITS) == (None, False)


def test_same_keys_in_two_tars_are_both_kept(tmp_path):
    factory.write_duplicate_key_shards(tmp_path)
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    tables = [build_shard_table(s, iter_shard_records(spec, s), LIMITS) for s in ("00000", "00001")]
    corpus = pl.concat([images for images, _ in tables])
    assert corpus.height == 6
    assert corpus["image_id"].n_unique() == 6
    assert corpus["key"].n_unique() == 3
    assert all(quarantine.is_empty() for _, quarantine in tables)
    assert all(outcome.passed for outcome in check_corpus(corpus))


def test_a_file_that_is_not_a_tar_becomes_one_quarantine_row(tmp_path):
    factory.write_not_a_tar(tmp_path / "x.tar")
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    with pytest.raises(ShardReadError) as unreadable:
        build_shard_table("x", iter_shard_records(spec, "x"), LIMITS)
    assert unreadable.value.reason == "not_a_tar"
    quarantine = shard_error_table("x", str(tmp_path / "x.tar"), unreadable.value)
    assert quarantine.schema == QUARANTINE_SCHEMA
    assert quarantine.rows(named=True) == [
        {
            "shard": "x",
            "key": None,
            "source_uri": str(tmp_path / "x.tar"),
            "reason": "not_a_tar",
            "detail": unreadable.value.detail,
        }
    ]


# 0.33 cuts inside an image member; 0.6 ends exactly on a header boundary (no end marker).
@pytest.mark.parametrize("keep_fraction", [0.33, 0.6])
def test_truncated_tar_keeps_what_was_read_and_flags_the_break(tmp_path, keep_fraction):
    factory.write_truncated_wds_shard(tmp_path / "00000.tar", factory.good_items(6), keep_fraction)
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert 1 <= images.height < 6
    assert images["key"].to_list() == [f"{index:09d}" for index in range(images.height)]
    assert quarantine["reason"].to_list() == ["truncated_shard"]


def test_complete_tar_has_no_truncation_row(tmp_path):
    factory.write_wds_shard(tmp_path / "00000.tar", factory.good_items(6))
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert images.height == 6
    assert quarantine.is_empty()


def test_manifest_row_pointing_nowhere_is_quarantined(tmp_path):
    manifest = factory.write_manifest_with_missing_file(tmp_path)
    spec = SourceSpec(kind="manifest", path=str(manifest))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert images["key"].to_list() == ["good"]
    assert quarantine["key"].to_list() == ["gone"]
    assert quarantine["reason"].to_list() == ["missing_file"]


def test_builder_never_raises_on_a_malformed_record():
    records = [
        RawRecord("fine", "a.jpg", "ok", factory.good_jpeg_bytes(3)),
        RawRecord("wrong_type", "b.jpg", "ok", "not bytes at all"),  # type: ignore[arg-type]
        RawRecord("odd_error", "c.jpg", None, None, "something went wrong"),
    ]
    images, quarantine = build_shard_table("s", records, LIMITS)
    assert images["key"].to_list() == ["fine"]
    reasons = dict(zip(quarantine["key"], quarantine["reason"], strict=True))
    assert reasons["wrong_type"] in {"decode_error", "unexpected_error"}
    assert reasons["odd_error"] == "source_error"


def test_progress_is_reported_for_every_record(tmp_path):
    factory.write_wds_shard(tmp_path / "00000.tar", [*factory.good_items(3), ("bad", b"x", "")])
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    finished: list[int] = []
    build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS, finished.append)
    assert sum(finished) == 4


def test_check_corpus_flags_duplicate_ids_and_undersized_rows(mixed_shard):
    images, _ = mixed_shard
    broken = pl.concat([images, images.head(1).with_columns(pl.lit(4, pl.Int32).alias("width"))])
    outcomes = {outcome.name: outcome for outcome in check_corpus(broken)}
    assert not outcomes["corpus_ids_unique"].passed
    assert outcomes["corpus_ids_unique"].examples[0] == "00000/000000000"
    assert not outcomes["corpus_rows_complete"].passed
    assert outcomes["corpus_rows_complete"].failing_rows == 1


def test_check_corpus_flags_missing_columns(mixed_shard):
    images, _ = mixed_shard
    outcomes = {outcome.name: outcome for outcome in check_corpus(images.drop("content_hash"))}
    assert not outcomes["corpus_rows_complete"].passed


def test_open_image_rgb_downscales_tar_members_and_reports_missing_ones(tmp_path):
    big = factory.good_jpeg_bytes(9, size_px=(640, 480))
    tar_path = factory.write_wds_shard(tmp_path / "00000.tar", [("big", big, "large")])
    picture = open_image_rgb(f"{tar_path}#big.jpg", LIMITS, max_side_px=100)
    assert picture.mode == "RGB"
    assert max(picture.size) <= 100
    assert picture.size[0] / picture.size[1] == pytest.approx(640 / 480, rel=0.05)
    for uri in (f"{tar_path}#absent.jpg", str(tmp_path / "absent.jpg")):
        with pytest.raises(ImageRejected) as missing:
            open_image_rgb(uri, LIMITS)
        assert missing.value.reason == "missing_file"


def _member_mean(uri: str) -> float:
    return float(np.asarray(open_image_rgb(uri, LIMITS)).mean())


def test_tar_members_read_correctly_in_forked_workers(tmp_path):
    items = factory.good_items(4)
    tar_path = factory.write_wds_shard(tmp_path / "00000.tar", items)
    uris = [f"{tar_path}#{key}.jpg" for key, _, _ in items]
    try:
        # The parent opens the tar first, as a Dagster step would before starting a DataLoader.
        in_parent = [_member_mean(uri) for uri in uris]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            in_workers = pool.map(_member_mean, list(reversed(uris)))
        assert list(reversed(in_workers)) == in_parent
        assert len(set(in_parent)) == len(in_parent)
    finally:
        close_tar_cache()


def test_remote_urls_are_never_downloaded(tmp_path):
    manifest = factory.write_manifest(
        tmp_path / "m.jsonl", [{"url": "https://example.com/cat.jpg", "caption": "a cat"}]
    )
    spec = SourceSpec(kind="manifest", path=str(manifest))
    _, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    row = quarantine.row(0, named=True)
    assert row["reason"] == "remote_uri"
    assert row["source_uri"] == "https://example.com/cat.jpg"
    assert "img2dataset" in row["detail"]


def test_a_folder_path_is_not_an_image(tmp_path: Path):
    with pytest.raises(ImageRejected) as rejected:
        open_image_rgb(str(tmp_path), LIMITS)
    assert rejected.value.reason == "missing_file"


def test_an_empty_file_says_it_is_empty():
    with pytest.raises(ImageRejected) as rejected:
        validate_image(b"", ImageLimits())
    assert rejected.value.reason == "decode_error"
    assert "empty (0 bytes)" in str(rejected.value)
