"""A shard that leaves the corpus leaves the other shards' KNN graphs too: the shard sensor's
request searches them again, through Dagster, so no graph lists a retired image."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import image_factory as factory
import polars as pl
from conftest import make_home, run_shards

from megapairs_assets.corpus.assets import KNN_ASSETS
from megapairs_assets.definitions import build_definitions
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.orchestration.runs import shard_range_tags
from resources.corpus import CorpusSourceResource

SHARDS = ["00000", "00001", "00002"]


def _neighbours_in(layout: DataLayout, asset: str, shards: list[str], retired: str) -> int:
    return sum(
        pl.read_parquet(layout.shard_table(asset, shard))["neighbor_id"]
        .str.starts_with(f"{retired}/")
        .sum()
        for shard in shards
    )


def _search_graphs(
    defs: dg.Definitions, instance: dg.DagsterInstance, shards: list[str]
) -> dg.ExecuteInProcessResult:
    """The three KNN graphs of `shards` in one range run, as a retirement's request runs them."""
    return defs.resolve_implicit_global_asset_job_def().execute_in_process(
        asset_selection=[dg.AssetKey(name) for name in KNN_ASSETS],
        tags=shard_range_tags(shards),
        instance=instance,
        raise_on_error=False,
    )


def test_retiring_a_shard_searches_the_remaining_graphs_again(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    corpus = tmp_path / "corpus"
    for index, shard in enumerate(SHARDS):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(6, first_seed=20 * index)
        )
    home = make_home(tmp_path, demo_models_dir)
    source = CorpusSourceResource(kind="webdataset", path=str(corpus))
    defs = build_definitions("demo", home, {"corpus_source": source})
    instance = dg.DagsterInstance.ephemeral()
    assert run_shards(defs, instance, SHARDS, job_name="corpus_and_embeddings").success
    knn_job = defs.resolve_implicit_global_asset_job_def()
    assert _search_graphs(defs, instance, SHARDS).success
    layout = DataLayout(home)
    kept = SHARDS[:2]
    assert all(_neighbours_in(layout, a, kept, "00002") for a in KNN_ASSETS)  # it can fail

    (corpus / "00002.tar").unlink()
    sensor = defs.resolve_sensor_def("new_shards_sensor")
    context = dg.build_sensor_context(
        instance=instance, resources={"corpus_source": source, "catalog": defs.resources["catalog"]}
    )
    tick = sensor(context)
    for request in tick.dynamic_partitions_requests:
        if isinstance(request, dg.DeleteDynamicPartitionsRequest):
            for key in request.partition_keys:
                instance.delete_dynamic_partition(request.partitions_def_name, key)
    (request,) = tick.run_requests
    assert knn_job.execute_in_process(
        asset_selection=list(request.asset_selection), tags=request.tags, instance=instance
    ).success
    assert not any(_neighbours_in(layout, a, kept, "00002") for a in KNN_ASSETS)


def test_a_shard_not_ingested_yet_is_not_a_missing_table(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    # A shard copied in while a KNN run waited (its corpus step still to come) is searched by
    # the run its embeddings start; before, it failed every graph's knn_corpus_complete check.
    corpus = tmp_path / "corpus"
    for index, shard in enumerate(SHARDS[:2]):
        factory.write_wds_shard(
            corpus / f"{shard}.tar", factory.good_items(6, first_seed=20 * index)
        )
    home = make_home(tmp_path, demo_models_dir)
    source = CorpusSourceResource(kind="webdataset", path=str(corpus))
    defs = build_definitions("demo", home, {"corpus_source": source})
    instance = dg.DagsterInstance.ephemeral()
    assert run_shards(defs, instance, SHARDS[:2], job_name="corpus_and_embeddings").success
    factory.write_wds_shard(corpus / "00002.tar", factory.good_items(6, first_seed=40))
    result = _search_graphs(defs, instance, SHARDS[:2])
    assert result.success
    assert all(e.passed for e in result.get_asset_check_evaluations())
    messages = [e.message or "" for e in instance.all_logs(result.run_id)]
    assert any("have no corpus or" in m and "(e.g. 00002)" in m for m in messages)

    # Ingested but not embedded yet (its embeddings run still to come): waiting as well.
    assert run_shards(defs, instance, ["00002"], job_name="corpus_only").success
    again = _search_graphs(defs, instance, SHARDS[:2])
    assert again.success
    assert all(e.passed for e in again.get_asset_check_evaluations())
