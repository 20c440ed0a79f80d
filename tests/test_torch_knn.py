"""The torch KNN backend gives faiss flat's neighbours and scores, within its memory bound."""

from __future__ import annotations

import numpy as np
import polars as pl
import pytest
import torch

from megapairs_assets.knn.search import (
    IndexSpec,
    build_index,
    check_knn,
    resolve_backend,
    search_neighbors,
)
from megapairs_assets.knn.torch_search import (
    build_torch_index,
    candidates_for,
    plan_blocks,
    search_torch_index,
)

CPU = torch.device("cpu")


def _unit_vectors(n_rows: int, dim: int, seed: int) -> np.ndarray:
    """Clustered unit vectors (so neighbours are close, as real embeddings are), float16."""
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((max(1, n_rows // 20), dim))
    points = centers[rng.integers(0, len(centers), n_rows)] + 0.4 * rng.standard_normal(
        (n_rows, dim)
    )
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)


def _faiss_frame(ids: np.ndarray, vectors: np.ndarray, k: int) -> pl.DataFrame:
    spec = IndexSpec(backend="faiss")
    return search_neighbors(build_index(vectors, spec), ids, vectors, ids, k, spec)


def _assert_same_neighbours(torch_frame: pl.DataFrame, faiss_frame: pl.DataFrame) -> None:
    """Same (query, neighbour) rows with scores within 1e-3; swapped near-ties allowed."""
    joined = torch_frame.join(
        faiss_frame, on=["query_id", "neighbor_id"], how="full", suffix="_faiss"
    )
    both = joined.filter(pl.col("score").is_not_null() & pl.col("score_faiss").is_not_null())
    assert (both["score"] - both["score_faiss"]).abs().max() < 1e-3
    # A row present on one side only must be a tie at the k-th place: its score equals the
    # other side's last score for that query (within float32 rounding).
    only_one_side = joined.filter(pl.col("score").is_null() | pl.col("score_faiss").is_null())
    assert only_one_side.height <= 0.002 * torch_frame.height
    for row in only_one_side.iter_rows(named=True):
        query = row["query_id"] or row["query_id_faiss"]
        score = row["score"] if row["score"] is not None else row["score_faiss"]
        last = faiss_frame.filter(pl.col("query_id") == query)["score"].min()
        assert abs(score - last) < 1e-3


@pytest.mark.parametrize("compute_dtype", [torch.float32, torch.bfloat16])
def test_torch_search_matches_faiss_flat(compute_dtype: torch.dtype) -> None:
    # bfloat16 products keep 8 bits of mantissa: only the float32 re-scoring of the kept
    # candidates can make its results equal the exact ones.
    vectors = _unit_vectors(3000, 64, seed=1)
    ids = np.array([f"img{i:05d}" for i in range(len(vectors))])
    k = 10
    index = build_torch_index(vectors, CPU, compute_dtype=compute_dtype)
    scores, rows = search_torch_index(index, vectors, k, exclude_rows=np.arange(len(vectors)))

    reference = _faiss_frame(ids, vectors, k)
    torch_frame = pl.DataFrame(
        {
            "query_id": np.repeat(ids, k),
            "rank": np.tile(np.arange(k, dtype=np.int16), len(ids)),
            "neighbor_id": ids[rows.reshape(-1)],
            "score": scores.reshape(-1),
        }
    )
    _assert_same_neighbours(torch_frame, reference)
    assert (rows != np.arange(len(vectors))[:, None]).all()
    assert (np.diff(scores, axis=1) <= 0).all()


def test_search_neighbors_with_the_torch_backend_matches_faiss() -> None:
    vectors = _unit_vectors(1500, 32, seed=2)
    ids = np.array([f"img{i:05d}" for i in range(len(vectors))])
    # Queries given out of id order, a subset of the corpus, as one shard of it.
    query_rows = np.random.default_rng(3).permutation(len(vectors))[:400]
    spec = IndexSpec(backend="torch", query_batch_size=128)
    index = build_index(vectors, spec)
    finished: list[int] = []
    frame = search_neighbors(
        index, ids, vectors[query_rows], ids[query_rows], 20, spec, on_progress=finished.append
    )

    reference = _faiss_frame(ids, vectors, 20).filter(pl.col("query_id").is_in(ids[query_rows]))
    assert frame.schema == reference.schema
    assert frame.height == reference.height == 400 * 20
    assert all(check.passed for check in check_knn(frame, 20))
    _assert_same_neighbours(frame, reference)
    assert sum(finished) == 400 and len(finished) == 4


def test_two_selection_levels_stay_exact() -> None:
    # 40k rows: group maxima are selected by their own group maxima before the members.
    vectors = _unit_vectors(40_000, 8, seed=7)
    queries = np.arange(0, 40_000, 200)
    index = build_torch_index(vectors, CPU)
    scores, rows = search_torch_index(index, vectors[queries], 4, exclude_rows=queries)

    exact = vectors[queries].astype(np.float32) @ vectors.astype(np.float32).T
    exact[np.arange(len(queries)), queries] = -np.inf
    expected = np.sort(exact, axis=1)[:, ::-1][:, :4]
    np.testing.assert_allclose(scores, expected, atol=1e-6)
    np.testing.assert_allclose(exact[np.arange(len(queries))[:, None], rows], scores, atol=1e-6)


def test_self_is_excluded_by_row_not_by_value() -> None:
    vectors = _unit_vectors(200, 16, seed=4)
    vectors[7] = vectors[3]  # an exact duplicate is a real neighbour, with score 1
    index = build_torch_index(vectors, CPU)
    scores, rows = search_torch_index(index, vectors, 5, exclude_rows=np.arange(200))
    assert rows[3, 0] == 7 and rows[7, 0] == 3
    assert scores[3, 0] == pytest.approx(1.0, abs=1e-3)
    assert not (rows == np.arange(200)[:, None]).any()


def test_fewer_rows_than_k_leave_an_empty_tail() -> None:
    vectors = _unit_vectors(6, 8, seed=5)
    index = build_torch_index(vectors, CPU)
    scores, rows = search_torch_index(index, vectors, 10, exclude_rows=np.arange(6))
    assert (rows[:, :5] >= 0).all() and (rows[:, 5:] == -1).all()
    assert np.isneginf(scores[:, 5:]).all()


def test_block_plan_respects_the_budget_and_small_blocks_change_nothing() -> None:
    n_rows, k = 3000, 8
    vectors = _unit_vectors(n_rows, 32, seed=6)
    budget = 256 * 1024
    plan = plan_blocks(n_rows, n_rows, 32, candidates_for(k), element_bytes=4, budget_bytes=budget)
    assert plan.score_block_bytes(4) <= budget
    assert plan.query_rows * plan.candidates * 32 * 4 <= budget  # the re-scoring buffer
    assert plan.query_rows < n_rows and plan.corpus_rows < n_rows  # cut in both directions

    index = build_torch_index(vectors, CPU)
    blocks: list[int] = []
    small = search_torch_index(
        index, vectors, k, np.arange(n_rows), block_budget_bytes=budget, on_block=blocks.append
    )
    large = search_torch_index(index, vectors, k, np.arange(n_rows), block_budget_bytes=1 << 30)
    assert len(blocks) == -(-n_rows // plan.query_rows) and sum(blocks) == n_rows
    np.testing.assert_array_equal(small[1], large[1])
    np.testing.assert_allclose(small[0], large[0], atol=1e-6)


def test_a_large_corpus_is_cut_into_blocks_within_the_budget() -> None:
    budget = 64 << 20
    plan = plan_blocks(50_000, 20_000_000, 768, candidates_for(50), 2, budget)
    assert plan.score_block_bytes(2) <= budget
    assert plan.corpus_rows < 20_000_000 and plan.corpus_rows % 32 == 0


def test_a_budget_too_small_for_one_group_is_refused() -> None:
    with pytest.raises(ValueError, match="larger block budget"):
        plan_blocks(10, 1000, 64, 20, element_bytes=2, budget_bytes=100)


def test_backend_choice() -> None:
    # On a machine without CUDA (CI), auto keeps faiss on the CPU.
    if not torch.cuda.is_available():
        resolved = resolve_backend(IndexSpec())
        assert (resolved.backend, resolved.use_gpu) == ("faiss", False)
    assert resolve_backend(IndexSpec(kind="ivf")).backend == "faiss"
    assert resolve_backend(IndexSpec(backend="torch")).backend == "torch"
    with pytest.raises(ValueError, match="exact search only"):
        resolve_backend(IndexSpec(backend="torch", kind="hnsw"))
