"""Scale-out figures: lineage writes on DuckLake vs the DuckDB file; data root on S3 vs local disk.

Part `lineage`: lineage writes per second with 8 writer processes, DuckLake on PostgreSQL vs
the DuckDB file.

Each writer process records `--writes` materializations of its own shard (begin, then complete
with `--rows` image lineage rows), all starting at one signal, like 8 step processes of a
multiprocess or Kubernetes executor. The baseline is the embedded default measured in the same
run: one DuckDB file, writers queued on its file lock. PostgreSQL is pgserver's bundled server
on a Unix socket in a temporary folder (no network). Prints both figures and the ratio; writes
JSON to benchmarks/results/scaleout.json.

Part `data-root`: MB/s of writing and reading embedding tables (`--tables` shards of
`--table-rows` x `--dim` float16, the product's `write_embedding_table` / `read_embedding_table`)
through `DataLayout` on an S3 server (moto, in its own process on 127.0.0.1) vs on local disk,
measured in the same run; best of `--repeats`. moto is a test double that keeps objects in
Python memory, so its figure is a floor for a real store's protocol path, not S3's speed.
Writes benchmarks/results/scaleout_data_root.json (`--quick`: a smoke run, its own file).

Part `demo` (run on its own): `megapairs demo --until <phase>` on the cluster deployment with
every engine a local server (PostgreSQL instance storage and DuckLake catalog from pgserver,
tables on moto's S3) vs the embedded default, wall time and ratio;
benchmarks/results/scaleout_demo.json.

    .venv/bin/python -m benchmarks.bench_scaleout [--part lineage|data-root|all]
        [--writers 8] [--writes 10] [--rows 20] [--tables 8] [--table-rows 10000] [--dim 768]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import numpy as np
import polars as pl

from benchmarks._machine import write_result
from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.embeddings.compute import (
    read_embedding_table,
    write_embedding_table,
)
from megapairs_assets.lib.storage import (
    DataLayout,
    DataPath,
    is_local,
    table_source,
    write_atomic,
)
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


# -- data root: object store vs local disk ------------------------------------------------------

_BUCKET = "megapairs-bench"
# Any value: moto accepts every key; real credentials must never reach a benchmark.
_FAKE_AWS_ENV = {
    "AWS_ACCESS_KEY_ID": "bench",
    "AWS_SECRET_ACCESS_KEY": "bench",
    "AWS_DEFAULT_REGION": "us-east-1",
}


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextmanager
def moto_s3_server() -> Iterator[str]:
    """An S3-compatible server (moto) in its own process on 127.0.0.1; yields its endpoint URL.

    Its own process, so the server's Python work does not share this process's GIL with the
    client being measured.
    """
    port = _free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError("the moto S3 server did not start") from None
                time.sleep(0.2)
        yield f"http://127.0.0.1:{port}"
    finally:
        server.terminate()
        server.wait(timeout=30)


def _size_bytes(path: DataPath) -> int:
    return path.stat().st_size if is_local(path) else int(path.fs.size(path.path))


def measure_data_root(
    layout: DataLayout, tables: int, ids: list[str], vectors: np.ndarray, repeats: int
) -> dict:
    """Best-of-`repeats` MB/s writing then reading `tables` embedding tables under `layout`.

    `tables`: the product's table writer and reader (Parquet encode/decode included).
    `bytes`: the same files' bytes through `write_atomic` / `table_source` alone, so the
    storage path's own cost shows apart from Parquet's.
    """
    paths = [layout.shard_table("clip_image_embeddings", f"{i:05d}") for i in range(tables)]
    timings: dict[str, list[float]] = {"write": [], "read": [], "bytes_write": [], "bytes_read": []}
    for _ in range(repeats):
        started = time.perf_counter()
        for path in paths:
            write_embedding_table(path, ids, vectors, "bench")
        timings["write"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for path in paths:
            read_ids, read_vectors = read_embedding_table(path)
            if len(read_ids) != len(ids) or read_vectors.shape != vectors.shape:
                raise RuntimeError(f"{path} read back {read_vectors.shape}, not {vectors.shape}")
        timings["read"].append(time.perf_counter() - started)
        blob = _read_bytes(paths[0])
        started = time.perf_counter()
        for path in paths:
            write_atomic(path, lambda tmp, blob=blob: tmp.write_bytes(blob))
        timings["bytes_write"].append(time.perf_counter() - started)
        started = time.perf_counter()
        for path in paths:
            if len(_read_bytes(path)) != len(blob):
                raise RuntimeError(f"{path} read back a different size")
        timings["bytes_read"].append(time.perf_counter() - started)
    megabytes = sum(_size_bytes(path) for path in paths) / 1e6
    best = {name: min(seconds) for name, seconds in timings.items()}
    return {
        "tables": tables,
        "megabytes": round(megabytes, 2),
        **{f"{name}_seconds": round(seconds, 3) for name, seconds in best.items()},
        **{f"{name}_mb_per_s": round(megabytes / seconds, 2) for name, seconds in best.items()},
        "tables_written_per_s": round(tables / best["write"], 2),
    }


def _read_bytes(path: DataPath) -> bytes:
    source = table_source(path)
    return source.read_bytes() if isinstance(source, Path) else source.getvalue()


def _commit() -> str | None:
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=Path(__file__).resolve().parent,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def data_root_part(args: argparse.Namespace) -> None:
    rng = np.random.default_rng(0)
    vectors = rng.standard_normal((args.table_rows, args.dim)).astype(np.float32)
    vectors = (vectors / np.linalg.norm(vectors, axis=1, keepdims=True)).astype(np.float16)
    ids = [f"00000/{i:07d}" for i in range(args.table_rows)]
    os.environ.update(_FAKE_AWS_ENV)
    with tempfile.TemporaryDirectory(prefix="bench-data-root-") as folder:
        root = Path(folder)
        local = measure_data_root(
            DataLayout(root / "local"), args.tables, ids, vectors, args.repeats
        )
        print(f"local disk        : {local}")
        with moto_s3_server() as endpoint_url:
            import s3fs

            s3fs.S3FileSystem(endpoint_url=endpoint_url).mkdir(_BUCKET)
            layout = DataLayout(
                root / "home",
                data_root=f"s3://{_BUCKET}/bench",
                storage_options={"endpoint_url": endpoint_url},
            )
            s3 = measure_data_root(layout, args.tables, ids, vectors, args.repeats)
        print(f"S3 (moto, 127.0.0.1): {s3}")
    ratios = {
        f"{name}_s3_over_local": round(s3[f"{name}_mb_per_s"] / local[f"{name}_mb_per_s"], 3)
        for name in ("write", "read", "bytes_write", "bytes_read")
    }
    print("ratio S3/local MB/s: " + ", ".join(f"{k} {v:.3f}" for k, v in ratios.items()))
    name = "scaleout_data_root_quick" if args.quick else "scaleout_data_root"
    path = write_result(
        name,
        {
            "benchmark": "data-root throughput: embedding tables through DataLayout, "
            "S3 server (moto, own process, 127.0.0.1) vs local disk",
            "table": {"rows": args.table_rows, "dim": args.dim, "dtype": "float16"},
            "repeats": args.repeats,
            "local_disk": local,
            "s3_moto": s3,
            **ratios,
            "note": "moto keeps objects in Python memory: a floor for the S3 protocol path, "
            "not a real store's throughput",
            "load_average_1m_at_end": round(os.getloadavg()[0], 2),
            "commit": _commit(),
        },
    )
    print(f"wrote {path}")


def lineage_part(args: argparse.Namespace) -> None:
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


def _run_demo(env: dict[str, str], until: str) -> tuple[float, str]:
    """`megapairs demo --quiet --until <phase>` in a fresh process: (wall seconds, output)."""
    started = time.perf_counter()
    done = subprocess.run(
        [sys.executable, "-m", "megapairs_assets.cli", "demo", "--quiet", "--until", until],
        env=env,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"demo failed ({done.returncode}): {done.stderr[-2000:]}")
    return wall_s, done.stdout


def demo_part(args: argparse.Namespace) -> None:
    """The demo's wall time on the cluster deployment (PostgreSQL instance, DuckLake catalog,
    tables on S3, all local servers) vs the embedded default, in the same run."""
    import boto3
    import pgserver

    repo = Path(__file__).resolve().parents[1]
    base_env = {k: v for k, v in os.environ.items() if not k.startswith(("MEGAPAIRS_", "DAGSTER_"))}
    with tempfile.TemporaryDirectory(prefix="bench-scaleout-demo-") as folder:
        root = Path(folder)
        embedded_env = {**base_env, "MEGAPAIRS_HOME": str(root / "embedded")}
        embedded_s, _ = _run_demo(embedded_env, args.until)
        print(f"embedded: {embedded_s:.1f} s")
        server = pgserver.get_server(root / "pgdata", cleanup_mode="stop")
        try:
            socket_dir = parse_qs(urlparse(server.get_uri()).query)["host"][0]
            with moto_s3_server() as endpoint_url:
                boto3.client("s3", endpoint_url=endpoint_url, **_boto_credentials()).create_bucket(
                    Bucket="bench"
                )
                dagster_home = root / "dagster"
                dagster_home.mkdir()
                (dagster_home / "dagster.yaml").write_text(
                    (repo / "deployment" / "dagster.yaml").read_text()
                )
                cluster_env = {
                    **base_env,
                    **_FAKE_AWS_ENV,
                    "MEGAPAIRS_HOME": str(root / "cluster"),
                    "DAGSTER_HOME": str(dagster_home),
                    "MEGAPAIRS_DEPLOYMENT": "cluster",
                    "MEGAPAIRS_POSTGRES_URL": "postgresql+psycopg2://postgres@/postgres"
                    f"?host={socket_dir}",
                    "MEGAPAIRS_LINEAGE_CATALOG": "ducklake:postgres:dbname=postgres "
                    f"host={socket_dir} user=postgres",
                    "MEGAPAIRS_LINEAGE_DATA_PATH": str(root / "lake"),
                    "MEGAPAIRS_DATA_ROOT": "s3://bench/home",
                    "MEGAPAIRS_STORAGE_ENDPOINT_URL": endpoint_url,
                }
                cluster_s, output = _run_demo(cluster_env, args.until)
        finally:
            server.cleanup()
    print(f"cluster deployment (local servers): {cluster_s:.1f} s")
    ratio = cluster_s / embedded_s
    print(f"ratio cluster/embedded wall time: {ratio:.2f}")
    result = {
        "benchmark": f"megapairs demo --until {args.until}: cluster deployment on local "
        "servers (pgserver PostgreSQL instance, DuckLake catalog, moto S3 data root) vs the "
        "embedded default",
        "embedded_s": round(embedded_s, 1),
        "cluster_s": round(cluster_s, 1),
        "ratio_cluster_over_embedded": round(ratio, 3),
        "cluster_summary_tail": output.strip().splitlines()[-6:],
        "commit": _commit(),
    }
    path = RESULTS.with_name("scaleout_demo.json")
    path.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {path}")


def _boto_credentials() -> dict[str, str]:
    return {
        "aws_access_key_id": _FAKE_AWS_ENV["AWS_ACCESS_KEY_ID"],
        "aws_secret_access_key": _FAKE_AWS_ENV["AWS_SECRET_ACCESS_KEY"],
        "region_name": _FAKE_AWS_ENV["AWS_DEFAULT_REGION"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=("lineage", "data-root", "demo", "all"), default="all")
    parser.add_argument("--until", default="mine", help="demo part: the last phase to run")
    parser.add_argument("--writers", type=int, default=8)
    parser.add_argument("--writes", type=int, default=10, help="materializations per writer")
    parser.add_argument("--rows", type=int, default=20, help="lineage rows per materialization")
    parser.add_argument("--tables", type=int, default=8, help="data-root: tables per repeat")
    parser.add_argument("--table-rows", type=int, default=10_000, help="data-root: rows a table")
    parser.add_argument("--dim", type=int, default=768, help="data-root: embedding width")
    parser.add_argument("--repeats", type=int, default=3, help="data-root: keep the best")
    parser.add_argument("--quick", action="store_true", help="data-root smoke run (own file)")
    args = parser.parse_args()
    if args.quick:
        args.tables, args.table_rows, args.dim, args.repeats = 2, 1000, 64, 1
    if args.part in ("data-root", "all"):
        data_root_part(args)
    if args.part in ("lineage", "all") and not args.quick:
        lineage_part(args)
    if args.part == "demo":
        demo_part(args)


if __name__ == "__main__":
    main()
