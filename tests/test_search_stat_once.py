"""A search gallery's listing stats each file once, and its cache key stats nothing more.

`megapairs search --gallery` lists the gallery and builds its cache key on every search, even
when the embeddings come from the cache; on network storage each stat is a round trip, so at
1M files a second stat per file doubles the cost of a search. `os.stat` (which `Path.stat`,
`Path.is_file` and `Path.exists` call) is wrapped with a counter: the listing stats a folder
image once, a tar once whatever its member count, and `gallery_cache_key` stats nothing the
listing already did. The key still changes exactly when an image's size, time or name does.
"""

from __future__ import annotations

import contextlib
import os
import shutil
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import torch
from image_factory import unique_tiny_jpeg_bytes, write_manifest, write_tar_members

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.benchmark import BenchmarkSplit, ImageRef
from megapairs_assets.retriever.model import Retriever, load_retriever
from megapairs_assets.retriever.search import Gallery, gallery_cache_key, gallery_from_path

FOLDER_IMAGES = 40  # 30 at the top, 10 in a subfolder


@pytest.fixture(scope="module")
def retriever(demo_models_dir: Path) -> Retriever:
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    return load_retriever(DEMO_CLIP_MODEL, str(checkpoint), torch.device("cpu"), torch.float32)


@pytest.fixture
def count_stats(monkeypatch: pytest.MonkeyPatch) -> Callable[[], Iterator[Counter[str]]]:
    """A context that counts `os.stat` calls by path while it is open."""

    @contextlib.contextmanager
    def counting() -> Iterator[Counter[str]]:
        counts: Counter[str] = Counter()
        real_stat = os.stat

        def stat(path: object, *args: object, **kwargs: object) -> os.stat_result:
            counts[os.fspath(path) if not isinstance(path, int) else f"fd {path}"] += 1
            return real_stat(path, *args, **kwargs)  # type: ignore[arg-type]

        with monkeypatch.context() as patch:
            patch.setattr(os, "stat", stat)
            yield counts

    return counting


def _photo_folder(root: Path) -> list[Path]:
    images = []
    for index in range(FOLDER_IMAGES):
        folder = root if index < 30 else root / "more"
        folder.mkdir(parents=True, exist_ok=True)
        path = folder / f"photo_{index:03d}.jpg"
        path.write_bytes(unique_tiny_jpeg_bytes(index))
        images.append(path)
    (root / "notes.txt").write_text("not an image: never stat'ed")
    return images


def _tar(path: Path, members: int, first: int = 0) -> Path:
    """A tar of `members` distinct images, `<index>.jpg` from `first` on."""
    path.parent.mkdir(parents=True, exist_ok=True)
    indices = range(first, first + members)
    return write_tar_members(path, [(f"{i:06d}.jpg", unique_tiny_jpeg_bytes(i)) for i in indices])


def _under(counts: Counter[str], folder: Path) -> dict[str, int]:
    """The counted stats of paths inside `folder`."""
    return {path: n for path, n in counts.items() if path.startswith(f"{folder}{os.sep}")}


def _key(retriever: Retriever, gallery: Gallery) -> str:
    return gallery_cache_key(retriever, gallery).gallery_version


def _key_stating_every_file(gallery: Gallery) -> str:
    """The images' version by the rule benchmarks use: every file stat'ed when it is built."""
    return BenchmarkSplit(
        benchmark="search",
        split=gallery.cache_name,
        metric_kind="recall",
        image_ids=[item.item_id for item in gallery.items],
        image_refs=[ImageRef(item.uri) for item in gallery.items],
        gallery_size=len(gallery.items),
        queries=[],
        has_ground_truth=False,
    ).images_version()


def test_a_folder_gallery_stats_each_image_once_for_its_listing_and_its_cache_key(
    tmp_path: Path, retriever: Retriever, count_stats: Callable
) -> None:
    images = _photo_folder(tmp_path / "photos")
    with count_stats() as listing:
        gallery = gallery_from_path(tmp_path / "photos")
    with count_stats() as keying:
        key = _key(retriever, gallery)
    assert len(gallery.items) == FOLDER_IMAGES
    assert [listing[str(path)] for path in images] == [1] * FOLDER_IMAGES  # not 2
    # Beside them only the gallery folder (what kind of gallery is it?), a few times in all.
    assert set(listing) - {str(path) for path in images} == {str(tmp_path / "photos")}
    assert _under(keying, tmp_path) == {}  # (the retriever's fingerprint stats its weights)
    # The listing's stamps are the files' own: the same key as stat'ing every file again.
    assert key == _key_stating_every_file(gallery)
    assert [item.size_bytes for item in gallery.items] == [p.stat().st_size for p in images]


def test_a_tar_gallery_stats_each_tar_once_whatever_its_member_count(
    tmp_path: Path, retriever: Retriever, count_stats: Callable
) -> None:
    shards = tmp_path / "shards"
    tars = [_tar(shards / f"{n:05d}.tar", members=25, first=100 * n) for n in range(3)]
    with count_stats() as listing:
        gallery = gallery_from_path(shards)
    with count_stats() as keying:
        key = _key(retriever, gallery)
    assert len(gallery.items) == 75
    assert not any("#" in path for path in listing)  # no member uri is stat'ed
    # One each, and the corpus's layout rule (is this a folder of tars?) stats the first it meets.
    assert all(1 <= listing[str(tar)] <= 2 for tar in tars)
    assert sum(listing[str(tar)] for tar in tars) <= len(tars) + 1
    assert _under(keying, tmp_path) == {}  # (the retriever's fingerprint stats its weights)
    assert key == _key_stating_every_file(gallery)

    stats_of_one_tar = []
    for members in (2, 40):
        one = _tar(tmp_path / f"one-{members}.tar", members)
        with count_stats() as counts:
            _key(retriever, gallery_from_path(one))
        stats_of_one_tar.append(counts[str(one)])
    assert stats_of_one_tar[0] == stats_of_one_tar[1]  # per tar, not per member


def test_a_manifest_gallery_stats_each_row_once_beyond_what_the_corpus_reader_does(
    tmp_path: Path, retriever: Retriever, count_stats: Callable
) -> None:
    images = _photo_folder(tmp_path / "photos")
    shard = _tar(tmp_path / "00000.tar", members=10)
    rows = [{"path": str(path), "caption": path.stem} for path in images]
    rows += [{"path": f"{shard}#{index:06d}.jpg", "caption": "in a tar"} for index in range(10)]
    manifest = write_manifest(tmp_path / "gallery.jsonl", rows)
    with count_stats() as listing:
        gallery = gallery_from_path(manifest)
    with count_stats() as keying:
        key = _key(retriever, gallery)
    assert len(gallery.items) == FOLDER_IMAGES + 10
    # The corpus's reader stats each row's file once, which gives the size and time the cache
    # key hashes: no second stat.
    assert [listing[str(path)] for path in images] == [1] * FOLDER_IMAGES
    assert listing[str(shard)] <= 1 and not any("#" in path for path in listing)
    assert _under(keying, tmp_path) == {}  # (the retriever's fingerprint stats its weights)
    assert key == _key_stating_every_file(gallery)


def test_corpus_items_listed_without_stamps_stat_each_tar_once_for_the_key(
    tmp_path: Path, count_stats: Callable
) -> None:
    """The corpus gallery and the benchmarks give uris only: a tar's members share one stat."""
    shard = _tar(tmp_path / "00000.tar", members=30)
    loose = tmp_path / "loose.jpg"
    loose.write_bytes(unique_tiny_jpeg_bytes(99))
    uris = [f"{shard}#{index:06d}.jpg" for index in range(30)] + [str(loose)]
    split = BenchmarkSplit(
        benchmark="b",
        split="s",
        metric_kind="recall",
        image_ids=[str(index) for index in range(len(uris))],
        image_refs=[ImageRef(uri) for uri in uris],
        gallery_size=len(uris),
        queries=[],
        has_ground_truth=False,
    )
    with count_stats() as counts:
        version = split.images_version()
    assert counts == Counter({str(shard): 1, str(loose): 1})
    shard.write_bytes(shard.read_bytes() + b"\0" * 512)  # the tar grows: a new version
    assert split.images_version() != version


@pytest.mark.parametrize(
    "change",
    ["nothing", "size", "time", "added", "removed", "renamed", "root renamed"],
)
def test_the_folder_key_changes_exactly_when_an_image_does(
    tmp_path: Path, retriever: Retriever, change: str
) -> None:
    root = tmp_path / "photos"
    images = _photo_folder(root)
    before = _key(retriever, gallery_from_path(root))
    target = images[33]  # in the subfolder
    if change == "size":
        target.write_bytes(target.read_bytes() + b"\0")
    elif change == "time":
        status = target.stat()
        os.utime(target, ns=(status.st_atime_ns, status.st_mtime_ns + 1_000_000_000))
    elif change == "added":
        (root / "more" / "new.jpg").write_bytes(unique_tiny_jpeg_bytes(500))
    elif change == "removed":
        target.unlink()
    elif change == "renamed":
        target.rename(target.with_name("renamed.jpg"))
    elif change == "root renamed":  # same images, same relative paths: the cache still serves
        root = Path(shutil.move(root, tmp_path / "moved"))
    after = _key(retriever, gallery_from_path(root))
    assert (after != before) == (change not in ("nothing", "root renamed"))


@pytest.mark.parametrize("tar_name", ["shard.tar", "SHARD.TAR"])
def test_a_rewritten_tar_is_a_new_key_in_any_letter_case(
    tmp_path: Path, retriever: Retriever, tar_name: str
) -> None:
    """An upper-case `.TAR` member used to be stamped "absent" (the tar was never stat'ed), so
    rewriting the tar kept serving the old embeddings."""
    shard = _tar(tmp_path / tar_name, members=3)
    before = _key(retriever, gallery_from_path(shard))
    write_tar_members(  # same member names, other bytes
        shard, [(f"{index:06d}.jpg", unique_tiny_jpeg_bytes(index + 50)) for index in range(3)]
    )
    os.utime(shard, ns=(0, shard.stat().st_mtime_ns + 1_000_000_000))
    assert _key(retriever, gallery_from_path(shard)) != before
