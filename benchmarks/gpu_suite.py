"""One command for the GPU machine: the paper profile end to end, and each stage's ceiling.

    bash benchmarks/gpu_suite.sh                 # = python -m benchmarks.gpu_suite
    python -m benchmarks.gpu_suite --check-env   # versions and devices only, seconds
    python -m benchmarks.gpu_suite --smoke       # the same code at tiny sizes on a CPU

Sections, each recorded as figures, "skipped: <reason>" or "failed: <error>", never fatal:

1. knn (benchmarks/gpu_knn.py): the product's exact torch KNN on 1M x 768, all against all,
   against its own matrix products alone;
2. corpus: N photo-like JPEGs with captions written as webdataset shards on every core, then
   the corpus stage (`build_shard_table` per shard) into the data layout the assets use;
3. embedding (benchmarks/gpu_embedding.py): ViT-L-14 bf16 end to end (JPEGs decoded on the
   GPU) against its forward pass alone, batch-size variants, the old CPU-decode path;
4. paper_profile (benchmarks/paper_profile_gpu.py): EVA02-L-14 image + text towers and a
   DINOv2-large shaped model, three KNN graphs, mining, per-stage times;
5. extrapolation: the hours 20M images would take per stage on this one GPU.

Stops starting new work after --budget-s seconds so the run ends inside the device's limit.
Results: $OUT/gpu_suite.json when $OUT is set, else benchmarks/results/gpu_suite.json,
rewritten after every section; --smoke writes gpu_suite_smoke.json ($OUT or the temp folder).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_common import (
    Suite,
    environment,
    generate_shards,
    log,
    output_path,
    provide_minilm_package_if_missing,
)

SMOKE = {
    "images": 96,
    "shard_images": 32,
    "image_size": "160x120",
    "model": "megapairs-tiny-clip",
    "batch_size": 16,
    "workers": 2,
    "forward_images": 64,
    "cpu_decode_rows": 64,
    "compare_rows": 48,
    "knn_vectors": 6000,
    "knn_dim": 64,
    "knn_queries": 6000,
    "knn_frame_queries": 2000,
    "reserve_s": 0.0,
}
EXTRAPOLATE_IMAGES = 20_000_000


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    """Command-line options; --smoke replaces the sizes with tiny ones."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--check-env", action="store_true", help="print the environment, stop")
    parser.add_argument("--smoke", action="store_true", help="tiny sizes on the CPU")
    parser.add_argument("--budget-s", type=float, default=330.0, help="no new work after this")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--shard-images", type=int, default=1000)
    parser.add_argument("--image-size", default="512x384")
    parser.add_argument("--model", default="ViT-L-14")
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--workers", type=int, default=12, help="CPU-decode workers")
    parser.add_argument("--device-workers", type=int, default=4, help="reader threads")
    parser.add_argument(
        "--image-decode", default="device", help="the paper profile's image_decode setting"
    )
    parser.add_argument("--forward-images", type=int, default=8192)
    parser.add_argument("--cpu-decode-rows", type=int, default=10_000)
    parser.add_argument("--compare-rows", type=int, default=4096, help="device vs cpu decode")
    parser.add_argument("--knn-vectors", type=int, default=1_000_000)
    parser.add_argument("--knn-dim", type=int, default=768)
    parser.add_argument("--knn-queries", type=int, default=1_000_000)
    parser.add_argument("--knn-frame-queries", type=int, default=100_000)
    parser.add_argument(
        "--reserve-s", type=float, default=150.0, help="budget kept for the paper profile"
    )
    parser.add_argument("--sections", default="knn,embedding,paper_profile")
    parser.add_argument("--scratch", default=None, help="folder for shards, tables and models")
    args = parser.parse_args(argv)
    if args.smoke:
        for name, value in SMOKE.items():
            setattr(args, name, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Check the environment, run each section inside the budget, write the JSON."""
    args = parse_args(argv)
    suite = Suite(output_path("gpu_suite", args.smoke), args.budget_s)
    env = environment()
    for key, value in env.items():
        log(f"env {key}: {value}")
    notes: list[str] = []
    from benchmarks._machine import machine_info

    suite.results.update(
        {
            "machine": machine_info(),
            "environment": env,
            "smoke": args.smoke,
            "command": "python -m benchmarks.gpu_suite " + " ".join(sys.argv[1:]),
            "notes": notes,
        }
    )
    if args.check_env:
        suite.save()
        return 0
    if not args.smoke and not env.get("cuda_available"):
        notes.append("no CUDA device visible: nothing to measure (use --smoke on a CPU)")
        suite.save()
        log(notes[-1])
        return 1
    provide_minilm_package_if_missing(notes)
    wanted = set(args.sections.split(","))
    with tempfile.TemporaryDirectory(prefix="gpu-suite-", dir=args.scratch) as scratch:
        run_sections(suite, args, Path(scratch), wanted)
    suite.save()
    print_summary(suite.results)
    log(f"wrote {suite.output_path} after {suite.results['suite_wall_s']} s")
    return 0


def run_sections(suite: Suite, args: argparse.Namespace, scratch: Path, wanted: set[str]) -> None:
    """The sections in order; each is skipped when the budget cannot hold it."""
    from benchmarks.bench_embedding import parse_size
    from benchmarks.gpu_embedding import embedding_section
    from benchmarks.gpu_knn import knn_section
    from benchmarks.paper_profile_gpu import corpus_stage, extrapolate_to, paper_profile_section

    sections = suite.results["sections"]
    if "knn" in wanted:
        with suite.section("knn", 30) as record:
            if record is not None:
                knn_section(record, args, suite)
    shards: list[str] = []
    home, shards_dir = scratch / "home", scratch / "shards"
    with suite.section("corpus", 30) as record:
        if record is not None:
            started = time.perf_counter()
            shards = generate_shards(
                shards_dir, args.images, parse_size(args.image_size), args.shard_images
            )
            record["generate_s"] = round(time.perf_counter() - started, 1)
            record["image_size_px"] = args.image_size
            log(f"corpus: generated {args.images} JPEGs in {record['generate_s']} s")
            record.update(corpus_stage(shards_dir, shards, home, processes=_cores()))
            log(f"corpus: {record}")
    if not shards:
        return
    if "embedding" in wanted:
        with suite.section("embedding", args.reserve_s + 40) as record:
            if record is not None:
                embedding_section(record, args, suite, _corpus_rows(home, shards), scratch)
    if "paper_profile" in wanted:
        with suite.section("paper_profile", 60) as record:
            if record is not None:
                paper_profile_section(record, args, shards_dir, shards, home, save=suite.save)
    paper = sections.get("paper_profile", {})
    if "embeddings" in paper and isinstance(sections.get("corpus"), dict):
        knn = sections.get("knn") if isinstance(sections.get("knn"), dict) else None
        sections["extrapolation"] = extrapolate_to(
            EXTRAPOLATE_IMAGES, sections["corpus"], paper, knn
        )


def _corpus_rows(home: Path, shards: list[str]) -> Any:
    import polars as pl

    from megapairs_assets.lib.storage import DataLayout

    layout = DataLayout(home)
    return pl.concat([pl.read_parquet(layout.corpus_images(shard)) for shard in shards])


def _cores() -> int:
    import os

    return len(os.sched_getaffinity(0))


def print_summary(results: dict[str, Any]) -> None:
    """The headline figures at the very end of the output, where a caller's tail shows them."""
    sections = results["sections"]
    print("=== gpu_suite summary ===", flush=True)
    print(f"gpu: {results['environment'].get('gpu')}; smoke: {results['smoke']}")
    knn = sections.get("knn", {})
    print(f"knn: {knn.get('status')}")
    for key in (
        "config",
        "block_plan",
        "build_torch_index_s",
        "matmul_only_s",
        "search_torch_index_s",
        "ratio_search_to_matmul_only",
        "ceiling_s",
        "accuracy",
        "search_neighbors",
    ):
        if key in knn:
            print(f"  {key}: {knn[key]}")
    corpus = sections.get("corpus", {})
    print(f"corpus: {corpus.get('status')} {corpus.get('images_per_s')} images/s")
    embedding = sections.get("embedding", {})
    print(f"embedding: {embedding.get('status')}")
    for key in (
        "forward_only_by_batch",
        "ceiling_images_per_s",
        "forward_only_mfu",
        "end_to_end_device_decode",
        "input_only_device_decode",
        "end_to_end_cpu_decode",
        "ratio_end_to_end_to_forward_only",
        "device_vs_cpu_decode",
    ):
        if key in embedding:
            value = embedding[key]
            if isinstance(value, dict) and "images_per_s" in value:
                value = (
                    f"{value['images_per_s']} images/s ({value.get('ratio_to_forward_only')}; "
                    f"without the table write {value.get('embed_rows_ratio_to_forward_only')})"
                )
            elif key == "forward_only_by_batch":
                value = {size: figures["images_per_s"] for size, figures in value.items()}
            print(f"  {key}: {value}")
    paper = sections.get("paper_profile", {})
    print(f"paper_profile: {paper.get('status')}")
    for stage in ("embeddings", "knn", "mining"):
        figures = paper.get(stage, {})
        print(f"  {stage}: {figures.get('stage_s')} s")
        for source, values in figures.items():
            if isinstance(values, dict) and source != "bands":
                brief = {
                    key: values[key]
                    for key in (
                        "items_per_s",
                        "queries_per_s",
                        "ratio_to_forward_only",
                        "seconds",
                        "load_s",
                        "device_decoded",
                    )
                    if key in values
                }
                print(f"    {source}: {brief}")
    print(f"extrapolation: {sections.get('extrapolation')}", flush=True)


if __name__ == "__main__":
    raise SystemExit(main())
