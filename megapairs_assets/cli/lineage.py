"""`megapairs lineage <id>`: the chain behind a pair, image, triplet or source uri."""

from __future__ import annotations

import argparse
import sys


def register(subparsers: argparse._SubParsersAction) -> None:
    lineage = subparsers.add_parser(
        "lineage", help="print the chain behind a pair id, image id or source uri"
    )
    lineage.add_argument("id")
    lineage.set_defaults(func=run_lineage)


def run_lineage(args: argparse.Namespace) -> int:
    import megapairs_assets.definitions  # noqa: F401  (stages declare their catalog tables)
    from megapairs_assets.lib.storage import DataLayout, default_home
    from megapairs_assets.lineage.catalog import LineageCatalog
    from megapairs_assets.lineage.report import lineage_report

    catalog_path = DataLayout(default_home()).catalog_path
    if not catalog_path.exists():
        print(f"no lineage catalog at {catalog_path}: run `megapairs demo` first", file=sys.stderr)
        return 1
    report = lineage_report(LineageCatalog(catalog_path), args.id)
    if report is None:
        print(
            f"{args.id!r} is not a pair id, image id or source uri in {catalog_path}",
            file=sys.stderr,
        )
        return 1
    print(report)
    return 0
