"""The corpus step's memory stays small as a shard grows, and its tables do not change for it.

An image's bytes and pixels are held only while it is checked; what each further image adds is
its table row (kept in compact frames) and what the duplicate rules must remember (key, file
name, 32-byte digest). Figures for photo-sized shards: benchmarks/bench_corpus_memory.py.
"""

from __future__ import annotations

import io
import tarfile
import tracemalloc
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from image_factory import (
    good_jpeg_bytes,
    not_an_image_bytes,
    truncated_jpeg_bytes,
    unique_tiny_jpeg_bytes,
)

from megapairs_assets.corpus import table
from megapairs_assets.corpus.images import (
    ImageLimits,
    ImageRejected,
    close_tar_cache,
    read_uri_bytes,
)
from megapairs_assets.corpus.sources import (
    RawRecord,
    SourceSpec,
    count_shard_records,
    iter_shard_records,
)
from megapairs_assets.corpus.table import build_shard_table
from megapairs_assets.lib.storage import write_parquet_atomic

LIMITS = ImageLimits(min_side_px=8)


def _python_heap_peak(work: Callable[[], object]) -> int:
    """Peak bytes the Python heap held above its level when `work` started."""
    tracemalloc.start()
    try:
        work()
        return tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()


def _photos(count: int) -> Iterator[RawRecord]:
    """Records as a folder of phone photos yields them, made one at a time."""
    for index in range(count):
        yield RawRecord(
            key=f"IMG_{index:05d}",
            uri=f"/home/someone/Pictures/export/IMG_{index:05d}.jpg",
            caption=f"holiday photo {index}",
            data=unique_tiny_jpeg_bytes(index),
        )


def _mixed_records() -> list[RawRecord]:
    """Kept images between every kind of refusal, so both tables span several chunks."""
    records = []
    for index in range(9):
        records.append(
            RawRecord(f"k{index}", f"/c/k{index}.jpg", f"c {index}", good_jpeg_bytes(index))
        )
        records.append(RawRecord(f"k{index}", f"/c/k{index}.png", None, good_jpeg_bytes(50)))
        records.append(
            RawRecord(f"copy{index}", f"/c/copy{index}.jpg", None, good_jpeg_bytes(index))
        )
        records.append(RawRecord(f"bad{index}", f"/c/bad{index}.jpg", None, not_an_image_bytes()))
        records.append(RawRecord(f"cut{index}", f"/c/cut{index}.jpg", None, truncated_jpeg_bytes()))
        records.append(
            RawRecord(f"gone{index}", f"/c/gone{index}.jpg", None, None, "missing_file: x")
        )
    return records


def _table_bytes(tmp_path: Path, name: str) -> tuple[bytes, bytes]:
    images, quarantine = build_shard_table("s", _mixed_records(), LIMITS)
    write_parquet_atomic(images, tmp_path / f"{name}-images.parquet")
    write_parquet_atomic(quarantine, tmp_path / f"{name}-quarantine.parquet")
    return (
        (tmp_path / f"{name}-images.parquet").read_bytes(),
        (tmp_path / f"{name}-quarantine.parquet").read_bytes(),
    )


def test_tables_are_the_same_bytes_however_rows_are_chunked(tmp_path, monkeypatch):
    whole = _table_bytes(tmp_path, "whole")
    monkeypatch.setattr(table, "_ROWS_PER_CHUNK", 2)
    chunked = _table_bytes(tmp_path, "chunked")
    assert chunked == whole
    images, quarantine = build_shard_table("s", _mixed_records(), LIMITS)
    assert images.height == 9 and images["image_id"].is_sorted()
    assert quarantine["reason"].to_list()[:5] == [
        "duplicate_key",
        "duplicate_content",
        "decode_error",
        "decode_error",
        "missing_file",
    ]
    assert quarantine["detail"][0] == "key already taken by s/k0 (k0.jpg)"
    assert quarantine["detail"][1] == "same bytes as s/k0"


def test_each_further_image_adds_a_row_not_a_picture(monkeypatch):
    # Smaller chunks than the real 1,024 let a short test see past the rows still held as dicts.
    monkeypatch.setattr(table, "_ROWS_PER_CHUNK", 64)
    build_shard_table("warm", _photos(3), LIMITS)  # imports and decoder set-up
    small, large = 200, 1_500
    peaks = {
        n: _python_heap_peak(lambda n=n: build_shard_table("s", _photos(n), LIMITS))
        for n in (small, large)
    }
    per_image = (peaks[large] - peaks[small]) / (large - small)
    # Each record brings ~0.8 KB of JPEG; rows kept as dicts (as before) cost ~0.95 KB each.
    assert per_image < 500, peaks


def _write_tar(path: Path, samples: int) -> None:
    with tarfile.open(path, "w") as tar:
        for index in range(samples):
            for name, data in ((f"{index:06d}.jpg", b"x"), (f"{index:06d}.txt", b"a caption")):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


def test_reading_a_long_tar_does_not_keep_its_headers(tmp_path):
    small, large = 200, 2_000
    peaks = {}
    for count in (small, large):
        _write_tar(tmp_path / f"{count:05d}.tar", count)
        spec = SourceSpec("webdataset", str(tmp_path))
        shard = f"{count:05d}"
        assert count_shard_records(spec, shard) == count  # its header cache is filled here
        peaks[count] = _python_heap_peak(
            lambda spec=spec, shard=shard: all(r.data for r in iter_shard_records(spec, shard))
        )
    # tarfile's stream keeps every header (~0.9 KB a sample of two members) unless dropped.
    assert (peaks[large] - peaks[small]) / (large - small) < 200, peaks


def test_tar_members_are_read_from_a_compact_index(tmp_path):
    first, second = good_jpeg_bytes(1), good_jpeg_bytes(2)
    tar_path = tmp_path / "00000.tar"
    with tarfile.open(tar_path, "w") as tar:
        for name, data in (("a.jpg", first), ("b.jpg", second), ("a.jpg", second)):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    close_tar_cache()
    assert read_uri_bytes(f"{tar_path}#b.jpg") == second
    assert read_uri_bytes(f"{tar_path}#a.jpg") == first  # the first copy of a name, as before
    with pytest.raises(ImageRejected, match="missing_file"):
        read_uri_bytes(f"{tar_path}#c.jpg")
    # Cut inside b.jpg's data: the index still has it (its header is whole), reading fails.
    whole = tar_path.read_bytes()
    cut_at = whole.index(second) + len(second) // 2
    cut_path = tmp_path / "cut.tar"
    cut_path.write_bytes(whole[:cut_at])
    assert read_uri_bytes(f"{cut_path}#a.jpg") == first
    with pytest.raises(ImageRejected, match=r"decode_error: cannot read b\.jpg: unexpected end"):
        read_uri_bytes(f"{cut_path}#b.jpg")
    close_tar_cache()


def test_a_link_member_is_still_followed(tmp_path):
    tar_path = tmp_path / "links.tar"
    with tarfile.open(tar_path, "w") as tar:
        info = tarfile.TarInfo("a.jpg")
        info.size = len(good_jpeg_bytes(1))
        tar.addfile(info, io.BytesIO(good_jpeg_bytes(1)))
        link = tarfile.TarInfo("alias.jpg")
        link.type, link.linkname = tarfile.SYMTYPE, "a.jpg"
        tar.addfile(link)
    close_tar_cache()
    assert read_uri_bytes(f"{tar_path}#alias.jpg") == good_jpeg_bytes(1)
    close_tar_cache()
