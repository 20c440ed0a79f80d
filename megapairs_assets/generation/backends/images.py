"""Turning a request's symbolic image parts into what a model server or processor takes."""

from __future__ import annotations

import base64
import io
from collections.abc import Mapping, Sequence
from functools import lru_cache
from typing import Any

from PIL import Image

from megapairs_assets.corpus.images import ImageLimits, open_image_rgb
from megapairs_assets.generation.backends.base import ImageInput

_JPEG_QUALITY = 90


def load_image(image: ImageInput, max_side_px: int | None) -> Image.Image:
    """The image as validated RGB, its longer side shrunk to `max_side_px` (aspect kept)."""
    return open_image_rgb(image.uri, ImageLimits(), max_side_px=max_side_px)


@lru_cache(maxsize=512)
def _data_url(uri: str, max_side_px: int | None) -> str:
    # One query image appears in several pairs; caching the encoding saves repeated work.
    picture = open_image_rgb(uri, ImageLimits(), max_side_px=max_side_px)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=_JPEG_QUALITY)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def image_data_url(image: ImageInput, max_side_px: int | None) -> str:
    """A `data:image/jpeg;base64,...` URL of the image, resized to `max_side_px`."""
    return _data_url(image.uri, max_side_px)


def openai_messages(
    messages: Sequence[Mapping[str, Any]],
    images: Mapping[str, ImageInput],
    max_side_px: int | None,
) -> list[dict[str, Any]]:
    """Chat messages in the OpenAI wire format: image parts become base64 `image_url` parts."""
    rendered = []
    for message in messages:
        content = message["content"]
        if isinstance(content, str):
            rendered.append({"role": message["role"], "content": content})
            continue
        parts = []
        for part in content:
            if part.get("type") == "image":
                url = image_data_url(images[part["ref"]], max_side_px)
                parts.append({"type": "image_url", "image_url": {"url": url}})
            else:
                parts.append(dict(part))
        rendered.append({"role": message["role"], "content": parts})
    return rendered


def has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    """Whether any message carries an image part."""
    return any(
        not isinstance(m["content"], str) and any(p.get("type") == "image" for p in m["content"])
        for m in messages
    )
