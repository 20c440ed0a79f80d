"""`megapairs lineage <id>`: the chain behind a mined pair or an image, read from the catalog."""

from __future__ import annotations

import json
from typing import Any

from megapairs_assets.lineage.catalog import LineageCatalog

_MAX_INPUTS_SHOWN = 4


def lineage_report(catalog: LineageCatalog, item_id: str) -> str | None:
    """A readable chain for a pair id, an image id or a quarantined source uri; None if unknown."""
    pair = catalog.query("SELECT * FROM pair_lineage WHERE pair_id = ?", [item_id])
    if pair.height:
        return _pair_report(catalog, pair.row(0, named=True))
    image = catalog.query("SELECT * FROM image_lineage WHERE image_id = ?", [item_id])
    if image.height:
        return _image_report(catalog, image.row(0, named=True))
    quarantined = catalog.query(
        "SELECT * FROM quarantine_log WHERE source_uri = ? OR shard || '/' || key = ?",
        [item_id, item_id],
    )
    if quarantined.height:
        lines = [f"{item_id} was quarantined:"]
        for row in quarantined.iter_rows(named=True):
            lines.append(f"  stage {row['stage']}: {row['reason']} ({row['detail']})")
            lines += _materialization_chain(catalog, row["materialization_id"], indent=4)
        return "\n".join(lines)
    return None


def _pair_report(catalog: LineageCatalog, pair: dict[str, Any]) -> str:
    scores = {
        k.removeprefix("score_"): v for k, v in json.loads(pair["scores"]).items() if v is not None
    }
    lines = [
        f"pair {pair['pair_id']}  (shard {pair['shard']})",
        f"  query  {pair['query_id']}",
        f"  target {pair['target_id']}",
        f"  found by {', '.join(pair['sources'])}; scores "
        + ", ".join(f"{k}={v:.4f}" for k, v in scores.items()),
        f"  hard negatives (query image first): {', '.join(pair['hard_negative_ids'])}",
        "  produced by:",
        *_materialization_chain(
            catalog,
            pair["materialization_id"],
            indent=4,
            focus={pair["query_id"].split("/")[0], pair["target_id"].split("/")[0]},
        ),
    ]
    for role in ("query_id", "target_id"):
        image = catalog.query("SELECT * FROM image_lineage WHERE image_id = ?", [pair[role]])
        if image.height:
            lines.append(f"  {role.removesuffix('_id')} image:")
            lines += ["    " + line for line in _image_lines(image.row(0, named=True))]
    return "\n".join(lines)


def _image_report(catalog: LineageCatalog, image: dict[str, Any]) -> str:
    lines = [f"image {image['image_id']}", *("  " + line for line in _image_lines(image))]
    lines += ["  produced by:", *_materialization_chain(catalog, image["materialization_id"], 4)]
    pairs = catalog.query(
        "SELECT pair_id, query_id, target_id, sources FROM pair_lineage "
        "WHERE query_id = ? OR target_id = ? ORDER BY pair_id LIMIT 10",
        [image["image_id"], image["image_id"]],
    )
    lines.append(f"  in {pairs.height}{'+' if pairs.height == 10 else ''} mined pairs")
    for row in pairs.iter_rows(named=True):
        sources = ", ".join(row["sources"])
        lines.append(f"    {row['pair_id']}: {row['query_id']} -> {row['target_id']} ({sources})")
    return "\n".join(lines)


def _image_lines(image: dict[str, Any]) -> list[str]:
    return [
        f"source  {image['source_uri']}",
        f"caption {image['caption']!r}",
        f"size    {image['width']}x{image['height']}, sha256 {image['content_hash'][:16]}...",
    ]


def _materialization_chain(
    catalog: LineageCatalog,
    materialization_id: str,
    indent: int,
    focus: set[str] | None = None,
    seen: set[str] | None = None,
) -> list[str]:
    """One line per materialization, then its inputs, depth first."""
    seen = set() if seen is None else seen
    pad = " " * indent
    if materialization_id in seen:
        return []
    seen.add(materialization_id)
    found = catalog.query(
        "SELECT * FROM materializations WHERE materialization_id = ?", [materialization_id]
    )
    if not found.height:
        return [f"{pad}{materialization_id} (not in catalog)"]
    m = found.row(0, named=True)
    models = json.loads(m["model_ids"] or "{}")
    counts = json.loads(m["row_counts"] or "{}")
    lines = [
        f"{pad}{m['asset']}[{m['partition']}] materialization {m['materialization_id'][:12]} "
        f"run {str(m['run_id'])[:8]} code {m['code_version']} "
        f"at {m['started_at']:%Y-%m-%d %H:%M:%S}"
        + (f" models {models}" if models else "")
        + (f" rows {counts}" if counts else "")
    ]
    inputs = json.loads(m["input_versions"] or "{}")
    chosen = {
        key: value
        for key, value in inputs.items()
        if focus is None or key.rsplit("/", 1)[-1] in focus
    } or inputs
    for version in list(chosen.values())[:_MAX_INPUTS_SHOWN]:
        lines += _materialization_chain(catalog, version, indent + 2, focus, seen)
    if (hidden := len(inputs) - min(len(chosen), _MAX_INPUTS_SHOWN)) > 0:
        lines.append(f"{pad}  (+{hidden} more inputs)")
    return lines
