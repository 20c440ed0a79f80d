"""What the `benchmark_scores` asset shows for a realistic multi-split run: the headline numbers
the UI charts are the benchmark's mean (never one category's score under the benchmark's
name), and `gallery_reused` says whether the galleries came from the cache."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
from test_evaluation_newuser_layouts import write_fashioniq_release

from megapairs_assets.demo.models import DEMO_CLIP_MODEL
from megapairs_assets.evaluation.assets import (
    benchmark_scores,
    register_retrievers,
    score_partition_key,
)
from megapairs_assets.evaluation.run import BenchmarkResult, SplitResult
from megapairs_assets.evaluation.step import headline_metadata
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.retriever.model import RetrieverSpec
from resources.device import DeviceResource
from resources.evaluation import EvaluationResource
from resources.storage import LineageCatalogResource, StorageResource


def _split(name: str, r1: float, reused: bool | None = True, status: str = "scored"):
    metrics = {"R@1": r1, "R@2": r1 + 10} if status == "scored" else {}
    return SplitResult("genecis", name, status, metrics=metrics, gallery_reused=reused)


def test_a_partial_multi_split_benchmark_has_no_headline_numbers() -> None:
    splits = [
        _split("focus_attribute", 0, None, "skipped"),
        _split("change_attribute", 0, None, "skipped"),
        _split("focus_object", 20.0),
        _split("change_object", 30.0),
    ]
    metadata = headline_metadata(BenchmarkResult("base", "genecis", splits))
    assert "R@1" not in metadata and "R@2" not in metadata
    assert metadata["headline"].startswith("none: a split was skipped")
    assert metadata["splits_scored"] == 2 and metadata["splits_skipped"] == 2
    assert metadata["gallery_reused"] is True


def test_the_headline_is_the_mean_and_the_mean_row_does_not_hide_cache_reuse() -> None:
    splits = [_split(t, 10.0 * n) for n, t in enumerate(("a", "b", "c", "d"))]
    splits.append(SplitResult("genecis", "mean", "scored", metrics={"R@1": 15.0, "R@2": 25.0}))
    metadata = headline_metadata(BenchmarkResult("base", "genecis", splits))
    assert metadata["R@1"] == 15.0 and metadata["R@2"] == 25.0 and metadata["headline"] == "mean"
    assert metadata["splits_scored"] == 4
    assert metadata["gallery_reused"] is True  # the mean row embeds nothing
    splits[1].gallery_reused = False
    assert headline_metadata(BenchmarkResult("base", "genecis", splits))["gallery_reused"] is False


def test_a_test_split_reports_cache_reuse_without_scores() -> None:
    submission = SplitResult("circo", "test", "submission", gallery_reused=True)
    metadata = headline_metadata(BenchmarkResult("base", "circo-test", [submission]))
    assert metadata["gallery_reused"] is True and "headline" not in metadata
    assert metadata["splits_scored"] == 0


def test_materialized_fashioniq_shows_the_mean_and_reuses_galleries(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    root = tmp_path / "fashionIQ_dataset"
    for c, category in enumerate(("dress", "shirt", "toptee")):
        gallery = [f"B0{c}{n:03d}XYZ" for n in range(5)]
        triplets = [
            {"target": gallery[2], "candidate": gallery[0], "captions": ["is red", "is long"]},
            {"target": gallery[4], "candidate": gallery[1], "captions": ["is blue", "is short"]},
        ]
        write_fashioniq_release(root, category, gallery, triplets, suffix=".jpg")
    home = tmp_path / "home"
    layout = DataLayout(home)
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    resources = {
        "evaluation": EvaluationResource(
            base_model=DEMO_CLIP_MODEL,
            base_pretrained=str(checkpoint),
            fashioniq_root=str(root),
            batch_size=8,
            num_workers=0,
        ),
        "device": DeviceResource(device="cpu"),
        "storage": StorageResource(home=str(home)),
        "catalog": LineageCatalogResource(path=str(layout.catalog_path)),
    }
    base = RetrieverSpec(DEMO_CLIP_MODEL, str(checkpoint)).retriever_id
    instance = dg.DagsterInstance.ephemeral()
    register_retrievers(instance, [base])

    def materialize() -> dict:
        result = dg.materialize(
            [benchmark_scores],
            partition_key=str(score_partition_key(base, "fashioniq-val")),
            resources=resources,
            instance=instance,
        )
        (event,) = result.asset_materializations_for_node("benchmark_scores")
        return {key: getattr(value, "value", value) for key, value in event.metadata.items()}

    first = materialize()
    assert first["headline"] == "mean" and first["splits_scored"] == 3
    assert first["gallery_reused"] is False
    assert "| mean |" in first["scores"] and "| toptee |" in first["scores"]
    again = materialize()
    assert again["gallery_reused"] is True
    assert again["R@10"] == first["R@10"] and again["R@50"] == first["R@50"]
