"""Image input decoded on the GPU: JPEG bytes in, resized and cropped uint8 pixels on the device.

On one H100 the model reads ~2,600 ViT-L-14 images/s while 12 CPU workers decode ~1,300
(benchmarks/README.md), so CPU decoding bounds the whole stage. Here reader threads only read
each image's bytes and look at its JPEG header; the main thread hands a whole batch to nvJPEG
(`torchvision.io.decode_jpeg` on CUDA takes a list and uses the GPU's hardware JPEG decoder
for baseline JPEGs), then resizes and crops on the device with the encoder's own torchvision
transforms, grouped by image size so each group is one batched call. Threads rather than
DataLoader processes: reading is light, and forking a process that holds a CUDA context costs
about half a second per call, paid again for every shard.

What the device path does not take is decoded on the CPU exactly as before, in the threads
(PIL releases the GIL while it decodes and resizes):
other formats, CMYK and other unusual colour modes, progressive JPEGs (nvJPEG decodes those one
by one on the host anyway), EXIF-rotated pictures (the GPU decoder ignores the orientation tag),
and sizes outside the limits (so the CPU path reports the rejection). A batch the GPU decoder
refuses is retried image by image; an image it still refuses is decoded on the CPU, and one the
CPU refuses too becomes a skipped row with the usual reason.
"""

from __future__ import annotations

import io
import os
from collections import deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Literal, NamedTuple

import polars as pl
import torch
from PIL import Image

from megapairs_assets.corpus.images import (
    PREPROCESS_FAILED,
    ImageLimits,
    ImageRejected,
    open_image_for_model,
    read_uri_bytes,
)

# Whether "auto" decodes on a GPU. Off until a GPU run of benchmarks/gpu_suite.py shows the
# side-stream fix in `_to_device` holding (its embedding section's device_vs_cpu_decode: no
# non-finite rows, every cosine to the CPU path near 1); until then "device" opts in.
AUTO_DECODES_ON_DEVICE = False

ImageDecode = Literal["auto", "cpu", "device"]
"""Where images are decoded: "device" (nvJPEG on the step's GPU, torchvision on a CPU
device), "cpu" (PIL in DataLoader workers) or "auto" (device on a GPU whose decoder works)."""

SkippedRow = tuple[str, str, str]
# Batches being read ahead of the model, per reader thread.
PREFETCH_BATCHES_PER_WORKER = 2
# Reading bytes and parsing headers needs few threads; decoding on the CPU needs many cores.
_DEVICE_DECODE_MAX_WORKERS = 8
_JPEG_MAGIC = b"\xff\xd8\xff"
_EXIF_ORIENTATION = 0x0112


@dataclass
class DeviceBatch:
    """One model batch decoded for the device: ids in row order, their pixels, skipped rows.

    `pixels` is uint8 (B, 3, S, S) on the device, or None when every row was skipped.
    `device_decoded` counts the rows the GPU decoder handled (the rest went through the CPU).
    """

    ids: list[str]
    pixels: torch.Tensor | None
    skipped: list[SkippedRow] = field(default_factory=list)
    device_decoded: int = 0


def uses_device_decode(mode: ImageDecode, device: torch.device) -> bool:
    """Whether images are decoded on `device` under `mode`.

    "auto" decodes on a CUDA device when `AUTO_DECODES_ON_DEVICE` is set and torchvision's GPU
    JPEG decoder works there (checked once per device on a tiny image); on a CPU it keeps PIL
    in the workers, which decodes JPEGs at reduced scale and is faster there. "device" demands
    it and raises RuntimeError with the decoder's error when it does not work.
    """
    if mode == "cpu":
        return False
    if mode == "auto":
        return (
            AUTO_DECODES_ON_DEVICE and device.type == "cuda" and _decoder_error(str(device)) is None
        )
    if mode == "device":
        error = _decoder_error(str(device))
        if error is not None:
            raise RuntimeError(
                f"image_decode='device' but torchvision cannot decode JPEGs on {device}: "
                f"{error}; use image_decode='auto' or 'cpu'"
            )
        return True
    raise ValueError(f"unknown image_decode {mode!r}; expected auto, cpu or device")


def default_num_workers(decode_on_device: bool, cpu_count: int | None = None) -> int:
    """Input workers for this machine: reader threads for the device path (a few, also for the
    odd image decoded on the CPU), else DataLoader processes on every spare core."""
    cores = cpu_count or len(os.sched_getaffinity(0))
    if decode_on_device:
        return max(1, min(_DEVICE_DECODE_MAX_WORKERS, cores - 1))
    # One core stays with the main process, which feeds the model.
    return max(0, cores - 1)


@lru_cache(maxsize=8)
def _decoder_error(device_name: str) -> str | None:
    """None when torchvision decodes a small JPEG on the device, else the reason it cannot."""
    if device_name.startswith("cuda") and not torch.cuda.is_available():
        return "no CUDA device is visible"
    try:
        from torchvision.io import ImageReadMode, decode_jpeg

        buffer = io.BytesIO()
        Image.new("RGB", (24, 16), (200, 30, 60)).save(buffer, format="JPEG")
        data = torch.frombuffer(bytearray(buffer.getvalue()), dtype=torch.uint8)
        decoded = decode_jpeg([data], mode=ImageReadMode.RGB, device=device_name)[0]
        if tuple(decoded.shape) != (3, 16, 24):
            return f"decoded a 24x16 test image to shape {tuple(decoded.shape)}"
    except Exception as exc:  # any failure (no nvJPEG, no GPU, old torchvision) means "no"
        return f"{type(exc).__name__}: {exc}"
    return None


# --- geometry on the device -----------------------------------------------------------------


class TensorGeometry:
    """The resize and crop of an encoder's preprocess, applied to decoded tensors on a device.

    Built from the torchvision Resize / CenterCrop steps of `Uint8ImagePreprocess.geometric`;
    torchvision applies those to tensors with the same sizes and antialiased filters as to PIL
    images. Pictures are grouped by size so each group is resized in one call.
    """

    def __init__(self, steps: list[torch.nn.Module]) -> None:
        self.steps = steps

    def __call__(self, pictures: list[torch.Tensor]) -> torch.Tensor:
        """uint8 CHW pictures of any sizes -> uint8 (N, 3, S, S), in the input order."""
        by_size: dict[tuple[int, int], list[int]] = {}
        for position, picture in enumerate(pictures):
            by_size.setdefault(tuple(picture.shape[-2:]), []).append(position)
        output: torch.Tensor | None = None
        for positions in by_size.values():
            group = torch.stack([pictures[p] for p in positions])
            for step in self.steps:
                group = step(group)
            if output is None:
                output = group.new_empty((len(pictures), *group.shape[1:]))
            output[torch.tensor(positions, device=group.device)] = group
        assert output is not None, "no pictures to resize"
        return output


def tensor_geometry(preprocess: object) -> TensorGeometry | None:
    """The device version of an encoder's uint8 preprocess, or None when it cannot be made.

    Accepts a `Uint8ImagePreprocess` whose steps are torchvision Resize / CenterCrop plus
    steps that leave an RGB picture as it is (open_clip's colour-mode conversion); anything
    else keeps the CPU path.
    """
    from torchvision import transforms

    geometric = getattr(preprocess, "geometric", None)
    steps = getattr(geometric, "transforms", None)
    if not steps:
        return None
    kept: list[torch.nn.Module] = []
    for step in steps:
        if isinstance(step, transforms.Resize | transforms.CenterCrop):
            kept.append(step)
        elif not _keeps_rgb_as_is(step):
            return None
    return TensorGeometry(kept) if kept else None


def _keeps_rgb_as_is(step: Callable[[Image.Image], object]) -> bool:
    probe = Image.new("RGB", (5, 3), (10, 20, 30))
    try:
        result = step(probe)
    except Exception:
        return False
    return (
        isinstance(result, Image.Image)
        and result.mode == "RGB"
        and result.size == probe.size
        and result.tobytes() == probe.tobytes()
    )


# --- workers: bytes, or CPU-decoded pixels --------------------------------------------------


def device_decodable(data: bytes, limits: ImageLimits) -> bool:
    """Whether the GPU decoder gives the same picture as the CPU path for these bytes.

    Baseline JPEG, RGB or greyscale, no EXIF rotation, size within the limits. Reads only the
    header.
    """
    if not data.startswith(_JPEG_MAGIC):
        return False
    try:
        with Image.open(io.BytesIO(data)) as image:
            if image.format != "JPEG" or image.mode not in ("RGB", "L"):
                return False
            if image.info.get("progressive") or image.info.get("progression"):
                return False
            width, height = image.size
            if min(width, height) < limits.min_side_px or width * height > limits.max_pixels:
                return False
            max_ratio = getattr(limits, "max_aspect_ratio", None)
            if max_ratio is not None and max(width, height) > max_ratio * min(width, height):
                return False
            return image.getexif().get(_EXIF_ORIENTATION, 1) in (0, 1)
    except Exception:  # an unreadable header: the CPU path says why
        return False


@dataclass
class _Item:
    image_id: str
    uri: str
    jpeg: bytes | None = None
    pixels: torch.Tensor | None = None
    failure: tuple[str, str] | None = None


@dataclass
class ImageRowInputs:
    """What both image input paths (device decode here, CPU workers in `compute`) read per row:
    its id, where its bytes are, and how to bring it to the model's input."""

    image_ids: list[str]
    uris: list[str]
    limits: ImageLimits
    input_side_px: int | None
    preprocess: Callable[[Image.Image], torch.Tensor]

    def __len__(self) -> int:
        return len(self.image_ids)


class _EncodedImages(ImageRowInputs):
    """Rows as JPEG bytes for the device, or as CPU-preprocessed pixels; never raises."""

    def __getitem__(self, index: int) -> _Item:
        item = _Item(self.image_ids[index], self.uris[index])
        try:
            data = read_uri_bytes(item.uri)
        except ImageRejected as exc:
            item.failure = (exc.reason, exc.detail)
            return item
        if device_decodable(data, self.limits):
            item.jpeg = data
            return item
        item.pixels, item.failure = cpu_pixels(
            item.uri, self.limits, self.input_side_px, self.preprocess
        )
        return item


def cpu_pixels(
    uri: str,
    limits: ImageLimits,
    input_side_px: int | None,
    preprocess: Callable[[Image.Image], torch.Tensor],
) -> tuple[torch.Tensor | None, tuple[str, str] | None]:
    """The CPU path for one image: (pixels, None) or (None, (reason, detail))."""
    try:
        image = open_image_for_model(uri, limits, input_side_px)
    except ImageRejected as exc:
        return None, (exc.reason, exc.detail)
    try:
        return preprocess(image), None
    except (OSError, ValueError, RuntimeError) as exc:
        return None, (PREPROCESS_FAILED, f"{type(exc).__name__}: {exc}")


@dataclass
class _EncodedBatch:
    """A batch as the workers send it: all JPEG bytes in one tensor (one shared-memory
    transfer instead of one per image), CPU-decoded pixels stacked, failures as skipped rows."""

    ids: list[str]
    on_device: list[bool]
    jpeg_data: torch.Tensor
    jpeg_lengths: list[int]
    jpeg_uris: list[str]
    cpu_pixels: torch.Tensor | None
    skipped: list[SkippedRow]


def _collate_encoded(items: list[_Item]) -> _EncodedBatch:
    kept = [item for item in items if item.failure is None]
    jpegs = [item for item in kept if item.jpeg is not None]
    pixels = [item.pixels for item in kept if item.jpeg is None and item.pixels is not None]
    joined = b"".join(item.jpeg for item in jpegs if item.jpeg is not None)
    return _EncodedBatch(
        ids=[item.image_id for item in kept],
        on_device=[item.jpeg is not None for item in kept],
        jpeg_data=torch.frombuffer(bytearray(joined), dtype=torch.uint8)
        if joined
        else torch.empty(0, dtype=torch.uint8),
        jpeg_lengths=[len(item.jpeg) for item in jpegs if item.jpeg is not None],
        jpeg_uris=[item.uri for item in jpegs],
        cpu_pixels=torch.stack(pixels) if pixels else None,
        skipped=[(item.image_id, *item.failure) for item in items if item.failure is not None],
    )


# --- main process: decode on the device ----------------------------------------------------


def device_image_batches(
    rows: pl.DataFrame,
    preprocess: Callable[[Image.Image], torch.Tensor],
    input_side_px: int | None,
    limits: ImageLimits,
    batch_size: int,
    num_workers: int,
    device: torch.device,
    group_sizes: Sequence[int] | None = None,
) -> Iterator[DeviceBatch]:
    """Corpus rows (`image_id`, `source_uri`) as batches of uint8 pixels on `device`.

    `num_workers` reader threads (0: the calling thread reads). `group_sizes` splits the rows
    into consecutive groups no batch spans (`batch_bounds`); default one group. Raises
    ValueError when `preprocess` has no device version (see `tensor_geometry`); callers check
    that first and keep the CPU path.
    """
    geometry = tensor_geometry(preprocess)
    if geometry is None:
        raise ValueError("this encoder's preprocess cannot run on the device")
    dataset = _EncodedImages(
        rows["image_id"].to_list(), rows["source_uri"].to_list(), limits, input_side_px, preprocess
    )
    fallback = _CpuFallback(limits, input_side_px, preprocess)
    bounds = batch_bounds(group_sizes or [rows.height], batch_size)
    for batch in _read_batches(dataset, bounds, num_workers):
        yield _to_device(batch, geometry, device, fallback)


class BatchBound(NamedTuple):
    """One batch: the group (shard) its rows belong to and its [start, stop) row range."""

    group: int
    start: int
    stop: int


def batch_bounds(group_sizes: Sequence[int], batch_size: int) -> list[BatchBound]:
    """The batches over consecutive groups of rows, in row order.

    A batch never spans two groups: a shard's vectors then come from the same batches whether
    it is embedded alone or streamed with other shards (batch composition changes the float
    rounding of the products, and so, at band edges, which pairs are mined).
    """
    bounds: list[BatchBound] = []
    start = 0
    for group, size in enumerate(group_sizes):
        stop = start + size
        bounds.extend(
            BatchBound(group, row, min(row + batch_size, stop))
            for row in range(start, stop, batch_size)
        )
        start = stop
    return bounds


def _read_batches(
    dataset: _EncodedImages, bounds: Sequence[BatchBound], threads: int
) -> Iterator[_EncodedBatch]:
    """Batches in row order, each read by one of `threads` threads, a few batches ahead."""

    def read(bound: BatchBound) -> _EncodedBatch:
        return _collate_encoded([dataset[index] for index in range(bound.start, bound.stop)])

    ranges = iter(bounds)
    if threads <= 0:
        yield from (read(bound) for bound in ranges)
        return
    with ThreadPoolExecutor(threads, thread_name_prefix="image-reader") as pool:
        pending: deque[Future[_EncodedBatch]] = deque(
            pool.submit(read, bound)
            for _, bound in zip(range(threads * PREFETCH_BATCHES_PER_WORKER), ranges, strict=False)
        )
        while pending:
            batch = pending.popleft().result()
            bound = next(ranges, None)
            if bound is not None:
                pending.append(pool.submit(read, bound))
            yield batch


@dataclass(frozen=True)
class _CpuFallback:
    limits: ImageLimits
    input_side_px: int | None
    preprocess: Callable[[Image.Image], torch.Tensor]

    def __call__(self, uri: str) -> tuple[torch.Tensor | None, tuple[str, str] | None]:
        return cpu_pixels(uri, self.limits, self.input_side_px, self.preprocess)


def _to_device(
    batch: _EncodedBatch,
    geometry: TensorGeometry,
    device: torch.device,
    fallback: _CpuFallback,
) -> DeviceBatch:
    """Decode a batch's JPEGs on the device and put every row's pixels in row order.

    On a GPU all of it runs on a side stream of its own. torchvision's decoder allocates its
    outputs on the current stream but writes them from an internal stream without waiting for
    the current one; on the model's stream it could therefore be handed memory that a still
    queued forward pass uses (measured on one H200: EVA02-L-14 embeddings came out NaN for 1,337
    of 20,000 images). The side stream's memory pool holds only this function's tensors, and
    the host waits for the side stream's previous work before each decode, so nothing still
    queued reads what the decoder writes. The model's stream then waits for the side stream.
    """
    if device.type != "cuda":
        return _decode_and_place(batch, geometry, device, fallback)
    side = _side_stream(device)
    side.synchronize()
    model_stream = torch.cuda.current_stream(device)
    with torch.cuda.stream(side):
        placed = _decode_and_place(batch, geometry, device, fallback)
    model_stream.wait_stream(side)
    if placed.pixels is not None:
        # Freed later on the model's stream: not reusable before that stream is done with it.
        placed.pixels.record_stream(model_stream)
    return placed


@lru_cache(maxsize=8)
def _side_stream(device: torch.device) -> torch.cuda.Stream:
    return torch.cuda.Stream(device=device)


def _decode_and_place(
    batch: _EncodedBatch,
    geometry: TensorGeometry,
    device: torch.device,
    fallback: _CpuFallback,
) -> DeviceBatch:
    jpegs = list(torch.split(batch.jpeg_data, batch.jpeg_lengths)) if batch.jpeg_lengths else []
    decoded = decode_jpegs(jpegs, device)
    pictures: dict[int, torch.Tensor] = {}
    late_pixels: dict[int, torch.Tensor] = {}
    skipped = list(batch.skipped)
    jpeg_positions = [i for i, on_device in enumerate(batch.on_device) if on_device]
    for position, picture, uri in zip(jpeg_positions, decoded, batch.jpeg_uris, strict=True):
        if picture is not None:
            pictures[position] = picture
            continue
        pixels, failure = fallback(uri)
        if pixels is not None:
            late_pixels[position] = pixels
        elif failure is not None:
            skipped.append((batch.ids[position], *failure))
    cpu_positions = [i for i, on_device in enumerate(batch.on_device) if not on_device]
    kept = sorted([*pictures, *late_pixels, *cpu_positions])
    if not kept:
        return DeviceBatch(ids=[], pixels=None, skipped=skipped)
    parts: list[tuple[list[int], torch.Tensor]] = []
    if pictures:
        parts.append((list(pictures), geometry(list(pictures.values()))))
    if late_pixels:
        parts.append((list(late_pixels), torch.stack(list(late_pixels.values())).to(device)))
    if batch.cpu_pixels is not None:
        parts.append((cpu_positions, batch.cpu_pixels.to(device, non_blocking=True)))
    slot = {position: i for i, position in enumerate(kept)}
    first = parts[0][1]
    pixels = first.new_empty((len(kept), *first.shape[1:]))
    for positions, values in parts:
        pixels[torch.tensor([slot[p] for p in positions], device=device)] = values
    return DeviceBatch(
        ids=[batch.ids[p] for p in kept],
        pixels=pixels,
        skipped=skipped,
        device_decoded=len(pictures),
    )


def decode_jpegs(jpegs: list[torch.Tensor], device: torch.device) -> list[torch.Tensor | None]:
    """Decode JPEG byte tensors to uint8 RGB CHW pictures on `device`; None where it fails.

    One batched call first; if the decoder refuses the batch, each image alone, so one bad
    file costs only itself.
    """
    if not jpegs:
        return []
    from torchvision.io import ImageReadMode, decode_jpeg

    try:
        return list(decode_jpeg(jpegs, mode=ImageReadMode.RGB, device=device))
    except RuntimeError:
        pass
    pictures: list[torch.Tensor | None] = []
    for data in jpegs:
        try:
            pictures.append(decode_jpeg([data], mode=ImageReadMode.RGB, device=device)[0])
        except RuntimeError:
            pictures.append(None)
    return pictures
