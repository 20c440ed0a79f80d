"""What the training images are, independent of where they sit: the content identity of each
image path the training rows name, for the run's resume fingerprint.

A run resumes only under the same fingerprint; keyed on paths, a corpus remounted or moved
with identical bytes would restart a run of hours from scratch, while keyed on contents a
changed image still starts over. Identities come from the corpus's own content hashes where
the caller has them (the lineage catalog's `content_hash`, sha256 of the file bytes, free);
the other images are read and hashed here, the same sha256, with a cache beside the run
(`image_hashes.parquet`, keyed by path, size and modification time) so a resumed or re-run
config only stats its files. An image that cannot be read has an identity of its own (its
queries are left out of the loss), so restoring it later is a change of the data.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import polars as pl

from megapairs_assets.corpus.images import ImageRejected, content_hash, read_uri_bytes
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.storage import read_parquet, write_parquet_atomic

HASH_CACHE_FILE = "image_hashes.parquet"
UNREADABLE = "unreadable"
_CACHE_SCHEMA = {
    "uri": pl.String,
    "size": pl.Int64,
    "mtime_ns": pl.Int64,
    "content_hash": pl.String,
}
_HASH_THREADS = 8  # sha256 and file reads release the GIL; a network mount wants several


def image_uris_of(rows: pl.DataFrame) -> list[str]:
    """The distinct image paths of training rows (q_img, t_img, hns), in first-seen order."""
    column = pl.concat([rows["q_img"], rows["t_img"], rows["hns"].explode()]).drop_nulls()
    return column.unique(maintain_order=True).to_list()


def image_contents(
    uris: list[str],
    known: Mapping[str, str],
    cache_path: Path,
    say: Callable[[str], None],
) -> dict[str, str]:
    """uri -> content identity (sha256 of the bytes) for every uri: `known`'s, the cache's
    (same size and mtime), else read and hashed now; unreadable ones get `UNREADABLE`."""
    found = {uri: known[uri] for uri in uris if uri in known}
    rest = [uri for uri in uris if uri not in found]
    if not rest:
        return found
    stats = {uri: _stat(uri) for uri in rest}
    cached = _read_cache(cache_path)
    for uri, stat in stats.items():
        hit = cached.get(uri)
        if stat is not None and hit is not None and hit[0] == stat:
            found[uri] = hit[1]
    todo = [uri for uri in rest if uri not in found]
    if todo:
        progress = Progress(total=len(todo), desc="hashing training images", unit="images", log=say)
        with ThreadPoolExecutor(_HASH_THREADS) as pool:
            for uri, digest in zip(todo, pool.map(_hash_uri, todo), strict=True):
                found[uri] = digest
                progress.update(1, failed=int(digest == UNREADABLE))
        progress.close()
        fresh = {
            uri: (stats[uri], found[uri])
            for uri in rest
            if stats[uri] is not None and found[uri] != UNREADABLE
        }
        _write_cache(cache_path, {**cached, **fresh})
    return found


def _stat(uri: str) -> tuple[int, int] | None:
    """(size, mtime_ns) of the local file behind a uri (the tar of a tar member), else None."""
    path = uri.removeprefix("file://").split("#", 1)[0]
    try:
        stat = os.stat(path)
    except (OSError, ValueError):
        return None
    return stat.st_size, stat.st_mtime_ns


def _hash_uri(uri: str) -> str:
    try:
        return content_hash(read_uri_bytes(uri))
    except (ImageRejected, OSError):
        return UNREADABLE


def _read_cache(path: Path) -> dict[str, tuple[tuple[int, int], str]]:
    try:
        frame = read_parquet(path)  # a damaged file is an OSError here, never a panic
    except (OSError, pl.exceptions.PolarsError):
        return {}  # none yet, or unreadable: hashing again is only slower
    return {
        uri: ((size, mtime_ns), digest)
        for uri, size, mtime_ns, digest in frame.select(list(_CACHE_SCHEMA)).iter_rows()
    }


def _write_cache(path: Path, entries: dict[str, tuple[tuple[int, int], str]]) -> None:
    frame = pl.DataFrame(
        [(uri, size, mtime_ns, digest) for uri, ((size, mtime_ns), digest) in entries.items()],
        schema=_CACHE_SCHEMA,
        orient="row",
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    write_parquet_atomic(frame, path)


def content_rows(rows: pl.DataFrame, contents: Mapping[str, str]) -> pl.DataFrame:
    """The training rows with each image path replaced by its content identity."""
    lookup_from, lookup_to = list(contents), list(contents.values())

    def mapped(expr: pl.Expr) -> pl.Expr:
        return expr.replace_strict(lookup_from, lookup_to, default=None, return_dtype=pl.String)

    return rows.with_columns(
        mapped(pl.col("q_img")).alias("q_img"),
        mapped(pl.col("t_img")).alias("t_img"),
        pl.col("hns").list.eval(mapped(pl.element())).alias("hns"),
    )
