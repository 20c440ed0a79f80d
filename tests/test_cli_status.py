"""`megapairs status`: each asset's partitions by state, from the catalog and the partition sets."""

from __future__ import annotations

import json
import time
from dataclasses import replace
from pathlib import Path

import dagster as dg
import polars as pl
import pytest

from megapairs_assets.cli.main import main
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)
from megapairs_assets.lineage.status import asset_status, format_status
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME


def _record(asset: str, partition: str, **inputs: str) -> MaterializationRecord:
    time.sleep(0.001)  # distinct started_at: the newest record is the partition's state
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id="r",
        code_version="v1",
        profile="test",
        started_at=utc_now(),
        duration_s=0.1,
        materialization_id=new_materialization_id(),
        input_versions=inputs,
    )


def _quarantine(stage: str, shard: str, n: int) -> dict[str, pl.DataFrame]:
    return {
        "quarantine_log": pl.DataFrame(
            {
                "stage": [stage] * n,
                "shard": [shard] * n,
                "key": [f"k{i}" for i in range(n)],
                "source_uri": [None] * n,
                "reason": ["decode_error"] * n,
                "detail": ["bad"] * n,
            },
            schema_overrides={"source_uri": pl.String},
        )
    }


def _world(catalog: LineageCatalog) -> None:
    """corpus 00000..00002 complete (00001 twice: its first version is read downstream),
    00003 registered but never run; pairs: 00000 fine, 00001 read the old corpus version,
    00002 failed checks; a failed and a pending partition of the knn asset."""
    corpus = {}
    for shard in ("00000", "00001", "00002"):
        corpus[shard] = _record("image_corpus", shard)
        catalog.record(corpus[shard], rows=_quarantine("image_corpus", shard, 2))
    for shard in ("00000", "00001", "00002"):
        pairs = _record(
            "mined_image_pairs",
            shard,
            **{f"image_corpus/{shard}": corpus[shard].materialization_id},
        )
        if shard == "00002":
            pairs = replace(pairs, failed_checks=("pairs_inside_band",))
        catalog.record(pairs)
    # Re-materialized after pairs read it, now with no quarantined input.
    catalog.record(_record("image_corpus", "00001"), rows=_quarantine("image_corpus", "00001", 0))
    failed = _record("clip_image_knn", "00000")
    catalog.begin(failed)
    catalog.fail(failed.materialization_id, error="RuntimeError: faiss ran out of memory\ntrace")
    catalog.begin(_record("clip_image_knn", "00001"))  # pending: killed, or running
    old = _record("image_corpus", "gone")
    catalog.record(old)
    catalog.retire_partitions(["gone"], ["image_corpus"])


def test_asset_status_counts_each_state_and_names_the_problems(tmp_path: Path) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    _world(catalog)
    shards = ["00000", "00001", "00002", "00003"]
    report = {
        s.asset: s
        for s in asset_status(
            catalog,
            ["image_corpus", "clip_image_knn", "mined_image_pairs", "triplets"],
            {"image_corpus": shards, "clip_image_knn": shards, "mined_image_pairs": shards},
        )
    }
    corpus = report["image_corpus"]
    assert (corpus.expected, corpus.complete, corpus.missing, corpus.retired) == (4, 3, 1, 1)
    # The re-materialized 00001 has no quarantine rows now: only the current ones count.
    assert corpus.quarantined == 4
    pairs = report["mined_image_pairs"]
    assert (pairs.complete, pairs.failing_checks, pairs.inputs_changed, pairs.missing) == (
        3,
        1,
        1,
        1,
    )
    knn = report["clip_image_knn"]
    assert (knn.complete, knn.failed, knn.pending, knn.missing) == (0, 1, 1, 2)
    assert not knn.healthy and not pairs.healthy
    assert report["triplets"].expected is None and report["triplets"].complete == 0
    text = format_status(list(report.values()))
    assert "clip_image_knn[00000]: failed: RuntimeError: faiss ran out of memory" in text
    assert "trace" not in text  # the first line of the error only
    assert "clip_image_knn[00001]: pending since" in text
    assert "mined_image_pairs[00002]: failed blocking checks pairs_inside_band" in text
    assert "image_corpus[00003]: never materialized" in text


def test_status_command_reads_the_instance_partition_sets(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    home.mkdir(parents=True)
    catalog = LineageCatalog(home / "catalog.duckdb")
    _world(catalog)
    from megapairs_assets.cli.instance import prepare_dagster_home

    prepare_dagster_home(home)
    with dg.DagsterInstance.get() as instance:
        instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000", "00001", "00002"])
    assert main(["status", "--json"]) == 0
    report = {row["asset"]: row for row in json.loads(capsys.readouterr().out)}
    assert report["image_corpus"]["expected"] == 3
    assert report["image_corpus"]["missing"] == 0
    # Every shard asset of the graph is listed, materialized or not.
    assert report["triplets"]["missing"] == 3 and not report["triplets"]["healthy"]
    assert report["mined_image_pairs"]["failing_checks"] == 1
    assert main(["status"]) == 0
    out = capsys.readouterr().out
    assert "3 partition(s) need attention" not in out  # far more than 3 here
    assert "triplets[00002]: never materialized" in out


def test_status_without_a_catalog_says_how_to_get_one(
    home: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["status"]) == 1
    assert "run `megapairs demo` first" in capsys.readouterr().err
