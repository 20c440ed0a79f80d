"""Where every artifact lives under the data root, and how it is written safely.

Layout under `$MEGAPAIRS_HOME` (default `./megapairs_home`):

    data/image_corpus/<shard>/images.parquet       one row per valid image
    data/image_corpus/<shard>/quarantine.parquet   one row per rejected input, with a reason
    data/image_corpus/source_report.parquet        entries of the source that no shard reads
    data/<embedding asset>/<shard>.parquet          image_id + float16 unit vector
    data/<knn asset>/<shard>.parquet                query_id, rank, neighbor_id, score
    data/mined_image_pairs/<shard>.parquet          pairs with sources, scores, hard negatives
    models/                                         demo models built on first use
    catalog.duckdb                                  lineage catalog (see megapairs_assets.lineage)
    dagster/                                        the Dagster instance used by `megapairs demo`

Partition keys and asset names become path components, so `DataLayout` accepts only safe ones
(`is_safe_partition_key`) and refuses any path that would resolve outside its asset's folder.

Every table is written to a temporary file in the same folder and moved into place with
`os.replace`, which is atomic on POSIX: a reader sees the old table or the new one, never half
of one, and a crash leaves at most a stray `.tmp-*` file that the next write ignores. The file
gets the mode a plain `open()` would give it (0666 minus the umask, so 0644 by default), so a
trainer or web server running as another user can read what the pipeline wrote.
"""

from __future__ import annotations

import os
import re
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import polars as pl

DEFAULT_HOME_DIRNAME = "megapairs_home"
MAX_PARTITION_KEY_CHARS = 128
# One path component made of letters, digits, '.', '_' and '-', starting with a letter or digit:
# never empty, '.', '..', hidden, absolute, or holding a separator.
_SAFE_PARTITION_KEY = re.compile(rf"[A-Za-z0-9][A-Za-z0-9._-]{{0,{MAX_PARTITION_KEY_CHARS - 1}}}")
SAFE_PARTITION_KEY_RULE = (
    f"1 to {MAX_PARTITION_KEY_CHARS} letters, digits, '.', '_' or '-', "
    "starting with a letter or digit"
)
# A plain open() creates files 0666 minus the umask; tables get the same.
_OPEN_DEFAULT_MODE = 0o666


def default_home() -> Path:
    """The data root: `$MEGAPAIRS_HOME`, else `./megapairs_home` under the working directory."""
    return Path(os.environ.get("MEGAPAIRS_HOME") or Path.cwd() / DEFAULT_HOME_DIRNAME).resolve()


def is_safe_partition_key(key: object) -> bool:
    """Whether `key` may name a partition (and so a file or folder): see SAFE_PARTITION_KEY_RULE."""
    return isinstance(key, str) and _SAFE_PARTITION_KEY.fullmatch(key) is not None


def check_partition_key(key: object, what: str = "partition key") -> str:
    """Return `key` when it is safe as a path component, else raise a ValueError naming it."""
    if not is_safe_partition_key(key):
        raise ValueError(
            f"{what} {key!r} is not safe as a file name: use {SAFE_PARTITION_KEY_RULE}"
        )
    return key  # type: ignore[return-value]


def new_file_mode() -> int:
    """The permission bits a plain `open(path, "w")` would give a new file right now."""
    return _OPEN_DEFAULT_MODE & ~_current_umask()


def _current_umask() -> int:
    # Linux reports the umask without changing it; os.umask can only read it by setting it,
    # which would race with other threads creating files.
    try:
        with open("/proc/self/status", encoding="ascii") as status:
            for line in status:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def write_atomic(path: Path, write: Callable[[Path], None]) -> None:
    """Run `write(tmp_path)` then move the result onto `path` in one atomic step.

    The one writer for every table: the file appears whole or not at all, with the permission
    bits of a plain `open()` (writers that create private temporary files, such as
    `tempfile.mkstemp`, would otherwise leave it readable by its owner only).
    """
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{uuid.uuid4().hex[:8]}")
    try:
        write(tmp)
        os.chmod(tmp, new_file_mode())
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()


def write_parquet_atomic(frame: pl.DataFrame, path: Path) -> None:
    """Write a polars frame as Parquet, atomically."""
    write_atomic(path, lambda tmp: frame.write_parquet(tmp, compression="zstd"))


@dataclass(frozen=True)
class DataLayout:
    """Paths of every artifact under one data root (the only place that knows them).

    Every per-partition path is checked: the key must be safe (`check_partition_key`) and the
    path must resolve inside its asset's folder, else a ValueError is raised and nothing is
    written.
    """

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

    def asset_dir(self, asset_name: str) -> Path:
        """The folder that holds every file of one asset."""
        return _inside(self.data_dir, check_partition_key(asset_name, "asset name"))

    def corpus_images(self, shard: str) -> Path:
        return self._corpus_file(shard, "images.parquet")

    def corpus_quarantine(self, shard: str) -> Path:
        return self._corpus_file(shard, "quarantine.parquet")

    def corpus_source_report(self) -> Path:
        """Entries of the corpus source that no shard reads (unsafe names, unsupported files).

        A file, not a folder, so it can never collide with a shard's folder.
        """
        return self.asset_dir("image_corpus") / "source_report.parquet"

    def shard_table(self, asset_name: str, shard: str) -> Path:
        """Per-shard table of a downstream asset (embeddings, KNN graphs, pairs)."""
        return _inside(self.asset_dir(asset_name), f"{check_partition_key(shard, 'shard')}.parquet")

    def _corpus_file(self, shard: str, file_name: str) -> Path:
        shard_dir = _inside(self.asset_dir("image_corpus"), check_partition_key(shard, "shard"))
        return shard_dir / file_name


def _inside(folder: Path, name: str) -> Path:
    """`folder / name`, refused when it resolves outside `folder` (a symlink pointing away)."""
    path = folder / name
    resolved, root = path.resolve(), folder.resolve()
    if resolved.parent != root:
        raise ValueError(f"{path} resolves to {resolved}, outside {root}; refusing to use it")
    return path
