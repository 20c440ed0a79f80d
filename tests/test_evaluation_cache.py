"""The gallery cache: what its key covers, atomic entries, stale and damaged entries."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np

from megapairs_assets.evaluation.gallery_cache import CacheKey, GalleryCache

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
    # A new gallery version replaces the old entry of the same retriever and split.
    newer = replace(KEY, gallery_version="gv2")
    cache.store(newer, projections)
    assert sorted(p.name for p in cache.entry_dir(KEY).parent.iterdir()) == [newer.digest]
    # A damaged array is recomputed rather than trusted.
    (cache.entry_dir(newer) / "projections.npy").write_bytes(b"garbage")
    assert cache.load(newer) is None
