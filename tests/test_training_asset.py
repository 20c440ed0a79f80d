"""The `mmret_clip_checkpoint` asset: a named config trains on every committed triplet shard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from test_training_support import tiny_config, triplet_rows, write_images

from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.training.assets import (
    TRAINING_CONFIG_PARTITIONS_NAME,
    mmret_clip_checkpoint,
)
from megapairs_assets.training.names import TRIPLETS_ASSET
from megapairs_assets.training.resource import TrainingResource, TrainingSettings
from resources.evaluation import EvaluationResource
from resources.storage import LineageCatalogResource, StorageResource


def _commit_triplets(catalog: LineageCatalog, layout: DataLayout, shard: str, rows: pl.DataFrame):
    """Write a triplets shard the way a stage does: through the catalog's commit protocol."""

    def step(partition: str) -> StepResult:
        path = layout.shard_table(TRIPLETS_ASSET, partition)
        write_parquet_atomic(rows, path)
        return StepResult(partition, outputs={"triplets": path}, row_counts={"t": rows.height})

    run_recorded(
        step,
        shard,
        asset=TRIPLETS_ASSET,
        code_version="t",
        run_id="r",
        profile="demo",
        catalog=catalog,
    )


def test_a_named_config_trains_on_all_triplet_shards(tmp_path: Path, demo_models_dir: Path) -> None:
    home = tmp_path / "home"
    layout, catalog_path = DataLayout(home), home / "catalog.duckdb"
    home.mkdir()
    catalog = LineageCatalog(catalog_path)
    rows = triplet_rows(write_images(tmp_path / "images", 10), 12)
    _commit_triplets(catalog, layout, "00000", rows.head(6))
    _commit_triplets(catalog, layout, "00001", rows.tail(6))
    settings = dataclasses.asdict(tiny_config(demo_models_dir, max_steps=3))
    resources = {
        "training": TrainingResource(configs={"tiny": TrainingSettings(**settings)}),
        "evaluation": EvaluationResource(base_model="megapairs-tiny-clip", heldout_fraction=0.0),
        "storage": StorageResource(home=str(home), profile="demo"),
        "catalog": LineageCatalogResource(path=str(catalog_path)),
    }
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME, ["tiny", "nope"])

    result = dg.materialize(
        [mmret_clip_checkpoint], partition_key="tiny", resources=resources, instance=instance
    )
    assert result.success
    checks = {c.check_name: c.passed for c in result.get_asset_check_evaluations()}
    # 3 steps are too few to promise a lower loss; the warning check is reported either way.
    assert checks["open_clip_export_identical"] and "loss_decreased" in checks
    metadata = result.asset_materializations_for_node("mmret_clip_checkpoint")[0].metadata
    assert metadata["rows_training_rows"].value == 12 and metadata["rows_steps"].value == 3
    assert "loss_plot" in metadata and metadata["samples_per_s"].value > 0
    record = catalog.query(
        "SELECT input_versions, status FROM materializations WHERE asset = ?",
        ["mmret_clip_checkpoint"],
    ).row(0, named=True)
    assert record["status"] == "complete"
    assert set(json.loads(record["input_versions"])) == {"triplets/00000", "triplets/00001"}

    with pytest.raises(Exception, match=r"no training config named 'nope'.*known: tiny"):
        dg.materialize(
            [mmret_clip_checkpoint], partition_key="nope", resources=resources, instance=instance
        )
