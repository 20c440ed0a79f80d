"""Answers a small real model gives when its token budget runs out.

SmolLM2-135M behind `transformers serve`, asked for a numbered list with a tight `max_tokens`,
answered `1. "..."\\n2. "..."\\n3. "What's a fun` with finish_reason "length". The last item
was kept as an instruction although the model was stopped inside it. The same model also
answered with a JSON object holding one query per key (quarantined as no_list_found) and in
Markdown (the asterisks were kept in the training text).
"""

from __future__ import annotations

import sqlite3

import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import STEPS, http_settings, make_world, quarantine_reasons, run_all

from megapairs_assets.generation.common import DESCRIPTIONS_ASSET, INSTRUCTIONS_ASSET
from megapairs_assets.generation.instruct import write_instructions_for_shard
from megapairs_assets.generation.parsing import (
    REASON_TRUNCATED,
    drop_cut_item,
    parse_instruction_list,
)
from megapairs_assets.generation.store import store_path

NUMBERED = (
    "Here are the queries:\n1. the same owl but on a snowy branch\n"
    "2. this bird with its wings spread wide\n3. similar owl drawn in bright colours\n"
    "4. the same owl perched next to a"
)


def test_a_numbered_list_cut_by_the_token_limit_loses_its_last_item():
    parsed = parse_instruction_list(NUMBERED)
    assert parsed.how == "numbered" and len(parsed.items) == 4
    kept, cut = drop_cut_item(parsed, NUMBERED, "length")
    assert kept.items == parsed.items[:3]
    assert cut is not None and cut.reason == REASON_TRUNCATED and cut.text.endswith("next to a")
    # Stopped normally, or chatter after the list: every item is whole.
    assert drop_cut_item(parsed, NUMBERED, "stop") == (parsed, None)
    closing = NUMBERED + " tree\nI hope these help"
    assert drop_cut_item(parse_instruction_list(closing), closing, "length")[1] is None
    # A JSON list cut inside a string never yields the cut string in the first place.
    cut_json = '["the same owl at night", "this bird in the snow", "similar owl but'
    parsed_json = parse_instruction_list(cut_json)
    assert drop_cut_item(parsed_json, cut_json, "length") == (parsed_json, None)


def test_the_instruction_step_quarantines_the_cut_item_with_its_reason(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(3,))

    def answer(body: dict) -> str:
        if "JSON list" in str(body["messages"]):
            return NUMBERED
        return (
            "Both images share a round owl drawn in flat colours; however, the source image "
            "shows it by day, whereas the target image shows it at night under the moon."
        )

    with ChatServer(responder=answer) as server:
        settings = http_settings(server.base_url)
        run_all(world, settings, "00000", STEPS[:2])
    # The server stopped every instruction answer at its token limit (what the real model did).
    with sqlite3.connect(store_path(world.layout, "00000", "instruct")) as con:
        con.execute("UPDATE responses SET finish_reason = 'length'")
    result = write_instructions_for_shard("00000", world.layout, world.catalog, settings)
    assert result.metadata["model_calls"] == 0  # read from the cache
    assert quarantine_reasons(result) == {REASON_TRUNCATED: 3}
    rows = pl.read_parquet(result.outputs["instructions"])
    assert rows.height == 3
    assert all(len(items) == 3 for items in rows["instructions"])
    assert not any("next to a" in item for items in rows["instructions"] for item in items)


# Shapes SmolLM2-135M-Instruct gave: a JSON object with one query per key, and Markdown.
OBJECT_ANSWER = (
    '```json\n{"search_query1": "the same owl but at night", '
    '"search_query2": "this bird covered in snow", "search_query3": "similar owl wearing a hat"}'
)
MARKDOWN_ANSWER = (
    "1. **The same owl but at night**\n2. *this bird covered in snow*\n"
    "3. **Query 3:** similar owl wearing a hat"
)
MARKDOWN_DESCRIPTION = (
    "**Both images** share a round owl drawn in flat colours; however, the *source* picture "
    "shows it by day, whereas the other one shows it at night under the moon."
)


@pytest.mark.parametrize("answer", [OBJECT_ANSWER, MARKDOWN_ANSWER])
def test_object_and_markdown_answers_become_plain_instructions(tmp_path, answer):
    world = make_world(tmp_path, pairs_per_shard=(2,))

    def respond(body: dict) -> str:
        return answer if "JSON list" in str(body["messages"]) else MARKDOWN_DESCRIPTION

    with ChatServer(responder=respond) as server:
        results = run_all(world, http_settings(server.base_url), "00000", STEPS[:2])
    descriptions = pl.read_parquet(results[DESCRIPTIONS_ASSET].outputs["descriptions"])
    assert not any("*" in text for text in descriptions["description"])
    result = results[INSTRUCTIONS_ASSET]
    assert quarantine_reasons(result) == {}
    rows = pl.read_parquet(result.outputs["instructions"])
    assert rows.height == 2
    assert rows["instructions"].to_list()[0] == [
        "the same owl but at night" if answer is OBJECT_ANSWER else "The same owl but at night",
        "this bird covered in snow",
        "similar owl wearing a hat",
    ]
