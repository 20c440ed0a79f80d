"""Top-k over a gallery with faiss, and scores over small per-query candidate lists.

Gallery and query vectors are L2-normalised float32, so inner product is cosine similarity.
`top_k` is faiss's exact `IndexFlatIP` search (its own BLAS batching and heaps), fed in query
batches for progress; each returned row is then put in the one deterministic order every metric
assumes: higher score first, equal scores by gallery index.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from megapairs_assets.lib.progress import ProgressCallback

DEFAULT_QUERY_BATCH_SIZE = 16_384


@dataclass(frozen=True)
class TopK:
    """Per query: `indices` of the best gallery rows (PADDING -1 past the gallery's end) and
    their `scores`, best first."""

    scores: np.ndarray
    indices: np.ndarray


def top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    query_batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
) -> TopK:
    """The `k` gallery rows with the highest inner product for each query (exact search)."""
    queries = _float32_rows(queries, "queries")
    gallery = _float32_rows(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries are {queries.shape[1]}-d but the gallery is {gallery.shape[1]}-d"
        )
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    score_chunks, index_chunks = [], []
    for start in range(0, len(queries), query_batch_size):
        batch = queries[start : start + query_batch_size]
        scores, indices = index.search(batch, k)
        score_chunks.append(scores)
        index_chunks.append(indices)
        if on_progress is not None:
            on_progress(len(batch))
    if not score_chunks:
        empty = np.zeros((0, k))
        return TopK(scores=empty.astype(np.float32), indices=empty.astype(np.int64))
    return stable_order(np.concatenate(score_chunks), np.concatenate(index_chunks))


def stable_order(scores: np.ndarray, indices: np.ndarray) -> TopK:
    """Rows re-ordered by score (descending), ties by gallery index; padding (-1) last."""
    padding = indices < 0
    # lexsort's last key is primary: padding last, then higher score, then lower index.
    order = np.lexsort((indices, -scores, padding), axis=1)
    return TopK(
        scores=np.take_along_axis(scores, order, axis=1),
        indices=np.take_along_axis(indices, order, axis=1).astype(np.int64, copy=False),
    )


def candidate_scores(
    queries: np.ndarray, embeddings: np.ndarray, candidates: Sequence[Sequence[int]]
) -> list[np.ndarray]:
    """Per query, the inner products with its own candidate rows (GeneCIS, CIRR subsets)."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries for {len(candidates)} candidate lists")
    return [
        embeddings[np.asarray(rows, dtype=np.int64)] @ query
        for query, rows in zip(queries, candidates, strict=True)
    ]


def _float32_rows(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows x dim), got shape {array.shape}")
    # faiss' CPU kernels take contiguous float32 only.
    return np.ascontiguousarray(array, dtype=np.float32)
