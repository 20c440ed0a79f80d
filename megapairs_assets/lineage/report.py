"""`megapairs lineage <id>`: the chain behind a mined pair or an image, read from the catalog.

An id is looked up, in order, as a pair id, an image id, a kept image's source uri, a
quarantined input's source uri (or `shard/key`), and finally as the end of a source uri
(`00000.tar#000000000.jpg` finds `/any/path/00000.tar#000000000.jpg`). An image's report lists
the pairs it is in, a page at a time, and every stage that skipped it (for example
`no_caption` from the caption embeddings), from `quarantine_log`.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import duckdb
import polars as pl

from megapairs_assets.lineage.catalog import LineageCatalog

DEFAULT_PAIR_LIMIT = 10
# Inputs of one materialization shown before "(+N more inputs)"; `all_inputs` lifts it.
MAX_INPUTS_SHOWN = 4
_MAX_CANDIDATES_SHOWN = 10
_STATUS_COMPLETE = "complete"


@dataclass(frozen=True)
class _Reader:
    """Queries on one catalog connection: a report is dozens of small reads, and opening a
    connection per read (lock, schema check) cost far more than the reads themselves."""

    con: duckdb.DuckDBPyConnection

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        return self.con.execute(sql, params or []).pl()


@dataclass(frozen=True)
class ReportOptions:
    """How much a report shows: `pair_limit` None lists every pair of an image."""

    pair_limit: int | None = DEFAULT_PAIR_LIMIT
    pair_offset: int = 0
    all_inputs: bool = False

    def __post_init__(self) -> None:
        if self.pair_limit is not None and self.pair_limit < 0:
            raise ValueError(f"pair_limit must be >= 0 or None, got {self.pair_limit}")
        if self.pair_offset < 0:
            raise ValueError(f"pair_offset must be >= 0, got {self.pair_offset}")


def lineage_report(
    catalog: LineageCatalog,
    item_id: str,
    *,
    pair_limit: int | None = DEFAULT_PAIR_LIMIT,
    pair_offset: int = 0,
    all_inputs: bool = False,
) -> str | None:
    """A readable chain for a pair id, an image id or a source uri; None if nothing matches.

    `pair_limit` / `pair_offset` page through an image's pairs (`pair_limit=None`: all of
    them); `all_inputs` lists every input of every materialization instead of the first
    `MAX_INPUTS_SHOWN`.
    """
    options = ReportOptions(pair_limit, pair_offset, all_inputs)
    with catalog.connect() as con:
        return _report(_Reader(con), item_id, options)


def _report(reader: _Reader, item_id: str, options: ReportOptions) -> str | None:
    tables = _tables(reader)
    if "pair_lineage" in tables:
        pair = reader.query("SELECT * FROM pair_lineage WHERE pair_id = ?", [item_id])
        if pair.height:
            return _pair_report(reader, pair.row(0, named=True), tables, options)
    if "image_lineage" in tables:
        image = reader.query(
            "SELECT * FROM image_lineage WHERE image_id = ? OR source_uri = ? ORDER BY image_id",
            [item_id, item_id],
        )
        if image.height:
            return _image_report(reader, image.row(0, named=True), tables, options)
    quarantined = _quarantine_rows(
        reader, tables, "source_uri = ? OR shard || '/' || key = ?", [item_id, item_id]
    )
    if quarantined.height:
        return _quarantine_report(reader, item_id, quarantined, options)
    return _by_uri_suffix(reader, item_id, tables, options)


def _tables(reader: _Reader) -> set[str]:
    """Tables the catalog holds: row tables appear once their stage first wrote to it."""
    return set(reader.query("SELECT table_name FROM information_schema.tables")["table_name"])


def _quarantine_rows(
    reader: _Reader, tables: set[str], where: str, params: list[Any]
) -> pl.DataFrame:
    if "quarantine_log" not in tables:
        return pl.DataFrame()
    return reader.query(
        f"SELECT * FROM quarantine_log WHERE {where} ORDER BY stage, reason, source_uri", params
    )


def _by_uri_suffix(
    reader: _Reader, tail: str, tables: set[str], options: ReportOptions
) -> str | None:
    """Match the end of a source uri at a path boundary, e.g. `00000.tar#000000000.jpg`."""
    where, params = "ends_with(source_uri, ?)", ["/" + tail.lstrip("/")]
    images = (
        reader.query(f"SELECT * FROM image_lineage WHERE {where} ORDER BY image_id", params)
        if "image_lineage" in tables
        else pl.DataFrame()
    )
    if images.height == 1:
        return _image_report(reader, images.row(0, named=True), tables, options)
    if images.height > 1:
        return _candidates(tail, images["source_uri"].to_list())
    quarantined = _quarantine_rows(reader, tables, where, params)
    uris = quarantined["source_uri"].unique().sort().to_list() if quarantined.height else []
    if len(uris) == 1:
        return _quarantine_report(reader, uris[0], quarantined, options)
    if uris:
        return _candidates(tail, uris)
    return None


def _candidates(tail: str, uris: list[str]) -> str:
    lines = [f"{len(uris)} source uris end with {tail!r}; give one in full:"]
    lines += [f"  {uri}" for uri in uris[:_MAX_CANDIDATES_SHOWN]]
    if len(uris) > _MAX_CANDIDATES_SHOWN:
        lines.append(f"  (+{len(uris) - _MAX_CANDIDATES_SHOWN} more)")
    return "\n".join(lines)


def _quarantine_report(
    reader: _Reader, item_id: str, rows: pl.DataFrame, options: ReportOptions
) -> str:
    lines = [f"{item_id} was quarantined:"]
    for row in rows.iter_rows(named=True):
        lines.append(f"  stage {row['stage']}: {row['reason']} ({row['detail']})")
        lines += _materialization_chain(reader, row["materialization_id"], 4, options)
    return "\n".join(lines)


def _pair_report(
    reader: _Reader, pair: dict[str, Any], tables: set[str], options: ReportOptions
) -> str:
    lines = [
        f"pair {pair['pair_id']}  (shard {pair['shard']})",
        f"  query  {pair['query_id']}",
        f"  target {pair['target_id']}",
        f"  found by {', '.join(pair['sources'])}; scores {_scores(pair['scores'])}",
        f"  hard negatives (query image first): {', '.join(pair['hard_negative_ids'])}",
        "  produced by:",
        *_materialization_chain(
            reader,
            pair["materialization_id"],
            4,
            options,
            focus={pair["query_id"].split("/")[0], pair["target_id"].split("/")[0]},
        ),
    ]
    # A later stage that dropped the pair (generation keys its quarantine rows by pair id).
    dropped = _quarantine_rows(
        reader, tables, "shard = ? AND key = ?", [pair["shard"], pair["pair_id"]]
    )
    for row in dropped.iter_rows(named=True):
        lines.append(f"  dropped by {row['stage']}: {row['reason']} ({row['detail']})")
        lines += _materialization_chain(reader, row["materialization_id"], 4, options)
    if "image_lineage" in tables:
        for role in ("query_id", "target_id"):
            image = reader.query("SELECT * FROM image_lineage WHERE image_id = ?", [pair[role]])
            if image.height:
                lines.append(f"  {role.removesuffix('_id')} image:")
                lines += ["    " + line for line in _image_lines(image.row(0, named=True))]
    return "\n".join(lines)


def _scores(scores_json: str | None) -> str:
    scores = json.loads(scores_json or "{}")
    return ", ".join(
        f"{name.removeprefix('score_')}={value:.4f}"
        for name, value in scores.items()
        if value is not None
    )


def _image_report(
    reader: _Reader, image: dict[str, Any], tables: set[str], options: ReportOptions
) -> str:
    lines = [f"image {image['image_id']}", *("  " + line for line in _image_lines(image))]
    lines += [
        "  produced by:",
        *_materialization_chain(reader, image["materialization_id"], 4, options),
    ]
    lines += _skip_lines(reader, image, tables, options)
    if "pair_lineage" in tables:
        lines += _pair_lines(reader, image["image_id"], options)
    return "\n".join(lines)


def _skip_lines(
    reader: _Reader, image: dict[str, Any], tables: set[str], options: ReportOptions
) -> list[str]:
    """Every stage that left this image out, with its reason: the image's gaps downstream."""
    skips = _quarantine_rows(
        reader,
        tables,
        "source_uri = ? OR (shard = ? AND key = ?)",
        [image["source_uri"], image["shard"], image["key"]],
    )
    if not skips.height:
        return ["  skipped by no stage"]
    lines = [f"  skipped by {skips.height} stage{'s' if skips.height != 1 else ''}:"]
    for row in skips.iter_rows(named=True):
        lines.append(f"    {row['stage']}: {row['reason']} ({row['detail']})")
        lines += _materialization_chain(reader, row["materialization_id"], 6, options)
    return lines


def _pair_lines(reader: _Reader, image_id: str, options: ReportOptions) -> list[str]:
    """A page of the pairs the image is in (as query first), with counts and how to see more."""
    counts = reader.query(
        "SELECT count(*) FILTER (WHERE query_id = $1) AS as_query, "
        "count(*) FILTER (WHERE target_id = $1) AS as_target, "
        "count(*) FILTER (WHERE list_contains(hard_negative_ids[2:], $1)) AS as_negative "
        "FROM pair_lineage",
        [image_id],
    ).row(0, named=True)
    total = counts["as_query"] + counts["as_target"]
    lines = [
        f"  in {total} mined pair{'s' if total != 1 else ''} "
        f"({counts['as_query']} as query, {counts['as_target']} as target); "
        f"a mined hard negative in {counts['as_negative']}"
    ]
    if not total:
        return lines
    page = reader.query(
        "SELECT pair_id, query_id, target_id, sources, scores FROM pair_lineage "
        "WHERE query_id = $1 OR target_id = $1 "
        "ORDER BY query_id <> $1, query_id, target_id "
        + ("LIMIT $3 " if options.pair_limit is not None else "")
        + "OFFSET $2",
        [image_id, options.pair_offset]
        + ([options.pair_limit] if options.pair_limit is not None else []),
    )
    for row in page.iter_rows(named=True):
        lines.append(
            f"    {row['pair_id']}: {row['query_id']} -> {row['target_id']} "
            f"({', '.join(row['sources'])}; {_scores(row['scores'])})"
        )
    first, last = options.pair_offset + 1, options.pair_offset + page.height
    if page.height < total:
        shown = f"pairs {first}-{last} of {total}" if page.height else f"none of {total} pairs"
        more = "--offset K / --limit N for another page, --all for every pair"
        lines.append(f"    (showing {shown}; {more})")
    return lines


def _image_lines(image: dict[str, Any]) -> list[str]:
    return [
        f"source  {image['source_uri']}",
        f"caption {image['caption']!r}",
        f"size    {image['width']}x{image['height']}, sha256 {image['content_hash'][:16]}...",
    ]


def _materialization_chain(
    reader: _Reader,
    materialization_id: str,
    indent: int,
    options: ReportOptions,
    focus: set[str] | None = None,
    seen: set[str] | None = None,
) -> list[str]:
    """One line per materialization, then its inputs, depth first.

    With `focus` (shard ids), inputs of those shards are followed first; the rest, and any
    past `MAX_INPUTS_SHOWN`, are counted unless `options.all_inputs` is set.
    """
    seen = set() if seen is None else seen
    pad = " " * indent
    if materialization_id in seen:
        return []
    seen.add(materialization_id)
    found = reader.query(
        "SELECT * FROM materializations WHERE materialization_id = ?", [materialization_id]
    )
    if not found.height:
        return [f"{pad}{materialization_id} (not in catalog)"]
    m = found.row(0, named=True)
    models = json.loads(m["model_ids"] or "{}")
    counts = json.loads(m["row_counts"] or "{}")
    status = m.get("status") or _STATUS_COMPLETE
    lines = [
        f"{pad}{m['asset']}[{m['partition']}] materialization {m['materialization_id'][:12]} "
        f"run {str(m['run_id'])[:8]} code {m['code_version']} "
        f"at {m['started_at']:%Y-%m-%d %H:%M:%S}"
        + (f" [{status}]" if status != _STATUS_COMPLETE else "")
        + (f" models {models}" if models else "")
        + (f" rows {counts}" if counts else "")
    ]
    inputs = json.loads(m["input_versions"] or "{}")
    if options.all_inputs:
        chosen = list(inputs.values())
    else:
        focused = [
            version
            for key, version in inputs.items()
            if focus is None or key.rsplit("/", 1)[-1] in focus
        ] or list(inputs.values())
        chosen = focused[:MAX_INPUTS_SHOWN]
    for version in chosen:
        lines += _materialization_chain(reader, version, indent + 2, options, focus, seen)
    if hidden := len(inputs) - len(chosen):
        lines.append(f"{pad}  (+{hidden} more input{'s' if hidden != 1 else ''}; --all-inputs)")
    return lines
