"""Opening one benchmark image as the RGB picture a retriever embeds."""

from __future__ import annotations

from PIL import Image

from megapairs_assets.corpus.images import ImageLimits, open_image_for_model, open_image_rgb
from megapairs_assets.evaluation.benchmark import GENECIS_BOX_DILATION, ImageRef

# A benchmark's gallery is fixed: an image the corpus would refuse as too small (a product
# thumbnail, a placeholder) is still one the official evaluation embeds, and refusing it would
# leave the whole benchmark unscored. The pixel and aspect bounds stay: they bound memory.
_LIMITS = ImageLimits(min_side_px=1)


def open_benchmark_image(ref: ImageRef, input_side_px: int | None = None) -> Image.Image:
    """The image behind `ref`, validated RGB; GeneCIS boxes are cropped and squared.

    Without a box, JPEGs may decode at a reduced scale that still covers `input_side_px`
    (the same fast path the embedding stages use). Raises the corpus's `ImageRejected` for a
    missing or undecodable file.
    """
    if ref.box is None:
        return open_image_for_model(ref.uri, _LIMITS, input_side_px)
    return crop_dilated_square(open_image_rgb(ref.uri, _LIMITS), ref.box)


def crop_dilated_square(
    image: Image.Image,
    box: tuple[float, float, float, float],
    dilation: float = GENECIS_BOX_DILATION,
) -> Image.Image:
    """GeneCIS's attribute crop: grow the (x, y, w, h) box, crop, pad to a square in black.

    The box's left/top edge moves out by `dilation` times its size and the crop spans
    (1 + dilation) times the size from there, clipped to the image; padding centres the crop.
    """
    x, y, width, height = box
    left = max(0.0, x - dilation * width)
    top = max(0.0, y - dilation * height)
    right = min(float(image.width), left + (1 + dilation) * width)
    bottom = min(float(image.height), top + (1 + dilation) * height)
    crop = image.crop((left, top, right, bottom))
    side = max(crop.width, crop.height)
    if crop.width == crop.height:
        return crop
    square = Image.new(crop.mode, (side, side), (0, 0, 0))
    square.paste(crop, ((side - crop.width) // 2, (side - crop.height) // 2))
    return square
