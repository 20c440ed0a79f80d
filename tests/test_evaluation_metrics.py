"""The benchmark metrics against hand-computed cases and a from-the-formula reference.

Every expected number below is worked out by hand in the comment beside it, from the official
definitions (CIRCO's mAP@K with min(|GT|, K); CIRR's recall with the reference deleted and its
subset recall; GeneCIS's recall over [target] + gallery).
"""

from __future__ import annotations

import numpy as np
import pytest

from megapairs_assets.evaluation import metrics
from megapairs_assets.evaluation.metrics import EmptyGroundTruthError, RankingError
from megapairs_assets.evaluation.scoring import exact_scores, stable_order, top_k


def test_circo_map_with_several_ground_truths_and_gt_smaller_than_k() -> None:
    rankings = np.array(
        [
            [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],  # GT {1, 3, 7}: hits at ranks 1, 3, 7
            [4, 9, 0, 11, 12, 13, 14, 15, 16, 17],  # GT {9}: hit at rank 2
        ]
    )
    result = metrics.mean_average_precision_at_k(rankings, [[1, 3, 7], [9]], ks=(5, 10))
    # Query 1: AP@5 = (1/1 + 2/3) / min(3, 5) = 0.5556; AP@10 = (1 + 2/3 + 3/7) / 3 = 0.6984.
    # Query 2: AP@5 = AP@10 = (1/2) / min(1, K) = 0.5 (normalised by |GT| = 1, not by K).
    assert result[5] == pytest.approx(100 * ((1 + 2 / 3) / 3 + 0.5) / 2)
    assert result[10] == pytest.approx(100 * ((1 + 2 / 3 + 3 / 7) / 3 + 0.5) / 2)


def test_circo_map_normalises_by_k_when_gt_is_larger() -> None:
    # Seven ground truths, the top five all correct: AP@5 = 5 / min(7, 5) = 1 (not 5/7).
    rankings = np.array([[0, 1, 2, 3, 4, 20, 21, 22, 23, 24]])
    result = metrics.mean_average_precision_at_k(rankings, [range(7)], ks=(5, 10))
    assert result[5] == pytest.approx(100.0)
    # AP@10 = 5 hits with precision 1 each, / min(7, 10) = 5/7.
    assert result[10] == pytest.approx(100 * 5 / 7)


def test_circo_map_ignores_padding_and_short_rankings() -> None:
    # A gallery of 3 ranked to depth 5: padding (-1) is never a hit, even with a GT of -1 absent.
    rankings = np.array([[2, 0, 1, -1, -1]])
    # GT {1}: hit at rank 3: AP@5 = (1/3) / 1.
    assert metrics.mean_average_precision_at_k(rankings, [[1]], ks=(5,))[5] == pytest.approx(
        100 / 3
    )


def test_map_matches_a_reference_written_from_the_formula() -> None:
    rng = np.random.default_rng(0)
    rankings = np.stack([rng.permutation(40)[:25] for _ in range(30)])
    truths = [rng.choice(40, size=rng.integers(1, 12), replace=False) for _ in range(30)]

    def reference_ap(ranking: np.ndarray, truth: np.ndarray, k: int) -> float:
        total, hits = 0.0, 0
        for rank, item in enumerate(ranking[:k], start=1):
            if item in truth:
                hits += 1
                total += hits / rank
        return total / min(len(truth), k)

    result = metrics.mean_average_precision_at_k(rankings, truths, ks=(5, 10, 25))
    for k in (5, 10, 25):
        expected = np.mean([reference_ap(r, t, k) for r, t in zip(rankings, truths, strict=True)])
        assert result[k] == pytest.approx(100 * expected)


def test_empty_ground_truth_is_rejected_with_the_query_named() -> None:
    rankings = np.array([[0, 1], [1, 0]])
    with pytest.raises(EmptyGroundTruthError, match="q-2"):
        metrics.mean_average_precision_at_k(rankings, [[0], []], ks=(1,), query_ids=["q-1", "q-2"])
    with pytest.raises(EmptyGroundTruthError):
        metrics.recall_at_k(rankings, [[], [0]], ks=(1,))


def test_recall_at_k_counts_a_query_once_with_several_targets() -> None:
    rankings = np.array([[3, 1, 2], [0, 2, 1], [2, 0, 1]])
    # Targets: {1, 2} hit at rank 2 (counted once); {1} at rank 3; {2} at rank 1.
    result = metrics.recall_at_k(rankings, [[1, 2], [1], [2]], ks=(1, 2, 3))
    assert result == {
        1: pytest.approx(100 / 3),
        2: pytest.approx(200 / 3),
        3: pytest.approx(100.0),
    }


def test_cirr_recall_deletes_the_reference_before_counting() -> None:
    rankings = np.array(
        [
            [0, 2, 1, 3, 4, 5],  # reference 0 ranked first: after deletion the target 2 is 1st
            [3, 2, 1, 4, 5, 0],  # reference 0 not in the top 5: the last column goes instead
        ]
    )
    result = metrics.cirr_recall_at_k(rankings, references=[0, 0], targets=[2, 2], ks=(1, 2))
    # Query 1 hits at 1; query 2 at 2. Without deletion query 1 would miss R@1.
    assert result == {1: pytest.approx(50.0), 2: pytest.approx(100.0)}
    assert metrics.remove_reference(rankings, [0, 0]).tolist() == [
        [2, 1, 3, 4, 5],
        [3, 2, 1, 4, 5],
    ]


def test_cirr_recall_needs_rankings_one_deeper_than_k() -> None:
    with pytest.raises(RankingError, match="needs 3"):
        metrics.cirr_recall_at_k(np.array([[0, 1]]), [0], [1], ks=(1, 2))


def test_cirr_recall_subset_excludes_the_reference() -> None:
    members = np.array([[0, 1, 2, 3, 4, 5]])
    scores = np.array([[0.9, 0.8, 0.7, 0.1, 0.75, 0.2]])
    # Reference 0 (the best score) excluded: order 1 (0.8), 4 (0.75), 2 (0.7), 5, 3.
    ranked = metrics.subset_rankings(members, scores, references=[0])
    assert ranked.tolist() == [[1, 4, 2, 5, 3, -1]]
    result = metrics.cirr_recall_subset_at_k(members, scores, [0], [2], ks=(1, 2, 3))
    # Target 2 is third among the five others; with the reference kept it would be fourth.
    assert result == {1: 0.0, 2: 0.0, 3: pytest.approx(100.0)}


def test_subset_ties_follow_gallery_order_and_missing_target_is_refused() -> None:
    ranked = metrics.subset_rankings(np.array([[5, 3, 1]]), np.array([[0.5, 0.5, 0.5]]), [9])
    assert ranked.tolist() == [[1, 3, 5]]  # reference 9 absent: all three kept
    with pytest.raises(EmptyGroundTruthError, match="subset"):
        metrics.cirr_recall_subset_at_k(np.array([[5, 3, 1]]), np.ones((1, 3)), [9], [7])


def test_genecis_recall_counts_ties_against_the_target() -> None:
    candidate_scores = [
        np.array([0.9, 0.1, 0.2]),  # target best: rank 0
        np.array([0.5, 0.5, 0.1]),  # tie with one gallery image: rank 1
        np.array([0.1, 0.3, 0.2, 0.4]),  # three above: rank 3
    ]
    result = metrics.genecis_recall_at_k(candidate_scores, ks=(1, 2, 3))
    assert result == {
        1: pytest.approx(100 / 3),
        2: pytest.approx(200 / 3),
        3: pytest.approx(200 / 3),
    }
    with pytest.raises(RankingError, match="non-empty gallery"):
        metrics.genecis_recall_at_k([np.array([0.3])])


def test_rank_by_score_keeps_gallery_order_among_equal_scores() -> None:
    scores = np.array([[0.2, 0.9, 0.9, 0.1], [0.5, 0.5, 0.5, 0.5]])
    assert metrics.rank_by_score(scores).tolist() == [[1, 2, 0, 3], [0, 1, 2, 3]]
    assert metrics.rank_by_score(scores, depth=2).tolist() == [[1, 2], [0, 1]]


def _stable_full_sort(queries: np.ndarray, gallery: np.ndarray, depth: int) -> np.ndarray:
    """The documented rule: exact scores, higher first, equal scores by gallery index."""
    every = np.broadcast_to(gallery, (len(queries), *gallery.shape))
    return metrics.rank_by_score(exact_scores(queries, every), depth=depth)


def test_top_k_equals_a_stable_full_sort_and_orders_ties_by_index() -> None:
    rng = np.random.default_rng(1)
    gallery = rng.standard_normal((300, 16)).astype(np.float32)
    gallery[200] = gallery[100]  # an exact duplicate: a tie for every query
    gallery /= np.linalg.norm(gallery, axis=1, keepdims=True)
    queries = gallery[[100, 5, 7]] + 0.01 * rng.standard_normal((3, 16)).astype(np.float32)
    result = top_k(queries, gallery, k=10, query_batch_size=2)
    assert result.indices.tolist() == _stable_full_sort(queries, gallery, 10).tolist()
    assert result.indices[0, :2].tolist() == [100, 200]

    # A tie straddling the cut-off: 61 copies of one picture, scattered through the gallery,
    # rank 4th to 64th behind three better images stored last. A search heap fills with copies
    # and drops an arbitrary one for each better image it meets; the top 10 must be the three
    # and then the 7 copies of lowest index.
    copies = np.sort([3, *rng.choice(np.arange(10, 290), 60, replace=False)])
    gallery[copies] = gallery[3]
    query = gallery[3] + 0.1 * rng.standard_normal(16).astype(np.float32)
    query /= np.linalg.norm(query)
    best = query + 0.01 * rng.standard_normal((3, 16)).astype(np.float32)
    gallery[297:] = best / np.linalg.norm(best, axis=1, keepdims=True)
    both = np.stack([query, *queries])
    result = top_k(both, gallery, k=10, query_batch_size=3)
    assert result.indices.tolist() == _stable_full_sort(both, gallery, 10).tolist()
    assert sorted(result.indices[0, :3]) == [297, 298, 299]
    assert result.indices[0, 3:].tolist() == copies[:7].tolist()


def test_top_k_on_galleries_of_repeated_vectors_equals_the_stable_full_sort() -> None:
    # Five distinct pictures repeated 300 times: every cut-off falls inside a tie group.
    rng = np.random.default_rng(0)
    for _ in range(30):
        base = rng.standard_normal((5, 8)).astype(np.float32)
        base /= np.linalg.norm(base, axis=1, keepdims=True)
        gallery = base[rng.integers(0, 5, size=300)]
        queries = rng.standard_normal((3, 8)).astype(np.float32)
        queries /= np.linalg.norm(queries, axis=1, keepdims=True)
        result = top_k(queries, gallery, 50)
        assert result.indices.tolist() == _stable_full_sort(queries, gallery, 50).tolist()
        # Copies of one picture carry exactly one score.
        for row in range(3):
            picture_of = {tuple(gallery[i]) for i in result.indices[row]}
            scores = {
                (tuple(gallery[i]), s)
                for i, s in zip(result.indices[row], result.scores[row], strict=True)
            }
            assert len(scores) == len(picture_of)


def test_top_k_pads_past_the_gallery_and_stable_order_puts_padding_last() -> None:
    gallery = np.eye(3, dtype=np.float32)
    result = top_k(np.array([[0.0, 1.0, 0.0]], dtype=np.float32), gallery, k=5)
    assert result.indices[0, 0] == 1
    assert result.indices[0, 3:].tolist() == [-1, -1]
    reordered = stable_order(np.array([[0.5, 0.7, 0.5]]), np.array([[-1, 4, 2]]))
    assert reordered.indices.tolist() == [[4, 2, -1]]


def test_bad_inputs_are_refused() -> None:
    with pytest.raises(RankingError, match="2-D"):
        metrics.recall_at_k(np.array([1, 2]), [[1]], ks=(1,))
    with pytest.raises(RankingError, match="integers"):
        metrics.recall_at_k(np.array([[0.5]]), [[1]], ks=(1,))
    with pytest.raises(RankingError, match="ground truths"):
        metrics.recall_at_k(np.array([[1]]), [[1], [2]], ks=(1,))
    with pytest.raises(RankingError, match="positive"):
        metrics.recall_at_k(np.array([[1]]), [[1]], ks=(0,))
