"""Benchmark of the embedding stage: images/s end to end through `embed_rows` vs forward only.

    python benchmarks/bench_embedding.py [--images 192] [--model ViT-B-32] [--device cpu]
        [--dtype float32] [--batch-size 32] [--workers 0,1,2] [--threads auto] [--repeats 3]
        [--image-size 512x384] [--quick]

What it measures, on N photo-like JPEGs (default 512x384, quality 90) written into a webdataset
tar and read through the real corpus table (`iter_shard_records` + `build_shard_table`):

- forward only: the model on tensors decoded and preprocessed beforehand, already on the
  device, with the same model, dtype and batch size: the ceiling of the stage;
- end to end: `embed_rows` (read from the tar, decode with the JPEG draft, preprocess in
  DataLoader workers, forward, normalise, float16) plus `write_embedding_table`, for each
  DataLoader worker count;
- ratio end to end / forward only, target >= 0.9;
- where the time goes: single-threaded milliseconds per image of each CPU step (tar read,
  decode as `embed_rows` does it, the bicubic thumbnail inside that decode, open_clip's
  preprocess) next to the forward's, and the ratio those costs predict when nothing overlaps;
- two prototypes of a cheaper input path, end to end, so a proposed change to the product code
  comes with a measured gain: `draft_decode` (see `draft_only_open_image_rgb`) and
  `draft_decode_uint8` (the same, plus uint8 pixels normalised on the device, see
  `uint8_transport`).

The model is an open_clip architecture with random weights (a real model times the same),
saved to a local checkpoint file first so that the real loader (`load_encoder`) reads it. Every
configuration runs `--repeats` times, interleaved, and its best run counts: on a shared machine
a slow run measures the neighbours, not the code. Writes benchmarks/results/embedding.json;
`--quick` (a tiny model and a few dozen images, for CI) writes nothing. On a 2-core machine
DataLoader workers compete with the forward pass for the same two cores: workers cannot add
compute there, only overlap.
"""

from __future__ import annotations

import argparse
import io
import itertools
import math
import os
import sys
import tarfile
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import torch
from PIL import Image, ImageDraw

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks._machine import machine_info, write_result
from megapairs_assets.corpus import images as corpus_images
from megapairs_assets.corpus.images import ImageLimits, read_uri_bytes
from megapairs_assets.corpus.sources import SourceSpec, iter_shard_records
from megapairs_assets.corpus.table import build_shard_table
from megapairs_assets.embeddings import compute
from megapairs_assets.embeddings.compute import embed_rows, write_embedding_table
from megapairs_assets.embeddings.encoders import (
    EncoderSpec,
    LoadedEncoder,
    load_encoder,
    register_bundled_model_configs,
)

TARGET_RATIO = 0.9
JPEG_QUALITY = 90
SEED = 0
DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
VARIANTS = ("current", "draft_decode", "draft_decode_uint8")
QUICK = {"images": 24, "model": "megapairs-tiny-clip", "batch_size": 8, "workers": "0,1"}
# Images timed one by one for the per-step cost table: enough to average out noise.
STAGE_SAMPLE_IMAGES = 48
# The prototype decodes JPEGs so that both sides stay at least this factor above the model's
# input side: DINOv2-style preprocessing resizes to 256 before its 224 crop (256/224 = 1.14).
DRAFT_MARGIN = 1.15


# --- test data ----------------------------------------------------------------------------


def photo_jpeg(seed: int, size_px: tuple[int, int], quality: int = JPEG_QUALITY) -> bytes:
    """A photo-like JPEG: smooth colour fields, a few hard-edged shapes and sensor-like noise.

    Pure noise would compress (and decode) unlike a photo; a flat gradient would be too cheap.
    This lands near 50 kB at 512x384, q=90, like web photos of that size.
    """
    rng = np.random.default_rng(seed)
    width, height = size_px
    field = rng.integers(0, 256, size=(6, 8, 3), dtype=np.uint8)
    picture = Image.fromarray(field, mode="RGB").resize((width, height), Image.Resampling.BICUBIC)
    draw = ImageDraw.Draw(picture)
    for _ in range(6):
        left, top = int(rng.integers(0, width)), int(rng.integers(0, height))
        right = left + int(rng.integers(width // 25, width // 2))
        bottom = top + int(rng.integers(height // 25, height // 2))
        colour = tuple(int(c) for c in rng.integers(0, 256, size=3))
        draw.ellipse((left, top, right, bottom), fill=colour)
    noise = rng.integers(-10, 11, size=(height, width, 3), dtype=np.int16)
    pixels = np.clip(np.asarray(picture, dtype=np.int16) + noise, 0, 255).astype(np.uint8)
    buffer = io.BytesIO()
    Image.fromarray(pixels, mode="RGB").save(buffer, format="JPEG", quality=quality)
    return buffer.getvalue()


def write_photo_shard(
    tar_path: Path, first_seed: int, count: int, size_px: tuple[int, int]
) -> Path:
    """Write a webdataset shard as img2dataset does: `<key>.jpg` next to `<key>.txt`."""
    with tarfile.open(tar_path, mode="w") as tar:
        for seed in range(first_seed, first_seed + count):
            key = f"{seed:09d}"
            _add_member(tar, f"{key}.jpg", photo_jpeg(seed, size_px))
            _add_member(tar, f"{key}.txt", f"synthetic photo number {seed}".encode())
    return tar_path


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    tar.addfile(info, io.BytesIO(data))


def corpus_rows(tar_path: Path, limits: ImageLimits) -> pl.DataFrame:
    """The corpus table of one shard, built by the same code as the `image_corpus` asset."""
    spec = SourceSpec(kind="webdataset", path=str(tar_path.parent))
    images, quarantine = build_shard_table(
        tar_path.stem, iter_shard_records(spec, tar_path.stem), limits
    )
    if quarantine.height:
        raise RuntimeError(f"{quarantine.height} generated images were quarantined: {quarantine}")
    return images


def parse_size(text: str) -> tuple[int, int]:
    """'512x384' -> (512, 384)."""
    width, height = text.lower().split("x")
    return int(width), int(height)


# --- model --------------------------------------------------------------------------------


def write_random_checkpoint(model_name: str, path: Path, init_device: torch.device) -> None:
    """Save the state dict of a randomly initialised open_clip `model_name` to `path`.

    Weights are initialised on `init_device` when it is a GPU (seconds, where a CPU needs about
    15 s for a ViT-L), falling back to the CPU, and saved from CPU memory like a real file.
    """
    import open_clip

    register_bundled_model_configs()
    devices = [init_device] if init_device.type == "cuda" else []
    for device in [*devices, torch.device("cpu")]:
        try:
            with torch.random.fork_rng(devices=[]), torch.device(device):
                torch.manual_seed(SEED)
                model = open_clip.create_model(model_name, pretrained=None)
            break
        except Exception:
            # Initialising under a CUDA default device is an optimisation, never a requirement.
            if device.type == "cpu":
                raise
    torch.save({name: tensor.cpu() for name, tensor in model.state_dict().items()}, path)


def load_benchmark_encoder(
    model_name: str, checkpoint: Path, device: torch.device, dtype: torch.dtype
) -> LoadedEncoder:
    """Load the checkpoint through the product loader, exactly as an asset would."""
    spec = EncoderSpec(backend="open_clip_image", model=model_name, pretrained=str(checkpoint))
    return load_encoder(spec, device, dtype)


def synchronize(device: torch.device) -> None:
    """Wait for queued device work, so a timer read afterwards covers it."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@contextmanager
def inference_context(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """The same inference mode and autocast settings as `compute._embed_batch`."""
    use_autocast = device.type == "cuda" and dtype in (torch.float16, torch.bfloat16)
    with (
        torch.inference_mode(),
        torch.autocast(device_type=device.type, dtype=dtype, enabled=use_autocast),
    ):
        yield


# --- prototypes of a cheaper input path ---------------------------------------------------


def draft_only_open_image_rgb(
    uri: str, limits: ImageLimits, max_side_px: int | None = None
) -> Image.Image:
    """Prototype decode for the embedding path (the product does not use it).

    `embed_rows` asks `open_image_rgb` for `max_side_px = 2 x input side`: a JPEG draft that
    keeps BOTH sides >= that size (so a 512x384 or 1024x768 photo decodes at full size), then
    a bicubic `thumbnail` down to it, then the model's own preprocess resizes once more. The
    thumbnail is a second full resampling whose result the preprocess resamples again. This
    prototype drafts so both sides stay >= DRAFT_MARGIN x input side (the largest DCT reduction
    that never makes the preprocess upsample) and leaves the one resize to the preprocess.
    Validation is the same `_decode` the product runs (every byte read, same checks).
    """
    input_side_px = (max_side_px or 0) // compute.DECODE_SIDE_FACTOR
    draft_px = math.ceil(input_side_px * DRAFT_MARGIN) if input_side_px else None
    return corpus_images._decode(read_uri_bytes(uri), limits, draft_side_px=draft_px).image


@contextmanager
def prototype_decode() -> Iterator[None]:
    """Make `embed_rows` (and DataLoader workers forked meanwhile) use the prototype decode."""
    original = compute.open_image_rgb
    compute.open_image_rgb = draft_only_open_image_rgb
    try:
        yield
    finally:
        compute.open_image_rgb = original


class Uint8Preprocess:
    """open_clip's preprocess up to the crop, returning uint8 CHW pixels.

    A class so DataLoader workers can receive it by pickling. The float conversion and the
    normalisation move to the device (`uint8_transport`): a quarter of the bytes cross from
    the workers and to the GPU, and the workers skip ~1 ms of float maths per image.
    """

    def __init__(self, geometric: Callable[[Image.Image], Image.Image]) -> None:
        self.geometric = geometric

    def __call__(self, image: Image.Image) -> torch.Tensor:
        from torchvision.transforms.functional import pil_to_tensor

        return pil_to_tensor(self.geometric(image).convert("RGB"))


def uint8_transport(encoder: LoadedEncoder, device: torch.device) -> LoadedEncoder:
    """The encoder with uint8 preprocessing and on-device normalisation (prototype)."""
    from torchvision import transforms

    steps = list(getattr(encoder.preprocess, "transforms", []))
    normalize = next((s for s in steps if isinstance(s, transforms.Normalize)), None)
    to_tensor_at = next((i for i, s in enumerate(steps) if "ToTensor" in type(s).__name__), None)
    if normalize is None or to_tensor_at is None:
        raise ValueError(f"{encoder.model_id}: preprocess is not Resize/Crop/ToTensor/Normalize")
    mean = torch.tensor(normalize.mean, device=device).view(1, 3, 1, 1) * 255
    std = torch.tensor(normalize.std, device=device).view(1, 3, 1, 1) * 255
    encode_float = encoder.encode_images

    def encode_uint8(pixels: torch.Tensor) -> torch.Tensor:
        # Pinned host memory makes this copy asynchronous; the subtraction queues behind it.
        on_device = pixels.to(device, non_blocking=True)
        return encode_float((on_device.float() - mean) / std)

    return replace(
        encoder,
        preprocess=Uint8Preprocess(transforms.Compose(steps[:to_tensor_at])),
        _encode_images=encode_uint8,
    )


def variant_setup(
    variant: str, encoder: LoadedEncoder, device: torch.device
) -> tuple[LoadedEncoder, Callable[[], AbstractContextManager[Any]]]:
    """(encoder to pass to embed_rows, factory of the context to run it in) for a variant."""
    if variant == "current":
        return encoder, nullcontext
    if variant == "draft_decode":
        return encoder, prototype_decode
    if variant == "draft_decode_uint8":
        return uint8_transport(encoder, device), prototype_decode
    raise ValueError(f"unknown variant {variant!r}; expected one of {VARIANTS}")


def pipeline_only(encoder: LoadedEncoder, device: torch.device) -> LoadedEncoder:
    """The encoder with its forward replaced by a copy of the pixels to the device.

    `embed_rows` with it measures everything but the model: reading, decoding, preprocessing
    in the workers, collation, pinning, the host-to-device copy, normalising, writing.
    """
    dim = encoder.dim

    def copy_only(pixels: torch.Tensor) -> torch.Tensor:
        on_device = pixels.to(device, non_blocking=True)
        return on_device.flatten(1)[:, :1].float().expand(-1, dim) + 1.0

    return replace(encoder, _encode_images=copy_only)


# --- measurements -------------------------------------------------------------------------


def preprocessed_batches(
    rows: pl.DataFrame,
    encoder: LoadedEncoder,
    limits: ImageLimits,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    max_batches: int | None = None,
) -> list[torch.Tensor]:
    """Rows decoded and preprocessed by the product's own loader, batched, moved to `device`."""
    limit = rows.height if max_batches is None else min(rows.height, max_batches * batch_size)
    loader = compute._image_batches(
        rows.head(limit), encoder, limits, batch_size, num_workers, device
    )
    return [batch.inputs.to(device) for batch in loader if batch.inputs is not None]


def median_rate(images: list[int], seconds: list[float]) -> float | None:
    """Median over batches of images/s: robust to the few batches another job slowed down."""
    rates = [n / dt for n, dt in zip(images, seconds, strict=True) if dt > 0]
    return round(float(np.median(rates)), 2) if rates else None


def time_forward_only(
    encoder: LoadedEncoder,
    batches: list[torch.Tensor],
    device: torch.device,
    dtype: torch.dtype,
    passes: int = 1,
) -> dict[str, Any]:
    """Seconds and images/s of the model alone, `passes` times over `batches` (after a warm-up).

    On the CPU each batch is timed too (`median_batch_images_per_s`); on a GPU that would need
    a synchronisation per batch, which the end-to-end path does not pay, so it is left out.
    """
    images = passes * sum(len(batch) for batch in batches)
    batch_images: list[int] = []
    batch_seconds: list[float] = []
    with inference_context(device, dtype):
        encoder.encode_images(batches[0])
        synchronize(device)
        start = last = time.perf_counter()
        for _ in range(passes):
            for batch in batches:
                encoder.encode_images(batch)
                if device.type == "cpu":
                    now = time.perf_counter()
                    batch_images.append(len(batch))
                    batch_seconds.append(now - last)
                    last = now
        synchronize(device)
    seconds = time.perf_counter() - start
    return {
        "images": images,
        "seconds": round(seconds, 3),
        "images_per_s": round(images / seconds, 2),
        "median_batch_images_per_s": median_rate(batch_images, batch_seconds),
    }


def time_end_to_end(
    rows: pl.DataFrame,
    encoder: LoadedEncoder,
    limits: ImageLimits,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    dtype: torch.dtype,
    table_path: Path,
) -> dict[str, Any]:
    """`embed_rows` + `write_embedding_table` over all rows; seconds, images/s and the split.

    `median_batch_images_per_s` times the intervals between `embed_rows`' per-batch progress
    calls: the steady state, without the start of the workers and the table write.
    """
    batch_images: list[int] = []
    stamps: list[float] = []

    def on_progress(done: int) -> None:
        batch_images.append(done)
        stamps.append(time.perf_counter())

    start = time.perf_counter()
    result = embed_rows(
        rows, encoder, limits, batch_size, num_workers, device, dtype, on_progress=on_progress
    )
    embedded = time.perf_counter()
    write_embedding_table(table_path, result.ids, result.vectors, encoder.model_id)
    seconds = time.perf_counter() - start
    if result.skipped:
        raise RuntimeError(f"embed_rows skipped {len(result.skipped)} rows: {result.skipped[:3]}")
    # The first interval holds the workers' start-up, so steady state begins at the second.
    intervals = [later - earlier for earlier, later in itertools.pairwise(stamps)]
    return {
        "workers": num_workers,
        "images": len(result.ids),
        "seconds": round(seconds, 3),
        "embed_rows_s": round(embedded - start, 3),
        "write_table_s": round(seconds - (embedded - start), 3),
        "first_batch_s": round(stamps[0] - start, 3) if stamps else None,
        "images_per_s": round(len(result.ids) / seconds, 2),
        "median_batch_images_per_s": median_rate(batch_images[1:], intervals),
    }


def per_image_ms(step: Callable[[str], Any], uris: list[str]) -> float:
    """Mean single-threaded milliseconds of `step(uri)` over `uris`, after one warm-up call."""
    step(uris[0])
    start = time.perf_counter()
    for uri in uris:
        step(uri)
    return (time.perf_counter() - start) / len(uris) * 1e3


def stage_costs(
    rows: pl.DataFrame, encoder: LoadedEncoder, limits: ImageLimits, device: torch.device
) -> dict[str, float]:
    """Single-threaded ms per image of each CPU step `embed_rows` runs before the forward."""
    assert encoder.preprocess is not None and encoder.input_size_px is not None
    preprocess = encoder.preprocess
    uint8_preprocess = uint8_transport(encoder, device).preprocess
    assert uint8_preprocess is not None
    max_side_px = compute.DECODE_SIDE_FACTOR * encoder.input_size_px
    uris = rows["source_uri"].head(STAGE_SAMPLE_IMAGES).to_list()
    full = {uri: corpus_images.decode_image(read_uri_bytes(uri), limits).image for uri in uris}

    def current_decode(uri: str) -> Image.Image:
        return corpus_images.open_image_rgb(uri, limits, max_side_px=max_side_px)

    def proto_decode(uri: str) -> Image.Image:
        return draft_only_open_image_rgb(uri, limits, max_side_px=max_side_px)

    def thumbnail_only(uri: str) -> None:
        full[uri].copy().thumbnail((max_side_px, max_side_px), Image.Resampling.BICUBIC)

    decoded = {uri: current_decode(uri) for uri in uris}
    costs = {
        "read_tar_member_ms": per_image_ms(read_uri_bytes, uris),
        "decode_current_ms": per_image_ms(current_decode, uris),
        "of_which_thumbnail_ms": per_image_ms(thumbnail_only, uris),
        "decode_draft_only_ms": per_image_ms(proto_decode, uris),
        "preprocess_ms": per_image_ms(lambda uri: preprocess(decoded[uri]), uris),
        "input_current_ms": per_image_ms(lambda uri: preprocess(current_decode(uri)), uris),
        "input_draft_decode_ms": per_image_ms(lambda uri: preprocess(proto_decode(uri)), uris),
        "input_draft_decode_uint8_ms": per_image_ms(
            lambda uri: uint8_preprocess(proto_decode(uri)), uris
        ),
    }
    return {name: round(value, 3) for name, value in costs.items()}


# --- the benchmark ------------------------------------------------------------------------


def thread_counts(spec: str) -> list[int]:
    """'auto,1' -> [torch's default intra-op thread count, 1], without duplicates."""
    counts = [torch.get_num_threads() if item == "auto" else int(item) for item in spec.split(",")]
    return list(dict.fromkeys(counts))


def run(args: argparse.Namespace) -> dict[str, Any]:
    """Generate the data and model, take every measurement, return the figures."""
    device, dtype = torch.device(args.device), DTYPES[args.dtype]
    worker_counts = [int(w) for w in args.workers.split(",")]
    threads_to_try = thread_counts(args.threads)
    default_threads = torch.get_num_threads()
    size_px = parse_size(args.image_size)
    limits = ImageLimits()
    with tempfile.TemporaryDirectory(prefix="bench-embedding-") as scratch:
        scratch_dir = Path(scratch)
        started = time.perf_counter()
        tar_path = write_photo_shard(scratch_dir / "00000.tar", 0, args.images, size_px)
        rows = corpus_rows(tar_path, limits)
        data_s = time.perf_counter() - started
        jpeg_kb = tar_path.stat().st_size / rows.height / 1e3
        log(f"{rows.height} JPEGs of about {jpeg_kb:.0f} kB in {data_s:.1f} s")

        started = time.perf_counter()
        checkpoint = scratch_dir / f"{args.model}-random.pt"
        write_random_checkpoint(args.model, checkpoint, device)
        encoder = load_benchmark_encoder(args.model, checkpoint, device, dtype)
        checkpoint.unlink()
        model_s = time.perf_counter() - started
        log(f"{args.model} loaded on {device} ({dtype}) in {model_s:.1f} s")

        batches = preprocessed_batches(rows, encoder, limits, args.batch_size, 0, device)
        cost_runs: list[dict[str, float]] = []
        # One small pass first, so the first timed pass does not pay one-time allocations.
        embed_rows(rows.head(args.batch_size), encoder, limits, args.batch_size, 0, device, dtype)

        table_path = scratch_dir / "embeddings.parquet"
        forward_runs: dict[int, list[dict[str, Any]]] = {}
        runs: dict[tuple[str, int, int], list[dict[str, Any]]] = {}
        for repeat in range(args.repeats):
            cost_runs.append(stage_costs(rows, encoder, limits, device))
            for threads in threads_to_try:
                torch.set_num_threads(threads)
                forward_runs.setdefault(threads, []).append(
                    time_forward_only(encoder, batches, device, dtype)
                )
                rate = forward_runs[threads][-1]["images_per_s"]
                log(f"[{repeat}] forward only, {threads} threads: {rate} images/s")
                for variant in VARIANTS:
                    variant_encoder, context = variant_setup(variant, encoder, device)
                    for workers in worker_counts:
                        with context():
                            figures = time_end_to_end(
                                rows,
                                variant_encoder,
                                limits,
                                args.batch_size,
                                workers,
                                device,
                                dtype,
                                table_path,
                            )
                        runs.setdefault((variant, workers, threads), []).append(figures)
                        log(
                            f"[{repeat}] {variant}, {workers} workers, {threads} threads: "
                            f"{figures['images_per_s']} images/s"
                        )
        torch.set_num_threads(default_threads)

    # Each step's cheapest run: the one the rest of the machine disturbed least.
    costs = {name: min(run[name] for run in cost_runs) for name in cost_runs[0]}
    forward_by_threads = {
        threads: {"threads": threads, **max(found, key=lambda run: run["images_per_s"])}
        for threads, found in forward_runs.items()
    }
    # The ceiling is the model with the machine to itself, at its fastest thread count.
    forward = max(forward_by_threads.values(), key=lambda run: run["images_per_s"])
    forward_ms = 1e3 / forward["images_per_s"]
    end_to_end = []
    for (variant, _, threads), variant_runs in runs.items():
        best_run = max(variant_runs, key=lambda run: run["images_per_s"])
        ratio = round(best_run["images_per_s"] / forward["images_per_s"], 3)
        end_to_end.append(
            {"variant": variant, "threads": threads, **best_run, "ratio_to_forward_only": ratio}
        )
    best = {
        variant: max(
            (run for run in end_to_end if run["variant"] == variant),
            key=lambda run: run["images_per_s"],
        )
        for variant in VARIANTS
    }
    current = best["current"]
    return {
        "benchmark": "embedding",
        "command": "python benchmarks/bench_embedding.py " + " ".join(sys.argv[1:]),
        "machine": machine_info(),
        "config": {
            "model": args.model,
            "weights": "random (local checkpoint file, read by load_encoder)",
            "device": str(device),
            "dtype": args.dtype,
            "batch_size": args.batch_size,
            "images": rows.height,
            "image_size_px": list(size_px),
            "jpeg_quality": JPEG_QUALITY,
            "jpeg_kb": round(jpeg_kb, 1),
            "input_size_px": encoder.input_size_px,
            "default_torch_threads": default_threads,
            "repeats": args.repeats,
        },
        "setup_s": {"data": round(data_s, 1), "model": round(model_s, 1)},
        "forward_only": forward,
        "forward_only_by_threads": list(forward_by_threads.values()),
        "end_to_end": end_to_end,
        "best_end_to_end_images_per_s": current["images_per_s"],
        "best_workers": current["workers"],
        "best_threads": current["threads"],
        "ratio_end_to_end_to_forward_only": current["ratio_to_forward_only"],
        "target_ratio": TARGET_RATIO,
        "prototypes": {
            variant: {
                "workers": best[variant]["workers"],
                "threads": best[variant]["threads"],
                "images_per_s": best[variant]["images_per_s"],
                "ratio_to_forward_only": best[variant]["ratio_to_forward_only"],
                "gain_over_current": round(
                    best[variant]["images_per_s"] / current["images_per_s"] - 1, 3
                ),
            }
            for variant in VARIANTS[1:]
        },
        "stage_ms_per_image_single_thread": {**costs, "forward_ms": round(forward_ms, 3)},
        "serial_ratio_predicted": {
            variant: round(forward_ms / (forward_ms + costs[f"input_{variant}_ms"]), 3)
            for variant in VARIANTS
        },
        "note": "shared 2-core machine; other jobs may have been running, timings are noisy",
        "load_average_1_5_15_min_at_end": [round(x, 2) for x in os.getloadavg()],
    }


def log(message: str) -> None:
    """Progress on stderr, so stdout keeps only the summary."""
    print(message, file=sys.stderr, flush=True)


def print_summary(result: dict[str, Any]) -> None:
    """The figures a reader wants, on stdout."""
    config, forward = result["config"], result["forward_only"]
    width_px, height_px = config["image_size_px"]
    print(
        f"{config['model']} on {config['device']} ({config['dtype']}), batch "
        f"{config['batch_size']}, {config['images']} JPEGs {width_px}x{height_px}, "
        f"best of {config['repeats']}"
    )
    print(
        f"forward only (pre-decoded tensors): {forward['images_per_s']:.1f} images/s "
        f"({forward['threads']} threads)"
    )
    print(
        f"{'variant':>20} {'workers':>7} {'threads':>7} {'images/s':>9} {'ratio':>6} {'write s':>8}"
    )
    for r in result["end_to_end"]:
        print(
            f"{r['variant']:>20} {r['workers']:>7} {r['threads']:>7} {r['images_per_s']:>9.1f} "
            f"{r['ratio_to_forward_only']:>6.3f} {r['write_table_s']:>8.3f}"
        )
    ratio = result["ratio_end_to_end_to_forward_only"]
    verdict = "meets" if ratio >= TARGET_RATIO else "BELOW"
    print(
        f"best end to end / forward only = {ratio:.3f} with {result['best_workers']} workers, "
        f"{result['best_threads']} threads "
        f"({verdict} the {TARGET_RATIO} target)"
    )
    for variant, figures in result["prototypes"].items():
        print(
            f"prototype {variant}: {figures['ratio_to_forward_only']:.3f} "
            f"({figures['gain_over_current']:+.1%} images/s)"
        )
    costs = result["stage_ms_per_image_single_thread"]
    print("single-threaded ms per image: " + ", ".join(f"{k} {v}" for k, v in costs.items()))
    predicted = ", ".join(f"{k} {v}" for k, v in result["serial_ratio_predicted"].items())
    print(f"ratio predicted if nothing overlapped: {predicted}")


def main(argv: list[str] | None = None) -> int:
    """Parse arguments, run, print and (unless --quick) save the figures."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--images", type=int, default=192, help="JPEGs in the test shard")
    parser.add_argument("--model", default="ViT-B-32", help="open_clip architecture")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--workers", default="0,1,2", help="DataLoader worker counts to time")
    parser.add_argument(
        "--threads", default="auto", help="torch intra-op thread counts to time, e.g. auto,1"
    )
    parser.add_argument("--repeats", type=int, default=3, help="interleaved runs; best counts")
    parser.add_argument("--image-size", default="512x384", help="WIDTHxHEIGHT of the JPEGs")
    parser.add_argument("--quick", action="store_true", help="tiny run for a CI smoke test")
    args = parser.parse_args(argv)
    if args.quick:
        for name, value in QUICK.items():
            setattr(args, name, value)
        args.repeats = 1
    result = run(args)
    print_summary(result)
    if not args.quick:
        print(f"wrote {write_result('embedding', result)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
