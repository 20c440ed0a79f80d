"""A new user's own corpus: file names, formats and layouts the usual tools do not write.

Each odd input must come out kept, or as a quarantine / source-report row with a reason that
says what to do; never a crash, never a silent loss (an image kept without its caption is one).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest
from image_factory import (
    animated_gif_bytes,
    encoded_bytes,
    good_jpeg_bytes,
    good_png_bytes,
    heic_like_bytes,
    not_an_image_bytes,
    write_manifest,
    write_tar_members,
    write_wds_shard,
)
from PIL import features

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    SourceSpec,
    detect_source_kind,
    iter_shard_records,
    scan_source,
)
from megapairs_assets.corpus.table import build_shard_table
from megapairs_assets.lib.errors import ConfigurationError

LIMITS = ImageLimits()


def _tables(spec: SourceSpec, shard: str) -> tuple[pl.DataFrame, pl.DataFrame]:
    return build_shard_table(shard, iter_shard_records(spec, shard), LIMITS)


def _report(spec: SourceSpec) -> dict[str, str]:
    """file name -> error of every source entry no shard reads."""
    return {Path(r.uri).name: r.error or "" for r in scan_source(spec).unread}


# --- folders ----------------------------------------------------------------------------------


def test_every_common_format_and_extension_case_is_kept(tmp_path: Path) -> None:
    shard = tmp_path / "corpus" / "photos"
    shard.mkdir(parents=True)
    files = {
        "a.JPG": good_jpeg_bytes(1),
        "b.JPEG": good_jpeg_bytes(2),
        "c.PNG": good_png_bytes(3),
        "d.jfif": good_jpeg_bytes(4),
        "e.webp": encoded_bytes(5, "WEBP"),
        "f.bmp": encoded_bytes(6, "BMP"),
        "g.tif": encoded_bytes(7, "TIFF"),
        "h.gif": animated_gif_bytes(8),
    }
    if features.check("avif"):
        files["i.avif"] = encoded_bytes(9, "AVIF")
    for name, data in files.items():
        (shard / name).write_bytes(data)
    spec = SourceSpec("folder", str(tmp_path / "corpus"))
    images, quarantine = _tables(spec, "photos")
    assert quarantine.is_empty() and not scan_source(spec).unread
    assert sorted(images["key"]) == sorted(name.split(".")[0] for name in files)
    # An animated GIF is kept as its first frame, recorded as the palette image it is.
    assert images.filter(pl.col("key") == "h")["original_mode"].to_list() == ["P"]


def test_caption_files_in_any_case_or_named_caption_are_read(tmp_path: Path) -> None:
    shard = tmp_path / "corpus" / "s"
    shard.mkdir(parents=True)
    for index, (image, caption_file) in enumerate(
        [("a.jpg", "a.TXT"), ("b.JPG", "b.Txt"), ("c.png", "c.caption"), ("d.jpg", "d.CAPTION")]
    ):
        (shard / image).write_bytes(good_jpeg_bytes(index))
        # Written on Windows, by hand: CRLF line ends and trailing spaces.
        (shard / caption_file).write_bytes(f"  caption {index}  \r\nsecond line \r\n".encode())
    spec = SourceSpec("folder", str(tmp_path / "corpus"))
    images, quarantine = _tables(spec, "s")
    assert quarantine.is_empty()
    assert dict(zip(images["key"], images["caption"], strict=True)) == {
        key: f"caption {index} second line" for index, key in enumerate("abcd")
    }


def test_two_caption_files_for_one_image_use_the_txt_and_report_the_other(
    tmp_path: Path,
) -> None:
    shard = tmp_path / "corpus" / "s"
    shard.mkdir(parents=True)
    (shard / "a.jpg").write_bytes(good_jpeg_bytes(1))
    (shard / "a.txt").write_text("from txt")
    (shard / "a.caption").write_text("from caption")
    images, quarantine = _tables(SourceSpec("folder", str(tmp_path / "corpus")), "s")
    assert images["caption"].to_list() == ["from txt"]
    (row,) = quarantine.iter_rows(named=True)
    assert row["source_uri"].endswith("a.caption") and row["reason"] == "unsupported_file"
    assert "a.txt already gives the caption of a" in row["detail"]


def test_a_heic_photo_is_quarantined_naming_its_format_and_keeps_its_caption_file(
    tmp_path: Path,
) -> None:
    shard = tmp_path / "corpus" / "phone"
    shard.mkdir(parents=True)
    (shard / "IMG_0001.HEIC").write_bytes(heic_like_bytes())
    (shard / "IMG_0001.txt").write_text("a phone photo")
    (shard / "IMG_0002.jpg").write_bytes(good_jpeg_bytes(2))
    images, quarantine = _tables(SourceSpec("folder", str(tmp_path / "corpus")), "phone")
    assert images["key"].to_list() == ["IMG_0002"]
    (row,) = quarantine.iter_rows(named=True)
    assert row["key"] == "IMG_0001" and row["reason"] == "decode_error"
    assert "brand 'heic'" in row["detail"] and "convert it to JPEG" in row["detail"]


def test_images_two_folders_deep_are_reported_with_where_they_are(tmp_path: Path) -> None:
    corpus = tmp_path / "corpus"
    (corpus / "2024" / "june").mkdir(parents=True)
    (corpus / "2024" / "june" / "x.jpg").write_bytes(good_jpeg_bytes(1))
    (corpus / "flat").mkdir()
    (corpus / "flat" / "y.jpg").write_bytes(good_jpeg_bytes(2))
    (corpus / "flat" / "more").mkdir()
    for index in range(2):
        (corpus / "flat" / "more" / f"z{index}.jpg").write_bytes(good_jpeg_bytes(3 + index))
    spec = SourceSpec("folder", str(corpus))
    assert scan_source(spec).shards == ["flat"]
    detail = _report(spec)["2024"]
    assert "holds no images at its own level, only deeper (june/x.jpg)" in detail
    assert "give that folder as the corpus" in detail
    images, quarantine = _tables(spec, "flat")
    assert images["key"].to_list() == ["y"]
    assert "2 images in it not read" in quarantine["detail"].item()


def test_loose_images_and_a_manifest_beside_tar_shards_are_reported_with_the_fix(
    tmp_path: Path,
) -> None:
    write_wds_shard(tmp_path / "00000.tar", [("k", good_jpeg_bytes(1), "a caption")])
    (tmp_path / "loose.JPG").write_bytes(good_jpeg_bytes(2))
    write_manifest(tmp_path / "list.jsonl", [{"path": "loose.JPG"}])
    (tmp_path / "holiday").mkdir()
    (tmp_path / "holiday" / "x.png").write_bytes(good_png_bytes(3))
    assert detect_source_kind(tmp_path) == "webdataset"
    report = _report(SourceSpec("webdataset", str(tmp_path)))
    assert "image beside .tar shards" in report["loose.JPG"]
    assert "folder of images beside .tar shards" in report["holiday"]
    assert "a manifest is read only when it is itself given as the corpus" in report["list.jsonl"]


# --- webdataset tars --------------------------------------------------------------------------


def test_keys_with_dots_pair_each_image_with_its_caption(tmp_path: Path) -> None:
    members = []
    for index in range(3):
        members += [
            (f"shot.2024.{index}.jpg", good_jpeg_bytes(index)),
            (f"shot.2024.{index}.txt", f"caption {index}".encode()),
        ]
    write_tar_members(tmp_path / "00000.tar", members)
    images, quarantine = _tables(SourceSpec("webdataset", str(tmp_path)), "00000")
    assert quarantine.is_empty()
    assert dict(zip(images["key"], images["caption"], strict=True)) == {
        f"shot.2024.{index}": f"caption {index}" for index in range(3)
    }


def test_webdataset_field_names_with_dots_keep_webdatasets_key(tmp_path: Path) -> None:
    # `k.input.jpg` / `k.target.jpg` / `k.txt` is one webdataset sample `k`: its first image
    # is kept with the caption, the second is refused for its key, naming the kept file.
    members = [
        ("k.input.jpg", good_jpeg_bytes(1)),
        ("k.target.jpg", good_jpeg_bytes(2)),
        ("k.txt", b"the caption"),
    ]
    write_tar_members(tmp_path / "00000.tar", members)
    images, quarantine = _tables(SourceSpec("webdataset", str(tmp_path)), "00000")
    assert images.select("key", "caption").rows() == [("k", "the caption")]
    assert images["source_uri"].item().endswith("#k.input.jpg")
    assert quarantine.select("reason", "detail").rows() == [
        ("duplicate_key", "key already taken by 00000/k (k.input.jpg)")
    ]


def test_several_images_for_one_key_keep_the_caption_on_the_kept_image(tmp_path: Path) -> None:
    members = [
        ("k.jpg", good_jpeg_bytes(1)),
        ("k.png", good_png_bytes(2)),
        ("k.txt", b"caption of k"),
        ("broken.jpg", not_an_image_bytes()),
        ("broken.png", good_png_bytes(3)),
        ("broken.txt", b"caption of broken"),
    ]
    write_tar_members(tmp_path / "00000.tar", members)
    images, quarantine = _tables(SourceSpec("webdataset", str(tmp_path)), "00000")
    kept = {row[0]: row[1:] for row in images.select("key", "source_uri", "caption").rows()}
    assert kept["k"][0].endswith("#k.jpg") and kept["k"][1] == "caption of k"
    # When the first image cannot be decoded, the sample's other image stands in for it.
    assert kept["broken"][0].endswith("#broken.png") and kept["broken"][1] == "caption of broken"
    assert quarantine.select("key", "reason").rows() == [
        ("k", "duplicate_key"),
        ("broken", "decode_error"),
    ]
    assert "(k.jpg)" in quarantine["detail"][0]


# --- manifests --------------------------------------------------------------------------------


def test_manifest_locations_written_as_uris_home_paths_or_on_windows(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    folder = tmp_path / "data" / "my photos"
    folder.mkdir(parents=True)
    for index in range(5):
        (folder / f"p{index}.jpg").write_bytes(good_jpeg_bytes(index))
    monkeypatch.setenv("HOME", str(tmp_path))
    rows = [
        {"key": "uri_escaped", "path": f"file://{folder.as_posix().replace(' ', '%20')}/p0.jpg"},
        {"key": "uri_localhost", "path": f"FILE://localhost{folder.as_posix()}/p1.jpg"},
        {"key": "home", "path": "~/data/my photos/p2.jpg"},
        {"key": "backslashes", "path": "data\\my photos\\p3.jpg"},
        {"key": "drive", "path": "C:\\Users\\me\\data\\my photos\\p4.jpg"},
        {"key": "share", "path": "\\\\server\\photos\\p4.jpg"},
    ]
    manifest = write_manifest(tmp_path / "manifest.jsonl", rows)
    images, quarantine = _tables(SourceSpec("manifest", str(manifest)), "00000")
    assert dict(zip(images["key"], images["source_uri"], strict=True)) == {
        key: str(folder / f"p{index}.jpg")
        for index, key in enumerate(["uri_escaped", "uri_localhost", "home", "backslashes"])
    }
    details = dict(zip(quarantine["key"], quarantine["detail"], strict=True))
    assert quarantine["reason"].unique().to_list() == ["missing_file"]
    assert "is a Windows path (drive C:)" in details["drive"]
    assert "is a Windows path (network share)" in details["share"]


def test_an_unexpanded_home_in_the_corpus_path_says_how_to_write_it(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(ConfigurationError, match=rf"write {tmp_path}/photos instead"):
        detect_source_kind(Path("~/photos"))
