"""`list_manifest_rows`: a manifest's rows as the corpus's records would hold them, without
reading an image (what `megapairs search --gallery manifest.jsonl` lists on every search).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from image_factory import good_jpeg_bytes, write_manifest

from megapairs_assets.corpus import sources
from megapairs_assets.corpus.sources import (
    SourceSpec,
    iter_shard_records,
    list_manifest_rows,
    scan_source,
)
from megapairs_assets.lib.errors import ConfigurationError


def _odd_manifest(folder: Path) -> Path:
    """Rows of every kind a reader meets, over two shards, plus a line that is not JSON."""
    images = folder / "images"
    images.mkdir(parents=True)
    (images / "a.jpg").write_bytes(good_jpeg_bytes(1))
    (images / "b.jpg").write_bytes(good_jpeg_bytes(2))
    (images / "a_folder.jpg").mkdir()
    os.mkfifo(images / "pipe.jpg")
    rows: list[dict[str, object]] = [
        {"shard": "s1", "key": "b", "path": str(images / "b.jpg"), "caption": "second"},
        {"shard": "s0", "key": "a", "path": "images/a.jpg", "caption": "first"},
        {"shard": "s0", "key": "gone", "path": "images/never.jpg", "caption": "lost"},
        {"shard": "s0", "key": "dir", "path": "images/a_folder.jpg", "caption": None},
        {"shard": "s0", "key": "fifo", "path": "images/pipe.jpg"},
        {"shard": "s0", "key": "web", "url": "https://example.com/x.jpg", "caption": "remote"},
        {"shard": "s0", "key": "nopath", "caption": "no file at all"},
        {"shard": "s1", "key": "win", "path": "C:\\Users\\me\\x.jpg"},
        {"shard": "s1", "key": "listy", "path": ["images/a.jpg"]},
        {"shard": "s1", "key": "badcap", "path": "images/a.jpg", "caption": {"en": "x"}},
        {"shard": "../up", "key": "unsafe", "path": "images/a.jpg"},
    ]
    manifest = folder / "manifest.jsonl"
    lines = [json.dumps(row) for row in rows]
    lines.insert(3, "{not json")
    manifest.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return manifest


def test_rows_are_listed_as_the_reader_reads_them_without_reading_an_image(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    spec = SourceSpec("manifest", str(_odd_manifest(tmp_path)))
    records = [r for shard in scan_source(spec).shards for r in iter_shard_records(spec, shard)]

    def no_reading(uri: str) -> bytes:
        raise AssertionError(f"read {uri}")

    monkeypatch.setattr(sources, "read_uri_bytes", no_reading)
    listing = list_manifest_rows(spec)

    # The same rows, in the same order, with the same keys, uris, captions and issues...
    listed = [(e.shard, e.key, e.uri, e.caption, e.caption_issue) for e in listing.entries]
    read = [(r.uri, r.caption, r.caption_issue) for r in records]
    assert [entry[2:] for entry in listed] == read
    s0_keys, s1_keys = (
        ["a", "gone", "dir", "fifo", "web", "nopath"],
        ["b", "win", "listy", "badcap"],
    )
    assert [(e.shard, e.key) for e in listing.entries] == [
        *(("s0", key) for key in s0_keys),
        *(("s1", key) for key in s1_keys),
    ]
    # ...and a problem exactly where the reader's record has an error, in its words.
    assert [e.problem for e in listing.entries] == [r.error for r in records]
    problems = {e.key: (e.problem or "").split(":")[0] for e in listing.entries}
    assert problems == {
        "a": "",
        "gone": "missing_file",
        "dir": "not_a_file",
        "fifo": "not_a_file",
        "web": "remote_uri",
        "nopath": "missing_file",
        "b": "",
        "win": "missing_file",
        "listy": "bad_manifest_value",
        "badcap": "",
    }
    sizes = {e.key: e.size_bytes for e in listing.entries if e.size_bytes is not None}
    assert sizes == {
        "a": len(good_jpeg_bytes(1)),
        "b": len(good_jpeg_bytes(2)),
        "badcap": len(good_jpeg_bytes(1)),
    }
    # What no shard reads is reported as scan_source reports it.
    assert listing.unread == scan_source(spec).unread
    assert sorted((r.error or "").split(":")[0] for r in listing.unread) == [
        "bad_manifest_line",
        "unsafe_shard_id",
    ]


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_row_based_shards_are_listed_in_row_order(tmp_path: Path, suffix: str) -> None:
    (tmp_path / "images").mkdir()
    rows = []
    for index in range(5):
        (tmp_path / "images" / f"{index}.jpg").write_bytes(good_jpeg_bytes(index))
        rows.append({"path": f"images/{index}.jpg", "caption": f"photo {index}"})
    spec = SourceSpec("manifest", str(write_manifest(tmp_path / f"m{suffix}", rows)), 2)
    listing = list_manifest_rows(spec)
    assert [(e.shard, e.key) for e in listing.entries] == [
        ("00000", "000000000"),
        ("00000", "000000001"),
        ("00001", "000000002"),
        ("00001", "000000003"),
        ("00002", "000000004"),
    ]
    assert [e.caption for e in listing.entries] == [f"photo {i}" for i in range(5)]
    assert all(e.problem is None for e in listing.entries)


def test_a_manifest_that_cannot_be_listed_says_why(tmp_path: Path) -> None:
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    with pytest.raises(ConfigurationError, match="empty"):
        list_manifest_rows(SourceSpec("manifest", str(empty)))
    with pytest.raises(ValueError, match="not 'folder'"):
        list_manifest_rows(SourceSpec("folder", str(tmp_path)))


def test_resolving_many_locations_with_their_folders_kept_gives_the_same_uris(
    tmp_path: Path,
) -> None:
    from megapairs_assets.corpus.uris import resolve_local

    real = tmp_path / "real"
    (real / "sub").mkdir(parents=True)
    (real / "a.jpg").write_bytes(b"a")
    (real / "sub" / "b.jpg").write_bytes(b"b")
    (tmp_path / "linked_folder").symlink_to(real)
    (real / "link.jpg").symlink_to(real / "sub" / "b.jpg")
    (real / "loop.jpg").symlink_to(real / "loop.jpg")
    locations = [
        "real/a.jpg",
        "linked_folder/a.jpg",  # a folder link: resolved to the real folder
        "linked_folder/link.jpg",  # a file link: resolved to its target
        "real/sub/../a.jpg",
        "real/./sub/b.jpg",
        "real/sub/",
        "real/..",
        "linked_folder/never.jpg",
        "real/a.jpg/inside.jpg",
        str(real / "sub" / "b.jpg"),
        "real/loop.jpg",
        "linked_folder/shard.tar#x/y.jpg",
    ]
    kept: dict[str, str] = {}
    fast = [resolve_local(location, tmp_path, kept) for location in locations]
    assert fast == [resolve_local(location, tmp_path) for location in locations]
    assert fast[1] == str(real / "a.jpg") and fast[2] == str(real / "sub" / "b.jpg")
    assert fast[-1] == f"{real}/shard.tar#x/y.jpg"
    assert fast[-2] == str(real / "loop.jpg")  # a link loop is named, not a crash


def test_a_row_naming_a_link_loop_is_quarantined_not_fatal(tmp_path: Path) -> None:
    (tmp_path / "loop.jpg").symlink_to(tmp_path / "loop.jpg")
    (tmp_path / "a.jpg").write_bytes(good_jpeg_bytes(1))
    rows = [{"path": "loop.jpg", "key": "loop"}, {"path": "a.jpg", "key": "a"}]
    spec = SourceSpec("manifest", str(write_manifest(tmp_path / "m.jsonl", rows)))
    records = list(iter_shard_records(spec, "00000"))
    assert [r.key for r in records] == ["loop", "a"] and records[1].data
    assert records[0].error == f"read_error: {tmp_path}/loop.jpg: Too many levels of symbolic links"
    assert [e.problem for e in list_manifest_rows(spec).entries] == [records[0].error, None]
