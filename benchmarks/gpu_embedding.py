"""GPU section: ViT-L-14 bf16 embedding end to end against its forward pass alone.

Run by `benchmarks.gpu_suite` on the corpus tables it generated (photo-like 512x384 JPEGs in
webdataset shards). All through the product code, with random weights read back by the product
loader:

- forward only: the model on batches already decoded and on the device (`time_forward_only`,
  no autocast, as `embed_rows` runs it), at the product's batch size and at half and double
  it (a forward change is kept only with a measured gain), against the ceiling (the card's
  dense bf16 peak / 162 GFLOP per image);
- end to end: `embed_rows` + `write_embedding_table` over all rows in one call, with JPEGs
  decoded on the device (`image_decode="device"`: nvJPEG + resize on the GPU, reader
  threads) and, on fewer rows, decoded by CPU workers as before (`image_decode="cpu"`);
- input only: the device-decode path with the forward swapped for a copy (its ceiling).

Target (issue 13): end to end >= 0.9 of forward only.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import time
from pathlib import Path
from typing import Any

from benchmarks.gpu_common import TOWER_GFLOP, Suite, dense_peak_tflops, gpu_name, log

FORWARD_IMAGES = 8192
CPU_DECODE_ROWS = 10_000
TARGET_RATIO = 0.9


def embedding_section(
    record: dict[str, Any], args: argparse.Namespace, suite: Suite, rows: Any, scratch: Path
) -> None:
    """Fill `record` with forward-only and end-to-end figures for args.model on `rows`."""
    import torch

    from benchmarks import bench_embedding as bench
    from benchmarks.paper_profile_gpu import load_on_device
    from megapairs_assets.corpus.images import ImageLimits
    from megapairs_assets.embeddings.compute import embed_rows
    from megapairs_assets.embeddings.encoders import EncoderSpec

    device = torch.device("cpu" if args.smoke else "cuda")
    dtype = torch.float32 if args.smoke else torch.bfloat16
    limits = ImageLimits()
    batch_size = args.batch_size
    record["config"] = {
        "model": args.model,
        "dtype": str(dtype),
        "batch_size": batch_size,
        "rows": rows.height,
        "cpu_decode_workers": args.workers,
    }
    started = time.perf_counter()
    checkpoint = scratch / f"{args.model}-random.pt"
    bench.write_random_checkpoint(args.model, checkpoint, device)
    encoder = load_on_device(
        EncoderSpec("open_clip_image", args.model, str(checkpoint)), device, dtype
    )
    record["model_load_s"] = round(time.perf_counter() - started, 1)

    # Decoded once by the CPU path, 8 distinct batches of the largest size tried.
    largest = 2 * batch_size
    pixels = torch.cat(
        bench.preprocessed_batches(rows, encoder, limits, largest, args.workers, device, 4)
    )
    forward: dict[str, Any] = {}
    for size in (batch_size, batch_size // 2, largest):
        batches = list(torch.split(pixels, size))
        passes = max(1, math.ceil(args.forward_images / len(pixels)))
        figures = bench.time_forward_only(encoder, batches, device, dtype, passes, autocast=False)
        forward[str(size)] = figures
        log(f"embedding: forward only, batch {size}: {figures['images_per_s']} images/s")
    record["forward_only_by_batch"] = forward
    product_forward = forward[str(batch_size)]["images_per_s"]
    best = max(forward, key=lambda size: forward[size]["images_per_s"])
    record["best_batch_size"] = int(best)
    record["best_batch_gain"] = round(forward[best]["images_per_s"] / product_forward, 3)
    peak, gflop = dense_peak_tflops(gpu_name()), TOWER_GFLOP.get(args.model)
    if peak and gflop and device.type == "cuda":
        record["ceiling_images_per_s"] = round(peak * 1e3 / gflop)
        record["forward_only_mfu"] = round(product_forward * gflop / (peak * 1e3), 3)
    if device.type == "cuda" and suite.has_time(args.reserve_s + 120):
        # torch.compile is kept in the product only with a measured gain after warm-up.
        batches = list(torch.split(pixels, batch_size))
        passes = max(1, math.ceil(args.forward_images / len(pixels)))
        compiled = dataclasses.replace(encoder, _encode_images=torch.compile(encoder.encode_images))
        figures = bench.time_forward_only(compiled, batches, device, dtype, passes, autocast=False)
        figures["gain_over_eager"] = round(figures["images_per_s"] / product_forward, 3)
        record["forward_only_compiled"] = figures
        log(f"embedding: forward only, torch.compile: {figures}")
        del compiled
    else:
        record["forward_only_compiled"] = "skipped: no GPU or no time budget"
    del pixels, batches

    # A short pass warms the device decoder and the loader before the timed ones.
    warm = rows.head(min(rows.height, 2 * batch_size))
    embed_rows(
        warm, encoder, limits, batch_size, args.device_workers, device, image_decode="device"
    )
    table = scratch / "embeddings.parquet"
    on_device = functools.partial(embed_rows, image_decode="device")
    on_cpu = functools.partial(embed_rows, image_decode="cpu")
    runs = (
        ("end_to_end_device_decode", encoder, rows, args.device_workers, on_device),
        (
            "input_only_device_decode",
            bench.pipeline_only(encoder, device),
            rows,
            args.device_workers,
            on_device,
        ),
        ("end_to_end_cpu_decode", encoder, rows.head(args.cpu_decode_rows), args.workers, on_cpu),
    )
    for name, model, run_rows, workers, embed in runs:
        if run_rows.height == 0:
            record[name] = "skipped: --cpu-decode-rows 0"
            continue
        if not suite.has_time(args.reserve_s + 20):
            record[name] = "skipped: time budget"
            continue
        figures = bench.time_end_to_end(
            run_rows, model, limits, batch_size, workers, device, table, embed=embed
        )
        figures["ratio_to_forward_only"] = round(figures["images_per_s"] / product_forward, 3)
        # Without the table write, which is the same for every input path.
        embed_rate = figures["images"] / figures["embed_rows_s"]
        figures["embed_rows_ratio_to_forward_only"] = round(embed_rate / product_forward, 3)
        record[name] = figures
        log(f"embedding: {name}: {figures}")
    record["device_vs_cpu_decode"] = _compare_decode_paths(
        encoder, rows.head(args.compare_rows), limits, batch_size, args, device
    )
    log(f"embedding: device vs cpu decode {record['device_vs_cpu_decode']}")
    result = record.get("end_to_end_device_decode")
    if isinstance(result, dict):
        record["ratio_end_to_end_to_forward_only"] = result["ratio_to_forward_only"]
        record["meets_target"] = result["ratio_to_forward_only"] >= TARGET_RATIO


def _compare_decode_paths(
    encoder: Any,
    rows: Any,
    limits: Any,
    batch_size: int,
    args: argparse.Namespace,
    device: Any,
) -> dict[str, Any]:
    """The same rows embedded through both input paths: non-finite rows and row cosines.

    Pixels differ only by the two resize implementations' rounding, so every cosine should be
    near 1; a row whose input or activations were overwritten (a stream race) stands out.
    """
    import numpy as np

    from megapairs_assets.embeddings.compute import embed_rows

    on_device = embed_rows(
        rows,
        encoder,
        limits,
        batch_size,
        args.device_workers,
        device,
        image_decode="device",
    )
    on_cpu = embed_rows(rows, encoder, limits, batch_size, args.workers, device, image_decode="cpu")
    if on_device.ids != on_cpu.ids:
        return {"status": "failed: the two paths embedded different rows"}
    a, b = on_device.vectors.astype(np.float32), on_cpu.vectors.astype(np.float32)
    cosines = (a * b).sum(axis=1)
    finite = np.isfinite(cosines)
    return {
        "rows": len(cosines),
        "device_nonfinite_rows": int((~np.isfinite(a).all(axis=1)).sum()),
        "cpu_nonfinite_rows": int((~np.isfinite(b).all(axis=1)).sum()),
        "cosine_min": float(cosines[finite].min()) if finite.any() else None,
        "cosine_p01": float(np.quantile(cosines[finite], 0.01)) if finite.any() else None,
        "rows_below_0_99": int((~finite | (cosines < 0.99)).sum()),
    }
