"""The `megapairs` command line."""

from megapairs_assets.cli.main import main

__all__ = ["main"]
