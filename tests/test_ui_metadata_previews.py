"""The plain preview helpers behind the UI's metadata: histograms, sparklines, thumbnails, the
loss plot. Fast: no Dagster run."""

from __future__ import annotations

import base64
import io
import re

import numpy as np
import polars as pl
import pytest
from PIL import Image

from megapairs_assets.lib.preview import (
    INLINE_MARKDOWN_CHARS,
    histogram_markdown,
    sparkline,
    thumbnail_markdown,
)
from megapairs_assets.training.plot import loss_plot_markdown, loss_sparkline_markdown

_ROW = re.compile(r"^(-?\d+\.\d+)-(-?\d+\.\d+) [^\d]*?(\d+)( \*)?$")


def _rows(markdown: str) -> list[tuple[float, float, int, bool]]:
    found = []
    for line in markdown.splitlines():
        match = _ROW.match(line.strip())
        if match:
            found.append((float(match[1]), float(match[2]), int(match[3]), match[4] is not None))
    return found


def test_histogram_counts_every_value_once_and_marks_the_band() -> None:
    values = pl.Series(np.random.default_rng(0).normal(0.9, 0.05, 5_000))
    band = (0.85, 0.95)
    markdown = histogram_markdown(values, bins=12, band=band)
    rows = _rows(markdown)
    assert len(rows) == 12 and len(markdown) < INLINE_MARKDOWN_CHARS
    assert sum(count for *_, count, _ in rows) == values.len()
    # The same equal-width bins over the values' range as numpy's.
    expected, _ = np.histogram(values.to_numpy(), bins=12)
    assert [count for *_, count, _ in rows] == expected.tolist()
    for start, end, _, marked in rows:
        assert marked == (start < band[1] and end > band[0])
    # Bars grow with the counts: the fullest bin has the longest bar.
    fullest = max(rows, key=lambda row: row[2])
    bar_of = {
        line.split()[0]: len(line.split()[1]) for line in markdown.splitlines() if _ROW.match(line)
    }
    assert bar_of[f"{fullest[0]:.3f}-{fullest[1]:.3f}"] == max(bar_of.values())


def test_histogram_of_equal_values_or_none_does_not_divide_by_zero() -> None:
    assert _rows(histogram_markdown(pl.Series([0.5, 0.5, 0.5]))) == [(0.5, 0.5, 3, False)]
    assert histogram_markdown(pl.Series([], dtype=pl.Float32)) == "_(no values)_"
    assert _rows(histogram_markdown(pl.Series([0.1, None, float("nan"), 0.3]), bins=2)) == [
        (0.1, 0.2, 1, False),
        (0.2, 0.3, 1, False),
    ]


def test_sparkline_follows_the_series_and_fits_its_width() -> None:
    falling = list(np.linspace(5.0, 1.0, 200))
    line = sparkline(falling, width=40)
    assert len(line) == 40
    assert line[0] == "█" and line[-1] == "▁"
    assert list(line) == sorted(line, reverse=True)  # never rises
    assert sparkline([2.0, 2.0]) == "▁▁" and sparkline([]) == ""


def test_thumbnails_are_small_jpegs_even_from_transparent_pngs() -> None:
    noisy = Image.fromarray(
        np.random.default_rng(1).integers(0, 255, (300, 200, 4), dtype=np.uint8), "RGBA"
    )
    markdown = thumbnail_markdown([noisy, noisy.convert("RGB")], size_px=64)
    found = re.findall(r"!\[thumb\]\(data:image/jpeg;base64,([A-Za-z0-9+/=]+)\)", markdown)
    assert len(found) == 2
    for encoded in found:
        image = Image.open(io.BytesIO(base64.b64decode(encoded)))
        assert image.format == "JPEG" and max(image.size) == 64
    # Random noise is the worst case for JPEG; a real photo is smaller still.
    assert len(markdown) < 2 * 6_000


@pytest.fixture
def curve() -> pl.DataFrame:
    steps = np.arange(1, 301)
    rng = np.random.default_rng(2)
    return pl.DataFrame(
        {
            "step": steps,
            "loss": 5.0 * np.exp(-steps / 150) + rng.normal(0, 0.1, steps.size),
            "learning_rate": np.full(steps.size, 1e-4),
        }
    )


def test_loss_sparkline_is_inline_and_names_first_and_last_loss(curve) -> None:
    markdown = loss_sparkline_markdown(curve)
    assert len(markdown) < INLINE_MARKDOWN_CHARS
    assert markdown.startswith(f"`{curve['loss'][0]:.3f}` ")
    assert f" `{curve['loss'][-1]:.3f}` " in markdown
    assert "300 logged steps" in markdown
    assert "48 characters, each the mean of 6-7 steps" in markdown  # 300 / 48 = 6.25
    assert loss_sparkline_markdown(curve.clear()) == "_(no training steps were run)_"


def test_loss_plot_png_is_small(curve, tmp_path) -> None:
    pytest.importorskip("matplotlib")
    markdown, png = loss_plot_markdown(curve, tmp_path / "loss.png")
    assert png is not None and png.stat().st_size < 15_000
    assert Image.open(png).format == "PNG"
    assert markdown == (
        "![training loss](data:image/png;base64,"
        f"{base64.b64encode(png.read_bytes()).decode('ascii')})"
    )
