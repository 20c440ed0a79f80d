"""`megapairs lineage`: the chain behind an id, the catalog's schema, a read-only query, a copy.

- `megapairs lineage <id> [--json]`: a triplet, pair or materialization id (or its start), an
  image id or export path, a source uri (or its end), a quarantined input or a partition
  (`asset[partition]`).
- `megapairs lineage --schema`: every table and view of the catalog with what each column holds.
- `megapairs lineage --sql "SELECT ..." [--json]`: one read-only query, holding the catalog for
  that query only (a DuckDB session left open on the file would stop the pipeline's writers);
  anything but one SELECT/EXPLAIN/DESCRIBE/SHOW, or a query that reaches past the catalog
  (files, other databases), is refused with exit code 2.
- `megapairs lineage --snapshot PATH`: a consistent copy to keep open as long as you like.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

# `megapairs_assets.lineage.report`'s DEFAULT_PAIR_LIMIT and MAX_INPUTS_SHOWN, spelled here so
# that building the `megapairs` parser (every command, `--help` included) imports neither
# DuckDB nor polars; tests/test_cli_startup.py keeps them equal.
DEFAULT_PAIR_LIMIT = 10
MAX_INPUTS_SHOWN = 4

# The modules that declare the catalog's row tables (`register_row_table`), imported instead
# of `megapairs_assets.definitions`: a lookup needs the tables' declarations, not Dagster's
# asset graph and every stage's model code (~1 s). tests/test_cli_startup.py checks that
# these declare every row table the definitions do.
ROW_TABLE_MODULES = (
    "megapairs_assets.corpus.step",
    "megapairs_assets.mining.pair_table",
    "megapairs_assets.generation.triplets",
    "megapairs_assets.evaluation.catalog_rows",
)

ID_KINDS = (
    "a triplet, pair or materialization id (or its first 6+ characters), an image id or its "
    "export path (images/<shard>/<key>.jpg), a source uri (or its end) or a partition "
    "(asset[partition])"
)


def existing_catalog(home: Any) -> Any:
    """The home's lineage catalog, or None (saying how to make one) when it does not exist."""
    from resources.environment import lineage_catalog

    catalog = lineage_catalog(home)
    if not catalog.is_ducklake and not catalog.path.exists():
        print(
            f"no lineage catalog at {catalog.location}: run `megapairs demo` first, or set "
            "MEGAPAIRS_HOME to the home the pipeline wrote (default ./megapairs_home)",
            file=sys.stderr,
        )
        return None
    return catalog


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print the lineage report of `args.id` (or the schema, a query's rows, a snapshot)."""
    import importlib

    from megapairs_assets.lib.storage import default_home
    from resources.environment import profile_from_env, storage_resource

    for module in ROW_TABLE_MODULES:  # stages declare their catalog tables on import
        importlib.import_module(module)
    home = default_home()
    catalog = existing_catalog(home)
    if catalog is None:
        return 1
    if args.schema:
        return _print_schema(catalog, args.json)
    if args.sql is not None:
        return _print_query(catalog, args.sql, args.json)
    if args.snapshot is not None:
        path = catalog.snapshot(args.snapshot)
        print(
            f"catalog copied to {path}; open it with duckdb.connect({str(path)!r}, read_only=True)"
        )
        return 0
    layout = storage_resource(home, profile_from_env()).layout()
    return _print_report(catalog, args, layout.storage_options)


def _print_report(catalog: Any, args: argparse.Namespace, storage_options: Any) -> int:
    from megapairs_assets.lineage.report import lineage_data, not_found_hint, render, to_json

    item_id = args.id.strip()
    data = lineage_data(
        catalog,
        item_id,
        pair_limit=None if args.all else args.limit,
        pair_offset=args.offset,
        all_inputs=args.all_inputs,
        storage_options=storage_options,
    )
    if data is None:
        hint = not_found_hint(catalog, item_id)
        print(
            f"{item_id!r} is not {ID_KINDS} in {catalog.location}" + (f"\n{hint}" if hint else ""),
            file=sys.stderr,
        )
        return 1
    print(to_json(data) if args.json else render(data))
    return 0


def _print_schema(catalog: Any, as_json: bool) -> int:
    columns = catalog.read_only_query(
        "SELECT c.table_name, t.kind, t.comment AS table_comment, c.column_name, c.data_type, "
        "c.comment FROM duckdb_columns() AS c JOIN ("
        "  SELECT table_name, 'table' AS kind, comment FROM duckdb_tables() "
        "  WHERE database_name = current_database() "
        "  UNION ALL SELECT view_name, 'view', comment FROM duckdb_views() "
        "  WHERE database_name = current_database() AND NOT internal"
        ") AS t USING (table_name) WHERE c.database_name = current_database() "
        "ORDER BY t.kind, c.table_name, c.column_index"
    )
    relations: dict[str, dict[str, Any]] = {}
    for row in columns.iter_rows(named=True):
        relation = relations.setdefault(
            row["table_name"],
            {"kind": row["kind"], "comment": row["table_comment"], "columns": []},
        )
        relation["columns"].append(
            {"name": row["column_name"], "type": row["data_type"], "comment": row["comment"]}
        )
    if as_json:
        print(json.dumps(relations, indent=2))
        return 0
    print(f"lineage catalog {catalog.location}")
    for name, relation in relations.items():
        print(
            f"\n{relation['kind']} {name}"
            + (f": {relation['comment']}" if relation["comment"] else "")
        )
        width = max(len(c["name"]) for c in relation["columns"])
        for column in relation["columns"]:
            note = f"  {column['comment']}" if column["comment"] else ""
            print(f"  {column['name']:<{width}}  {column['type']}{note}")
    return 0


def _print_query(catalog: Any, sql: str, as_json: bool) -> int:
    import duckdb
    import polars as pl

    from megapairs_assets.lineage.catalog import ReadOnlyQueryError

    try:
        frame = catalog.read_only_query(sql)
    except ReadOnlyQueryError as error:
        # Refused before it ran: more than one statement, or one that is not a read.
        print(f"megapairs lineage --sql: refused: {error}", file=sys.stderr)
        return 2
    except duckdb.PermissionException as error:
        # It tried to reach past the catalog (a file, another database, an extension).
        print(
            "megapairs lineage --sql: refused: a query may read the lineage catalog only, "
            f"not files, other databases or extensions ({_first_line(error)})",
            file=sys.stderr,
        )
        return 2
    except duckdb.Error as error:
        # The user's SQL: say what DuckDB said, no traceback.
        print(f"megapairs lineage --sql: {error}", file=sys.stderr)
        return 1
    if as_json:
        print(json.dumps(frame.to_dicts(), indent=2, default=str, ensure_ascii=False))
        return 0
    with pl.Config(
        tbl_rows=-1,
        tbl_cols=-1,
        fmt_str_lengths=200,
        tbl_width_chars=10_000,
        tbl_hide_dataframe_shape=True,
        tbl_hide_column_data_types=True,
    ):
        print(frame)
    return 0


def _first_line(error: Exception) -> str:
    return str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `lineage` subcommand to the `megapairs` parser."""
    lineage = subparsers.add_parser(
        "lineage",
        help="print the chain behind a triplet, pair, image or materialization; query the catalog",
        description=(
            "Print what produced a triplet, a mined pair or an image: the materializations "
            "behind it (each marked current or superseded), an image's pairs and the stages "
            f"that skipped it. The id may be {ID_KINDS}, e.g. t-..., 00000/000000000, "
            "00000.tar#000000000.jpg, mined_image_pairs[00000]. --schema, --sql and --snapshot "
            "read the catalog itself."
        ),
    )
    what = lineage.add_mutually_exclusive_group(required=True)
    what.add_argument("id", nargs="?", help=f"what to trace: {ID_KINDS}")
    what.add_argument(
        "--schema", action="store_true", help="list the catalog's tables and views, documented"
    )
    what.add_argument(
        "--sql",
        metavar="QUERY",
        help="run one read-only SQL query (SELECT, EXPLAIN, DESCRIBE or SHOW) on the catalog, "
        "which reads the catalog only, no files (see --schema for its tables and views)",
    )
    what.add_argument(
        "--snapshot",
        metavar="PATH",
        help="write a consistent copy of the catalog to PATH, for sessions that keep it open",
    )
    lineage.add_argument(
        "--json", action="store_true", help="print JSON (the report, --schema or --sql rows)"
    )
    pages = lineage.add_mutually_exclusive_group()
    pages.add_argument(
        "--limit",
        type=_count,
        default=DEFAULT_PAIR_LIMIT,
        metavar="N",
        help=f"list at most N of an image's pairs (default {DEFAULT_PAIR_LIMIT})",
    )
    pages.add_argument("--all", action="store_true", help="list every pair of an image")
    lineage.add_argument(
        "--offset", type=_count, default=0, metavar="K", help="skip an image's first K pairs"
    )
    lineage.add_argument(
        "--all-inputs",
        action="store_true",
        help=f"follow every input of each materialization (default: the first {MAX_INPUTS_SHOWN})",
    )
    lineage.set_defaults(func=cmd_lineage)
    return lineage
