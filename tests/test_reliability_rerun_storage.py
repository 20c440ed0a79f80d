"""Re-running after a crash leaves no temporary files; a failed write loses nothing.

A writer killed with SIGKILL cannot clean up after itself, so the next write into the same
folder removes what a dead writer of this machine left there (never a live writer's file).
A disk-full or permission error while writing a table raises one clear error, leaves no
temporary file, and the previous version stays readable.
"""

from __future__ import annotations

import errno
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest

from megapairs_assets.lib import storage
from megapairs_assets.lib.errors import TableWriteError
from megapairs_assets.lib.processes import machine_tag
from megapairs_assets.lib.storage import (
    ABANDONED_TEMPORARY_AGE_S,
    file_fingerprint,
    sweep_abandoned_temporaries,
    temporary_name,
    write_atomic,
    write_parquet_atomic,
)

# Writes half a table into its temporary file, says so, then waits to be killed.
_KILLED_WRITER = """
import sys, time
from pathlib import Path
from megapairs_assets.lib.storage import write_atomic

def half_then_hang(tmp):
    tmp.write_bytes(b"half a table")
    Path(sys.argv[2]).write_text("writing")
    time.sleep(120)

write_atomic(Path(sys.argv[1]), half_then_hang)
"""


def stop(process: subprocess.Popen) -> None:
    """End a `timeout ...`-wrapped child however the test went: SIGTERM, which `timeout` passes
    on to the program it runs (a SIGKILL would end `timeout` alone and orphan the program)."""
    if process.poll() is None:
        process.terminate()
        try:
            process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(timeout=30)


def _hidden(folder: Path) -> list[str]:
    return sorted(p.name for p in folder.iterdir() if p.name.startswith("."))


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 60) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, "the writer exited before it started writing"
        assert time.monotonic() < deadline, "the writer never started writing"
        time.sleep(0.05)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path: Path) -> None:
    table = tmp_path / "tables" / "00000.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), table)
    marker = tmp_path / "writing"
    writer = subprocess.Popen(
        ["timeout", "-s", "KILL", "120", sys.executable, "-c", _KILLED_WRITER, str(table), marker]
    )
    try:
        _wait_for(marker, writer)
        leftovers = _hidden(table.parent)
        assert len(leftovers) == 1 and leftovers[0].startswith(".00000.parquet.tmp-")
        os.kill(int(leftovers[0].split("-")[-2]), signal.SIGKILL)  # the writer itself, mid-write
        writer.wait(timeout=60)
    finally:
        stop(writer)
    # Killed mid-write: its half table is still there, the old table untouched.
    assert _hidden(table.parent) == leftovers
    assert pl.read_parquet(table)["a"].to_list() == [1]

    storage._SWEPT_FOLDERS.clear()  # as in a new process: the re-run
    write_parquet_atomic(pl.DataFrame({"a": [2]}), table)
    assert _hidden(table.parent) == []
    assert pl.read_parquet(table)["a"].to_list() == [2]


def test_a_live_writers_temporary_file_is_left_alone(tmp_path: Path) -> None:
    live = subprocess.Popen(["sleep", "60"])
    try:
        name = f".t.parquet.tmp-{machine_tag()}-{live.pid}-0123abcd"
        (tmp_path / name).write_bytes(b"being written")
        assert sweep_abandoned_temporaries(tmp_path) == []
        assert _hidden(tmp_path) == [name]
    finally:
        live.kill()
        live.wait(timeout=30)
    assert sweep_abandoned_temporaries(tmp_path) == [tmp_path / name]
    assert _hidden(tmp_path) == []


def test_temporary_files_of_other_machines_and_older_releases_go_only_when_old(
    tmp_path: Path,
) -> None:
    other_machine = tmp_path / ".t.parquet.tmp-ffffffff-1-0123abcd"
    older_release = tmp_path / ".u.parquet.tmp-89abcdef"
    not_ours = tmp_path / ".hidden-config"
    for path in (other_machine, older_release, not_ours):
        path.write_bytes(b"x")
    if machine_tag() == "ffffffff":  # pragma: no cover - one machine in four billion
        pytest.skip("this machine's tag is the test's foreign tag")
    assert sweep_abandoned_temporaries(tmp_path) == []
    day_ago = time.time() - ABANDONED_TEMPORARY_AGE_S - 60
    for path in (other_machine, older_release, not_ours):
        os.utime(path, (day_ago, day_ago))
    assert sorted(sweep_abandoned_temporaries(tmp_path)) == sorted([other_machine, older_release])
    assert _hidden(tmp_path) == [not_ours.name]


def test_temporary_names_say_which_process_writes_them() -> None:
    name = temporary_name("00000.parquet")
    assert name.startswith(f".00000.parquet.tmp-{machine_tag()}-{os.getpid()}-")
    assert storage._TEMPORARY_NAME.fullmatch(name)


def test_disk_full_while_writing_raises_one_clear_error_and_keeps_the_old_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    table = tmp_path / "00000.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1, 2]}), table)
    real_write = pl.DataFrame.write_parquet

    def fills_the_disk(frame: pl.DataFrame, file: Path, **options: object) -> None:
        Path(file).write_bytes(b"PAR1 half")  # polars has written part of it when space runs out
        raise pl.exceptions.ComputeError(
            "parquet: File out of specification: underlying IO error: No space left on device "
            "(os error 28)"
        )

    monkeypatch.setattr(pl.DataFrame, "write_parquet", fills_the_disk)
    with pytest.raises(TableWriteError) as raised:
        write_parquet_atomic(pl.DataFrame({"a": [9]}), table)
    monkeypatch.setattr(pl.DataFrame, "write_parquet", real_write)
    assert raised.value.errno == errno.ENOSPC
    message = str(raised.value)
    assert str(table) in message and "No space left on device" in message
    assert "previous file" in message
    assert isinstance(raised.value.__cause__, pl.exceptions.ComputeError)
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]
    assert pl.read_parquet(table)["a"].to_list() == [1, 2]


def test_permission_denied_while_publishing_keeps_the_old_table(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A read-only folder cannot be simulated as root; os.replace refusing is the same failure.
    table = tmp_path / "00000.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), table)

    def refused(source: object, target: object) -> None:
        raise PermissionError(errno.EACCES, "Permission denied", str(target))

    monkeypatch.setattr(os, "replace", refused)
    with pytest.raises(TableWriteError, match="Permission denied") as raised:
        write_parquet_atomic(pl.DataFrame({"a": [2]}), table)
    monkeypatch.undo()
    assert raised.value.errno == errno.EACCES and isinstance(raised.value, OSError)
    assert [p.name for p in tmp_path.iterdir()] == ["00000.parquet"]
    assert pl.read_parquet(table)["a"].to_list() == [1]


def test_a_folder_that_cannot_be_created_is_a_clear_error(tmp_path: Path) -> None:
    blocker = tmp_path / "not_a_folder"
    blocker.write_text("a file where the asset's folder should be")
    with pytest.raises(TableWriteError, match=str(blocker)):
        write_parquet_atomic(pl.DataFrame({"a": [1]}), blocker / "00000.parquet")
    assert blocker.read_text().startswith("a file")


def test_a_bug_in_a_writer_keeps_its_type_and_names_the_table(tmp_path: Path) -> None:
    def buggy(tmp: Path) -> None:
        tmp.write_bytes(b"x")
        raise ValueError("a bug, not a full disk")

    with pytest.raises(ValueError, match="a bug") as raised:
        write_atomic(tmp_path / "t.bin", buggy)
    assert any(str(tmp_path / "t.bin") in note for note in raised.value.__notes__)
    assert list(tmp_path.iterdir()) == []


def test_file_fingerprints_follow_content_not_time(tmp_path: Path) -> None:
    path = tmp_path / "t.parquet"
    write_parquet_atomic(pl.DataFrame({"a": [1]}), path)
    first = file_fingerprint(path)
    write_parquet_atomic(pl.DataFrame({"a": [1]}), path)  # same content, new file
    assert file_fingerprint(path) == first
    write_parquet_atomic(pl.DataFrame({"a": [2]}), path)
    assert file_fingerprint(path) != first
    assert file_fingerprint(tmp_path / "absent") == "missing"
    folder_before = file_fingerprint(tmp_path)
    (tmp_path / "more.txt").write_text("another file")
    assert file_fingerprint(tmp_path) != folder_before
