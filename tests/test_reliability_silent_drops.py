"""Issue 7, item 6: every entry of a corpus folder and of a tar is either read or reported."""

from __future__ import annotations

import os
import tarfile
from pathlib import Path

import image_factory as factory
import polars as pl
import pytest

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import SourceSpec, iter_shard_records, scan_source
from megapairs_assets.corpus.table import (
    SOURCE_REPORT_SHARD,
    build_shard_table,
    source_report_table,
    write_source_report,
)
from megapairs_assets.lib.storage import DataLayout

LIMITS = ImageLimits()


def _names(uris) -> list[str]:
    return sorted(uri.rsplit("#", 1)[-1] if "#" in uri else Path(uri).name for uri in uris)


def test_webdataset_folder_reports_every_entry_it_does_not_read(tmp_path):
    factory.write_wds_shard(tmp_path / "00000.tar", factory.good_items(1))
    factory.write_wds_shard(tmp_path / "00001.tar", factory.good_items(1, first_seed=3))
    os.rename(tmp_path / "00001.tar", tmp_path / "00001.tar.gz")  # named as compressed
    (tmp_path / "00000.parquet").write_bytes(b"")  # img2dataset's own bookkeeping: known
    (tmp_path / "00000_stats.json").write_text("{}")
    (tmp_path / "notes.txt").write_text("hello")
    (tmp_path / "later").mkdir()
    (tmp_path / "gone.tar").symlink_to(tmp_path / "nowhere.tar")
    os.mkfifo(tmp_path / "pipe.tar")
    scan = scan_source(SourceSpec(kind="webdataset", path=str(tmp_path)))
    assert scan.shards == ["00000"]
    report = source_report_table(scan.unread)
    reported = _names(report["source_uri"])
    assert reported == ["00001.tar.gz", "gone.tar", "later", "notes.txt", "pipe.tar"]
    assert set(report["reason"]) == {"unsupported_file"}
    assert "compressed" in report.filter(report["source_uri"].str.ends_with(".gz"))["detail"][0]
    known = {"00000.tar", "00000.parquet", "00000_stats.json"}
    assert set(os.listdir(tmp_path)) == known | set(reported)


def test_tar_links_fifos_devices_and_unknown_members_become_quarantine_rows(tmp_path):
    factory.write_tar_with_special_members(tmp_path / "00000.tar", factory.good_jpeg_bytes(0))
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert images["key"].to_list() == ["good"]
    assert sorted(quarantine["key"]) == ["extra", "hard", "link", "pipe", "tty"]
    assert set(quarantine["reason"]) == {"unsupported_member"}
    link = quarantine.filter(quarantine["key"] == "link").row(0, named=True)
    assert link["source_uri"].endswith("00000.tar#link.jpg")
    assert "symbolic link" in link["detail"] and "good.jpg" in link["detail"]


def test_a_tar_holding_only_a_symlink_gives_one_quarantine_row(tmp_path):
    with tarfile.open(tmp_path / "00000.tar", "w") as tar:
        info = tarfile.TarInfo("000000000.jpg")
        info.type, info.linkname = tarfile.SYMTYPE, "/etc/hostname"
        tar.addfile(info)
    spec = SourceSpec(kind="webdataset", path=str(tmp_path))
    images, quarantine = build_shard_table("00000", iter_shard_records(spec, "00000"), LIMITS)
    assert images.height == 0
    assert quarantine[["key", "reason"]].rows() == [("000000000", "unsupported_member")]


def test_folder_source_reports_files_it_does_not_read(tmp_path):
    shard = factory.write_image_folder(tmp_path / "a", factory.good_items(1))
    (shard / "notes.pdf").write_bytes(b"%PDF")
    (shard / "orphan.txt").write_text("a caption without its picture")
    (shard / "nested").mkdir()
    factory.write_image_folder(tmp_path / "nested_only" / "deeper", factory.good_items(1))
    (tmp_path / "empty").mkdir()
    (tmp_path / "README.md").write_text("about this corpus")
    spec = SourceSpec(kind="folder", path=str(tmp_path))
    scan = scan_source(spec)
    assert scan.shards == ["a"]
    report = source_report_table(scan.unread)
    assert _names(report["source_uri"]) == ["README.md", "empty", "nested_only"]
    images, quarantine = build_shard_table("a", iter_shard_records(spec, "a"), LIMITS)
    assert images.height == 1
    reasons = {
        Path(uri).name: reason for uri, reason in quarantine[["source_uri", "reason"]].rows()
    }
    assert len(reasons) == quarantine.height
    assert reasons == {
        "nested": "unsupported_file",
        "notes.pdf": "unsupported_file",
        "orphan.txt": "missing_image",
    }


@pytest.mark.parametrize("suffix", [".jsonl", ".parquet"])
def test_manifest_rows_are_all_read_or_reported(tmp_path, suffix):
    manifest = factory.write_manifest_with_missing_file(tmp_path, suffix)
    spec = SourceSpec(kind="manifest", path=str(manifest))
    scan = scan_source(spec)
    assert scan.unread == []
    records = [record for shard in scan.shards for record in iter_shard_records(spec, shard)]
    assert len(records) == 2


def test_source_report_is_written_under_the_corpus_folder(tmp_path):
    source = tmp_path / "src"
    factory.write_wds_shard(source / "00000.tar", factory.good_items(1))
    (source / "00001.tar.gz").write_bytes(b"\x1f\x8b")
    layout = DataLayout(tmp_path / "home")
    report = write_source_report(SourceSpec(kind="webdataset", path=str(source)), layout)
    on_disk = pl.read_parquet(layout.corpus_source_report())
    assert on_disk.equals(report)
    assert on_disk[["shard", "reason"]].rows() == [(SOURCE_REPORT_SHARD, "unsupported_file")]
