"""Lineage writes per second with 8 writer processes: DuckLake on PostgreSQL vs the DuckDB file.

Each writer process records `--writes` materializations of its own shard (begin, then complete
with `--rows` image lineage rows), all starting at one signal, like 8 step processes of a
multiprocess or Kubernetes executor. The baseline is the embedded default measured in the same
run: one DuckDB file, writers queued on its file lock. PostgreSQL is pgserver's bundled server
on a Unix socket in a temporary folder (no network). Prints both figures and the ratio; writes
JSON to benchmarks/results/scaleout.json.

    .venv/bin/python benchmarks/bench_scaleout.py [--writers 8] [--writes 10] [--rows 20]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import sys
import tempfile
import time
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import polars as pl

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    utc_now,
)

RESULTS = Path(__file__).resolve().parent / "results" / "scaleout.json"


def _rows(shard: str, n: int, generation: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"{shard}/{i:05d}" for i in range(n)],
            "shard": [shard] * n,
            "key": [f"{i:05d}" for i in range(n)],
            "source_uri": [f"bench/{shard}.tar#{i}" for i in range(n)],
            "caption": [f"generation {generation}"] * n,
            "content_hash": ["0" * 64] * n,
            "width": [64] * n,
            "height": [64] * n,
        }
    )


def _writer(
    location: str, data_path: str | None, shard: str, writes: int, rows: int, start, done
) -> None:
    catalog = LineageCatalog(location, data_path=data_path, lock_timeout_s=600)
    catalog.query("SELECT 1")  # connect (and attach) before the clock starts
    start.wait()
    for generation in range(writes):
        record = MaterializationRecord(
            asset="image_corpus",
            partition=shard,
            run_id="bench",
            code_version="bench",
            profile="bench",
            started_at=utc_now(),
            duration_s=0.0,
        )
        catalog.begin(record)
        catalog.complete(record, rows={IMAGE_LINEAGE.name: _rows(shard, rows, generation)})
    done.put(time.perf_counter())


def measure(location: str, data_path: str | None, writers: int, writes: int, rows: int) -> dict:
    """Writes/s (a write = one begin + one complete) of `writers` processes at once."""
    LineageCatalog(location, data_path=data_path).query("SELECT 1")  # schema made once
    ctx = mp.get_context("spawn")
    start, done = ctx.Event(), ctx.Queue()
    shards = [f"{i:05d}" for i in range(writers)]
    procs = [
        ctx.Process(target=_writer, args=(location, data_path, s, writes, rows, start, done))
        for s in shards
    ]
    for proc in procs:
        proc.start()
    time.sleep(5.0)  # every writer imported and connected
    began = time.perf_counter()
    start.set()
    ends = [done.get(timeout=900) for _ in procs]
    for proc in procs:
        proc.join()
        if proc.exitcode != 0:
            raise RuntimeError(f"a writer failed ({proc.exitcode}) on {location}")
    elapsed = max(ends) - began
    catalog = LineageCatalog(location, data_path=data_path)
    recorded = catalog.query("SELECT count(*) AS n FROM materializations")["n"][0]
    catalog.close()
    assert recorded == writers * writes, f"{recorded} records, expected {writers * writes}"
    return {
        "writers": writers,
        "writes": writers * writes,
        "seconds": round(elapsed, 3),
        "writes_per_s": round(writers * writes / elapsed, 2),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--writes", type=int, default=10, help="materializations per writer")
    parser.add_argument("--rows", type=int, default=20, help="lineage rows per materialization")
    args = parser.parse_args()

    import pgserver

    with tempfile.TemporaryDirectory(prefix="bench-scaleout-") as folder:
        root = Path(folder)
        file_result = measure(
            str(root / "catalog.duckdb"), None, args.writers, args.writes, args.rows
        )
        print(f"DuckDB file + lock : {file_result}")
        server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
        try:
            socket_dir = parse_qs(urlparse(server.get_uri()).query)["host"][0]
            url = f"ducklake:postgres:dbname=postgres host={socket_dir} user=postgres"
            lake_result = measure(url, str(root / "lake"), args.writers, args.writes, args.rows)
        finally:
            server.cleanup()
        print(f"DuckLake + Postgres: {lake_result}")
    ratio = lake_result["writes_per_s"] / file_result["writes_per_s"]
    print(f"ratio DuckLake/file writes per s: {ratio:.2f}")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(
        json.dumps(
            {
                "benchmark": "lineage writes per second, concurrent writer processes",
                "rows_per_write": args.rows,
                "duckdb_file_with_lock": file_result,
                "ducklake_postgres": lake_result,
                "ratio_ducklake_over_file": round(ratio, 3),
            },
            indent=2,
        )
        + "\n"
    )


if __name__ == "__main__":
    main()
