"""The generation assets in Dagster: one shard materialized through all four, checks pass, the
resource round-trips its profiles, and the triplets page shows readable examples."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world, with_template

from megapairs_assets.generation.assets import generation_assets
from megapairs_assets.generation.resource import (
    GenerationResource,
    demo_generation_resource,
    paper_generation_resource,
)
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.storage import LineageCatalogResource, StorageResource


def test_one_shard_through_the_four_generation_assets(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(5,))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])
    with ChatServer() as server:
        resources = {
            "generation": GenerationResource.from_settings(http_settings(server.base_url)),
            "storage": StorageResource(home=str(world.home), profile="test"),
            "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
        }
        result = dg.materialize(
            generation_assets,
            instance=instance,
            partition_key="00000",
            resources=resources,
            raise_on_error=False,
        )
    assert result.success
    checks = result.get_asset_check_evaluations()
    assert len(checks) == (3 + 1) + 3 + 5 + 2  # describe: 3 blocking + descriptions_varied
    assert all(c.passed for c in checks), [c.check_name for c in checks if not c.passed]
    events = {
        m.asset_key.to_user_string(): m.metadata
        for m in result.get_asset_materialization_events()
        for m in [m.event_specific_data.materialization]
    }
    assert set(events) == {"pair_descriptions", "pair_instructions", "triplets", "triplet_export"}
    examples = events["triplets"]["examples"].value
    assert "data:image/jpeg;base64," in examples and "instructions" in examples
    assert events["triplets"]["dagster/row_count"].value == 5
    lineage = world.catalog.query("SELECT count(*) AS n FROM triplet_lineage")["n"][0]
    assert lineage == 5


def test_profiles_round_trip_through_the_resource(tmp_path):
    demo = demo_generation_resource(tmp_path)
    settings = demo.settings()
    assert settings.describe.backend.backend == "transformers"
    assert settings.describe.template == "describe_captions"
    assert settings.heuristic_fill and settings.model_sample.max_pairs_per_shard
    assert GenerationResource.from_settings(settings).settings() == settings
    paper = paper_generation_resource(["http://gpu-1:8000/v1", "http://gpu-2:8000/v1"]).settings()
    assert paper.describe.backend.model_id == "OpenGVLab/InternVL2-26B"
    assert paper.instruct.backend.model_id == "meta-llama/Meta-Llama-3-8B-Instruct"
    assert paper.describe.backend.options["base_urls"][1] == "http://gpu-2:8000/v1"
    assert not paper.heuristic_fill and paper.describe.template == "describe_images"


def _setup_error(describe_template: str) -> BaseException:
    """Why a generation resource with this describe template fails its setup (a run that
    only asks for the resource does no work)."""
    resource = GenerationResource.from_settings(
        with_template(http_settings("http://127.0.0.1:9/v1"), "describe", describe_template)
    )

    @dg.asset
    def probe(generation: GenerationResource) -> None:
        return None

    with pytest.raises(dg.DagsterResourceFunctionError) as raised:
        dg.materialize([probe], resources={"generation": resource})
    cause = raised.value.__cause__
    assert isinstance(cause, ConfigurationError), cause
    return cause


def test_a_bad_template_name_fails_before_any_work():
    assert "no prompt file" in str(_setup_error("no_such_template"))


def test_a_template_with_an_unknown_placeholder_fails_before_any_work(tmp_path):
    shipped = Path(__file__).resolve().parents[1] / "megapairs_assets/generation/prompts"
    typo = tmp_path / "describe_typo.toml"
    text = (shipped / "describe_captions.toml").read_text(encoding="utf-8")
    typo.write_text(text.replace("{target_caption}", "{target_captoin}"), encoding="utf-8")
    message = str(_setup_error(str(typo)))
    assert str(typo) in message and "{target_captoin}" in message
    assert "{query_caption}, {target_caption}, {word_num}" in message


def test_a_template_set_for_the_other_step_fails_before_any_work():
    message = str(_setup_error("instructions"))
    assert "'instructions' is written for step 'instruct'" in message
    assert "the describe template" in message


def _materialize_range(world, shards: list[str], server) -> dg.ExecuteInProcessResult:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, shards)
    resources = {
        "generation": GenerationResource.from_settings(http_settings(server.base_url)),
        "storage": StorageResource(home=str(world.home), profile="test"),
        "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
    }
    return dg.materialize(
        generation_assets,
        instance=instance,
        resources=resources,
        raise_on_error=False,
        tags={
            "dagster/asset_partition_range_start": shards[0],
            "dagster/asset_partition_range_end": shards[-1],
        },
    )


def test_a_step_over_several_shards_writes_the_dataset_card_once(tmp_path, monkeypatch):
    """Each card reads every shard's figures, so one per shard would be quadratic in shards."""
    from megapairs_assets.generation import export

    world = make_world(tmp_path, pairs_per_shard=(3, 4, 5))
    rendered: list[int] = []
    render = export.render_card
    monkeypatch.setattr(
        export,
        "render_card",
        lambda figures, s: rendered.append(len(figures)) or render(figures, s),
    )
    with ChatServer() as server:
        result = _materialize_range(world, ["00000", "00001", "00002"], server)
    assert result.success
    assert rendered == [3]
    card = (world.home / "data" / "triplet_export" / "README.md").read_text()
    assert "triplets: 12" in card


def test_a_failing_shard_still_leaves_a_card_for_the_shards_before_it(tmp_path, monkeypatch):
    from megapairs_assets.generation import assets, export

    world = make_world(tmp_path, pairs_per_shard=(3, 4))
    export_shard = export.export_triplets_for_shard

    def fail_on_the_last(shard, *args, **kwargs):
        if shard == "00001":
            raise OSError("disk full")
        return export_shard(shard, *args, **kwargs)

    monkeypatch.setattr(assets, "export_triplets_for_shard", fail_on_the_last)
    with ChatServer() as server:
        result = _materialize_range(world, ["00000", "00001"], server)
    assert not result.success
    card = (world.home / "data" / "triplet_export" / "README.md").read_text()
    assert "triplets: 3" in card
