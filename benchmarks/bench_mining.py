"""Benchmark of pair mining (method.md §3) on synthetic KNN tables.

    python -m benchmarks.bench_mining [--queries 100000] [--k 50] [--copy-share 0.01] [--quick]

Builds one KNN table per default source (ids like "00001/000000123", scores descending per
query, roughly a third of them inside the paper's (0.8, 0.96) band), times only `mine_pairs`
and writes benchmarks/results/mining.json. It then times `mine_pairs` again with content
hashes in which `--copy-share` of the images have a byte-identical copy among their
neighbours (the exact-duplicate filter), reports the ratio to the first run, and times the
`no_identical_content_pairs` check. The target is 100,000 queries x 3 sources x K=50
in under 30 s on a 2-core CPU; other work on the same machine makes the figure noisy.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import resource
import time
from pathlib import Path

import numpy as np
import polars as pl

from megapairs_assets.mining.pairs import (
    DEFAULT_SOURCES,
    IDENTICAL_CONTENT_CHECK,
    PAPER_BAND,
    MiningParams,
    check_no_identical_content,
    check_pairs,
    knn_image_ids,
    mine_pairs,
    summarize_pairs,
)

try:
    from benchmarks._machine import machine_info, write_result
except ImportError:  # the shared helper may not exist yet; keep the benchmark runnable alone
    RESULTS_DIR = Path(__file__).resolve().parent / "results"

    def machine_info() -> dict:
        """Minimal description of the machine the figures came from."""
        return {
            "platform": platform.platform(),
            "python": platform.python_version(),
            "cpu_count": os.cpu_count(),
            "polars": pl.__version__,
            "numpy": np.__version__,
        }

    def write_result(name: str, payload: dict) -> Path:
        """Write benchmarks/results/<name>.json and return its path."""
        RESULTS_DIR.mkdir(parents=True, exist_ok=True)
        path = RESULTS_DIR / f"{name}.json"
        path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
        return path


TARGET_SECONDS = 30.0
IMAGES_PER_SHARD = 10_000


def image_ids(indices: np.ndarray) -> pl.Series:
    """Corpus-style ids "SSSSS/IIIIIIIII" (shard / index) for integer image indices."""
    indices_series = pl.Series(indices.astype(np.int64))
    shards = (indices_series // IMAGES_PER_SHARD).cast(pl.String).str.zfill(5)
    numbers = indices_series.cast(pl.String).str.zfill(9)
    return shards + "/" + numbers


def synthetic_knn(query_count: int, k: int, rng: np.random.Generator) -> pl.DataFrame:
    """One source's KNN table: k distinct non-self neighbours per query, scores descending."""
    # Neighbours are the query plus a strictly increasing positive offset, which keeps them
    # distinct and never the query itself without a per-query loop.
    max_step = max(1, min(20, (query_count - 1) // k))
    steps = rng.integers(1, max_step + 1, size=(query_count, k))
    offsets = np.cumsum(steps, axis=1)
    queries = np.repeat(np.arange(query_count), k)
    neighbours = (queries + offsets.ravel()) % query_count
    # Top score around 0.93, decaying so that roughly a third of each list lands in the band.
    top_scores = rng.uniform(0.86, 0.99, size=(query_count, 1))
    decay = np.cumsum(rng.uniform(0.0, 0.016, size=(query_count, k)), axis=1)
    scores = (top_scores - decay).ravel().astype(np.float32)
    ranks = np.tile(np.arange(k, dtype=np.int16), query_count)
    return pl.DataFrame(
        {
            "query_id": image_ids(queries),
            "rank": pl.Series(ranks, dtype=pl.Int16),
            "neighbor_id": image_ids(neighbours),
            "score": pl.Series(scores, dtype=pl.Float32),
        }
    )


def synthetic_content_hashes(
    neighbors: dict[str, pl.DataFrame], copy_share: float, rng: np.random.Generator
) -> pl.DataFrame:
    """A hash per id; `copy_share` of the ids share theirs with one of their own neighbours."""
    ids = knn_image_ids(neighbors)
    first = neighbors[DEFAULT_SOURCES[0]]
    queries = first["query_id"].unique().sort()
    copied = queries.sample(fraction=copy_share / 2, seed=int(rng.integers(2**31)))
    # Each copied query shares its bytes with its best clip neighbour: a copy the KNN finds.
    partners = (
        first.filter(pl.col("query_id").is_in(copied.implode()) & (pl.col("rank") == 0))
        .select("query_id", "neighbor_id")
        .unique(subset="neighbor_id", keep="first")
        .filter(~pl.col("neighbor_id").is_in(copied.implode()))
    )
    label = dict(zip(partners["neighbor_id"], partners["query_id"], strict=True))
    return pl.DataFrame(
        {"image_id": ids, "content_hash": [f"sha256:{label.get(i, i)}" for i in ids]}
    )


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def run(query_count: int, k: int, copy_share: float = 0.01) -> dict:
    """Generate inputs, time `mine_pairs`, and return the figures to report."""
    rng = np.random.default_rng(0)
    neighbors = {source: synthetic_knn(query_count, k, rng) for source in DEFAULT_SOURCES}
    input_rows = sum(frame.height for frame in neighbors.values())
    in_band_rows = sum(
        frame.filter(pl.col("score").is_between(*PAPER_BAND, closed="none")).height
        for frame in neighbors.values()
    )
    params = MiningParams(bands={source: PAPER_BAND for source in DEFAULT_SOURCES})
    rss_before_mib = peak_rss_mib()

    started = time.perf_counter()
    pairs = mine_pairs(neighbors, params)
    mine_seconds = time.perf_counter() - started

    hashes = synthetic_content_hashes(neighbors, copy_share, rng)
    copied_ids = hashes.filter(pl.col("content_hash").is_duplicated()).height
    started = time.perf_counter()
    pairs_without_copies = mine_pairs(neighbors, params, content_hashes=hashes)
    mine_with_hashes_seconds = time.perf_counter() - started
    started = time.perf_counter()
    identical = check_no_identical_content(pairs_without_copies, hashes)
    check_seconds = time.perf_counter() - started

    failed_checks = [c.name for c in check_pairs(pairs, params) if not c.passed]
    if not identical.passed:
        failed_checks.append(identical.name)
    return {
        "benchmark": "mining",
        "date_utc": dt.datetime.now(dt.UTC).isoformat(timespec="seconds"),
        "machine": machine_info(),
        "queries": query_count,
        "k": k,
        "sources": list(DEFAULT_SOURCES),
        "input_rows": input_rows,
        "in_band_share": round(in_band_rows / input_rows, 4),
        "mine_seconds": round(mine_seconds, 3),
        "pairs_per_second": round(pairs.height / mine_seconds, 1),
        "target_seconds": TARGET_SECONDS,
        "fraction_of_target": round(mine_seconds / TARGET_SECONDS, 4),
        "copy_share": copy_share,
        "images_with_a_copy": copied_ids,
        "pairs_holding_copies_without_hashes": check_no_identical_content(
            pairs, hashes
        ).failing_rows,
        "pairs_with_content_hashes": pairs_without_copies.height,
        "mine_with_content_hashes_seconds": round(mine_with_hashes_seconds, 3),
        "content_hashes_time_ratio": round(mine_with_hashes_seconds / mine_seconds, 3),
        "identical_content_check_seconds": round(check_seconds, 3),
        "peak_rss_mib_before_mining": round(rss_before_mib, 1),
        "peak_rss_mib": round(peak_rss_mib(), 1),
        "summary": summarize_pairs(pairs, DEFAULT_SOURCES),
        "failed_checks": failed_checks,
        "note": "shared 2-core machine; other jobs may have been running, timings are noisy",
    }


def main() -> None:
    """Parse arguments, run the benchmark, print and save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=100_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument(
        "--copy-share", type=float, default=0.01, help="share of images with an exact copy"
    )
    parser.add_argument("--quick", action="store_true", help="tiny run for a CI smoke test")
    args = parser.parse_args()
    query_count = 2_000 if args.quick else args.queries

    result = run(query_count, args.k, args.copy_share)
    print(
        f"mine_pairs: {result['queries']} queries x {len(result['sources'])} sources x "
        f"K={result['k']} -> {result['summary']['pairs']} pairs in "
        f"{result['mine_seconds']:.2f} s ({result['pairs_per_second']:.0f} pairs/s), "
        f"{result['fraction_of_target']:.2%} of the {TARGET_SECONDS:.0f} s target, "
        f"peak RSS {result['peak_rss_mib']:.0f} MiB"
    )
    print(
        f"with content hashes ({result['images_with_a_copy']} images with a copy): "
        f"{result['mine_with_content_hashes_seconds']:.2f} s, "
        f"{result['content_hashes_time_ratio']:.2f}x the run without; "
        f"{result['pairs_with_content_hashes']} pairs, none holding a copy "
        f"(without hashes {result['pairs_holding_copies_without_hashes']} did); "
        f"{IDENTICAL_CONTENT_CHECK} check {result['identical_content_check_seconds']:.2f} s"
    )
    if result["failed_checks"]:
        print(f"FAILED checks: {result['failed_checks']}")
    if not args.quick:
        print(f"wrote {write_result('mining', result)}")


if __name__ == "__main__":
    main()
