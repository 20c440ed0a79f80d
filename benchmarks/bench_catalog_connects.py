"""How often, and how long, a pipeline run opens the lineage catalog per asset-partition.

    python -m benchmarks.bench_catalog_connects [--shards 11] [--assets 12] [--baseline COMMIT]
        [--quick]

A synthetic run shaped like the pipeline's: `--assets` shard-partitioned assets in a chain,
each partition through `run_recorded` (pending record, step, complete record with row lineage,
older attempts settled), and each partition's step reading its upstream partition's table with
`read_with_versions(..., required=True)` as `read_shard_table` does. It runs twice on a fresh
home each, in a subprocess each, alternating:

- baseline: the `megapairs_assets` package of `--baseline` (default: the commit before the
  catalog kept one database per thread and counted its generation), taken from git;
- current: this checkout.

Counted: catalog file opens (a `duckdb.connect` on the file, or an `ATTACH` of it to the kept
database), and wall seconds of the whole run; both per asset-partition. Also printed: the
current run's catalog time split into writes and reads. Writes
benchmarks/results/catalog_connects.json; `--quick` (3 shards x 3 assets) writes nothing.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
# The last commit whose catalog opened a new DuckDB database for every access.
BASELINE_COMMIT = "2929094"

# Runs in the subprocess: PYTHONPATH decides which megapairs_assets it measures.
_WORKER = r"""
import json, sys, time
from pathlib import Path

import duckdb
import polars as pl

from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lineage import catalog as cm

home, shards, assets = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
opens = {"n": 0}
real_connect = duckdb.connect


def connect(database=":memory:", *args, **kwargs):
    if str(database).endswith(".duckdb"):
        opens["n"] += 1
    return real_connect(database, *args, **kwargs)


duckdb.connect = connect
if hasattr(cm, "_attach"):
    real_attach = cm._attach

    def attach(*args, **kwargs):
        opens["n"] += 1
        return real_attach(*args, **kwargs)

    cm._attach = attach

ROWS = cm.register_row_table(
    cm.RowTable("bench_rows", (("item", "VARCHAR"), ("shard", "VARCHAR")), scope_column=None)
)
catalog = cm.LineageCatalog(home / "catalog.duckdb")
names = [f"asset_{i:02d}" for i in range(assets)]
keys = [f"{i:05d}" for i in range(shards)]


def table(asset, shard):
    return home / "data" / asset / f"{shard}.parquet"


def step_of(asset, upstream):
    def step(shard):
        versions = {}
        if upstream is not None:
            frame, read = cm.read_with_versions(
                catalog, upstream, [shard], lambda: pl.read_parquet(table(upstream, shard)),
                required=True,
            )
            versions = {f"{upstream}/{p}": v for p, v in read.items()}
        else:
            frame = pl.DataFrame({"item": [f"{shard}/{i}" for i in range(20)]})
        path = table(asset, shard)
        path.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(path)
        rows = frame.select("item").with_columns(pl.lit(shard).alias("shard"))
        return StepResult(shard, outputs={"table": path}, row_counts={"rows": frame.height},
                          input_versions=versions, rows={ROWS.name: rows})
    return step


catalog.query("SELECT 1")  # the schema, created once, is not part of the run
opens["n"] = 0
started = time.perf_counter()
for index, asset in enumerate(names):
    step = step_of(asset, names[index - 1] if index else None)
    for shard in keys:
        run_recorded(step, shard, asset=asset, code_version="v1", run_id="bench",
                     profile="bench", catalog=catalog)
seconds, opened = time.perf_counter() - started, opens["n"]
done = catalog.query("SELECT count(*) AS n FROM materializations WHERE status = 'complete'")
assert done["n"][0] == shards * assets, done
print(json.dumps({"opens": opened, "seconds": seconds}))
"""


def _baseline_tree(commit: str, into: Path) -> Path:
    """`megapairs_assets` as of `commit`, extracted under `into`."""
    archive = into / "baseline.tar"
    subprocess.run(
        ["git", "-C", str(REPO), "archive", "-o", str(archive), commit, "megapairs_assets"],
        check=True,
    )
    with tarfile.open(archive) as tar:
        tar.extractall(into / "tree", filter="data")
    return into / "tree"


def _run(source: Path, home: Path, shards: int, assets: int) -> dict[str, Any]:
    home.mkdir(parents=True)
    env = {**os.environ, "PYTHONPATH": str(source)}
    done = subprocess.run(
        [sys.executable, "-c", _WORKER, str(home), str(shards), str(assets)],
        env=env,
        cwd=home,
        capture_output=True,
        text=True,
        timeout=1800,
    )
    if done.returncode != 0:
        raise RuntimeError(f"worker on {source} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shards", type=int, default=11)
    parser.add_argument("--assets", type=int, default=12)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--baseline", default=BASELINE_COMMIT)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.shards, args.assets, args.repeats = 3, 3, 1
    partitions = args.shards * args.assets
    best: dict[str, dict[str, Any]] = {}
    with tempfile.TemporaryDirectory(prefix="bench-catalog-connects-") as tmp:
        root = Path(tmp)
        sources = {"baseline": _baseline_tree(args.baseline, root), "current": REPO}
        for repeat in range(args.repeats):
            for variant, source in sources.items():
                measured = _run(source, root / f"{variant}-{repeat}", args.shards, args.assets)
                print(
                    f"{variant:8s} run {repeat + 1}: {measured['opens']} opens, "
                    f"{measured['seconds']:.2f} s",
                    flush=True,
                )
                if variant not in best or measured["seconds"] < best[variant]["seconds"]:
                    best[variant] = measured
    per = {
        variant: {
            "opens_per_asset_partition": round(m["opens"] / partitions, 2),
            "seconds_per_asset_partition": round(m["seconds"] / partitions, 4),
            "opens": m["opens"],
            "seconds": round(m["seconds"], 3),
        }
        for variant, m in best.items()
    }
    ratio = best["baseline"]["seconds"] / best["current"]["seconds"]
    print(f"\n{args.shards} shards x {args.assets} assets = {partitions} asset-partitions")
    for variant, figures in per.items():
        print(
            f"  {variant:8s}: {figures['opens_per_asset_partition']:.2f} opens and "
            f"{figures['seconds_per_asset_partition'] * 1000:.1f} ms per asset-partition"
        )
    print(f"  baseline / current time: {ratio:.2f}x")
    if args.quick:
        return
    sys.path.insert(0, str(REPO))
    from benchmarks._machine import write_result

    path = write_result(
        "catalog_connects",
        {
            "shards": args.shards,
            "assets": args.assets,
            "asset_partitions": partitions,
            "repeats": args.repeats,
            "baseline_commit": args.baseline,
            "measured": per,
            "time_ratio_baseline_over_current": round(ratio, 2),
            "measured_at": time.strftime("%Y-%m-%dT%H:%M:%S"),
        },
    )
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
