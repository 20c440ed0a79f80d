"""The gallery cache: what its key covers, atomic entries, stale and damaged entries."""

from __future__ import annotations

import os
import threading
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from megapairs_assets.evaluation.gallery_cache import (
    INCOMPLETE_ENTRY_AGE_S,
    CacheKey,
    GalleryCache,
)

KEY = CacheKey("clip__models.clip", "fp1", "circo", "val", "gv1", image_count=3)


def test_every_field_of_the_key_changes_its_digest() -> None:
    changed = [
        replace(KEY, retriever_id="other"),
        replace(KEY, weights_fingerprint="fp2"),
        replace(KEY, split="test"),
        replace(KEY, gallery_version="gv2"),
        replace(KEY, image_count=4),
        replace(KEY, precision="bfloat16"),
        replace(KEY, cache_format="v0"),
    ]
    assert len({KEY.digest, *(key.digest for key in changed)}) == 1 + len(changed)


def test_entries_round_trip_and_incomplete_or_stale_ones_are_not_used(tmp_path: Path) -> None:
    cache = GalleryCache(tmp_path)
    projections = np.arange(6, dtype=np.float32).reshape(3, 2)
    calls = []

    def compute() -> np.ndarray:
        calls.append(1)
        return projections

    _, reused = cache.get_or_compute(KEY, compute)
    again, reused_again = cache.get_or_compute(KEY, compute)
    assert (reused, reused_again, len(calls)) == (False, True, 1)
    np.testing.assert_array_equal(again, projections)

    # An entry whose meta.json never got written (a crash) is ignored and recomputed.
    (cache.entry_dir(KEY) / "meta.json").unlink()
    assert cache.load(KEY) is None
    cache.store(KEY, projections)
    # A new gallery version replaces the old entry of the same retriever and split.
    newer = replace(KEY, gallery_version="gv2")
    cache.store(newer, projections)
    assert sorted(p.name for p in cache.entry_dir(KEY).parent.iterdir()) == [newer.digest]
    # A damaged array is recomputed rather than trusted.
    (cache.entry_dir(newer) / "projections.npy").write_bytes(b"garbage")
    assert cache.load(newer) is None


def _entries(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir())


def test_storing_keeps_one_entry_per_retriever_and_gallery_and_nothing_else_goes(
    tmp_path: Path,
) -> None:
    cache = GalleryCache(tmp_path)
    projections = np.ones((3, 2), dtype=np.float32)
    other_gallery = replace(KEY, split="test")
    other_retriever = replace(KEY, retriever_id="clip__other")
    for key in (KEY, other_gallery, other_retriever):
        cache.store(key, projections)
    # Versions of one gallery come and go (weights, precision, images): only the newest stays.
    for field, value in (("weights_fingerprint", "fp2"), ("precision", "bfloat16")):
        newest = replace(KEY, **{field: value})
        cache.store(newest, projections)
        assert _entries(cache.entry_dir(KEY).parent) == [newest.digest]
    # Other galleries and other retrievers are untouched.
    assert cache.load(other_gallery) is not None and cache.load(other_retriever) is not None


def test_removal_spares_what_another_process_may_be_writing_or_just_wrote(tmp_path: Path) -> None:
    cache = GalleryCache(tmp_path)
    projections = np.ones((3, 2), dtype=np.float32)
    folder = cache.entry_dir(KEY).parent
    # Another process completed a newer version after ours (its meta.json is newer): kept.
    later = replace(KEY, gallery_version="later")
    cache.store(later, projections)
    future = time.time() + 60
    os.utime(cache.entry_dir(later) / "meta.json", (future, future))
    # Another process is writing a version now (no meta.json yet): kept.
    writing = folder / "in-progress"
    writing.mkdir()
    (writing / "projections.npy").write_bytes(b"half")
    # A write that crashed long ago, and a removal cut short: removed.
    crashed = folder / "crashed"
    crashed.mkdir()
    (crashed / "projections.npy").write_bytes(b"half")
    old = time.time() - INCOMPLETE_ENTRY_AGE_S - 60
    for path in (crashed / "projections.npy", crashed):
        os.utime(path, (old, old))
    (folder / ".removing-x-1234").mkdir()
    cache.store(KEY, projections)
    assert _entries(folder) == sorted([KEY.digest, later.digest, "in-progress"])
    assert cache.load(later) is not None and cache.load(KEY) is not None


def test_concurrent_stores_and_loads_never_fail_nor_read_a_torn_entry(tmp_path: Path) -> None:
    """Writers storing versions of one gallery while readers load: a load is the whole
    entry or None, nothing raises, and the folder stays bounded."""
    cache = GalleryCache(tmp_path)
    writers, versions = 3, 8
    errors: list[BaseException] = []
    done = threading.Event()

    def value(key: CacheKey) -> float:
        return float(int(key.gallery_version.split("-")[1]))

    def write(worker: int) -> None:
        try:
            for version in range(versions):
                key = replace(KEY, gallery_version=f"w{worker}-{version}")
                cache.store(key, np.full((3, 2), version, dtype=np.float32))
        except BaseException as error:  # reported by the assert below
            errors.append(error)

    def read() -> None:
        try:
            while not done.is_set():
                for worker in range(writers):
                    for version in range(versions):
                        key = replace(KEY, gallery_version=f"w{worker}-{version}")
                        loaded = cache.load(key)
                        if loaded is not None:
                            assert loaded.shape == (3, 2) and (loaded == value(key)).all()
        except BaseException as error:
            errors.append(error)

    threads = [threading.Thread(target=write, args=(w,)) for w in range(writers)]
    readers = [threading.Thread(target=read) for _ in range(2)]
    for thread in threads + readers:
        thread.start()
    for thread in threads:
        thread.join()
    done.set()
    for thread in readers:
        thread.join()
    assert errors == []
    folder = cache.entry_dir(KEY).parent
    assert 1 <= len(_entries(folder)) <= writers  # at most one per writer racing at the end
    cache.store(KEY, np.zeros((3, 2), dtype=np.float32))  # the next store alone: one entry
    assert _entries(folder) == [KEY.digest]


def test_a_cache_that_cannot_be_written_costs_the_cache_not_the_embeddings(
    tmp_path: Path,
) -> None:
    blocked = tmp_path / "cache"
    blocked.write_text("a file where the cache folder should be")  # as a full or read-only disk
    cache = GalleryCache(blocked)
    projections = np.ones((3, 2), dtype=np.float32)
    said: list[str] = []
    got, reused = cache.get_or_compute(KEY, lambda: projections, said.append)
    assert got is projections and not reused
    assert len(said) == 1 and "gallery embeddings not cached" in said[0]
    assert cache.try_store(KEY, projections) is not None
