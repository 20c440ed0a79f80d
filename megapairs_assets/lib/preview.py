"""Plain previews for the UI: small Markdown tables and inline thumbnails (no Dagster here)."""

from __future__ import annotations

import base64
import io
from collections.abc import Sequence
from typing import Any

import polars as pl


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


def thumbnail_markdown(images: Sequence[Any], size_px: int = 64) -> str:
    """Inline PNG thumbnails (PIL images) as one Markdown line, for an asset's UI page."""
    parts = []
    for image in images:
        thumb = image.copy()
        thumb.thumbnail((size_px, size_px))
        buffer = io.BytesIO()
        thumb.save(buffer, format="PNG")
        encoded = base64.b64encode(buffer.getvalue()).decode("ascii")
        parts.append(f"![thumb](data:image/png;base64,{encoded})")
    return " ".join(parts)


def percentile_table(scores: pl.Series, label: str = "score") -> str:
    """A distribution as a few quantiles: what a person tunes thresholds against."""
    if scores.is_empty():
        return "_(no values)_"
    qs = [0.01, 0.1, 0.25, 0.5, 0.75, 0.9, 0.99]
    frame = pl.DataFrame({"quantile": qs, label: [scores.quantile(q) for q in qs]})
    return markdown_table(frame)
