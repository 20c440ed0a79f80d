"""The minimum-side rule at its exact edge: a side of `min_side_px` is kept, one less is not."""

from __future__ import annotations

import pytest
from image_factory import good_png_bytes

from megapairs_assets.corpus.images import ImageLimits, ImageRejected, validate_image
from megapairs_assets.corpus.sources import RawRecord
from megapairs_assets.corpus.table import build_shard_table

LIMITS = ImageLimits()


def test_the_default_minimum_side_is_16_px() -> None:
    # The cases below are written for 16 px; a changed default must update them on purpose.
    assert LIMITS.min_side_px == 16


def test_an_image_exactly_at_the_minimum_side_is_kept() -> None:
    decoded = validate_image(good_png_bytes(1, size_px=(16, 16)), LIMITS)
    assert (decoded.width, decoded.height) == (16, 16)


@pytest.mark.parametrize("size_px", [(15, 16), (16, 15)])
def test_one_pixel_under_the_minimum_on_either_side_is_too_small(
    size_px: tuple[int, int],
) -> None:
    with pytest.raises(ImageRejected) as rejected:
        validate_image(good_png_bytes(2, size_px=size_px), LIMITS)
    assert rejected.value.reason == "too_small"


def test_shard_table_keeps_16x16_and_quarantines_15x16_as_too_small() -> None:
    records = [
        RawRecord(key=key, uri=f"/corpus/{key}.png", caption="a test", data=data)
        for key, data in [
            ("edge", good_png_bytes(3, size_px=(16, 16))),
            ("narrow", good_png_bytes(4, size_px=(15, 16))),
            ("short", good_png_bytes(5, size_px=(16, 15))),
        ]
    ]
    images, quarantine = build_shard_table("00000", records, LIMITS)
    assert images["key"].to_list() == ["edge"]
    assert dict(quarantine.select("key", "reason").iter_rows()) == {
        "narrow": "too_small",
        "short": "too_small",
    }
