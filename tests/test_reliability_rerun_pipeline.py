"""A corpus shard replaced in place or appended: what is stale says so, and a re-run catches up.

Every materialization carries a data version made from the content it wrote. Before, every
data version of the graph was a hash of code versions only, so a shard whose images changed
left everything downstream "fresh" in Dagster's eyes, and "Materialize stale and missing"
did nothing. Now a changed shard marks its dependants stale (and a same-content re-run does
not), the eager automation asks for them, and re-running the mining half gives exactly the
tables a fresh home computes from the new corpus, with no pair or neighbour naming an image
that left it. A run killed in the middle of writing a table re-runs to the tables of an
uninterrupted run, with no temporary file or `pending` record left behind.
"""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import image_factory as factory
import polars as pl
import pytest
from conftest import make_home, run_shards
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._core.loader import LoadingContextForTest
from test_reliability_rerun_storage import stop

from megapairs_assets.definitions import build_definitions
from megapairs_assets.lib.storage import DataLayout
from resources.corpus import CorpusSourceResource

MINED = ["clip_image_knn", "dino_image_knn", "caption_text_knn", "mined_image_pairs"]
TABLES = [
    "clip_image_embeddings",
    "dino_image_embeddings",
    "caption_text_embeddings",
    *MINED,
]


def _stale(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str, shard: str) -> bool:
    resolver = CachingStaleStatusResolver(
        instance, defs.resolve_asset_graph(), LoadingContextForTest(instance)
    )
    return resolver.get_status(dg.AssetKey(asset), shard) == StaleStatus.STALE


def _home(root: Path, corpus: Path, models: Path) -> tuple[dg.Definitions, Path]:
    home = make_home(root, models)
    source = CorpusSourceResource(kind="webdataset", path=str(corpus))
    return build_definitions("demo", home, {"corpus_source": source}), home


def _tables(home: Path, shards: list[str]) -> dict[str, pl.DataFrame]:
    layout = DataLayout(home)
    frames = {
        f"{asset}/{shard}": pl.read_parquet(layout.shard_table(asset, shard))
        for asset in TABLES
        for shard in shards
    }
    for shard in shards:  # source_uri names the corpus folder, which differs between homes
        frames[f"image_corpus/{shard}"] = pl.read_parquet(layout.corpus_images(shard)).drop(
            "source_uri"
        )
    return frames


def _run(defs, instance, shards, job="mining_half") -> dg.ExecuteInProcessResult:
    result = run_shards(defs, instance, shards, job_name=job)
    assert result.success
    return result


def test_a_replaced_then_an_appended_shard_flow_down_and_a_rerun_is_consistent(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(4, first_seed=0))
    factory.write_wds_shard(corpus / "00001.tar", factory.good_items(4, first_seed=10))
    defs, home = _home(tmp_path / "a", corpus, demo_models_dir)
    instance = dg.DagsterInstance.ephemeral()
    shards = ["00000", "00001"]
    _run(defs, instance, shards)

    # The same content again: nothing downstream turns stale.
    _run(defs, instance, shards, job="corpus_only")
    assert not any(_stale(defs, instance, "clip_image_embeddings", s) for s in shards)
    ticked = dg.evaluate_automation_conditions(defs=defs, instance=instance)

    # Shard 00001 replaced in place: keys 10-12 keep their names but hold other pictures,
    # key 13 is gone and key 14 is new.
    replaced = [
        (f"{10 + i:09d}", factory.good_jpeg_bytes(500 + i), f"new photo {i}") for i in range(3)
    ]
    replaced.append((f"{14:09d}", factory.good_jpeg_bytes(600), "added photo"))
    factory.write_wds_shard(corpus / "00001.tar", replaced)
    _run(defs, instance, shards, job="corpus_only")
    assert _stale(defs, instance, "clip_image_embeddings", "00001")
    requested = dg.evaluate_automation_conditions(
        defs=defs, instance=instance, cursor=ticked.cursor
    )
    assert requested.get_num_requested(dg.AssetKey("clip_image_embeddings")) >= 1

    # A shard appended: every KNN graph searches it, so every graph is stale once it is embedded.
    factory.write_wds_shard(corpus / "00002.tar", factory.good_items(4, first_seed=20))
    shards.append("00002")
    _run(defs, instance, ["00002"], job="corpus_and_embeddings")
    assert _stale(defs, instance, "clip_image_knn", "00000")

    _run(defs, instance, shards)
    assert not any(_stale(defs, instance, asset, s) for asset in MINED for s in shards)
    current = set(pl.read_parquet(DataLayout(home).corpus_images("00001"))["image_id"])
    assert f"00001/{13:09d}" not in current and f"00001/{14:09d}" in current

    # Exactly what a fresh home computes from the new corpus; nothing names a removed image.
    fresh_defs, fresh_home = _home(tmp_path / "fresh", corpus, demo_models_dir)
    _run(fresh_defs, dg.DagsterInstance.ephemeral(), shards)
    rerun, fresh = _tables(home, shards), _tables(fresh_home, shards)
    assert rerun.keys() == fresh.keys()
    for name in rerun:
        assert rerun[name].equals(fresh[name]), name
    layout = DataLayout(home)
    images = set().union(
        *(set(pl.read_parquet(layout.corpus_images(s))["image_id"]) for s in shards)
    )
    for shard in shards:
        pairs = pl.read_parquet(layout.shard_table("mined_image_pairs", shard))
        named = set(pairs["query_id"]) | set(pairs["target_id"])
        named |= set(pairs["hard_negative_ids"].explode().drop_nulls())
        knn = pl.read_parquet(layout.shard_table("clip_image_knn", shard))
        assert named | set(knn["neighbor_id"]) <= images


# The corpus of 2 shards in its own process, paused (to be killed) just before the first table
# whose path holds argv[4] is moved into place: its temporary file written, its catalog record
# pending, the Dagster run started. (Every stage writes and records through the same two
# functions; the corpus is the one that needs no model, so the test stays quick.)
_KILLED_RUN = """
import os, sys, time
from pathlib import Path
sys.path.insert(0, sys.argv[5])
import dagster as dg
from conftest import run_shards
from megapairs_assets.definitions import build_definitions
from resources.corpus import CorpusSourceResource

home, corpus, marker, paused_at = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3]), sys.argv[4]
real_replace = os.replace

def replace(source, target):
    if paused_at in str(target):
        marker.write_text(str(os.getpid()))
        time.sleep(300)
    real_replace(source, target)

os.replace = replace
defs = build_definitions(
    "demo", home, {"corpus_source": CorpusSourceResource(kind="webdataset", path=corpus)}
)
run_shards(defs, dg.DagsterInstance.get(), ["00000", "00001"], job_name="corpus_only")
"""


def test_a_run_killed_mid_write_reruns_to_the_same_tables(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import os
    import signal
    import subprocess
    import sys
    import time

    from megapairs_assets.cli.instance import DAGSTER_YAML
    from megapairs_assets.lineage.catalog import LineageCatalog
    from megapairs_assets.orchestration.runs import release_dead_runs

    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", factory.good_items(4, first_seed=0))
    factory.write_wds_shard(corpus / "00001.tar", factory.good_items(4, first_seed=10))
    defs, home = _home(tmp_path / "a", corpus, demo_models_dir)
    dagster_home = home / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text(DAGSTER_YAML)
    monkeypatch.setenv("DAGSTER_HOME", str(dagster_home))
    marker = tmp_path / "paused"
    killed = subprocess.Popen(
        [
            *("timeout", "-s", "KILL", "300", sys.executable, "-c", _KILLED_RUN, str(home)),
            *(str(corpus), str(marker), "image_corpus/00001", str(Path(__file__).parent)),
        ]
    )
    try:
        deadline = time.monotonic() + 240
        while not marker.exists():
            assert killed.poll() is None, "the run ended before it wrote the table"
            assert time.monotonic() < deadline, "the run never wrote the table"
            time.sleep(0.1)
        os.kill(int(marker.read_text()), signal.SIGKILL)
        killed.wait(timeout=60)
    finally:
        stop(killed)
    data = DataLayout(home).data_dir
    assert [p.name for p in data.rglob(".*")], "the kill left no temporary file to clean"
    catalog = LineageCatalog(DataLayout(home).catalog_path)
    pending = "SELECT asset, partition FROM materializations WHERE status = 'pending'"
    assert catalog.query(pending).height == 1

    instance = dg.DagsterInstance.get()
    assert release_dead_runs(instance, log=lambda _: None)  # what the CLI and executor do
    _run(defs, instance, ["00000", "00001"], job="corpus_only")
    assert [p for p in data.rglob(".*")] == []
    assert catalog.query(pending).height == 0
    assert [run.status for run in instance.get_runs()] == [
        dg.DagsterRunStatus.SUCCESS,
        dg.DagsterRunStatus.FAILURE,
    ]

    fresh_defs, fresh_home = _home(tmp_path / "fresh", corpus, demo_models_dir)
    _run(fresh_defs, dg.DagsterInstance.ephemeral(), ["00000", "00001"], job="corpus_only")
    for shard in ["00000", "00001"]:
        for table in ("corpus_images", "corpus_quarantine"):
            rerun = pl.read_parquet(getattr(DataLayout(home), table)(shard))
            fresh = pl.read_parquet(getattr(DataLayout(fresh_home), table)(shard))
            assert rerun.drop("source_uri").equals(fresh.drop("source_uri")), (table, shard)
