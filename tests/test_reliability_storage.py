"""Issue 7, item 8: every table is written atomically with the mode a plain open() gives."""

from __future__ import annotations

import os
import stat
import tempfile
from pathlib import Path

import polars as pl
import pytest

from megapairs_assets.lib.storage import new_file_mode, write_atomic, write_parquet_atomic


@pytest.fixture
def umask():
    """Set the process umask for one test, then restore it."""
    previous = os.umask(0o022)

    def set_mask(mask: int) -> None:
        os.umask(mask)

    yield set_mask
    os.umask(previous)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _private_writer(tmp: Path) -> None:
    """A writer that creates its file like tempfile.mkstemp does: owner-only (0600)."""
    fd, scratch = tempfile.mkstemp(dir=tmp.parent)
    os.write(fd, b"table bytes")
    os.close(fd)
    os.replace(scratch, tmp)


@pytest.mark.parametrize(("mask", "expected"), [(0o022, 0o644), (0o002, 0o664), (0o077, 0o600)])
def test_tables_get_the_mode_of_a_plain_open(tmp_path, umask, mask, expected):
    umask(mask)
    assert new_file_mode() == expected
    write_parquet_atomic(pl.DataFrame({"a": [1]}), tmp_path / "frame.parquet")
    write_atomic(tmp_path / "private.bin", _private_writer)
    assert _mode(tmp_path / "frame.parquet") == expected
    assert _mode(tmp_path / "private.bin") == expected
    assert (tmp_path / "private.bin").read_bytes() == b"table bytes"
    assert sorted(path.name for path in tmp_path.iterdir()) == ["frame.parquet", "private.bin"]


def test_a_failed_write_leaves_the_old_table_and_no_temporary_file(tmp_path):
    target = tmp_path / "t.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), target)

    def failing(tmp: Path) -> None:
        tmp.write_bytes(b"half a table")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        write_atomic(target, failing)
    assert pl.read_parquet(target)["a"].to_list() == [1]
    assert [path.name for path in tmp_path.iterdir()] == ["t.parquet"]


def test_embedding_tables_get_the_same_mode_as_other_tables(tmp_path) -> None:
    import os

    import numpy as np

    from megapairs_assets.embeddings.compute import write_embedding_table

    previous = os.umask(0o022)
    try:
        path = tmp_path / "emb" / "00000.parquet"
        write_embedding_table(path, ["a", "b"], np.eye(2, dtype=np.float32), "model")
    finally:
        os.umask(previous)
    assert path.stat().st_mode & 0o777 == 0o644
