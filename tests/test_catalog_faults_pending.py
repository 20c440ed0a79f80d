"""A reader meeting a partition that another live run of this machine is still writing waits
for it (two `megapairs demo` on one home); one left pending by a killed step is still an error."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import pytest

from megapairs_assets.lib.step import partition_lock_path
from megapairs_assets.lineage.catalog import (
    IncompleteCommitError,
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)

# Another run's step: begins the partition's record under its lock (`run_recorded`), writes for
# a while, completes it.
WRITER = """
import sys, time
from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lineage.catalog import LineageCatalog

def step(partition):
    print("writing", flush=True)
    time.sleep(float(sys.argv[2]))
    return StepResult(partition=partition, row_counts={"rows": 7})

run_recorded(step, "00001", asset="clip_image_knn", code_version="v1", run_id="run-b-1234",
             profile="test", catalog=LineageCatalog(sys.argv[1]))
print("done", flush=True)
"""


def _record(asset: str, partition: str, run_id: str = "run-a") -> MaterializationRecord:
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id=run_id,
        code_version="v1",
        profile="test",
        started_at=utc_now(),
        duration_s=0.1,
        materialization_id=new_materialization_id(),
    )


def test_a_partition_another_live_run_is_writing_is_waited_for(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path, pending_wait_s=60)
    catalog.record(_record("clip_image_knn", "00000"))
    catalog.record(_record("clip_image_knn", "00001"))  # an older complete version
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "2"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        started = time.monotonic()
        versions = catalog.read_versions("clip_image_knn", ["00000", "00001"])
        waited = time.monotonic() - started
        assert writer.wait(timeout=60) == 0
    finally:
        writer.kill()
    newest = catalog.query(
        "SELECT materialization_id, status FROM materializations WHERE partition = '00001' "
        "ORDER BY started_at DESC LIMIT 1"
    ).row(0)
    # The version read is the one the other run completed, not the older one nor a failure.
    assert newest[1] == "complete" and versions["00001"] == newest[0]
    assert waited > 0.5
    err = capsys.readouterr().err
    assert "clip_image_knn[00001] is being written by run run-b-12" in err
    assert "waiting up to 60 s" in err


def test_a_pending_record_whose_step_is_gone_is_still_refused_at_once(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb", pending_wait_s=60)
    catalog.record(_record("clip_image_knn", "00000"))
    catalog.begin(_record("clip_image_knn", "00000"))  # killed after begin: nobody holds it
    started = time.monotonic()
    with pytest.raises(IncompleteCommitError, match=r"00000 \(pending\) did not complete"):
        catalog.read_versions("clip_image_knn", ["00000"])
    assert time.monotonic() - started < 5


def test_the_wait_is_bounded(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path, pending_wait_s=1)
    writer = subprocess.Popen(
        [sys.executable, "-c", WRITER, str(path), "30"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert writer.stdout is not None and writer.stdout.readline().strip() == "writing"
        with pytest.raises(IncompleteCommitError, match="still being written by another run"):
            catalog.read_versions("clip_image_knn", ["00001"])
    finally:
        writer.kill()
        writer.wait()


def test_the_catalog_names_the_same_lock_as_the_step() -> None:
    catalog = LineageCatalog(Path("/somewhere/catalog.duckdb"))
    for partition in ("00000", "demo", None, "a|b"):
        assert catalog.partition_lock_path("mined_image_pairs", partition) == partition_lock_path(
            catalog, "mined_image_pairs", partition
        )
