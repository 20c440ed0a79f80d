"""Plain previews for the UI: small Markdown tables, text histograms and thumbnails (no Dagster).

Dagster's UI shows a Markdown metadata value inline only while it is shorter than
`INLINE_MARKDOWN_CHARS`; a longer one hides behind a "[Show Markdown]" link. Numbers a person
reads at a glance (histograms, sparklines, small tables) are therefore kept under that length,
and images (which cannot be) are small JPEGs, so each partition's event stays a few kB.
"""

from __future__ import annotations

import base64
import io
import math
from collections.abc import Sequence
from typing import Any

import polars as pl

# Dagster's UI renders Markdown metadata inline below this many characters (MetadataEntry.tsx).
INLINE_MARKDOWN_CHARS = 1000
THUMBNAIL_JPEG_QUALITY = 75
_BAR_BLOCKS = " ▏▎▍▌▋▊▉█"  # eighths of a character cell
_SPARK_BLOCKS = "▁▂▃▄▅▆▇█"


def markdown_table(frame: pl.DataFrame, max_rows: int = 10) -> str:
    """A small Markdown preview of a frame for the UI."""
    if frame.is_empty():
        return "_(empty)_"
    head = frame.head(max_rows)
    cells = [[_cell(v) for v in row] for row in head.rows()]
    lines = ["| " + " | ".join(head.columns) + " |", "|" + "---|" * len(head.columns)]
    lines += ["| " + " | ".join(row) + " |" for row in cells]
    if frame.height > max_rows:
        lines.append(f"\n_{frame.height - max_rows} more rows not shown_")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, list):
        value = ", ".join(str(v) for v in value)
    text = str(value).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= 60 else text[:57] + "..."


def thumbnail_markdown(images: Sequence[Any], size_px: int = 64, alt: str = "thumb") -> str:
    """Inline JPEG thumbnails (PIL images) as one Markdown line, for an asset's UI page.

    JPEG, not PNG: a 64 px photo is about 1.5 kB as JPEG against 6 kB as PNG, and every
    partition's materialization event stores its thumbnails.
    """
    parts = []
    for image in images:
        thumb = image.convert("RGB")  # JPEG has no alpha; convert() also copies
        thumb.thumbnail((size_px, size_px))
        buffer = io.BytesIO()
        thumb.save(buffer, format="JPEG", quality=THUMBNAIL_JPEG_QUALITY)
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(f"![{alt}](data:image/jpeg;base64,{encoded})")
    return " ".join(parts)


def percentile_table(scores: pl.Series, label: str = "score") -> str:
    """A distribution as a few quantiles: what a person tunes thresholds against."""
    if scores.is_empty():
        return "_(no values)_"
    qs = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    frame = pl.DataFrame({"quantile": qs, label: [scores.quantile(q) for q in qs]})
    return markdown_table(frame)


def histogram_markdown(
    values: pl.Series,
    bins: int = 12,
    label: str = "score",
    band: tuple[float, float] | None = None,
    bar_width: int = 24,
) -> str:
    """A distribution as a text histogram in a code block, short enough to show inline.

    Bins are equal-width over the values' own range. `band` (low, high): the bins that overlap
    it are marked `*`, e.g. the score band mining keeps, so a person sees where it cuts.
    """
    values = values.drop_nulls().drop_nans() if values.dtype.is_float() else values.drop_nulls()
    if values.is_empty():
        return "_(no values)_"
    low, high = float(values.min()), float(values.max())
    width = (high - low) / bins if high > low else 1.0
    edges = [low + i * width for i in range(bins + 1)]
    positions = ((values.cast(pl.Float64) - low) / width).floor().cast(pl.Int64).clip(0, bins - 1)
    counts = positions.value_counts().to_dict(as_series=False)
    by_bin = dict(zip(counts[positions.name], counts["count"], strict=True))
    if high <= low:
        edges, by_bin = [low, high], {0: values.len()}
    largest = max(by_bin.values())
    digits = max(2, _decimals(width))
    lines = [f"{label:<{2 * digits + 5}} {'count':>{bar_width + 8}}"]
    for index in range(len(edges) - 1):
        start, end = edges[index], edges[index + 1]
        count = by_bin.get(index, 0)
        inside = band is not None and start < band[1] and end > band[0]
        lines.append(
            f"{start:.{digits}f}-{end:.{digits}f} {_bar(count, largest, bar_width)} "
            f"{count:>6}{' *' if inside else ''}"
        )
    legend = f"\n\n`*` bins overlap the band ({band[0]}, {band[1]})" if band is not None else ""
    return "```\n" + "\n".join(lines) + "\n```" + legend


def sparkline(values: Sequence[float], width: int = 48) -> str:
    """A series as one line of block characters (resampled to at most `width`), e.g. a loss."""
    points = [float(v) for v in values if v is not None and math.isfinite(float(v))]
    if not points:
        return ""
    if len(points) > width:
        # The mean of each of `width` equal slices: a smoothed curve, first and last included.
        size = len(points) / width
        points = [
            sum(chunk) / len(chunk)
            for i in range(width)
            if (chunk := points[round(i * size) : round((i + 1) * size)] or [points[-1]])
        ]
    low, high = min(points), max(points)
    span = high - low
    top = len(_SPARK_BLOCKS) - 1
    return "".join(_SPARK_BLOCKS[round((p - low) / span * top) if span > 0 else 0] for p in points)


def _bar(count: int, largest: int, width: int) -> str:
    eighths = round(8 * width * count / largest) if largest else 0
    full, part = divmod(eighths, 8)
    bar = "█" * full + (_BAR_BLOCKS[part] if part else "")
    return f"{bar:<{width}}"


def _decimals(step: float) -> int:
    """Decimals that tell bin edges `step` apart (2 for 0.05, 3 for 0.005)."""
    if step <= 0 or not math.isfinite(step):
        return 2
    return min(6, max(0, math.ceil(-math.log10(step)) + 1))
