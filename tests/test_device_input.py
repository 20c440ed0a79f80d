"""Device-side image decoding: same pixels and embeddings as the CPU path, clean fallbacks.

On a CPU-only machine the "device" path runs with torchvision's CPU JPEG decoder, which goes
through the same batching, grouping, resizing and fallback code as nvJPEG on a GPU.
"""

from __future__ import annotations

from pathlib import Path

import image_factory as factory
import numpy as np
import polars as pl
import pytest
import torch

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.embeddings.compute import embed_rows
from megapairs_assets.embeddings.device_input import (
    default_num_workers,
    device_decodable,
    device_image_batches,
    tensor_geometry,
    uses_device_decode,
)
from megapairs_assets.embeddings.encoders import EncoderSpec, load_encoder

CPU = torch.device("cpu")
LIMITS = ImageLimits()


def _rows(tar_path: Path, items: list[tuple[str, bytes]]) -> pl.DataFrame:
    factory.write_wds_shard(tar_path, [(key, data, f"caption {key}") for key, data in items])
    extension = {key: "png" if data.startswith(b"\x89PNG") else "jpg" for key, data in items}
    return pl.DataFrame(
        {
            "image_id": [key for key, _ in items],
            "source_uri": [f"{tar_path}#{key}.{extension[key]}" for key, _ in items],
        }
    )


@pytest.fixture(scope="module")
def clip_encoder(demo_models_dir: Path):
    checkpoint = str(demo_models_dir / f"{DEMO_CLIP_MODEL}.pt")
    return load_encoder(
        EncoderSpec("open_clip_image", DEMO_CLIP_MODEL, checkpoint), CPU, torch.float32
    )


def test_auto_keeps_the_cpu_path_without_a_gpu() -> None:
    assert uses_device_decode("cpu", CPU) is False
    assert uses_device_decode("auto", CPU) is False
    if not torch.cuda.is_available():
        assert uses_device_decode("auto", torch.device("cuda")) is False
        with pytest.raises(RuntimeError, match="no CUDA device"):
            uses_device_decode("device", torch.device("cuda"))
    with pytest.raises(ValueError, match="unknown image_decode"):
        uses_device_decode("gpu", CPU)  # type: ignore[arg-type]


def test_only_plain_jpegs_are_sent_to_the_device() -> None:
    assert device_decodable(factory.good_jpeg_bytes(1), LIMITS)
    assert not device_decodable(factory.good_png_bytes(1), LIMITS)
    assert not device_decodable(factory.cmyk_jpeg_bytes(), LIMITS)
    assert not device_decodable(factory.rotated_jpeg_bytes(), LIMITS)  # GPU ignores EXIF
    assert not device_decodable(factory.not_an_image_bytes(), LIMITS)
    assert not device_decodable(factory.good_jpeg_bytes(1), ImageLimits(min_side_px=100))


def test_device_path_matches_the_cpu_path(tmp_path: Path, clip_encoder) -> None:
    items = [(f"{i:03d}", factory.good_jpeg_bytes(i, (160, 120 + 8 * (i % 3)))) for i in range(9)]
    rows = _rows(tmp_path / "photos.tar", items)

    on_cpu = embed_rows(rows, clip_encoder, LIMITS, 4, 0, CPU, image_decode="cpu")
    on_device = embed_rows(rows, clip_encoder, LIMITS, 4, 0, CPU, image_decode="device")

    assert on_device.ids == on_cpu.ids == rows["image_id"].to_list()
    assert on_device.device_decoded == 9 and on_cpu.device_decoded == 0
    cosines = (on_device.vectors.astype(np.float32) * on_cpu.vectors.astype(np.float32)).sum(1)
    assert cosines.min() > 0.995


def test_device_pixels_are_close_to_the_cpu_preprocess(tmp_path: Path, clip_encoder) -> None:
    items = [(f"{i:03d}", factory.good_jpeg_bytes(i, (300, 200))) for i in range(3)]
    rows = _rows(tmp_path / "photos.tar", items)
    batches = list(
        device_image_batches(
            rows, clip_encoder.preprocess, clip_encoder.input_size_px, LIMITS, 8, 0, CPU
        )
    )
    assert len(batches) == 1 and batches[0].device_decoded == 3
    pixels = batches[0].pixels
    assert pixels is not None and pixels.dtype == torch.uint8
    import io

    from PIL import Image

    reference = torch.stack(
        [clip_encoder.preprocess(Image.open(io.BytesIO(data)).convert("RGB")) for _, data in items]
    )
    assert pixels.shape == reference.shape
    # Same resize filter and size; only the rounding of the two implementations differs.
    assert (pixels.int() - reference.int()).abs().float().mean() < 2.0


def test_mixed_inputs_fall_back_to_the_cpu_and_keep_row_order(tmp_path: Path, clip_encoder) -> None:
    items = [
        ("a", factory.good_jpeg_bytes(1, (96, 80))),
        ("b", factory.good_png_bytes(2, (96, 80))),  # not a JPEG: CPU path
        ("c", factory.truncated_jpeg_bytes()),  # header fine, data cut: the decoder refuses
        ("d", factory.cmyk_jpeg_bytes()),  # CMYK: CPU path
        ("e", factory.rotated_jpeg_bytes()),  # EXIF rotation: CPU path
        ("f", factory.good_jpeg_bytes(3, (80, 96))),
    ]
    rows = _rows(tmp_path / "mixed.tar", items)
    rows = pl.concat(
        [rows, pl.DataFrame({"image_id": ["g"], "source_uri": [str(tmp_path / "gone.jpg")]})]
    )
    progress: list[int] = []
    on_device = embed_rows(rows, clip_encoder, LIMITS, 4, 2, CPU, progress.append, "device")
    on_cpu = embed_rows(rows, clip_encoder, LIMITS, 4, 0, CPU, image_decode="cpu")

    assert on_device.ids == on_cpu.ids == ["a", "b", "d", "e", "f"]
    assert on_device.device_decoded == 2  # a and f; c was refused and retried on the CPU
    assert (
        {row[:2] for row in on_device.skipped}
        == {row[:2] for row in on_cpu.skipped}
        == {
            ("c", "decode_error"),
            ("g", "missing_file"),
        }
    )
    assert sum(progress) == rows.height
    cosines = (on_device.vectors.astype(np.float32) * on_cpu.vectors.astype(np.float32)).sum(1)
    assert cosines.min() > 0.99


def test_unknown_preprocess_has_no_device_version() -> None:
    assert tensor_geometry(lambda image: image) is None
    assert tensor_geometry(None) is None


def test_worker_count_follows_the_machine() -> None:
    assert default_num_workers(True, cpu_count=16) == 8
    assert default_num_workers(False, cpu_count=16) == 15
    assert default_num_workers(True, cpu_count=1) == 1
    assert default_num_workers(False, cpu_count=1) == 0
