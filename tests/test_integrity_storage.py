"""Atomic writes at the edges: names near the 255-byte limit, and a disk that fills up.

What is proved: a table whose own name fits the file system (up to 255 bytes of UTF-8) can be
written, its temporary name being cut (with a hash) to fit, and a killed writer's file is
still swept; an exported image's path parts are capped, the short ones unchanged; and a write
that fails on a (nearly) full disk says so, with the path and the free bytes, whatever the
writer raised (torch.save's "unexpected pos"), while a failure with room keeps its type.
"""

from __future__ import annotations

import errno
import os
import re
from pathlib import Path
from types import SimpleNamespace

import polars as pl
import pytest

from megapairs_assets.generation.common import MAX_EXPORT_PART_CHARS, image_relpath
from megapairs_assets.lib import storage
from megapairs_assets.lib.errors import TableWriteError
from megapairs_assets.lib.storage import (
    MAX_FILE_NAME_BYTES,
    read_parquet,
    sweep_abandoned_temporaries,
    temporary_name,
    write_atomic,
    write_parquet_atomic,
)

# What torch.save raised when the training checkpoint filled the disk: no errno, no "space".
TORCH_DISK_FULL = "[enforce fail at inline_container.cc:672] . unexpected pos 15449600 vs 15449492"


@pytest.mark.parametrize(
    "name",
    [
        "é" * 123 + ".parquet",  # 254 bytes of UTF-8 in 131 characters
        "k" * 240 + ".jpg",
        "日本" * 41 + ".parquet",  # 3-byte characters: a cut must not split one
    ],
)
def test_any_name_that_fits_can_be_written_atomically(tmp_path: Path, name: str) -> None:
    assert len(os.fsencode(name)) <= MAX_FILE_NAME_BYTES
    temporary = temporary_name(name)
    assert len(os.fsencode(temporary)) <= MAX_FILE_NAME_BYTES
    assert temporary.startswith(".") and storage._TEMPORARY_NAME.fullmatch(temporary)
    assert temporary_name(name) != temporary  # still unique per write

    path = tmp_path / name
    write_atomic(path, lambda tmp: tmp.write_text("first"))
    write_parquet_atomic(pl.DataFrame({"a": [1]}), path)
    assert read_parquet(path)["a"].to_list() == [1]
    assert [p.name for p in tmp_path.iterdir()] == [name]


def _dead_pid_like_ours() -> int:
    """A process id with as many digits as ours that no process has (so names keep length)."""
    digits = len(str(os.getpid()))
    for pid in range(10 ** (digits - 1), 10**digits):
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return pid
        except PermissionError:
            continue
    raise AssertionError("no free process id")  # pragma: no cover


def test_a_killed_writers_long_temporary_file_is_swept(tmp_path: Path) -> None:
    name = "x" * 250
    long_name = temporary_name(name).replace(f"-{os.getpid()}-", f"-{_dead_pid_like_ours()}-")
    (tmp_path / long_name).write_text("left by a kill -9")
    assert sweep_abandoned_temporaries(tmp_path) == [tmp_path / long_name]


def test_short_names_keep_their_temporary_name() -> None:
    assert temporary_name("00000.parquet").startswith(".00000.parquet.tmp-")


def test_exported_image_paths_are_capped_and_distinct() -> None:
    long_key = "a" * 240
    path = image_relpath(f"00000/{long_key}")
    shard, key = path.split("/")[1:]
    assert len(key) <= MAX_EXPORT_PART_CHARS + len(".jpg") and shard == "00000"
    # Keys sharing the first hundred characters still get files of their own.
    assert image_relpath(f"00000/{long_key}b") != path
    assert len(image_relpath(f"{'s' * 200}/{'é' * 200}").split("/")[1]) <= MAX_EXPORT_PART_CHARS
    # Every part that fitted before the cap is where it was.
    assert image_relpath("00000/000000001") == "images/00000/000000001.jpg"
    assert re.fullmatch(r"images/00000/a_b-[0-9a-f]{8}\.jpg", image_relpath("00000/a b"))


def test_a_long_image_key_exports_to_a_file(tmp_path: Path) -> None:
    # The chaos run's 240-character key made triplet_export fail for every shard.
    target = tmp_path / image_relpath(f"00000/{'k' * 240}")
    write_atomic(target, lambda tmp: tmp.write_bytes(b"\xff\xd8 jpeg"))
    assert target.read_bytes() == b"\xff\xd8 jpeg"


def _statvfs_with(free: int):
    real = os.statvfs

    def fake(path: str | os.PathLike[str]) -> SimpleNamespace:
        stats = real(path)
        return SimpleNamespace(
            f_bavail=free // stats.f_frsize,
            f_bfree=free // stats.f_frsize,
            f_frsize=stats.f_frsize,
        )

    return fake


def _torch_save_on_a_full_disk(tmp: Path) -> None:
    tmp.write_bytes(b"PK half a checkpoint")
    raise RuntimeError(TORCH_DISK_FULL)


def test_a_write_failing_on_a_full_disk_says_the_disk_is_full(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    checkpoint = tmp_path / "lightning" / "last.ckpt"
    write_atomic(checkpoint, lambda tmp: tmp.write_bytes(b"previous"))
    frsize = os.statvfs(tmp_path).f_frsize
    monkeypatch.setattr(os, "statvfs", _statvfs_with(2 * frsize))
    with pytest.raises(TableWriteError) as raised:
        write_atomic(checkpoint, _torch_save_on_a_full_disk)
    monkeypatch.undo()
    message = str(raised.value)
    assert raised.value.errno == errno.ENOSPC
    assert "disk is full" in message and "No space left on device" in message
    assert str(checkpoint) in message and f"{2 * frsize} bytes free" in message
    assert "unexpected pos" in message  # the writer's own words are kept
    assert isinstance(raised.value.__cause__, RuntimeError)
    assert checkpoint.read_bytes() == b"previous"
    assert [p.name for p in checkpoint.parent.iterdir()] == ["last.ckpt"]


def test_a_write_failing_with_room_left_keeps_its_error(tmp_path: Path) -> None:
    with pytest.raises(RuntimeError, match="unexpected pos") as raised:
        write_atomic(tmp_path / "last.ckpt", _torch_save_on_a_full_disk)
    assert not isinstance(raised.value, TableWriteError)
    assert list(tmp_path.iterdir()) == []


def test_an_enospc_error_says_how_much_is_free(tmp_path: Path) -> None:
    def no_space(tmp: Path) -> None:
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(TableWriteError, match="disk is full") as raised:
        write_atomic(tmp_path / "t.parquet", no_space)
    assert raised.value.errno == errno.ENOSPC and "bytes free on the file system" in str(
        raised.value
    )
