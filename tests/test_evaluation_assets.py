"""benchmark_scores as a Dagster asset: partitions, catalog rows, cache reuse, the sensor."""

from __future__ import annotations

import json
import shutil
from datetime import datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from image_factory import picture
from test_evaluation_heldout import image_locations, tiny_triplets
from test_evaluation_loaders import write_fashioniq

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.assets import (
    RETRIEVER_PARTITIONS_NAME,
    benchmark_scores,
    build_checkpoint_sensor,
    build_rescore_sensor,
    register_retrievers,
    score_partition_key,
)
from megapairs_assets.evaluation.catalog_rows import heldout_summary_lines
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
from megapairs_assets.retriever.model import RetrieverSpec
from resources.device import DeviceResource
from resources.evaluation import EvaluationResource
from resources.storage import LineageCatalogResource, StorageResource


@pytest.fixture
def setup(tmp_path: Path, demo_models_dir: Path) -> dict:
    home = tmp_path / "home"
    layout = DataLayout(home)
    catalog = LineageCatalog(layout.catalog_path)
    # Triplets of one shard, recorded as a complete materialization, with real image files.
    triplets = tiny_triplets(queries=30, prefix=str(tmp_path / "img"))
    (tmp_path / "img").mkdir()
    for n, uri in enumerate(sorted({*triplets["q_img"], *triplets["t_img"]})):
        picture(n, (24, 20)).save(uri)
    write_parquet_atomic(triplets, layout.shard_table("triplets", "00000"))
    catalog.record(
        MaterializationRecord(
            "triplets",
            "00000",
            "run-0",
            "v",
            "demo",
            datetime(2025, 1, 1),
            1.0,
            materialization_id="triplets-mat-1",
        )
    )
    # The corpus's image lineage is where the held-out benchmark finds images by id.
    where = image_locations(triplets)
    images = pl.DataFrame(
        {"image_id": list(where), "shard": "00000", "source_uri": list(where.values())}
    )
    catalog.record(
        MaterializationRecord(
            "image_corpus", "00000", "run-0", "v", "demo", datetime(2025, 1, 1), 1.0
        ),
        rows={"image_lineage": images},
    )
    write_fashioniq(tmp_path / "fiq", categories=("dress",))
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    resources = {
        "evaluation": EvaluationResource(
            base_model=DEMO_CLIP_MODEL,
            base_pretrained=str(checkpoint),
            fashioniq_root=str(tmp_path / "fiq"),
            heldout_fraction=0.3,
            batch_size=16,
            num_workers=0,
        ),
        "device": DeviceResource(device="cpu"),
        "storage": StorageResource(home=str(home)),
        "catalog": LineageCatalogResource(path=str(layout.catalog_path)),
    }
    base_id = RetrieverSpec(DEMO_CLIP_MODEL, str(checkpoint)).retriever_id
    return {
        "resources": resources,
        "catalog": catalog,
        "base_id": base_id,
        "layout": layout,
        "checkpoint": checkpoint,
    }


def _materialize(setup: dict, instance: dg.DagsterInstance, retriever_id: str, benchmark: str):
    result = dg.materialize(
        [benchmark_scores],
        partition_key=str(score_partition_key(retriever_id, benchmark)),
        resources=setup["resources"],
        instance=instance,
        raise_on_error=True,
    )
    (event,) = result.asset_materializations_for_node("benchmark_scores")
    return result, event.metadata


def test_scores_are_partitioned_recorded_and_reuse_the_gallery(setup: dict) -> None:
    instance = dg.DagsterInstance.ephemeral()
    base = setup["base_id"]
    register_retrievers(instance, [base])
    result, metadata = _materialize(setup, instance, base, "heldout")
    assert result.success
    assert metadata["gallery_reused"].value is False
    assert {"R@1", "R@5", "R@10", "mAP@5"} <= set(metadata)

    rows = setup["catalog"].query("SELECT * FROM benchmark_scores ORDER BY metric")
    assert rows["retriever_id"].unique().to_list() == [base]
    assert rows["metric"].to_list() == ["R@1", "R@10", "R@5", "mAP@5"]
    record = setup["catalog"].query(
        "SELECT input_versions, model_ids FROM materializations WHERE asset = 'benchmark_scores'"
    )
    assert json.loads(record["input_versions"][0]) == {"triplets/00000": "triplets-mat-1"}
    assert json.loads(record["model_ids"][0])["retriever"] == base

    _, again = _materialize(setup, instance, base, "heldout")
    assert again["gallery_reused"].value is True
    assert again["R@1"].value == metadata["R@1"].value
    # Re-scoring replaced the partition's rows rather than adding to them.
    assert setup["catalog"].query("SELECT count(*) AS n FROM benchmark_scores")["n"][0] == 4
    lines = heldout_summary_lines(setup["catalog"], base)
    assert len(lines) == 1 and lines[0].startswith(f"held-out scores (base {base}")
    assert "R@1" in lines[0] and "mAP@5" in lines[0]


def test_skipped_benchmark_warns_without_failing(setup: dict) -> None:
    instance = dg.DagsterInstance.ephemeral()
    register_retrievers(instance, [setup["base_id"]])
    result, metadata = _materialize(setup, instance, setup["base_id"], "fashioniq-val")
    checks = {c.check_name: c for c in result.get_asset_check_evaluations()}
    assert checks["scores_are_percentages"].passed
    assert not checks["benchmark_files_present"].passed  # shirt and toptee are absent
    assert metadata["splits_scored"].value == 1 and metadata["splits_skipped"].value == 2
    rows = setup["catalog"].query("SELECT split, status FROM benchmark_scores WHERE value IS NULL")
    assert sorted(rows["split"]) == ["shirt", "toptee"]


def test_sensor_registers_new_checkpoints_and_requests_their_scores(setup: dict) -> None:
    import open_clip
    from safetensors.torch import save_file

    instance = dg.DagsterInstance.ephemeral()
    sensor = build_checkpoint_sensor(dg.DefaultSensorStatus.RUNNING)
    resources = {k: setup["resources"][k] for k in ("evaluation", "storage")}

    def evaluate() -> dg.SensorResult | dg.SkipReason:
        context = dg.build_sensor_context(instance=instance, resources=resources)
        return sensor(context)

    first = evaluate()
    # Only configured benchmarks (FashionIQ here) and the held-out split are requested.
    assert [r.partition_key for r in first.run_requests] == [
        score_partition_key(setup["base_id"], b) for b in ("fashioniq-val", "heldout")
    ]
    instance.add_dynamic_partitions(RETRIEVER_PARTITIONS_NAME, [setup["base_id"]])
    assert isinstance(evaluate(), dg.SkipReason)

    export = setup["layout"].data_dir / "mmret_clip_checkpoint" / "demo" / "open_clip"
    export.mkdir(parents=True)
    state = torch.load(setup["checkpoint"], map_location="cpu")
    save_file(
        {k: v.contiguous() for k, v in state.items()}, str(export / "open_clip_model.safetensors")
    )
    config = {
        "model_cfg": open_clip.get_model_config(DEMO_CLIP_MODEL),
        "model_name": DEMO_CLIP_MODEL,
    }
    (export / "open_clip_config.json").write_text(json.dumps(config))
    second = evaluate()
    trained = "megapairs-tiny-clip__demo.open_clip"
    assert second.dynamic_partitions_requests[0].partition_keys == [trained]
    assert len(second.run_requests) == 2

    # The trained checkpoint scores through the same asset and joins the comparison.
    instance.add_dynamic_partitions(RETRIEVER_PARTITIONS_NAME, [trained])
    _materialize(setup, instance, setup["base_id"], "heldout")
    _, metadata = _materialize(setup, instance, trained, "heldout")
    compared = metadata["compared_retrievers"].value
    assert compared == ", ".join(sorted([setup["base_id"], trained]))
    shutil.rmtree(export.parent)
    with pytest.raises(Exception, match="neither the base model"):
        _materialize(setup, instance, trained, "heldout")


def test_comparison_is_a_png_or_text_bars_without_matplotlib(monkeypatch) -> None:
    import builtins

    from megapairs_assets.evaluation.plot import comparison_markdown

    scores = pl.DataFrame(
        {
            "retriever_id": ["base", "base", "trained", "trained", "base", "trained"],
            "split": ["dress", "mean", "dress", "mean", "mean", "mean"],
            "metric": ["R@10", "R@10", "R@10", "R@10", "R@50", "R@50"],
            "value": [10.0, 12.0, 30.0, 32.0, 40.0, 60.0],
        }
    )
    real_import = builtins.__import__

    def no_matplotlib(name: str, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    text = comparison_markdown(scores, "fashioniq-val")
    # Only the mean split is shown; bars scale with the value (25 blocks = 100 percent).
    assert "dress" not in text
    assert "trained " + "█" * 15 in text and "base    " + "█" * 10 in text
    assert "32.00" in text and "12.00" in text
    monkeypatch.undo()
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return
    assert comparison_markdown(scores, "fashioniq-val").startswith(
        "![fashioniq-val](data:image/png"
    )


def test_rescore_sensor_scores_a_checkpoint_only_after_it_changes(setup: dict) -> None:
    """After `megapairs demo` (checkpoint trained, then scored) the first tick requests
    nothing; a re-materialized checkpoint is re-scored once; a checkpoint never scored is
    `new_retrievers_sensor`'s."""
    instance = dg.DagsterInstance.ephemeral()
    sensor = build_rescore_sensor(dg.DefaultSensorStatus.RUNNING)
    resources = {k: setup["resources"][k] for k in ("evaluation", "storage")}
    cursor: list[str | None] = [None]

    def tick() -> dg.SensorResult | dg.SkipReason:
        context = dg.build_sensor_context(instance=instance, resources=resources, cursor=cursor[0])
        result = sensor(context)
        if isinstance(result, dg.SensorResult) and result.cursor:
            cursor[0] = result.cursor
        return result

    def report(asset: str, partition: str) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))

    checkpoints = setup["layout"].data_dir / "mmret_clip_checkpoint"
    for config in ("demo", "other"):
        export = checkpoints / config / "open_clip"
        export.mkdir(parents=True)
        shutil.copy(setup["checkpoint"], export / "open_clip_model.pth")
        config_json = {"model_cfg": {}, "model_name": DEMO_CLIP_MODEL}
        (export / "open_clip_config.json").write_text(json.dumps(config_json))
    trained = "megapairs-tiny-clip__demo.open_clip"
    benchmarks = ("fashioniq-val", "heldout")
    # What the demo does: train, register the retriever, score it on every benchmark.
    report("mmret_clip_checkpoint", "demo")
    register_retrievers(instance, [setup["base_id"], trained])
    for benchmark in benchmarks:
        report("benchmark_scores", str(score_partition_key(trained, benchmark)))
    # A second config trained but never scored (new_retrievers_sensor registers and scores it).
    report("mmret_clip_checkpoint", "other")

    first = tick()
    assert isinstance(first, dg.SensorResult) and not first.run_requests
    assert cursor[0] is not None

    report("mmret_clip_checkpoint", "demo")  # re-trained: new weights, same retriever id
    second = tick()
    assert [r.partition_key for r in second.run_requests] == [
        score_partition_key(trained, b) for b in benchmarks
    ]
    assert len({r.run_key for r in second.run_requests}) == 2

    for benchmark in benchmarks:  # the re-scores ran
        report("benchmark_scores", str(score_partition_key(trained, benchmark)))
    assert isinstance(tick(), dg.SkipReason)  # nothing new since the cursor
    cursor[0] = None  # even a sensor that lost its cursor redoes nothing
    assert not tick().run_requests

    # Re-materialized with the same weights (a finished config exports its final checkpoint
    # again): the same data version, so the scores still describe it.
    def checkpoint(version: str) -> None:
        instance.report_runless_asset_event(
            dg.AssetMaterialization(
                "mmret_clip_checkpoint", partition="demo", tags={"dagster/data_version": version}
            )
        )

    checkpoint("weights-1")
    assert len(tick().run_requests) == 2  # other weights than the version-less one before
    for benchmark in benchmarks:
        report("benchmark_scores", str(score_partition_key(trained, benchmark)))
    checkpoint("weights-1")
    assert not tick().run_requests
    checkpoint("weights-2")
    assert len(tick().run_requests) == 2


def test_the_base_is_scored_again_on_the_held_out_split_of_newer_triplets(setup: dict) -> None:
    """A fresh instance's sensor scores the base at once, before any triplet (no held-out
    split); once a checkpoint trained on triplets appears, the base's held-out score is
    redone, once, so base and trained compare on the same split."""
    from megapairs_assets.evaluation.assets import stale_base_heldout_request

    instance = dg.DagsterInstance.ephemeral()
    base = setup["base_id"]
    key = str(score_partition_key(base, "heldout"))

    def report(asset: str, partition: str) -> None:
        instance.report_runless_asset_event(dg.AssetMaterialization(asset, partition=partition))

    assert stale_base_heldout_request(instance, base) == []  # not registered
    register_retrievers(instance, [base])
    report("benchmark_scores", key)  # scored on no split
    assert stale_base_heldout_request(instance, base) == []  # no triplets yet
    report("triplets", "00000")
    (request,) = stale_base_heldout_request(instance, base)
    assert request.partition_key == key
    report("benchmark_scores", key)  # the re-score ran
    assert stale_base_heldout_request(instance, base) == []
