"""Tiny good and bad corpus inputs, written on demand into a test's tmp folder.

Bytes helpers (`*_bytes`) return an encoded file; writers put shards, folders and manifests on
disk in the layouts the corpus sources read. Everything is small and built in memory, so any
test can afford it.
"""

from __future__ import annotations

import functools
import io
import json
import struct
import tarfile
import zlib
from pathlib import Path

import numpy as np
import polars as pl
from PIL import Image

GOOD_SIZE_PX = (64, 48)
CMYK_INK = (0, 255, 255, 0)  # pure magenta + yellow ink: prints as red
RGBA_OPAQUE_RGB = (200, 30, 40)
HUGE_SIDE_PX = 20_000


def _encode(image: Image.Image, image_format: str, **save_options: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format=image_format, **save_options)
    return buffer.getvalue()


def picture(seed: int, size_px: tuple[int, int] = GOOD_SIZE_PX) -> Image.Image:
    """An RGB picture whose content differs with `seed`: a gradient, a block and some noise."""
    rng = np.random.default_rng(seed)
    width, height = size_px
    ramp = np.linspace(0, 1, width)[None, :, None] * rng.uniform(60, 200, size=3)
    pixels = np.broadcast_to(ramp, (height, width, 3)).copy()
    top, left = rng.integers(0, height // 2), rng.integers(0, width // 2)
    pixels[top : top + height // 3, left : left + width // 3] = rng.uniform(0, 255, size=3)
    pixels += rng.normal(0, 8, size=pixels.shape)
    return Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")


def good_jpeg_bytes(seed: int, size_px: tuple[int, int] = GOOD_SIZE_PX) -> bytes:
    """A valid RGB JPEG with seed-dependent content."""
    return _encode(picture(seed, size_px), "JPEG", quality=90)


def good_png_bytes(seed: int, size_px: tuple[int, int] = GOOD_SIZE_PX) -> bytes:
    """A valid RGB PNG with seed-dependent content."""
    return _encode(picture(seed, size_px), "PNG")


def truncated_jpeg_bytes(seed: int = 1000) -> bytes:
    """A JPEG cut off halfway through its compressed data (the header is intact)."""
    whole = good_jpeg_bytes(seed, size_px=(256, 192))
    return whole[: len(whole) // 2]


def not_an_image_bytes() -> bytes:
    """Bytes that no image decoder recognises."""
    return b"this is plainly not an image\n" * 20


def tiny_png_bytes() -> bytes:
    """A valid 1x1 PNG, below any sensible minimum side."""
    return _encode(Image.new("RGB", (1, 1), (10, 20, 30)), "PNG")


@functools.cache
def huge_png_bytes() -> bytes:
    """A valid 20000x20000 black-and-white PNG (400 MB once decoded by PIL, ~50 KB on disk).

    One bit per pixel keeps the scanlines short, and they are compressed as a stream, so
    making it never holds the pixels.
    """
    scanline = b"\x00" * (1 + HUGE_SIDE_PX // 8)  # filter byte + one bit per pixel
    compressor = zlib.compressobj(1)
    rows_per_chunk = 1000
    compressed = [
        compressor.compress(scanline * rows_per_chunk)
        for _ in range(HUGE_SIDE_PX // rows_per_chunk)
    ]
    compressed.append(compressor.flush())
    # width, height, bit depth 1, colour type 0 (grayscale), deflate, adaptive filter, no interlace
    header = struct.pack(">IIBBBBB", HUGE_SIDE_PX, HUGE_SIDE_PX, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(compressed))
        + _png_chunk(b"IEND", b"")
    )


def huge_png_header_only_bytes() -> bytes:
    """A PNG whose header claims 20000x20000 but whose pixel data is garbage.

    Only a check made from the header alone can call this `too_large` rather than broken.
    """
    header = struct.pack(">IIBBBBB", HUGE_SIDE_PX, HUGE_SIDE_PX, 8, 2, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"not deflate data")
        + _png_chunk(b"IEND", b"")
    )


def _png_chunk(kind: bytes, payload: bytes) -> bytes:
    checksum = zlib.crc32(kind + payload) & 0xFFFFFFFF
    return struct.pack(">I", len(payload)) + kind + payload + struct.pack(">I", checksum)


def cmyk_jpeg_bytes() -> bytes:
    """A CMYK JPEG of one ink colour (`CMYK_INK`, red when printed)."""
    return _encode(Image.new("CMYK", GOOD_SIZE_PX, CMYK_INK), "JPEG", quality=95)


def rgba_png_bytes() -> bytes:
    """An RGBA PNG: left half fully transparent, right half opaque `RGBA_OPAQUE_RGB`."""
    image = Image.new("RGBA", GOOD_SIZE_PX, (0, 0, 0, 0))
    width, height = GOOD_SIZE_PX
    image.paste((*RGBA_OPAQUE_RGB, 255), (width // 2, 0, width, height))
    return _encode(image, "PNG")


def grayscale_png_bytes() -> bytes:
    """An 8-bit grayscale (mode L) PNG with a left-to-right ramp from 0 to 255."""
    width, height = GOOD_SIZE_PX
    ramp = np.linspace(0, 255, width).round().astype(np.uint8)
    return _encode(Image.fromarray(np.tile(ramp, (height, 1)), mode="L"), "PNG")


def sixteen_bit_png_bytes() -> bytes:
    """A 16-bit grayscale PNG (I;16) with a left-to-right ramp over the full 0..65535 range."""
    width, height = GOOD_SIZE_PX
    ramp = np.linspace(0, 65535, width).round().astype(np.uint16)
    return _encode(Image.fromarray(np.tile(ramp, (height, 1))), "PNG")


def rotated_jpeg_bytes() -> bytes:
    """A 64x32 (landscape) JPEG whose EXIF says 'rotate 90°': it should come out 32x64."""
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90° clockwise to display
    return _encode(picture(7, (64, 32)), "JPEG", exif=exif.tobytes())


def long_caption(chars: int = 10_000) -> str:
    """A caption of `chars` characters made of short words."""
    words = "a long caption made of many ordinary words "
    return (words * (chars // len(words) + 1))[:chars]


def write_wds_shard(path: Path, items: list[tuple[str, bytes | None, str | None]]) -> Path:
    """Write a webdataset tar like img2dataset: `<key>.jpg`, `<key>.txt`, `<key>.json`.

    The image member's extension follows its bytes (`.png` for PNG, `.jpg` otherwise). An item
    with image bytes None gets no image member; a caption None gets no `.txt` (the `.json` is
    written either way, as img2dataset does, with the caption when there is one).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode="w") as tar:
        for key, image_bytes, caption in items:
            if image_bytes is not None:
                _add_member(tar, f"{key}.{_extension_of(image_bytes)}", image_bytes)
            if caption is not None:
                _add_member(tar, f"{key}.txt", caption.encode("utf-8"))
            metadata = {"key": key, "status": "success", "caption": caption}
            _add_member(tar, f"{key}.json", json.dumps(metadata).encode("utf-8"))
    return path


def write_tar_members(path: Path, members: list[tuple[str, bytes]]) -> Path:
    """Write a tar holding exactly these (member name, bytes), for layouts img2dataset avoids."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode="w") as tar:
        for name, data in members:
            _add_member(tar, name, data)
    return path


def _extension_of(image_bytes: bytes) -> str:
    return "png" if image_bytes.startswith(b"\x89PNG") else "jpg"


def _add_member(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size = len(data)
    info.mtime = 1_700_000_000
    tar.addfile(info, io.BytesIO(data))


def good_items(count: int, first_seed: int = 0) -> list[tuple[str, bytes, str]]:
    """`count` distinct good JPEG items keyed like img2dataset (`000000000`, `000000001`...)."""
    return [
        (f"{first_seed + index:09d}", good_jpeg_bytes(first_seed + index), f"photo {index}")
        for index in range(count)
    ]


def write_truncated_wds_shard(
    path: Path, items: list[tuple[str, bytes | None, str | None]], keep_fraction: float = 0.6
) -> Path:
    """Write a shard, then cut the file partway through (as an interrupted download would)."""
    write_wds_shard(path, items)
    whole = path.read_bytes()
    path.write_bytes(whole[: int(len(whole) * keep_fraction)])
    return path


def write_not_a_tar(path: Path, size_bytes: int = 4096, seed: int = 0) -> Path:
    """Random bytes under a `.tar` name."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(np.random.default_rng(seed).bytes(size_bytes))
    return path


def write_duplicate_key_shards(folder: Path) -> tuple[Path, Path]:
    """Two shards (`00000.tar`, `00001.tar`) holding the same keys with different images."""
    first = write_wds_shard(folder / "00000.tar", good_items(3, first_seed=0))
    same_keys = [
        (key, good_jpeg_bytes(100 + i), caption)
        for i, (key, _, caption) in enumerate(good_items(3, first_seed=0))
    ]
    second = write_wds_shard(folder / "00001.tar", same_keys)
    return first, second


def write_image_folder(
    folder: Path, items: list[tuple[str, bytes, str | None]], extension: str = "jpg"
) -> Path:
    """Write `<key>.<extension>` images with `<key>.txt` captions (no sidecar when None)."""
    folder.mkdir(parents=True, exist_ok=True)
    for key, image_bytes, caption in items:
        (folder / f"{key}.{extension}").write_bytes(image_bytes)
        if caption is not None:
            (folder / f"{key}.txt").write_text(caption, encoding="utf-8")
    return folder


@functools.cache
def _tiny_jpeg() -> bytes:
    return good_jpeg_bytes(0, size_px=(16, 16))


def unique_tiny_jpeg_bytes(index: int) -> bytes:
    """A valid 16x16 JPEG whose bytes (not pixels) differ with `index`: one shared picture with
    a comment segment naming `index`, so thousands cost no encoding and no two share a hash."""
    picture_bytes, text = _tiny_jpeg(), b"photo %d" % index
    comment = b"\xff\xfe" + struct.pack(">H", len(text) + 2) + text
    return picture_bytes[:2] + comment + picture_bytes[2:]


def write_loose_photos(folder: Path, count: int, caption_every: int = 1) -> dict[str, str | None]:
    """`count` tiny unique JPEGs `IMG_<n>.jpg` straight in `folder`, as a phone export holds
    them; every `caption_every`-th gets a caption, in turn as `.txt`, `.caption` and `.json`.

    Returns image key -> its caption (None without one).
    """
    folder.mkdir(parents=True, exist_ok=True)
    captions: dict[str, str | None] = {}
    for index in range(count):
        key = f"IMG_{index:05d}"
        (folder / f"{key}.jpg").write_bytes(unique_tiny_jpeg_bytes(index))
        caption = f"holiday photo {index}" if index % caption_every == 0 else None
        if caption is not None:
            sidecar = ("txt", "caption", "json")[(index // caption_every) % 3]
            text = json.dumps({"caption": caption}) if sidecar == "json" else caption
            (folder / f"{key}.{sidecar}").write_text(text, encoding="utf-8")
        captions[key] = caption
    return captions


def write_manifest(path: Path, rows: list[dict[str, object]]) -> Path:
    """Write manifest rows as `.parquet` or `.jsonl`, chosen by the path's suffix."""
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".parquet":
        pl.DataFrame(rows).write_parquet(path)
    else:
        path.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    return path


def write_manifest_with_missing_file(folder: Path, suffix: str = ".jsonl") -> Path:
    """A manifest whose first row is a good image and whose second points at no file."""
    (folder / "images").mkdir(parents=True, exist_ok=True)
    (folder / "images" / "good.jpg").write_bytes(good_jpeg_bytes(0))
    rows = [
        {"key": "good", "path": "images/good.jpg", "caption": "a good photo"},
        {"key": "gone", "path": "images/never_written.jpg", "caption": "a lost photo"},
    ]
    return write_manifest(folder / f"manifest{suffix}", rows)


# --- reliability inputs (issue 7): extreme shapes, non-finite pixels, odd tar members -------


def strip_png_bytes(width_px: int, height_px: int) -> bytes:
    """A valid black 1-bit grayscale PNG of any shape, built without holding its pixels.

    A 1,000,000 x 16 strip is ~15 KB on disk but huge once a model scales its short side up.
    """
    scanline = b"\x00" * (1 + (width_px + 7) // 8)  # filter byte + one bit per pixel
    compressor = zlib.compressobj(9)
    compressed = [compressor.compress(scanline) for _ in range(height_px)]
    compressed.append(compressor.flush())
    header = struct.pack(">IIBBBBB", width_px, height_px, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + _png_chunk(b"IHDR", header)
        + _png_chunk(b"IDAT", b"".join(compressed))
        + _png_chunk(b"IEND", b"")
    )


def float_tiff_bytes(fill: float, size_px: tuple[int, int] = GOOD_SIZE_PX) -> bytes:
    """A 32-bit float (mode F) TIFF: a 0..1 ramp with its left column set to `fill`."""
    width, height = size_px
    values = np.tile(np.linspace(0.0, 1.0, width, dtype=np.float32), (height, 1))
    values[:, 0] = fill
    return _encode(Image.fromarray(values, mode="F"), "TIFF")


def write_tar_with_special_members(path: Path, image_bytes: bytes) -> Path:
    """A tar holding one good image plus one member of every kind the corpus does not read.

    Members: `good.jpg` (regular), `dir/` (directory), `link.jpg` (symlink to good.jpg),
    `hard.jpg` (hard link to good.jpg), `pipe.jpg` (FIFO), `tty.jpg` (character device),
    `extra.npy` (regular file with an unknown extension).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    with tarfile.open(path, mode="w") as tar:
        _add_member(tar, "good.jpg", image_bytes)
        for name, kind, target in [
            ("dir", tarfile.DIRTYPE, ""),
            ("link.jpg", tarfile.SYMTYPE, "good.jpg"),
            ("hard.jpg", tarfile.LNKTYPE, "good.jpg"),
            ("pipe.jpg", tarfile.FIFOTYPE, ""),
            ("tty.jpg", tarfile.CHRTYPE, ""),
        ]:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.mtime = kind, target, 1_700_000_000
            tar.addfile(info)
        _add_member(tar, "extra.npy", b"\x93NUMPY")
    return path


# --- new-user inputs: other formats, animated GIFs, phone photos Pillow cannot open ----------


def encoded_bytes(seed: int, image_format: str, size_px: tuple[int, int] = GOOD_SIZE_PX) -> bytes:
    """A seed-dependent picture in any format Pillow writes (`WEBP`, `BMP`, `TIFF`, `AVIF`)."""
    return _encode(picture(seed, size_px), image_format)


def animated_gif_bytes(seed: int, frames: int = 3) -> bytes:
    """An animated GIF of `frames` different pictures."""
    images = [picture(seed + index).convert("P") for index in range(frames)]
    buffer = io.BytesIO()
    images[0].save(buffer, format="GIF", save_all=True, append_images=images[1:], duration=100)
    return buffer.getvalue()


def heic_like_bytes() -> bytes:
    """The start of a HEIC phone photo (an ISO media `ftyp` box of brand `heic`), which no
    stock Pillow build decodes."""
    return struct.pack(">I", 24) + b"ftypheic" + b"\x00" * 4 + b"mif1heic" + b"\x00" * 64


# --- scale inputs: a medium corpus of varied, captioned JPEGs in shard folders ----------------

SCALE_COLOURS = {
    "red": (200, 40, 40),
    "green": (40, 160, 60),
    "blue": (40, 70, 200),
    "yellow": (230, 210, 40),
    "purple": (130, 50, 160),
    "orange": (240, 140, 30),
    "black": (20, 20, 20),
    "white": (240, 240, 240),
}
SCALE_SHAPES = ("circle", "square", "triangle", "bar", "ring", "cross")
SCALE_BACKGROUNDS = {"grey": (128, 128, 128), "sky": (150, 200, 240), "sand": (220, 200, 150)}


def scale_item(seed: int) -> tuple[bytes, str]:
    """One varied JPEG (96-256 px a side) and its caption, both chosen by `seed`.

    The caption names the drawn shape, its colour and the background from a small vocabulary
    (8 x 6 x 3 combinations), so images and captions that share words also look alike and the
    caption and image KNN graphs both find structure.
    """
    from PIL import ImageDraw

    rng = np.random.default_rng(seed)
    colour = list(SCALE_COLOURS)[rng.integers(len(SCALE_COLOURS))]
    shape = SCALE_SHAPES[rng.integers(len(SCALE_SHAPES))]
    background = list(SCALE_BACKGROUNDS)[rng.integers(len(SCALE_BACKGROUNDS))]
    width, height = (int(side) for side in rng.integers(96, 257, size=2))
    image = Image.new("RGB", (width, height), SCALE_BACKGROUNDS[background])
    draw = ImageDraw.Draw(image)
    side = int(min(width, height) * rng.uniform(0.35, 0.8))
    left = int(rng.integers(0, width - side + 1))
    top = int(rng.integers(0, height - side + 1))
    box = (left, top, left + side, top + side)
    fill = tuple(
        int(c) for c in np.clip(np.array(SCALE_COLOURS[colour]) + rng.normal(0, 12, 3), 0, 255)
    )
    if shape == "circle":
        draw.ellipse(box, fill=fill)
    elif shape == "square":
        draw.rectangle(box, fill=fill)
    elif shape == "triangle":
        draw.polygon(
            [(left, top + side), (left + side // 2, top), (left + side, top + side)], fill=fill
        )
    elif shape == "bar":
        draw.rectangle((left, top + side // 3, left + side, top + 2 * side // 3), fill=fill)
    elif shape == "ring":
        draw.ellipse(box, outline=fill, width=max(3, side // 8))
    else:
        third = side // 3
        draw.rectangle((left + third, top, left + 2 * third, top + side), fill=fill)
        draw.rectangle((left, top + third, left + side, top + 2 * third), fill=fill)
    pixels = np.asarray(image, dtype=np.int16) + rng.normal(0, 6, (height, width, 3)).astype(
        np.int16
    )
    image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="RGB")
    size_word = "large" if side > 120 else "small"
    caption = f"a {size_word} {colour} {shape} on a {background} background"
    return _encode(image, "JPEG", quality=85), caption


def write_scale_corpus(folder: Path, shard_count: int, images_per_shard: int) -> Path:
    """A folder-of-folders corpus: `shard_count` sub-folders of `images_per_shard` JPEGs, each
    with a `.txt` caption beside it (the layout `megapairs demo --corpus` reads)."""
    for shard in range(shard_count):
        items = []
        for index in range(images_per_shard):
            seed = shard * images_per_shard + index
            image_bytes, caption = scale_item(seed)
            items.append((f"{seed:09d}", image_bytes, caption))
        write_image_folder(folder / f"shard{shard:03d}", items)
    return folder


if __name__ == "__main__":  # python tests/image_factory.py OUT SHARDS IMAGES_PER_SHARD
    import sys

    out, shards, per_shard = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
    write_scale_corpus(out, shards, per_shard)
    print(f"wrote {shards * per_shard} images in {shards} shards under {out}")
