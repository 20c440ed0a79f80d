"""The corpus step knows each shard's size before reading it, so its progress has an ETA.

`count_shard_records` must equal what `iter_shard_records` yields (else the bar lies), stay
cheap (tar headers only), and never raise: a shard it cannot count just has no total.
"""

from __future__ import annotations

import tarfile
from pathlib import Path

import pytest
from image_factory import (
    good_items,
    good_jpeg_bytes,
    good_png_bytes,
    write_image_folder,
    write_manifest,
    write_not_a_tar,
    write_tar_members,
    write_tar_with_special_members,
    write_truncated_wds_shard,
    write_wds_shard,
)

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import (
    SourceSpec,
    count_shard_records,
    iter_shard_records,
    scan_source,
)
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog


def _counts(spec: SourceSpec) -> dict[str, tuple[int | None, int]]:
    """shard -> (counted before reading, records actually read)."""
    return {
        shard: (count_shard_records(spec, shard), len(list(iter_shard_records(spec, shard))))
        for shard in scan_source(spec).shards
    }


def test_tar_counts_match_what_reading_yields(tmp_path: Path) -> None:
    shards = tmp_path / "wds"
    write_wds_shard(shards / "00000.tar", [*good_items(4), ("no_image", None, "a caption")])
    write_tar_with_special_members(shards / "00001.tar", good_jpeg_bytes(1))
    write_tar_members(
        shards / "00002.tar",
        [
            ("k.jpg", good_jpeg_bytes(2)),
            ("k.png", good_png_bytes(3)),  # an extra image of sample k
            ("k.txt", b"caption of k"),
            ("a.b.c.jpg", good_jpeg_bytes(4)),
            ("a.b.c.txt", b"dotted"),
            ("a.b.d.jpg", good_jpeg_bytes(5)),
            ("a.b.d.txt", b"dotted too"),
        ],
    )
    counts = _counts(SourceSpec("webdataset", str(shards)))
    assert counts == {"00000": (5, 5), "00001": (6, 6), "00002": (4, 4)}


def test_long_and_non_ascii_member_names_are_counted(tmp_path: Path) -> None:
    # A ustar prefix (a long folder) and pax headers (a longer or non-ASCII name) are the
    # header forms beyond the plain 100-character name.
    deep = "d" * 90 + "/" + "e" * 60
    ustar = tmp_path / "wds" / "00000.tar"
    ustar.parent.mkdir()
    with tarfile.open(ustar, "w", format=tarfile.USTAR_FORMAT) as tar:
        for name, data in [(f"{deep}/x.jpg", good_jpeg_bytes(1)), (f"{deep}/x.txt", b"c")]:
            _add(tar, name, data)
    write_tar_members(
        tmp_path / "wds" / "00001.tar",
        [("p" * 150 + ".jpg", good_jpeg_bytes(2)), ("café.jpg", good_jpeg_bytes(3))],
    )
    assert _counts(SourceSpec("webdataset", str(tmp_path / "wds"))) == {
        "00000": (1, 1),
        "00001": (2, 2),
    }


@pytest.mark.parametrize("tar_format", [tarfile.GNU_FORMAT, tarfile.USTAR_FORMAT])
def test_header_walk_agrees_with_tarfile_on_folders_links_and_long_names(
    tmp_path: Path, tar_format: int
) -> None:
    from megapairs_assets.corpus.sources import _tar_member_kinds

    path = tmp_path / "00000.tar"
    with tarfile.open(path, "w", format=tar_format) as tar:
        folder = tarfile.TarInfo("photos")
        folder.type = tarfile.DIRTYPE
        tar.addfile(folder)
        link = tarfile.TarInfo("photos/link.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
        _add(tar, "photos/a.jpg", good_jpeg_bytes(1))
        # GNU writes a long name as an extra member; ustar splits it into prefix and name.
        _add(tar, "photos/" + "n" * 120 + "/b.jpg", good_jpeg_bytes(2))
    with tarfile.open(path) as tar:
        expected = [
            (member.name, "dir" if member.isdir() else "file" if member.isfile() else "other")
            for member in tar
        ]
    assert list(_tar_member_kinds(path)) == expected


def _add(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    import io

    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def test_folder_and_manifest_counts_match_what_reading_yields(tmp_path: Path) -> None:
    corpus = tmp_path / "folders"
    write_image_folder(corpus / "a", good_items(3))
    (corpus / "a" / "notes.md").write_text("not an image")
    (corpus / "a" / "nested").mkdir()
    write_image_folder(corpus, good_items(2, first_seed=10))  # loose images: shard `root`
    assert _counts(SourceSpec("folder", str(corpus))) == {"a": (5, 5), "root": (2, 2)}
    rows = [{"path": f"a/{key}.jpg", "caption": caption} for key, _, caption in good_items(3)]
    manifest = write_manifest(corpus / "manifest.jsonl", rows)
    spec = SourceSpec("manifest", str(manifest), shard_size=2)
    assert _counts(spec) == {"00000": (2, 2), "00001": (1, 1)}


def test_a_shard_that_cannot_be_counted_has_no_total_and_nothing_raises(tmp_path: Path) -> None:
    shards = tmp_path / "wds"
    write_not_a_tar(shards / "00000.tar")
    spec = SourceSpec("webdataset", str(shards))
    assert count_shard_records(spec, "00000") is None
    assert count_shard_records(spec, "99999") is None  # gone since it was listed
    assert count_shard_records(spec, "../escape") is None
    # A tar cut mid-way counts what its headers promise; reading adds the truncation row.
    write_truncated_wds_shard(shards / "00001.tar", good_items(6))
    counted, read = count_shard_records(spec, "00001"), len(list(iter_shard_records(spec, "00001")))
    assert counted is not None and read - 1 <= counted <= read


def test_the_corpus_step_logs_progress_against_the_total(tmp_path: Path) -> None:
    write_wds_shard(tmp_path / "wds" / "00000.tar", good_items(3))
    lines: list[str] = []
    build_corpus_shard(
        "00000",
        SourceSpec("webdataset", str(tmp_path / "wds")),
        ImageLimits(),
        DataLayout(tmp_path / "home"),
        LineageCatalog(tmp_path / "home" / "catalog.duckdb"),
        log=lines.append,
    )
    assert any("image_corpus[00000]: 3/3 items (100%)" in line and "ETA" in line for line in lines)


@pytest.mark.parametrize("kind", ["webdataset", "folder"])
def test_counting_reads_no_image_bytes(tmp_path: Path, kind: str, monkeypatch) -> None:
    # Counting must not decode or even read images: it is a listing, not a pass over the data.
    from megapairs_assets.corpus import sources

    if kind == "webdataset":
        write_wds_shard(tmp_path / "c" / "00000.tar", good_items(3))
    else:
        write_image_folder(tmp_path / "c" / "00000", good_items(3))
    monkeypatch.setattr(sources, "read_uri_bytes", _fail)
    monkeypatch.setattr(sources, "_read_member", _fail)
    assert count_shard_records(SourceSpec(kind, str(tmp_path / "c")), "00000") == 3


def _fail(*args: object) -> bytes:
    raise AssertionError("counting read an image")


def test_counting_then_reading_a_manifest_shard_scans_the_manifest_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megapairs_assets.corpus import sources

    write_image_folder(tmp_path / "images", good_items(2))
    rows = [{"path": f"images/{key}.jpg", "caption": caption} for key, _, caption in good_items(2)]
    spec = SourceSpec("manifest", str(write_manifest(tmp_path / "m.parquet", rows)))
    scans: list[SourceSpec] = []
    real_scan = sources._scan_manifest
    monkeypatch.setattr(sources, "_scan_manifest", lambda s: scans.append(s) or real_scan(s))
    assert count_shard_records(spec, "00000") == 2
    assert len(list(iter_shard_records(spec, "00000"))) == 2
    assert len(scans) == 1
