"""Top-k over a gallery with faiss, and scores over small per-query candidate lists.

Gallery and query vectors are L2-normalised float32, so inner product is cosine similarity.

One score, one order. Every ranking and every metric uses the *exact score*
(`exact_scores`): the inner product of the float32 vectors with each product taken in float64
(exact: two 24-bit mantissas fit in 53 bits) and each row summed in a fixed order that does not
depend on where the row sits in memory. Identical vectors therefore always score identically,
so the documented tie rules (a ranking orders equal scores by gallery index; GeneCIS counts an
equal-scoring candidate against the target) are decided by the data, never by float noise. A
float32 BLAS product (numpy's `@`, faiss) gives two copies of one vector scores that differ in
the last bit depending on their position.

`top_k` is faiss's exact `IndexFlatIP` search (its own BLAS batching and heaps) for a short
list somewhat deeper than `k`, fed in query batches for progress; that list is re-scored
exactly and put in the one deterministic order every metric assumes: higher score first, equal
scores by gallery index. Where the k-th exact score is within float32 rounding of the best
score faiss left out (ties straddling the cut-off), that query is ranked again over the whole
gallery, so the result always equals the first `k` of a stable full sort of the exact scores.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import faiss
import numpy as np

from megapairs_assets.lib.progress import ProgressCallback

DEFAULT_QUERY_BATCH_SIZE = 16_384
# faiss fetches k + max(k // 2, this) candidates per query, so exact re-scoring has room below
# the cut-off and only (near-)ties there send a query to the full re-rank.
_MIN_EXTRA_CANDIDATES = 16
# Candidate vector elements re-scored at once: bounds the transient memory (about 24 MB of
# gathered float32 rows and their float64 products) and keeps a chunk in cache.
_RESCORE_CHUNK_ELEMENTS = 2 * 1024 * 1024
# Bound on a float32 inner product's rounding error, per dimension and unit of |q| * |g|: a
# sum of d products carries at most about d * 2^-24 relative error; doubled for safety.
_FLOAT32_ERROR_PER_DIM = 2.0 * 2.0**-24


@dataclass(frozen=True)
class TopK:
    """Per query: `indices` of the best gallery rows (PADDING -1 past the gallery's end) and
    their exact `scores` (float64; -inf for padding), best first."""

    scores: np.ndarray
    indices: np.ndarray


def exact_scores(queries: np.ndarray, vectors: np.ndarray) -> np.ndarray:
    """Inner products, exactly reproducible: float64 products summed in a fixed order per row.

    `queries` (q x d) with `vectors` (q x m x d: each query's own candidates) gives q x m;
    one query (d) with `vectors` (m x d) gives m. Identical vectors score identically wherever
    they sit, which a float32 BLAS product does not promise.
    """
    query64 = np.asarray(queries, dtype=np.float64)
    # Elementwise float64 products of float32 values are exact (the ufunc casts as it goes, so
    # no float64 copy of the vectors is made); numpy then reduces each row along its last axis
    # in the same (pairwise) order whatever the row's position or alignment. No BLAS here on
    # purpose: its blocking is what makes a row's float32 score depend on its position.
    products = np.multiply(np.asarray(vectors), query64[..., None, :], dtype=np.float64)
    return products.sum(axis=-1)


def top_k(
    queries: np.ndarray,
    gallery: np.ndarray,
    k: int,
    query_batch_size: int = DEFAULT_QUERY_BATCH_SIZE,
    on_progress: ProgressCallback | None = None,
) -> TopK:
    """The `k` gallery rows with the highest exact score for each query, ties by index.

    Equal to the first `k` of a stable full sort of `exact_scores` (see the module docstring).
    """
    queries = _float32_rows(queries, "queries")
    gallery = _float32_rows(gallery, "gallery")
    if queries.shape[1] != gallery.shape[1]:
        raise ValueError(
            f"queries are {queries.shape[1]}-d but the gallery is {gallery.shape[1]}-d"
        )
    if k < 1:
        raise ValueError(f"k must be positive, got {k}")
    fetch = min(len(gallery), k + max(k // 2, _MIN_EXTRA_CANDIDATES))
    scores = np.full((len(queries), k), -np.inf)
    indices = np.full((len(queries), k), -1, dtype=np.int64)
    if fetch == 0:
        return TopK(scores=scores, indices=indices)
    index = faiss.IndexFlatIP(gallery.shape[1])
    index.add(gallery)
    # One pass without a temporary copy (np.linalg.norm makes one): the bound needs only this.
    gallery_norm = float(np.sqrt(np.einsum("ij,ij->i", gallery, gallery).max()))
    for start in range(0, len(queries), query_batch_size):
        batch = queries[start : start + query_batch_size]
        approximate, fetched = index.search(batch, fetch)
        top = _exact_top(batch, gallery, fetched, approximate, k, gallery_norm)
        scores[start : start + len(batch)] = top.scores
        indices[start : start + len(batch)] = top.indices
        if on_progress is not None:
            on_progress(len(batch))
    return TopK(scores=scores, indices=indices)


def _exact_top(
    batch: np.ndarray,
    gallery: np.ndarray,
    fetched: np.ndarray,
    approximate: np.ndarray,
    k: int,
    gallery_norm: float,
) -> TopK:
    """Re-score faiss's candidates exactly, order them, and re-rank over the whole gallery the
    queries whose cut-off the candidates cannot settle."""
    found = fetched >= 0
    safe = np.where(found, fetched, 0)
    exact = np.empty(fetched.shape)
    rows_per_chunk = max(1, _RESCORE_CHUNK_ELEMENTS // max(1, fetched.shape[1] * batch.shape[1]))
    for lo in range(0, len(batch), rows_per_chunk):
        hi = lo + rows_per_chunk
        exact[lo:hi] = exact_scores(batch[lo:hi], gallery[safe[lo:hi]])
    exact[~found] = -np.inf
    ordered = stable_order(exact, np.where(found, fetched, -1))
    width = min(k, fetched.shape[1])
    scores = np.full((len(batch), k), -np.inf)
    indices = np.full((len(batch), k), -1, dtype=np.int64)
    scores[:, :width] = ordered.scores[:, :width]
    indices[:, :width] = ordered.indices[:, :width]
    if fetched.shape[1] >= len(gallery):
        return TopK(scores=scores, indices=indices)  # the whole gallery was fetched
    # A row faiss left out scored at most the last one fetched in float32; its exact score is
    # at most that plus the rounding bound. The k-th exact score must clear it strictly.
    error = _float32_error(batch, gallery_norm)
    unsettled = ~(scores[:, k - 1] > approximate[:, -1].astype(np.float64) + error)
    for row in np.flatnonzero(unsettled):
        scores[row], indices[row] = _full_rerank(batch[row], gallery, k, error[row])
    return TopK(scores=scores, indices=indices)


def _full_rerank(
    query: np.ndarray, gallery: np.ndarray, k: int, error: float
) -> tuple[np.ndarray, np.ndarray]:
    """One query's exact top `k` over the whole gallery: float32 scores find every row that
    could be in it (within twice the rounding bound of the k-th), exact scores order them."""
    approximate = gallery @ query
    kth = np.partition(approximate, len(approximate) - k)[len(approximate) - k]
    candidates = np.flatnonzero(approximate >= kth - 2 * error)
    exact = exact_scores(query, gallery[candidates])
    order = np.lexsort((candidates, -exact))[:k]
    return exact[order], candidates[order]


def _float32_error(batch: np.ndarray, gallery_norm: float) -> np.ndarray:
    """Per query, a bound on how far a float32 inner product with any gallery row can be from
    its exact value."""
    query_norms = np.linalg.norm(batch.astype(np.float64), axis=1)
    return _FLOAT32_ERROR_PER_DIM * batch.shape[1] * query_norms * gallery_norm


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
    """Per query, the exact scores (`exact_scores`) of its own candidate rows (GeneCIS, CIRR
    subsets): a candidate identical to another (the same image listed twice, or two copies of
    one picture) scores exactly the same, so tie rules apply to real ties only."""
    if len(queries) != len(candidates):
        raise ValueError(f"{len(queries)} queries for {len(candidates)} candidate lists")
    return [
        exact_scores(query, embeddings[np.asarray(rows, dtype=np.int64)])
        for query, rows in zip(queries, candidates, strict=True)
    ]


def _float32_rows(array: np.ndarray, what: str) -> np.ndarray:
    array = np.asarray(array)
    if array.ndim != 2:
        raise ValueError(f"{what} must be 2-D (rows x dim), got shape {array.shape}")
    # faiss' CPU kernels take contiguous float32 only.
    return np.ascontiguousarray(array, dtype=np.float32)
