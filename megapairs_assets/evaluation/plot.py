"""Base vs trained, per metric: the picture of one benchmark for the asset page.

With matplotlib installed, grouped bars rendered to a PNG embedded in Markdown; without it,
the same comparison as Markdown text bars (so the page never depends on an optional package).
Metrics read in their family's order, then by K as a number (`mAP@5, mAP@10, mAP@25, mAP@50`,
not the string order), and the PNG's legend sits right of the axes so it hides no bar. Given
the base model's retriever id, each retriever is named by its role, `base (<id>)` first and
`trained (<id>)` after it: two ids of one architecture read alike.
"""

from __future__ import annotations

import base64
import io
import re
from typing import TYPE_CHECKING

import polars as pl

from megapairs_assets.evaluation.run import MEAN_SPLIT

if TYPE_CHECKING:
    from matplotlib.figure import Figure

_TEXT_BAR_WIDTH = 25
_METRIC_AT_K = re.compile(r"^(?P<family>.+)@(?P<k>\d+)$")
_BLOCK = "█"


def headline_scores(scores: pl.DataFrame) -> pl.DataFrame:
    """The rows a comparison shows: the "mean" split where there is one, else every split."""
    if scores.height == 0:
        return scores
    if MEAN_SPLIT in scores["split"].to_list():
        return scores.filter(pl.col("split") == MEAN_SPLIT)
    return scores


def metric_sort_key(metric: str) -> tuple[str, int]:
    """`Recall@10` -> ("Recall", 10): a metric's family, then its K as a number (a metric
    without `@K` sorts before its family's K values)."""
    match = _METRIC_AT_K.match(metric)
    return (match["family"], int(match["k"])) if match else (metric, -1)


def ordered_scores(rows: pl.DataFrame) -> pl.DataFrame:
    """`rows` with splits in their first-seen order and, within a split, metrics by
    `metric_sort_key` (the order every comparison shows them in)."""
    split_rank = {split: i for i, split in enumerate(dict.fromkeys(rows["split"]))}
    order = sorted(
        range(rows.height),
        key=lambda i: (split_rank[rows["split"][i]], metric_sort_key(rows["metric"][i])),
    )
    return rows[order]


def retriever_label(retriever_id: str, base_retriever_id: str | None) -> str:
    """`base (<id>)` for the base model, `trained (<id>)` for any other retriever; the bare id
    when the base is not known."""
    if base_retriever_id is None:
        return retriever_id
    role = "base" if retriever_id == base_retriever_id else "trained"
    return f"{role} ({retriever_id})"


def _labelled_retrievers(rows: pl.DataFrame, base_retriever_id: str | None) -> pl.DataFrame:
    """`rows` with the retriever's label in `retriever`, the base model's rows first (a stable
    sort: the metric order within each retriever is kept)."""
    labels = [retriever_label(r, base_retriever_id) for r in rows["retriever_id"]]
    return rows.with_columns(retriever=pl.Series(labels, dtype=pl.String)).sort(
        pl.col("retriever_id") != (base_retriever_id or ""), maintain_order=True
    )


def comparison_markdown(
    scores: pl.DataFrame, title: str, base_retriever_id: str | None = None
) -> str:
    """Markdown comparing retrievers per metric (`retriever_id`, `split`, `metric`, `value`);
    with `base_retriever_id`, retrievers are named `base (<id>)` / `trained (<id>)`."""
    rows = headline_scores(scores)
    if rows.height == 0:
        return f"_{title}: no scores yet_"
    try:
        return _png_markdown(comparison_figure(rows, title, base_retriever_id), title)
    except ImportError:
        return _text_bars(_labelled_retrievers(ordered_scores(rows), base_retriever_id), title)


def _labels(rows: pl.DataFrame) -> list[str]:
    splits = rows["split"].unique().to_list()
    if len(splits) == 1:
        return rows["metric"].to_list()
    return [f"{s} {m}" for s, m in zip(rows["split"], rows["metric"], strict=True)]


def _text_bars(rows: pl.DataFrame, title: str) -> str:
    lines = [f"**{title}** (percent; one bar per retriever)", "", "```"]
    rows = rows.with_columns(label=pl.Series(_labels(rows)))
    width = max(len(r) for r in rows["retriever"])
    for label in dict.fromkeys(rows["label"]):
        lines.append(label)
        for row in rows.filter(pl.col("label") == label).iter_rows(named=True):
            filled = round(_TEXT_BAR_WIDTH * max(0.0, min(row["value"], 100.0)) / 100.0)
            lines.append(
                f"  {row['retriever']:<{width}} {_BLOCK * filled:<{_TEXT_BAR_WIDTH}} "
                f"{row['value']:6.2f}"
            )
    lines.append("```")
    return "\n".join(lines)


def comparison_figure(
    scores: pl.DataFrame, title: str, base_retriever_id: str | None = None
) -> Figure:
    """Grouped bars (one per retriever, labelled by `retriever_label`, the base first) per
    headline metric, in `ordered_scores` order, with the legend outside the axes. Raises
    ImportError without matplotlib. The caller closes it."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = ordered_scores(headline_scores(scores))
    rows = rows.with_columns(label=pl.Series(_labels(rows)))
    labels = list(dict.fromkeys(rows["label"]))  # in metric order, before the base goes first
    rows = _labelled_retrievers(rows, base_retriever_id)
    retrievers = list(dict.fromkeys(rows["retriever"]))
    bar_width = 0.8 / max(1, len(retrievers))
    figure, axes = plt.subplots(figsize=(max(4.0, 1.2 * len(labels)), 3.0), dpi=100)
    for offset, retriever in enumerate(retrievers):
        mine = rows.filter(pl.col("retriever") == retriever)
        value = dict(zip(mine["label"], mine["value"], strict=True))
        positions = [i + offset * bar_width for i in range(len(labels))]
        axes.bar(positions, [value.get(label, 0.0) for label in labels], bar_width, label=retriever)
    axes.set_xticks([i + bar_width * (len(retrievers) - 1) / 2 for i in range(len(labels))])
    axes.set_xticklabels(labels)
    axes.set_ylabel("percent")
    axes.set_title(title)
    # Right of the axes: inside them it would hide the tallest bars. No tight_layout: it would
    # squeeze the axes to fit a long retriever id; the PNG is saved "tight" around both instead.
    axes.legend(fontsize="small", loc="upper left", bbox_to_anchor=(1.01, 1.0), borderaxespad=0)
    return figure


def _png_markdown(figure: Figure, title: str) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", bbox_inches="tight")  # "tight" keeps the legend
    plt.close(figure)
    encoded = base64.b64encode(buffer.getvalue()).decode()
    return f"![{title}](data:image/png;base64,{encoded})"
