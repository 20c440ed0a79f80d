"""A no-change re-run of the mining half, with the reuse of unchanged shards on and off.

    python -m benchmarks.bench_rerun [--part all|mining-half|knn] [--shards 8] [--per-shard 250]
        [--repeats 2] [--knn-vectors 50000] [--knn-dim 512] [--quick]

Part "mining-half":

A generated folder corpus (`python tests/image_factory.py OUT SHARDS PER_SHARD`: varied JPEGs
with captions, as the scale tests use) goes through the demo profile's `mining_half` job (corpus ->
three embedding tables -> three KNN graphs -> mined pairs) once, all shards in one run, as
`megapairs demo` runs them. Then the same job runs again on the same data root with nothing
changed, alternating `--repeats` times:

- reuse on (the default): an embedding shard whose inputs did not change keeps its table and
  its model is not loaded; a KNN shard whose corpus and settings did not change keeps its graph
  and the corpus index is not built (`reuse_unchanged` on each encoder and on `knn_index`);
- reuse off: both switches off, so every table is computed again (what a re-run cost before).

Each variant keeps its best run. Printed and saved: the job's wall seconds per variant, each
asset's step seconds (Dagster's STEP_START to STEP_SUCCESS), and the ratio off / on. The run
also checks that reuse on kept every embedding and KNN shard, reuse off kept none, and that
both left the same bytes in every table (the forced re-run wrote what the kept tables hold).

Part "knn": the KNN step alone at a size where its search costs something on a CPU:
`--knn-vectors` unit vectors of `--knn-dim` float16 over `--shards` embedding tables, written
as the embedding step writes them (footer key included), k=50 exact search as the paper
profile runs it. The plain step (`plan_knn_step`, each shard through `run_recorded`, as the
asset runs it) re-runs with nothing changed, reuse off against reuse on, best of `--repeats`;
the time to read the corpus state (every footer and the catalog versions) is reported apart.

Writes benchmarks/results/rerun.json; `--quick` (2 shards x 40 images; 4,000 KNN vectors; one
repeat) writes nothing.
"""

from __future__ import annotations

import argparse
import hashlib
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import dagster as dg
import numpy as np
import polars as pl

from benchmarks._machine import machine_info, write_result
from benchmarks.bench_embedding import code_commit
from benchmarks.bench_orchestration import fresh_home, step_seconds
from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.definitions import build_definitions
from megapairs_assets.demo.models import ensure_demo_models
from megapairs_assets.embeddings.compute import write_embedding_table
from megapairs_assets.embeddings.reuse import shard_reuse_key
from megapairs_assets.embeddings.reuse import stored_metadata as embedding_footer
from megapairs_assets.embeddings.sources import SOURCES, source_named
from megapairs_assets.knn.search import IndexSpec
from megapairs_assets.knn.step import KnnRun, plan_knn_step, read_corpus_state
from megapairs_assets.lib.step import run_recorded
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from megapairs_assets.orchestration.runs import shard_range_tags
from resources.corpus import CorpusSourceResource
from resources.encoders import EncoderResource
from resources.knn_index import FaissIndexResource
from resources.profiles import build_resources

JOB = "mining_half"
LOG_LEVEL = "WARNING"
IMAGE_FACTORY = Path(__file__).resolve().parents[1] / "tests" / "image_factory.py"
REUSING_ASSETS = [s.embedding_asset for s in SOURCES] + [s.knn_asset for s in SOURCES]
ASSET_ORDER = ["image_corpus", *REUSING_ASSETS, "mined_image_pairs"]


def write_corpus(folder: Path, shards: int, per_shard: int) -> CorpusSourceResource:
    """The generated folder corpus (one sub-folder per shard), through the image factory's
    command line."""
    subprocess.run(
        [sys.executable, str(IMAGE_FACTORY), str(folder), str(shards), str(per_shard)],
        check=True,
        stdout=subprocess.DEVNULL,
    )
    return CorpusSourceResource(kind="folder", path=str(folder))


def without_reuse(home: Path) -> dict[str, Any]:
    """Resource overrides that turn both reuse switches off (every table computed again)."""
    resources = build_resources("demo", home)
    overrides: dict[str, Any] = {}
    for source in SOURCES:
        encoder = resources[source.encoder_key]
        fields = {name: getattr(encoder, name) for name in EncoderResource.model_fields}
        overrides[source.encoder_key] = EncoderResource(**{**fields, "reuse_unchanged": False})
    index = resources["knn_index"]
    fields = {name: getattr(index, name) for name in FaissIndexResource.model_fields}
    overrides["knn_index"] = FaissIndexResource(**{**fields, "reuse_unchanged": False})
    return overrides


def run_job(
    defs: dg.Definitions, instance: dg.DagsterInstance, shards: list[str]
) -> dict[str, Any]:
    """One `mining_half` run over every shard: wall seconds, step seconds, reused shards."""
    started = time.perf_counter()
    result = defs.resolve_job_def(JOB).execute_in_process(
        instance=instance,
        tags=shard_range_tags(shards),
        run_config={"loggers": {"console": {"config": {"log_level": LOG_LEVEL}}}},
        raise_on_error=False,
    )
    run_s = time.perf_counter() - started
    if not result.success:
        raise RuntimeError(f"the {JOB} run failed: {result.run_id}")
    reused = {
        asset: sum(
            bool(event.metadata["reused"].value)
            for event in result.asset_materializations_for_node(asset)
            if "reused" in event.metadata
        )
        for asset in REUSING_ASSETS
    }
    return {"run_s": run_s, "steps_s": step_seconds(instance, result.run_id), "reused": reused}


def table_digest(home: Path) -> str:
    """One hash over every table the mining half wrote (name and bytes)."""
    digest = hashlib.sha256()
    for path in sorted((home / "data").rglob("*.parquet")):
        digest.update(str(path.relative_to(home)).encode())
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()[:16]


def run_mining_half(shards: int, per_shard: int, repeats: int) -> dict[str, Any]:
    """First run, then `repeats` alternating no-change re-runs with reuse on and off."""
    with tempfile.TemporaryDirectory(prefix="bench-rerun-") as scratch:
        root = Path(scratch)
        started = time.perf_counter()
        source = write_corpus(root / "corpus", shards, per_shard)
        shard_ids = source.shard_ids()
        log(
            f"corpus of {len(shard_ids)} shards x {per_shard} written in "
            f"{time.perf_counter() - started:.1f} s"
        )
        models_dir = root / "models"
        ensure_demo_models(models_dir)
        home = fresh_home(root, "home", models_dir)
        reuse_on = build_definitions("demo", home, {"corpus_source": source})
        reuse_off = build_definitions(
            "demo", home, {"corpus_source": source, **without_reuse(home)}
        )
        instance = dg.DagsterInstance.ephemeral()
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, shard_ids)

        first = run_job(reuse_on, instance, shard_ids)
        log(f"first run: {first['run_s']:.1f} s")
        digests = {"first": table_digest(home)}
        runs: dict[str, list[dict[str, Any]]] = {"on": [], "off": []}
        for repeat in range(repeats):
            for variant, defs in (("on", reuse_on), ("off", reuse_off)):
                figures = run_job(defs, instance, shard_ids)
                runs[variant].append(figures)
                digests[f"{variant}-{repeat}"] = table_digest(home)
                log(
                    f"[{repeat}] reuse {variant}: {figures['run_s']:.1f} s, "
                    f"reused {figures['reused']}"
                )
    best = {variant: min(found, key=lambda f: f["run_s"]) for variant, found in runs.items()}
    expected = len(shard_ids)
    per_asset = []
    for asset in ASSET_ORDER:
        on_s, off_s = best["on"]["steps_s"].get(asset), best["off"]["steps_s"].get(asset)
        per_asset.append(
            {
                "asset": asset,
                "first_run_s": round(first["steps_s"].get(asset, float("nan")), 3),
                "reuse_off_s": round(off_s, 3) if off_s is not None else None,
                "reuse_on_s": round(on_s, 3) if on_s is not None else None,
                "ratio_off_to_on": round(off_s / on_s, 2) if on_s and off_s else None,
                "shards_reused_on": best["on"]["reused"].get(asset),
                "shards_reused_off": best["off"]["reused"].get(asset),
            }
        )
    return {
        "shards": len(shard_ids),
        "images_per_shard": per_shard,
        "repeats": repeats,
        "first_run_s": round(first["run_s"], 3),
        "reuse_off_run_s": round(best["off"]["run_s"], 3),
        "reuse_on_run_s": round(best["on"]["run_s"], 3),
        "ratio_off_to_on": round(best["off"]["run_s"] / best["on"]["run_s"], 2),
        "per_asset": per_asset,
        "all_runs_s": {v: [round(f["run_s"], 3) for f in found] for v, found in runs.items()},
        "every_shard_reused_on": all(
            n == expected for f in runs["on"] for n in f["reused"].values()
        ),
        "no_shard_reused_off": all(n == 0 for f in runs["off"] for n in f["reused"].values()),
        "same_tables_after_every_run": len(set(digests.values())) == 1,
    }


KNN_SOURCE = source_named("clip_image")
KNN_K = 50
KNN_CODE_VERSION = "bench-knn"


def write_embedding_shards(layout: DataLayout, shards: int, vectors: int, dim: int) -> list[str]:
    """Random unit vectors in `shards` embedding tables, footers as the embedding step writes
    them, each recorded complete in the catalog."""
    catalog = LineageCatalog(layout.catalog_path)
    rng = np.random.default_rng(0)
    shard_ids = [f"{n:05d}" for n in range(shards)]
    for number, shard in enumerate(shard_ids):
        rows = vectors // shards + (1 if number < vectors % shards else 0)
        ids = [f"{shard}/{i:07d}" for i in range(rows)]
        frame = pl.DataFrame({"image_id": ids, "content_hash": ids})
        key = shard_reuse_key("bench", KNN_SOURCE.embedding_asset, "image", frame, ImageLimits())
        values = rng.standard_normal((rows, dim), dtype=np.float32)
        values /= np.linalg.norm(values, axis=1, keepdims=True)
        path = layout.shard_table(KNN_SOURCE.embedding_asset, shard)
        write_embedding_table(path, ids, values, "bench", metadata=embedding_footer(key, []))
        catalog.record(
            MaterializationRecord(
                KNN_SOURCE.embedding_asset, shard, "bench", "bench", "demo", utc_now(), 0
            )
        )
    return shard_ids


def knn_step_seconds(
    layout: DataLayout, shard_ids: list[str], reuse_unchanged: bool
) -> tuple[float, int]:
    """Seconds of one KNN step over every shard (plan, then each shard recorded), and how many
    shards kept their graphs."""
    catalog = LineageCatalog(layout.catalog_path)
    run = KnnRun(
        KNN_SOURCE,
        shard_ids,
        IndexSpec(kind="flat", backend="faiss"),
        KNN_K,
        code_version=KNN_CODE_VERSION,
        reuse_unchanged=reuse_unchanged,
    )
    started = time.perf_counter()
    step = plan_knn_step(shard_ids, run, layout, catalog, lambda _: None)
    results = [
        run_recorded(
            step,
            shard,
            asset=KNN_SOURCE.knn_asset,
            code_version=KNN_CODE_VERSION,
            run_id="bench",
            profile="demo",
            catalog=catalog,
        )
        for shard in shard_ids
    ]
    return time.perf_counter() - started, sum(bool(r.metadata["reused"]) for r in results)


def run_knn(shards: int, vectors: int, dim: int, repeats: int) -> dict[str, Any]:
    """The KNN step's no-change re-run, reuse off vs on (see the module docstring)."""
    with tempfile.TemporaryDirectory(prefix="bench-rerun-knn-") as scratch:
        layout = DataLayout(Path(scratch) / "home")
        shard_ids = write_embedding_shards(layout, shards, vectors, dim)
        first_s, _ = knn_step_seconds(layout, shard_ids, reuse_unchanged=True)
        log(f"KNN first run over {vectors} x {dim}: {first_s:.1f} s")
        times: dict[str, list[float]] = {"on": [], "off": []}
        reused: dict[str, list[int]] = {"on": [], "off": []}
        plan_s = []
        for repeat in range(repeats):
            for variant in ("on", "off"):
                seconds, kept = knn_step_seconds(layout, shard_ids, variant == "on")
                times[variant].append(seconds)
                reused[variant].append(kept)
                log(f"[{repeat}] KNN reuse {variant}: {seconds:.2f} s, {kept} shards kept")
            started = time.perf_counter()
            catalog = LineageCatalog(layout.catalog_path)
            read_corpus_state(KNN_SOURCE, shard_ids, layout, catalog)
            plan_s.append(time.perf_counter() - started)
    on_s, off_s = min(times["on"]), min(times["off"])
    return {
        "shards": shards,
        "vectors": vectors,
        "dim": dim,
        "k": KNN_K,
        "index": "flat, faiss (CPU)",
        "first_run_s": round(first_s, 3),
        "reuse_off_s": round(off_s, 3),
        "reuse_on_s": round(on_s, 3),
        "ratio_off_to_on": round(off_s / on_s, 1),
        "corpus_state_read_s": round(min(plan_s), 4),
        "all_runs_s": {v: [round(t, 3) for t in found] for v, found in times.items()},
        "every_shard_reused_on": all(n == shards for n in reused["on"]),
        "no_shard_reused_off": all(n == 0 for n in reused["off"]),
    }


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the summary."""
    print(message, file=sys.stderr, flush=True)


def print_summary(results: dict[str, Any]) -> None:
    """The figures a reader wants, on stdout."""
    if "mining_half" in results:
        print_mining_half(results["mining_half"])
    if "knn" in results:
        knn = results["knn"]
        print(
            f"KNN step alone, {knn['vectors']} x {knn['dim']} in {knn['shards']} shards, k="
            f"{knn['k']}, {knn['index']}, best of {results['repeats']}: reuse off "
            f"{knn['reuse_off_s']:.2f} s, reuse on {knn['reuse_on_s']:.3f} s, ratio "
            f"{knn['ratio_off_to_on']:.1f} (corpus footers and catalog versions read in "
            f"{knn['corpus_state_read_s'] * 1e3:.1f} ms); every shard kept with reuse on: "
            f"{knn['every_shard_reused_on']}, none with reuse off: {knn['no_shard_reused_off']}"
        )


def print_mining_half(result: dict[str, Any]) -> None:
    """The mining half's figures."""
    images = result["shards"] * result["images_per_shard"]
    print(
        f"no-change re-run of {JOB}, {result['shards']} shards / {images} images, best of "
        f"{result['repeats']}: reuse off {result['reuse_off_run_s']:.1f} s, reuse on "
        f"{result['reuse_on_run_s']:.1f} s, ratio {result['ratio_off_to_on']:.2f} "
        f"(first run {result['first_run_s']:.1f} s)"
    )
    print(f"{'asset':<24} {'first s':>8} {'off s':>8} {'on s':>8} {'off/on':>7}")
    for row in result["per_asset"]:
        ratio = row["ratio_off_to_on"]
        print(
            f"{row['asset']:<24} {row['first_run_s']:>8.2f} {row['reuse_off_s'] or 0:>8.2f} "
            f"{row['reuse_on_s'] or 0:>8.2f} {ratio if ratio is not None else '-':>7}"
        )
    print(
        f"every embedding/KNN shard reused with reuse on: {result['every_shard_reused_on']}; "
        f"none with reuse off: {result['no_shard_reused_off']}; same table bytes after every "
        f"run: {result['same_tables_after_every_run']}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--part", choices=["all", "mining-half", "knn"], default="all")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--knn-vectors", type=int, default=50_000)
    parser.add_argument("--knn-dim", type=int, default=512)
    parser.add_argument("--per-shard", type=int, default=250)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--quick", action="store_true", help="2 x 40 images, 1 repeat, no file")
    args = parser.parse_args()
    shards, per_shard, repeats = (args.shards, args.per_shard, args.repeats)
    knn_vectors = args.knn_vectors
    if args.quick:
        shards, per_shard, repeats, knn_vectors = 2, 40, 1, 4000
    results: dict[str, Any] = {
        "benchmark": "rerun",
        "command": "python -m benchmarks.bench_rerun " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "repeats": repeats,
    }
    if args.part in ("all", "mining-half"):
        results["mining_half"] = run_mining_half(shards, per_shard, repeats)
    if args.part in ("all", "knn"):
        results["knn"] = run_knn(shards, knn_vectors, args.knn_dim, repeats)
    results.update(
        {
            "note": "shared 2-core machine; other jobs may have been running, timings are noisy",
            "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
            "code_commit": code_commit(),
        }
    )
    print_summary(results)
    if not args.quick:
        name = "rerun" if args.part == "all" else f"rerun_{args.part.replace('-', '_')}"
        print(f"wrote {write_result(name, results)}")


if __name__ == "__main__":
    main()
