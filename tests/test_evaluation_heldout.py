"""The held-out split (shared with training) and the benchmark built from held-out triplets."""

from __future__ import annotations

import polars as pl
import pytest

from megapairs_assets.evaluation.heldout import (
    HeldOutError,
    held_out_mask,
    held_out_query_keys,
    heldout_benchmark,
    split_triplets,
)


def tiny_triplets(
    queries: int = 60, targets_per_query: int = 2, prefix: str = "/c"
) -> pl.DataFrame:
    """Triplets in the MegaPairs release schema plus the project's id columns."""
    rows = []
    for q in range(queries):
        for t in range(targets_per_query):
            query, target = f"{prefix}/q{q}.jpg", f"{prefix}/t{q}-{t}.jpg"
            rows.append(
                {
                    "pair_id": f"p{q}-{t}",
                    "query_id": f"img-q{q}",
                    "target_id": f"img-t{q}-{t}",
                    "q_img": query,
                    "q_text": [f"make it number {t}", f"show variant {t}"],
                    "t_img": target,
                    "hns": [query, f"{prefix}/t{q}-{(t + 1) % targets_per_query}.jpg"],
                    "hard_negative_ids": [f"img-q{q}", f"img-t{q}-{(t + 1) % targets_per_query}"],
                }
            )
    return pl.DataFrame(rows)


def image_locations(triplets: pl.DataFrame) -> dict[str, str]:
    """Image id -> file path for `tiny_triplets` (what the corpus lookup answers)."""
    ids = [*triplets["query_id"], *triplets["target_id"], *triplets["hard_negative_ids"].explode()]
    paths = [*triplets["q_img"], *triplets["t_img"], *triplets["hns"].explode()]
    return dict(zip(ids, paths, strict=True))


def test_split_is_by_query_image_and_independent_of_row_order() -> None:
    triplets = tiny_triplets(queries=400)
    train, held = split_triplets(triplets, fraction=0.2)
    assert train.height + held.height == triplets.height
    # Every triplet of a held-out query image is held out: no query image is on both sides.
    assert set(train["query_id"]).isdisjoint(set(held["query_id"]))
    assert 0.12 < held["query_id"].n_unique() / 400 < 0.28
    shuffled = triplets.sample(fraction=1.0, shuffle=True, seed=3)
    _, held_again = split_triplets(shuffled, fraction=0.2)
    assert sorted(held_again["pair_id"]) == sorted(held["pair_id"])
    # One shard at a time gives the same decisions as all shards at once.
    _, first_half = split_triplets(triplets.head(400), fraction=0.2)
    assert set(first_half["pair_id"]) <= set(held["pair_id"])


def test_split_hashes_q_img_without_query_id_and_larger_fractions_nest() -> None:
    triplets = tiny_triplets(queries=200).drop("query_id")
    _, small = split_triplets(triplets, fraction=0.1)
    _, large = split_triplets(triplets, fraction=0.3)
    assert set(small["pair_id"]) < set(large["pair_id"])
    assert held_out_mask(["a", "b"], 0.0).tolist() == [False, False]
    with pytest.raises(ValueError, match="fraction"):
        held_out_mask(["a"], 1.0)


def test_benchmark_gallery_holds_every_image_of_held_out_triplets() -> None:
    triplets = tiny_triplets(queries=100)
    where = image_locations(triplets)
    split = heldout_benchmark(triplets, fraction=0.2, locate=lambda ids: where)
    _, held = split_triplets(triplets, fraction=0.2)
    expected = (
        set(held["query_id"]) | set(held["target_id"]) | set(held["hard_negative_ids"].explode())
    )
    assert set(split.gallery_ids) == expected and split.gallery_size == len(expected)
    assert {ref.uri for ref in split.image_refs} == {where[i] for i in expected}
    # One query per instruction; the query image stays in the gallery as a hard negative.
    assert len(split.queries) == 2 * held.height
    query = split.queries[0]
    assert query.reference_id in split.gallery_ids
    assert query.targets[0] in split.gallery_ids and query.targets[0] != query.reference_id
    assert split.metric_kind == "heldout"


def test_release_paths_key_images_without_ids_and_unlocated_triplets_are_counted() -> None:
    triplets = tiny_triplets(queries=100)
    by_path = heldout_benchmark(triplets.drop("hard_negative_ids"), fraction=0.2)
    assert all(
        ref.uri == key for key, ref in zip(by_path.image_ids, by_path.image_refs, strict=True)
    )
    where = image_locations(triplets)
    lost = sorted(set(split_triplets(triplets, 0.2)[1]["target_id"]))[0]
    partial = heldout_benchmark(
        triplets, fraction=0.2, locate=lambda ids: {k: v for k, v in where.items() if k != lost}
    )
    # Two triplets use the lost image: as the target of one, a hard negative of its sibling.
    assert partial.discarded == {"image_not_located": 2} and lost not in partial.image_ids


def test_benchmark_cap_keeps_a_nested_subset_and_empty_is_refused() -> None:
    triplets = tiny_triplets(queries=200)
    small = heldout_benchmark(triplets, fraction=0.5, max_queries=5)
    large = heldout_benchmark(triplets, fraction=0.5, max_queries=20)
    small_refs = {q.reference_id for q in small.queries}
    assert len(small_refs) == 5 and small_refs < {q.reference_id for q in large.queries}
    with pytest.raises(HeldOutError, match="no triplet is held out"):
        heldout_benchmark(triplets, fraction=0.0)
    with pytest.raises(HeldOutError, match="lack the column"):
        heldout_benchmark(triplets.drop("hns"), fraction=0.5)


def test_with_a_cap_training_leaves_out_exactly_the_query_images_the_benchmark_scores() -> None:
    """The paper profile caps the benchmark at 10,000 query images: those beyond the cap are
    trained on, not dropped from training unscored."""
    triplets = tiny_triplets(queries=200)
    train, held = split_triplets(triplets, fraction=0.5, max_queries=7)
    scored = {q.reference_id for q in heldout_benchmark(triplets, 0.5, max_queries=7).queries}
    assert set(held["query_id"]) == scored and len(scored) == 7
    assert train.height + held.height == triplets.height
    uncapped = held_out_query_keys(triplets["query_id"].to_list(), 0.5)
    assert len(uncapped) > 7 and scored < uncapped
    assert uncapped - scored <= set(train["query_id"])  # beyond the cap: training queries
    assert held_out_query_keys(["a", None], 0.9999) == {"a"}  # a null key is never held out
