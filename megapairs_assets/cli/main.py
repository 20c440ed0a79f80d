"""The `megapairs` command: each subcommand lives in its own module under megapairs_assets.cli
and adds itself to the parser with `register(subparsers)`."""

from __future__ import annotations

import argparse
import importlib
import os
import sys

from megapairs_assets.lib.errors import ConfigurationError

# Set before torch loads: OpenMP threads that spin while idle starve the other stages on a
# small shared machine (SmolLM2 generation measured 16 s with this, 186 s without, on 2 cores).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

# Subcommand modules, in the order `megapairs --help` lists them.
SUBCOMMANDS = ("demo", "check", "status", "lineage", "search", "ui", "config", "sync", "unblock")

# `resources.environment.PROFILE_NAMES`, spelled here so `megapairs --help` needs no Dagster
# import (a test keeps the two equal).
PROFILE_CHOICES = ("demo", "paper")


def add_profile_option(parser: argparse.ArgumentParser, dest: str = "profile") -> None:
    """`--profile NAME`: the profile for this command, exactly as MEGAPAIRS_PROFILE sets it
    (which `main` does, so `resources.environment.profile_from_env` stays the one reader).

    Both `megapairs --profile X SUB` and `megapairs SUB --profile X` take it; the two spellings
    store under different `dest`s, since a subcommand's default (None) would otherwise
    overwrite the value given before it."""
    parser.add_argument(
        "--profile",
        dest=dest,
        choices=PROFILE_CHOICES,
        help="which models to run: demo (offline, CPU, small models) or paper (the paper's "
        "settings, GPUs); default: $MEGAPAIRS_PROFILE, else demo",
    )


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="megapairs",
        description="MegaPairs-style retrieval data synthesis as Dagster assets.",
        epilog="Data, models, lineage catalog and Dagster instance live under $MEGAPAIRS_HOME "
        "(default ./megapairs_home); $MEGAPAIRS_PROFILE picks the models (demo or paper). "
        "Every setting: the Environment table in README.md. `megapairs SUBCOMMAND --help` "
        "for each subcommand's options.",
    )
    add_profile_option(parser, dest="profile_before_command")
    sub = parser.add_subparsers(dest="command", required=True)
    for name in SUBCOMMANDS:
        importlib.import_module(f"megapairs_assets.cli.{name}").register(sub)
    importlib.import_module("megapairs_assets.evaluation.cli").register(sub)
    for subparser in sub.choices.values():  # every command takes the profile the same way
        add_profile_option(subparser)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    profile = getattr(args, "profile", None)
    before = getattr(args, "profile_before_command", None)
    if before and profile and before != profile:
        parser.error(f"--profile given twice: {before} before {args.command}, {profile} after it")
    profile = profile or before
    previous = os.environ.get("MEGAPAIRS_PROFILE")
    if profile:
        # For this command and every process it starts; restored for in-process callers.
        os.environ["MEGAPAIRS_PROFILE"] = profile
    try:
        from resources.environment import check_environment, unknown_variables

        for name, known in unknown_variables():  # a typo would silently leave a default
            hint = f"; did you mean {known}?" if known else " (README lists the settings)"
            print(f"megapairs: warning: {name} is not a megapairs setting{hint}", file=sys.stderr)
        check_environment()  # every subcommand refuses a bad MEGAPAIRS_* setting the same way
        return int(args.func(args) or 0)
    except ConfigurationError as error:
        # A setting the user got wrong: the message says what to change; no traceback.
        print(f"megapairs {args.command}: configuration error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # Ctrl-C outside a run's own handling (during imports, a preflight): no traceback.
        print(f"megapairs {args.command}: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader of our output went away (`| head`): not a failure worth a traceback.
        # Point stdout at /dev/null so the interpreter's final flush does not raise again.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    finally:
        if profile and previous is None:
            os.environ.pop("MEGAPAIRS_PROFILE", None)
        elif profile:
            os.environ["MEGAPAIRS_PROFILE"] = previous


if __name__ == "__main__":
    sys.exit(main())
