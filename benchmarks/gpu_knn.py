"""GPU section: exact KNN through the product's torch backend against its matrix products alone.

    python -m benchmarks.gpu_knn [--smoke]    # alone; gpu_suite runs it as one section

On N x d float16 unit vectors (default 1M x 768), every vector a query, K=50, self excluded:

- matmul only: the same blocked products the search runs (`plan_blocks`), results dropped:
  the floor of this search in torch (the issue's target: search <= 2x this);
- `search_torch_index` (the product's core: products, group-max pre-selection, running top-k
  merge, float32 re-scoring, results copied to the host), and `build_torch_index` (host table
  to the device);
- accuracy: a sample of queries against a float32 brute force on the device (recall@K and the
  largest score difference);
- `search_neighbors` with `IndexSpec(backend="torch")` on a slice of the queries: the same
  search plus the long polars frame (ids, ranks) the asset writes, per query.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np

from benchmarks.gpu_common import Suite, dense_peak_tflops, gpu_name, log, output_path, synchronize

KNN_K = 50
ACCURACY_QUERIES = 1000
FRAME_QUERIES = 100_000
SMOKE = {"knn_vectors": 6000, "knn_dim": 64, "knn_queries": 6000}


def knn_section(record: dict[str, Any], args: argparse.Namespace, suite: Suite) -> None:
    """Fill `record` with the KNN figures (sizes from args.knn_vectors / knn_dim / knn_queries)."""
    import torch

    from megapairs_assets.knn.search import IndexSpec, check_knn, search_neighbors
    from megapairs_assets.knn.torch_search import (
        build_torch_index,
        candidates_for,
        default_block_budget_bytes,
        plan_blocks,
        search_torch_index,
    )

    device = torch.device("cpu" if args.smoke else "cuda")
    n_vectors, dim = args.knn_vectors, args.knn_dim
    n_queries = min(args.knn_queries, n_vectors)
    record["config"] = {"vectors": n_vectors, "dim": dim, "queries": n_queries, "k": KNN_K}
    generator = torch.Generator(device=device).manual_seed(0)
    on_device = torch.randn(n_vectors, dim, device=device, generator=generator)
    on_device = torch.nn.functional.normalize(on_device, dim=1).half()
    vectors = on_device.cpu().numpy()
    del on_device

    started = time.perf_counter()
    index = build_torch_index(vectors, device)
    synchronize(device)
    record["build_torch_index_s"] = round(time.perf_counter() - started, 3)
    element_bytes = torch.finfo(index.compute_dtype).bits // 8
    budget = default_block_budget_bytes(index)
    plan = plan_blocks(n_queries, n_vectors, dim, candidates_for(KNN_K), element_bytes, budget)
    record["block_plan"] = {
        "budget_bytes": budget,
        "query_rows": plan.query_rows,
        "corpus_rows": plan.corpus_rows,
        "candidates": plan.candidates,
        "compute_dtype": str(index.compute_dtype),
    }
    log(f"knn: plan {record['block_plan']}")

    record["matmul_only_s"] = round(_matmul_only_s(index, n_queries, plan), 3)
    log(f"knn: matmul only {record['matmul_only_s']} s")
    if device.type == "cuda":
        record["one_block_ms"] = _one_block_ms(index, plan)
        log(f"knn: one block, ms per step {record['one_block_ms']}")

    queries = vectors[:n_queries]
    # Warm-up on a few queries: kernel selection and the caching allocator's first blocks.
    search_torch_index(index, queries[:256], KNN_K, exclude_rows=np.arange(256))
    synchronize(device)
    started = time.perf_counter()
    scores, rows = search_torch_index(index, queries, KNN_K, exclude_rows=np.arange(n_queries))
    search_s = time.perf_counter() - started
    record["search_torch_index_s"] = round(search_s, 3)
    record["queries_per_s"] = round(n_queries / search_s)
    record["ratio_search_to_matmul_only"] = round(search_s / record["matmul_only_s"], 3)
    peak = dense_peak_tflops(gpu_name())
    flop = 2.0 * n_queries * n_vectors * dim
    record["matmul_tflop"] = round(flop / 1e12, 3)
    if peak and device.type == "cuda":
        record["ceiling_s"] = round(flop / (peak * 1e12), 3)
        record["ratio_search_to_ceiling"] = round(search_s / record["ceiling_s"], 2)
    log(
        f"knn: search {record['search_torch_index_s']} s = "
        f"{record['ratio_search_to_matmul_only']} x matmul only"
    )
    record["accuracy"] = _accuracy(index, vectors, scores, rows, device)
    log(f"knn: accuracy {record['accuracy']}")
    del scores, rows
    if device.type == "cuda" and suite.has_time(90):
        record["block_budget_sweep"] = _budget_sweep(index, queries, budget)
        log(f"knn: block budget sweep {record['block_budget_sweep']}")

    if not suite.has_time(60):
        record["search_neighbors"] = "skipped: time budget"
        return
    frame_queries = min(n_queries, args.knn_frame_queries)
    ids = np.array([f"img{i:08d}" for i in range(n_vectors)])
    spec = IndexSpec(backend="torch")
    started = time.perf_counter()
    frame = search_neighbors(index, ids, vectors[:frame_queries], ids[:frame_queries], KNN_K, spec)
    frame_s = time.perf_counter() - started
    failed = [check.name for check in check_knn(frame.head(200_000), KNN_K) if not check.passed]
    record["search_neighbors"] = {
        "queries": frame_queries,
        "rows": frame.height,
        "seconds": round(frame_s, 3),
        "queries_per_s": round(frame_queries / frame_s),
        "ratio_to_core_per_query": round((frame_s / frame_queries) / (search_s / n_queries), 3),
        "failed_checks_on_first_rows": failed,
    }
    log(f"knn: search_neighbors {record['search_neighbors']}")


def _budget_sweep(index: Any, queries: np.ndarray, default_budget: int) -> dict[str, Any]:
    """The same search with larger score blocks (fewer, wider corpus blocks per query block):
    whether the product's 4 GiB cap on the block budget leaves speed on a large card."""
    import torch

    from megapairs_assets.knn.torch_search import search_torch_index

    free_bytes, _ = torch.cuda.mem_get_info(index.device)
    n_queries = len(queries)
    sweep: dict[str, Any] = {"default_bytes": default_budget}
    for factor in (2, 4):
        budget = default_budget * factor
        if budget > 0.6 * free_bytes:
            sweep[f"x{factor}"] = "skipped: not enough free memory"
            continue
        torch.cuda.empty_cache()
        started = time.perf_counter()
        search_torch_index(
            index, queries, KNN_K, exclude_rows=np.arange(n_queries), block_budget_bytes=budget
        )
        sweep[f"x{factor}"] = {
            "budget_bytes": budget,
            "seconds": round(time.perf_counter() - started, 3),
        }
    return sweep


def _matmul_only_s(index: Any, n_queries: int, plan: Any) -> float:
    """Seconds of the search's own blocked products (queries already on the device)."""
    import torch

    device = index.device
    queries = index.vectors[:n_queries].to(index.compute_dtype)
    n_rows = index.vectors.shape[0]
    with torch.inference_mode():
        # One block first: cuBLAS picks its kernels outside the timed loop.
        queries[: plan.query_rows] @ index.vectors[: plan.corpus_rows].T
        synchronize(device)
        started = time.perf_counter()
        for start in range(0, n_queries, plan.query_rows):
            block_queries = queries[start : start + plan.query_rows]
            for corpus_start in range(0, n_rows, plan.corpus_rows):
                # The scores are dropped: only the time of computing them is wanted.
                block_queries @ index.vectors[corpus_start : corpus_start + plan.corpus_rows].T
        synchronize(device)
    return time.perf_counter() - started


def _one_block_ms(index: Any, plan: Any) -> dict[str, float]:
    """Where one (query block x corpus block) step's time goes, in CUDA-event milliseconds.

    The product's selection is `select_two_levels`; the other rows are the alternatives it
    was chosen over (a maximum over consecutive columns, a plain `topk`).
    """
    import torch

    group = 32
    queries = index.vectors[: plan.query_rows]
    block = index.vectors[: plan.corpus_rows]
    scores = queries @ block.T
    n_queries = scores.shape[0]
    steps = {
        "matmul": lambda: queries @ block.T,
        "max_strided_groups": lambda: scores.view(n_queries, group, -1).amax(dim=1),
        "max_consecutive_groups": lambda: scores.view(n_queries, -1, group).amax(dim=2),
        "topk_all_columns": lambda: scores.topk(plan.candidates, dim=1, sorted=False),
        "topk_group_maxima": lambda: (
            scores.view(n_queries, group, -1).amax(dim=1).topk(plan.candidates, dim=1, sorted=False)
        ),
        "select_two_levels": lambda: _select(scores, plan.candidates),
    }
    timings: dict[str, float] = {}
    with torch.inference_mode():
        for name, step in steps.items():
            step()
            start, stop = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            for _ in range(5):
                step()
            stop.record()
            stop.synchronize()
            timings[name] = round(start.elapsed_time(stop) / 5, 3)
    return timings


def _select(scores: Any, n_best: int) -> Any:
    from megapairs_assets.knn import torch_search

    return torch_search._block_top(scores, n_best)


def _accuracy(
    index: Any, vectors: np.ndarray, scores: np.ndarray, rows: np.ndarray, device: Any
) -> dict[str, Any]:
    """Recall@K and score error on sample queries against a float32 brute force."""
    import torch

    sample = np.random.default_rng(0).choice(
        len(scores), size=min(ACCURACY_QUERIES, len(scores)), replace=False
    )
    corpus = torch.from_numpy(vectors).to(device).float()
    queries = corpus[torch.from_numpy(sample).to(device)]
    with torch.inference_mode():
        previous = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False
        exact = queries @ corpus.T
        torch.backends.cuda.matmul.allow_tf32 = previous
        exact[
            torch.arange(len(sample), device=device), torch.from_numpy(sample).to(device)
        ] = -float("inf")
        exact_scores, exact_rows = exact.topk(rows.shape[1], dim=1)
    exact_rows_np, exact_scores_np = exact_rows.cpu().numpy(), exact_scores.cpu().numpy()
    found = [
        len(set(rows[q].tolist()) & set(exact_rows_np[i].tolist())) for i, q in enumerate(sample)
    ]
    return {
        "sample_queries": len(sample),
        "recall_at_k": round(float(np.sum(found) / (len(sample) * rows.shape[1])), 6),
        "max_abs_score_diff_by_rank": float(np.abs(scores[sample] - exact_scores_np).max()),
        "self_returned": int((rows == np.arange(len(rows))[:, None]).sum()),
    }


def main(argv: list[str] | None = None) -> int:
    """Run the KNN section alone and write gpu_knn.json."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--knn-vectors", type=int, default=1_000_000)
    parser.add_argument("--knn-dim", type=int, default=768)
    parser.add_argument("--knn-queries", type=int, default=1_000_000)
    parser.add_argument("--knn-frame-queries", type=int, default=FRAME_QUERIES)
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    suite = Suite(output_path("gpu_knn", args.smoke), budget_s=600)
    with suite.section("knn", 0) as record:
        if record is not None:
            knn_section(record, args, suite)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
