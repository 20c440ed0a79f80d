"""Pair mining (method.md §3): bands, per-source cut, merge, hard negatives, determinism, checks."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest

import megapairs_assets
from megapairs_assets.mining.pairs import (
    DEFAULT_SOURCES,
    PAPER_BAND,
    MiningParams,
    check_pairs,
    mine_pairs,
    pair_id_for,
    pairs_schema,
    summarize_pairs,
)


def knn(rows: list[tuple[str, str, float]]) -> pl.DataFrame:
    """Long KNN frame from (query, neighbour, score); ranks follow descending score."""
    frame = pl.DataFrame(
        rows,
        schema={"query_id": pl.String, "neighbor_id": pl.String, "score": pl.Float32},
        orient="row",
    ).sort("query_id", "score", descending=[False, True])
    ranks = pl.int_range(pl.len()).over("query_id").cast(pl.Int16).alias("rank")
    return frame.with_columns(ranks).select("query_id", "rank", "neighbor_id", "score")


def paper_params(**overrides: object) -> MiningParams:
    return MiningParams(bands={source: PAPER_BAND for source in DEFAULT_SOURCES}, **overrides)


def targets_of(pairs: pl.DataFrame, query_id: str) -> list[str]:
    return pairs.filter(pl.col("query_id") == query_id)["target_id"].to_list()


def random_knn(query_count: int, k: int, seed: int) -> dict[str, pl.DataFrame]:
    """Three sources of KNN rows over a small corpus, most scores inside the paper band."""
    rng = np.random.default_rng(seed)
    ids = [f"img{i:03d}" for i in range(query_count)]
    frames = {}
    for source in DEFAULT_SOURCES:
        rows = []
        for query_index, query_id in enumerate(ids):
            others = [i for i in range(query_count) if i != query_index]
            picked = rng.choice(others, size=k, replace=False)
            scores = np.sort(rng.uniform(0.75, 0.99, size=k))[::-1]
            rows += [(query_id, ids[i], float(s)) for i, s in zip(picked, scores, strict=True)]
        frames[source] = knn(rows)
    return frames


def test_band_edges_are_excluded_and_just_inside_is_kept() -> None:
    frame = knn([("q", "at_low", 0.8), ("q", "at_high", 0.96), ("q", "in_low", 0.8001),
                 ("q", "in_high", 0.9599)])  # fmt: skip
    pairs = mine_pairs({"clip_image": frame}, paper_params(targets_per_source=10))
    assert sorted(targets_of(pairs, "q")) == ["in_high", "in_low"]


def test_each_source_is_filtered_by_its_own_band() -> None:
    params = MiningParams(bands={"clip_image": (0.8, 0.96), "caption_text": (0.5, 0.7)})
    frame = knn([("q", "a", 0.6), ("q", "b", 0.9)])
    pairs = mine_pairs({"clip_image": frame, "caption_text": frame}, params)
    found = dict(zip(pairs["target_id"], pairs["sources"].to_list(), strict=True))
    assert found == {"a": ["caption_text"], "b": ["clip_image"]}


def test_targets_per_source_keeps_the_best_scores_whatever_the_row_order() -> None:
    frame = knn([("q", f"t{i}", 0.81 + 0.01 * i) for i in range(6)])
    shuffled = frame.sample(fraction=1.0, shuffle=True, seed=7)
    pairs = mine_pairs({"clip_image": shuffled}, paper_params(targets_per_source=2))
    assert targets_of(pairs, "q") == ["t4", "t5"]


def test_hard_negatives_are_query_then_other_targets_of_the_same_query() -> None:
    frame = knn([("q", t, 0.9) for t in "abcde"] + [("other", "x", 0.9), ("other", "y", 0.9)])
    pairs = mine_pairs({"clip_image": frame}, paper_params(targets_per_source=5, hard_negatives=4))
    rows_of_q = pairs.filter(pl.col("query_id") == "q")
    assert rows_of_q["target_id"].to_list() == list("abcde")  # the loop below is not vacuous
    for row in rows_of_q.iter_rows(named=True):
        negatives = row["hard_negative_ids"]
        assert negatives[0] == "q"
        assert len(negatives) == 4
        assert len(set(negatives)) == 4
        assert row["target_id"] not in negatives
        assert set(negatives[1:]) <= set("abcde")


def test_a_small_pool_gives_fewer_negatives_but_always_the_query() -> None:
    frame = knn([("q", "a", 0.9), ("q", "b", 0.9), ("lonely", "z", 0.9)])
    pairs = mine_pairs({"clip_image": frame}, paper_params(hard_negatives=5))
    negatives = dict(zip(pairs["target_id"], pairs["hard_negative_ids"].to_list(), strict=True))
    assert negatives == {"a": ["q", "b"], "b": ["q", "a"], "z": ["lonely"]}


def test_hard_negatives_of_one_keeps_only_the_query_image() -> None:
    frame = knn([("q", "a", 0.9), ("q", "b", 0.9)])
    pairs = mine_pairs({"clip_image": frame}, paper_params(hard_negatives=1))
    assert pairs["hard_negative_ids"].to_list() == [["q"], ["q"]]


def test_a_pair_found_by_several_sources_is_one_row_listing_them_in_canonical_order() -> None:
    clip = knn([("q", "t", 0.90), ("q", "u", 0.85)])
    caption = knn([("q", "t", 0.82), ("q", "x", 0.88)])
    # Mapping order must not matter: canonical order comes from the bands.
    pairs = mine_pairs({"caption_text": caption, "clip_image": clip}, paper_params())
    row = pairs.filter(pl.col("target_id") == "t").row(0, named=True)
    assert pairs.height == 3
    assert row["sources"] == ["clip_image", "caption_text"]
    assert row["score_clip_image"] == pytest.approx(0.90)
    assert row["score_caption_text"] == pytest.approx(0.82)
    assert row["score_dino_image"] is None
    assert row["best_rank"] == 0


def test_output_has_the_schema_sorted_rows_and_blake2b_pair_ids() -> None:
    frame = knn([("q2", "a", 0.9), ("q1", "b", 0.9), ("q1", "a", 0.85)])
    pairs = mine_pairs({"dino_image": frame}, paper_params())
    assert pairs.schema == pairs_schema(DEFAULT_SOURCES)
    assert pairs.select("query_id", "target_id").rows() == [("q1", "a"), ("q1", "b"), ("q2", "a")]
    expected = hashlib.blake2b(b"q1\x1fa").hexdigest()[:16]
    assert pairs["pair_id"][0] == expected == pair_id_for("q1", "a")


def test_self_neighbours_never_become_pairs() -> None:
    frame = knn([("q", "q", 0.9), ("q", "a", 0.9)])
    assert targets_of(mine_pairs({"clip_image": frame}, paper_params()), "q") == ["a"]


def test_empty_or_missing_inputs_give_an_empty_frame_with_the_schema() -> None:
    params = paper_params()
    out_of_band = knn([("q", "a", 0.5)])
    for neighbors in ({}, {"clip_image": out_of_band}, {"clip_image": out_of_band.head(0)}):
        pairs = mine_pairs(neighbors, params)
        assert pairs.height == 0
        assert pairs.schema == pairs_schema(DEFAULT_SOURCES)


def test_same_inputs_and_seed_give_identical_output_regardless_of_row_order() -> None:
    neighbors = random_knn(query_count=40, k=15, seed=1)
    params = paper_params(targets_per_source=4)
    baseline = mine_pairs(neighbors, params)
    shuffled = {s: f.sample(fraction=1.0, shuffle=True, seed=3) for s, f in neighbors.items()}
    assert baseline.equals(mine_pairs(neighbors, params))
    assert baseline.equals(mine_pairs(shuffled, params))


def test_splitting_queries_across_calls_gives_the_same_rows() -> None:
    neighbors = random_knn(query_count=40, k=15, seed=2)
    params = paper_params(targets_per_source=4)
    first_half = {s: f.filter(pl.col("query_id") < "img020") for s, f in neighbors.items()}
    second_half = {s: f.filter(pl.col("query_id") >= "img020") for s, f in neighbors.items()}
    # Deliberately concatenated in the "wrong" order and re-sorted, as a partitioned run would.
    combined = pl.concat([mine_pairs(second_half, params), mine_pairs(first_half, params)])
    assert combined.sort("query_id", "target_id").equals(mine_pairs(neighbors, params))


def test_a_different_seed_reorders_negatives_of_large_pools() -> None:
    neighbors = random_knn(query_count=40, k=15, seed=3)
    seed_zero = mine_pairs(neighbors, paper_params(targets_per_source=10, seed=0))
    seed_one = mine_pairs(neighbors, paper_params(targets_per_source=10, seed=1))
    assert seed_zero.drop("hard_negative_ids").equals(seed_one.drop("hard_negative_ids"))
    assert seed_zero["hard_negative_ids"].to_list() != seed_one["hard_negative_ids"].to_list()


def test_query_fraction_keeps_a_deterministic_subset_of_whole_queries() -> None:
    neighbors = random_knn(query_count=200, k=5, seed=4)
    everything = mine_pairs(neighbors, paper_params())
    half = mine_pairs(neighbors, paper_params(query_fraction=0.5))
    kept = set(half["query_id"])
    assert 60 < len(kept) < 140
    assert half.equals(mine_pairs(neighbors, paper_params(query_fraction=0.5)))
    assert half.equals(everything.filter(pl.col("query_id").is_in(list(kept))))
    other_seed = mine_pairs(neighbors, paper_params(query_fraction=0.5, seed=9))
    assert set(other_seed["query_id"]) != kept


def test_a_small_query_fraction_keeps_about_that_share_of_queries() -> None:
    neighbors = random_knn(query_count=200, k=5, seed=4)
    tenth = mine_pairs(neighbors, paper_params(query_fraction=0.1))
    kept = set(tenth["query_id"])
    # 0.1 of 200 queries: 20 expected (binomial sd ~4); keeping the complement would give ~180.
    assert 8 <= len(kept) <= 35
    assert tenth.equals(mine_pairs(neighbors, paper_params(query_fraction=0.1)))
    # One key per id and a threshold: a query sampled at 0.1 is also sampled at 0.5.
    assert kept < set(mine_pairs(neighbors, paper_params(query_fraction=0.5))["query_id"])


# Runs in a child process: mines the KNN tables the test wrote and writes the pairs back.
_MINE_IN_CHILD = """
import json, sys
from pathlib import Path
import polars as pl
from megapairs_assets.mining.pairs import DEFAULT_SOURCES, PAPER_BAND, MiningParams, mine_pairs
folder, overrides, out_name = Path(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
neighbors = {s: pl.read_parquet(folder / f"{s}.parquet") for s in DEFAULT_SOURCES}
params = MiningParams(bands={s: PAPER_BAND for s in DEFAULT_SOURCES}, **overrides)
mine_pairs(neighbors, params).write_parquet(folder / out_name)
"""


def test_other_processes_with_other_hash_seeds_mine_identical_pairs(tmp_path: Path) -> None:
    # Shards are mined in separate processes, and Python's own str hash differs per process
    # (PYTHONHASHSEED): ids, negatives and the query sample must not depend on it.
    overrides = {"targets_per_source": 6, "hard_negatives": 5, "query_fraction": 0.5, "seed": 11}
    neighbors = random_knn(query_count=40, k=15, seed=10)
    for source, frame in neighbors.items():
        frame.write_parquet(tmp_path / f"{source}.parquet")
    here = mine_pairs(neighbors, paper_params(**overrides))
    assert here.height > 0 and here["query_id"].n_unique() < 40  # the sample dropped queries
    assert here["hard_negative_ids"].list.len().max() == 5  # pools larger than the negatives

    code_root = str(Path(megapairs_assets.__file__).resolve().parents[1])
    python_path = os.pathsep.join(p for p in (code_root, os.environ.get("PYTHONPATH")) if p)
    hash_seeds = ("1", "2")
    children = [
        subprocess.Popen(
            [sys.executable, "-c", _MINE_IN_CHILD, str(tmp_path), json.dumps(overrides),
             f"pairs-{hash_seed}.parquet"],
            env={**os.environ, "PYTHONHASHSEED": hash_seed, "PYTHONPATH": python_path},
        )
        for hash_seed in hash_seeds
    ]  # fmt: skip
    assert [child.wait(timeout=120) for child in children] == [0, 0]
    for hash_seed in hash_seeds:
        assert pl.read_parquet(tmp_path / f"pairs-{hash_seed}.parquet").equals(here), hash_seed


def test_check_pairs_passes_on_mined_output() -> None:
    params = paper_params(targets_per_source=4)
    pairs = mine_pairs(random_knn(query_count=20, k=10, seed=5), params)
    outcomes = check_pairs(pairs, params)
    assert [o.name for o in outcomes] == [
        "pairs_in_band",
        "negatives_start_with_query",
        "target_not_in_negatives",
        "no_duplicate_pairs",
        "no_self_pairs",
    ]
    assert all(o.passed for o in outcomes)


@pytest.mark.parametrize(
    ("check_name", "break_row"),
    [
        ("pairs_in_band", lambda row: {"score_dino_image": 0.99}),
        ("pairs_in_band", lambda row: {"score_clip_image": 0.8}),
        ("negatives_start_with_query", lambda row: {"hard_negative_ids": ["elsewhere", "a"]}),
        (
            "target_not_in_negatives",
            lambda row: {"hard_negative_ids": ["img000", row["target_id"]]},
        ),
        ("no_self_pairs", lambda row: {"target_id": row["query_id"]}),
    ],
)
def test_check_pairs_catches_a_broken_row(check_name: str, break_row: Callable) -> None:
    params = paper_params()
    pairs = mine_pairs(random_knn(query_count=20, k=10, seed=6), params)
    first = pairs.row(0, named=True)
    assert first["query_id"] == "img000"
    broken_first = pairs.head(1).with_columns(
        pl.lit(value, dtype=pairs.schema[column]).alias(column)
        for column, value in break_row(first).items()
    )
    broken = pl.concat([broken_first, pairs.slice(1)])
    failed = {o.name: o for o in check_pairs(broken, params) if not o.passed}
    assert check_name in failed
    assert failed[check_name].failing_rows == 1
    assert failed[check_name].examples[0].startswith("img000->")


def test_check_pairs_catches_duplicated_pairs() -> None:
    params = paper_params()
    pairs = mine_pairs(random_knn(query_count=20, k=10, seed=7), params)
    duplicated = pl.concat([pairs, pairs.head(1)])
    failed = {o.name for o in check_pairs(duplicated, params) if not o.passed}
    assert failed == {"no_duplicate_pairs"}


def test_summarize_pairs_counts_sources_and_negatives() -> None:
    clip = knn([("q", "t", 0.90), ("q", "u", 0.85)])
    caption = knn([("q", "t", 0.82)])
    pairs = mine_pairs({"clip_image": clip, "caption_text": caption}, paper_params())
    summary = summarize_pairs(pairs, DEFAULT_SOURCES)
    assert summary["pairs"] == 2
    assert summary["queries"] == 1
    assert summary["pairs_from_clip_image"] == 2
    assert summary["pairs_from_dino_image"] == 0
    assert summary["pairs_from_caption_text"] == 1
    assert summary["pairs_from_2plus_sources"] == 1
    assert summary["mean_negatives_per_pair"] == pytest.approx(2.0)
    assert summary["mean_mined_negatives_per_pair"] == pytest.approx(1.0)


def test_mean_mined_negatives_per_pair_leaves_out_the_query_image() -> None:
    # Small per-source cuts make pools of different sizes, so pairs carry different counts.
    pairs = mine_pairs(random_knn(query_count=30, k=6, seed=8), paper_params(targets_per_source=2))
    per_pair = pairs["hard_negative_ids"].list.len()
    assert per_pair.n_unique() > 1
    summary = summarize_pairs(pairs, DEFAULT_SOURCES)
    assert summary["mean_negatives_per_pair"] == pytest.approx(per_pair.mean())
    assert summary["mean_mined_negatives_per_pair"] == pytest.approx(per_pair.mean() - 1.0)
    empty = summarize_pairs(pairs.head(0), DEFAULT_SOURCES)
    assert empty["mean_negatives_per_pair"] == empty["mean_mined_negatives_per_pair"] == 0.0


@pytest.mark.parametrize(
    "bad",
    [
        {"bands": {"clip_image": (0.9, 0.9)}},
        {"bands": {"clip_image": (0.95, 0.8)}},
        {"bands": {"clip_image": (-1.5, 0.9)}},
        {"bands": {"clip_image": (0.8, 1.2)}},
        {"bands": {"clip_image": PAPER_BAND}, "hard_negatives": 0},
        {"bands": {"clip_image": PAPER_BAND}, "targets_per_source": 0},
        {"bands": {"clip_image": PAPER_BAND}, "query_fraction": 0.0},
    ],
)
def test_bad_params_raise(bad: dict) -> None:
    with pytest.raises(ValueError):
        MiningParams(**bad)


def test_a_source_without_a_band_is_an_error_naming_it() -> None:
    params = MiningParams(bands={"clip_image": PAPER_BAND})
    with pytest.raises(ValueError, match="dino_image"):
        mine_pairs({"dino_image": knn([("q", "a", 0.9)])}, params)
