"""Gallery embeddings, computed once per (retriever weights, benchmark gallery, its images).

Embedding CIRCO's 123,403 images is by far the most expensive part of scoring it, and the
gallery does not change between runs; re-scoring a retriever (or scoring it again after a code
change elsewhere) reuses the stored raw image projections. The cache key hashes everything that
shapes them: the retriever's id and weights fingerprint, the precision it ran in, the benchmark,
the gallery's name (the split's, or one shared by splits ranking one gallery: CIRCO val and
test), the images' version (ids, crop boxes, image files; not the annotation files, which shape
only the queries) and CACHE_FORMAT. A change to any of them is a new key; older entries of the
same retriever and gallery are removed when a new one is stored.

Layout: `<cache root>/<retriever id>/<benchmark>-<gallery>/<key>/{projections.npy, meta.json}`;
meta.json is written last, so an entry without it is incomplete and ignored.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

from megapairs_assets.lib.storage import write_atomic

# Bump when what is stored changes meaning (e.g. normalised instead of raw projections).
CACHE_FORMAT = "raw-projections-float32-v1"
_PROJECTIONS = "projections.npy"
_META = "meta.json"


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
        """Write an entry atomically (projections first, meta last) and drop older ones."""
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
        for stale in entry.parent.iterdir():
            if stale != entry and stale.is_dir():
                shutil.rmtree(stale, ignore_errors=True)
        return entry

    def get_or_compute(
        self, key: CacheKey, compute: Callable[[], np.ndarray]
    ) -> tuple[np.ndarray, bool]:
        """(projections, reused): the cached entry, or `compute()` stored under `key`."""
        cached = self.load(key)
        if cached is not None:
            return cached, True
        projections = compute()
        self.store(key, projections)
        return projections, False


def _save_npy(path: Path, array: np.ndarray) -> None:
    # np.save appends ".npy" to a name without it; writing through a handle keeps the name.
    with open(path, "wb") as handle:
        np.save(handle, array)
