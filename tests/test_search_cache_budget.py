"""The gallery embedding cache stays bounded and cleans itself, as a long-running user needs.

- a budget (entries and bytes) with least-recently-used eviction, a read counting as a use;
- an entry another process is reading (its shared lock) is never evicted under it;
- entries of a retriever whose weights were deleted go at the next prune;
- the user is told of evictions, removals and galleries embedded again for a reason, and told
  nothing on a plain hit or a first embedding.

Plain `GalleryCache` with tiny arrays (no model); one test runs `megapairs search` twice.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest

from megapairs_assets.evaluation.gallery_cache import CacheKey, GalleryCache

KEY = CacheKey(
    retriever_id="clip__demo",
    weights_fingerprint="fp1",
    benchmark="search",
    split="photos-0123456789",
    gallery_version="v1",
    image_count=4,
)
ROWS = np.ones((4, 8), dtype=np.float32)


def _gallery(name: str, retriever_id: str = KEY.retriever_id) -> CacheKey:
    return replace(KEY, split=name, retriever_id=retriever_id)


def _age(cache: GalleryCache, key: CacheKey, seconds_ago: float) -> None:
    """Pretend `key` was last used `seconds_ago` (a clock we control, not sleeps)."""
    then = time.time() - seconds_ago
    for name in ("meta.json", "last_used"):
        os.utime(cache.entry_dir(key) / name, (then, then))


def test_the_least_recently_used_entry_is_evicted_and_a_read_counts_as_a_use(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    cache = GalleryCache(tmp_path, max_entries=2, notice=said.append)
    first, second, third = _gallery("a"), _gallery("b"), _gallery("c")
    cache.store(first, ROWS)
    cache.store(second, ROWS)
    _age(cache, first, 300)
    _age(cache, second, 200)
    assert said == []  # within budget: nothing to tell
    assert cache.load(first) is not None  # first is now the most recently used
    cache.store(third, ROWS)
    assert cache.load(second) is None  # the least recently used went
    assert cache.load(first) is not None and cache.load(third) is not None
    assert len(said) == 1 and "evicted 1 least recently used entry" in said[0]
    assert "clip__demo/search-b" in said[0] and "2 entries" in said[0]
    # Its gallery folder went with it: searching many folders leaves no trail of empty ones.
    assert not cache.entry_dir(second).parent.exists()


def test_the_byte_budget_evicts_oldest_first_but_never_the_entry_just_stored(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    probe = GalleryCache(tmp_path / "probe")
    entry_bytes = sum(f.stat().st_size for f in probe.store(KEY, ROWS).iterdir())
    cache = GalleryCache(tmp_path / "c", max_bytes=2 * entry_bytes, notice=said.append)
    keys = [_gallery(name) for name in "abc"]
    for age, key in zip((300, 200), keys, strict=False):
        cache.store(key, ROWS)
        _age(cache, key, age)
    cache.store(keys[2], ROWS)
    assert [cache.load(k) is not None for k in keys] == [False, True, True]
    assert sum(e.size_bytes for e in cache.entries()) <= 2 * entry_bytes
    # An entry larger than the whole budget is still kept (it is the one in use).
    big = GalleryCache(tmp_path / "c", max_bytes=1, notice=said.append)
    wide = replace(_gallery("huge"), image_count=4)
    big.store(wide, np.ones((4, 64), dtype=np.float32))
    assert big.load(wide) is not None and [e.path for e in big.entries()] == [big.entry_dir(wide)]


_HOLD_READ_LOCK = """
import fcntl, sys, time
from pathlib import Path
with open(sys.argv[1], "a") as handle:
    fcntl.flock(handle, fcntl.LOCK_SH)
    Path(sys.argv[2]).write_text("locked")
    while not Path(sys.argv[3]).exists():
        time.sleep(0.02)
"""


def test_an_entry_another_process_is_reading_is_never_evicted_under_it(tmp_path: Path) -> None:
    cache = GalleryCache(tmp_path / "cache", max_entries=1, notice=lambda line: None)
    in_use = _gallery("in-use")
    cache.store(in_use, ROWS)
    _age(cache, in_use, 500)  # the oldest: the first candidate for eviction
    locked, release = tmp_path / "locked", tmp_path / "release"
    reader = subprocess.Popen(
        [
            sys.executable,
            "-c",
            _HOLD_READ_LOCK,
            str(cache.entry_dir(in_use) / "last_used"),
            str(locked),
            str(release),
        ]
    )
    try:
        deadline = time.monotonic() + 30
        while not locked.exists():
            assert reader.poll() is None and time.monotonic() < deadline
            time.sleep(0.02)
        newer = _gallery("newer")
        cache.store(newer, ROWS)  # over budget, but the old entry is being read
        assert cache.entry_dir(in_use).is_dir()
        assert (cache.entry_dir(in_use) / "projections.npy").is_file()
    finally:
        release.write_text("done")
        reader.wait(timeout=30)
    cache.prune()  # read no more: the next prune evicts it
    assert not cache.entry_dir(in_use).exists() and cache.load(newer) is not None


def test_entries_of_a_retriever_whose_weights_are_deleted_go_at_the_next_prune(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    cache = GalleryCache(tmp_path / "cache", notice=said.append)
    weights = tmp_path / "ckpt-a.pt"
    weights.write_bytes(b"weights")
    two_places = [tmp_path / "one/open_clip", tmp_path / "two/open_clip"]
    for folder in two_places:
        folder.mkdir(parents=True)
    deleted = [_gallery("a", "clip__ckpt-a"), _gallery("b", "clip__ckpt-a")]
    shared_name = _gallery("a", "clip__open_clip")
    unrecorded = _gallery("a", "clip__openai")  # a hub tag: no local weights to watch
    for key in [*deleted, shared_name, unrecorded]:
        cache.store(key, ROWS)
    cache.record_retriever("clip__ckpt-a", [weights])
    for folder in two_places:  # one id, two folders (the same tail name)
        cache.record_retriever("clip__open_clip", [folder])
    cache.prune()
    assert said == [] and all(cache.load(k) is not None for k in deleted)

    weights.unlink()
    os.rename(two_places[0], tmp_path / "one/moved")  # one of the two places is gone
    cache.prune()
    assert [cache.load(k) for k in deleted] == [None, None]
    assert not (tmp_path / "cache/clip__ckpt-a").exists()  # record and folders gone too
    assert cache.load(shared_name) is not None and cache.load(unrecorded) is not None
    assert len(said) == 1 and "of 1 retriever whose weights are deleted: clip__ckpt-a" in said[0]
    said.clear()
    cache.prune()
    assert said == []  # nothing left to remove: nothing said


def test_a_gallery_embedded_again_says_why_and_a_hit_or_a_first_embedding_says_nothing(
    tmp_path: Path,
) -> None:
    said: list[str] = []
    cache = GalleryCache(tmp_path, notice=said.append)
    computed: list[CacheKey] = []

    def get(key: CacheKey) -> bool:
        def compute() -> np.ndarray:
            computed.append(key)
            return np.ones((key.image_count, 8), dtype=np.float32)

        return cache.get_or_compute(key, compute)[1]

    assert get(KEY) is False and get(KEY) is True
    assert said == [] and computed == [KEY]
    cases = [
        (replace(KEY, gallery_version="v2"), "image files changed"),
        (replace(KEY, gallery_version="v3", image_count=5), "(4 -> 5 images)"),
        (replace(KEY, gallery_version="v3", image_count=5, weights_fingerprint="fp2"), "weights"),
        (
            replace(
                KEY,
                gallery_version="v3",
                image_count=5,
                weights_fingerprint="fp2",
                precision="bfloat16",
            ),
            "cached in float32, this run is in bfloat16",
        ),
    ]
    for key, reason in cases:
        said.clear()
        assert get(key) is False
        assert len(said) == 1 and "embedding search-photos-0123456789 with clip__demo" in said[0]
        assert reason in said[0], said
    said.clear()
    assert get(cases[-1][0]) is True and said == []
    # A damaged entry is embedded again, and says so.
    (cache.entry_dir(cases[-1][0]) / "projections.npy").write_bytes(b"torn")
    assert get(cases[-1][0]) is False and "could not be read" in said[0]


@pytest.mark.parametrize("budget", [{"max_bytes": -1}, {"max_entries": 0}])
def test_a_budget_that_keeps_nothing_is_refused(tmp_path: Path, budget: dict) -> None:
    with pytest.raises(ValueError, match="bad gallery cache budget"):
        GalleryCache(tmp_path, **budget)


def test_search_prunes_the_cache_of_a_deleted_retriever_and_tells_the_user(
    home: Path, demo_models_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    from image_factory import good_items, write_image_folder
    from test_cli_search import _command

    from megapairs_assets.demo.models import DEMO_CLIP_MODEL

    folder = write_image_folder(tmp_path / "photos", good_items(3))
    mine = tmp_path / "mine.pt"
    mine.write_bytes((demo_models_dir / f"{DEMO_CLIP_MODEL}.pt").read_bytes())
    common = ["--gallery", str(folder), "--text", "x", "--device", "cpu", "--json"]
    assert _command(["--retriever", f"{DEMO_CLIP_MODEL}@{mine}", *common]) == 0
    first = capsys.readouterr()
    assert "gallery cache:" not in first.err  # a first embedding: nothing to explain
    cache_root = home / "benchmark_gallery_cache"
    mine_folders = [p for p in cache_root.iterdir() if p.name.endswith("mine")]
    assert len(mine_folders) == 1 and (mine_folders[0] / "retriever.json").is_file()

    mine.unlink()  # the user deletes that checkpoint; the next search cleans up after it
    base = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    assert _command(["--retriever", f"{DEMO_CLIP_MODEL}@{base}", *common]) == 0
    second = capsys.readouterr()
    assert not mine_folders[0].exists()
    assert "whose weights are deleted" in second.err and mine_folders[0].name in second.err
    assert _command(["--retriever", f"{DEMO_CLIP_MODEL}@{base}", *common]) == 0
    assert "gallery cache:" not in capsys.readouterr().err  # a plain hit: no noise
