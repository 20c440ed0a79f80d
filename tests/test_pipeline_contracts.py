"""Contracts of the shard step, the catalog and the CLI gate, on one small materialized graph.

Per-partition truth (each partition's own materialization), the corpus a KNN graph searches,
commits of output and lineage, a stage extending the catalog, old catalogs, automation, and
`megapairs check` as a CI gate.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import dagster as dg
import duckdb
import image_factory as factory
import numpy as np
import polars as pl
import pytest
from conftest import make_home, run_shards

from megapairs_assets.cli.main import main as megapairs
from megapairs_assets.definitions import build_definitions
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.knn.search import IndexSpec
from megapairs_assets.knn.step import build_corpus_index, corpus_complete_outcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import (
    SCHEMA_VERSION,
    IncompleteCommitError,
    LineageCatalog,
    MaterializationRecord,
    RowTable,
    read_with_versions,
    register_row_table,
    utc_now,
)
from megapairs_assets.orchestration.partitions import shard_asset_names, shard_partitions
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions
from resources.corpus import CorpusSourceResource

SHARDS = ["00000", "00001", "00002"]


@pytest.fixture(scope="module")
def graph(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path):
    root = tmp_path_factory.mktemp("contracts")
    corpus = root / "corpus"
    for index, shard in enumerate(SHARDS):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(5 + index, first_seed=20 * index)
        )
    home = make_home(root, demo_models_dir)
    source = CorpusSourceResource(kind="webdataset", path=str(corpus))
    defs = build_definitions("demo", home, {"corpus_source": source})
    instance = dg.DagsterInstance.ephemeral()
    result = run_shards(defs, instance, SHARDS)
    assert result.success
    return result, home, defs, instance, corpus


def _latest_metadata(instance: dg.DagsterInstance, asset: str, partition: str) -> dict:
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=dg.AssetKey(asset), asset_partitions=[partition]),
        limit=1,
    ).records
    assert records, f"no materialization of {asset}[{partition}]"
    metadata = records[0].asset_materialization.metadata
    return {key: getattr(value, "value", value) for key, value in metadata.items()}


@pytest.mark.parametrize(
    "asset", ["image_corpus", "clip_image_embeddings", "caption_text_knn", "mined_image_pairs"]
)
def test_each_partition_reports_its_own_row_count(graph, asset: str) -> None:
    _, home, _, instance, _ = graph
    layout = DataLayout(home)
    counts = []
    for shard in SHARDS:
        path = (
            layout.corpus_images(shard)
            if asset == "image_corpus"
            else layout.shard_table(asset, shard)
        )
        expected = pl.read_parquet(path).height
        assert _latest_metadata(instance, asset, shard)["dagster/row_count"] == expected
        counts.append(expected)
    assert len(set(counts)) > 1, "the shards were built with different sizes"


def test_pairs_preview_of_a_partition_shows_only_its_queries(graph) -> None:
    _, _, _, instance, _ = graph
    preview = _latest_metadata(instance, "mined_image_pairs", "00001")["preview"]
    query_cells = [record.data["query_id"] for record in preview.records]
    assert query_cells and all(cell.startswith("00001/") for cell in query_cells)
    assert {"query_caption", "target_caption"} <= set(preview.records[0].data)


def test_check_results_name_their_partitions(graph) -> None:
    result, *_ = graph
    evaluations = result.get_asset_check_evaluations()
    assert evaluations
    for evaluation in evaluations:
        checked = evaluation.metadata["partitions_checked"].value
        assert checked.split(", ") == SHARDS, evaluation.check_name


def test_a_step_over_a_range_logs_progress_over_its_partitions_and_names_what_it_counted(
    graph,
) -> None:
    result, _, _, instance, _ = graph
    messages = [e.message or "" for e in instance.all_logs(result.run_id)]
    done = f"mined_image_pairs partitions: {len(SHARDS)}/{len(SHARDS)} partitions (100%)"
    assert any(m.startswith(done) and "ETA" in m for m in messages)
    assert any(m.startswith("mined_image_pairs[00001]: ") and " pairs" in m for m in messages)


def test_knn_lineage_records_the_embedding_versions_it_read(graph) -> None:
    _, home, *_ = graph
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    embedded = catalog.latest_materialization_ids("clip_image_embeddings", SHARDS)
    knn = catalog.query(
        "SELECT input_versions, config FROM materializations "
        "WHERE asset = 'clip_image_knn' AND status = 'complete'"
    )
    import json

    for row in knn.iter_rows(named=True):
        inputs = json.loads(row["input_versions"])
        assert inputs == {f"clip_image_embeddings/{s}": embedded[s] for s in SHARDS}
        assert json.loads(row["config"])["missing_shards"] == []


def test_knn_searches_only_the_current_corpus(graph, tmp_path: Path) -> None:
    _, home, *_ = graph
    layout, catalog = DataLayout(home), LineageCatalog(DataLayout(home).catalog_path)
    source = source_named("clip_image")
    full = build_corpus_index(source, SHARDS, IndexSpec(), layout, catalog)
    # A shard deleted from the source: its tables are still on disk, but it is not searched.
    without = build_corpus_index(source, SHARDS[:2], IndexSpec(), layout, catalog)
    assert not any(i.startswith("00002/") for i in without.ids.tolist())
    assert any(i.startswith("00002/") for i in full.ids.tolist())
    assert without.corpus_version != full.corpus_version


def test_partial_corpus_fails_blocking_check_unless_allowed(graph) -> None:
    _, home, *_ = graph
    layout, catalog = DataLayout(home), LineageCatalog(DataLayout(home).catalog_path)
    corpus = build_corpus_index(
        source_named("dino_image"), [*SHARDS, "00009"], IndexSpec(), layout, catalog
    )
    assert corpus.missing_shards == ["00009"]
    refused = corpus_complete_outcome(corpus, allow_partial_corpus=False)
    assert not refused.passed and "00009" in refused.detail
    allowed = corpus_complete_outcome(corpus, allow_partial_corpus=True)
    assert allowed.passed and "partial corpus allowed" in allowed.detail


def test_a_table_without_a_completed_record_is_refused(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    done = MaterializationRecord("clip_image_embeddings", "00000", "r1", "v", "demo", utc_now(), 0)
    catalog.record(done)
    assert catalog.read_versions("clip_image_embeddings", ["00000"]) == {
        "00000": done.materialization_id
    }
    # A later step wrote its table, then was killed before its catalog record completed.
    killed = MaterializationRecord(
        "clip_image_embeddings", "00000", "r2", "v", "demo", utc_now(), 0
    )
    catalog.begin(killed)
    with pytest.raises(IncompleteCommitError, match="00000 \\(pending\\)"):
        catalog.read_versions("clip_image_embeddings", ["00000"])
    catalog.complete(killed)  # re-materialized: readable again, at the new version
    assert catalog.read_versions("clip_image_embeddings", ["00000"])["00000"] == (
        killed.materialization_id
    )


def test_a_reader_records_the_version_it_actually_read(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    first = MaterializationRecord("a", "p", "r1", "v", "demo", utc_now(), 0)
    catalog.record(first)
    second = MaterializationRecord("a", "p", "r2", "v", "demo", utc_now(), 0)
    reads = []

    def read() -> str:
        reads.append(1)
        if len(reads) == 1:  # another run replaces the table while we read it
            catalog.record(second)
            return "old bytes"
        return "new bytes"

    value, versions = read_with_versions(catalog, "a", ["p"], read)
    assert (value, versions) == ("new bytes", {"p": second.materialization_id})


TOY_ROWS = register_row_table(
    RowTable("toy_rows", (("item", "VARCHAR"), ("shard", "VARCHAR"), ("score", "DOUBLE")))
)
TOY_STAGE = Stage("toy_asset", "toy-v1", {"toy_scores_positive": "scores > 0"})


def _toy_step(shard: str, catalog: LineageCatalog, scale: float) -> StepResult:
    from megapairs_assets.lib.quality import outcome

    rows = pl.DataFrame({"item": [f"{shard}/a", f"{shard}/b"], "shard": shard, "score": scale})
    return StepResult(
        partition=shard,
        row_counts={"items": rows.height},
        rows={TOY_ROWS.name: rows},
        outcomes=[outcome("toy_scores_positive", [] if scale > 0 else ["x"], "scores > 0")],
    )


def test_a_new_stage_declares_its_own_row_table(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")

    def build(scale: float) -> dg.AssetsDefinition:
        @dg.asset(
            name="toy_asset", partitions_def=shard_partitions, check_specs=TOY_STAGE.check_specs()
        )
        def toy_asset(context):  # unannotated: this module postpones annotations

            return materialize_partitions(
                context, TOY_STAGE, lambda s: _toy_step(s, catalog, scale), catalog, "test"
            )

        return toy_asset

    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions("shards", ["s1", "s2"])
    for scale in (1.0, 2.0):
        for shard in ("s1", "s2"):
            assert dg.materialize([build(scale)], instance=instance, partition_key=shard).success
    rows = catalog.query("SELECT shard, score, count(*) AS n FROM toy_rows GROUP BY ALL ORDER BY 1")
    assert rows.to_dicts() == [
        {"shard": "s1", "score": 2.0, "n": 2},
        {"shard": "s2", "score": 2.0, "n": 2},
    ]
    failed = dg.materialize(
        [build(-1.0)], instance=instance, partition_key="s1", raise_on_error=False
    )
    assert not failed.success  # the blocking check failed, naming its partition
    (evaluation,) = failed.get_asset_check_evaluations()
    assert evaluation.metadata["failing_partitions"].value == "s1"


# The catalog as the mining half's first release created it (schema v1).
_V1_SCHEMA = """
CREATE TABLE materializations (materialization_id VARCHAR PRIMARY KEY, asset VARCHAR NOT NULL,
  partition VARCHAR, run_id VARCHAR, code_version VARCHAR, profile VARCHAR, config VARCHAR,
  model_ids VARCHAR, input_versions VARCHAR, row_counts VARCHAR, output_paths VARCHAR,
  started_at TIMESTAMP, duration_s DOUBLE);
CREATE TABLE image_lineage (image_id VARCHAR, shard VARCHAR, key VARCHAR, source_uri VARCHAR,
  caption VARCHAR, content_hash VARCHAR, width INTEGER, height INTEGER,
  materialization_id VARCHAR);
CREATE TABLE quarantine_log (stage VARCHAR, shard VARCHAR, key VARCHAR, source_uri VARCHAR,
  reason VARCHAR, detail VARCHAR, materialization_id VARCHAR);
INSERT INTO materializations VALUES ('m1', 'image_corpus', '00000', 'r', 'corpus-v1', 'demo',
  '{}', '{}', '{}', '{}', '{}', '2026-01-01 00:00:00', 1.0);
INSERT INTO image_lineage VALUES ('00000/a', '00000', 'a', '/c/00000.tar#a.jpg', 'a cat', 'h',
  32, 32, 'm1');
"""


def test_a_catalog_from_before_the_change_opens_and_reads(tmp_path: Path) -> None:
    import megapairs_assets.corpus.step  # noqa: F401  (declares image_lineage)

    path = tmp_path / "catalog.duckdb"
    con = duckdb.connect(str(path))
    con.execute(_V1_SCHEMA)
    con.close()
    catalog = LineageCatalog(path)
    assert catalog.latest_materialization_ids("image_corpus", ["00000"]) == {"00000": "m1"}
    assert catalog.read_versions("image_corpus", ["00000"]) == {"00000": "m1"}
    assert catalog.schema_version() == SCHEMA_VERSION
    image = catalog.query("SELECT caption FROM image_lineage WHERE image_id = '00000/a'")
    assert image["caption"].to_list() == ["a cat"]


def test_automation_requests_dependants_of_a_changed_partition(graph) -> None:
    _, _, defs, instance, _ = graph
    before = dg.evaluate_automation_conditions(defs=defs, instance=instance)
    assert before.get_num_requested(dg.AssetKey("clip_image_embeddings")) == 0
    # Re-materialize one shard's corpus: its embeddings are now stale, the others are not.
    assert run_shards(defs, instance, ["00001"], job_name="corpus_only").success
    after = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=before.cursor)
    for source in ("clip_image", "dino_image", "caption_text"):
        key = dg.AssetKey(f"{source}_embeddings")
        assert after.get_requested_partitions(key) == {"00001"}
    assert run_shards(defs, instance, ["00001"], job_name="corpus_and_embeddings").success
    settled = dg.evaluate_automation_conditions(defs=defs, instance=instance, cursor=after.cursor)
    assert settled.get_num_requested(dg.AssetKey("clip_image_embeddings")) == 0


def test_check_command_on_existing_data(graph, tmp_path: Path, capsys, monkeypatch) -> None:
    _, home, *_ = graph
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    assert megapairs(["check", "--existing", "--home", str(copy)]) == 0
    clean = capsys.readouterr().out
    assert "0 blocking failures" in clean

    layout = DataLayout(copy)
    # A non-unit embedding in shard 00001.
    path = layout.shard_table("clip_image_embeddings", "00001")
    table = pl.read_parquet(path)
    vectors = np.array(table["embedding"].to_list(), dtype=np.float32)
    vectors[0] *= 3.0
    table.with_columns(
        pl.Series("embedding", vectors.astype(np.float16).tolist(), dtype=table["embedding"].dtype)
    ).write_parquet(path)
    # A self neighbour in dino_image_knn 00002.
    path = layout.shard_table("dino_image_knn", "00002")
    knn = pl.read_parquet(path)
    knn.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.col("query_id"))
        .otherwise(pl.col("neighbor_id"))
        .alias("neighbor_id")
    ).write_parquet(path)
    # An out-of-band pair in 00000.
    path = layout.shard_table("mined_image_pairs", "00000")
    pairs = pl.read_parquet(path)
    pairs.with_columns(
        pl.when(pl.int_range(pl.len()) == 0)
        .then(pl.lit(0.01))
        .otherwise(pl.col("score_caption_text"))
        .cast(pairs["score_caption_text"].dtype)
        .alias("score_caption_text")
    ).write_parquet(path)

    junit = tmp_path / "reports" / "checks.xml"
    argv = ["check", "--existing", "--home", str(copy), "--junit-xml", str(junit)]
    assert megapairs(argv) == 1
    out = capsys.readouterr().out
    failed = {tuple(line.split()[:4]) for line in out.splitlines() if " FAIL" in line}
    assert ("clip_image_embeddings", "embeddings_unit_norm", "00001", "FAIL") in failed
    assert ("dino_image_knn", "knn_no_self_neighbors", "00002", "FAIL") in failed
    assert ("mined_image_pairs", "pairs_in_band", "00000", "FAIL") in failed
    # The same results for a CI system's test report: each failure a failed test case.
    from xml.etree import ElementTree

    suites = ElementTree.parse(junit).getroot()
    failing = {
        (case.get("classname"), case.get("name"))
        for case in suites.iter("testcase")
        if case.find("failure") is not None
    }
    assert {(a, f"{c}[{p}]") for a, c, p, status in failed if status == "FAIL"} == failing
    cases = len(list(suites.iter("testcase")))
    assert cases == sum(int(suite.get("tests")) for suite in suites) > len(failing)
    assert megapairs(["check", "--existing", "--home", str(tmp_path / "nowhere")]) == 2
    assert not (tmp_path / "nowhere").exists()  # read-only: nothing created
    # Without --home: the data the pipeline wrote under $MEGAPAIRS_HOME.
    capsys.readouterr()
    monkeypatch.setenv("MEGAPAIRS_HOME", str(copy))
    assert megapairs(["check", "--existing"]) == 1
    assert ("mined_image_pairs", "pairs_in_band", "00000", "FAIL") in {
        tuple(line.split()[:4]) for line in capsys.readouterr().out.splitlines()
    }

    # A materialized table that went missing fails the gate; a retired shard is not checked.
    layout.shard_table("caption_text_knn", "00001").unlink()
    LineageCatalog(layout.catalog_path).retire_partitions(
        ["00000"], shard_asset_names(build_definitions(home=copy).assets or [])
    )
    assert megapairs(["check", "--existing"]) == 1
    # By default: one line per (asset, check) with its pass count, each failing partition below.
    lines = capsys.readouterr().out.splitlines()
    rows = [tuple(line.split()[:4]) for line in lines]
    assert ("caption_text_knn", "table_present", "00001", "FAIL") in rows
    assert "caption_text_knn table_present 0/1 partitions pass, 1 FAIL" in {
        " ".join(line.split()) for line in lines
    }
    assert not [row for row in rows if row[2:3] == ("00000",)]
    assert not [row for row in rows if row[3:4] == ("pass",)]  # passing partitions: --verbose
    pairs_in_band = [row for row in rows if row[:2] == ("mined_image_pairs", "pairs_in_band")]
    assert len(pairs_in_band) == 1 and pairs_in_band[0][3] == "partitions"
    # --verbose: one line per (asset, check, partition), passing ones included.
    assert megapairs(["check", "--existing", "--verbose"]) == 1
    rows = [tuple(line.split()[:4]) for line in capsys.readouterr().out.splitlines()]
    assert ("caption_text_knn", "table_present", "00001", "FAIL") in rows
    assert not [row for row in rows if row[2:3] == ("00000",)]
    assert ("mined_image_pairs", "pairs_in_band", "00001", "pass") in rows
    # --select narrows --existing to one job's assets; an unknown job lists the jobs.
    assert megapairs(["check", "--existing", "--select", "corpus_only"]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()]
    checked = [row for row in rows if row[3:5] == ["partitions", "pass"]]
    assert checked and {row[0] for row in checked} == {"image_corpus"}
    assert megapairs(["check", "--existing", "--select", "nonsense"]) == 2
    assert "jobs: corpus_and_embeddings, corpus_only" in capsys.readouterr().err


def test_check_junit_report_keeps_warnings_passing_and_a_failed_run_as_an_error(
    tmp_path: Path, capsys
) -> None:
    from xml.etree import ElementTree

    from megapairs_assets.cli.check import EXIT_OK, CheckRow, report

    rows = [
        CheckRow("image_corpus", "corpus_ids_unique", "00000", True, True, ""),
        CheckRow("image_corpus", "content_unique", "00000", False, False, "00000/1 repeats"),
    ]
    path = tmp_path / "junit.xml"
    assert report(rows, junit_xml=path, run_error="run abc failed") == EXIT_OK
    root = ElementTree.parse(path).getroot()
    cases = {case.get("name"): case for case in root.iter("testcase")}
    assert set(cases) == {"corpus_ids_unique[00000]", "content_unique[00000]", "run"}
    warned = cases["content_unique[00000]"]
    assert warned.find("failure") is None
    assert warned.findtext("system-out") == "warning: 00000/1 repeats"
    assert cases["run"].find("error").get("message") == "run abc failed"
    capsys.readouterr()


def test_check_report_counts_passes_per_check_and_lists_each_failure(capsys) -> None:
    from megapairs_assets.cli.check import EXIT_CHECK_FAILED, EXIT_OK, CheckRow, report

    shards = [f"{i:05d}" for i in range(18)]
    rows = [CheckRow("pairs", "in_band", s, True, True, "") for s in shards]
    rows[3] = CheckRow("pairs", "in_band", "00003", False, True, "2 pairs out of band: p-1, p-2")
    rows += [CheckRow("corpus", "unique", s, s != "00007", False, "") for s in shards]
    assert report(rows) == EXIT_CHECK_FAILED
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "pairs in_band 17/18 partitions pass, 1 FAIL" in lines
    assert "pairs in_band 00003 FAIL 2 pairs out of band: p-1, p-2" in lines
    assert "corpus unique 17/18 partitions pass, 1 warn" in lines
    assert "corpus unique 00007 warn" in lines
    assert len(lines) == 2 + 4 + 2  # header, rule; two checks, two failures; blank, totals
    assert lines[-1] == "36 check results: 34 passed, 1 blocking failure, 1 warning"
    # --verbose: every partition, in the same form as a failure's line.
    assert report(rows[18:], verbose=True) == EXIT_OK  # warnings alone never fail the command
    lines = [" ".join(line.split()) for line in capsys.readouterr().out.splitlines()]
    assert "corpus unique 00000 pass" in lines and "corpus unique 00007 warn" in lines
    assert len(lines) == 2 + 18 + 2


def test_a_sample_check_never_uses_the_configured_data_root(monkeypatch) -> None:
    import os

    from megapairs_assets.cli.check import sample_environment

    monkeypatch.setenv("MEGAPAIRS_DATA_ROOT", "s3://production/tables")
    monkeypatch.setenv("MEGAPAIRS_LINEAGE_CATALOG", "ducklake:postgres:dbname=lineage")
    monkeypatch.setenv("MEGAPAIRS_DEPLOYMENT", "cluster")
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    with sample_environment():
        assert "MEGAPAIRS_DATA_ROOT" not in os.environ
        assert "MEGAPAIRS_LINEAGE_CATALOG" not in os.environ
        assert os.environ["MEGAPAIRS_DEPLOYMENT"] == "embedded"
        assert os.environ["MEGAPAIRS_PROFILE"] == "demo"  # the profile's models still apply
        from resources.profiles import build_resources

        layout = build_resources("demo", Path("/tmp/sample-home"))["storage"].layout()
        assert str(layout.data_dir).startswith("/tmp/sample-home")
    assert os.environ["MEGAPAIRS_DATA_ROOT"] == "s3://production/tables"
    assert os.environ["MEGAPAIRS_DEPLOYMENT"] == "cluster"


def test_mining_from_a_graph_built_before_a_retirement_leaves_the_retired_images_out(
    graph, tmp_path: Path
) -> None:
    """A shard retired after the KNN graphs were built: re-mining another shard from those
    graphs passes its checks and names no image of the retired shard."""
    from megapairs_assets.mining.step import mine_shard
    from resources.profiles import build_resources

    _, home, *_ = graph
    copy = tmp_path / "home"
    shutil.copytree(home, copy, symlinks=True)
    layout = DataLayout(copy)
    catalog = LineageCatalog(layout.catalog_path)
    knn = pl.read_parquet(layout.shard_table("clip_image_knn", "00000"))
    assert knn.filter(pl.col("neighbor_id").str.starts_with("00002/")).height
    catalog.retire_partitions(["00002"], ["image_corpus"])
    params = build_resources("demo", copy)["mining"].params()
    logged: list[str] = []

    result = mine_shard("00000", params, layout, catalog, log=logged.append)

    pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", "00000"))
    named = pairs["target_id"].to_list() + pairs["hard_negative_ids"].explode().to_list()
    assert pairs.height and not [i for i in named if i.startswith("00002/")]
    assert all(o.passed for o in result.outcomes), [o for o in result.outcomes if not o.passed]
    assert result.metadata["knn_rows_outside_corpus"] > 0
    assert any("no longer in the corpus" in line for line in logged)


def test_each_materialization_links_to_its_catalog_record_and_shows_its_columns(graph) -> None:
    _, home, _, instance, _ = graph
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    metadata = _latest_metadata(instance, "mined_image_pairs", "00001")
    record_id = metadata["lineage_materialization_id"]
    row = catalog.query(
        "SELECT asset, partition, status FROM materializations WHERE materialization_id = ?",
        [record_id],
    )
    assert row.rows() == [("mined_image_pairs", "00001", "complete")]
    assert metadata["lineage"] == "megapairs lineage 'mined_image_pairs[00001]'"
    assert set(metadata["input_versions"]) == {
        f"{knn}/00001" for knn in ("clip_image_knn", "dino_image_knn", "caption_text_knn")
    }
    columns = [c.name for c in metadata["dagster/column_schema"].columns]
    # Each column says what it holds (the descriptions travel with the Dagster event).
    assert all(c.description for c in metadata["dagster/column_schema"].columns)
    assert (
        columns
        == pl.read_parquet_schema(
            DataLayout(home).shard_table("mined_image_pairs", "00001")
        ).names()
    )
    embedding = _latest_metadata(instance, "clip_image_embeddings", "00000")
    assert embedding["model_ids"] and "embedding" in {
        c.name for c in embedding["dagster/column_schema"].columns
    }
