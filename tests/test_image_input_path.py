"""The fast image input path gives the same embeddings as the models' own float preprocess.

Workers send uint8 resized-and-cropped pixels and the device normalises them; JPEGs decode at
a reduced DCT scale. Both are speed changes only: the vectors must match the reference path.
"""

from __future__ import annotations

import io
from pathlib import Path

import image_factory as factory
import numpy as np
import open_clip
import pytest
import torch
from PIL import Image
from transformers import AutoImageProcessor

from megapairs_assets.corpus.images import DRAFT_MARGIN, ImageLimits, open_image_for_model
from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.embeddings.encoders import EncoderSpec, load_encoder

CPU = torch.device("cpu")


def _pictures() -> list[Image.Image]:
    return [factory.picture(seed, (160, 120)) for seed in range(4)]


def _cosines(a: torch.Tensor, b: torch.Tensor) -> np.ndarray:
    return torch.nn.functional.cosine_similarity(a, b).numpy()


def test_clip_uint8_path_matches_open_clip_float_preprocess(demo_models_dir: Path) -> None:
    checkpoint = str(demo_models_dir / f"{DEMO_CLIP_MODEL}.pt")
    encoder = load_encoder(
        EncoderSpec("open_clip_image", DEMO_CLIP_MODEL, checkpoint), CPU, torch.float32
    )
    model, _, reference_preprocess = open_clip.create_model_and_transforms(
        DEMO_CLIP_MODEL, pretrained=checkpoint
    )
    pictures = _pictures()
    uint8_batch = torch.stack([encoder.preprocess(p) for p in pictures])
    assert uint8_batch.dtype == torch.uint8  # a quarter of the bytes of float pixels
    with torch.inference_mode():
        fast = encoder.encode_images(uint8_batch)
        reference = model.eval().encode_image(
            torch.stack([reference_preprocess(p) for p in pictures])
        )
    assert _cosines(fast, reference).min() > 0.9999


def test_dinov2_uint8_path_matches_the_hf_processor(demo_models_dir: Path) -> None:
    model_dir = demo_models_dir / "dinov2-tiny"
    encoder = load_encoder(EncoderSpec("dinov2", str(model_dir)), CPU, torch.float32)
    processor = AutoImageProcessor.from_pretrained(model_dir, local_files_only=True)
    pictures = _pictures()
    uint8_batch = torch.stack([encoder.preprocess(p) for p in pictures])
    assert uint8_batch.dtype == torch.uint8
    reference_pixels = processor(images=pictures, return_tensors="pt")["pixel_values"]
    with torch.inference_mode():
        fast = encoder.encode_images(uint8_batch)
        reference = encoder.encode_images(reference_pixels)  # float pixels take the old path
    assert _cosines(fast, reference).min() > 0.999


@pytest.mark.parametrize("input_side_px", [64, 224])
def test_jpeg_decodes_at_reduced_scale_but_never_below_the_model_input(
    tmp_path: Path, input_side_px: int
) -> None:
    photo = factory.picture(7, (1024, 768))
    path = tmp_path / "photo.jpg"
    buffer = io.BytesIO()
    photo.save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue())
    decoded = open_image_for_model(str(path), ImageLimits(), input_side_px)
    assert min(decoded.size) >= input_side_px * DRAFT_MARGIN  # no upsampling later
    assert decoded.size[0] < 1024  # the DCT draft skipped work
    assert decoded.mode == "RGB"
