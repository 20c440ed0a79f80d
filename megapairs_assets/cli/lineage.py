"""`megapairs lineage <id>`: print the chain behind a triplet, a pair, an image or a source uri."""

from __future__ import annotations

import argparse
import sys

from megapairs_assets.lineage.report import DEFAULT_PAIR_LIMIT, MAX_INPUTS_SHOWN


def cmd_lineage(args: argparse.Namespace) -> int:
    """Print the lineage report of `args.id` from the data root's catalog."""
    import megapairs_assets.definitions  # noqa: F401  (stages declare their catalog tables)
    from megapairs_assets.generation.triplets import describe_triplet
    from megapairs_assets.lib.storage import default_home
    from megapairs_assets.lineage.report import lineage_report
    from resources.profiles import build_resources, lineage_catalog, profile_from_env

    home = default_home()
    catalog = lineage_catalog(home)
    layout = build_resources(profile_from_env(), home)["storage"].layout()
    catalog_path = catalog.location
    if not catalog.is_ducklake and not catalog.path.exists():
        print(f"no lineage catalog at {catalog_path}: run `megapairs demo` first", file=sys.stderr)
        return 1
    report = describe_triplet(catalog, args.id, layout) or lineage_report(
        catalog,
        args.id,
        pair_limit=None if args.all else args.limit,
        pair_offset=args.offset,
        all_inputs=args.all_inputs,
    )
    if report is None:
        print(
            f"{args.id!r} is not a triplet id, a pair id, an image id or a source uri in "
            f"{catalog_path}",
            file=sys.stderr,
        )
        return 1
    print(report)
    return 0


def _count(text: str) -> int:
    value = int(text)
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `lineage` subcommand to the `megapairs` parser."""
    lineage = subparsers.add_parser(
        "lineage",
        help="print the chain behind a triplet id, a pair id, an image id or a source uri",
        description=(
            "Print what produced a triplet, a mined pair or an image: the materializations "
            "behind it, an image's pairs and the stages that skipped it. The id may be a "
            "triplet id (t-...), a pair id, an image id (00000/000000000), a source uri, or "
            "the end of one (00000.tar#000000000.jpg)."
        ),
    )
    lineage.add_argument("id", help="triplet id, pair id, image id, source uri or its end")
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
