"""The demo's closing summary says what this command's runs did: a checkpoint that was already
trained is not reported as trained in seconds, and outputs of earlier runs that these runs did
not remake (`--until mine` over an older full run) are not shown as if they were current."""

from __future__ import annotations

import time
from pathlib import Path
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest

from megapairs_assets.cli.summary import print_summary
from megapairs_assets.evaluation.catalog_rows import SCORES_TABLE
from megapairs_assets.lib.storage import write_parquet_atomic
from megapairs_assets.lineage.catalog import (
    LineageCatalog,
    MaterializationRecord,
    new_materialization_id,
    utc_now,
)
from resources.storage import StorageResource


def _resources(home: Path, catalog: LineageCatalog) -> dict:
    return {
        "storage": StorageResource(home=str(home)),
        "catalog": SimpleNamespace(catalog=lambda: catalog),
        "evaluation": SimpleNamespace(base_spec=lambda: SimpleNamespace(retriever_id="base")),
    }


def _record(asset: str, partition: str, run_id: str, **fields: object) -> MaterializationRecord:
    time.sleep(0.001)
    return MaterializationRecord(
        asset=asset,
        partition=partition,
        run_id=run_id,
        code_version="v1",
        profile="demo",
        started_at=utc_now(),
        duration_s=float(fields.pop("duration_s", 0.1)),  # type: ignore[arg-type]
        materialization_id=new_materialization_id(),
        **fields,  # type: ignore[arg-type]
    )


def _checkpoint_run(resumed_from_step: int) -> dg.ExecuteInProcessResult:
    """A real run materializing the checkpoint of config 'demo' with the metadata training
    reports (`resumed_from_step`: the step its resume point was at)."""

    @dg.asset(name="mmret_clip_checkpoint", partitions_def=dg.StaticPartitionsDefinition(["demo"]))
    def checkpoint() -> dg.MaterializeResult:
        return dg.MaterializeResult(
            metadata={"steps": 60, "resumed_from_step": resumed_from_step, "fit_s_this_run": 0.0}
        )

    return dg.materialize(
        [checkpoint], instance=dg.DagsterInstance.ephemeral(), partition_key="demo"
    )


def _checkpoint_record(catalog: LineageCatalog, run_id: str) -> None:
    catalog.record(
        _record(
            "mmret_clip_checkpoint",
            "demo",
            run_id,
            duration_s=4.5,
            row_counts={"training": 2146, "quarantined": 0},
        )
    )


def test_an_already_trained_checkpoint_is_not_reported_as_trained_in_seconds(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    result = _checkpoint_run(resumed_from_step=60)
    _checkpoint_record(catalog, result.run_id)
    print_summary(_resources(tmp_path, catalog), ["00000"], 1.0, [result])
    (line,) = [line for line in capsys.readouterr().out.splitlines() if "checkpoint:" in line]
    assert "steps 60" in line
    assert "already trained in an earlier run: exported again without training, 4.5 s" in line
    assert not line.endswith("in 4.5 s")


def test_a_trained_or_resumed_checkpoint_says_so(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    fresh = _checkpoint_run(resumed_from_step=0)
    _checkpoint_record(catalog, fresh.run_id)
    print_summary(_resources(tmp_path, catalog), ["00000"], 1.0, [fresh])
    out = capsys.readouterr().out
    assert "quarantined 0, training 2146, steps 60 in 4.5 s" in out
    assert "already trained" not in out
    resumed = _checkpoint_run(resumed_from_step=30)
    _checkpoint_record(catalog, resumed.run_id)
    print_summary(_resources(tmp_path, catalog), ["00000"], 1.0, [resumed])
    assert "(resumed at step 30, trained to step 60 in 4.5 s)" in capsys.readouterr().out


def test_outputs_of_earlier_runs_are_named_not_shown_as_current(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    layout = StorageResource(home=str(tmp_path)).layout()
    earlier = "earlier-full-run"
    # An older full run: triplets, a checkpoint and held-out scores.
    write_parquet_atomic(
        pl.DataFrame(
            {
                "triplet_id": ["t-1"],
                "q_img": ["images/00000/a.jpg"],
                "q_text": [["the same, in red"]],
                "t_img": ["images/00000/b.jpg"],
                "hns": [["images/00000/c.jpg"]],
                "description_generator": ["heuristic (caption templates)"],
                "instruction_generator": ["heuristic (caption templates)"],
            }
        ),
        layout.shard_table("triplets", "00000"),
    )
    catalog.record(_record("triplets", "00000", earlier))
    _checkpoint_record(catalog, earlier)
    scores = _record("benchmark_scores", "heldout|base", earlier)
    catalog.record(
        scores,
        rows={
            SCORES_TABLE.name: pl.DataFrame(
                {
                    "partition": ["heldout|base"],
                    "retriever_id": ["base"],
                    "benchmark": ["heldout"],
                    "split": ["test"],
                    "metric": ["R@1"],
                    "value": [23.6],
                    "status": ["scored"],
                    "detail": [None],
                    "gallery_version": ["g"],
                    "queries": [855],
                    "gallery_images": [320],
                },
                schema_overrides={"detail": pl.String},
            )
        },
    )
    # Now `--until mine`: only the mining half runs.

    @dg.asset(name="mined_image_pairs")
    def pairs() -> None:
        pass

    now = dg.materialize([pairs], instance=dg.DagsterInstance.ephemeral())
    catalog.record(_record("mined_image_pairs", "00000", now.run_id))

    print_summary(_resources(tmp_path, catalog), ["00000"], 1.0, [now])
    out = capsys.readouterr().out
    assert "triplets:" not in out and "checkpoint:" not in out and "held-out scores (" not in out
    (line,) = [line for line in out.splitlines() if line.startswith("  earlier:")]
    assert "triplets, checkpoint, held-out scores left out" in line
    assert "may not match these pairs" in line and "megapairs demo" in line

    # A full run that remade them shows them again.
    catalog.record(_record("triplets", "00000", now.run_id))
    print_summary(_resources(tmp_path, catalog), ["00000"], 1.0, [now])
    out = capsys.readouterr().out
    assert "triplets:    1 (1 instructions)" in out
    assert "earlier:     checkpoint, held-out scores left out" in out
