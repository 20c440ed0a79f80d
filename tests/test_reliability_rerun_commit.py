"""The commit protocol survives kills and a second run of the same partition.

A partition's step is killed between writing its table and completing its catalog record;
re-running finishes, leaves the table of an uninterrupted run, and no `pending` record behind.
Two processes materializing one partition at once take turns: the table on disk, the newest
catalog record and the row lineage all come from the same attempt, with no duplicated rows.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import polars as pl
import pytest
from test_reliability_rerun_storage import stop

from megapairs_assets.lib.step import ABANDONED_ERROR, StepResult, run_recorded
from megapairs_assets.lineage.catalog import IncompleteCommitError, LineageCatalog

ASSET = "reliability_rerun_table"
# Row lineage goes to a table every catalog has (scoped by stage = ASSET): registering a new row
# table here would add it to every catalog the rest of the test session creates.
ROWS = "quarantine_log"

# A step in its own process: writes the table, touches a marker, then waits until `release`
# exists (or forever, to be killed) before returning: the window between the table and its
# catalog record.
_STEP_PROCESS = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
from test_reliability_rerun_commit import ASSET, write_step
from megapairs_assets.lib.step import run_recorded
from megapairs_assets.lineage.catalog import LineageCatalog

root, label, marker, release = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), Path(sys.argv[4])

def step(shard):
    result = write_step(root, label)(shard)
    marker.write_text(str(os.getpid()))
    while not release.exists():
        time.sleep(0.05)
    return result

run_recorded(step, "00000", asset=ASSET, code_version="v1", run_id=label, profile="test",
             catalog=LineageCatalog(root / "catalog.duckdb"), log=print)
"""


def write_step(root: Path, label: str):
    """A step writing the shard's table and lineage rows, both naming `label`."""
    from megapairs_assets.lib.storage import write_parquet_atomic

    def step(shard: str) -> StepResult:
        table = pl.DataFrame({"row_id": [f"{label}-{i}" for i in range(3)], "shard": shard})
        path = root / "data" / f"{shard}.parquet"
        write_parquet_atomic(table, path)
        rows = table.select(
            pl.lit(ASSET).alias("stage"),
            "shard",
            pl.col("row_id").alias("key"),
            pl.lit(None, pl.String).alias("source_uri"),
            pl.lit("test").alias("reason"),
            pl.lit(label).alias("detail"),
        )
        return StepResult(
            partition=shard, outputs={"table": path}, row_counts={"rows": 3}, rows={ROWS: rows}
        )

    return step


def _start(root: Path, label: str, release: Path) -> tuple[subprocess.Popen, Path]:
    marker = root / f"{label}.written"
    process = subprocess.Popen(
        [
            "timeout",
            "-s",
            "KILL",
            "180",
            sys.executable,
            "-c",
            _STEP_PROCESS,
            str(root),
            label,
            str(marker),
            str(release),
            str(Path(__file__).parent),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    return process, marker


def _wait_for(path: Path, process: subprocess.Popen, timeout_s: float = 120) -> None:
    deadline = time.monotonic() + timeout_s
    while not path.exists():
        assert process.poll() is None, f"the step process ended early: {process.stdout.read()}"
        assert time.monotonic() < deadline, f"{path.name} never appeared"
        time.sleep(0.05)


def _records(catalog: LineageCatalog) -> list[tuple[str, str, str | None]]:
    return catalog.query(
        "SELECT run_id, status, error FROM materializations WHERE asset = ? ORDER BY started_at",
        [ASSET],
    ).rows()


def test_a_step_killed_before_its_record_completes_is_settled_by_the_rerun(
    tmp_path: Path,
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    killed, marker = _start(tmp_path, "killed", tmp_path / "never")
    try:
        _wait_for(marker, killed)
        os.kill(int(marker.read_text()), signal.SIGKILL)  # the step's own process, mid-step
        killed.wait(timeout=60)
    finally:
        stop(killed)
    # The table was replaced, its record is pending: readers refuse it until it is redone.
    assert _records(catalog) == [("killed", "pending", None)]
    with pytest.raises(IncompleteCommitError, match="pending"):
        catalog.read_versions(ASSET, ["00000"])

    messages: list[str] = []
    rerun = run_recorded(
        write_step(tmp_path, "rerun"),
        "00000",
        asset=ASSET,
        code_version="v1",
        run_id="rerun",
        profile="test",
        catalog=catalog,
        log=messages.append,
    )
    newest = catalog.read_versions(ASSET, ["00000"])["00000"]
    records = _records(catalog)
    assert [(run, status) for run, status, _ in records] == [
        ("killed", "failed"),
        ("rerun", "complete"),
    ]
    assert records[0][2] == ABANDONED_ERROR.format(materialization_id=_id_of(catalog, "rerun"))
    assert _id_of(catalog, "rerun") == newest
    assert pl.read_parquet(rerun.outputs["table"])["row_id"].to_list() == [
        "rerun-0",
        "rerun-1",
        "rerun-2",
    ]
    assert any("never completed" in line for line in messages)
    assert sorted(p.name for p in (tmp_path / "data").iterdir()) == ["00000.parquet"]


def _id_of(catalog: LineageCatalog, run_id: str) -> str:
    return catalog.query(
        "SELECT materialization_id FROM materializations WHERE run_id = ?", [run_id]
    )["materialization_id"][0]


def test_two_runs_of_one_partition_take_turns(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    release_first = tmp_path / "release-first"
    first, first_written = _start(tmp_path, "first", release_first)
    second = None
    try:
        _wait_for(first_written, first)
        # The second starts while the first holds the partition between table and record.
        second, second_written = _start(tmp_path, "second", tmp_path / "release-second")
        (tmp_path / "release-second").write_text("go")
        time.sleep(1.0)
        assert not second_written.exists(), "the second run wrote while the first held it"
        release_first.write_text("go")
        assert first.wait(timeout=120) == 0
        assert second.wait(timeout=120) == 0
        assert "another run is materializing it" in second.stdout.read()
    finally:
        stop(first)
        if second is not None:
            stop(second)
    records = _records(catalog)
    assert [(run, status) for run, status, _ in records] == [
        ("first", "complete"),
        ("second", "complete"),
    ]
    newest = catalog.read_versions(ASSET, ["00000"])["00000"]
    lineage = catalog.query(
        f"SELECT key AS row_id, materialization_id FROM {ROWS} WHERE stage = ?", [ASSET]
    )
    assert sorted(lineage["row_id"]) == ["second-0", "second-1", "second-2"]  # no duplicates
    assert set(lineage["materialization_id"]) == {newest}
    table = pl.read_parquet(tmp_path / "data" / "00000.parquet")
    assert table["row_id"].to_list() == ["second-0", "second-1", "second-2"]
