"""The `mmret_clip_checkpoint` asset: a named config trains on every committed triplet shard."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
from test_training_support import tiny_config, triplet_rows, write_images

from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.lib.step import StepResult, run_recorded
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.training.assets import (
    TRAINING_CONFIG_PARTITIONS_NAME,
    mmret_clip_checkpoint,
)
from megapairs_assets.training.names import TRIPLETS_ASSET
from resources.evaluation import EvaluationResource
from resources.storage import LineageCatalogResource, StorageResource
from resources.training import TrainingResource, TrainingSettings


def _commit(catalog: LineageCatalog, asset: str, shard: str, write, rows=None) -> None:
    """Commit one partition the way a stage does: through the catalog's commit protocol."""

    def step(partition: str) -> StepResult:
        count = write(partition)
        return StepResult(partition, row_counts={"rows": count}, rows=rows or {})

    run_recorded(
        step, shard, asset=asset, code_version="t", run_id="r", profile="demo", catalog=catalog
    )


def _release_rows(images: list[str], rows: int) -> pl.DataFrame:
    """Triplets as the generation stage writes them: paths relative to its export folder (not
    where the pixels are) beside the image ids, which the training step maps to the corpus."""
    frame = triplet_rows(images, rows)
    image_id = {path: f"00000/{Path(path).stem}" for path in images}
    relative = {path: f"images/00000/{Path(path).stem}.jpg" for path in images}
    return frame.with_columns(
        pl.col("q_img").replace_strict(image_id).alias("query_id"),
        pl.col("t_img").replace_strict(image_id).alias("target_id"),
        pl.col("hns").list.eval(pl.element().replace_strict(image_id)).alias("hard_negative_ids"),
        pl.col("q_img").replace_strict(relative),
        pl.col("t_img").replace_strict(relative),
        pl.col("hns").list.eval(pl.element().replace_strict(relative)),
    )


def _commit_corpus_rows(catalog: LineageCatalog, images: list[str]) -> None:
    lineage = pl.DataFrame(
        {
            "image_id": [f"00000/{Path(p).stem}" for p in images],
            "shard": "00000",
            "key": [Path(p).stem for p in images],
            "source_uri": images,
            "caption": None,
            "content_hash": [f"h{i}" for i in range(len(images))],
            "width": 72,
            "height": 64,
        },
        schema_overrides={"caption": pl.String, "width": pl.Int32, "height": pl.Int32},
    )
    _commit(catalog, "image_corpus", "00000", lambda _: len(images), {IMAGE_LINEAGE.name: lineage})


def test_a_named_config_trains_on_all_triplet_shards(tmp_path: Path, demo_models_dir: Path) -> None:
    home = tmp_path / "home"
    layout, catalog_path = DataLayout(home), home / "catalog.duckdb"
    home.mkdir()
    catalog = LineageCatalog(catalog_path)
    images = write_images(tmp_path / "images", 10)
    _commit_corpus_rows(catalog, images)
    rows = _release_rows(images, 12)
    for shard, part in (("00000", rows.head(6)), ("00001", rows.tail(6))):
        path = layout.shard_table(TRIPLETS_ASSET, shard)
        _commit(catalog, TRIPLETS_ASSET, shard, lambda _, p=path, f=part: _write(f, p))
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
    # Every image was found through its id, although the tables' own paths lead nowhere.
    assert checks["images_loaded"]
    metadata = result.asset_materializations_for_node("mmret_clip_checkpoint")[0].metadata
    assert metadata["rows_training"].value == 12 and metadata["steps"].value == 3
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


def _write(frame: pl.DataFrame, path: Path) -> int:
    write_parquet_atomic(frame, path)
    return frame.height
