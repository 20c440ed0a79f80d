"""Benchmark of what Dagster adds: one shard through the asset graph vs the plain calls.

    python -m benchmarks.bench_orchestration [--repeats 3] [--quick]

Both paths run the demo profile's mining half on the same one-shard webdataset corpus (a copy
of the bundled demo shard 00000: 64 clip-art images with captions), each with a fresh data root
and the same prebuilt demo models:

- through Dagster: `build_definitions("demo", home, resource_overrides=...)` with a
  `CorpusSourceResource` pointing at the temporary corpus, and the `mining_half` job's
  `execute_in_process` for that one partition on an ephemeral instance (console log level
  WARNING, as `megapairs demo --quiet`);
- directly: the stages' plain step functions the assets run (`build_corpus_shard`,
  `embed_shard`, `build_corpus_index` + `knn_shard`, `mine_shard`), each through
  `run_recorded` (the same catalog commit), with the same resources' settings: everything but
  Dagster itself.

Printed and saved: seconds of each path, the overhead (Dagster minus direct) and their ratio;
per asset, Dagster's step time next to the direct stage time; and how much of the overhead is
the lineage catalog (DuckDB writes and reads, timed inside the Dagster run). Paths alternate
`--repeats` times and each keeps its best run, so the first run's one-time imports do not land
on one side. Writes benchmarks/results/orchestration.json; `--quick` (one repeat, a 16-image
shard) writes nothing.
"""

from __future__ import annotations

import argparse
import io
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import dagster as dg

from benchmarks._machine import machine_info, write_result
from benchmarks.bench_embedding import code_commit
from megapairs_assets.corpus.step import build_corpus_shard
from megapairs_assets.definitions import build_definitions
from megapairs_assets.demo import DEMO_CORPUS_DIR
from megapairs_assets.demo.models import ensure_demo_models
from megapairs_assets.embeddings.sources import SOURCES
from megapairs_assets.embeddings.step import EmbeddingRun, embed_shard
from megapairs_assets.knn.step import build_corpus_index, knn_shard
from megapairs_assets.lib.step import run_recorded
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.mining.step import mine_shard
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.corpus import CorpusSourceResource
from resources.profiles import build_resources

SHARD = "00000"
QUICK_IMAGES = 16
LOG_LEVEL = "WARNING"
# Catalog methods that open DuckDB; `latest_materialization_ids` goes through `query`.
CATALOG_METHODS = ("begin", "complete", "query")


def copy_demo_shard(target_dir: Path, max_images: int | None) -> Path:
    """Copy the bundled demo shard (optionally only its first `max_images` samples)."""
    target_dir.mkdir(parents=True, exist_ok=True)
    source = DEMO_CORPUS_DIR / f"{SHARD}.tar"
    target = target_dir / f"{SHARD}.tar"
    keys: list[str] = []
    with tarfile.open(source) as reader, tarfile.open(target, mode="w") as writer:
        for member in reader:
            key = member.name.split(".", 1)[0]
            if key not in keys:
                if max_images is not None and len(keys) == max_images:
                    break
                keys.append(key)
            data = reader.extractfile(member)
            writer.addfile(member, io.BytesIO(data.read()) if data else None)
    return target_dir


def fresh_home(root: Path, name: str, models_dir: Path) -> Path:
    """A new data root sharing the prebuilt demo models (read only)."""
    home = root / name
    home.mkdir(parents=True)
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


# --- through Dagster ----------------------------------------------------------------------


@contextmanager
def catalog_timer() -> Iterator[dict[str, list[float]]]:
    """Time every lineage catalog access (DuckDB + file lock) while the block runs, by method."""
    seconds: dict[str, list[float]] = {name: [] for name in CATALOG_METHODS}
    originals = {name: getattr(LineageCatalog, name) for name in CATALOG_METHODS}

    def timed(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            start = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                seconds[name].append(time.perf_counter() - start)

        return wrapper

    for name, method in originals.items():
        setattr(LineageCatalog, name, timed(name, method))
    try:
        yield seconds
    finally:
        for name, method in originals.items():
            setattr(LineageCatalog, name, method)


def run_dagster(home: Path, corpus_dir: Path) -> dict[str, Any]:
    """Materialize the mining half for one shard through Dagster; seconds and per-step times."""
    started = time.perf_counter()
    defs = build_definitions(
        "demo",
        home,
        resource_overrides={
            "corpus_source": CorpusSourceResource(kind="webdataset", path=str(corpus_dir))
        },
    )
    job = defs.resolve_job_def("mining_half")
    definitions_s = time.perf_counter() - started
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, [SHARD])
    with catalog_timer() as catalog_seconds:
        started = time.perf_counter()
        result = job.execute_in_process(
            instance=instance,
            partition_key=SHARD,
            run_config={"loggers": {"console": {"config": {"log_level": LOG_LEVEL}}}},
            raise_on_error=False,
        )
        run_s = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"the Dagster run failed: {result.run_id}")
    steps = step_seconds(instance, result.run_id)
    return {
        "definitions_s": definitions_s,
        "run_s": run_s,
        "steps_s": steps,
        "outside_steps_s": run_s - sum(steps.values()),
        "catalog_s": sum(sum(found) for found in catalog_seconds.values()),
        "catalog_calls": sum(len(found) for found in catalog_seconds.values()),
        "catalog_by_method": {
            name: {"calls": len(found), "seconds": round(sum(found), 3)}
            for name, found in catalog_seconds.items()
            if found
        },
    }


def step_seconds(instance: dg.DagsterInstance, run_id: str) -> dict[str, float]:
    """Seconds from STEP_START to STEP_SUCCESS of every step of a run, by step key."""
    starts: dict[str, float] = {}
    seconds: dict[str, float] = {}
    kinds = {dg.DagsterEventType.STEP_START, dg.DagsterEventType.STEP_SUCCESS}
    for entry in instance.all_logs(run_id, of_type=kinds):
        event = entry.dagster_event
        if event is None or event.step_key is None:
            continue
        if event.event_type == dg.DagsterEventType.STEP_START:
            starts[event.step_key] = entry.timestamp
        else:
            seconds[event.step_key] = entry.timestamp - starts[event.step_key]
    return seconds


# --- directly -----------------------------------------------------------------------------


def run_direct(home: Path, corpus_dir: Path) -> dict[str, Any]:
    """The assets' plain step functions, called without Dagster (same catalog records)."""
    resources = build_resources("demo", home)
    layout = DataLayout(home)
    catalog = LineageCatalog(layout.catalog_path)
    device = resources["device"].torch_device()
    dtype = resources["device"].torch_dtype()
    source = CorpusSourceResource(kind="webdataset", path=str(corpus_dir))
    spec, limits = source.spec(), source.limits()
    stages: dict[str, float] = {}
    failed: list[str] = []
    run_started = time.perf_counter()

    def recorded(asset: str, step: Callable[[str], Any]) -> Any:
        started = time.perf_counter()
        result = run_recorded(
            step,
            SHARD,
            asset=asset,
            code_version="bench",
            run_id="direct",
            profile="demo",
            catalog=catalog,
        )
        stages[asset] = time.perf_counter() - started
        failed.extend(failures(result.outcomes))
        return result

    corpus = recorded(
        "image_corpus", lambda s: build_corpus_shard(s, spec, limits, layout, catalog, log)
    )
    for sim in SOURCES:
        encoder_resource = resources[sim.encoder_key]
        started = time.perf_counter()
        run = EmbeddingRun(
            sim,
            encoder_resource.load(device, dtype),
            encoder_resource.batch_size,
            encoder_resource.num_workers,
            device,
            dtype,
            limits,
        )
        load_s = time.perf_counter() - started
        recorded(sim.embedding_asset, lambda s, run=run: embed_shard(s, run, layout, catalog, log))
        stages[sim.embedding_asset] += load_s
    knn = resources["knn_index"]
    for sim in SOURCES:
        started = time.perf_counter()
        index = build_corpus_index(sim, [SHARD], knn.spec(), layout, catalog)
        build_s = time.perf_counter() - started
        recorded(sim.knn_asset, lambda s, index=index: knn_shard(s, index, knn.k, layout, log=log))
        stages[sim.knn_asset] += build_s
    params = resources["mining"].params()
    pairs = recorded("mined_image_pairs", lambda s: mine_shard(s, params, layout, catalog, log))
    return {
        "run_s": time.perf_counter() - run_started,
        "steps_s": stages,
        "images": corpus.row_count,
        "pairs": pairs.row_count,
        "failed_checks": failed,
    }


def failures(outcomes: list[Any]) -> list[str]:
    """Names of the checks that did not pass."""
    return [outcome.name for outcome in outcomes if not outcome.passed]


# --- the benchmark ------------------------------------------------------------------------


def run(repeats: int, max_images: int | None) -> dict[str, Any]:
    """Alternate both paths `repeats` times on fresh data roots; keep each path's best run."""
    dagster_runs: list[dict[str, Any]] = []
    direct_runs: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory(prefix="bench-orchestration-") as scratch:
        root = Path(scratch)
        corpus_dir = copy_demo_shard(root / "corpus", max_images)
        models_dir = root / "models"
        started = time.perf_counter()
        ensure_demo_models(models_dir)
        log(f"demo models built in {time.perf_counter() - started:.1f} s")
        for repeat in range(repeats):
            direct_runs.append(
                run_direct(fresh_home(root, f"direct-{repeat}", models_dir), corpus_dir)
            )
            log(f"[{repeat}] direct: {direct_runs[-1]['run_s']:.2f} s")
            dagster_runs.append(
                run_dagster(fresh_home(root, f"dagster-{repeat}", models_dir), corpus_dir)
            )
            log(f"[{repeat}] Dagster: {dagster_runs[-1]['run_s']:.2f} s")
    dagster = min(dagster_runs, key=lambda figures: figures["run_s"])
    direct = min(direct_runs, key=lambda figures: figures["run_s"])
    overhead_s = dagster["run_s"] - direct["run_s"]
    per_asset = [
        {
            "asset": asset,
            "dagster_step_s": round(dagster["steps_s"].get(asset, float("nan")), 3),
            "direct_s": round(direct_s, 3),
            "overhead_s": round(dagster["steps_s"].get(asset, float("nan")) - direct_s, 3),
        }
        for asset, direct_s in direct["steps_s"].items()
    ]
    return {
        "benchmark": "orchestration",
        "command": "python -m benchmarks.bench_orchestration " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "shard_images": direct["images"],
        "pairs": direct["pairs"],
        "repeats": repeats,
        "dagster_run_s": round(dagster["run_s"], 3),
        "dagster_definitions_s_not_counted": round(dagster["definitions_s"], 3),
        "direct_run_s": round(direct["run_s"], 3),
        "overhead_s": round(overhead_s, 3),
        "ratio_dagster_to_direct": round(dagster["run_s"] / direct["run_s"], 3),
        "overhead_lineage_catalog_s": round(dagster["catalog_s"], 3),
        "lineage_catalog_calls": dagster["catalog_calls"],
        "lineage_catalog_by_method": dagster["catalog_by_method"],
        "overhead_outside_steps_s": round(dagster["outside_steps_s"], 3),
        "per_asset": per_asset,
        "all_runs_s": {
            "dagster": [round(figures["run_s"], 3) for figures in dagster_runs],
            "direct": [round(figures["run_s"], 3) for figures in direct_runs],
        },
        "failed_checks_direct": direct["failed_checks"],
        "note": "shared 2-core machine; other jobs may have been running, timings are noisy",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
        "code_commit": code_commit(),
    }


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the summary."""
    print(message, file=sys.stderr, flush=True)


def print_summary(result: dict[str, Any]) -> None:
    """The figures a reader wants, on stdout."""
    print(
        f"one shard ({result['shard_images']} images, {result['pairs']} pairs), best of "
        f"{result['repeats']}: Dagster {result['dagster_run_s']:.2f} s, direct "
        f"{result['direct_run_s']:.2f} s, overhead {result['overhead_s']:.2f} s, ratio "
        f"{result['ratio_dagster_to_direct']:.2f}"
    )
    print(
        f"of the overhead: lineage catalog {result['overhead_lineage_catalog_s']:.2f} s "
        f"({result['lineage_catalog_calls']} calls), run outside any step "
        f"{result['overhead_outside_steps_s']:.2f} s; building the definitions "
        f"{result['dagster_definitions_s_not_counted']:.2f} s (not counted)"
    )
    by_method = ", ".join(
        f"{name} {figures['calls']} x {figures['seconds'] / figures['calls'] * 1e3:.0f} ms"
        for name, figures in result["lineage_catalog_by_method"].items()
    )
    print(f"lineage catalog calls: {by_method}")
    print(f"{'asset':>24} {'Dagster step s':>14} {'direct s':>9} {'overhead s':>10}")
    for row in result["per_asset"]:
        print(
            f"{row['asset']:>24} {row['dagster_step_s']:>14.3f} {row['direct_s']:>9.3f} "
            f"{row['overhead_s']:>10.3f}"
        )
    if result["failed_checks_direct"]:
        print(f"FAILED checks (direct path): {result['failed_checks_direct']}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print and (unless --quick) save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--repeats", type=int, default=3, help="alternating runs; best counts")
    parser.add_argument("--quick", action="store_true", help="tiny run for a CI smoke test")
    args = parser.parse_args(argv)
    result = run(1 if args.quick else args.repeats, QUICK_IMAGES if args.quick else None)
    print_summary(result)
    if not args.quick:
        print(f"wrote {write_result('orchestration', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
