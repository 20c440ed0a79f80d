"""Gallery embeddings, computed once per (retriever weights, benchmark gallery, its images).

Embedding CIRCO's 123,403 images is by far the most expensive part of scoring it, and the
gallery does not change between runs; re-scoring a retriever (or scoring it again after a code
change elsewhere) reuses the stored raw image projections. The cache key hashes everything that
shapes them: the retriever's id and weights fingerprint, the precision it ran in, the benchmark,
the gallery's name (the split's, or one shared by splits ranking one gallery: CIRCO val and
test), the images' version (ids, crop boxes, image files; not the annotation files, which shape
only the queries) and CACHE_FORMAT. A change to any of them is a new key.

Layout: `<cache root>/<retriever id>/<benchmark>-<gallery>/<key>/{projections.npy, meta.json}`;
meta.json is written last, so an entry without it is incomplete and ignored.

What is kept (the bound): one entry per retriever id and gallery. Storing an entry removes the
entries of the same `<retriever id>/<benchmark>-<gallery>/` folder that were completed no later
than it (other weights, precision or gallery versions: they can never be hit again unless that
version comes back); entries of other retrievers and other galleries are never touched. Safe
with several processes at once: an entry is removed by renaming it to a hidden `.removing-*`
folder first (one rename: a reader sees the whole entry or none, and a reader that loses the race
recomputes), an entry another process completed later than ours is kept, and a folder without
meta.json (perhaps another process's write in progress) is removed only once nothing in it has
changed for INCOMPLETE_ENTRY_AGE_S. Deleting the whole cache folder by hand is always safe.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megapairs_assets.lib.storage import write_atomic

# Bump when what is stored changes meaning (e.g. normalised instead of raw projections).
CACHE_FORMAT = "raw-projections-float32-v1"
_PROJECTIONS = "projections.npy"
_META = "meta.json"
# A folder without meta.json that changed within this many seconds may be another process's
# write in progress, so it is left alone; older, it is a crashed write and is removed.
INCOMPLETE_ENTRY_AGE_S = 3600.0
_REMOVING_PREFIX = ".removing-"


@dataclass(frozen=True)
class CacheKey:
    """Everything that determines a gallery's embeddings.

    split: the gallery's name (`BenchmarkSplit.cache_name`); gallery_version: its images'
    version (`BenchmarkSplit.images_version`).
    """

    retriever_id: str
    weights_fingerprint: str
    benchmark: str
    split: str
    gallery_version: str
    image_count: int
    precision: str = "float32"
    cache_format: str = CACHE_FORMAT

    @property
    def digest(self) -> str:
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:20]


class GalleryCache:
    """Stored raw image projections under `root`, keyed by `CacheKey`."""

    def __init__(self, root: Path) -> None:
        self.root = Path(root)

    def entry_dir(self, key: CacheKey) -> Path:
        return self.root / key.retriever_id / f"{key.benchmark}-{key.split}" / key.digest

    def load(self, key: CacheKey) -> np.ndarray | None:
        """The stored projections for `key`, or None when there is no complete entry."""
        entry = self.entry_dir(key)
        meta_path = entry / _META
        if not meta_path.is_file():
            return None
        try:
            meta = json.loads(meta_path.read_text())
            projections = np.load(entry / _PROJECTIONS)
        except (OSError, ValueError):
            return None  # damaged entry: recompute and overwrite
        if meta.get("key") != asdict(key) or projections.shape[0] != key.image_count:
            return None
        return projections

    def store(self, key: CacheKey, projections: np.ndarray) -> Path:
        """Write an entry atomically (projections first, meta last), then remove the older
        entries of the same retriever and gallery (the rule in the module docstring)."""
        if projections.shape[0] != key.image_count:
            raise ValueError(
                f"{projections.shape[0]} projections for a gallery of {key.image_count} images"
            )
        entry = self.entry_dir(key)
        write_atomic(
            entry / _PROJECTIONS,
            lambda tmp: _save_npy(tmp, projections.astype(np.float32, copy=False)),
        )
        meta = {"key": asdict(key), "shape": list(projections.shape)}
        write_atomic(entry / _META, lambda tmp: tmp.write_text(json.dumps(meta, indent=2)))
        self._remove_older_entries(entry)
        return entry

    def _remove_older_entries(self, entry: Path) -> list[Path]:
        """Remove the siblings of `entry` completed no later than it, crashed writes and
        abandoned removals; returns the entries removed. Never raises for a sibling that
        another process removes or completes meanwhile."""
        try:
            completed_ns = (entry / _META).stat().st_mtime_ns
            siblings = list(os.scandir(entry.parent))
        except OSError:  # removed meanwhile by a newer store: nothing of ours to prune
            return []
        removed = []
        for sibling in siblings:
            if sibling.name == entry.name or not sibling.is_dir(follow_symlinks=False):
                continue
            path = Path(sibling.path)
            if sibling.name.startswith(_REMOVING_PREFIX):  # a removal that was cut short
                shutil.rmtree(path, ignore_errors=True)
                continue
            try:
                older = (path / _META).stat().st_mtime_ns <= completed_ns
            except FileNotFoundError:
                older = time.time() - _newest_change_s(path) > INCOMPLETE_ENTRY_AGE_S
            except OSError:
                continue
            if older and _remove_entry(path):
                removed.append(path)
        return removed

    def try_store(self, key: CacheKey, projections: np.ndarray) -> str | None:
        """`store`, for a caller that goes on without the cache: None when stored, else why
        not (a full disk, a read-only home). The embeddings just computed are never lost to a
        cache that cannot be written."""
        try:
            self.store(key, projections)
        except OSError as error:
            return (
                f"gallery embeddings not cached ({error}); going on without the cache, so the "
                "next run embeds this gallery again"
            )
        return None

    def get_or_compute(
        self,
        key: CacheKey,
        compute: Callable[[], np.ndarray],
        log: Callable[[str], None] | None = None,
    ) -> tuple[np.ndarray, bool]:
        """(projections, reused): the cached entry, or `compute()` stored under `key` (when
        the entry cannot be written, the projections still come back: `log`, else a logging
        warning, says why)."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        projections = compute()
        problem = self.try_store(key, projections)
        if problem is not None:
            (log or logging.getLogger(__name__).warning)(problem)
        return projections, False


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save appends ".npy" to a name without it; writing through a handle keeps the name.
    with open(path, "wb") as handle:
        np.save(handle, array)


def _newest_change_s(folder: Path) -> float:
    """The newest modification time (epoch seconds) of `folder` and the files in it."""
    newest = 0.0
    try:
        newest = folder.stat().st_mtime
        for item in os.scandir(folder):
            newest = max(newest, item.stat(follow_symlinks=False).st_mtime)
    except OSError:  # gone meanwhile: "just changed", so it is left alone
        return time.time()
    return newest


def _remove_entry(entry: Path) -> bool:
    """Take `entry` out of the cache in one rename, then delete it; False when another process
    took it first (or it cannot be renamed: then it stays, and is tried again next store)."""
    doomed = entry.with_name(f"{_REMOVING_PREFIX}{entry.name}-{uuid.uuid4().hex[:8]}")
    try:
        os.rename(entry, doomed)
    except OSError:
        return False
    shutil.rmtree(doomed, ignore_errors=True)
    return True
