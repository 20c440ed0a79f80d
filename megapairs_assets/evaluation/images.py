"""Opening one benchmark image as the RGB picture a retriever embeds.

The benchmarks' official evaluation code (SEARLE and CLIP4Cir for CIRCO, CIRR and FashionIQ;
GeneCIS's own) opens every image with `Image.open(path).convert("RGB")`, then applies the
model's preprocess. Benchmark images are decoded the same way here (the corpus's
`as_stored` decoding): no EXIF rotation (a photo tagged as rotated is embedded, and a GeneCIS
box is cropped, in the file's stored orientation, as the boxes were drawn), no reduced-scale
JPEG decode (it would change the pixels the preprocess resizes), alpha dropped rather than
composited on white. The corpus, training and `megapairs search` keep their own decoding
(upright photos, fast JPEG drafts), and so does the held-out split, whose images are corpus
images: no published number is computed on them.
"""

from __future__ import annotations

from PIL import Image

from megapairs_assets.corpus.images import ImageLimits, open_image_for_model, open_image_rgb
from megapairs_assets.evaluation.benchmark import (
    CORPUS_DECODING,
    GENECIS_BOX_DILATION,
    OFFICIAL_DECODING,
    ImageRef,
)

# A benchmark's gallery is fixed: an image the corpus would refuse as too small (a product
# thumbnail, a placeholder) is still one the official evaluation embeds, and refusing it would
# leave the whole benchmark unscored. The pixel and aspect bounds stay: they bound memory.
_LIMITS = ImageLimits(min_side_px=1)


def open_benchmark_image(
    ref: ImageRef, decoding: str = OFFICIAL_DECODING, input_side_px: int | None = None
) -> Image.Image:
    """The image behind `ref`, validated RGB; GeneCIS boxes are cropped and squared.

    `decoding`: OFFICIAL_DECODING, as the official loaders open it (module docstring), or
    CORPUS_DECODING, as training decodes corpus images (the held-out split; JPEGs may then
    decode at a reduced scale that still covers `input_side_px`). Raises the corpus's
    `ImageRejected` for a missing or undecodable file.
    """
    if decoding == OFFICIAL_DECODING:
        image = open_image_rgb(ref.uri, _LIMITS, as_stored=True)
    elif decoding == CORPUS_DECODING and ref.box is None:
        return open_image_for_model(ref.uri, _LIMITS, input_side_px)
    elif decoding == CORPUS_DECODING:
        image = open_image_rgb(ref.uri, _LIMITS)
    else:
        raise ValueError(f"unknown image decoding {decoding!r}")
    return image if ref.box is None else crop_dilated_square(image, ref.box)


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
