"""Damaged tables: a clear error naming the file, never a Rust panic or silently other data.

Tables are written as the pipeline writes them (`write_parquet_atomic` / `write_arrow_atomic`:
a CRC-32 on every page) and damaged on disk one byte at a time. What is proved: a table whose
page no longer decodes (which made polars' own reader panic, a BaseException) is a
`TableReadError` naming the file; every single-bit flip in a table's pages is either that
error or the very same data, never other values; and a damaged KNN graph or embedding table is
not reused (the reason names the file), so its shard is searched or embedded again.
"""

from __future__ import annotations

import io
import re
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.embeddings.compute import write_embedding_table
from megapairs_assets.embeddings.reuse import (
    DamagedTable as EmbeddingDamaged,
)
from megapairs_assets.embeddings.reuse import (
    input_digests,
    reusable_shard,
    reuse_plan,
    shard_keys,
    shard_metadata,
)
from megapairs_assets.knn.reuse import DamagedTable as GraphDamaged
from megapairs_assets.knn.reuse import reusable_graph, stored_metadata
from megapairs_assets.knn.search import KNN_SCHEMA
from megapairs_assets.lib.storage import (
    TableReadError,
    read_parquet,
    write_arrow_atomic,
    write_parquet_atomic,
)

K = 5
QUERIES = 24
KNN_KEY = "f" * 64
EMBEDDING_VERSION = "embeddings-v1+s.aaaaaaaaaaaa"


def _graph(queries: int = QUERIES, k: int = K) -> pl.DataFrame:
    """A KNN table that passes every KNN check: k neighbours per query, scores falling."""
    rng = np.random.default_rng(0)
    rows = []
    for q in range(queries):
        others = [n for n in range(queries * 4) if n != q]
        picked = rng.choice(others, size=k, replace=False)
        scores = np.sort(rng.uniform(0.1, 0.99, size=k).astype(np.float32))[::-1]
        for rank, (n, score) in enumerate(zip(picked, scores, strict=True)):
            rows.append((f"00001/{q:09d}", rank, f"00000/{n:09d}", float(score)))
    return pl.DataFrame(rows, schema=KNN_SCHEMA, orient="row")


def _flipped(path: Path, position: int, mask: int) -> bytes:
    """The file's bytes with one byte XORed by `mask` (the file itself is left as it is)."""
    data = bytearray(path.read_bytes())
    data[position] ^= mask
    return bytes(data)


def _page_bytes(path: Path) -> list[int]:
    """Offsets of every byte of every column chunk's pages (not the footer)."""
    meta = pq.read_metadata(path)
    offsets: list[int] = []
    for group in range(meta.num_row_groups):
        for column in range(meta.num_columns):
            chunk = meta.row_group(group).column(column)
            start = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
            start = start if start is not None else chunk.data_page_offset
            offsets.extend(range(start, start + chunk.total_compressed_size))
    return offsets


def _last_page_byte(path: Path, column: str) -> int:
    """The last byte of a column's last page: inside a page body, after its header."""
    meta = pq.read_metadata(path)
    chunk = meta.row_group(0).column(meta.schema.to_arrow_schema().get_field_index(column))
    start = chunk.dictionary_page_offset if chunk.has_dictionary_page else None
    start = start if start is not None else chunk.data_page_offset
    return start + chunk.total_compressed_size - 1


def test_a_page_that_no_longer_decodes_is_a_clear_error_never_a_panic(tmp_path: Path) -> None:
    # The chaos run's damage: a KNN graph of the demo's shape written as the KNN step wrote
    # it before tables carried checksums (polars, its reuse key in the footer), one byte of a
    # page XORed with 0x04. polars' own reader panics on it (pyo3's PanicException, a
    # BaseException that `except Exception` let through: the KNN step failed for every shard,
    # on every re-run).
    rng = np.random.default_rng(0)
    frame = pl.DataFrame(
        {
            "query_id": [f"00001/{10000 + i:09d}" for i in range(64) for _ in range(20)],
            "rank": pl.Series([r for _ in range(64) for r in range(20)], dtype=pl.Int16),
            "neighbor_id": [
                f"{s:05d}/{s * 10000 + j:09d}"
                for s, j in zip(rng.integers(0, 5, 1280), rng.integers(0, 64, 1280), strict=True)
            ],
            "score": np.sort(rng.random(1280).astype(np.float32))[::-1],
        }
    )
    clean = tmp_path / "clean.parquet"
    frame.write_parquet(clean, compression="zstd", metadata=stored_metadata(KNN_KEY))
    damaged = tmp_path / "00001.parquet"
    damaged.write_bytes(_flipped(clean, 190, 0x04))

    with pytest.raises(TableReadError, match=re.escape(str(damaged))) as raised:
        read_parquet(damaged)
    assert "damaged" in str(raised.value) and isinstance(raised.value, OSError)
    # Under a matching key it is not reused (so it is searched again), the reason naming it.
    with pytest.raises(GraphDamaged, match=f"{re.escape(str(damaged))}.*damaged or unreadable"):
        reusable_graph(damaged, KNN_KEY, 20)


def test_a_table_that_is_not_parquet_or_lacks_a_column_names_the_file(tmp_path: Path) -> None:
    text = tmp_path / "00000.parquet"
    text.write_text("not a table")
    with pytest.raises(TableReadError, match=re.escape(str(text))):
        read_parquet(text)
    table = tmp_path / "00001.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), table)
    with pytest.raises(TableReadError, match=re.escape(f"{table} has no column 'b'")):
        read_parquet(table, columns=["a", "b"])
    with pytest.raises(FileNotFoundError):  # no table yet: not a damaged one
        read_parquet(tmp_path / "missing.parquet")


def test_every_single_bit_flip_in_a_page_is_an_error_or_the_same_data(tmp_path: Path) -> None:
    # Without page checksums some flips read back as other ids, ranks or scores that pass
    # every KNN check (the chaos run found 913 of ~2,700 in a demo graph); with them, none.
    graph = _graph()
    path = tmp_path / "00001.parquet"
    write_parquet_atomic(graph, path)
    assert read_parquet(path).equals(graph)
    damaged = tmp_path / "damaged.parquet"
    detected = 0
    offsets = _page_bytes(path)
    for position in offsets:
        damaged.write_bytes(_flipped(path, position, 1 << (position % 8)))
        try:
            read = read_parquet(damaged)
        except TableReadError:
            detected += 1
            continue
        assert read.equals(graph), f"a flip at byte {position} gave other data silently"
    assert detected > len(offsets) * 0.9  # the rest hit page statistics, not values


def test_a_damaged_graph_is_searched_again_naming_the_file(tmp_path: Path) -> None:
    graph = _graph()
    path = tmp_path / "00001.parquet"
    write_parquet_atomic(graph, path, metadata=stored_metadata(KNN_KEY))
    kept, outcomes = reusable_graph(path, KNN_KEY, K)
    assert kept.equals(graph) and all(o.passed for o in outcomes)
    # A low bit of the last score: a value that still passes every check, if read unverified.
    path.write_bytes(_flipped(path, _last_page_byte(path, "score"), 0x01))
    with pytest.raises(GraphDamaged, match=f"{re.escape(str(path))}.*damaged or unreadable"):
        reusable_graph(path, KNN_KEY, K)


def _embedding_shard(tmp_path: Path, rows_count: int = 12, dim: int = 8):
    ids = [f"00000/{i:03d}" for i in range(rows_count)]
    rows = pl.DataFrame({"image_id": ids, "content_hash": [f"h-{i}" for i in ids]})
    keys = shard_keys(EMBEDDING_VERSION, "clip_image", "image", rows, ImageLimits())
    assert keys is not None
    vectors = np.random.default_rng(1).standard_normal((rows_count, dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    path = tmp_path / "clip_image" / "00000.parquet"
    write_embedding_table(
        path,
        ids,
        vectors,
        "fake:image",
        metadata=shard_metadata(keys, []),
        input_digests=input_digests(keys, ids),
    )
    return path, rows, keys


def test_a_damaged_embedding_table_is_embedded_again_naming_the_file(tmp_path: Path) -> None:
    path, rows, keys = _embedding_shard(tmp_path)
    # The table as the storage helpers write it: the same columns and footer, page checksums.
    write_arrow_atomic(pq.read_table(path), path, use_dictionary=False)
    assert reusable_shard(path, keys.table_key, rows).ids == rows["image_id"].to_list()
    # A low bit of the last vector's pages (its last float16's low byte, written plain): a
    # vector still of unit norm within the checks' tolerance, so only the checksum can tell.
    path.write_bytes(_flipped(path, _last_page_byte(path, "embedding") - 1, 0x01))
    with pytest.raises(EmbeddingDamaged, match=f"{re.escape(str(path))}.*damaged or unreadable"):
        reusable_shard(path, keys.table_key, rows)
    # Nor row by row; the step can tell a damaged table (worth a warning) from a changed one.
    with pytest.raises(EmbeddingDamaged, match="damaged or unreadable"):
        reuse_plan(path, keys, rows)
    # Under other inputs (the whole table is not even read) the per-row path finds the damage.
    changed = rows.with_columns(pl.col("content_hash").str.replace("h-00000/000", "new-"))
    changed_keys = shard_keys(EMBEDDING_VERSION, "clip_image", "image", changed, ImageLimits())
    assert changed_keys is not None
    with pytest.raises(EmbeddingDamaged, match=f"{re.escape(str(path))}.*damaged or unreadable"):
        reuse_plan(path, changed_keys, changed)


def test_the_embedding_step_writes_tables_whose_damage_is_found(tmp_path: Path) -> None:
    path, rows, keys = _embedding_shard(tmp_path)
    # Without page checksums this read back as a vector that passes every check, and was reused.
    path.write_bytes(_flipped(path, _last_page_byte(path, "embedding") - 1, 0x01))
    with pytest.raises(EmbeddingDamaged, match="damaged or unreadable"):
        reusable_shard(path, keys.table_key, rows)


def test_tables_read_the_same_through_the_checked_reader(tmp_path: Path) -> None:
    # Every dtype the pipeline writes comes back as it was, from a local file or a store's bytes.
    frame = pl.DataFrame(
        {
            "s": ["a", None, "c"],
            "i16": pl.Series([1, 2, 3], dtype=pl.Int16),
            "f32": pl.Series([0.5, 1.5, None], dtype=pl.Float32),
            "ids": [["x"], [], None],
            "arr": pl.Series([[1.0, 2.0]] * 3, dtype=pl.Array(pl.Float32, 2)),
            "flag": [True, False, None],
            "at": pl.Series(["2024-01-01T00:00:00"] * 3).str.to_datetime(time_zone="UTC"),
        }
    )
    path = tmp_path / "t.parquet"
    write_parquet_atomic(frame, path)
    assert read_parquet(path).equals(frame) and read_parquet(path).schema == frame.schema
    assert read_parquet(path, columns=["f32", "s"]).columns == ["f32", "s"]
    write_parquet_atomic(frame, path, metadata={"k": "v"})
    assert read_parquet(path).equals(frame)
    assert pq.read_metadata(path).metadata[b"k"] == b"v"
    assert pl.read_parquet(io.BytesIO(path.read_bytes())).equals(frame)  # plain readers too
