"""The loss curve for the asset page: a PNG when matplotlib is installed, else a Markdown table."""

from __future__ import annotations

import base64
import importlib.util
from pathlib import Path

import polars as pl

from megapairs_assets.lib.storage import write_atomic

TABLE_ROWS = 12


def sample_curve(curve: pl.DataFrame, rows: int = TABLE_ROWS) -> pl.DataFrame:
    """About `rows` evenly spaced steps of the curve (first and last included)."""
    if curve.height <= rows:
        return curve
    positions = sorted({round(i * (curve.height - 1) / (rows - 1)) for i in range(rows)})
    return curve[positions]


def loss_plot_markdown(curve: pl.DataFrame, png_path: Path) -> tuple[str, Path | None]:
    """Markdown for the asset page and the PNG written (None without matplotlib)."""
    if curve.is_empty():
        return "_(no training steps were run)_", None
    if importlib.util.find_spec("matplotlib") is not None:
        _write_png(curve, png_path)
        encoded = base64.b64encode(png_path.read_bytes()).decode("ascii")
        return f"![training loss](data:image/png;base64,{encoded})", png_path
    sampled = sample_curve(curve.select("step", "loss", "learning_rate"))
    lines = ["| step | loss | learning rate |", "|---:|---:|---:|"]
    lines += [f"| {s} | {loss:.4f} | {lr:.3g} |" for s, loss, lr in sampled.rows()]
    return "\n".join(lines), None


def _write_png(curve: pl.DataFrame, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=(6, 3), dpi=100)
    axis.plot(curve["step"].to_list(), curve["loss"].to_list(), linewidth=1)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("InfoNCE loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    write_atomic(png_path, lambda tmp: figure.savefig(tmp, format="png"))
    plt.close(figure)
