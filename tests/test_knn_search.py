"""KNN search on hand-made vectors whose right neighbours are known."""

from __future__ import annotations

import math

import numpy as np
import polars as pl
import pytest

from megapairs_assets.knn.search import (
    KNN_SCHEMA,
    IndexSpec,
    build_index,
    check_knn,
    faiss_has_gpu,
    search_neighbors,
)

# Unit vectors on a circle: angular distance decides the order, cos(angle) the score.
ANGLES_DEG = {"a": 0.0, "b": 10.0, "c": 30.0, "d": 60.0, "e": 100.0}


def _circle(angles_deg: dict[str, float]) -> tuple[np.ndarray, np.ndarray]:
    ids = np.array(list(angles_deg))
    radians = np.radians(np.array(list(angles_deg.values())))
    vectors = np.stack([np.cos(radians), np.sin(radians)], axis=1).astype(np.float16)
    return ids, vectors


def _exact_knn(ids: np.ndarray, vectors: np.ndarray, k: int, **spec_fields) -> pl.DataFrame:
    spec = IndexSpec(**spec_fields)
    index = build_index(vectors, spec)
    return search_neighbors(index, ids, vectors, ids, k, spec)


def _neighbors_of(frame: pl.DataFrame, query_id: str) -> list[str]:
    return frame.filter(pl.col("query_id") == query_id).sort("rank")["neighbor_id"].to_list()


def _clustered(n_clusters: int, per_cluster: int, dim: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    centers = rng.standard_normal((n_clusters, dim))
    points = np.repeat(centers, per_cluster, axis=0) + 0.3 * rng.standard_normal(
        (n_clusters * per_cluster, dim)
    )
    return (points / np.linalg.norm(points, axis=1, keepdims=True)).astype(np.float16)


def test_neighbours_exclude_self_best_first_with_cosine_scores():
    ids, vectors = _circle(ANGLES_DEG)
    knn = _exact_knn(ids, vectors, k=3)

    assert knn.schema == KNN_SCHEMA
    assert _neighbors_of(knn, "a") == ["b", "c", "d"]
    assert _neighbors_of(knn, "d") == ["c", "e", "b"]
    scores_a = knn.filter(pl.col("query_id") == "a").sort("rank")["score"].to_list()
    expected = [math.cos(math.radians(deg)) for deg in (10, 30, 60)]
    assert scores_a == pytest.approx(expected, abs=2e-3)
    assert knn.filter(pl.col("query_id") == pl.col("neighbor_id")).is_empty()
    assert all(outcome.passed for outcome in check_knn(knn, k=3))


def test_rows_come_sorted_by_query_then_rank_whatever_the_query_order():
    ids, vectors = _circle(ANGLES_DEG)
    spec = IndexSpec(query_batch_size=2)
    index = build_index(vectors, spec)
    order = np.array([4, 1, 3, 0, 2])
    finished: list[int] = []

    knn = search_neighbors(index, ids, vectors[order], ids[order], 2, spec, finished.append)

    assert knn.equals(knn.sort("query_id", "rank"))
    assert knn["query_id"].unique(maintain_order=True).to_list() == ["a", "b", "c", "d", "e"]
    assert _neighbors_of(knn, "e") == ["d", "c"]
    assert finished == [2, 2, 1]


def test_k_larger_than_corpus_returns_every_other_row():
    ids, vectors = _circle(ANGLES_DEG)
    knn = _exact_knn(ids, vectors, k=10)

    per_query = knn.group_by("query_id").agg(pl.len(), pl.col("rank").max())
    assert per_query["len"].to_list() == [4] * 5
    assert per_query["rank"].to_list() == [3] * 5
    assert all(outcome.passed for outcome in check_knn(knn, k=10))


def test_exact_duplicates_are_each_others_first_neighbour_and_self_stays_out():
    ids, vectors = _circle({"a": 0.0, "a_copy": 0.0, "b": 10.0, "c": 30.0})
    # k=1 is the hard case: faiss may rank the duplicate before the query itself.
    knn = _exact_knn(ids, vectors, k=1)

    assert _neighbors_of(knn, "a") == ["a_copy"]
    assert _neighbors_of(knn, "a_copy") == ["a"]
    duplicate_scores = knn.filter(pl.col("query_id").is_in(["a", "a_copy"]))["score"]
    assert duplicate_scores.to_list() == pytest.approx([1.0, 1.0], abs=1e-3)


def test_query_absent_from_corpus_keeps_its_k_best():
    corpus_ids, corpus = _circle(ANGLES_DEG)
    query_ids, queries = _circle({"new": 3.0})
    spec = IndexSpec()
    index = build_index(corpus, spec)

    knn = search_neighbors(index, corpus_ids, queries, query_ids, 2, spec)

    assert _neighbors_of(knn, "new") == ["a", "b"]


@pytest.mark.parametrize("dtype", [np.float16, np.float32])
def test_corpus_spanning_several_add_batches_is_searched_whole(dtype: type):
    rng = np.random.default_rng(1)
    vectors = rng.standard_normal((70_000, 8)).astype(np.float32)  # > one 65,536-row add batch
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(dtype)
    ids = np.array([f"v{i}" for i in range(len(vectors))])
    query_rows = np.array([0, 65_535, 65_536, 69_999])
    spec = IndexSpec()
    index = build_index(vectors, spec)

    knn = search_neighbors(index, ids, vectors[query_rows], ids[query_rows], 3, spec)

    similarities = vectors[query_rows].astype(np.float32) @ vectors.astype(np.float32).T
    similarities[np.arange(len(query_rows)), query_rows] = -np.inf
    for query_row, row_similarities in zip(query_rows, similarities, strict=True):
        expected = [f"v{i}" for i in np.argsort(-row_similarities)[:3]]
        assert _neighbors_of(knn, f"v{query_row}") == expected


@pytest.mark.parametrize(
    "spec",
    [
        IndexSpec(kind="ivf", nprobe=4),
        IndexSpec(kind="hnsw", hnsw_m=16, ef_search=64, ef_construction=100),
    ],
    ids=["ivf", "hnsw"],
)
def test_approximate_indexes_find_mostly_the_exact_neighbours(spec: IndexSpec):
    vectors = _clustered(n_clusters=20, per_cluster=100, dim=32, seed=0)
    ids = np.array([f"img{i:04d}" for i in range(len(vectors))])
    k = 10
    exact = _exact_knn(ids, vectors, k)
    approx = search_neighbors(build_index(vectors, spec), ids, vectors, ids, k, spec)

    found = exact.join(approx, on=["query_id", "neighbor_id"], how="semi").height
    recall = found / exact.height
    assert recall >= 0.9
    assert all(outcome.passed for outcome in check_knn(approx, k))


def _good_frame() -> pl.DataFrame:
    return pl.DataFrame(
        {
            "query_id": ["a", "a", "b", "b"],
            "rank": [0, 1, 0, 1],
            "neighbor_id": ["b", "c", "a", "c"],
            "score": [0.9, 0.8, 0.9, 0.7],
        },
        schema=KNN_SCHEMA,
    )


def _failed(frame: pl.DataFrame, k: int = 2) -> dict[str, int]:
    return {o.name: o.failing_rows for o in check_knn(frame, k) if not o.passed}


def test_check_knn_passes_a_good_frame():
    assert _failed(_good_frame()) == {}


def test_check_knn_catches_a_self_row():
    bad = _good_frame().with_columns(
        neighbor_id=pl.when(pl.col("query_id") == "b").then(pl.lit("b")).otherwise("neighbor_id")
    )
    assert _failed(bad) == {"knn_no_self_neighbors": 2}


def test_check_knn_catches_scores_rising_with_rank():
    bad = _good_frame().with_columns(score=pl.Series([0.8, 0.9, 0.9, 0.7], dtype=pl.Float32))
    assert _failed(bad) == {"knn_scores_non_increasing": 1}


def test_check_knn_catches_scores_that_are_not_cosines():
    bad = _good_frame().with_columns(
        score=pl.Series([1.5, 0.8, 0.9, float("nan")], dtype=pl.Float32)
    )
    assert "knn_scores_are_cosines" in _failed(bad)
    assert _failed(bad)["knn_scores_are_cosines"] == 2


def test_check_knn_catches_rank_gaps_excess_rows_and_disorder():
    gap = _good_frame().with_columns(rank=pl.Series([0, 2, 0, 1], dtype=pl.Int16))
    assert _failed(gap) == {"knn_ranks_contiguous": 1}
    assert _failed(_good_frame(), k=1) == {"knn_at_most_k_per_query": 2}
    assert _failed(_good_frame().reverse()) == {"knn_rows_sorted": 3}


@pytest.mark.skipif(faiss_has_gpu(), reason="a GPU is available here")
def test_use_gpu_without_gpu_faiss_raises_a_clear_error():
    _ids, vectors = _circle(ANGLES_DEG)
    with pytest.raises(RuntimeError, match="use_gpu=True"):
        build_index(vectors, IndexSpec(use_gpu=True))
