"""Atomic table writes (lib/storage.py): a write that dies midway leaves the old table intact."""

from __future__ import annotations

from pathlib import Path

import polars as pl
import pytest

from megapairs_assets.lib.errors import TableWriteError
from megapairs_assets.lib.storage import write_atomic, write_parquet_atomic


class DiskFull(OSError):
    """The fault the tests inject: raised after part of a file was written."""


def _half_written_then_fail(target: Path) -> None:
    Path(target).write_bytes(b"PAR1 half a parquet file")
    raise DiskFull("disk full")


def test_write_parquet_atomic_writes_the_table_and_leaves_no_temporary_file(
    tmp_path: Path,
) -> None:
    path = tmp_path / "table" / "00000.parquet"
    frame = pl.DataFrame({"image_id": ["a", "b"], "score": [0.5, 0.25]})
    write_parquet_atomic(frame, path)
    write_parquet_atomic(frame.head(1), path)  # replacing an existing table works too
    assert pl.read_parquet(path).equals(frame.head(1))
    assert [p.name for p in path.parent.iterdir()] == ["00000.parquet"]


def test_a_parquet_write_dying_midway_leaves_the_previous_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    path = tmp_path / "00000.parquet"
    previous = pl.DataFrame({"image_id": ["old"]})
    write_parquet_atomic(previous, path)

    def crash_midway(frame: pl.DataFrame, target: Path, **options: object) -> None:
        _half_written_then_fail(target)

    monkeypatch.setattr(pl.DataFrame, "write_parquet", crash_midway)
    # An I/O failure becomes TableWriteError (still an OSError) naming the file, cause kept.
    with pytest.raises(TableWriteError, match="nothing was replaced") as raised:
        write_parquet_atomic(pl.DataFrame({"image_id": ["new"]}), path)
    assert isinstance(raised.value.__cause__, DiskFull)
    monkeypatch.undo()

    assert pl.read_parquet(path).equals(previous)
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]


def test_write_atomic_with_a_failing_writer_keeps_the_old_file_and_cleans_up(
    tmp_path: Path,
) -> None:
    path = tmp_path / "report.json"
    path.write_text('{"old": true}')
    # An I/O failure becomes TableWriteError (still an OSError) naming the file, cause kept.
    with pytest.raises(TableWriteError, match="nothing was replaced") as raised:
        write_atomic(path, _half_written_then_fail)
    assert isinstance(raised.value.__cause__, DiskFull)
    assert path.read_text() == '{"old": true}'
    assert [p.name for p in tmp_path.iterdir()] == ["report.json"]


def test_a_failed_first_write_leaves_nothing_behind(tmp_path: Path) -> None:
    path = tmp_path / "new" / "00000.parquet"
    # An I/O failure becomes TableWriteError (still an OSError) naming the file, cause kept.
    with pytest.raises(TableWriteError, match="nothing was replaced") as raised:
        write_atomic(path, _half_written_then_fail)
    assert isinstance(raised.value.__cause__, DiskFull)
    assert not path.exists()
    assert list(path.parent.iterdir()) == []
