"""The paper profile end to end at the paper's model shapes, stage by stage, on one GPU.

    python -m benchmarks.gpu_suite            # runs this as its "paper_profile" section
    python -m benchmarks.gpu_suite --smoke    # the same code at tiny sizes on a CPU

corpus -> three embedding tables -> three KNN graphs -> mined pairs, through the product's own
stage logic (corpus/table.py, embeddings/compute.py, knn/search.py, mining/pairs.py) with the
data layout the assets use, on synthetic webdataset shards (photo-like JPEGs with captions)
generated on the machine:

- corpus: `build_shard_table` per shard, shards in parallel processes (as Dagster's
  multiprocess executor runs partitions), tables written with `write_parquet_atomic`;
- embeddings: open_clip `EVA02-L-14` image tower (I) and text tower (T) and a DINOv2-large
  shaped transformers model (D), random weights saved to local files first and read back by
  the product loader (`load_encoder`: nothing can be downloaded there), bfloat16; each
  table's forward alone on decoded batches is timed too, as its ceiling;
- KNN: `build_index` + `search_neighbors` per source and shard (IndexSpec(kind="flat"),
  backend "auto": torch on a GPU without faiss-gpu), K=50, checked with `check_knn`;
- mining: `mine_pairs` + `check_pairs` per shard. Random-weight models do not place scores
  where trained ones do, so each source's band is the paper's (0.8, 0.96) when at least 1% of
  its neighbour scores fall in it, else its own 25th-75th percentile (recorded).

Per-stage seconds and rates go into the suite's JSON; `extrapolate_to` turns them into the
hours 20M images would take on this GPU.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.gpu_common import (
    TOWER_GFLOP,
    dense_peak_tflops,
    gpu_name,
    log,
    matmul_tflops,
    synchronize,
)
from megapairs_assets.demo.models import DINOV2_TINY_CONFIG, IMAGENET_MEAN, IMAGENET_STD
from megapairs_assets.embeddings.sources import PAPER_BAND

KNN_K = 50
MIN_IN_BAND_FRACTION = 0.01
FORWARD_BATCHES = 4
DINOV2_LARGE = {
    "hidden_size": 1024,
    "num_hidden_layers": 24,
    "num_attention_heads": 16,
    "mlp_ratio": 4,
    "patch_size": 14,
    "image_size": 518,
}
DINOV2_TINY = DINOV2_TINY_CONFIG


@dataclass(frozen=True)
class Shapes:
    """The models and batch sizes of one run (paper shapes on a GPU, tiny ones on a CPU)."""

    clip_model: str
    dino_config: dict[str, int]
    dino_resize_px: int
    dino_crop_px: int
    image_batch: int
    text_batch: int


PAPER_SHAPES = Shapes("EVA02-L-14", DINOV2_LARGE, 256, 224, 512, 2048)
SMOKE_SHAPES = Shapes("megapairs-tiny-clip", DINOV2_TINY, 112, 98, 16, 64)


# --- corpus -------------------------------------------------------------------------------


def _corpus_shard(task: tuple[str, str, str]) -> tuple[str, int, int]:
    """Process-pool task: the corpus stage's work for one shard."""
    from megapairs_assets.corpus.images import ImageLimits
    from megapairs_assets.corpus.sources import SourceSpec, iter_shard_records
    from megapairs_assets.corpus.table import build_shard_table
    from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic

    shards_dir, shard, home = task
    spec, layout = SourceSpec(kind="webdataset", path=shards_dir), DataLayout(Path(home))
    images, quarantine = build_shard_table(shard, iter_shard_records(spec, shard), ImageLimits())
    write_parquet_atomic(images, layout.corpus_images(shard))
    write_parquet_atomic(quarantine, layout.corpus_quarantine(shard))
    return shard, images.height, quarantine.height


def corpus_stage(shards_dir: Path, shards: list[str], home: Path, processes: int) -> dict:
    """Validate every shard into corpus tables, shards in parallel spawned processes."""
    started = time.perf_counter()
    tasks = [(str(shards_dir), shard, str(home)) for shard in shards]
    # Spawned, not forked: the parent already holds CUDA and polars' thread pool.
    with multiprocessing.get_context("spawn").Pool(min(processes, len(tasks))) as pool:
        counts = pool.map(_corpus_shard, tasks)
    seconds = time.perf_counter() - started
    images = sum(count for _, count, _ in counts)
    return {
        "shards": len(shards),
        "images": images,
        "quarantined": sum(bad for _, _, bad in counts),
        "processes": min(processes, len(tasks)),
        "seconds": round(seconds, 2),
        "images_per_s": round(images / seconds, 1),
    }


# --- models with random weights, read back by the product loader ---------------------------


def random_open_clip_checkpoint(model_name: str, folder: Path, device: Any) -> Path:
    """Save a randomly initialised open_clip model's weights to a local file."""
    from benchmarks.bench_embedding import write_random_checkpoint

    path = folder / f"{model_name}-random.pt"
    write_random_checkpoint(model_name, path, device)
    return path


def random_dinov2_dir(shapes: Shapes, folder: Path, device: Any) -> Path:
    """Save a randomly initialised DINOv2 of the given shape and its processor, HF layout."""
    import torch
    from transformers import BitImageProcessor, Dinov2Config, Dinov2Model

    model_dir = folder / "dinov2-random"
    with torch.device(device):
        model = Dinov2Model(Dinov2Config(**shapes.dino_config))
    model.to(torch.bfloat16 if device.type == "cuda" else torch.float32).save_pretrained(model_dir)
    BitImageProcessor(
        do_resize=True,
        size={"shortest_edge": shapes.dino_resize_px},
        resample=3,  # bicubic, as the real facebook/dinov2-* processors
        do_center_crop=True,
        crop_size={"height": shapes.dino_crop_px, "width": shapes.dino_crop_px},
        do_rescale=True,
        rescale_factor=1 / 255,
        do_normalize=True,
        image_mean=IMAGENET_MEAN,
        image_std=IMAGENET_STD,
        do_convert_rgb=True,
    ).save_pretrained(model_dir)
    return model_dir


def load_on_device(spec: Any, device: Any, dtype: Any) -> Any:
    """`load_encoder`, with the model's random initialisation (before the checkpoint replaces
    it) done on the device: a CPU needs tens of seconds for an EVA02-L."""
    import torch

    from megapairs_assets.embeddings.encoders import load_encoder

    try:
        with torch.device(device):
            return load_encoder(spec, device, dtype)
    except Exception as exc:  # initialising on the device is a shortcut, never a requirement
        log(f"loading under the device default failed ({exc}); loading plainly")
        return load_encoder(spec, device, dtype)


# --- stages after the corpus ----------------------------------------------------------------


def embedding_stage(
    record: dict[str, Any],
    shapes: Shapes,
    shards: list[str],
    home: Path,
    device: Any,
    dtype: Any,
    image_decode: str = "device",
) -> None:
    """The three embedding tables: all shards through one `embed_row_groups` stream."""
    import numpy as np
    import polars as pl
    import torch

    from benchmarks.bench_embedding import preprocessed_batches, time_forward_only
    from megapairs_assets.corpus.images import ImageLimits
    from megapairs_assets.embeddings.compute import (
        check_embeddings,
        embed_row_groups,
        write_embedding_table,
    )
    from megapairs_assets.embeddings.encoders import EncoderSpec
    from megapairs_assets.lib.storage import DataLayout

    layout, limits = DataLayout(home), ImageLimits()
    models_dir = home / "models"
    models_dir.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    checkpoint = random_open_clip_checkpoint(shapes.clip_model, models_dir, device)
    dino_dir = random_dinov2_dir(shapes, models_dir, device)
    record["write_random_models_s"] = round(time.perf_counter() - started, 1)
    tables = (
        ("clip_image", EncoderSpec("open_clip_image", shapes.clip_model, str(checkpoint))),
        ("dino_image", EncoderSpec("dinov2", str(dino_dir))),
        ("caption_text", EncoderSpec("open_clip_text", shapes.clip_model, str(checkpoint))),
    )
    peak = dense_peak_tflops(gpu_name())
    if device.type == "cuda":
        # EVA02-L's gated MLP is 2730 wide, not a multiple of 8: how its products run on this
        # card next to the same products 2736 wide (tokens of one 512-image batch).
        tokens = 512 * 257
        record["mlp_gemm_tflops"] = {
            f"{inner}x{outer}": matmul_tflops(tokens, inner, outer, device, dtype)
            for inner, outer in ((1024, 2730), (1024, 2736), (2730, 1024), (2736, 1024))
        }
        log(f"paper profile: MLP products {record['mlp_gemm_tflops']}")
    for source, spec in tables:
        figures: dict[str, Any] = {"model": spec.model if source != "dino_image" else "dinov2"}
        record[source] = figures
        started = time.perf_counter()
        encoder = load_on_device(spec, device, dtype)
        figures["load_s"] = round(time.perf_counter() - started, 1)
        batch_size = shapes.text_batch if encoder.modality == "text" else shapes.image_batch
        first = pl.read_parquet(layout.corpus_images(shards[0]))
        if encoder.modality == "image":
            batches = preprocessed_batches(
                first, encoder, limits, batch_size, 8, device, max_batches=FORWARD_BATCHES
            )
            figures["forward_only"] = time_forward_only(
                encoder, batches, device, dtype, passes=4, autocast=False
            )
            with torch.inference_mode():
                raw = encoder.encode_images(batches[0])
            # Rows a random-weight model turns into NaN or inf, on CPU-decoded input.
            figures["forward_nonfinite_rows"] = int((~torch.isfinite(raw).all(dim=1)).sum())
            if device.type == "cuda" and source == "clip_image":
                figures["unpadded_mlp"] = unpadded_mlp_comparison(spec, batches, raw, device, dtype)
            del batches, raw
        rows_done, device_decoded, nonfinite, failed = 0, 0, 0, set()
        # All shards through one input stream, as the asset's `embed_shards` runs them.
        groups = [(shard, pl.read_parquet(layout.corpus_images(shard))) for shard in shards]
        stage_started = time.perf_counter()
        for shard, result in embed_row_groups(
            groups, encoder, limits, batch_size, None, device, image_decode=image_decode
        ):
            write_embedding_table(
                layout.shard_table(f"{source}_embeddings", shard),
                result.ids,
                result.vectors,
                encoder.model_id,
            )
            rows_done += len(result.ids)
            device_decoded += result.device_decoded
            nonfinite += int((~np.isfinite(result.vectors).all(axis=1)).sum())
            failed |= {
                c.name
                for c in check_embeddings(result.ids, result.vectors, result.ids)
                if not c.passed
            }
        seconds = time.perf_counter() - stage_started
        figures.update(
            {
                "rows": rows_done,
                "batch_size": batch_size,
                "seconds": round(seconds, 2),
                "items_per_s": round(rows_done / seconds, 1),
                "device_decoded": device_decoded,
                "nonfinite_rows": nonfinite,
                "failed_checks": sorted(failed),
            }
        )
        forward = figures.get("forward_only")
        if forward:
            figures["ratio_to_forward_only"] = round(
                figures["items_per_s"] / forward["images_per_s"], 3
            )
            gflop = TOWER_GFLOP.get("dinov2-large" if source == "dino_image" else shapes.clip_model)
            if gflop and peak and device.type == "cuda":
                figures["forward_only_mfu"] = round(
                    forward["images_per_s"] * gflop / (peak * 1e3), 3
                )
        log(f"paper profile: {source} {figures}")
        del encoder
        gc.collect()
        if device.type == "cuda":
            torch.cuda.empty_cache()


def unpadded_mlp_comparison(
    spec: Any, batches: list[Any], padded_raw: Any, device: Any, dtype: Any
) -> dict[str, Any]:
    """The same tower loaded without `mlp_padding` (EVA02's 2730-wide MLPs as they are): its
    forward-only rate, and how close its outputs are to the padded model's on one batch."""
    import torch

    from benchmarks.bench_embedding import time_forward_only
    from megapairs_assets.embeddings import encoders

    encoders.PAD_MLP_WIDTHS_ON_CUDA = False
    try:
        encoder = load_on_device(spec, device, dtype)
        figures: dict[str, Any] = time_forward_only(
            encoder, batches, device, dtype, passes=4, autocast=False
        )
        with torch.inference_mode():
            raw = encoder.encode_images(batches[0]).float()
        padded = padded_raw.float()
        finite = torch.isfinite(raw).all(dim=1) & torch.isfinite(padded).all(dim=1)
        cosine = torch.nn.functional.cosine_similarity(raw[finite], padded[finite], dim=1)
        figures["min_cosine_to_padded"] = round(float(cosine.min()), 6) if finite.any() else None
        del encoder
    finally:
        encoders.PAD_MLP_WIDTHS_ON_CUDA = True
    log(f"paper profile: EVA02 image tower without MLP padding {figures}")
    return figures


def knn_stage(record: dict[str, Any], shards: list[str], home: Path) -> None:
    """The three KNN graphs: each shard's images against the whole corpus, per source."""
    import numpy as np
    import polars as pl

    from megapairs_assets.embeddings.compute import read_embedding_table
    from megapairs_assets.knn.search import (
        IndexSpec,
        build_index,
        check_knn,
        describe_backend,
        search_neighbors,
    )
    from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic

    layout, spec = DataLayout(home), IndexSpec(kind="flat")
    record["backend"] = describe_backend(spec)
    for source in ("clip_image", "dino_image", "caption_text"):
        started = time.perf_counter()
        tables = [
            read_embedding_table(layout.shard_table(f"{source}_embeddings", s)) for s in shards
        ]
        ids = np.concatenate([table_ids for table_ids, _ in tables])
        vectors = np.concatenate([table_vectors for _, table_vectors in tables])
        index = build_index(vectors, spec)
        build_s = time.perf_counter() - started
        failed, edges, scores, offset = set(), 0, [], 0
        for shard, (shard_ids, _) in zip(shards, tables, strict=True):
            rows = np.arange(offset, offset + len(shard_ids))
            offset += len(shard_ids)
            frame = search_neighbors(index, ids, vectors[rows], ids[rows], KNN_K, spec)
            write_parquet_atomic(frame, layout.shard_table(f"{source}_knn", shard))
            failed |= {c.name for c in check_knn(frame, KNN_K) if not c.passed}
            edges += frame.height
            scores.append(frame["score"])
        seconds = time.perf_counter() - started
        all_scores = pl.concat(scores)
        record[source] = {
            "vectors": len(ids),
            "dim": int(vectors.shape[1]),
            "load_and_build_s": round(build_s, 2),
            "seconds": round(seconds, 2),
            "queries_per_s": round(len(ids) / seconds, 1),
            "edges": edges,
            "failed_checks": sorted(failed),
            "score_quantiles": {
                str(q): round(float(all_scores.quantile(q)), 4)
                for q in (0.01, 0.25, 0.5, 0.75, 0.99)
            },
        }
        log(f"paper profile: {source}_knn {record[source]}")
        del index


def mining_stage(
    record: dict[str, Any], knn: dict[str, Any], shards: list[str], home: Path
) -> None:
    """Mined pairs per shard from the three KNN graphs."""
    import polars as pl

    from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
    from megapairs_assets.mining.pairs import MiningParams, check_pairs, mine_pairs

    layout = DataLayout(home)
    sources = [source for source, figures in knn.items() if isinstance(figures, dict)]
    bands = {source: _band(layout, source, shards) for source in sources}
    params = MiningParams(bands=bands)
    record["bands"] = {source: list(band) for source, band in bands.items()}
    started = time.perf_counter()
    pairs_total, failed, queries = 0, set(), 0
    for shard in shards:
        neighbors = {s: pl.read_parquet(layout.shard_table(f"{s}_knn", shard)) for s in bands}
        queries += neighbors["clip_image"]["query_id"].n_unique()
        pairs = mine_pairs(neighbors, params)
        write_parquet_atomic(pairs, layout.shard_table("mined_image_pairs", shard))
        failed |= {c.name for c in check_pairs(pairs, params) if not c.passed}
        pairs_total += pairs.height
    seconds = time.perf_counter() - started
    record.update(
        {
            "queries": queries,
            "pairs": pairs_total,
            "seconds": round(seconds, 2),
            "queries_per_s": round(queries / seconds, 1),
            "failed_checks": sorted(failed),
        }
    )
    log(f"paper profile: mining {record}")


def _band(layout: Any, source: str, shards: list[str]) -> tuple[float, float]:
    import polars as pl

    scores = pl.read_parquet(layout.shard_table(f"{source}_knn", shards[0]))["score"]
    return band_for_random_weights(scores)[0]


def band_for_random_weights(scores: Any) -> tuple[tuple[float, float], float]:
    """A source's mining band for random-weight models, and the share of `scores` in the
    paper's: the paper's (0.8, 0.96) when at least 1% of the scores fall inside, else the
    scores' own 25th-75th percentile (random weights do not put neighbours where trained ones
    do)."""
    in_band = float(scores.is_between(*PAPER_BAND, closed="none").mean() or 0.0)
    if in_band >= MIN_IN_BAND_FRACTION:
        return PAPER_BAND, in_band
    low, high = float(scores.quantile(0.25)), float(scores.quantile(0.75))
    band = (low, high) if low < high else (max(-1.0, low - 1e-3), min(1.0, high + 1e-3))
    return band, in_band


def paper_profile_section(
    record: dict[str, Any],
    args: argparse.Namespace,
    shards_dir: Path,
    shards: list[str],
    home: Path,
    save: Callable[[], None] | None = None,
) -> None:
    """Fill `record` with the stages' figures (corpus tables already written); `save` is
    called after each stage, so a run cut off later keeps them."""
    import torch

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    shapes = SMOKE_SHAPES if args.smoke else PAPER_SHAPES
    record["shapes"] = shapes.__dict__
    for name, stage in (
        (
            "embeddings",
            lambda r: embedding_stage(r, shapes, shards, home, device, dtype, args.image_decode),
        ),
        ("knn", lambda r: knn_stage(r, shards, home)),
        ("mining", lambda r: mining_stage(r, record["knn"], shards, home)),
    ):
        record[name] = {}
        started = time.perf_counter()
        stage(record[name])
        synchronize(device)
        record[name]["stage_s"] = round(time.perf_counter() - started, 1)
        if save is not None:
            save()


def extrapolate_to(images: int, corpus: dict, paper: dict, knn_1m: dict | None) -> dict:
    """Hours each stage would take for `images` images on this one GPU (and its CPUs).

    Corpus, embeddings and mining scale linearly with images. Exact KNN scales with N^2: the
    1M x 1M x 768 search of the KNN section is scaled by (N / 1M)^2 and by d / 768 per source,
    plus the per-query cost of building the rows (measured on the run's own KNN stage).
    """
    hours: dict[str, float] = {"corpus": images / corpus["images_per_s"] / 3600}
    for source, figures in paper.get("embeddings", {}).items():
        if isinstance(figures, dict) and "items_per_s" in figures:
            hours[f"embed_{source}"] = images / figures["items_per_s"] / 3600
    if knn_1m and "search_torch_index_s" in knn_1m:
        one_million_s = knn_1m["search_torch_index_s"] * (1e6 / knn_1m["config"]["queries"])
        frame_per_query_s = 0.0
        frames = knn_1m.get("search_neighbors")
        if isinstance(frames, dict):
            frame_per_query_s = max(
                0.0, frames["seconds"] / frames["queries"] - one_million_s / 1e6
            )
        for source, figures in paper.get("knn", {}).items():
            if isinstance(figures, dict) and "dim" in figures:
                search_s = one_million_s * (images / 1e6) ** 2 * figures["dim"] / 768
                hours[f"knn_{source}"] = (search_s + images * frame_per_query_s) / 3600
    mining = paper.get("mining", {})
    if "queries_per_s" in mining:
        hours["mining"] = images / mining["queries_per_s"] / 3600
    result = {key: round(value, 2) for key, value in hours.items()}
    result["total_one_gpu_hours"] = round(sum(hours.values()), 1)
    result["images"] = images
    return result
