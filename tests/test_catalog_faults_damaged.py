"""A damaged catalog file is said to be damaged at once, not waited for as if another program
held it; a lock held by another program is still waited for."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from megapairs_assets.cli.main import main
from megapairs_assets.lineage.catalog import (
    CatalogBusyError,
    CatalogDamagedError,
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)


def _record(asset: str, partition: str) -> MaterializationRecord:
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id="r",
        code_version="v1",
        profile="test",
        started_at=utc_now(),
        duration_s=0.1,
        materialization_id=new_materialization_id(),
    )


def _catalog_with_records(path: Path, n: int = 20_000) -> LineageCatalog:
    """A catalog holding `n` materialization records, checkpointed into its file."""
    catalog = LineageCatalog(path, lock_timeout_s=30)
    with catalog.connect() as con:
        con.execute(
            "INSERT INTO materializations (materialization_id, asset, partition, status) "
            "SELECT 'm' || range, 'image_corpus', lpad(range::VARCHAR, 5, '0'), 'complete' "
            "FROM range(?)",
            [n],
        )
        con.execute("CHECKPOINT")
    return catalog


@pytest.mark.parametrize(
    "damage",
    ["truncated", "overwritten header", "zero bytes"],
)
def test_a_damaged_catalog_is_named_damaged_without_waiting(tmp_path: Path, damage: str) -> None:
    path = tmp_path / "catalog.duckdb"
    _catalog_with_records(path)
    if damage == "truncated":
        os.truncate(path, 100_000)  # the headers and part of the first 256 KiB block
    elif damage == "overwritten header":
        with open(path, "r+b") as handle:
            handle.seek(8)
            handle.write(b"\xff" * 64)
    else:
        os.truncate(path, 0)
    # A fresh process's view (this one remembers the schema it created).
    catalog = LineageCatalog(path, lock_timeout_s=60)
    started = time.monotonic()
    with pytest.raises(CatalogDamagedError) as raised:
        catalog.query("SELECT count(*) FROM materializations")
    assert time.monotonic() - started < 10  # not the 60 s lock wait
    text = str(raised.value)
    assert str(path) in text and "damaged" in text
    assert "backup" in text and "move it aside" in text and f"{path}.damaged" in text


def test_the_cli_prints_one_configuration_line_for_a_damaged_catalog(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home.mkdir(parents=True)
    path = home / "catalog.duckdb"
    _catalog_with_records(path)
    os.truncate(path, 100_000)
    assert main(["lineage", "--sql", "SELECT count(*) FROM materializations"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert err[0].startswith("megapairs lineage: configuration error: lineage catalog")
    assert "is damaged" in err[0] and "Traceback" not in err[0]


HOLDER = """
import sys, time, duckdb
con = duckdb.connect(sys.argv[1])
print("holding", flush=True)
time.sleep(float(sys.argv[2]))
"""


def test_a_file_held_by_another_program_is_still_waited_for(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = _catalog_with_records(path, n=0)
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(path), "30"], stdout=subprocess.PIPE, text=True
    )
    try:
        assert holder.stdout is not None and holder.stdout.readline().strip() == "holding"
        waiting = LineageCatalog(path, lock_timeout_s=1.5)
        started = time.monotonic()
        with pytest.raises(CatalogBusyError, match="held by another program"):
            waiting.record(_record("image_corpus", "00000"))
        assert time.monotonic() - started >= 1.5  # it waited its timeout, then said who
    finally:
        holder.kill()
        holder.wait()
    catalog.record(_record("image_corpus", "00000"))  # free again: writes go through
