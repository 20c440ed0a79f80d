"""A user writes their own prompt template and forgets to show the model the pair.

An instruction template whose `user` message was rewritten without `{description}` loaded,
passed the resource's start-up check and sent every pair of a shard the same question; the
model's answers then had nothing to do with the pairs. Such templates are now refused when
loaded, naming the field and the placeholder.
"""

from __future__ import annotations

import dagster as dg
import pytest
from fault_server import ChatServer
from generation_fixtures import STEPS, http_settings, make_world, run_all, with_template

from megapairs_assets.generation.common import INSTRUCTIONS_ASSET, TRIPLETS_ASSET
from megapairs_assets.generation.prompts import PROMPTS_DIR, TemplateError, load_template
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.generation.settings import paper_generation_settings


def _variant(tmp_path, shipped: str, old: str, new: str):
    text = (PROMPTS_DIR / f"{shipped}.toml").read_text(encoding="utf-8")
    assert old in text
    tmp_path.mkdir(parents=True, exist_ok=True)
    path = tmp_path / f"my_{shipped}.toml"
    path.write_text(text.replace(old, new), encoding="utf-8")
    return path


def test_a_template_that_hides_the_pair_is_refused_when_loaded(tmp_path):
    no_description = _variant(
        tmp_path, "instructions", 'user = "Description: {description}"', 'user = "Write queries."'
    )
    with pytest.raises(TemplateError, match=r"user never uses \{description\}"):
        load_template(no_description)
    one_caption = _variant(
        tmp_path, "describe_captions", "Target image caption: {target_caption}", "Target image:"
    )
    with pytest.raises(TemplateError, match=r"user_parts never uses \{target_caption\}"):
        load_template(one_caption)
    one_picture = _variant(tmp_path, "describe_images", '{ image = "target" },', "")
    with pytest.raises(TemplateError, match=r'lacks \{ image = "target" \}'):
        load_template(one_picture)
    # Rewording that keeps what the model must see loads, with a new hash (a new request key).
    reworded = _variant(
        tmp_path,
        "instructions",
        'user = "Description: {description}"',
        'user = "Pair: {description}"',
    )
    assert load_template(reworded).hash != load_template("instructions").hash


def test_the_resource_refuses_it_before_any_work_and_says_where_names_are_looked_up(tmp_path):
    no_description = _variant(
        tmp_path, "instructions", 'user = "Description: {description}"', 'user = "Write queries."'
    )
    resource = GenerationResource.from_settings(paper_generation_settings())
    fields = {name: getattr(resource, name) for name in type(resource).model_fields}
    mine = GenerationResource(**{**fields, "instruct_template": str(no_description)})
    with pytest.raises(TemplateError, match=str(no_description)):
        mine.setup_for_execution(dg.build_init_resource_context())
    by_name = GenerationResource(**{**fields, "describe_template": "my_describe"})
    with pytest.raises(TemplateError, match=r"give a path ending \.toml for a file elsewhere"):
        by_name.setup_for_execution(dg.build_init_resource_context())


def test_instruction_counts_are_checked_when_loaded_and_against_the_pool(tmp_path):
    # Before: each of these loaded and passed start-up, then the step broke (KeyError,
    # ValueError) or quarantined every pair (min above max: no answer could pass).
    bad = {
        "words": ("demos_per_request = 5", 'demos_per_request = "five"', "whole number >= 1"),
        "zero": ("min_instructions = 3", "min_instructions = 0", "whole number >= 1"),
        "inverted": ("min_instructions = 3", "min_instructions = 6", "no answer could pass"),
    }
    for name, (old, new, expected) in bad.items():
        path = _variant(tmp_path / name, "instructions", old, new)
        with pytest.raises(TemplateError, match=expected):
            load_template(path)
    # Left out, a count takes the method's value.
    default = load_template(_variant(tmp_path / "d", "instructions", "demos_per_request = 5", ""))
    assert default.instruction_count("demos_per_request") == 5

    many = _variant(
        tmp_path / "m", "instructions", "demos_per_request = 5", "demos_per_request = 80"
    )
    resource = GenerationResource.from_settings(paper_generation_settings())
    fields = {name: getattr(resource, name) for name in type(resource).model_fields}
    with pytest.raises(TemplateError, match="asks for 80 demonstrations per request; the pool"):
        GenerationResource(**{**fields, "instruct_template": str(many)}).setup_for_execution(
            dg.build_init_resource_context()
        )


def test_a_template_asking_for_two_instructions_passes_the_triplet_checks(tmp_path):
    """Before: pair_instructions kept pairs with the template's two instructions, then the
    blocking triplets check held them to the default three and failed the shard."""
    two = _variant(tmp_path, "instructions", "min_instructions = 3", "min_instructions = 2")
    world = make_world(tmp_path, pairs_per_shard=(3,))

    def answer(body: dict) -> str:
        if "JSON list" in str(body["messages"]):
            return '["the same owl but at night", "this bird covered in snow"]'
        return (
            "Both images share a round owl drawn in flat colours; however, the source image "
            "shows it by day, whereas the target image shows it at night under the moon."
        )

    with ChatServer(responder=answer) as server:
        settings = with_template(http_settings(server.base_url), "instruct", str(two))
        results = run_all(world, settings, "00000", STEPS[:3])
    assert results[INSTRUCTIONS_ASSET].row_count == 3
    triplets = results[TRIPLETS_ASSET]
    assert triplets.row_count == 3
    failed = [o for o in triplets.outcomes if not o.passed]
    assert failed == []
    assert triplets.config["min_instructions"] == 2
