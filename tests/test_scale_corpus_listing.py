"""Listing a folder corpus's shards looks for one image per sub-folder, not at every file.

Every KNN step (three per run) and the demo list the corpus; at 9,000 images in 18 folders a
listing took ~0.9 s because each sub-folder was read in full (sorted, every file stat'ed, its
captions and stray files sorted out), which only reading the shard needs. It now stops at the
first image (~5 ms); which sub-folders count as shards is unchanged.
"""

from __future__ import annotations

import os
from pathlib import Path

import image_factory as factory
import pytest

from megapairs_assets.corpus import sources
from megapairs_assets.corpus.sources import SourceSpec, scan_source


def test_scale_corpus_has_varied_captioned_shards(tmp_path: Path) -> None:
    root = factory.write_scale_corpus(tmp_path / "corpus", shard_count=2, images_per_shard=6)
    shards = sorted(p.name for p in root.iterdir())
    assert shards == ["shard000", "shard001"]
    captions = sorted(p.read_text() for p in root.glob("*/*.txt"))
    assert len(captions) == 12 and len(set(captions)) > 1
    assert all(c.startswith("a ") and c.endswith(" background") for c in captions)
    # Same seed, same bytes: a corpus can be rebuilt identically.
    assert factory.scale_item(3) == factory.scale_item(3)
    assert factory.scale_item(3)[0] != factory.scale_item(4)[0]


def test_which_subfolders_are_shards_is_unchanged(tmp_path: Path) -> None:
    root = tmp_path / "corpus"
    factory.write_image_folder(root / "plain", [("a", factory.good_jpeg_bytes(0), "cap")])
    # Only files no shard reads: captions, a hidden image, a folder named like an image.
    (root / "captions_only").mkdir()
    (root / "captions_only" / "a.txt").write_text("cap")
    (root / "captions_only" / ".hidden.jpg").write_bytes(factory.good_jpeg_bytes(1))
    (root / "captions_only" / "dir.jpg").mkdir()
    # An image reached through a symbolic link counts, as it does when the shard is read.
    (root / "linked").mkdir()
    os.symlink(root / "plain" / "a.jpg", root / "linked" / "b.JPG")
    # A link to nothing is not an image.
    (root / "dangling").mkdir()
    os.symlink(root / "nowhere.jpg", root / "dangling" / "c.jpg")
    scan = scan_source(SourceSpec(kind="folder", path=str(root)))
    assert scan.shards == ["linked", "plain"]
    no_images = sorted(r.uri.rsplit("/", 1)[-1] for r in scan.unread)
    assert no_images == ["captions_only", "dangling"]
    assert all("holds no images" in r.error for r in scan.unread)


def test_listing_reads_only_the_top_folder_in_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    root = factory.write_scale_corpus(tmp_path / "corpus", shard_count=3, images_per_shard=4)
    read_in_full: list[Path] = []
    real = sources._folder_entries

    def recording(folder: Path) -> object:
        read_in_full.append(folder)
        return real(folder)

    monkeypatch.setattr(sources, "_folder_entries", recording)
    assert scan_source(SourceSpec(kind="folder", path=str(root))).shards == [
        "shard000",
        "shard001",
        "shard002",
    ]
    assert read_in_full == [root]
