"""Decode, validate and normalise one corpus image; clean one caption.

Every image that enters the corpus goes through `decode_image`, so every later stage can rely
on the same contract: an 8-bit RGB picture, upright (EXIF orientation applied), no alpha, no
non-finite values, between `min_side_px` and `max_pixels` in size and no more elongated than
`max_aspect_ratio`. Anything else is refused with an `ImageRejected` whose short `reason` code
ends up in the quarantine table. Size and shape are judged from the header, before any pixel
is decoded. Details never hold memory addresses, so quarantine tables are reproducible.

`open_image_rgb` reads a corpus row's `source_uri` (see `megapairs_assets.corpus.uris`);
`prepare_image_for_model` is the per-image step of the embedding stages and never raises.

`as_stored=True` (the benchmarks' evaluation only) keeps every check but decodes the file as
the benchmarks' official loaders open it, `Image.open(path).convert("RGB")`: no EXIF rotation,
no reduced-scale JPEG decode, PIL's own RGB conversion (alpha dropped, not composited on white).
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import math
import os
import re
import tarfile
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from megapairs_assets.corpus.uris import is_remote, split_tar_member, without_file_scheme

# PIL's own decompression-bomb guard uses one process-wide limit and raises (or warns) while
# opening; we decide from the header ourselves, with the limit the user configured.
Image.MAX_IMAGE_PIXELS = None

OUT_OF_MEMORY = "out_of_memory"
PREPROCESS_FAILED = "preprocess_failed"
_ALPHA_MODES = frozenset({"RGBA", "RGBa", "LA", "La", "PA"})
_WIDE_INT_MODES = frozenset({"I", "I;16", "I;16B", "I;16L", "I;16N"})
_UINT16_MAX = 65535
_OPEN_TARS_PER_PROCESS = 16
_PLAIN_FILE_TYPES = frozenset({tarfile.REGTYPE, tarfile.AREGTYPE, tarfile.CONTTYPE})
# A JPEG decoded at 1/2..1/8 scale still reads every byte, so it proves the file is whole.
_VALIDATION_DRAFT_SIDE_PX = 256
# Unicode's control characters (category Cc) all lie below U+00A0. Line breaks and tabs
# become spaces so words stay apart; the rest (NUL, escape, ...) are dropped.
_CONTROL_CHARACTERS = {
    code: (" " if chr(code).isspace() else None)
    for code in range(0xA0)
    if unicodedata.category(chr(code)) == "Cc"
}
_LINE_BREAK = re.compile(r"[ \t]*(?:\r\n|\r|\n)\s*")
# "<_io.BytesIO object at 0x7f...>", "<function f at 0x...>": an address differs on every run.
_OBJECT_ADDRESS = re.compile(r"<([^<>]*?) at 0x[0-9A-Fa-f]+>")
_SIGNATURE_BYTES = 8
# An ISO base media file (HEIF, AVIF, MP4) starts with a box: 4-byte size, then `ftyp` and
# the major brand (`heic`, `mif1`, `avif`, ...).
_ISO_BOX_TYPE, _ISO_BRAND = slice(4, 8), slice(8, 12)
_Prepared = TypeVar("_Prepared")


@dataclass(frozen=True)
class ImageLimits:
    """What the corpus accepts; one instance is shared by validation and the embedding stages."""

    min_side_px: int = 16
    # Images above this many pixels are refused from their header, before any pixel is decoded.
    max_pixels: int = 178_956_970
    max_caption_chars: int = 1000
    # Longer side / shorter side; None accepts any shape. Encoders scale the short side to
    # their input side (224-518 px) and crop a square from the middle, so at 20:1 the crop
    # already sees a twentieth of the picture, and the scaled copy holds ratio x side^2 pixels:
    # a 1,000,000 x 16 strip (15 KB, far under max_pixels) would grow to ~14 M x 224 (~9 GB).
    # 20 keeps panoramas and web banners (728x90 is 8:1) and bounds that copy at 20 x side^2
    # pixels (1 M at 224 px, 5.4 M at 518 px).
    max_aspect_ratio: float | None = 20.0


@dataclass(frozen=True)
class DecodedImage:
    """A validated image: RGB 8-bit pixels plus facts about the original file."""

    image: Image.Image
    width: int
    height: int
    original_mode: str
    content_hash: str


class ImageRejected(Exception):
    """The bytes are not an image the corpus accepts; `reason` is a short code for the table."""

    def __init__(self, reason: str, detail: str) -> None:
        detail = stable_detail(detail)
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class ImageFailure:
    """Why one image could not be prepared: a reason code and a reproducible detail."""

    reason: str
    detail: str


def stable_detail(text: str) -> str:
    """`text` with object addresses removed (`<x object at 0x7f..>` -> `<x object>`).

    Exception messages often embed reprs; an address differs on every run, which would make a
    quarantine table differ byte for byte between two runs over the same input.
    """
    return _OBJECT_ADDRESS.sub(r"<\1>", text)


def decode_image(data: bytes, limits: ImageLimits, max_side_px: int | None = None) -> DecodedImage:
    """Validate and decode image bytes into an upright RGB picture.

    Raises `ImageRejected` with reason `decode_error`, `too_small`, `too_large`,
    `extreme_aspect_ratio`, `non_finite_pixels` or `out_of_memory`. When
    `max_side_px` is given the picture is shrunk (aspect kept) so its longer side fits; JPEGs
    are then decoded at reduced scale, which is much faster and still reads the whole file, so
    truncation is caught either way. `width`/`height` always describe the original file.
    """
    decoded = _decode(data, limits, draft_side_px=max_side_px)
    if max_side_px is not None:
        decoded.image.thumbnail((max_side_px, max_side_px), Image.Resampling.BICUBIC)
    return decoded


def validate_image(data: bytes, limits: ImageLimits, known_hash: str | None = None) -> DecodedImage:
    """Prove that bytes are an image the corpus accepts, as cheaply as a full check allows.

    Same rejections as `decode_image`, but JPEGs are decoded at a reduced DCT scale and nothing
    is resized: `image` is whatever rendition was cheapest, for inspection, not for models.
    `known_hash`: `content_hash(data)` when the caller has already computed it (the corpus
    table hashes every record to find copies before decoding), so the bytes are hashed once.
    """
    return _decode(data, limits, draft_side_px=_VALIDATION_DRAFT_SIDE_PX, known_hash=known_hash)


def open_image_rgb(
    uri: str, limits: ImageLimits, max_side_px: int | None = None, *, as_stored: bool = False
) -> Image.Image:
    """Read the image at a corpus `source_uri` (path or `<tar>#<member>`) as validated RGB.

    `as_stored`: decode as the benchmarks' official loaders do (module docstring); then
    `max_side_px` must be None. Raises `ImageRejected` (`missing_file`, `remote_uri`, or any
    reason of `decode_image`).
    """
    data = read_uri_bytes(uri)
    if as_stored:
        if max_side_px is not None:
            raise ValueError("as_stored decodes the picture at its stored size")
        return _decode(data, limits, draft_side_px=None, as_stored=True).image
    return decode_image(data, limits, max_side_px=max_side_px).image


def read_uri_bytes(uri: str) -> bytes:
    """Raw bytes behind a corpus `source_uri`; raises `ImageRejected` when they are not there.

    Reasons: `remote_uri`, `missing_file` (no such file or tar member), `read_error` (the file
    is there but cannot be read: permissions, I/O error).
    """
    if is_remote(uri):
        raise ImageRejected("remote_uri", f"{uri} is not local; download shards first")
    uri = without_file_scheme(uri)
    tar_member = split_tar_member(uri)
    if tar_member is not None:
        return _TAR_CACHE.read_member(*tar_member)
    try:
        return Path(uri).read_bytes()
    except IsADirectoryError as exc:
        # The same reason as a missing file for the stages after the corpus (the corpus itself
        # never admits a folder: it reports `not_a_file`), with the truth in the detail.
        raise ImageRejected("missing_file", f"{uri} is a folder, not a file") from exc
    except (FileNotFoundError, NotADirectoryError) as exc:
        raise ImageRejected("missing_file", f"{uri} does not exist") from exc
    except OSError as exc:
        raise ImageRejected("read_error", f"{uri}: {exc.strerror or type(exc).__name__}") from exc


def close_tar_cache() -> None:
    """Close the tar files this process holds open for `open_image_rgb`."""
    _TAR_CACHE.clear()


# Decoding for an encoder keeps both sides at least this factor above the model's input side:
# DINOv2-style preprocessing resizes to 256 before its 224 crop (256 / 224 = 1.14), and a
# JPEG's DCT draft only ever reduces by powers of two, so the preprocess never upsamples.
DRAFT_MARGIN = 1.15


def open_image_for_model(uri: str, limits: ImageLimits, input_side_px: int | None) -> Image.Image:
    """Decode an image for an encoder whose preprocess resizes it to `input_side_px`.

    JPEGs decode at the smallest DCT scale that keeps both sides >= DRAFT_MARGIN x the input
    side (a 2-8x cheaper decode for photos); there is no resampling here, so the model's own
    preprocess resizes exactly once. Validation is the same as `decode_image`'s.
    """
    draft_side_px = math.ceil(input_side_px * DRAFT_MARGIN) if input_side_px else None
    return _decode(read_uri_bytes(uri), limits, draft_side_px=draft_side_px).image


def prepare_image_for_model(
    uri: str,
    limits: ImageLimits,
    input_side_px: int | None,
    preprocess: Callable[[Image.Image], _Prepared],
) -> _Prepared | ImageFailure:
    """Read, validate, decode (`open_image_for_model`) and `preprocess` one image.

    Never raises for a problem of this one image: any failure, MemoryError included, comes back
    as an `ImageFailure` (the reasons of `decode_image` and `read_uri_bytes`, or
    `out_of_memory`, or `preprocess_failed`). A DataLoader worker that raised would end the
    whole pass, so this is what the worker calls. Memory stays bounded by the limits: the
    decode by `max_pixels`, the model's resize by `max_aspect_ratio` (both judged from the
    header before decoding), and JPEGs decode at reduced DCT scale.
    """
    try:
        image = open_image_for_model(uri, limits, input_side_px)
    except ImageRejected as exc:
        return ImageFailure(exc.reason, exc.detail)
    except MemoryError:
        return ImageFailure(OUT_OF_MEMORY, "reading or decoding the image ran out of memory")
    except Exception as exc:  # one image must never end the pass
        return ImageFailure("decode_error", stable_detail(f"{type(exc).__name__}: {exc}"))
    width_px, height_px = image.size
    try:
        return preprocess(image)
    except MemoryError:
        return ImageFailure(
            OUT_OF_MEMORY, f"preprocessing the {width_px}x{height_px} picture ran out of memory"
        )
    except Exception as exc:
        return ImageFailure(PREPROCESS_FAILED, stable_detail(f"{type(exc).__name__}: {exc}"))


def clean_caption(caption: str | None, limits: ImageLimits) -> tuple[str | None, bool]:
    """Return (cleaned caption or None when empty, whether it was truncated).

    Control characters are dropped (line breaks and tabs become spaces; a line break and the
    spaces around it, as CRLF files with trailing spaces have them, become one space),
    surrounding whitespace is stripped, and captions over `max_caption_chars` are cut at the
    last word boundary.
    """
    if caption is None:
        return None, False
    text = _LINE_BREAK.sub(" ", caption).translate(_CONTROL_CHARACTERS).strip()
    if not text:
        return None, False
    if len(text) <= limits.max_caption_chars:
        return text, False
    return _cut_at_word(text, limits.max_caption_chars), True


def _decode(
    data: bytes,
    limits: ImageLimits,
    draft_side_px: int | None,
    known_hash: str | None = None,
    as_stored: bool = False,
) -> DecodedImage:
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise ImageRejected("decode_error", _unrecognised_format_detail(data)) from exc
    except Exception as exc:  # a malformed header can raise almost anything inside PIL
        raise ImageRejected(
            "decode_error", f"unreadable header ({type(exc).__name__}: {exc})"
        ) from exc
    width_px, height_px = image.size
    _check_size(width_px, height_px, limits)
    original_mode = image.mode
    if draft_side_px is not None and image.format == "JPEG":
        _draft_quietly(image, draft_side_px)
    try:
        # Decoding everything now is what exposes truncated or corrupt files.
        image.load()
        rgb = image.convert("RGB") if as_stored else _to_rgb(_upright(image))
    except ImageRejected:
        raise
    except MemoryError as exc:
        raise ImageRejected(
            OUT_OF_MEMORY,
            f"decoding the {width_px}x{height_px} {original_mode} image ran out of memory",
        ) from exc
    except Exception as exc:
        raise ImageRejected("decode_error", f"{type(exc).__name__}: {exc}") from exc
    return DecodedImage(
        image=rgb,
        width=width_px,
        height=height_px,
        original_mode=original_mode,
        content_hash=known_hash if known_hash is not None else content_hash(data),
    )


def _unrecognised_format_detail(data: bytes) -> str:
    """Why Pillow found no image in `data`, in words a user can act on.

    PIL's own message names the buffer object (and its address); the leading bytes say more.
    HEIC/HEIF phone photos (and AVIF, where Pillow was built without it) are ISO media files:
    naming their brand tells the user to convert them rather than suspect a broken file.
    """
    if not data:
        return "the file is empty (0 bytes)"
    if data[_ISO_BOX_TYPE] == b"ftyp":
        brand = data[_ISO_BRAND].decode("ascii", "replace").strip()
        return (
            f"an ISO media file of brand '{brand}' (HEIC/HEIF/AVIF photo or video) that this "
            "Pillow cannot decode; convert it to JPEG or PNG"
        )
    signature = data[:_SIGNATURE_BYTES].hex()
    return f"not a recognised image format (first bytes {signature})"


def content_hash(data: bytes) -> str:
    """The corpus's content hash of a file: sha256 hex digest of its raw bytes."""
    return hashlib.sha256(data).hexdigest()


def _check_size(width_px: int, height_px: int, limits: ImageLimits) -> None:
    if width_px * height_px > limits.max_pixels:
        raise ImageRejected(
            "too_large",
            f"{width_px}x{height_px} exceeds {limits.max_pixels} pixels (decompression bomb guard)",
        )
    if min(width_px, height_px) < limits.min_side_px:
        raise ImageRejected(
            "too_small", f"{width_px}x{height_px} has a side under {limits.min_side_px} px"
        )
    ratio = max(width_px, height_px) / max(min(width_px, height_px), 1)
    if limits.max_aspect_ratio is not None and ratio > limits.max_aspect_ratio:
        raise ImageRejected(
            "extreme_aspect_ratio",
            f"{width_px}x{height_px} is {ratio:.1f}:1, over {limits.max_aspect_ratio:g}:1",
        )


def _draft_quietly(image: Image.Image, max_side_px: int) -> None:
    # draft() only picks a DCT scale factor; if a file refuses it, a full decode still works.
    with contextlib.suppress(OSError, ValueError):
        image.draft(None, (max_side_px, max_side_px))


def _upright(image: Image.Image) -> Image.Image:
    # A broken EXIF block should not cost us an otherwise good picture.
    try:
        return ImageOps.exif_transpose(image)
    except Exception:
        return image


def _to_rgb(image: Image.Image) -> Image.Image:
    if image.mode == "RGB":
        return image
    # Tones first: PIL's RGBA conversion of a 16-bit image would clip it before compositing.
    if image.mode in _WIDE_INT_MODES or image.mode == "F":
        return _wide_to_8bit(image).convert("RGB")
    if image.mode in _ALPHA_MODES or image.info.get("transparency") is not None:
        return _on_white(image.convert("RGBA"))
    try:
        return image.convert("RGB")
    except ValueError as exc:
        raise ImageRejected("decode_error", f"unsupported colour mode {image.mode}") from exc


def _on_white(rgba: Image.Image) -> Image.Image:
    background = Image.new("RGBA", rgba.size, (255, 255, 255, 255))
    return Image.alpha_composite(background, rgba).convert("RGB")


def _wide_to_8bit(image: Image.Image) -> Image.Image:
    # PIL's own conversion clips 16-bit values at 255, turning almost every pixel white. Scale
    # instead: by the 16-bit range when values fit it (keeps a dark photo dark), otherwise by
    # the image's own range (32-bit integers, floats outside 0..1).
    values = np.asarray(image).astype(np.float64)
    finite = np.isfinite(values)
    if not finite.all():
        raise ImageRejected(
            "non_finite_pixels",
            f"{int(values.size - finite.sum())} of {values.size} {image.mode} pixel values "
            "are NaN or infinite",
        )
    low, high = float(values.min()), float(values.max())
    if image.mode == "F" and low >= 0.0 and high <= 1.0:
        scaled = values * 255.0
    elif image.mode != "F" and low >= 0 and high <= _UINT16_MAX:
        scaled = values * (255.0 / _UINT16_MAX)
    else:
        scaled = (values - low) * (255.0 / max(high - low, 1e-12))
    return Image.fromarray(np.clip(np.rint(scaled), 0, 255).astype(np.uint8), mode="L")


def _cut_at_word(text: str, max_chars: int) -> str:
    head = text[: max_chars + 1]
    boundary = max(head.rfind(" "), head.rfind("\u3000"))
    # One enormous "word" (URL, CJK without spaces) has no boundary worth keeping.
    cut = head[:boundary] if boundary > max_chars // 2 else head[:max_chars]
    return cut.rstrip()


class _TarMemberCache:
    """Open webdataset shards, each with a name -> member index, kept per process.

    Indexing a tar once and seeking to members avoids rescanning the archive per image (and
    `TarFile.getmember` is a linear search). Entries are keyed by process id because a forked
    DataLoader worker inherits the parent's file objects, whose shared offsets must not be
    used from two processes. A small LRU bounds the number of open files.
    """

    def __init__(self, max_open: int) -> None:
        self._max_open = max_open
        self._open: OrderedDict[tuple[int, str], _IndexedTar] = OrderedDict()
        self._lock = threading.Lock()

    def read_member(self, tar_path: str, member_name: str) -> bytes:
        with self._lock:
            indexed = self._get(tar_path)
            member = indexed.members.get(member_name)
            if member is None:
                raise ImageRejected("missing_file", f"{member_name} is not in {tar_path}")
            if isinstance(member, tuple):
                return indexed.read_plain(member_name, *member)
            extracted = indexed.tar.extractfile(member)
            if extracted is None:
                raise ImageRejected("missing_file", f"{member_name} in {tar_path} is not a file")
            try:
                return extracted.read()
            except (tarfile.TarError, OSError, EOFError) as exc:
                raise ImageRejected("decode_error", f"cannot read {member_name}: {exc}") from exc

    def reset_lock_after_fork(self) -> None:
        self._lock = threading.Lock()

    def clear(self) -> None:
        with self._lock:
            for key, indexed in list(self._open.items()):
                if key[0] == os.getpid():
                    indexed.tar.close()
            self._open.clear()

    def _get(self, tar_path: str) -> _IndexedTar:
        try:
            stat = os.stat(tar_path)
        except OSError as exc:
            raise ImageRejected("missing_file", f"{tar_path} does not exist") from exc
        key = (os.getpid(), tar_path)
        indexed = self._open.get(key)
        if indexed is not None and indexed.version == (stat.st_mtime_ns, stat.st_size):
            self._open.move_to_end(key)
            return indexed
        if indexed is not None:
            indexed.tar.close()
        indexed = _IndexedTar.open(tar_path, (stat.st_mtime_ns, stat.st_size))
        self._open[key] = indexed
        self._open.move_to_end(key)
        self._evict()
        return indexed

    def _evict(self) -> None:
        own = [key for key in self._open if key[0] == os.getpid()]
        for key in own[: max(0, len(own) - self._max_open)]:
            self._open.pop(key).tar.close()
        # Entries inherited from a parent share its file offsets, so they are never read here;
        # dropping them closes only this process's copy of the descriptor.
        for key in [key for key in self._open if key[0] != os.getpid()]:
            del self._open[key]


@dataclass
class _IndexedTar:
    tar: tarfile.TarFile
    # Plain files as (data offset, size), read with one pread: a TarInfo costs ~0.5 KB a member,
    # which over a 5,000-sample shard (15,000 members) and 16 open tars per worker adds up.
    # Other members (links, sparse files) keep their TarInfo, so tarfile reads them as before.
    members: dict[str, tuple[int, int] | tarfile.TarInfo]
    version: tuple[int, int]

    def read_plain(self, member_name: str, offset: int, size: int) -> bytes:
        """The bytes of a plain-file member; a tar cut off inside them is a decode_error."""
        try:
            # pread leaves the file's offset alone, so tarfile's own reads are unaffected.
            data = os.pread(self.tar.fileobj.fileno(), size, offset)
        except OSError as exc:
            raise ImageRejected("decode_error", f"cannot read {member_name}: {exc}") from exc
        if len(data) < size:
            raise ImageRejected(
                "decode_error", f"cannot read {member_name}: unexpected end of data"
            )
        return data

    @classmethod
    def open(
        cls, tar_path: str, version: tuple[int, int], keep_headers: bool = False
    ) -> _IndexedTar:
        """Index a tar's members. Headers are dropped as they are read unless the tar has a
        link or sparse file, which tarfile can only read with every header it has seen: the
        first such member starts the walk again with `keep_headers`."""
        try:
            # Held open across calls on purpose: the cache closes it on eviction or clear().
            tar = tarfile.open(tar_path, mode="r:")  # noqa: SIM115
        except (tarfile.TarError, OSError) as exc:
            raise ImageRejected("decode_error", f"{tar_path} is not a readable tar: {exc}") from exc
        members: dict[str, tuple[int, int] | tarfile.TarInfo] = {}
        try:
            for member in tar:
                plain = member.type in _PLAIN_FILE_TYPES and member.sparse is None
                if not plain and not keep_headers:
                    tar.close()
                    return cls.open(tar_path, version, keep_headers=True)
                if not keep_headers:
                    tar.members = []  # tarfile keeps every header it has read here
                # The first copy of a repeated name wins, as the corpus table keeps the first.
                members.setdefault(
                    member.name, (member.offset_data, member.size) if plain else member
                )
        except (tarfile.TarError, OSError, EOFError):
            # A truncated shard still serves the members that were indexed before the break.
            pass
        return cls(tar=tar, members=members, version=version)


_TAR_CACHE = _TarMemberCache(max_open=_OPEN_TARS_PER_PROCESS)

# A lock held by another thread at fork time would stay locked forever in the child.
os.register_at_fork(after_in_child=_TAR_CACHE.reset_lock_after_fork)
