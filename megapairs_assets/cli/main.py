"""The `megapairs` command: each subcommand lives in its own module under megapairs_assets.cli
and adds itself to the parser with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommand modules, in the order `megapairs --help` lists them.
SUBCOMMANDS = ("demo", "check", "lineage", "ui")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megapairs",
        description="MegaPairs-style retrieval data synthesis as Dagster assets.",
    )
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"megapairs_assets.cli.{name}").register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args.func(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
