"""How often a step opens the lineage catalog, and that opening it less keeps its contracts.

Each access attaches the file to a kept in-memory DuckDB and detaches it (the file is free for
other processes between accesses); writes count a generation in the lock file, so a reader's
second look and its repeated reads of an upstream asset skip the catalog only while nothing
was written. Counted here by wrapping `catalog._attach` (one per file open).
"""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import duckdb
import polars as pl
import pytest

from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lineage import catalog as catalog_module
from megapairs_assets.lineage.catalog import (
    STATUS_FAILED,
    LineageCatalog,
    MaterializationRecord,
    RowTable,
    read_with_versions,
    register_row_table,
    utc_now,
)

CONNECT_ROWS = register_row_table(
    RowTable("connect_test_rows", (("item", "VARCHAR"), ("shard", "VARCHAR")))
)


@pytest.fixture
def opens(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Each file open through the kept database, by path."""
    seen: list[str] = []
    real = catalog_module._attach

    def counted(database: duckdb.DuckDBPyConnection, path: str, read_only: bool):  # type: ignore[no-untyped-def]
        seen.append(path)
        return real(database, path, read_only)

    monkeypatch.setattr(catalog_module, "_attach", counted)
    return seen


def _record(asset: str, partition: str, run_id: str = "r") -> MaterializationRecord:
    return MaterializationRecord(asset, partition, run_id, "v1", "test", utc_now(), 0.0)


def _step(catalog: LineageCatalog, tables: Path, asset: str, upstream: str | None):  # type: ignore[no-untyped-def]
    def step(shard: str) -> StepResult:
        versions: dict[str, str] = {}
        if upstream is None:
            frame = pl.DataFrame({"item": [f"{shard}/{i}" for i in range(3)]})
        else:
            path = tables / upstream / f"{shard}.parquet"
            frame, read = read_with_versions(
                catalog, upstream, [shard], lambda: pl.read_parquet(path), required=True
            )
            versions = {f"{upstream}/{p}": v for p, v in read.items()}
        out = tables / asset / f"{shard}.parquet"
        out.parent.mkdir(parents=True, exist_ok=True)
        frame.write_parquet(out)
        rows = frame.with_columns(pl.lit(shard).alias("shard"))
        return StepResult(
            shard,
            outputs={"table": out},
            row_counts={"rows": frame.height},
            input_versions=versions,
            rows={CONNECT_ROWS.name: rows},
        )

    return step


def test_a_step_opens_the_catalog_about_twice_per_partition(
    tmp_path: Path, opens: list[str]
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    shards = [f"{i:05d}" for i in range(4)]
    for shard in shards:
        run_recorded(
            _step(catalog, tmp_path, "up", None), shard, asset="up", code_version="v",
            run_id="r", profile="t", catalog=catalog,
        )  # fmt: skip
    opens.clear()
    for shard in shards:
        result = run_recorded(
            _step(catalog, tmp_path, "down", "up"), shard, asset="down", code_version="v",
            run_id="r", profile="t", catalog=catalog,
        )  # fmt: skip
        assert set(result.input_versions) == {f"up/{shard}"}
    # pending + complete per partition, and the upstream's records read once for the step
    # (this process's own writes to `down` leave its answer for `up` valid).
    assert len(opens) == 2 * len(shards) + 1
    recorded = catalog.query(
        "SELECT count(*) AS n FROM materializations WHERE asset = 'down' AND status = 'complete'"
    )
    assert recorded["n"][0] == len(shards)


def test_a_write_by_another_process_is_seen_at_once(tmp_path: Path, opens: list[str]) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path)
    first = _record("up", "00000")
    catalog.record(first)
    assert catalog.read_versions("up", ["00000"]) == {"00000": first.materialization_id}
    opens.clear()
    assert catalog.read_versions("up", ["00000"]) == {"00000": first.materialization_id}
    assert opens == []  # nothing written since: answered without opening the file
    # Another process records a newer materialization (the file is free between accesses).
    newer = subprocess.run(
        [
            sys.executable,
            "-c",
            "import sys\n"
            "from megapairs_assets.lineage.catalog import LineageCatalog, "
            "MaterializationRecord, utc_now\n"
            "m = MaterializationRecord('up', '00000', 'other', 'v1', 'test', utc_now(), 0.0)\n"
            "LineageCatalog(sys.argv[1], lock_timeout_s=10).record(m)\n"
            "print(m.materialization_id)",
            str(path),
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout.strip()
    assert catalog.read_versions("up", ["00000"]) == {"00000": newer}
    assert len(opens) == 1


def test_a_second_look_after_a_foreign_write_reads_again(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path)
    catalog.record(_record("up", "p"))
    rewritten = _record("up", "p", run_id="other")
    reads: list[int] = []

    def read() -> str:
        reads.append(1)
        if len(reads) == 1:  # another catalog object (another run) replaces the table
            LineageCatalog(path).record(rewritten)
            return "old bytes"
        return "new bytes"

    value, versions = read_with_versions(catalog, "up", ["p"], read, required=True)
    assert (value, versions) == ("new bytes", {"p": rewritten.materialization_id})


def test_own_writes_keep_other_assets_answers_but_not_their_own(
    tmp_path: Path, opens: list[str]
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    catalog.record(_record("a", "p"))
    catalog.read_versions("a", ["p"])
    opens.clear()
    catalog.record(_record("b", "p"))
    catalog.read_versions("a", ["p"])
    assert len(opens) == 1  # the write to b only
    newer = _record("a", "p")
    catalog.record(newer)
    assert catalog.read_versions("a", ["p"]) == {"p": newer.materialization_id}
    assert len(opens) == 3
    with catalog.connect() as con:  # a plain connection may write anything
        con.execute("UPDATE materializations SET status = 'failed' WHERE asset = 'b'")
    assert catalog.query("SELECT status FROM materializations WHERE asset = 'b'").rows() == [
        ("failed",)
    ]


def test_completing_settles_older_pending_attempts_on_the_same_open(
    tmp_path: Path, opens: list[str]
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    killed = _record("up", "00000", run_id="killed")
    catalog.begin(killed)  # its process died before it completed
    opens.clear()
    result = run_recorded(
        _step(catalog, tmp_path, "up", None), "00000", asset="up", code_version="v",
        run_id="r", profile="t", catalog=catalog,
    )  # fmt: skip
    assert len(opens) == 2
    status = catalog.query(
        "SELECT status, error FROM materializations WHERE materialization_id = ?",
        [killed.materialization_id],
    )
    assert status["status"][0] == STATUS_FAILED
    assert result.materialization_id in status["error"][0]


def test_the_file_is_free_between_accesses(tmp_path: Path) -> None:
    path = tmp_path / "catalog.duckdb"
    catalog = LineageCatalog(path)
    catalog.record(_record("up", "p"))
    catalog.read_versions("up", ["p"])
    # Another process may open it for writing at once: nothing of ours holds it.
    subprocess.run(
        [
            sys.executable,
            "-c",
            "import duckdb, sys; c = duckdb.connect(sys.argv[1]); "
            "c.execute('INSERT INTO catalog_info VALUES (?, ?)', ['outside', 'x']); c.close()",
            str(path),
        ],
        timeout=60,
        check=True,
    )
    assert catalog.query("SELECT value FROM catalog_info WHERE key = 'outside'").rows() == [("x",)]


def test_nested_and_threaded_accesses_each_get_the_file(tmp_path: Path) -> None:
    first = LineageCatalog(tmp_path / "one" / "catalog.duckdb")
    second = LineageCatalog(tmp_path / "two" / "catalog.duckdb")
    first.record(_record("a", "p"))
    second.record(_record("a", "q"))
    with first.connect() as con:
        # Another catalog read while this thread has one attached: a database of its own.
        assert second.current_partitions("a") == ["q"]
        assert con.execute("SELECT partition FROM materializations").fetchall() == [("p",)]
    errors: list[BaseException] = []

    def worker(index: int) -> None:
        try:
            for i in range(5):
                first.record(_record("a", f"t{index}-{i}"))
                first.read_versions("a", [f"t{index}-{i}"])
        except BaseException as error:  # reported below
            errors.append(error)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert errors == []
    assert len(first.current_partitions("a")) == 16
