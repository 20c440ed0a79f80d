"""Reuse of a KNN shard whose inputs did not change: its graph is not searched again.

A KNN shard's rows are decided by (see `knn_reuse_key`):

- the stage's settings-aware code version: the stage version (bumped when KNN code changes its
  output) plus the hash of k, the index kind and its recall parameters (`knn_settings` in
  knn/assets.py), exactly what Dagster shows, run-config overrides included. The search
  backend, GPU use and batch sizes are left out on purpose: exact search gives the same
  neighbours on all of them;
- which graph it is (the KNN asset) and the query shard;
- the whole corpus index: which shards it holds, in the order it holds them, and each one's
  embedding table (the query shard's own table among them, so its vectors are covered too).
  A shard of the corpus source without a usable table ("missing", searched only under
  `allow_partial_corpus`) counts as missing, so materializing it later changes every key;
- for an approximate index, what else decides its build (`search.index_build_identity`:
  the resolved IVF list count, the training sample's seed and size, faiss' version, GPU or CPU
  training), so a kept graph never comes from another index build than its key names. The
  IVF build is deterministic for these (the sample is drawn by row position with a fixed
  seed, faiss seeds its k-means). faiss adds HNSW vertices on several threads, so two HNSW
  builds from the same inputs may differ slightly: a kept HNSW graph is one such build, as a
  new search would be.

An embedding table stands in the key by a digest of its Parquet footer (`TableFooter`), read
with two small reads and no vector. The footer holds the embedding table's own reuse key (its
inputs: each image's sha256 or each caption, the encoder and its settings), the rows it skipped
(a shard embedded again after a transient skip has the same key but more rows), its row count,
and each column chunk's compressed size and min/max. The last two follow the values, so the
same inputs embedded into other vectors (another batch size, a non-deterministic kernel) give
another digest in practice; only a rewrite keeping every chunk's size and extremes would go
unseen, and its vectors could then differ by rounding only, the embedding key being the same.
pyarrow writes no time into a footer, so a table rewritten with the same vectors keeps its
digest. A table without an embedding reuse key (written before
reuse existed, or outside the asset) cannot vouch for its content, so no graph over it is
reused. The catalog's materialization ids are not used: a reused embedding table gets a new one
on every run, although its content did not change.

The key lives in the KNN table's own Parquet footer, written by the same atomic write as the
rows. A table is reused only when it reads back whole (every page that carries a checksum
matching it: see lib/storage.py), its key matches and every KNN check passes on it again;
anything else, a damaged table included, searches the shard as before, and the reason logged
names the file.
"""

from __future__ import annotations

import hashlib
import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import polars as pl
import pyarrow.parquet as pq

from megapairs_assets.embeddings.reuse import REUSE_KEY_FIELD as EMBEDDING_REUSE_KEY_FIELD
from megapairs_assets.knn.search import KNN_SCHEMA, check_knn
from megapairs_assets.lib.errors import first_line
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.storage import DataPath, TableReadError, read_parquet

# Bumped when what goes into the key changes, so older keys stop matching.
KEY_SCHEME = "knn-reuse-v1"
REUSE_KEY_FIELD = "megapairs_reuse_key"

_PARQUET_MAGIC = b"PAR1"
_TAIL_BYTES = 8  # footer length (4 bytes, little endian) + magic


class NotReusable(Exception):
    """The shard's existing graph cannot stand for this run; the message says why."""


class NoTable(NotReusable):
    """The shard has no graph yet (nothing worth logging)."""


class DamagedTable(NotReusable):
    """The shard's graph cannot be read back (a page fails its checksum or does not decode,
    the file is cut short): worth a warning; the message names the file."""


@dataclass(frozen=True)
class TableFooter:
    """What a Parquet table's footer says about it, read without reading its data.

    digest: sha256 of the footer's bytes. rows: its row count. metadata: its key-value
    metadata (the reuse keys live there).
    """

    digest: str
    rows: int
    metadata: Mapping[str, str]

    @property
    def embedding_reuse_key(self) -> str | None:
        """The embedding table's own reuse key (embeddings/reuse.py), when it has one."""
        return self.metadata.get(EMBEDDING_REUSE_KEY_FIELD)


def read_footer(path: DataPath) -> TableFooter:
    """The footer of the Parquet file at `path`: two small reads, however large the file.

    Raises FileNotFoundError when there is no file, ValueError when its end is not a Parquet
    footer.
    """
    with path.open("rb") as handle:
        size = handle.seek(0, io.SEEK_END)
        if size < len(_PARQUET_MAGIC) + _TAIL_BYTES:
            raise ValueError(f"{path}: {size} bytes, too short for a Parquet file")
        handle.seek(size - _TAIL_BYTES)
        tail = handle.read(_TAIL_BYTES)
        length = int.from_bytes(tail[:4], "little")
        if tail[4:] != _PARQUET_MAGIC or length > size - len(_PARQUET_MAGIC) - _TAIL_BYTES:
            raise ValueError(f"{path}: no Parquet footer at its end (damaged or cut short?)")
        handle.seek(size - _TAIL_BYTES - length)
        footer = handle.read(length)
    # pyarrow parses a footer only as the end of a file; the data pages are not needed for it.
    parsed = pq.read_metadata(io.BytesIO(_PARQUET_MAGIC + footer + tail))
    metadata = {
        key.decode(errors="replace"): value.decode(errors="replace")
        for key, value in (parsed.metadata or {}).items()
        if key != b"ARROW:schema"
    }
    return TableFooter(hashlib.sha256(footer).hexdigest(), parsed.num_rows, metadata)


def corpus_content_key(
    corpus_shards: Sequence[str], footers: Mapping[str, TableFooter]
) -> str | None:
    """A digest of the corpus an index holds: each corpus shard in index order with its
    embedding table's footer digest, or as missing when it has no table in `footers`.

    None when a table of the corpus has no embedding reuse key (it cannot vouch for its
    content; see the module docstring).
    """
    digest = hashlib.sha256(f"{KEY_SCHEME}/corpus\n".encode())
    for shard in corpus_shards:
        footer = footers.get(shard)
        if footer is not None and footer.embedding_reuse_key is None:
            return None
        digest.update(json.dumps([shard, footer.digest if footer else None]).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def knn_reuse_key(
    code_version: str,
    knn_asset: str,
    shard: str,
    corpus_key: str,
    index_build: Mapping[str, Any],
) -> str:
    """The reuse key of one KNN shard (see the module docstring)."""
    header = {
        "scheme": KEY_SCHEME,
        "code_version": code_version,
        "table": knn_asset,
        "shard": shard,
        "corpus": corpus_key,
        "index_build": dict(index_build),
    }
    return hashlib.sha256(json.dumps(header, sort_keys=True).encode()).hexdigest()


def stored_metadata(reuse_key: str | None) -> dict[str, str]:
    """The footer entries that let a later run reuse a graph."""
    return {} if reuse_key is None else {REUSE_KEY_FIELD: reuse_key}


def stored_reuse_key(path: DataPath) -> str:
    """The reuse key in the footer of the graph at `path` (the footer only is read).

    Raises `NoTable` when there is no graph, `NotReusable` saying why when it has no key or
    its footer is unreadable.
    """
    try:
        footer = read_footer(path)
    except FileNotFoundError:
        raise NoTable("no table yet") from None
    except Exception as error:  # a damaged graph is searched again, never a failed step
        raise unreadable(path, error) from error
    key = footer.metadata.get(REUSE_KEY_FIELD)
    if key is None:
        raise NotReusable("the table has no reuse key (written before reuse existed)")
    return key


def unreadable(path: DataPath, error: BaseException) -> DamagedTable:
    """Why a table that cannot be read back is not reused: the file and what is wrong."""
    cause = error.__cause__ if isinstance(error, TableReadError) and error.__cause__ else error
    return DamagedTable(f"the table {path} is damaged or unreadable ({first_line(cause)})")


def reusable_graph(
    path: DataPath, reuse_key: str, k: int
) -> tuple[pl.DataFrame, list[CheckOutcome]]:
    """The graph at `path` and its KNN checks, if it was written for `reuse_key`, reads back
    whole with the KNN schema and passes every check; raises `NotReusable` saying why not."""
    if stored_reuse_key(path) != reuse_key:
        raise NotReusable("its inputs or settings changed")
    try:
        # Every page is checked against its checksum: a flipped bit is a damaged table here,
        # never other neighbours that pass the checks.
        neighbors = read_parquet(path)
    except FileNotFoundError:
        raise NoTable("the table disappeared") from None
    except Exception as error:  # a damaged graph is searched again, never a failed step
        raise unreadable(path, error) from error
    if neighbors.schema != KNN_SCHEMA:
        raise NotReusable(f"its columns are {dict(neighbors.schema)}, not the KNN schema")
    outcomes = check_knn(neighbors, k)
    failing = [o.name for o in outcomes if not o.passed]
    if failing:
        raise NotReusable(f"the table fails {', '.join(failing)}")
    return neighbors, outcomes
