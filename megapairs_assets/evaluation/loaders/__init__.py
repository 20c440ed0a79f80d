"""Loaders for the public CIR benchmarks, each reading the official files from a root folder.

Each returns `BenchmarkSplit`s (megapairs_assets.evaluation.benchmark). Absent files raise
`BenchmarkFilesMissing` (the benchmark is then reported as skipped, naming the path looked at);
a file in the wrong format raises `BenchmarkFormatError` naming the file and line.
"""

from megapairs_assets.evaluation.loaders.circo import load_circo
from megapairs_assets.evaluation.loaders.cirr import load_cirr
from megapairs_assets.evaluation.loaders.fashioniq import FASHIONIQ_CATEGORIES, load_fashioniq
from megapairs_assets.evaluation.loaders.genecis import GENECIS_TASKS, load_genecis
from megapairs_assets.evaluation.loaders.jsonfile import (
    BenchmarkFilesMissing,
    BenchmarkFormatError,
)

__all__ = [
    "FASHIONIQ_CATEGORIES",
    "GENECIS_TASKS",
    "BenchmarkFilesMissing",
    "BenchmarkFormatError",
    "load_circo",
    "load_cirr",
    "load_fashioniq",
    "load_genecis",
]
