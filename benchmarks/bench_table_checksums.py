"""Benchmark of page checksums on our Parquet tables: their cost, and what they catch.

    python -m benchmarks.bench_table_checksums [--embedding-rows 100000] [--dim 768]
        [--knn-queries 20000] [--k 50] [--repeats 5] [--quick]

What it measures (every configuration `--repeats` times, interleaved, best run counts; wall
seconds and the process's CPU seconds, all threads together, which other jobs on a shared
machine disturb less than wall time):

- embedding tables (`--embedding-rows` x `--dim` random unit vectors with string ids and
  input digests, the columns `write_embedding_table` writes), float16 (what the pipeline
  stores) and float32: writing with `pq.write_table(use_dictionary=False)` as today (snappy,
  no checksums) vs the same with `write_page_checksum=True` vs the storage helper's default
  options (`write_arrow_atomic`: zstd + checksums); reading the image_id and embedding columns
  with `pq.read_table` vs `lib.storage.read_arrow_table` (every page verified). Seconds,
  ratios and file sizes.
- KNN tables (`--knn-queries` x `--k` rows of the KNN schema): polars' own writer and reader
  (what the KNN step used) vs `write_parquet_atomic` / `read_parquet` (pyarrow with
  checksums, every page verified, into polars); the same pyarrow route without checksums
  isolates the checksums' own share.
- what a single flipped bit does, on demo-sized tables (a 64 x 20 graph, a 64 x 128
  embedding table): every byte of every page flipped in one bit (byte i, bit i mod 8), read
  back the old way and the new way, each in a child process (polars' reader can abort its
  process): how many flips raise an error, make polars panic or abort the process, read back
  the same data, or read back other data (and of those, how many pass the stage's checks).

Writes benchmarks/results/table_checksums.json; `--quick` (small tables) writes nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq

from benchmarks._machine import write_result
from megapairs_assets.embeddings.compute import check_embeddings, embedding_arrays
from megapairs_assets.knn.search import KNN_SCHEMA, check_knn
from megapairs_assets.lib.storage import (
    parquet_write_options,
    read_arrow_table,
    read_parquet,
    write_arrow_atomic,
    write_parquet_atomic,
)

# The columns the KNN step and reuse read of an embedding table.
_EMBEDDING_READ = ["image_id", "embedding"]


def _best(runs: dict[str, Callable[[], Any]], repeats: int) -> dict[str, dict[str, float]]:
    """Best wall and CPU seconds of each callable over `repeats` interleaved rounds:
    {"wall": {name: s}, "cpu": {name: s}}."""
    wall = dict.fromkeys(runs, float("inf"))
    cpu = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            start_wall, start_cpu = time.perf_counter(), time.process_time()
            run()
            wall[name] = min(wall[name], time.perf_counter() - start_wall)
            cpu[name] = min(cpu[name], time.process_time() - start_cpu)
    return {
        "wall": {name: round(value, 4) for name, value in wall.items()},
        "cpu": {name: round(value, 4) for name, value in cpu.items()},
    }


def _ratios(
    seconds: dict[str, dict[str, float]], pairs: dict[str, tuple[str, str]]
) -> dict[str, dict[str, float]]:
    """{label: {"wall": a/b, "cpu": a/b}} for each (a, b) pair of `seconds`' names."""
    return {
        label: {kind: round(seconds[kind][a] / seconds[kind][b], 3) for kind in ("wall", "cpu")}
        for label, (a, b) in pairs.items()
    }


def embedding_table(rows: int, dim: int, dtype: type, seed: int = 0) -> pa.Table:
    """The columns `write_embedding_table` writes: image_id, embedding, input_digest."""
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((rows, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    vectors = vectors.astype(dtype)
    return pa.table(
        {
            "image_id": pa.array([f"00000/{i:09d}" for i in range(rows)], type=pa.string()),
            "embedding": pa.FixedSizeListArray.from_arrays(pa.array(vectors.reshape(-1)), dim),
            "input_digest": pa.array([f"{i:032x}" for i in range(rows)], type=pa.string()),
        }
    )


def knn_table(queries: int, k: int, seed: int = 0) -> pl.DataFrame:
    """A KNN graph that passes every KNN check: k neighbours per query, falling scores."""
    rng = np.random.default_rng(seed)
    neighbor = rng.integers(0, queries * 4, size=(queries, k))
    query = np.arange(queries)[:, None]
    neighbor = np.where(neighbor == query, neighbor + 1, neighbor)
    scores = -np.sort(-rng.uniform(0.1, 0.99, size=(queries, k)), axis=1).astype(np.float32)
    return pl.DataFrame(
        {
            "query_id": np.repeat([f"00001/{q:09d}" for q in range(queries)], k),
            "rank": np.tile(np.arange(k, dtype=np.int16), queries),
            "neighbor_id": [f"00000/{n:09d}" for n in neighbor.reshape(-1)],
            "score": scores.reshape(-1),
        },
        schema=KNN_SCHEMA,
    )


def _sizes_mb(paths: dict[str, Path]) -> dict[str, float]:
    return {name: round(path.stat().st_size / 1e6, 2) for name, path in paths.items()}


def bench_embeddings(folder: Path, rows: int, dim: int, repeats: int) -> dict[str, Any]:
    """Write and read costs of an embedding table, today vs with page checksums."""
    return {
        label: _bench_embedding_table(folder / label, embedding_table(rows, dim, dtype), repeats)
        for label, dtype in (("float16", np.float16), ("float32", np.float32))
    }


def _bench_embedding_table(folder: Path, table: pa.Table, repeats: int) -> dict[str, Any]:
    folder.mkdir()
    paths = {name: folder / f"{name}.parquet" for name in ("today", "snappy", "zstd")}
    writes = _best(
        {
            "today_snappy": lambda: pq.write_table(table, paths["today"], use_dictionary=False),
            "snappy_checksums": lambda: pq.write_table(
                table, paths["snappy"], use_dictionary=False, write_page_checksum=True
            ),
            "helper_zstd_checksums": lambda: write_arrow_atomic(
                table, paths["zstd"], use_dictionary=False
            ),
        },
        repeats,
    )
    reads = _best(
        {
            "today_read_table": lambda: pq.read_table(paths["today"], columns=_EMBEDDING_READ),
            "verified_snappy": lambda: read_arrow_table(paths["snappy"], _EMBEDDING_READ),
            "verified_zstd": lambda: read_arrow_table(paths["zstd"], _EMBEDDING_READ),
        },
        repeats,
    )
    same = read_arrow_table(paths["zstd"], _EMBEDDING_READ)
    assert same.equals(pq.read_table(paths["today"], columns=_EMBEDDING_READ))
    result = {
        "rows": table.num_rows,
        "dim": table.schema.field("embedding").type.list_size,
        "write_s": writes,
        "read_s": reads,
        "file_mb": _sizes_mb(paths),
        "ratios": {
            **_ratios(
                writes,
                {
                    "write_checksums_same_compression": ("snappy_checksums", "today_snappy"),
                    "write_helper_zstd": ("helper_zstd_checksums", "today_snappy"),
                },
            ),
            **_ratios(
                reads,
                {
                    "read_verified_same_compression": ("verified_snappy", "today_read_table"),
                    "read_verified_zstd": ("verified_zstd", "today_read_table"),
                },
            ),
        },
    }
    for path in paths.values():
        path.unlink()
    return result


def bench_knn(folder: Path, queries: int, k: int, repeats: int) -> dict[str, Any]:
    """Write and read costs of a KNN table: polars' own route vs the checked storage helpers."""
    frame = knn_table(queries, k)
    paths = {name: folder / f"knn_{name}.parquet" for name in ("polars", "pyarrow", "checked")}
    writes = _best(
        {
            "polars_native": lambda: frame.write_parquet(paths["polars"], compression="zstd"),
            "pyarrow_no_checksums": lambda: pq.write_table(
                frame.to_arrow(), paths["pyarrow"], compression="zstd"
            ),
            "write_parquet_atomic": lambda: write_parquet_atomic(frame, paths["checked"]),
        },
        repeats,
    )
    reads = _best(
        {
            "polars_native": lambda: pl.read_parquet(paths["polars"]),
            "pyarrow_unverified": lambda: pl.from_arrow(pq.read_table(paths["pyarrow"])),
            "read_parquet_verified": lambda: read_parquet(paths["checked"]),
        },
        repeats,
    )
    assert read_parquet(paths["checked"]).equals(frame)
    result = {
        "rows": frame.height,
        "write_s": writes,
        "read_s": reads,
        "file_mb": _sizes_mb(paths),
        "ratios": {
            **_ratios(
                writes,
                {
                    "write_vs_polars": ("write_parquet_atomic", "polars_native"),
                    "write_checksums_alone": ("write_parquet_atomic", "pyarrow_no_checksums"),
                },
            ),
            **_ratios(
                reads,
                {
                    "read_vs_polars": ("read_parquet_verified", "polars_native"),
                    "read_verification_alone": ("read_parquet_verified", "pyarrow_unverified"),
                },
            ),
        },
    }
    for path in paths.values():
        path.unlink()
    return result


def _page_offsets(data: bytes) -> list[int]:
    meta = pq.read_metadata(io.BytesIO(data))
    offsets: list[int] = []
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            chunk = meta.row_group(group).column(column)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
            start = start if start is not None else chunk.data_page_offset
            offsets.extend(range(start, start + chunk.total_compressed_size))
    return offsets


# How reading back a damaged table went (the census's outcomes).
_OUTCOMES = ("error", "panic", "process_abort", "same_data", "other_data", "other_passing")


def _reader(kind: str, scratch: Path) -> tuple[Callable[[bytes], Any], Callable[[Any], bool]]:
    """How one census way reads a damaged copy, and whether what it read passes the checks.

    `old`: what the pipeline did before (polars' reader for graphs, pyarrow unverified for
    embeddings); `new`: lib.storage's checked readers (through a file, as the steps read)."""
    table, way = kind.split("_")
    if table == "knn":

        def knn_passes(frame: pl.DataFrame) -> bool:
            return frame.schema == KNN_SCHEMA and all(o.passed for o in check_knn(frame, 20))

        if way == "old":
            return (lambda data: pl.read_parquet(io.BytesIO(data))), knn_passes

        def read_new(data: bytes) -> pl.DataFrame:
            scratch.write_bytes(data)
            return read_parquet(scratch)

        return read_new, knn_passes

    columns = ["image_id", "embedding"]

    def embedding_passes(read: pa.Table) -> bool:
        ids, vectors = embedding_arrays(read)
        expected = [f"00000/{i:09d}" for i in range(len(ids))]
        return all(o.passed for o in check_embeddings(list(ids), vectors, expected))

    if way == "old":
        return (lambda data: pq.read_table(io.BytesIO(data), columns=columns)), embedding_passes

    def read_checked(data: bytes) -> pa.Table:
        scratch.write_bytes(data)
        return read_arrow_table(scratch, columns)

    return read_checked, embedding_passes


def census_worker(kind: str, clean: Path, start: int) -> None:
    """Print `<position> <outcome>` for each page byte of `clean` from index `start` on.

    Run in a child process: polars' reader can abort the whole process on a damaged file
    (a failed allocation of exabytes), which the parent then counts for that position.
    """
    data = clean.read_bytes()
    read, passes = _reader(kind, clean.with_suffix(".damaged"))
    original = read(data)
    for position in _page_offsets(data)[start:]:
        damaged = bytearray(data)
        damaged[position] ^= 1 << (position % 8)
        try:
            value = read(bytes(damaged))
        except Exception:
            outcome = "error"
        except BaseException as error:  # polars panics: pyo3's PanicException
            if type(error).__name__ != "PanicException":
                raise
            outcome = "panic"
        else:
            outcome = (
                "same_data"
                if value.equals(original)
                else ("other_passing" if passes(value) else "other_data")
            )
        print(position, outcome, flush=True)


def _census(kind: str, clean: Path) -> dict[str, int]:
    """Flip one bit of each page byte of the table at `clean` and count the outcomes."""
    import subprocess
    import sys

    total = len(_page_offsets(clean.read_bytes()))
    counts = dict.fromkeys(_OUTCOMES, 0)
    done = 0
    env = {**os.environ, "RUST_BACKTRACE": "0"}
    while done < total:
        command = [sys.executable, "-m", "benchmarks.bench_table_checksums", "--census-worker"]
        child = subprocess.run(
            [*command, kind, str(clean), str(done)],
            capture_output=True,
            text=True,
            env=env,
            check=False,
        )
        lines = child.stdout.split()
        outcomes = lines[1::2]
        for outcome in outcomes:
            counts[outcome] += 1
        done += len(outcomes)
        if child.returncode != 0 and done < total:
            counts["process_abort"] += 1  # the flip at `done` killed the reader's process
            done += 1
    return {
        "flips": total,
        **counts,
        "other_data_total": counts["other_data"] + counts["other_passing"],
    }


def flip_census(folder: Path) -> dict[str, Any]:
    """The census of each table and way (see the module docstring)."""
    graph = knn_table(64, 20)
    legacy_graph, checked_graph = folder / "knn_old.parquet", folder / "knn_new.parquet"
    graph.write_parquet(legacy_graph, compression="zstd")  # the KNN step's writer before
    write_parquet_atomic(graph, checked_graph)
    table = embedding_table(64, 128, np.float16)
    legacy_table, checked_table = folder / "emb_old.parquet", folder / "emb_new.parquet"
    pq.write_table(table, legacy_table, use_dictionary=False)  # write_embedding_table today
    write_arrow_atomic(table, checked_table, use_dictionary=False)
    return {
        "knn_64x20": {
            "old": _census("knn_old", legacy_graph),
            "new": _census("knn_new", checked_graph),
        },
        "embedding_64x128_float16": {
            "old": _census("emb_old", legacy_table),
            "new": _census("emb_new", checked_table),
        },
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n")[0])
    parser.add_argument("--embedding-rows", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=768)
    parser.add_argument("--knn-queries", type=int, default=20_000)
    parser.add_argument("--k", type=int, default=50)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="small tables; writes nothing")
    parser.add_argument("--census-worker", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.census_worker:
        kind, clean, start = args.census_worker
        census_worker(kind, Path(clean), int(start))
        return
    if args.quick:
        args.embedding_rows, args.knn_queries, args.repeats = 2_000, 500, 1
    with tempfile.TemporaryDirectory(prefix="bench-checksums-") as scratch:
        folder = Path(scratch)
        result = {
            "options": parquet_write_options(),
            "embedding_tables": bench_embeddings(
                folder, args.embedding_rows, args.dim, args.repeats
            ),
            "knn_table": bench_knn(folder, args.knn_queries, args.k, args.repeats),
            "single_bit_flips": flip_census(folder),
            "load_average": os.getloadavg(),
        }
    for label, figures in result["embedding_tables"].items():
        print(f"embeddings {label} {figures['rows']}x{figures['dim']}, MB {figures['file_mb']}")
        print(f"  write s {figures['write_s']}\n  read s {figures['read_s']}")
        print(f"  ratios {figures['ratios']}")
    knn = result["knn_table"]
    print(f"knn {knn['rows']} rows, MB {knn['file_mb']}")
    print(f"  write s {knn['write_s']}\n  read s {knn['read_s']}\n  ratios {knn['ratios']}")
    for table, ways in result["single_bit_flips"].items():
        for way, counts in ways.items():
            print(f"flips {table} {way}: {counts}")
    print(f"load average {result['load_average']}")
    if not args.quick:
        print(f"wrote {write_result('table_checksums', result)}")


if __name__ == "__main__":
    main()
