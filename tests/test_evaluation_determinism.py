"""Held-out scores are one set of numbers, whichever path computes them.

`megapairs demo` scores through the `benchmark_scores` asset; `megapairs eval` scores from a
terminal. On one home both must give exactly the same metrics: when the CLI reuses the gallery
the asset cached, when it embeds the gallery again, and with another torch thread count. A
gallery cached with another batch size is never mixed with query texts embedded at this one
(the batch size changes an embedding's last bits, and a near-tie at the cut-off turns on them).
"""

from __future__ import annotations

import shutil
from dataclasses import replace
from datetime import datetime
from pathlib import Path

import dagster as dg
import polars as pl
import pytest
import torch
from conftest import make_home
from image_factory import picture
from test_evaluation_heldout import image_locations, tiny_triplets

from megapairs_assets.cli.main import build_parser
from megapairs_assets.evaluation.assets import (
    benchmark_scores,
    register_retrievers,
    score_partition_key,
)
from megapairs_assets.evaluation.cli import evaluate_from_arguments
from megapairs_assets.evaluation.gallery_cache import CacheKey, GalleryCache
from megapairs_assets.evaluation.heldout import split_triplets
from megapairs_assets.evaluation.run import device_kind
from megapairs_assets.evaluation.step import GALLERY_CACHE_DIRNAME, output_dir
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord
from resources.profiles import build_resources

ASSET_RESOURCES = ("evaluation", "device", "storage", "catalog")


@pytest.fixture
def small_home(tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A demo-profile home with one shard of triplets, their images, and the corpus lineage
    that locates them; two held-out gallery images are byte-identical (exact ties, as the demo
    corpus's cross-shard copies give)."""
    home = make_home(tmp_path, demo_models_dir)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.delenv("MEGAPAIRS_DEPLOYMENT", raising=False)
    layout = DataLayout(home)
    images = tmp_path / "img"
    images.mkdir()
    triplets = tiny_triplets(queries=120, prefix=str(images))
    for n, uri in enumerate(sorted({*triplets["q_img"], *triplets["t_img"]})):
        picture(n, (24, 20)).save(uri)
    fraction = build_resources("demo", home)["evaluation"].heldout_fraction
    _, held = split_triplets(triplets, fraction)
    assert held.height >= 10  # enough queries for near-ties to matter
    first, second = sorted(set(held["t_img"]))[:2]
    shutil.copyfile(first, second)
    write_parquet_atomic(triplets, layout.shard_table("triplets", "00000"))
    catalog = LineageCatalog(layout.catalog_path)
    started = datetime(2025, 1, 1)
    catalog.record(
        MaterializationRecord(
            "triplets", "00000", "run-0", "v", "demo", started, 1.0, materialization_id="t-1"
        )
    )
    where = image_locations(triplets)
    lineage = pl.DataFrame(
        {"image_id": list(where), "shard": "00000", "source_uri": list(where.values())}
    )
    catalog.record(
        MaterializationRecord("image_corpus", "00000", "run-0", "v", "demo", started, 1.0),
        rows={"image_lineage": lineage},
    )
    return home


def _asset_scores(home: Path) -> dict[str, float]:
    """The base retriever's held-out metrics as the asset (what the demo runs) stores them."""
    resources = build_resources("demo", home)
    evaluation = resources["evaluation"]
    base = evaluation.base_spec().retriever_id
    instance = dg.DagsterInstance.ephemeral()
    register_retrievers(instance, [base])
    dg.materialize(
        [benchmark_scores],
        partition_key=str(score_partition_key(base, "heldout")),
        resources={name: resources[name] for name in ASSET_RESOURCES},
        instance=instance,
        raise_on_error=True,
    )
    rows = pl.read_parquet(output_dir(DataLayout(home), base, "heldout") / "scores.parquet")
    return dict(zip(rows["metric"], rows["value"], strict=True))


def _cli(*extra: str) -> tuple[dict[str, float], bool]:
    """(metrics, gallery reused) of `megapairs eval --retriever base --benchmark heldout`."""
    args = build_parser().parse_args(
        ["eval", "--retriever", "base", "--benchmark", "heldout", *extra]
    )
    result = evaluate_from_arguments(args)
    (split,) = result.scored()
    return split.metrics, bool(split.gallery_reused)


def _cache_entries(home: Path) -> list[Path]:
    return sorted((home / GALLERY_CACHE_DIRNAME).glob("*/heldout-heldout/*/meta.json"))


def test_asset_and_cli_give_identical_heldout_scores(small_home: Path) -> None:
    asset = _asset_scores(small_home)
    assert set(asset) == {"R@1", "R@5", "R@10", "mAP@5"}
    assert len(_cache_entries(small_home)) == 1

    reused, was_reused = _cli()
    assert was_reused  # the asset's gallery, under the same settings
    assert reused == asset  # exact, not rounded

    # The gallery embedded again, in a process with another torch thread count.
    shutil.rmtree(small_home / GALLERY_CACHE_DIRNAME)
    threads = torch.get_num_threads()
    torch.set_num_threads(1 if threads > 1 else 2)
    try:
        fresh, was_reused = _cli("--num-workers", "0")
    finally:
        torch.set_num_threads(threads)
    assert not was_reused
    assert fresh == asset


def test_another_batch_size_never_reuses_the_cached_gallery(small_home: Path) -> None:
    asset = _asset_scores(small_home)
    (cached,) = _cache_entries(small_home)

    # 7 images per forward pass: the gallery is embedded again at 7, as the query texts are.
    first, was_reused = _cli("--batch-size", "7", "--num-workers", "0")
    assert not was_reused
    (entry,) = _cache_entries(small_home)  # one entry per retriever and gallery
    assert entry != cached
    again, was_reused = _cli("--batch-size", "7", "--num-workers", "0")
    assert was_reused and again == first
    # Back at the profile's batch size: the asset's numbers again, not a mix of the two.
    back, was_reused = _cli()
    assert not was_reused and back == asset


def test_batch_size_and_device_are_part_of_the_cache_key(tmp_path: Path) -> None:
    key = CacheKey(
        "tiny__models.tiny", "fp", "heldout", "heldout", "gv", 3, batch_size=64, device="cpu"
    )
    changed = [replace(key, batch_size=16), replace(key, device="cuda NVIDIA H200")]
    assert len({key.digest, *(other.digest for other in changed)}) == 3
    assert device_kind("cpu") == device_kind(torch.device("cpu")) == "cpu"

    cache = GalleryCache(tmp_path)
    cache.store(key, torch.zeros(3, 2).numpy())
    assert "embedded 64 images per forward pass, this run 16" in (
        cache.miss_reason(changed[0]) or ""
    )
    assert "on cpu, this run is on cuda NVIDIA H200" in (cache.miss_reason(changed[1]) or "")
