"""What a trained config leaves behind: what the asset page and the catalog say it was trained
on, and no stale export once its settings change (data root on an object store)."""

from __future__ import annotations

import dataclasses
import uuid
from pathlib import Path

import lightning.pytorch as pl_lightning
import polars as pl
import pytest
from test_training_support import OneThread, tiny_config, write_triplets

from megapairs_assets.lib.step import run_recorded
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.training.names import ASSET_NAME
from megapairs_assets.training.train import checkpoint_dir, train_checkpoint


class _FailFirstStep(pl_lightning.Callback):
    """A run that fails (out of memory, a lost node) before it trains anything."""

    def on_train_batch_start(self, *args: object) -> None:
        raise RuntimeError("simulated failure of the new run")


def test_new_settings_withdraw_the_old_export_from_an_object_store(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    layout = DataLayout(tmp_path / "home", data_root=f"memory://{uuid.uuid4().hex}/megapairs")
    config = tiny_config(demo_models_dir, max_steps=2)
    with OneThread():
        first = train_checkpoint("remote", config, [triplets], layout)
    export = first.outputs["open_clip_dir"]
    assert (export / "open_clip_config.json").exists()

    # The user raises the learning rate; the new run fails before its first step.
    changed = dataclasses.replace(config, learning_rate=config.learning_rate * 10)
    with OneThread(), pytest.raises(RuntimeError, match="simulated failure"):
        train_checkpoint("remote", changed, [triplets], layout, extra_callbacks=[_FailFirstStep()])
    # The evaluation finds exports by their config file: the old settings' model must not be
    # there as this config's checkpoint any more (on a local data root it was already gone).
    assert not (export / "open_clip_config.json").exists()
    assert not (export / "open_clip_model.safetensors").exists()
    assert not (checkpoint_dir(layout, "remote") / "run.json").exists()

    with OneThread():  # the same settings again: trained, published, found
        again = train_checkpoint("remote", changed, [triplets], layout)
    assert (again.outputs["open_clip_dir"] / "open_clip_config.json").exists()


def test_the_run_says_what_it_trained_on_where_and_with_which_settings(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets_path = write_triplets(tmp_path, rows=10, images=10)
    triplets = pl.read_parquet(triplets_path).with_columns(
        (pl.lit("t-") + pl.col("pair_id")).alias("triplet_id")
    )
    # Row 3 has no hard negatives: it is quarantined, and said so.
    triplets = triplets.with_columns(
        pl.when(pl.int_range(pl.len()) == 3).then(None).otherwise(pl.col("hns")).alias("hns")
    )
    triplets.write_parquet(triplets_path)
    config = tiny_config(demo_models_dir, max_steps=3)
    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    said: list[str] = []

    def step(name: str):
        return train_checkpoint(
            name,
            config,
            [triplets_path],
            DataLayout(tmp_path / "home"),
            input_versions={"triplets/00000": "m-1"},
            log=said.append,
        )

    with OneThread():
        result = run_recorded(
            step,
            "mine",
            asset=ASSET_NAME,
            code_version="t",
            run_id="r",
            profile="demo",
            catalog=catalog,
        )

    # Before the first step, the log says what the run will train on.
    summary = next(line for line in said if "training rows" in line)
    assert "9 training rows of 10 read from 1 triplet table(s)" in summary
    assert "1 quarantined (negatives_not_starting_with_query x1)" in summary
    assert "3 steps of 4 queries = 1.3 epochs" in summary

    metadata = result.metadata
    assert metadata["device"].startswith("cpu x1, 32-true")
    assert metadata["settings"]["learning_rate"] == config.learning_rate
    assert metadata["settings"]["max_steps"] == 3
    assert metadata["epochs"] == pytest.approx(3 * 4 / 9, abs=0.01)
    assert metadata["quarantine_reasons"] == {"negatives_not_starting_with_query": 1}

    # The quarantined row is in the catalog's quarantine log, like every stage's rejects.
    logged = catalog.query(
        "SELECT shard, key, reason, detail FROM quarantine_log WHERE stage = ?", [ASSET_NAME]
    )
    assert logged.rows() == [
        (
            "mine",
            "t-p0003",
            "negatives_not_starting_with_query",
            "hns is empty or hns[0] is not q_img",
        )
    ]


def test_starting_over_says_which_setting_or_that_the_rows_changed(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    triplets = write_triplets(tmp_path, rows=8, images=10)
    layout = DataLayout(tmp_path / "home")
    config = tiny_config(demo_models_dir, max_steps=2, learning_rate=1e-3)
    said: list[str] = []
    with OneThread():
        train_checkpoint("sweep", config, [triplets], layout, log=said.append)
        faster = dataclasses.replace(config, learning_rate=1e-2, checkpoint_every_n_steps=1)
        train_checkpoint("sweep", faster, [triplets], layout, log=said.append)
        pl.read_parquet(triplets).reverse().write_parquet(triplets)
        train_checkpoint("sweep", faster, [triplets], layout, log=said.append)
    restarts = [line for line in said if "training from scratch" in line]
    assert len(restarts) == 2
    assert "learning_rate 0.001 -> 0.01" in restarts[0]
    assert "checkpoint_every" not in restarts[0]  # hardware settings never restart a run
    assert "the training rows changed" in restarts[1] and "learning_rate" not in restarts[1]
