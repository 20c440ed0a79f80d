"""Scale-out on a real PostgreSQL (pgserver's bundled server, Unix socket, started here):

- the lineage catalog on DuckLake (catalog database in Postgres, data files in a directory)
  takes lineage from several processes writing at once and loses or duplicates nothing, and
  `lineage_report` prints a full chain from it;
- a Dagster instance stored in Postgres (dagster-postgres) runs a small partitioned graph with
  the multiprocess executor (4 steps at once) and reads its run history back.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import time
from collections.abc import Iterator
from dataclasses import dataclass, replace
from pathlib import Path
from urllib.parse import parse_qs, urlparse

import dagster as dg
import polars as pl
import pytest
from dagster._core.storage.tags import (
    ASSET_PARTITION_RANGE_END_TAG,
    ASSET_PARTITION_RANGE_START_TAG,
)

from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.definitions import build_definitions
from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lineage.catalog import (
    SCHEMA_VERSION,
    LineageCatalog,
    MaterializationRecord,
    ReadOnlyQueryError,
    is_ducklake_url,
    utc_now,
)
from megapairs_assets.lineage.report import lineage_report
from megapairs_assets.mining.pair_table import PAIR_LINEAGE
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.cluster import ClusterSettings
from resources.corpus import CorpusSourceResource

pgserver = pytest.importorskip("pgserver")
pytest.importorskip("duckdb_extension_ducklake")


@dataclass(frozen=True)
class Postgres:
    uri: str  # postgresql://postgres:@/postgres?host=<socket dir>
    socket_dir: str

    def libpq(self, dbname: str = "postgres") -> str:
        return f"dbname={dbname} host={self.socket_dir} user=postgres"


@pytest.fixture(scope="module")
def postgres(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Postgres]:
    server = pgserver.get_server(tmp_path_factory.mktemp("pgdata"), cleanup_mode="stop")
    uri = server.get_uri()
    socket_dir = parse_qs(urlparse(uri).query)["host"][0]
    try:
        yield Postgres(uri, socket_dir)
    finally:
        server.cleanup()


def _create_database(postgres: Postgres, name: str) -> str:
    """A fresh database on the shared server (each test gets its own catalog)."""
    import psycopg2

    con = psycopg2.connect(postgres.libpq())
    con.autocommit = True
    with con.cursor() as cur:
        cur.execute(f'CREATE DATABASE "{name}"')
    con.close()
    return name


def _lake(postgres: Postgres, tmp_path: Path, dbname: str) -> tuple[str, str]:
    url = f"ducklake:postgres:{postgres.libpq(_create_database(postgres, dbname))}"
    return url, str(tmp_path / "lake-data")


def _record(asset: str, partition: str, **inputs: str) -> MaterializationRecord:
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id="run-scaleout",
        code_version="v1",
        profile="cluster-test",
        started_at=utc_now(),
        duration_s=0.01,
        input_versions=inputs,
    )


def _images(shard: str, n: int, generation: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "image_id": [f"{shard}/{i:04d}" for i in range(n)],
            "shard": [shard] * n,
            "key": [f"{i:04d}" for i in range(n)],
            "source_uri": [f"s3://corpus/{shard}.tar#{i:04d}.jpg" for i in range(n)],
            "caption": [f"generation {generation}"] * n,
            "content_hash": [f"{generation:02d}{shard}{i:04d}".ljust(64, "0") for i in range(n)],
            "width": [64] * n,
            "height": [48] * n,
        }
    )


_WRITES_PER_PROCESS = 3
_ROWS_PER_WRITE = 7


def _writer(url: str, data_path: str, shard: str, start: mp.synchronize.Event) -> None:
    """One step process: begins and completes materializations of its shard, one fails."""
    catalog = LineageCatalog(url, data_path=data_path, lock_timeout_s=60)
    catalog.query("SELECT 1")  # attach before the start signal, so the writes overlap
    start.wait(timeout=60)
    for generation in range(_WRITES_PER_PROCESS):
        record = _record("image_corpus", shard)
        catalog.begin(record)
        catalog.complete(
            record, rows={IMAGE_LINEAGE.name: _images(shard, _ROWS_PER_WRITE, generation)}
        )
    broken = _record("image_corpus", f"{shard}-broken")
    catalog.begin(broken)
    catalog.fail(broken.materialization_id)


def test_ducklake_catalog_takes_four_writer_processes_without_loss(
    postgres: Postgres, tmp_path: Path
) -> None:
    url, data_path = _lake(postgres, tmp_path, "lineage_writers")
    assert is_ducklake_url(url)
    shards = [f"{i:05d}" for i in range(4)]
    ctx = mp.get_context("spawn")
    start = ctx.Event()
    procs = [ctx.Process(target=_writer, args=(url, data_path, s, start)) for s in shards]
    for proc in procs:
        proc.start()
    time.sleep(0.5)
    start.set()
    for proc in procs:
        proc.join(timeout=180)
        assert proc.exitcode == 0, f"writer exited with {proc.exitcode}"

    catalog = LineageCatalog(url, data_path=data_path)
    history = catalog.query("SELECT materialization_id, partition, status FROM materializations")
    # Every begin/complete/fail landed exactly once: no id lost, none twice.
    assert history.height == len(shards) * (_WRITES_PER_PROCESS + 1)
    assert history["materialization_id"].n_unique() == history.height
    statuses = dict(history.group_by("status").len().rows())
    assert statuses == {
        "complete": len(shards) * _WRITES_PER_PROCESS,
        "failed": len(shards),
    }
    # Row tables hold exactly the newest materialization of each shard.
    latest = catalog.latest_materialization_ids("image_corpus", shards)
    rows = catalog.query(
        "SELECT shard, materialization_id, caption, count(*) AS n FROM image_lineage "
        "GROUP BY ALL ORDER BY shard"
    )
    assert rows.rows() == [
        (s, latest[s], f"generation {_WRITES_PER_PROCESS - 1}", _ROWS_PER_WRITE) for s in shards
    ]
    assert catalog.query("SELECT count(DISTINCT image_id) AS n FROM image_lineage")["n"][0] == (
        len(shards) * _ROWS_PER_WRITE
    )
    assert catalog.schema_version() == SCHEMA_VERSION
    catalog.close()


def test_lineage_report_prints_a_full_chain_from_ducklake(
    postgres: Postgres, tmp_path: Path
) -> None:
    url, data_path = _lake(postgres, tmp_path, "lineage_report")
    catalog = LineageCatalog(url, data_path=data_path)
    corpus = _record("image_corpus", "00000")
    catalog.record(corpus, rows={IMAGE_LINEAGE.name: _images("00000", 3, 0)})
    embedding = _record(
        "clip_image_embeddings", "00000", **{"image_corpus/00000": corpus.materialization_id}
    )
    catalog.record(embedding)
    mined = _record(
        "mined_image_pairs",
        "00000",
        **{"clip_image_embeddings/00000": embedding.materialization_id},
    )
    pair = pl.DataFrame(
        {
            "pair_id": ["00000/0000-00000/0002"],
            "query_id": ["00000/0000"],
            "target_id": ["00000/0002"],
            "shard": ["00000"],
            "sources": [["clip_image"]],
            "scores": ['{"score_clip_image": 0.9}'],
            "hard_negative_ids": [["00000/0000", "00000/0001"]],
            "knn_versions": ["{}"],
        }
    )
    catalog.record(mined, rows={PAIR_LINEAGE.name: pair})

    report = lineage_report(catalog, "00000/0000-00000/0002")
    assert report is not None
    chain = [
        line.strip().split(" materialization ")[0]
        for line in report.splitlines()
        if " materialization " in line
    ]
    assert chain == [
        "mined_image_pairs[00000]",
        "clip_image_embeddings[00000]",
        "image_corpus[00000]",
    ]
    # The chain nests: each input is indented under what read it.
    indents = [
        len(line) - len(line.lstrip())
        for line in report.splitlines()
        if " materialization " in line
    ]
    assert indents == sorted(indents) and len(set(indents)) == 3
    assert "source  s3://corpus/00000.tar#0000.jpg" in report
    assert "source  s3://corpus/00000.tar#0002.jpg" in report
    catalog.close()


# -- Dagster instance on Postgres ------------------------------------------------------------

_SHARDS = ["00000", "00001", "00002", "00003"]


def scaleout_job() -> dg.JobDefinition:
    """The corpus + embeddings job on the test's corpus and data root, DuckLake lineage.

    Module level so the multiprocess executor can rebuild it in every step process (the
    settings travel in environment variables set by the test).
    """
    settings = ClusterSettings.from_env()
    home = Path(os.environ["SCALEOUT_TEST_HOME"])
    defs = build_definitions(
        "demo",
        home,
        {
            "corpus_source": CorpusSourceResource(
                kind="webdataset", path=os.environ["SCALEOUT_TEST_CORPUS"]
            ),
            **settings.resource_overrides(home),
        },
    )
    return defs.resolve_job_def("corpus_and_embeddings")


@pytest.mark.slow
def test_dagster_instance_on_postgres_runs_parallel_steps_and_reads_history_back(
    postgres: Postgres,
    tmp_path: Path,
    demo_models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    pytest.importorskip("dagster_postgres")
    import image_factory as factory
    from conftest import make_home

    corpus = tmp_path / "corpus"
    for index, shard in enumerate(_SHARDS):
        factory.write_wds_shard(corpus / f"{shard}.tar", factory.good_items(3, 10 * index))
    home = make_home(tmp_path, demo_models_dir)
    instance_db = _create_database(postgres, "dagster_instance")
    lake_url, lake_data = _lake(postgres, tmp_path, "dagster_lineage")
    instance_dir = tmp_path / "dagster_home"
    instance_dir.mkdir()
    # SQLAlchemy 2.1 defaults postgresql:// to psycopg 3; dagster-postgres installs psycopg2.
    postgres_url = f"postgresql+psycopg2://postgres:@/{instance_db}?host={postgres.socket_dir}"
    (instance_dir / "dagster.yaml").write_text(
        "storage:\n  postgres:\n    postgres_url:\n      env: MEGAPAIRS_POSTGRES_URL\n"
    )
    for name, value in {
        "MEGAPAIRS_DEPLOYMENT": "cluster",
        "MEGAPAIRS_POSTGRES_URL": postgres_url,
        "MEGAPAIRS_LINEAGE_CATALOG": lake_url,
        "MEGAPAIRS_LINEAGE_DATA_PATH": lake_data,
        "SCALEOUT_TEST_HOME": str(home),
        "SCALEOUT_TEST_CORPUS": str(corpus),
    }.items():
        monkeypatch.setenv(name, value)

    with dg.DagsterInstance.from_config(str(instance_dir)) as instance:
        assert type(instance.run_storage).__name__ == "PostgresRunStorage"
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, _SHARDS)
        with dg.execute_job(
            dg.reconstructable(scaleout_job),
            instance=instance,
            run_config={"execution": {"config": {"multiprocess": {"max_concurrent": 4}}}},
            tags={
                ASSET_PARTITION_RANGE_START_TAG: _SHARDS[0],
                ASSET_PARTITION_RANGE_END_TAG: _SHARDS[-1],
            },
        ) as result:
            assert result.success
            run_id = result.run_id

    # A new instance object reads the history back from Postgres alone.
    with dg.DagsterInstance.from_config(str(instance_dir)) as reread:
        (run,) = reread.get_runs()
        assert run.run_id == run_id and run.status == dg.DagsterRunStatus.SUCCESS
        starts = reread.all_logs(run_id, of_type=dg.DagsterEventType.STEP_START)
        ends = reread.all_logs(run_id, of_type=dg.DagsterEventType.STEP_SUCCESS)
        spans = {e.step_key: [e.timestamp, None] for e in starts}
        for event in ends:
            spans[event.step_key][1] = event.timestamp
        assert len(spans) == 4  # image_corpus and three embedding steps, one process each
        overlap = max(
            sum(1 for s, e in spans.values() if s <= start < e) for start, _ in spans.values()
        )
        assert overlap >= 2, f"embedding steps ran one at a time: {spans}"
        for asset in ("image_corpus", "clip_image_embeddings", "caption_text_embeddings"):
            assert reread.get_materialized_partitions(dg.AssetKey(asset)) == set(_SHARDS), asset

    # Lineage from the parallel step processes went to DuckLake, one record per step/shard.
    catalog = LineageCatalog(lake_url, data_path=lake_data)
    recorded = catalog.query(
        "SELECT asset, count(*) AS n FROM materializations WHERE run_id = ? AND "
        "status = 'complete' GROUP BY asset ORDER BY asset",
        [run_id],
    )
    assert dict(recorded.rows()) == {
        "caption_text_embeddings": 4,
        "clip_image_embeddings": 4,
        "dino_image_embeddings": 4,
        "image_corpus": 4,
    }
    assert catalog.query("SELECT count(*) AS n FROM image_lineage")["n"][0] == 12
    catalog.close()


def test_ducklake_settles_only_the_pending_attempts_whose_run_has_ended(
    postgres: Postgres, tmp_path: Path
) -> None:
    """Without a machine-wide lock, a pending record may be a live step elsewhere: a new
    attempt settles an older one only when its run is over (or is this run's earlier try)."""
    url, data_path = _lake(postgres, tmp_path, "settle_pending")
    catalog = LineageCatalog(url, data_path=data_path)
    older = {}
    for run_id in ("dead-run", "live-run", "retried-run"):
        record = replace(_record("image_corpus", "00000"), run_id=run_id)
        catalog.begin(record)
        older[run_id] = record.materialization_id
    done = _record("image_corpus", "00001")
    catalog.record(done)
    # A record that completed meanwhile is never turned into a failure.
    assert catalog.settle_pending([done.materialization_id], "late") == []

    messages: list[str] = []
    result = run_recorded(
        lambda partition: StepResult(partition=partition),
        "00000",
        asset="image_corpus",
        code_version="v1",
        run_id="retried-run",
        profile="cluster-test",
        catalog=catalog,
        log=messages.append,
        run_finished=lambda run_id: run_id == "dead-run",
    )
    status = dict(
        catalog.query("SELECT materialization_id, status FROM materializations").iter_rows()
    )
    assert status[older["dead-run"]] == "failed"
    assert status[older["retried-run"]] == "failed"
    assert status[older["live-run"]] == "pending"
    assert status[result.materialization_id] == "complete"
    assert status[done.materialization_id] == "complete"
    assert any("2 earlier attempt(s)" in line for line in messages)
    catalog.close()


def test_ducklake_read_only_query_refuses_statements_that_could_write(
    postgres: Postgres, tmp_path: Path
) -> None:
    url, data_path = _lake(postgres, tmp_path, "read_only_sql")
    catalog = LineageCatalog(url, data_path=data_path)
    catalog.record(_record("image_corpus", "00000"))
    count = "SELECT count(*) AS n FROM materializations"
    assert catalog.read_only_query(count)["n"].to_list() == [1]
    assert catalog.read_only_query("DESCRIBE materializations").height > 5
    for sql in (
        "SELECT 1; COMMIT; DELETE FROM materializations",
        "DELETE FROM materializations",
        "COMMIT",
    ):
        with pytest.raises(ReadOnlyQueryError):
            catalog.read_only_query(sql)
    assert catalog.read_only_query(count)["n"].to_list() == [1]
    catalog.close()
