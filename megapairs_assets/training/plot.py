"""The loss curve for the asset page: a PNG when matplotlib is installed, else a Markdown table,
and a one-line sparkline that the UI shows inline (the PNG sits behind "[Show Markdown]")."""

from __future__ import annotations

import base64
import importlib.util
import io
from pathlib import Path

import polars as pl

from megapairs_assets.lib.preview import sparkline
from megapairs_assets.lib.storage import write_atomic

TABLE_ROWS = 12
SPARKLINE_CHARS = 48
# Small on purpose: the PNG is embedded in every materialization event of the checkpoint.
_FIGURE_SIZE_IN = (6.0, 2.6)
_FIGURE_DPI = 80


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


def loss_sparkline_markdown(curve: pl.DataFrame) -> str:
    """The loss over training as one line, e.g. "`5.49` ▇▇▆▅▄▃▂ `4.65` (60 steps)": short
    enough for the UI to show inline, so the trend is visible without opening the plot."""
    losses = curve["loss"].drop_nulls().drop_nans() if curve.height else pl.Series([])
    if losses.is_empty():
        return "_(no training steps were run)_"
    line = sparkline(losses.to_list(), SPARKLINE_CHARS)
    return (
        f"`{losses[0]:.3f}` {line} `{losses[-1]:.3f}` "
        f"(InfoNCE loss, first to last of {losses.len()} logged steps"
        f"{_resampling(losses.len(), len(line))})"
    )


def _resampling(steps: int, chars: int) -> str:
    """What each character of the sparkline stands for, when it is not one step: `sparkline`
    averages `chars` equal slices of the steps, so a slice holds the floor or the ceiling of
    steps / chars (`; 48 characters, each the mean of 1-2 steps` for 60 steps)."""
    if chars == 0 or steps <= chars:
        return ""
    fewest, most = steps // chars, -(-steps // chars)
    span = f"{fewest}" if fewest == most else f"{fewest}-{most}"
    return f"; {chars} characters, each the mean of {span} steps"


def _write_png(curve: pl.DataFrame, png_path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display: render to a file only
    import matplotlib.pyplot as plt

    figure, axis = plt.subplots(figsize=_FIGURE_SIZE_IN, dpi=_FIGURE_DPI)
    steps, losses = curve["step"].to_list(), curve["loss"]
    axis.plot(steps, losses.to_list(), linewidth=0.8, alpha=0.45, label="per step")
    window = max(1, curve.height // 20)
    if window > 1:  # the trend through a noisy per-batch loss
        smooth = losses.rolling_mean(window_size=window, min_samples=1).to_list()
        axis.plot(steps, smooth, linewidth=1.6, label=f"mean of {window} steps")
        axis.legend(loc="upper right", fontsize="small", frameon=False)
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("InfoNCE loss")
    axis.grid(alpha=0.3)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    # A line plot needs few colours: a 32-colour palette PNG is about a third of the RGBA one.
    from PIL import Image

    buffer.seek(0)
    with Image.open(buffer) as image:
        small = image.convert("RGB").quantize(colors=32)
    write_atomic(png_path, lambda tmp: small.save(tmp, format="PNG", optimize=True))
