"""The `paper` profile through the real Dagster assets, timed per asset.

    python -m benchmarks.paper_profile_assets --smoke           # tiny shapes on a CPU
    python -m benchmarks.paper_profile_assets --images 20000    # paper shapes on a GPU

`paper_profile_gpu` calls the stage logic directly; this builds the `paper` profile's own
Definitions and materializes corpus -> three embedding tables -> three KNN graphs -> mined pairs
as Dagster runs, with the profile's resources (batch sizes, workers from the machine,
`image_decode="auto"`, KNN backend "auto", the lineage catalog and the blocking asset checks).
Only what a machine without a model hub cannot have is swapped in: the corpus folder
(synthetic photo-like JPEGs with captions in webdataset shards, made here) and the three
encoders' weights (random, at the paper's shapes: open_clip `EVA02-L-14` image and text towers,
a DINOv2-large-shaped transformers model; saved to local files and read by the product loader).

Two runs: everything up to the KNN graphs, then `mined_image_pairs`. Between them each source's
band is set from its KNN scores: random weights do not put neighbours where trained ones do, so
the paper's (0.8, 0.96) is kept when at least 1% of the scores fall inside, else the source's
own 25th-75th percentile (recorded). Per-asset seconds are each step's start-to-success time in
the run's event log (one step per asset, all shards in it, as a backfill range runs).

Writes $OUT/paper_profile_assets.json (or benchmarks/results/; --smoke: the temp folder).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_common import (
    generate_shards,
    log,
    output_path,
    provide_minilm_package_if_missing,
)
from benchmarks.paper_profile_gpu import (
    PAPER_SHAPES,
    SMOKE_SHAPES,
    Shapes,
    band_for_random_weights,
    random_dinov2_dir,
    random_open_clip_checkpoint,
)
from megapairs_assets.embeddings.sources import SOURCE_NAMES

EXTRAPOLATE_IMAGES = 20_000_000
SMOKE = {"images": 240, "shard_images": 80, "image_size": (160, 120)}
UP_TO_KNN = (
    ["image_corpus"]
    + [f"{source}_embeddings" for source in SOURCE_NAMES]
    + [f"{source}_knn" for source in SOURCE_NAMES]
)
MINING = ["mined_image_pairs"]


def encoder_overrides(shapes: Shapes, models_dir: Path, device: Any) -> dict[str, Any]:
    """The paper profile's three encoders with random local weights at `shapes`."""
    from resources.encoders import EncoderResource

    checkpoint = random_open_clip_checkpoint(shapes.clip_model, models_dir, device)
    dino_dir = random_dinov2_dir(shapes, models_dir, device)
    return {
        "clip_image_encoder": EncoderResource(
            backend="open_clip_image",
            model=shapes.clip_model,
            pretrained=str(checkpoint),
            batch_size=shapes.image_batch,
            num_workers=None,
        ),
        "dino_image_encoder": EncoderResource(
            backend="dinov2", model=str(dino_dir), batch_size=shapes.image_batch, num_workers=None
        ),
        "caption_text_encoder": EncoderResource(
            backend="open_clip_text",
            model=shapes.clip_model,
            pretrained=str(checkpoint),
            batch_size=shapes.text_batch,
        ),
    }


def run_assets(defs: Any, instance: Any, assets: list[str], shards: list[str]) -> dict[str, Any]:
    """Materialize `assets` for every shard in one run; seconds per asset and check results."""
    import dagster as dg

    from megapairs_assets.orchestration.runs import shard_range_tags

    started = time.perf_counter()
    result = defs.resolve_job_def("mining_half").execute_in_process(
        instance=instance,
        tags=shard_range_tags(shards),
        asset_selection=[dg.AssetKey(name) for name in assets],
        run_config={"loggers": {"console": {"config": {"log_level": "WARNING"}}}},
        raise_on_error=False,
    )
    wall_s = time.perf_counter() - started
    step_start: dict[str, float] = {}
    step_seconds: dict[str, float] = {}
    failures: dict[str, str] = {}
    for entry in instance.all_logs(result.run_id):
        event = entry.dagster_event
        if event is None or entry.step_key is None:
            continue
        if event.event_type_value == "STEP_START":
            step_start[entry.step_key] = entry.timestamp
        elif event.event_type_value == "STEP_SUCCESS" and entry.step_key in step_start:
            step_seconds[entry.step_key] = round(entry.timestamp - step_start[entry.step_key], 2)
        elif event.event_type_value == "STEP_FAILURE":
            failures[entry.step_key] = str(event.event_specific_data.error.message)[:500]
    checks = {
        f"{evaluation.asset_key.to_user_string()}:{evaluation.check_name}": evaluation.passed
        for evaluation in result.get_asset_check_evaluations()
    }
    return {
        "success": result.success,
        "wall_s": round(wall_s, 2),
        "step_seconds": step_seconds,
        "failed_steps": failures,
        "checks_failed": sorted(name for name, passed in checks.items() if not passed),
        "checks_run": len(checks),
    }


def mining_bands(layout: Any, shards: list[str]) -> dict[str, Any]:
    """Per source: the band `band_for_random_weights` picks from its KNN scores."""
    import polars as pl

    bands: dict[str, Any] = {}
    for source in SOURCE_NAMES:
        tables = [layout.shard_table(f"{source}_knn", shard) for shard in shards]
        scores = pl.concat([pl.read_parquet(path, columns=["score"]) for path in tables])["score"]
        band, in_band = band_for_random_weights(scores)
        bands[source] = {"band": list(band), "fraction_in_paper_band": round(in_band, 4)}
    return bands


def table_rows(layout: Any, shards: list[str]) -> dict[str, int]:
    """Rows each asset wrote, over all shards (0 where a table is missing)."""
    import polars as pl

    def rows(path: Any) -> int:
        if not Path(path).exists():
            return 0
        return int(pl.scan_parquet(path).select(pl.len()).collect().item())

    counts = {"image_corpus": sum(rows(layout.corpus_images(shard)) for shard in shards)}
    for name in UP_TO_KNN[1:] + MINING:
        counts[name] = sum(rows(layout.shard_table(name, shard)) for shard in shards)
    return counts


def run(args: argparse.Namespace, scratch: Path) -> dict[str, Any]:
    import dagster as dg
    import torch

    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.lib.storage import DataLayout
    from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
    from resources.corpus import CorpusSourceResource
    from resources.mining import MiningResource

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    shapes = SMOKE_SHAPES if args.smoke else PAPER_SHAPES
    home, shards_dir = scratch / "home", scratch / "shards"
    record: dict[str, Any] = {
        "device": torch.cuda.get_device_name(0) if device.type == "cuda" else "cpu",
        "shapes": shapes.__dict__,
        "images": args.images,
        "shard_images": args.shard_images,
    }
    started = time.perf_counter()
    shards = generate_shards(shards_dir, args.images, args.image_size, args.shard_images)
    record["generate_shards_s"] = round(time.perf_counter() - started, 1)
    (home / "models").mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    overrides = encoder_overrides(shapes, home / "models", device)
    record["write_random_models_s"] = round(time.perf_counter() - started, 1)
    overrides["corpus_source"] = CorpusSourceResource(kind="webdataset", path=str(shards_dir))
    os.environ["MEGAPAIRS_SENSORS"] = "off"
    # A Dagster instance of its own, never the caller's $DAGSTER_HOME.
    os.environ["DAGSTER_HOME"] = str(home / "dagster")
    prepare_dagster_home(home)
    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, shards)
    defs = build_definitions("paper", home, resource_overrides=overrides)
    log(f"paper profile assets: {len(shards)} shards, up to the KNN graphs")
    record["up_to_knn"] = run_assets(defs, instance, UP_TO_KNN, shards)
    log(f"paper profile assets: {record['up_to_knn']}")
    layout = DataLayout(home)
    if record["up_to_knn"]["success"]:
        bands = mining_bands(layout, shards)
        record["mining_bands"] = bands
        mining = MiningResource(
            bands={source: value["band"] for source, value in bands.items()},
            targets_per_source=3,
            hard_negatives=5,
        )
        defs = build_definitions("paper", home, resource_overrides={**overrides, "mining": mining})
        record["mining"] = run_assets(defs, instance, MINING, shards)
        log(f"paper profile assets: {record['mining']}")
    record["rows"] = table_rows(layout, shards)
    seconds = {
        **record["up_to_knn"]["step_seconds"],
        **record.get("mining", {}).get("step_seconds", {}),
    }
    images = record["rows"]["image_corpus"]
    record["images_per_s"] = {
        step: round(images / value, 1) for step, value in seconds.items() if value > 0
    }
    # Every stage but KNN grows linearly with the corpus; exact KNN grows with its square, so
    # its hours at 20M come from the 1M x 1M run (gpu_knn), not from this small corpus.
    if images:
        record["extrapolated_20m_hours_linear_stages"] = {
            step: round(value * EXTRAPOLATE_IMAGES / images / 3600, 2)
            for step, value in seconds.items()
            if not step.endswith("_knn")
        }
    return record


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--smoke", action="store_true", help="tiny shapes and corpus, any device")
    parser.add_argument("--images", type=int, default=20_000)
    parser.add_argument("--shard-images", type=int, default=1000)
    parser.add_argument("--scratch", default=None, help="folder for shards, tables and models")
    args = parser.parse_args(argv)
    args.image_size = (512, 384)
    if args.smoke:
        args.images, args.shard_images = SMOKE["images"], SMOKE["shard_images"]
        args.image_size = SMOKE["image_size"]
    started = time.perf_counter()
    notes: list[str] = []
    provide_minilm_package_if_missing(notes)
    with tempfile.TemporaryDirectory(prefix="paper-assets-", dir=args.scratch) as scratch:
        os.environ["MEGAPAIRS_HOME"] = str(Path(scratch) / "home")
        record = run(args, Path(scratch))
    record["wall_s"] = round(time.perf_counter() - started, 1)
    record["notes"] = notes
    record["command"] = "python -m benchmarks.paper_profile_assets " + " ".join(sys.argv[1:])
    path = output_path("paper_profile_assets", args.smoke)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2, default=str))
    print(json.dumps(record, indent=2, default=str))
    log(f"wrote {path}")
    ok = record["up_to_knn"]["success"] and record.get("mining", {}).get("success", False)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
