"""`megapairs lineage <id>`: the chain behind a triplet, a pair, an image or a materialization.

An id (surrounding whitespace ignored) is looked up, in order, as a triplet id, a pair id, an
image id or its path in an export (`images/<shard>/<key>.jpg`, as `q_img` holds it), a kept
image's source uri, a quarantined input's source uri (or `shard/key`), a
materialization id, a partition (`asset[partition]` as reports print it, or
`asset/partition`), the end of a source uri (`00000.tar#000000000.jpg` finds
`/any/path/00000.tar#000000000.jpg`), and finally as the start of a triplet, pair or
materialization id (at least `MIN_PREFIX_CHARS` characters; reports print 12).

Each lookup builds a plain structure (`lineage_data`, what `--json` prints) and the text report
is rendered from it (`lineage_report`). Every materialization in a chain says whether it is
still the current version of its partition: "(current; 2 older records)", "(superseded by
<id>)" or "(a newer attempt <id> is failed)", and a chain that read an input changed since
ends with a `stale:` line: a pair mined from a KNN graph rebuilt since shows as such.
An image's report lists the pairs it is in, a page at a time, and every stage that skipped it
(for example `no_caption` from the caption embeddings), from `quarantine_log`.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import duckdb
import polars as pl

from megapairs_assets.lib.storage import data_root_path, read_parquet
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.lineage.id_lists import IN_IDS, id_list

DEFAULT_PAIR_LIMIT = 10
# Inputs of one materialization shown before "(+N more inputs)"; `all_inputs` lifts it.
MAX_INPUTS_SHOWN = 4
# An id prefix shorter than this is never expanded (too many ids would share it).
MIN_PREFIX_CHARS = 6
_MAX_CANDIDATES_SHOWN = 10
_STATUS_COMPLETE = "complete"
_TRIPLET_PREFIX = "t-"
# `asset[partition]`, as every chain line prints a materialization.
_BRACKETED_PARTITION = re.compile(r"(?P<asset>[A-Za-z_][\w.-]*)\[(?P<partition>[^\]]*)\]")
_MAX_ERROR_SHOWN = 300
# An image's path in an export folder or a triplet's q_img/t_img/hns: `images/<shard>/<key>.jpg`
# (generation.common.image_relpath; ids with unsafe characters are hashed there and not found).
_EXPORT_IMAGE_PATH = re.compile(r"(?:.*/)?images/(?P<shard>[^/]+)/(?P<key>[^/]+)\.jpg")


@dataclass(frozen=True)
class _Reader:
    """Queries on one catalog connection: a report is dozens of small reads, and opening a
    connection per read (lock, schema check) cost far more than the reads themselves."""

    con: duckdb.DuckDBPyConnection

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        return self.con.execute(sql, params or []).pl()


@dataclass(frozen=True)
class ReportOptions:
    """How much a report shows: `pair_limit` None lists every pair of an image.

    storage_options: for reading a triplet's texts from a table recorded as an object URL.
    """

    pair_limit: int | None = DEFAULT_PAIR_LIMIT
    pair_offset: int = 0
    all_inputs: bool = False
    storage_options: Mapping[str, Any] | None = None

    def __post_init__(self) -> None:
        if self.pair_limit is not None and self.pair_limit < 0:
            raise ValueError(f"pair_limit must be >= 0 or None, got {self.pair_limit}")
        if self.pair_offset < 0:
            raise ValueError(f"pair_offset must be >= 0, got {self.pair_offset}")


def lineage_data(
    catalog: LineageCatalog,
    item_id: str,
    *,
    pair_limit: int | None = DEFAULT_PAIR_LIMIT,
    pair_offset: int = 0,
    all_inputs: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> dict[str, Any] | None:
    """What the catalog knows about an id, as plain JSON-ready values; None if nothing matches.

    The result's `kind` says what the id was: `triplet`, `pair`, `image`, `quarantined`,
    `materialization`, `partition` or `candidates` (an ambiguous uri end or id prefix).
    Materializations appear as nested nodes: their record, `version` (is it still current),
    and `inputs` (each with its `lineage` node, or null where it is not expanded).
    """
    options = ReportOptions(pair_limit, pair_offset, all_inputs, storage_options)
    with catalog.connect(read_only=True) as con:
        return _lookup(_Reader(con), item_id.strip(), options)


def lineage_report(
    catalog: LineageCatalog,
    item_id: str,
    *,
    pair_limit: int | None = DEFAULT_PAIR_LIMIT,
    pair_offset: int = 0,
    all_inputs: bool = False,
    storage_options: Mapping[str, Any] | None = None,
) -> str | None:
    """A readable chain for any id `lineage_data` takes; None if nothing matches.

    `pair_limit` / `pair_offset` page through an image's pairs (`pair_limit=None`: all of
    them); `all_inputs` lists every input of every materialization instead of the first
    `MAX_INPUTS_SHOWN`.
    """
    data = lineage_data(
        catalog,
        item_id,
        pair_limit=pair_limit,
        pair_offset=pair_offset,
        all_inputs=all_inputs,
        storage_options=storage_options,
    )
    return None if data is None else render(data)


def not_found_hint(catalog: LineageCatalog, item_id: str) -> str:
    """Why an id may be missing: its shard was retired (its row lineage removed with it)."""
    with catalog.connect(read_only=True) as con:
        retired = _Reader(con).query(
            "SELECT asset, partition FROM materializations WHERE partition IS NOT NULL "
            "GROUP BY asset, partition HAVING arg_max(status, started_at) = 'retired' "
            "ORDER BY partition, asset"
        )
    if not retired.height:
        return ""
    shards = sorted(set(retired["partition"].to_list()))
    shard = item_id.strip().split("/")[0]
    if shard in shards:
        return (
            f"shard {shard} left the corpus (retired): its row lineage was removed; "
            f"`megapairs lineage image_corpus[{shard}]` shows its materializations"
        )
    listed = ", ".join(shards[:_MAX_CANDIDATES_SHOWN])
    hidden = len(shards) - _MAX_CANDIDATES_SHOWN
    more = f" (+{hidden} more)" if hidden > 0 else ""
    return (
        f"ids of retired shards ({listed}{more}) are no longer in the row lineage; "
        "`megapairs lineage image_corpus[<shard>]` shows a retired shard's materializations"
    )


# -- lookup ------------------------------------------------------------------------------------


def _lookup(reader: _Reader, item_id: str, options: ReportOptions) -> dict[str, Any] | None:
    if not item_id:
        return None
    tables = _tables(reader)
    if "triplet_lineage" in tables and item_id.startswith(_TRIPLET_PREFIX):
        found = reader.query("SELECT * FROM triplet_lineage WHERE triplet_id = ?", [item_id])
        if found.height:
            return _triplet_data(reader, found.row(0, named=True), tables, options)
    if "pair_lineage" in tables:
        pair = reader.query("SELECT * FROM pair_lineage WHERE pair_id = ?", [item_id])
        if pair.height:
            return _pair_data(reader, pair.row(0, named=True), tables, options)
    if "image_lineage" in tables:
        exported = _EXPORT_IMAGE_PATH.fullmatch(item_id)
        image_id = f"{exported['shard']}/{exported['key']}" if exported else item_id
        image = reader.query(
            "SELECT * FROM image_lineage WHERE image_id = ? OR source_uri = ? ORDER BY image_id",
            [image_id, item_id],
        )
        if image.height:
            return _image_data(reader, image.row(0, named=True), tables, options)
    quarantined = _quarantine_rows(
        reader, tables, "source_uri = ? OR shard || '/' || key = ?", [item_id, item_id]
    )
    if quarantined.height:
        return _quarantine_data(reader, item_id, quarantined, options)
    record = reader.query("SELECT * FROM materializations WHERE materialization_id = ?", [item_id])
    if record.height:
        return _materialization_data(reader, record.row(0, named=True), options)
    partition = _partition_data(reader, item_id, options)
    if partition is not None:
        return partition
    by_suffix = _by_uri_suffix(reader, item_id, tables, options)
    if by_suffix is not None:
        return by_suffix
    return _by_prefix(reader, item_id, tables, options)


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
) -> dict[str, Any] | None:
    """Match the end of a source uri at a path boundary, e.g. `00000.tar#000000000.jpg`."""
    where, params = "ends_with(source_uri, ?)", ["/" + tail.lstrip("/")]
    images = (
        reader.query(f"SELECT * FROM image_lineage WHERE {where} ORDER BY image_id", params)
        if "image_lineage" in tables
        else pl.DataFrame()
    )
    if images.height == 1:
        return _image_data(reader, images.row(0, named=True), tables, options)
    if images.height > 1:
        return _candidates(tail, "source uris end with", images["source_uri"].to_list())
    quarantined = _quarantine_rows(reader, tables, where, params)
    uris = quarantined["source_uri"].unique().sort().to_list() if quarantined.height else []
    if len(uris) == 1:
        return _quarantine_data(reader, uris[0], quarantined, options)
    if uris:
        return _candidates(tail, "source uris end with", uris)
    return None


def _by_prefix(
    reader: _Reader, prefix: str, tables: set[str], options: ReportOptions
) -> dict[str, Any] | None:
    """The start of a triplet, pair or materialization id, as reports abbreviate them."""
    if len(prefix.removeprefix(_TRIPLET_PREFIX)) < MIN_PREFIX_CHARS:
        return None
    sources = [("materializations", "materialization_id")]
    if "pair_lineage" in tables:
        sources.append(("pair_lineage", "pair_id"))
    if "triplet_lineage" in tables and prefix.startswith(_TRIPLET_PREFIX):
        sources = [("triplet_lineage", "triplet_id")]
    matches: list[str] = []
    for table, column in sources:
        found = reader.query(
            f"SELECT DISTINCT {column} AS id FROM {table} WHERE starts_with({column}, ?) "
            f"ORDER BY id LIMIT {_MAX_CANDIDATES_SHOWN + 1}",
            [prefix],
        )
        matches += found["id"].to_list()
    if len(matches) == 1:
        return _lookup(reader, matches[0], options)
    if matches:
        return _candidates(prefix, "ids start with", matches)
    return None


def _candidates(given: str, how: str, matches: list[str]) -> dict[str, Any]:
    return {
        "kind": "candidates",
        "id": given,
        "how": how,
        "matches": matches[:_MAX_CANDIDATES_SHOWN],
        "more": max(0, len(matches) - _MAX_CANDIDATES_SHOWN),
    }


# -- what each kind of id holds -------------------------------------------------------------


def _triplet_data(
    reader: _Reader, row: dict[str, Any], tables: set[str], options: ReportOptions
) -> dict[str, Any]:
    images = {}
    if "image_lineage" in tables:
        ids = [row["query_id"], row["target_id"], *(row["hard_negative_ids"] or [])]
        found = reader.query(f"SELECT * FROM image_lineage WHERE image_id {IN_IDS}", [id_list(ids)])
        images = {r["image_id"]: _image_fields(r) for r in found.iter_rows(named=True)}
    from megapairs_assets.generation.common import image_relpath  # the export's layout

    export_paths = {
        image_id: image_relpath(image_id)
        for image_id in [row["query_id"], row["target_id"], *(row["hard_negative_ids"] or [])]
    }
    triplet = {k: v for k, v in row.items() if k not in ("materialization_id", "input_versions")}
    record = _record(reader, row["materialization_id"])
    return {
        "kind": "triplet",
        "id": row["triplet_id"],
        "triplet": triplet,
        "texts": _triplet_texts(record, row["triplet_id"], options),
        "images": images,
        "export_paths": export_paths,
        "produced_by": _chain(
            reader,
            row["materialization_id"],
            options,
            focus={row["query_id"].split("/")[0], row["target_id"].split("/")[0]},
        ),
    }


def _triplet_texts(
    record: dict[str, Any] | None, triplet_id: str, options: ReportOptions
) -> dict[str, Any]:
    """Description and instructions of a triplet, from the table its record names; {} when
    that table is gone or unreadable (a report never fails on it)."""
    paths = json.loads((record or {}).get("output_paths") or "{}")
    if not paths.get("triplets"):
        return {}
    try:
        table = read_parquet(
            data_root_path(paths["triplets"], options.storage_options),
            columns=["triplet_id", "description", "q_text"],
        )
    except (OSError, ValueError, pl.exceptions.PolarsError):
        return {}
    found = table.filter(pl.col("triplet_id") == triplet_id).select("description", "q_text")
    return found.row(0, named=True) if found.height else {}


def _pair_data(
    reader: _Reader, pair: dict[str, Any], tables: set[str], options: ReportOptions
) -> dict[str, Any]:
    data: dict[str, Any] = {
        "kind": "pair",
        "id": pair["pair_id"],
        "pair": {
            "pair_id": pair["pair_id"],
            "shard": pair["shard"],
            "query_id": pair["query_id"],
            "target_id": pair["target_id"],
            "sources": list(pair["sources"] or []),
            "scores": json.loads(pair["scores"] or "{}"),
            "hard_negative_ids": list(pair["hard_negative_ids"] or []),
        },
        "produced_by": _chain(
            reader,
            pair["materialization_id"],
            options,
            focus={pair["query_id"].split("/")[0], pair["target_id"].split("/")[0]},
        ),
        "triplet_ids": [],
        "dropped_by": [],
        "images": {},
        "missing_images": {},
    }
    if "triplet_lineage" in tables:
        data["triplet_ids"] = reader.query(
            "SELECT triplet_id FROM triplet_lineage WHERE pair_id = ? ORDER BY triplet_id",
            [pair["pair_id"]],
        )["triplet_id"].to_list()
    # A later stage that dropped the pair (generation keys its quarantine rows by pair id).
    dropped = _quarantine_rows(
        reader, tables, "shard = ? AND key = ?", [pair["shard"], pair["pair_id"]]
    )
    data["dropped_by"] = [_quarantine_entry(reader, row, options) for row in _rows(dropped)]
    if "image_lineage" in tables:
        for role in ("query_id", "target_id"):
            image = reader.query("SELECT * FROM image_lineage WHERE image_id = ?", [pair[role]])
            if image.height:
                data["images"][role.removesuffix("_id")] = _image_fields(image.row(0, named=True))
            else:
                data["missing_images"][role.removesuffix("_id")] = {
                    "image_id": pair[role],
                    "why": _why_missing(reader, pair[role]),
                }
    return data


def _why_missing(reader: _Reader, image_id: str) -> str:
    """Why an image a pair names has no row lineage: its shard left the corpus, usually."""
    shard = image_id.split("/")[0]
    newest = reader.query(
        "SELECT arg_max(status, started_at) AS status FROM materializations "
        "WHERE asset = 'image_corpus' AND partition = ?",
        [shard],
    )["status"].to_list()
    if newest == ["retired"]:
        return f"shard {shard} was retired (left the corpus) after this pair was mined"
    return "not in the catalog's image rows"


def _image_data(
    reader: _Reader, image: dict[str, Any], tables: set[str], options: ReportOptions
) -> dict[str, Any]:
    skips = _quarantine_rows(
        reader,
        tables,
        "source_uri = ? OR (shard = ? AND key = ?)",
        [image["source_uri"], image["shard"], image["key"]],
    )
    return {
        "kind": "image",
        "id": image["image_id"],
        "image": _image_fields(image),
        "produced_by": _chain(reader, image["materialization_id"], options),
        "skipped_by": [_quarantine_entry(reader, row, options) for row in _rows(skips)],
        "pairs": _pair_page(reader, image["image_id"], options)
        if "pair_lineage" in tables
        else None,
    }


def _quarantine_data(
    reader: _Reader, item_id: str, rows: pl.DataFrame, options: ReportOptions
) -> dict[str, Any]:
    return {
        "kind": "quarantined",
        "id": item_id,
        "entries": [_quarantine_entry(reader, row, options) for row in _rows(rows)],
    }


def _quarantine_entry(
    reader: _Reader, row: dict[str, Any], options: ReportOptions
) -> dict[str, Any]:
    entry = {k: row[k] for k in ("stage", "shard", "key", "source_uri", "reason", "detail")}
    entry["produced_by"] = _chain(reader, row["materialization_id"], options)
    return entry


def _materialization_data(
    reader: _Reader, record: dict[str, Any], options: ReportOptions
) -> dict[str, Any]:
    node = _chain(reader, record["materialization_id"], options)
    return {
        "kind": "materialization",
        "id": record["materialization_id"],
        "materialization": node,
        "details": _details(record),
    }


def _partition_data(reader: _Reader, item_id: str, options: ReportOptions) -> dict[str, Any] | None:
    """`asset[partition]` or `asset/partition`: every record of that partition, newest first."""
    match = _BRACKETED_PARTITION.fullmatch(item_id)
    if match:
        asset, partition = match["asset"], match["partition"]
    elif "/" in item_id:
        asset, partition = item_id.split("/", 1)
    else:
        return None
    history = reader.query(
        "SELECT * FROM materializations WHERE asset = ? AND partition IS NOT DISTINCT FROM ? "
        "ORDER BY started_at DESC, materialization_id",
        [asset, partition or None],
    )
    if not history.height:
        return None
    records = [_record_fields(r) for r in _rows(history)]
    newest = records[0]
    complete = [r for r in records if r["status"] == _STATUS_COMPLETE]
    return {
        "kind": "partition",
        "id": f"{asset}[{partition}]",
        "asset": asset,
        "partition": partition or None,
        "status": newest["status"],
        "readable": newest["status"] == _STATUS_COMPLETE,
        "current_materialization_id": newest["materialization_id"],
        "last_complete_materialization_id": complete[0]["materialization_id"] if complete else None,
        "records": records,
        # The inputs of the version readers use (or of the newest attempt, if none completed).
        "produced_by": _chain(
            reader, (complete[0] if complete else newest)["materialization_id"], options
        ),
    }


# -- pieces ----------------------------------------------------------------------------------


def _rows(frame: pl.DataFrame) -> list[dict[str, Any]]:
    return list(frame.iter_rows(named=True)) if frame.height else []


def _record(reader: _Reader, materialization_id: str) -> dict[str, Any] | None:
    found = reader.query(
        "SELECT * FROM materializations WHERE materialization_id = ?", [materialization_id]
    )
    return found.row(0, named=True) if found.height else None


def _image_fields(image: dict[str, Any]) -> dict[str, Any]:
    return {
        k: image.get(k)
        for k in (
            "image_id",
            "shard",
            "key",
            "source_uri",
            "caption",
            "width",
            "height",
            "content_hash",
        )
    }


def _record_fields(m: dict[str, Any]) -> dict[str, Any]:
    """One materialization record, JSON columns decoded."""
    return {
        "materialization_id": m["materialization_id"],
        "asset": m["asset"],
        "partition": m["partition"],
        "run_id": m["run_id"],
        "code_version": m["code_version"],
        "profile": m["profile"],
        "started_at": _iso(m["started_at"]),
        "duration_s": m["duration_s"],
        "status": m.get("status") or _STATUS_COMPLETE,
        "error": m.get("error"),
        "failed_checks": m.get("failed_checks"),
        "model_ids": json.loads(m["model_ids"] or "{}"),
        "row_counts": json.loads(m["row_counts"] or "{}"),
    }


def _details(m: dict[str, Any]) -> dict[str, Any]:
    return {
        "config": json.loads(m["config"] or "{}"),
        "output_paths": json.loads(m["output_paths"] or "{}"),
    }


def _iso(value: Any) -> str | None:
    return value.isoformat(sep=" ") if isinstance(value, datetime) else value


def _version(reader: _Reader, m: dict[str, Any]) -> dict[str, Any]:
    """Is this record still its partition's newest, and how many records does it have."""
    newest = reader.query(
        "SELECT arg_max(materialization_id, started_at) AS id, "
        "arg_max(status, started_at) AS status, count(*) AS records FROM materializations "
        "WHERE asset = ? AND partition IS NOT DISTINCT FROM ?",
        [m["asset"], m["partition"]],
    ).row(0, named=True)
    return {
        "current": newest["id"] == m["materialization_id"],
        "current_materialization_id": newest["id"],
        "current_status": newest["status"],
        "records": newest["records"],
    }


def _pair_page(reader: _Reader, image_id: str, options: ReportOptions) -> dict[str, Any]:
    """A page of the pairs the image is in (as query first), with counts."""
    counts = reader.query(
        "SELECT count(*) FILTER (WHERE query_id = $1) AS as_query, "
        "count(*) FILTER (WHERE target_id = $1) AS as_target, "
        "count(*) FILTER (WHERE list_contains(hard_negative_ids[2:], $1)) AS as_negative "
        "FROM pair_lineage",
        [image_id],
    ).row(0, named=True)
    total = counts["as_query"] + counts["as_target"]
    page = pl.DataFrame()
    if total:
        page = reader.query(
            "SELECT pair_id, query_id, target_id, sources, scores FROM pair_lineage "
            "WHERE query_id = $1 OR target_id = $1 "
            "ORDER BY query_id <> $1, query_id, target_id "
            + ("LIMIT $3 " if options.pair_limit is not None else "")
            + "OFFSET $2",
            [image_id, options.pair_offset]
            + ([options.pair_limit] if options.pair_limit is not None else []),
        )
    return {
        "total": total,
        **counts,
        "offset": options.pair_offset,
        "limit": options.pair_limit,
        "items": [
            {
                "pair_id": r["pair_id"],
                "query_id": r["query_id"],
                "target_id": r["target_id"],
                "sources": list(r["sources"] or []),
                "scores": json.loads(r["scores"] or "{}"),
            }
            for r in _rows(page)
        ],
    }


def _chain(
    reader: _Reader,
    materialization_id: str,
    options: ReportOptions,
    focus: set[str] | None = None,
    seen: set[str] | None = None,
) -> dict[str, Any]:
    """A materialization and its inputs, depth first, as nested nodes.

    With `focus` (shard ids), inputs of those shards are followed first; the rest, and any
    past `MAX_INPUTS_SHOWN`, are listed without their lineage unless `options.all_inputs` is
    set. A materialization already shown higher up is listed once, with `shown_above`.
    """
    seen = set() if seen is None else seen
    seen.add(materialization_id)
    m = _record(reader, materialization_id)
    if m is None:
        return {"materialization_id": materialization_id, "in_catalog": False}
    node: dict[str, Any] = {**_record_fields(m), "in_catalog": True, "version": _version(reader, m)}
    inputs = json.loads(m["input_versions"] or "{}")
    if options.all_inputs:
        chosen = list(inputs)
    else:
        focused = [
            key for key in inputs if focus is None or key.rsplit("/", 1)[-1] in focus
        ] or list(inputs)
        chosen = focused[:MAX_INPUTS_SHOWN]
    current = _inputs_current(reader, list(inputs.values()))
    node["inputs"] = []
    for key in [*chosen, *(k for k in inputs if k not in chosen)]:
        version = inputs[key]
        entry: dict[str, Any] = {
            "key": key,
            "materialization_id": version,
            "current": current.get(version),
            "lineage": None,
        }
        if key in chosen:
            if version in seen:
                entry["shown_above"] = True
            else:
                entry["lineage"] = _chain(reader, version, options, focus, seen)
        node["inputs"].append(entry)
    node["hidden_inputs"] = len(inputs) - len(chosen)
    node["stale_inputs"] = sorted(k for k in inputs if current.get(inputs[k]) is False)
    return node


def _inputs_current(reader: _Reader, versions: list[str]) -> dict[str, bool]:
    """version -> whether it is still the newest record of its partition (absent: unknown)."""
    if not versions:
        return {}
    found = reader.query(
        "SELECT v.materialization_id, "
        "  v.materialization_id = arg_max(m.materialization_id, m.started_at) AS current "
        "FROM materializations AS v JOIN materializations AS m "
        "  ON m.asset = v.asset AND m.partition IS NOT DISTINCT FROM v.partition "
        f"WHERE v.materialization_id {IN_IDS} GROUP BY v.materialization_id",
        [id_list(versions)],
    )
    return dict(zip(found["materialization_id"], found["current"], strict=True))


# -- text ------------------------------------------------------------------------------------


def render(data: dict[str, Any]) -> str:
    """The text report of a `lineage_data` result."""
    kind = data["kind"]
    if kind == "candidates":
        lines = [
            f"{len(data['matches']) + data['more']} {data['how']} {data['id']!r}; give one in full:"
        ]
        lines += [f"  {match}" for match in data["matches"]]
        if data["more"]:
            lines.append(f"  (+{data['more']} more)")
        return "\n".join(lines)
    return "\n".join(
        {
            "triplet": _triplet_lines,
            "pair": _pair_lines,
            "image": _image_lines,
            "quarantined": _quarantine_lines,
            "materialization": _materialization_lines,
            "partition": _partition_lines,
        }[kind](data)
    )


def served_as_other_model(model_id: str | None, served_model: str | None) -> bool:
    """Whether a server said another model answered than the configured `model_id`: served
    under another name, or another model altogether. The id's `@revision` or `@label` part
    is ours, so a server naming the model without it answered as asked; no record (rows from
    before servers' answers were kept) is not a difference."""
    if not served_model or not model_id:
        return False
    return served_model not in (model_id, model_id.partition("@")[0])


def _model_label(row: dict[str, Any], configured: str, served: str) -> str:
    """The model a text's rows name, and the one the server said answered when that differs."""
    model, answered = row.get(configured), row.get(served)
    if served_as_other_model(model, answered):
        return f"{model}; served as {answered}"
    return str(model)


def _triplet_lines(data: dict[str, Any]) -> list[str]:
    t, texts, images = data["triplet"], data["texts"], data["images"]

    def image_line(label: str, image_id: str) -> list[str]:
        info = images.get(image_id, {})
        return [
            f"  {label:<8} {image_id}  {data['export_paths'].get(image_id, '')}",
            f"           {info.get('source_uri', '?')}  caption: {info.get('caption') or '-'}",
        ]

    lines = [
        f"triplet {t['triplet_id']} (shard {t['shard']}, pair {t['pair_id']})",
        *image_line("query", t["query_id"]),
        *image_line("target", t["target_id"]),
        "  hard negatives (query first): " + ", ".join(t["hard_negative_ids"] or []),
        f"  description: {t['description_generator']} "
        f"[{_model_label(t, 'description_model', 'description_served_model')}]",
        f"    template {t['description_template']}, WORD_NUM {t['word_num']}, "
        f"request {str(t['description_request_key'])[:16]}",
    ]
    if texts.get("description"):
        lines.append(f"    {texts['description']}")
    lines += [
        f"  instructions: {t['instruction_generator']} "
        f"[{_model_label(t, 'instruction_model', 'instruction_served_model')}]",
        f"    template {t['instruction_template']}, demos "
        f"{', '.join(t['demo_ids'] or []) or '-'}, "
        f"request {str(t['instruction_request_key'])[:16]}",
    ]
    lines += [f"    - {text}" for text in texts.get("q_text") or []]
    lines += ["  produced by:", *_chain_lines(data["produced_by"], 4)]
    lines += _stale_lines(data["produced_by"], 2)
    return lines


def _pair_lines(data: dict[str, Any]) -> list[str]:
    pair = data["pair"]
    lines = [
        f"pair {pair['pair_id']}  (shard {pair['shard']})",
        f"  query  {pair['query_id']}",
        f"  target {pair['target_id']}",
        f"  found by {', '.join(pair['sources'])}; scores {_scores(pair['scores'])}",
        f"  hard negatives (query image first): {', '.join(pair['hard_negative_ids'])}",
    ]
    for triplet_id in data["triplet_ids"]:
        lines.append(f"  made into triplet {triplet_id}")
    lines += ["  produced by:", *_chain_lines(data["produced_by"], 4)]
    lines += _stale_lines(data["produced_by"], 2)
    for entry in data["dropped_by"]:
        lines.append(f"  dropped by {entry['stage']}: {entry['reason']} ({entry['detail']})")
        lines += _chain_lines(entry["produced_by"], 4)
    for role, image in data["images"].items():
        lines.append(f"  {role} image:")
        lines += ["    " + line for line in _image_field_lines(image)]
    for role, missing in data["missing_images"].items():
        lines.append(f"  {role} image {missing['image_id']}: {missing['why']}")
    return lines


def _image_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"image {data['id']}", *("  " + line for line in _image_field_lines(data["image"]))]
    lines += ["  produced by:", *_chain_lines(data["produced_by"], 4)]
    lines += _stale_lines(data["produced_by"], 2)
    skips = data["skipped_by"]
    if not skips:
        lines.append("  skipped by no stage")
    else:
        lines.append(f"  skipped by {len(skips)} stage{'s' if len(skips) != 1 else ''}:")
        for entry in skips:
            lines.append(f"    {entry['stage']}: {entry['reason']} ({entry['detail']})")
            lines += _chain_lines(entry["produced_by"], 6)
    if data["pairs"] is not None:
        lines += _pair_page_lines(data["pairs"])
    return lines


def _quarantine_lines(data: dict[str, Any]) -> list[str]:
    lines = [f"{data['id']} was quarantined:"]
    for entry in data["entries"]:
        lines.append(f"  stage {entry['stage']}: {entry['reason']} ({entry['detail']})")
        lines += _chain_lines(entry["produced_by"], 4)
    return lines


_HELD_BACK = "(training and held-out scores leave this partition out until it is clean)"


def _materialization_lines(data: dict[str, Any]) -> list[str]:
    node, details = data["materialization"], data["details"]
    lines = [f"materialization {node['materialization_id']}: {node['asset']}[{node['partition']}]"]
    lines.append(f"  status {node['status']}; {_version_text(node) or 'the only record'}")
    lines.append(
        f"  run {node['run_id']}, profile {node['profile']}, code {node['code_version']}, "
        f"started {node['started_at']}, took {node['duration_s']:.1f} s"
    )
    if node.get("error"):
        lines.append(f"  error: {node['error']}")
    if node.get("failed_checks"):
        lines.append(f"  failed blocking checks: {node['failed_checks']} {_HELD_BACK}")
    for label, values in (
        ("models", node["model_ids"]),
        ("rows", node["row_counts"]),
        ("outputs", details["output_paths"]),
        ("config", details["config"]),
    ):
        if values:
            lines.append(f"  {label}:")
            lines += [f"    {name}: {_plain(value)}" for name, value in values.items()]
    if node["inputs"]:
        lines.append("  inputs:")
        lines += _input_lines(node, 4)
    return lines + _stale_lines(node, 2)


def _partition_lines(data: dict[str, Any]) -> list[str]:
    records = data["records"]
    if data["readable"]:
        state = "readable: its newest record is complete"
    elif data["status"] == "retired":
        state = "retired: the shard left the corpus; its tables are not part of the dataset"
    else:
        state = (
            f"not readable: its newest record is {data['status']}; readers refuse it until "
            "it is re-materialized"
        )
    lines = [
        f"{data['id']}: {len(records)} record{'s' if len(records) != 1 else ''}, newest first",
        f"  {state}",
    ]
    for index, r in enumerate(records):
        mark = "newest " if index == 0 else "       "
        if r["status"] == "retired":
            lines.append(f"  {mark}{r['materialization_id'][:12]} retired  at {r['started_at']}")
            continue
        lines.append(
            f"  {mark}{r['materialization_id'][:12]} {r['status']:<8} run {r['run_id']} "
            f"code {r['code_version']} at {str(r['started_at'])[:19]}"
            + (f" rows {r['row_counts']}" if r["row_counts"] else "")
        )
        if r.get("error"):
            lines.append(f"    error: {_short(r['error'])}")
        elif r.get("failed_checks"):
            lines.append(f"    failed blocking checks: {r['failed_checks']}")
        elif r["status"] in ("failed", "pending") and r["run_id"]:
            lines.append(f"    why: the log of Dagster run {r['run_id']} (megapairs ui, Runs)")
    lines += [
        "  inputs of "
        + ("the last complete version:" if data["last_complete_materialization_id"] else "it:"),
        *_chain_lines(data["produced_by"], 4),
        *_stale_lines(data["produced_by"], 2),
    ]
    return lines


def _pair_page_lines(page: dict[str, Any]) -> list[str]:
    total = page["total"]
    lines = [
        f"  in {total} mined pair{'s' if total != 1 else ''} "
        f"({page['as_query']} as query, {page['as_target']} as target); "
        f"a mined hard negative in {page['as_negative']}"
    ]
    if not total:
        return lines
    for row in page["items"]:
        lines.append(
            f"    {row['pair_id']}: {row['query_id']} -> {row['target_id']} "
            f"({', '.join(row['sources'])}; {_scores(row['scores'])})"
        )
    shown = len(page["items"])
    first, last = page["offset"] + 1, page["offset"] + shown
    if shown < total:
        what = f"pairs {first}-{last} of {total}" if shown else f"none of {total} pairs"
        more = "--offset K / --limit N for another page, --all for every pair"
        lines.append(f"    (showing {what}; {more})")
    return lines


def _scores(scores: Mapping[str, Any]) -> str:
    return ", ".join(
        f"{name.removeprefix('score_')}={value:.4f}"
        for name, value in scores.items()
        if value is not None
    )


def _image_field_lines(image: dict[str, Any]) -> list[str]:
    return [
        f"source  {image['source_uri']}",
        f"caption {image['caption']!r}",
        f"size    {image['width']}x{image['height']}, sha256 {image['content_hash'][:16]}...",
    ]


def _version_text(node: dict[str, Any]) -> str:
    """'' for a partition's only record; else whether this one is still its newest."""
    version = node["version"]
    newest, status = version["current_materialization_id"][:12], version["current_status"]
    if not version["current"]:
        if status == _STATUS_COMPLETE:
            return f"superseded by {newest}"
        if status == "retired":
            return "its partition was retired since"
        return f"a newer attempt {newest} is {status}"
    older = version["records"] - 1
    return f"current; {older} older record{'s' if older != 1 else ''}" if older else ""


def _stale_lines(node: dict[str, Any], indent: int) -> list[str]:
    """Say when what this chain read has changed since: its output is stale."""
    stale: list[str] = []

    def walk(n: dict[str, Any]) -> None:
        stale.extend(f"{key}" for key in n.get("stale_inputs", ()))
        for entry in n.get("inputs", ()):
            if entry["lineage"] is not None:
                walk(entry["lineage"])

    walk(node)
    if not stale:
        return []
    unique = sorted(set(stale))
    shown = ", ".join(unique[:MAX_INPUTS_SHOWN]) + (
        f" (+{len(unique) - MAX_INPUTS_SHOWN} more)" if len(unique) > MAX_INPUTS_SHOWN else ""
    )
    return [
        f"{' ' * indent}stale: {shown} changed (re-materialized, failed or retired) after "
        "this chain read them; re-materialize downstream to refresh"
    ]


def _chain_lines(node: dict[str, Any], indent: int) -> list[str]:
    """One line per materialization, then its inputs, depth first."""
    pad = " " * indent
    if not node.get("in_catalog"):
        return [f"{pad}{node['materialization_id']} (not in catalog)"]
    status = node["status"]
    version = _version_text(node)
    lines = [
        f"{pad}{node['asset']}[{node['partition']}] materialization "
        f"{node['materialization_id'][:12]} run {str(node['run_id'])[:8]} "
        f"code {node['code_version']} at {str(node['started_at'])[:19]}"
        + (f" [{status}]" if status != _STATUS_COMPLETE else "")
        + (f" ({version})" if version else "")
        + (f" models {node['model_ids']}" if node["model_ids"] else "")
        + (f" rows {node['row_counts']}" if node["row_counts"] else "")
    ]
    if node.get("error"):
        lines.append(f"{pad}  error: {_short(node['error'])}")
    if node.get("failed_checks"):
        lines.append(f"{pad}  failed blocking checks: {node['failed_checks']}")
    return lines + _input_lines(node, indent + 2)


def _input_lines(node: dict[str, Any], indent: int) -> list[str]:
    """The expanded inputs of a node at `indent`, then how many were left out."""
    lines = []
    for entry in node["inputs"]:
        if entry["lineage"] is not None:
            lines += _chain_lines(entry["lineage"], indent)
    if hidden := node["hidden_inputs"]:
        lines.append(
            f"{' ' * indent}(+{hidden} more input{'s' if hidden != 1 else ''}; --all-inputs)"
        )
    return lines


def _short(text: str) -> str:
    first = str(text).strip().splitlines()[0] if str(text).strip() else ""
    return first if len(first) <= _MAX_ERROR_SHOWN else first[: _MAX_ERROR_SHOWN - 3] + "..."


def _plain(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value, sort_keys=True, default=str)


def to_json(data: dict[str, Any]) -> str:
    """`lineage_data`'s result as indented JSON (datetimes as ISO text)."""
    return json.dumps(data, indent=2, default=str, ensure_ascii=False)
