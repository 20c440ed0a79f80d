"""Issue 7, items 4, 7 and 10: extreme shapes, non-finite pixels, reproducible details."""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import image_factory as factory
import pytest
from PIL import Image

from megapairs_assets.corpus.images import (
    ImageFailure,
    ImageLimits,
    ImageRejected,
    decode_image,
    prepare_image_for_model,
    stable_detail,
    validate_image,
)
from megapairs_assets.corpus.sources import SourceSpec, iter_shard_records
from megapairs_assets.corpus.table import build_shard_table

LIMITS = ImageLimits()
STRIP_SIZE_PX = (1_000_000, 16)
REPO_ROOT = Path(__file__).resolve().parents[1]


def _resize_short_side(image: Image.Image, side_px: int = 224) -> Image.Image:
    """What CLIP/DINOv2 preprocessing does first: scale the shorter side to the input side."""
    scale = side_px / min(image.size)
    return image.resize((round(image.width * scale), round(image.height * scale)))


@pytest.mark.parametrize(
    ("size_px", "reason"),
    [
        (STRIP_SIZE_PX, "extreme_aspect_ratio"),
        ((16, 400), "extreme_aspect_ratio"),
        ((320, 16), None),
    ],
)
def test_aspect_ratio_is_bounded_from_the_header(size_px, reason):
    data = factory.strip_png_bytes(*size_px)
    if reason is None:
        assert validate_image(data, LIMITS).width == size_px[0]
        return
    with pytest.raises(ImageRejected) as rejected:
        validate_image(data, LIMITS)
    assert rejected.value.reason == reason
    assert "x".join(map(str, size_px)) in rejected.value.detail


def test_aspect_ratio_bound_is_configurable():
    data = factory.strip_png_bytes(16, 400)
    assert decode_image(data, ImageLimits(max_aspect_ratio=30)).height == 400
    assert decode_image(data, ImageLimits(max_aspect_ratio=None)).height == 400


def test_strip_is_quarantined_by_the_corpus(tmp_path):
    items = [*factory.good_items(2), ("strip", factory.strip_png_bytes(*STRIP_SIZE_PX), "a line")]
    factory.write_wds_shard(tmp_path / "00000.tar", items)
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert images.height == 2
    assert quarantine[["key", "reason"]].rows() == [("strip", "extreme_aspect_ratio")]


_UNDER_MEMORY_LIMIT = textwrap.dedent(
    """
    import json, resource, sys
    from PIL import Image
    from megapairs_assets.corpus.images import ImageLimits, prepare_image_for_model

    def resize_short_side(image):
        scale = 224 / min(image.size)
        return image.resize((round(image.width * scale), round(image.height * scale)))

    with open("/proc/self/status") as status:
        used = next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmSize"))
    limit = used + (1 << 30)  # 1 GiB above what the interpreter already maps
    resource.setrlimit(resource.RLIMIT_AS, (limit, resource.getrlimit(resource.RLIMIT_AS)[1]))
    results = {}
    bounds = {"default": ImageLimits(), "unbounded": ImageLimits(max_aspect_ratio=None)}
    for name, limits in bounds.items():
        result = prepare_image_for_model(sys.argv[1], limits, 224, resize_short_side)
        results[name] = [result.reason, result.detail] if hasattr(result, "reason") else "image"
    print(json.dumps(results))
    """
)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc, sets RLIMIT_AS")
def test_strip_under_a_memory_limit_never_raises(tmp_path):
    """The issue's recipe: a 1,000,000 x 16 PNG, a model resize, a 1 GiB address-space limit.

    With the default bound the strip is refused from its header; with no bound the resize runs
    out of memory, and that too comes back as a value instead of killing the worker.
    """
    strip = tmp_path / "strip.png"
    strip.write_bytes(factory.strip_png_bytes(*STRIP_SIZE_PX))
    done = subprocess.run(
        [sys.executable, "-c", _UNDER_MEMORY_LIMIT, str(strip)],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert done.returncode == 0, done.stderr[-2000:]
    results = json.loads(done.stdout.strip().splitlines()[-1])
    assert results["default"][0] == "extreme_aspect_ratio"
    assert results["unbounded"][0] == "out_of_memory"


def test_prepare_returns_failures_as_values(tmp_path):
    good = tmp_path / "good.jpg"
    good.write_bytes(factory.good_jpeg_bytes(0))

    def out_of_memory(image):
        raise MemoryError

    def broken(image):
        raise TypeError("preprocess bug")

    assert prepare_image_for_model(str(good), LIMITS, 32, lambda image: image.size) == (64, 48)
    failures = {
        "missing": prepare_image_for_model(
            str(tmp_path / "none.jpg"), LIMITS, 32, _resize_short_side
        ),
        "folder": prepare_image_for_model(str(tmp_path), LIMITS, 32, _resize_short_side),
        "oom": prepare_image_for_model(str(good), LIMITS, 32, out_of_memory),
        "bug": prepare_image_for_model(str(good), LIMITS, 32, broken),
    }
    assert all(isinstance(failure, ImageFailure) for failure in failures.values())
    assert {name: failure.reason for name, failure in failures.items()} == {
        "missing": "missing_file",
        "folder": "missing_file",
        "oom": "out_of_memory",
        "bug": "preprocess_failed",
    }


@pytest.mark.parametrize("fill", [float("nan"), float("inf"), float("-inf")])
def test_float_tiff_with_non_finite_values_is_rejected(fill):
    with pytest.raises(ImageRejected) as rejected:
        validate_image(factory.float_tiff_bytes(fill), LIMITS)
    assert rejected.value.reason == "non_finite_pixels"
    assert "48 of 3072" in rejected.value.detail


def test_finite_float_tiff_is_still_kept():
    decoded = validate_image(factory.float_tiff_bytes(0.5), LIMITS)
    assert (decoded.original_mode, decoded.image.mode) == ("F", "RGB")


def test_nan_tiff_is_quarantined_by_the_corpus(tmp_path):
    factory.write_tar_members(
        tmp_path / "00000.tar",
        [
            ("000.jpg", factory.good_jpeg_bytes(0)),
            ("nan.tif", factory.float_tiff_bytes(float("nan"))),
        ],
    )
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert images["key"].to_list() == ["000"]
    assert quarantine[["key", "reason"]].rows() == [("nan", "non_finite_pixels")]


_BUILD_BAD_SHARD = textwrap.dedent(
    """
    import sys
    from megapairs_assets.corpus.images import ImageLimits
    from megapairs_assets.corpus.sources import SourceSpec, iter_shard_records
    from megapairs_assets.corpus.table import build_shard_table
    from megapairs_assets.lib.storage import write_parquet_atomic
    from pathlib import Path

    spec = SourceSpec(kind="webdataset", path=sys.argv[1])
    _, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), ImageLimits())
    write_parquet_atomic(quarantine, Path(sys.argv[2]))
    """
)


def test_quarantine_bytes_are_reproducible_across_runs(tmp_path):
    """Two processes build the same bad shard: the quarantine tables are byte-identical."""
    items = [
        ("not_an_image", factory.not_an_image_bytes(), "text"),
        ("truncated", factory.truncated_jpeg_bytes(), "cut"),
        ("one_pixel", factory.tiny_png_bytes(), "dot"),
        ("strip", factory.strip_png_bytes(*STRIP_SIZE_PX), "line"),
        ("nan", factory.float_tiff_bytes(float("nan")), "nan"),
    ]
    factory.write_wds_shard(tmp_path / "src" / "00000.tar", items)
    outputs = [tmp_path / f"quarantine_{run}.parquet" for run in range(2)]
    for output in outputs:
        subprocess.run(
            [sys.executable, "-c", _BUILD_BAD_SHARD, str(tmp_path / "src"), str(output)],
            check=True,
            timeout=120,
            cwd=REPO_ROOT,
        )
    assert outputs[0].read_bytes() == outputs[1].read_bytes()
    import polars as pl

    details = pl.read_parquet(outputs[0])["detail"].to_list()
    assert len(details) == len(items)
    assert not [detail for detail in details if re.search(r"0x[0-9a-fA-F]{6,}", detail)]


def test_stable_detail_drops_object_addresses():
    text = "cannot identify image file <_io.BytesIO object at 0x7f3a2b1c9d50>"
    assert stable_detail(text) == "cannot identify image file <_io.BytesIO object>"
