"""Checks that a benchmark's image files are all present before anything is embedded."""

from __future__ import annotations

import os
from pathlib import Path

from megapairs_assets.evaluation.benchmark import ImageRef
from megapairs_assets.evaluation.loaders.jsonfile import BenchmarkFilesMissing


def require_image_dir(path: Path, what: str) -> None:
    """Raise BenchmarkFilesMissing unless `path` is a directory."""
    if not path.is_dir():
        raise BenchmarkFilesMissing(path, what)


def require_images(refs: list[ImageRef], what: str) -> None:
    """Raise BenchmarkFilesMissing naming the first absent file and how many are absent.

    A gallery with holes would give numbers that are wrong by a detail, so a benchmark with
    any image missing is skipped rather than scored.
    """
    missing = [ref.uri for ref in refs if not os.path.isfile(ref.uri)]
    if missing:
        raise BenchmarkFilesMissing(
            Path(missing[0]), f"{len(missing)} of {len(refs)} {what} (first missing shown)"
        )
