"""Where every artifact lives under the data root, and how it is written safely.

Layout under `$MEGAPAIRS_HOME` (default `./megapairs_home`):

    data/image_corpus/<shard>/images.parquet       one row per valid image
    data/image_corpus/<shard>/quarantine.parquet   one row per rejected input, with a reason
    data/<embedding asset>/<shard>.parquet          image_id + float16 unit vector
    data/<knn asset>/<shard>.parquet                query_id, rank, neighbor_id, score
    data/mined_image_pairs/<shard>.parquet          pairs with sources, scores, hard negatives
    models/                                         demo models built on first use
    catalog.duckdb                                  lineage catalog (see megapairs_assets.lineage)
    dagster/                                        the Dagster instance used by `megapairs demo`

Every table is written to a temporary file in the same folder and moved into place with
`os.replace`, which is atomic on POSIX: a reader sees the old table or the new one, never half
of one, and a crash leaves at most a stray `.tmp-*` file that the next write ignores.
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

DEFAULT_HOME_DIRNAME = "megapairs_home"


def default_home() -> Path:
    """The data root: `$MEGAPAIRS_HOME`, else `./megapairs_home` under the working directory."""
    return Path(os.environ.get("MEGAPAIRS_HOME") or Path.cwd() / DEFAULT_HOME_DIRNAME).resolve()


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)` then move the result onto `path` in one atomic step."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write a polars frame as Parquet, atomically."""
    write_atomic(path, lambda tmp: frame.write_parquet(tmp, compression="zstd"))


@dataclass(frozen=True)
class DataLayout:
    """Paths of every artifact under one data root (the only place that knows them)."""

    home: Path

    @property
    def data_dir(self) -> Path:
        return self.home / "data"

    @property
    def models_dir(self) -> Path:
        return self.home / "models"

    @property
    def catalog_path(self) -> Path:
        return self.home / "catalog.duckdb"

    @property
    def dagster_home(self) -> Path:
        return self.home / "dagster"

    def corpus_images(self, shard: str) -> Path:
        return self.data_dir / "image_corpus" / shard / "images.parquet"

    def corpus_quarantine(self, shard: str) -> Path:
        return self.data_dir / "image_corpus" / shard / "quarantine.parquet"

    def shard_table(self, asset_name: str, shard: str) -> Path:
        """Per-shard table of a downstream asset (embeddings, KNN graphs, pairs)."""
        return self.data_dir / asset_name / f"{shard}.parquet"
