"""Retrieval metrics as the benchmarks' official evaluation code defines them (numpy only).

A *ranking* is, per query, gallery indices best first: a 2-D integer array (queries x depth)
in which -1 pads rows that have fewer candidates. A *ground truth* is, per query, the gallery
indices that count as correct. Every metric returns percentages (0-100), as the official
scripts print them, keyed by K.

What each definition follows (facts checked against the official code; the code is ours):

- CIRCO (miccunifi/CIRCO, `src/evaluation.py`): for one query,
  AP@K = sum over ranks k <= K of precision@k * rel_k, divided by min(|GT|, K), with GT the
  query's `gt_img_ids`; mAP@K is the mean over queries. The reference image stays in the
  gallery.
- CIRR (Cuberick-Orion/CIRR; validation and server files as CLIP4Cir computes them): the
  reference image is deleted from each query's ranking of the whole split, then Recall@K asks
  whether `target_hard` is in the top K. Recall_subset@K ranks only the query's `img_set`
  members, the reference excluded (the global ranking restricted to the members).
- FashionIQ: Recall@K of the single target over the category's gallery, reference not removed.
- GeneCIS (facebookresearch/genecis, `eval/eval_functions.py`): each query scores its own
  candidates `[target] + gallery`; Recall@K asks whether the target is among the K best.

Ties. A ranking of a gallery orders equal scores by gallery index (a stable sort), so one
input always gives one ranking (`rank_by_score`). GeneCIS puts the target first in its
candidate list, where that rule would favour it; its recall therefore counts every gallery
candidate scoring at least as high as the target as ranked above it. Scores come from
`scoring.exact_scores`, under which identical embeddings (one image listed twice, two copies of
one picture) score exactly equal, so these rules meet real ties only, never float noise.
"""

from __future__ import annotations

from collections.abc import Collection, Sequence

import numpy as np

CIRCO_KS = (5, 10, 25, 50)
CIRR_KS = (1, 5, 10, 50)
CIRR_SUBSET_KS = (1, 2, 3)
FASHIONIQ_KS = (10, 50)
GENECIS_KS = (1, 2, 3)
HELDOUT_RECALL_KS = (1, 5, 10)
HELDOUT_MAP_KS = (5,)

PADDING = -1
"""Fills ranking rows that have fewer candidates than the array is wide; never a hit."""


class EmptyGroundTruthError(ValueError):
    """A query without any correct answer: every metric would be undefined or meaningless."""


class RankingError(ValueError):
    """Rankings, ground truths or scores of the wrong shape or type."""


def rank_by_score(scores: np.ndarray, depth: int | None = None) -> np.ndarray:
    """Gallery indices of each row of `scores` (queries x gallery), best first.

    Equal scores keep gallery order (a stable sort). `depth` cuts each ranking after that
    many candidates (default: the whole gallery).
    """
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise RankingError(f"scores must be 2-D (queries x gallery), got shape {scores.shape}")
    order = np.argsort(-scores, axis=1, kind="stable")
    return order if depth is None else order[:, :depth]


def mean_average_precision_at_k(
    rankings: np.ndarray,
    ground_truths: Sequence[Collection[int]],
    ks: Sequence[int] = CIRCO_KS,
    query_ids: Sequence[str] | None = None,
) -> dict[int, float]:
    """CIRCO's mAP@K: AP@K = sum_{k<=K} P@k * rel_k / min(|GT|, K), averaged over queries."""
    ranks = _rankings(rankings)
    truth = _ground_truth_matrix(ground_truths, len(ranks), query_ids)
    hits = _hits(ranks, truth)
    n_relevant = (truth != PADDING).sum(axis=1)
    precision_at = np.cumsum(hits, axis=1) / np.arange(1, hits.shape[1] + 1)
    gained = precision_at * hits
    result = {}
    for k in _ks(ks):
        average_precision = gained[:, :k].sum(axis=1) / np.minimum(n_relevant, k)
        result[k] = _percent(average_precision)
    return result


def recall_at_k(
    rankings: np.ndarray,
    ground_truths: Sequence[Collection[int]],
    ks: Sequence[int],
    query_ids: Sequence[str] | None = None,
) -> dict[int, float]:
    """Share of queries with a correct answer among their top K (one target: is it there?)."""
    ranks = _rankings(rankings)
    hits = _hits(ranks, _ground_truth_matrix(ground_truths, len(ranks), query_ids))
    return {k: _percent(hits[:, :k].any(axis=1)) for k in _ks(ks)}


def remove_reference(rankings: np.ndarray, references: Sequence[int]) -> np.ndarray:
    """Each ranking with its query's reference image deleted, order kept.

    Rows lose one column: the reference's when it is ranked, else the last one, so the result
    is the reference-free ranking cut at depth - 1, exactly what deleting the reference from a
    full ranking and cutting it there would give.
    """
    ranks = _rankings(rankings)
    refs = np.asarray(references, dtype=np.int64)
    if refs.shape != (len(ranks),):
        raise RankingError(f"{len(refs)} references for {len(ranks)} rankings")
    if ranks.shape[1] == 0:
        raise RankingError("cannot remove a reference from empty rankings")
    is_reference = ranks == refs[:, None]
    # Drop the reference where it is ranked; elsewhere drop the last column instead.
    drop = np.where(is_reference.any(axis=1), is_reference.argmax(axis=1), ranks.shape[1] - 1)
    keep = np.ones(ranks.shape, dtype=bool)
    keep[np.arange(len(ranks)), drop] = False
    return ranks[keep].reshape(len(ranks), ranks.shape[1] - 1)


def cirr_recall_at_k(
    rankings: np.ndarray,
    references: Sequence[int],
    targets: Sequence[int],
    ks: Sequence[int] = CIRR_KS,
    query_ids: Sequence[str] | None = None,
) -> dict[int, float]:
    """CIRR Recall@K: `target_hard` in the top K once the reference is deleted.

    `rankings` must be at least max(K) + 1 deep so max(K) candidates remain after deletion.
    """
    ranks = _rankings(rankings)
    if ranks.shape[1] < max(_ks(ks)) + 1:
        raise RankingError(
            f"CIRR rankings are {ranks.shape[1]} deep; Recall@{max(ks)} needs {max(ks) + 1} "
            "(one is the reference, deleted before counting)"
        )
    return recall_at_k(remove_reference(ranks, references), _single(targets), ks, query_ids)


def subset_rankings(
    member_indices: np.ndarray, member_scores: np.ndarray, references: Sequence[int]
) -> np.ndarray:
    """Each query's subset members ranked by score, the reference excluded.

    Same order as the global ranking restricted to the members: higher score first, equal
    scores by gallery index. Rows whose members do not include the reference keep all of them;
    other rows end with one PADDING.
    """
    members = np.asarray(member_indices, dtype=np.int64)
    scores = np.asarray(member_scores, dtype=np.float64)
    refs = np.asarray(references, dtype=np.int64)
    if members.ndim != 2 or members.shape != scores.shape or refs.shape != (len(members),):
        raise RankingError(
            f"subset members {members.shape}, scores {scores.shape} and references "
            f"{refs.shape} do not describe the same queries"
        )
    is_reference = members == refs[:, None]
    # Sort keys, last is primary: reference last, then higher score, then gallery index.
    order = np.lexsort((members, -scores, is_reference), axis=1)
    ranked = np.take_along_axis(members, order, axis=1)
    ranked[np.take_along_axis(is_reference, order, axis=1)] = PADDING
    return ranked


def cirr_recall_subset_at_k(
    member_indices: np.ndarray,
    member_scores: np.ndarray,
    references: Sequence[int],
    targets: Sequence[int],
    ks: Sequence[int] = CIRR_SUBSET_KS,
    query_ids: Sequence[str] | None = None,
) -> dict[int, float]:
    """CIRR Recall_subset@K over each query's `img_set` members, the reference excluded."""
    targets = _single(targets)
    members = np.asarray(member_indices, dtype=np.int64)
    for row, (target, row_members) in enumerate(zip(targets, members, strict=True)):
        if target not in row_members:
            name = query_ids[row] if query_ids is not None else f"#{row}"
            raise EmptyGroundTruthError(
                f"query {name}: its target is not one of its subset members, so "
                "Recall_subset has no correct answer"
            )
    ranked = subset_rankings(members, member_scores, references)
    return recall_at_k(ranked, targets, ks, query_ids)


def genecis_recall_at_k(
    candidate_scores: Sequence[np.ndarray], ks: Sequence[int] = GENECIS_KS
) -> dict[int, float]:
    """GeneCIS Recall@K; each row scores `[target] + gallery` (the target at index 0).

    The target's rank is the number of gallery candidates scoring at least as high (ties
    count against the target).
    """
    if len(candidate_scores) == 0:
        raise RankingError("no GeneCIS queries to score")
    ranks = np.empty(len(candidate_scores), dtype=np.int64)
    for row, scores in enumerate(candidate_scores):
        scores = np.asarray(scores, dtype=np.float64)
        if scores.ndim != 1 or scores.size < 2:
            raise RankingError(
                f"GeneCIS query #{row}: expected scores of [target] + a non-empty gallery, got "
                f"shape {scores.shape}"
            )
        ranks[row] = int((scores[1:] >= scores[0]).sum())
    return {k: _percent(ranks < k) for k in _ks(ks)}


def mean_of(values: Sequence[float]) -> float:
    """The headline mean over categories or tasks (FashionIQ, GeneCIS)."""
    if len(values) == 0:
        raise ValueError("no values to average")
    return float(np.mean(np.asarray(values, dtype=np.float64)))


# --- validation and shared pieces ----------------------------------------------------------


def _rankings(rankings: np.ndarray) -> np.ndarray:
    ranks = np.asarray(rankings)
    if ranks.ndim != 2:
        raise RankingError(f"rankings must be 2-D (queries x depth), got shape {ranks.shape}")
    if len(ranks) == 0:
        raise RankingError("no queries to score")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise RankingError(f"rankings must hold gallery indices (integers), not {ranks.dtype}")
    if (ranks < PADDING).any():
        raise RankingError("rankings hold negative indices other than the -1 padding")
    return ranks.astype(np.int64, copy=False)


def _ground_truth_matrix(
    ground_truths: Sequence[Collection[int]], n_queries: int, query_ids: Sequence[str] | None
) -> np.ndarray:
    """Ground truths as a (queries x max |GT|) matrix padded with PADDING; empty ones refused."""
    if len(ground_truths) != n_queries:
        raise RankingError(f"{len(ground_truths)} ground truths for {n_queries} rankings")
    sets = [np.unique(np.asarray(list(truth), dtype=np.int64)) for truth in ground_truths]
    empty = [row for row, truth in enumerate(sets) if truth.size == 0]
    if empty:
        names = [query_ids[row] if query_ids is not None else f"#{row}" for row in empty[:5]]
        raise EmptyGroundTruthError(
            f"{len(empty)} queries have no ground truth (first: {', '.join(names)}); a query "
            "without a correct answer cannot be scored: fix or drop it in the annotations"
        )
    if any((truth < 0).any() for truth in sets):
        raise RankingError("ground truths hold negative gallery indices")
    width = max(truth.size for truth in sets)
    matrix = np.full((n_queries, width), PADDING, dtype=np.int64)
    for row, truth in enumerate(sets):
        matrix[row, : truth.size] = truth
    return matrix


def _hits(ranks: np.ndarray, truth: np.ndarray) -> np.ndarray:
    """hits[q, r]: the candidate at rank r of query q is correct (padding never is)."""
    hits = (ranks[:, :, None] == truth[:, None, :]).any(axis=2)
    return hits & (ranks != PADDING)


def _single(targets: Sequence[int]) -> list[list[int]]:
    return [[int(target)] for target in targets]


def _ks(ks: Sequence[int]) -> list[int]:
    values = [int(k) for k in ks]
    if not values or any(k < 1 for k in values):
        raise RankingError(f"cut-offs must be positive integers, got {list(ks)}")
    return values


def _percent(per_query: np.ndarray) -> float:
    return float(np.mean(per_query.astype(np.float64)) * 100.0)
