"""Byte-identical images are never a pair or a hard negative of each other (issue 8, item 3)."""

from __future__ import annotations

import hashlib

import numpy as np
import polars as pl
import pytest
from test_mining_pairs import knn, paper_params, random_knn

from megapairs_assets.mining.pairs import (
    IDENTICAL_CONTENT_CHECK,
    check_no_identical_content,
    check_pairs,
    knn_image_ids,
    mine_pairs,
)


def hashes_for(ids: list[str], same_bytes: list[set[str]] = ()) -> pl.DataFrame:
    """A sha256-like hash per id; ids in one `same_bytes` group share theirs."""
    group_of = {image_id: min(group) for group in same_bytes for image_id in group}
    return pl.DataFrame(
        {
            "image_id": ids,
            "content_hash": [hashlib.sha256(group_of.get(i, i).encode()).hexdigest() for i in ids],
        }
    )


def pairs_of(pairs: pl.DataFrame) -> set[tuple[str, str]]:
    return set(pairs.select("query_id", "target_id").iter_rows())


def negatives_by_pair(pairs: pl.DataFrame) -> dict[tuple[str, str], list[str]]:
    return {
        (row["query_id"], row["target_id"]): row["hard_negative_ids"]
        for row in pairs.iter_rows(named=True)
    }


def test_a_copy_of_the_query_is_never_a_target_whichever_source_finds_it() -> None:
    clip = knn([("q", "q_copy", 0.95), ("q", "a", 0.9), ("q", "b", 0.85), ("q", "c", 0.82)])
    caption = knn([("q", "q_copy", 0.9), ("q", "d", 0.85)])
    neighbors = {"clip_image": clip, "caption_text": caption}
    hashes = hashes_for(knn_image_ids(neighbors), [{"q", "q_copy"}])
    params = paper_params(targets_per_source=3)

    without = mine_pairs(neighbors, params)
    assert ("q", "q_copy") in pairs_of(without)  # the fault this guards against
    pairs = mine_pairs(neighbors, params, content_hashes=hashes)
    # Dropped before the per-source cut, like the query itself: c moves up into clip's top 3.
    assert pairs_of(pairs) == {("q", "a"), ("q", "b"), ("q", "c"), ("q", "d")}
    assert all("q_copy" not in negs for negs in pairs["hard_negative_ids"].to_list())


@pytest.mark.parametrize("hard_negatives", [2, 3, 6])
def test_negatives_never_copy_the_query_or_the_target(hard_negatives: int) -> None:
    targets = ["a", "a_copy", "b", "c", "d", "e"]
    frame = knn([("q", t, 0.9 - 0.01 * i) for i, t in enumerate(targets)])
    neighbors = {"clip_image": frame}
    hashes = hashes_for(knn_image_ids(neighbors), [{"a", "a_copy"}])
    # With room for every target, the negatives show each pair's whole pool in its keyed order.
    pool_order = negatives_by_pair(mine_pairs(neighbors, paper_params(targets_per_source=6)))
    params = paper_params(targets_per_source=6, hard_negatives=hard_negatives)
    without = negatives_by_pair(mine_pairs(neighbors, params))
    negatives = negatives_by_pair(mine_pairs(neighbors, params, content_hashes=hashes))

    for target, copy in (("a", "a_copy"), ("a_copy", "a")):
        # The copy's slot is refilled with the next entry of the same keyed order.
        kept = [n for n in pool_order[("q", target)][1:] if n != copy]
        assert negatives[("q", target)] == ["q", *kept[: hard_negatives - 1]]
    # A pair whose target has no copy keeps exactly its old negatives.
    for target in ("b", "c", "d", "e"):
        assert negatives[("q", target)] == without[("q", target)]
    if hard_negatives == 6:  # room for the whole pool: without hashes, each copy is there
        assert "a_copy" in without[("q", "a")] and "a" in without[("q", "a_copy")]


def test_unique_hashes_change_nothing() -> None:
    neighbors = random_knn(query_count=40, k=15, seed=21)
    params = paper_params(targets_per_source=4)
    hashes = hashes_for(knn_image_ids(neighbors))
    assert mine_pairs(neighbors, params, content_hashes=hashes).equals(
        mine_pairs(neighbors, params)
    )


def _copies_in_random_knn(neighbors: dict[str, pl.DataFrame]) -> list[set[str]]:
    """Pick copy groups that really meet in the KNN rows: some query-target, some target-target."""
    rows = neighbors["clip_image"].filter(pl.col("score") > 0.85)
    groups = [{q, t} for q, t in rows.select("query_id", "neighbor_id").head(40).rows()[::8]]
    first_query = rows["query_id"][0]
    two_targets = rows.filter(pl.col("query_id") == first_query)["neighbor_id"].head(2).to_list()
    return [*groups, set(two_targets)]


def test_only_queries_that_meet_a_copy_change_and_the_output_stays_deterministic() -> None:
    neighbors = random_knn(query_count=60, k=15, seed=22)
    params = paper_params(targets_per_source=4, hard_negatives=4)
    groups = _copies_in_random_knn(neighbors)
    hashes = hashes_for(knn_image_ids(neighbors), groups)
    copied = set().union(*groups)
    without = mine_pairs(neighbors, params)
    pairs = mine_pairs(neighbors, params, content_hashes=hashes)

    meets_a_copy = pl.col("query_id").is_in(list(copied)) | pl.col("target_id").is_in(list(copied))
    touched = set(without.filter(meets_a_copy)["query_id"])
    assert 0 < len(touched) < without["query_id"].n_unique()
    untouched = ~pl.col("query_id").is_in(list(touched))
    assert pairs.filter(untouched).equals(without.filter(untouched))
    assert not pairs.equals(without)
    assert check_no_identical_content(pairs, hashes).passed
    assert not check_no_identical_content(without, hashes).passed

    shuffled = {s: f.sample(fraction=1.0, shuffle=True, seed=5) for s, f in neighbors.items()}
    assert mine_pairs(shuffled, params, content_hashes=hashes.reverse()).equals(pairs)
    halves = [
        {s: f.filter(keep) for s, f in neighbors.items()}
        for keep in (pl.col("query_id") >= "img030", pl.col("query_id") < "img030")
    ]
    split = pl.concat([mine_pairs(half, params, content_hashes=hashes) for half in halves])
    assert split.sort("query_id", "target_id").equals(pairs)


def test_check_names_each_pair_with_the_copy_it_holds() -> None:
    frame = knn([("q", "q_copy", 0.95), ("q", "a", 0.9), ("q", "a_copy", 0.88), ("r", "s", 0.9)])
    neighbors = {"dino_image": frame}
    hashes = hashes_for(knn_image_ids(neighbors), [{"q", "q_copy"}, {"a", "a_copy"}])
    pairs = mine_pairs(neighbors, paper_params(targets_per_source=3))

    result = check_no_identical_content(pairs, hashes)
    assert result.name == IDENTICAL_CONTENT_CHECK
    assert not result.passed
    assert result.failing_rows == 3  # q->a, q->a_copy, q->q_copy; r->s is clean
    assert result.detail.startswith("3 rows violate: ")
    examples = "\n".join(result.examples)
    assert "q->q_copy: target has the query's bytes" in examples
    assert "q->a: negative a_copy has the target's bytes" in examples
    assert "negative q_copy has the query's bytes" in examples
    assert "r->s" not in examples


def test_check_fails_a_pair_it_cannot_verify() -> None:
    pairs = mine_pairs({"clip_image": knn([("q", "a", 0.9), ("r", "s", 0.9)])}, paper_params())
    result = check_no_identical_content(pairs, hashes_for(["q", "a", "r"]))
    assert not result.passed
    assert result.failing_rows == 1
    assert result.detail.startswith("1 row violates: ")
    assert result.examples == ("r->s: no content hash for s",)


def test_check_pairs_runs_the_content_check_only_when_given_hashes() -> None:
    neighbors = random_knn(query_count=20, k=8, seed=23)
    params = paper_params()
    hashes = hashes_for(knn_image_ids(neighbors))
    pairs = mine_pairs(neighbors, params, content_hashes=hashes)
    names = [o.name for o in check_pairs(pairs, params)]
    with_hashes = check_pairs(pairs, params, content_hashes=hashes)
    assert IDENTICAL_CONTENT_CHECK not in names
    assert [o.name for o in with_hashes] == [*names, IDENTICAL_CONTENT_CHECK]
    assert all(o.passed for o in with_hashes)
    empty = mine_pairs({}, params, content_hashes=hashes)
    assert check_no_identical_content(empty, hashes).passed


@pytest.mark.parametrize(
    ("frame", "message"),
    [
        (pl.DataFrame({"image_id": ["a", "a"], "content_hash": ["x", "y"]}), "several hashes"),
        (pl.DataFrame({"image_id": ["a"], "hash": ["x"]}), "lacks columns"),
    ],
)
def test_contradictory_or_malformed_hashes_are_an_error(frame: pl.DataFrame, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        mine_pairs({"clip_image": knn([("q", "a", 0.9)])}, paper_params(), content_hashes=frame)


def test_knn_image_ids_lists_queries_and_neighbours_once() -> None:
    frame = knn([("q", "a", 0.9), ("a", "q", 0.9), ("q", "b", 0.1)])
    assert knn_image_ids({"clip_image": frame, "dino_image": frame}) == ["a", "b", "q"]
    assert knn_image_ids({}) == []
    assert np.array_equal(np.array(knn_image_ids({"x": frame.head(0)})), np.array([]))
