"""README line 1's command on the bundled demo: it runs, mines real pairs, and traces them."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import polars as pl
import pytest
from conftest import make_home

from megapairs_assets.lib.storage import DataLayout
from resources.profiles import SOURCES


def _megapairs(home: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MEGAPAIRS_PROFILE")}
    env["MEGAPAIRS_HOME"] = str(home)
    return subprocess.run(
        [sys.executable, "-m", "megapairs_assets.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory: pytest.TempPathFactory, demo_models_dir: Path):
    home = make_home(tmp_path_factory.mktemp("demo"), demo_models_dir)
    return home, _megapairs(home, "demo", "--quiet")


def test_demo_succeeds_and_mines_pairs_from_every_source(demo_run) -> None:
    home, done = demo_run
    assert done.returncode == 0, done.stderr[-3000:]
    assert "320 valid across 5 shards" in done.stdout
    pairs = pl.concat(
        pl.read_parquet(p)
        for p in sorted((DataLayout(home).data_dir / "mined_image_pairs").glob("*.parquet"))
    )
    assert f"mined pairs: {pairs.height}" in done.stdout
    found_by = pairs.explode("sources")["sources"].value_counts()
    assert set(found_by["sources"]) == set(SOURCES)
    assert (
        pairs["hard_negative_ids"].list.first().equals(pairs["query_id"].alias("hard_negative_ids"))
    )


def test_demo_uses_its_own_dagster_instance(demo_run) -> None:
    home, _ = demo_run
    assert (home / "dagster" / "dagster.yaml").exists()
    assert any((home / "dagster").iterdir())


def test_lineage_prints_the_chain_for_the_demo_pair(demo_run) -> None:
    home, done = demo_run
    pair_id = re.search(r"trace a pair: megapairs lineage (\w+)", done.stdout).group(1)
    traced = _megapairs(home, "lineage", pair_id)
    assert traced.returncode == 0, traced.stderr
    text = traced.stdout
    for expected in (
        f"pair {pair_id}",
        "mined_image_pairs[",
        "_knn[",
        "_embeddings[",
        "image_corpus[",
        "megapairs-tiny-clip",
        ".tar#",
        "hard negatives (query image first)",
    ):
        assert expected in text, f"{expected!r} missing from:\n{text}"


def test_demo_runs_the_whole_loop_and_reports_it(demo_run) -> None:
    home, done = demo_run
    assert done.returncode == 0, done.stderr[-3000:]
    triplets = pl.concat(
        pl.read_parquet(p)
        for p in sorted((DataLayout(home).data_dir / "triplets").glob("*.parquet"))
    )
    assert f"triplets:    {triplets.height} " in done.stdout
    assert "SmolLM2-135M-Instruct, caption-based" in done.stdout  # every generator is named
    assert (triplets["hns"].list.first() == triplets["q_img"]).all()
    assert "checkpoint:  config 'demo'" in done.stdout
    score_it = re.search(r"score it:  megapairs eval --retriever (\S+) --benchmark", done.stdout)
    assert score_it and (Path(score_it.group(1)) / "open_clip_config.json").is_file()
    scores = re.findall(r"held-out scores \((base|trained) .*R@5 ([0-9.]+)", done.stdout)
    assert [role for role, _ in scores] == ["base", "trained"], done.stdout[-2000:]


def test_lineage_prints_the_chain_for_the_demo_triplet(demo_run) -> None:
    home, done = demo_run
    triplet_id = re.search(r"trace a triplet: megapairs lineage (t-\w+)", done.stdout).group(1)
    traced = _megapairs(home, "lineage", triplet_id)
    assert traced.returncode == 0, traced.stderr
    assert triplet_id in traced.stdout
    assert "pair" in traced.stdout


def test_lineage_of_an_unknown_id_fails_clearly(demo_run) -> None:
    home, _ = demo_run
    traced = _megapairs(home, "lineage", "no-such-id")
    assert traced.returncode == 1
    assert "no-such-id" in traced.stderr
