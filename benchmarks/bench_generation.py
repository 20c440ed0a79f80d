"""Benchmark of the generation plumbing: HTTP throughput against a fixed-latency server, and a
cached re-run of a 10k-pair shard.

    python -m benchmarks.bench_generation [--latency-s 0.5] [--in-flight 64] [--requests 2048]
                                          [--pairs 10000] [--quick]

1. HTTP backend vs the ideal. A local OpenAI-compatible server (`tests/fault_server.py`, in its
   own process) answers every request after a fixed latency; a server with continuous
   batching behaves like this. The best a client can do is in_flight / latency requests per
   second. The `openai_http` backend sends `--requests` requests with `--in-flight` at once;
   the figure is measured requests/s over that ideal (target >= 0.9). It is measured twice:
   the backend alone, and through `run_requests` with the shard's SQLite response store (what
   a step does), to show what persisting costs.
2. Cached re-run. A shard of `--pairs` pairs (catalog image rows and a pairs table, no image
   files: the caption template needs none) is described and instructed once through the same
   server (2 x pairs requests), then both steps run again with unchanged inputs: zero calls,
   every answer from the cache. The figure is re-run seconds over first-run seconds (target
   < 0.05), with the time of each part.

Writes benchmarks/results/generation.json; `--quick` (small sizes) writes nothing.
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import polars as pl

from benchmarks._machine import machine_info, write_result
from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    SamplingParams,
    create_backend,
)
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.instruct import write_instructions_for_shard
from megapairs_assets.generation.runner import run_requests
from megapairs_assets.generation.settings import GenerationSettings, PairSample, StepSettings
from megapairs_assets.generation.store import ResponseStore
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now
from megapairs_assets.mining.pairs import pair_id_for, pairs_schema

REPO_ROOT = Path(__file__).resolve().parents[1]
SERVER_SCRIPT = REPO_ROOT / "tests" / "fault_server.py"


def start_server(latency_s: float) -> tuple[subprocess.Popen[str], str]:
    """The fixed-latency server in its own process (so it never shares the client's GIL)."""
    server = subprocess.Popen(
        [sys.executable, str(SERVER_SCRIPT), "--latency-s", str(latency_s)],
        stdout=subprocess.PIPE,
        text=True,
    )
    assert server.stdout is not None
    line = server.stdout.readline()
    if not line.startswith("PORT "):
        server.kill()
        raise RuntimeError(f"test server did not start: {line!r}")
    return server, f"http://127.0.0.1:{int(line.split()[1])}/v1"


def http_spec(base_url: str, in_flight: int) -> BackendSpec:
    return BackendSpec(
        "openai_http",
        "bench-model",
        "bench model",
        {
            "base_urls": [base_url],
            "served_model": "bench-model",
            "max_in_flight": in_flight,
            "request_timeout_s": 60.0,
        },
    )


def bench_http(base_url: str, latency_s: float, in_flight: int, count: int) -> dict[str, Any]:
    spec = http_spec(base_url, in_flight)
    requests = [
        GenerationRequest(
            key=f"r{i}",
            step="describe",
            messages=[{"role": "user", "content": f"describe pair {i} " + "word " * 60}],
            sampling=SamplingParams(max_tokens=64),
            seed=i,
        )
        for i in range(count)
    ]
    ideal = in_flight / latency_s
    # Warm-up: connections opened, imports done.
    create_backend(spec).generate(requests[: min(in_flight, count)], lambda batch: None)

    done = []
    started = time.perf_counter()
    create_backend(spec).generate(requests, done.extend)
    alone_s = time.perf_counter() - started
    assert len(done) == count and all(r.error is None for r in done)

    with tempfile.TemporaryDirectory() as tmp:
        store = ResponseStore(Path(tmp) / "bench.sqlite")
        started = time.perf_counter()
        _, stats = run_requests(requests, create_backend(spec), store, flush_every=64)
        stored_s = time.perf_counter() - started
    assert stats.succeeded == count
    return {
        "latency_s": latency_s,
        "in_flight": in_flight,
        "requests": count,
        "ideal_requests_per_s": ideal,
        "backend_requests_per_s": count / alone_s,
        "backend_ratio_to_ideal": count / alone_s / ideal,
        "with_store_requests_per_s": count / stored_s,
        "with_store_ratio_to_ideal": count / stored_s / ideal,
    }


def build_shard(root: Path, pairs: int, images: int) -> tuple[DataLayout, LineageCatalog]:
    """Catalog image rows and one pairs table of `pairs` rows (ids like the mining stage's)."""
    layout = DataLayout(root)
    catalog = LineageCatalog(layout.catalog_path)
    image_rows = pl.DataFrame(
        {
            "image_id": [f"00000/{i:09d}" for i in range(images)],
            "shard": "00000",
            "key": [f"{i:09d}" for i in range(images)],
            "source_uri": [f"/nonexistent/{i}.jpg" for i in range(images)],
            "caption": [f"a drawing of thing number {i} (objects, tests)" for i in range(images)],
            "content_hash": [f"{i:064x}" for i in range(images)],
            "width": 64,
            "height": 64,
        }
    )
    record(catalog, "image_corpus", {"image_lineage": image_rows})
    ids = image_rows["image_id"].to_list()
    rows = []
    for n in range(pairs):
        query, target = ids[n % images], ids[(n * 7919 + 1 + n // images) % images]
        if query == target:
            target = ids[(n + 1) % images]
        negatives = [query, ids[(n + 3) % images], ids[(n + 5) % images]]
        rows.append((query, target, [x for x in negatives if x != target]))
    frame = (
        pl.DataFrame(
            [
                {
                    "pair_id": pair_id_for(q, t),
                    "query_id": q,
                    "target_id": t,
                    "sources": ["caption_text"],
                    "score_caption_text": 0.85,
                    "best_rank": 1,
                    "hard_negative_ids": h,
                }
                for q, t, h in rows
            ],
            schema=pairs_schema(("caption_text",)),
        )
        .unique("pair_id", keep="first")
        .sort("query_id", "target_id")
    )
    write_parquet_atomic(frame, layout.shard_table("mined_image_pairs", "00000"))
    record(catalog, "mined_image_pairs", {})
    return layout, catalog


def record(catalog: LineageCatalog, asset: str, rows: dict[str, pl.DataFrame], result=None) -> None:
    catalog.record(
        MaterializationRecord(
            asset=asset,
            partition="00000",
            run_id="bench",
            code_version="bench",
            profile="bench",
            started_at=utc_now(),
            duration_s=0.0,
        ),
        rows=rows,
    )


def bench_cached_rerun(base_url: str, pairs: int, in_flight: int) -> dict[str, Any]:
    spec = http_spec(base_url, in_flight)
    settings = GenerationSettings(
        describe=StepSettings(spec, "describe_captions", SamplingParams(max_tokens=160)),
        instruct=StepSettings(spec, "instructions", SamplingParams(max_tokens=96)),
        model_sample=PairSample(fraction=1.0),
        flush_every=256,
    )
    with tempfile.TemporaryDirectory() as tmp:
        layout, catalog = build_shard(Path(tmp), pairs, images=max(pairs // 5, 50))
        shard_pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", "00000")).height
        timings: dict[str, float] = {}
        results = {}
        for run in ("first", "rerun"):
            for name, step in (
                ("describe", describe_pairs_for_shard),
                ("instruct", write_instructions_for_shard),
            ):
                started = time.perf_counter()
                result = step("00000", layout, catalog, settings)
                timings[f"{run}_{name}_s"] = time.perf_counter() - started
                results[f"{run}_{name}"] = result.metadata
                asset = "pair_descriptions" if name == "describe" else "pair_instructions"
                record(catalog, asset, dict(result.rows))
        first = timings["first_describe_s"] + timings["first_instruct_s"]
        rerun = timings["rerun_describe_s"] + timings["rerun_instruct_s"]
        return {
            "pairs": shard_pairs,
            "first_run_calls": results["first_describe"]["model_calls"]
            + results["first_instruct"]["model_calls"],
            "rerun_calls": results["rerun_describe"]["model_calls"]
            + results["rerun_instruct"]["model_calls"],
            "rerun_cache_hits": results["rerun_describe"]["model_cache_hits"]
            + results["rerun_instruct"]["model_cache_hits"],
            **{k: round(v, 3) for k, v in timings.items()},
            "first_run_s": round(first, 3),
            "rerun_s": round(rerun, 3),
            "rerun_ratio": rerun / first,
        }


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--latency-s", type=float, default=0.5)
    parser.add_argument("--in-flight", type=int, default=64)
    parser.add_argument("--requests", type=int, default=2048)
    parser.add_argument("--pairs", type=int, default=10_000)
    parser.add_argument("--rerun-in-flight", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="small sizes, nothing written")
    args = parser.parse_args(argv)
    if args.quick:
        args = replace_args(args, requests=256, pairs=500)
    server, base_url = start_server(args.latency_s)
    try:
        http = bench_http(base_url, args.latency_s, args.in_flight, args.requests)
        ideal = http["ideal_requests_per_s"]
        print(
            f"HTTP: {http['backend_requests_per_s']:.1f} req/s alone "
            f"({http['backend_ratio_to_ideal']:.1%} of the ideal {ideal:.0f}), "
            f"{http['with_store_requests_per_s']:.1f} req/s with the store "
            f"({http['with_store_ratio_to_ideal']:.1%})"
        )
        cached = bench_cached_rerun(base_url, args.pairs, args.rerun_in_flight)
        print(
            f"cached re-run of {cached['pairs']} pairs: first {cached['first_run_s']:.1f} s "
            f"({cached['first_run_calls']} calls), re-run {cached['rerun_s']:.2f} s "
            f"({cached['rerun_calls']} calls, {cached['rerun_cache_hits']} hits): "
            f"{cached['rerun_ratio']:.1%} of the first"
        )
    finally:
        server.kill()
        server.wait()
    payload = {"machine": machine_info(), "args": vars(args), "http": http, "cached_rerun": cached}
    if not args.quick:
        print(f"wrote {write_result('generation', payload)}")
    return payload


def replace_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(**{**vars(args), **changes})


if __name__ == "__main__":
    main()
