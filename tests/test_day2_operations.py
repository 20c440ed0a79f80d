"""Day-2 operations as Dagster shows them: settings changes and staleness, new shards overnight,
and automation that stops at a failing blocking check for that shard only.

Only the corpus stage runs here (CPU, no model): the rest is what Dagster derives from code
versions, materialization metadata and automation conditions.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import dagster as dg
import image_factory as factory
import pytest
from dagster._core.asset_graph_view.asset_graph_view import AssetGraphView, TemporalContext
from dagster._core.definitions.data_version import CachingStaleStatusResolver, StaleStatus
from dagster._time import get_current_datetime

from megapairs_assets.definitions import build_definitions
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lineage.catalog import LineageCatalog
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from megapairs_assets.orchestration.settings_version import SETTINGS_VERSION_KEY
from resources.corpus import CorpusSourceResource

SHARDS = ["00000", "00001"]


def _changed(resource: Any, **changes: Any) -> Any:
    """A copy of a configurable resource with some fields changed."""
    fields = {name: getattr(resource, name) for name in type(resource).model_fields}
    return type(resource)(**{**fields, **changes})


def _code_versions(defs: dg.Definitions) -> dict[str, str | None]:
    graph = defs.resolve_asset_graph()
    return {k.to_user_string(): graph.get(k).code_version for k in graph.get_all_asset_keys()}


def _stale(defs: dg.Definitions, instance: dg.DagsterInstance, asset: str, shard: str):
    """(status, stale cause reasons) of one partition, as the UI's "stale" badge computes it."""
    graph = defs.resolve_asset_graph()
    view = AssetGraphView(
        temporal_context=TemporalContext(effective_dt=get_current_datetime(), last_event_id=None),
        instance=instance,
        asset_graph=graph,
    )
    resolver = CachingStaleStatusResolver(instance, graph, view)
    key = dg.AssetKey(asset)
    causes = [cause.reason for cause in resolver.get_stale_causes(key, shard)]
    return resolver.get_status(key, shard), causes


def _corpus(folder: Path, shards: list[str]) -> CorpusSourceResource:
    for index, shard in enumerate(shards):
        factory.write_wds_shard(folder / f"{shard}.tar", factory.good_items(2, 10 * index))
    return CorpusSourceResource(kind="webdataset", path=str(folder))


def _run_corpus(
    defs: dg.Definitions, instance: dg.DagsterInstance, shards: list[str], **kwargs: Any
) -> dg.ExecuteInProcessResult:
    known = set(instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME))
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, [s for s in shards if s not in known])
    tags = {
        "dagster/asset_partition_range_start": shards[0],
        "dagster/asset_partition_range_end": shards[-1],
    }
    return defs.resolve_job_def("corpus_only").execute_in_process(
        instance=instance, tags=tags, raise_on_error=False, **kwargs
    )


def _requested(result: Any) -> dict[str, list[str]]:
    return {
        key.to_user_string(): sorted(result.get_requested_partitions(key))
        for key in result._requested_partitions_by_asset_key
        if result.get_requested_partitions(key)
    }


@pytest.fixture(scope="module")
def corpus_run(tmp_path_factory: pytest.TempPathFactory):
    root = tmp_path_factory.mktemp("day2")
    source = _corpus(root / "corpus", SHARDS)
    home = root / "home"
    defs = build_definitions("demo", home, {"corpus_source": source})
    instance = dg.DagsterInstance.ephemeral()
    result = _run_corpus(defs, instance, SHARDS)
    assert result.success
    return root, home, source, defs, instance, result


# -- a setting changes ------------------------------------------------------------------------


def test_unchanged_settings_leave_every_shard_up_to_date(corpus_run) -> None:
    _, home, source, _, instance, _ = corpus_run
    again = build_definitions("demo", home, {"corpus_source": source})
    for shard in SHARDS:
        assert _stale(again, instance, "image_corpus", shard) == (StaleStatus.FRESH, [])


def test_the_catalog_records_the_code_version_dagster_shows(corpus_run) -> None:
    _, home, _, defs, _, _ = corpus_run
    shown = _code_versions(defs)["image_corpus"]
    recorded = (
        LineageCatalog(home / "catalog.duckdb")
        .query("SELECT DISTINCT code_version FROM materializations WHERE asset = 'image_corpus'")[
            "code_version"
        ]
        .to_list()
    )
    assert "+s." in shown and recorded == [shown]


def test_a_changed_setting_marks_its_asset_stale_by_code_version(corpus_run) -> None:
    _, home, source, _, instance, _ = corpus_run
    stricter = build_definitions(
        "demo", home, {"corpus_source": _changed(source, max_caption_chars=10)}
    )
    for shard in SHARDS:
        status, causes = _stale(stricter, instance, "image_corpus", shard)
        assert status == StaleStatus.STALE
        assert causes == ["has a new code version"], causes


def test_the_same_shards_read_from_another_folder_are_not_stale(corpus_run) -> None:
    root, home, source, _, instance, _ = corpus_run
    moved = _corpus(root / "moved", SHARDS)
    defs = build_definitions("demo", home, {"corpus_source": moved})
    assert moved.path != source.path
    assert _stale(defs, instance, "image_corpus", SHARDS[0]) == (StaleStatus.FRESH, [])


def test_each_setting_changes_exactly_the_assets_that_read_it(tmp_path: Path) -> None:
    base = build_definitions("demo", tmp_path)
    before = _code_versions(base)
    resources = base.resources

    def changed_assets(**overrides: Any) -> set[str]:
        after = _code_versions(build_definitions("demo", tmp_path, overrides))
        return {name for name in before if after[name] != before[name]}

    knn = resources["knn_index"]
    assert changed_assets(knn_index=_changed(knn, k=knn.k + 1)) == {
        "clip_image_knn",
        "dino_image_knn",
        "caption_text_knn",
    }
    mining = resources["mining"]
    bands = {**mining.bands, "caption_text": [0.5, 0.95]}
    assert changed_assets(mining=_changed(mining, bands=bands)) == {"mined_image_pairs"}
    encoder = resources["dino_image_encoder"]
    assert changed_assets(dino_image_encoder=_changed(encoder, dim=(encoder.dim or 0) + 1)) == {
        "dino_image_embeddings"
    }
    generation = resources["generation"]
    other_model = generation.describe_backend.model_copy(update={"model_id": "another-model"})
    assert changed_assets(generation=_changed(generation, describe_backend=other_model)) == {
        "pair_descriptions"
    }
    # Throughput and placement never make a table stale.
    assert (
        changed_assets(
            knn_index=_changed(knn, query_batch_size=7, use_gpu="no", backend="torch"),
            dino_image_encoder=_changed(encoder, batch_size=3, num_workers=0),
            generation=_changed(generation, flush_every=1, max_attempts=9),
        )
        == set()
    )
    # A data root elsewhere (the demo's weights live under it) re-embeds nothing.
    assert _code_versions(build_definitions("demo", tmp_path / "elsewhere")) == before


def test_an_edited_prompt_file_changes_only_its_step(tmp_path: Path) -> None:
    from megapairs_assets.generation.prompts import PROMPTS_DIR

    base = build_definitions("demo", tmp_path)
    generation = base.resources["generation"]
    template = tmp_path / "my_instructions.toml"
    template.write_text((PROMPTS_DIR / f"{generation.instruct_template}.toml").read_text())
    same = _code_versions(
        build_definitions(
            "demo", tmp_path, {"generation": _changed(generation, instruct_template=str(template))}
        )
    )
    assert same == _code_versions(base)  # the same content under another name
    template.write_text(template.read_text() + "\n# a comment only\n")
    commented = _code_versions(
        build_definitions(
            "demo", tmp_path, {"generation": _changed(generation, instruct_template=str(template))}
        )
    )
    assert commented == _code_versions(base)  # the parsed template is what counts
    template.write_text(template.read_text().replace("under 15 words", "under 12 words"))
    edited = _code_versions(
        build_definitions(
            "demo", tmp_path, {"generation": _changed(generation, instruct_template=str(template))}
        )
    )
    before = _code_versions(base)
    assert {name for name in before if edited[name] != before[name]} == {"pair_instructions"}


def test_a_run_config_override_is_recorded_and_warned_about(corpus_run) -> None:
    _, _, source, defs, instance, first = corpus_run
    recorded = first.asset_materializations_for_node("image_corpus")[0].metadata
    spec = defs.resolve_assets_def("image_corpus").specs_by_key[dg.AssetKey("image_corpus")]
    assert recorded[SETTINGS_VERSION_KEY].value == spec.metadata[SETTINGS_VERSION_KEY]
    config = {name: getattr(source, name) for name in type(source).model_fields}
    config = {k: v for k, v in config.items() if v is not None}
    override = {"resources": {"corpus_source": {"config": {**config, "max_caption_chars": 10}}}}
    result = _run_corpus(defs, instance, SHARDS[:1], run_config=override)
    assert result.success
    written = result.asset_materializations_for_node("image_corpus")[0].metadata
    assert written[SETTINGS_VERSION_KEY].value != spec.metadata[SETTINGS_VERSION_KEY]
    warnings = [
        e.message
        for e in instance.all_logs(result.run_id)
        if e.level >= 30 and "differ from the code location" in (e.message or "")
    ]
    assert warnings, "the override was not warned about"


# -- new shards overnight ------------------------------------------------------------------------


def test_a_new_shard_is_registered_and_only_it_flows_downstream(corpus_run) -> None:
    root, _, source, defs, instance, _ = corpus_run
    start = dg.evaluate_automation_conditions(defs, instance)  # the sensor's first tick
    factory.write_wds_shard(root / "corpus" / "00002.tar", factory.good_items(2, 50))
    sensor = defs.resolve_sensor_def("new_shards_sensor")
    context = dg.build_sensor_context(
        instance=instance, resources={"corpus_source": source, "catalog": defs.resources["catalog"]}
    )
    tick = sensor(context)
    assert [r.partition_key for r in tick.run_requests] == ["00002"]
    assert _run_corpus(defs, instance, ["00002"]).success
    after = dg.evaluate_automation_conditions(defs, instance, cursor=start.cursor)
    assert _requested(after) == {
        "clip_image_embeddings": ["00002"],
        "dino_image_embeddings": ["00002"],
        "caption_text_embeddings": ["00002"],
    }


# -- a blocking check fails on one shard ---------------------------------------------------------


def test_automation_holds_back_only_the_shard_that_failed_a_blocking_check(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import megapairs_assets.corpus.assets as corpus_assets

    real_step = corpus_assets.build_corpus_shard

    def step_failing_on_00001(shard: str, *args: Any, **kwargs: Any):
        result = real_step(shard, *args, **kwargs)
        if shard != "00001":
            return result
        failed = CheckOutcome("corpus_ids_unique", False, "injected duplicate id", 1, ("x",))
        outcomes = [failed if o.name == failed.name else o for o in result.outcomes]
        return dataclasses.replace(result, outcomes=outcomes)

    source = _corpus(tmp_path / "corpus", SHARDS)
    defs = build_definitions("demo", tmp_path / "home", {"corpus_source": source})
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, SHARDS)
    start = dg.evaluate_automation_conditions(defs, instance)

    monkeypatch.setattr(corpus_assets, "build_corpus_shard", step_failing_on_00001)
    failed_run = _run_corpus(defs, instance, SHARDS)
    # What the user sees: the run fails on the blocking check, which names the shard.
    assert not failed_run.success
    evaluation = next(
        e for e in failed_run.get_asset_check_evaluations() if e.check_name == "corpus_ids_unique"
    )
    assert not evaluation.passed
    assert evaluation.metadata["failing_partitions"].value == "00001"

    first = dg.evaluate_automation_conditions(defs, instance, cursor=start.cursor)
    assert _requested(first) == {
        name: ["00000"]
        for name in ("clip_image_embeddings", "dino_image_embeddings", "caption_text_embeddings")
    }

    monkeypatch.setattr(corpus_assets, "build_corpus_shard", real_step)
    assert _run_corpus(defs, instance, ["00001"]).success  # fixed and re-materialized
    second = dg.evaluate_automation_conditions(defs, instance, cursor=first.cursor)
    assert _requested(second) == {
        name: ["00001"]
        for name in ("clip_image_embeddings", "dino_image_embeddings", "caption_text_embeddings")
    }
