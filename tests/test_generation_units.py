"""Prompts, the demonstration pool, request keys, the response store and the caption heuristic."""

from __future__ import annotations

import json
import re
from collections import Counter

import pytest

from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationResult,
    SamplingParams,
    UnknownBackendError,
    create_backend,
    request_key,
)
from megapairs_assets.generation.backends.heuristic import (
    describe_from_captions,
    instructions_from_captions,
    split_caption,
)
from megapairs_assets.generation.backends.openai_http import parse_retry_after
from megapairs_assets.generation.parsing import (
    DescriptionLimits,
    InstructionLimits,
    check_description,
    filter_instructions,
)
from megapairs_assets.generation.prompts import (
    DEMO_POOL_SIZE,
    PROMPTS_DIR,
    TEMPLATE_PLACEHOLDERS,
    TemplateError,
    demo_ids_for,
    describe_messages,
    instruction_messages,
    load_demo_pool,
    load_template,
    word_num_for,
)
from megapairs_assets.generation.settings import PairSample
from megapairs_assets.generation.store import (
    STATUS_FAILED,
    STATUS_OK,
    STATUS_QUARANTINED,
    ResponseStore,
)

_SHAPE = re.compile(
    r"^Both images .+; however, the source image .+, whereas the target image .+\.$"
)


def test_shipped_pool_has_50_demonstrations_that_obey_our_own_rules():
    pool = load_demo_pool()
    assert len(pool.demos) == DEMO_POOL_SIZE
    assert len({d.id for d in pool.demos}) == DEMO_POOL_SIZE
    limits = InstructionLimits()
    for demo in pool.demos:
        assert _SHAPE.match(demo.description), demo.id
        assert check_description(demo.description, DescriptionLimits()) is None, demo.id
        kept, rejections = filter_instructions(demo.instructions, demo.description, limits)
        assert rejections == [], (demo.id, rejections)
        assert len(kept) >= limits.min_instructions


def test_word_num_is_uniform_over_60_to_100_and_depends_on_the_pair_only():
    values = [word_num_for(0, f"pair-{i}") for i in range(4100)]
    assert min(values) == 60 and max(values) == 100
    counts = Counter(values)
    assert len(counts) == 41
    assert max(counts.values()) < 2 * min(counts.values())  # roughly flat (100 expected each)
    assert word_num_for(0, "pair-7") == values[7]
    assert [word_num_for(1, f"pair-{i}") for i in range(50)] != values[:50]


def test_demonstrations_are_five_distinct_ones_and_stable_per_pair():
    pool = load_demo_pool()
    chosen = demo_ids_for(0, "abc", pool, 5)
    assert len(set(chosen)) == 5
    assert chosen == demo_ids_for(0, "abc", pool, 5)
    everyone = Counter(d for i in range(2000) for d in demo_ids_for(0, f"p{i}", pool, 5))
    assert len(everyone) == 50  # every demonstration gets used
    with pytest.raises(ValueError):
        demo_ids_for(0, "abc", pool, 51)


def test_messages_carry_word_num_images_and_demonstrations_as_turns():
    images = describe_messages(load_template("describe_images"), 77)
    parts = images[-1]["content"]
    assert [p["ref"] for p in parts if p["type"] == "image"] == ["query", "target"]
    assert "77 words" in " ".join(p["text"] for p in parts if p["type"] == "text")
    captions = describe_messages(load_template("describe_captions"), 61, "a cat", "a dog")
    assert isinstance(captions[-1]["content"], str) and "a dog" in captions[-1]["content"]
    pool = load_demo_pool()
    demos = [pool.by_id(d) for d in demo_ids_for(0, "x", pool, 5)]
    chat = instruction_messages(load_template("instructions"), "Both images ...", demos)
    assert [m["role"] for m in chat] == ["system"] + ["user", "assistant"] * 5 + ["user"]
    assert json.loads(chat[2]["content"]) == list(demos[0].instructions)
    assert "between 3 and 5" in chat[0]["content"]


def test_every_shipped_template_loads():
    shipped = sorted(PROMPTS_DIR.glob("*.toml"))
    assert len(shipped) >= 3
    for path in shipped:
        assert load_template(path).step in TEMPLATE_PLACEHOLDERS


_DESCRIBE = """id = "t"
version = 1
step = "describe"
input_mode = "captions"
user_parts = [{{ text = {text!r} }}]
"""
_INSTRUCT = """id = "t"
version = 1
step = "instruct"
input_mode = "text"
min_instructions = 3
max_instructions = 5
system = {system!r}
demo_user = "Description: {{description}}"
user = {user!r}
"""


def test_template_placeholders_are_checked_when_loaded(tmp_path):
    def template(name: str, body: str):
        path = tmp_path / f"{name}.toml"
        path.write_text(body, encoding="utf-8")
        return path

    # Every allowed placeholder renders, and doubled braces stay literal braces.
    every = template(
        "every",
        _DESCRIBE.format(text='{word_num} {query_caption} {target_caption} {{"json": 1}}'),
    )
    rendered = describe_messages(load_template(every), 70, "a cat", "a dog")[-1]["content"]
    assert rendered == '70 a cat a dog {"json": 1}'
    chat = instruction_messages(
        load_template(
            template(
                "every_instruct",
                _INSTRUCT.format(
                    system="{min_instructions}-{max_instructions} {{x}}", user="{description}"
                ),
            )
        ),
        "D",
        [],
    )
    assert chat[0]["content"] == "3-5 {x}" and chat[-1]["content"] == "D"

    typo = template("typo", _DESCRIBE.format(text="{word_num} {target_captoin} {0} {x.y}"))
    with pytest.raises(TemplateError) as raised:
        load_template(typo)
    message = str(raised.value)
    assert str(typo) in message and "{target_captoin}" in message and "{x}" in message
    assert "{0}" in message and "{word_num}," not in message.split("allows")[0]
    assert "allows {query_caption}, {target_caption}, {word_num}" in message
    # A placeholder of another step is unknown here too.
    wrong_step = template(
        "wrong_step", _INSTRUCT.format(system="{description}", user="{description}")
    )
    with pytest.raises(TemplateError, match=r"\{description\} in system; the instruct step allows"):
        load_template(wrong_step)
    with pytest.raises(TemplateError, match="Single '}'"):
        load_template(template("unbalanced", _DESCRIBE.format(text="{word_num}} words")))


def test_request_key_changes_with_each_ingredient():
    sampling = SamplingParams(max_tokens=10)
    base = request_key("m", "t", {"a": 1}, sampling, 1)
    assert base == request_key("m", "t", {"a": 1}, SamplingParams(max_tokens=10), 1)
    variants = [
        request_key("m2", "t", {"a": 1}, sampling, 1),
        request_key("m", "t2", {"a": 1}, sampling, 1),
        request_key("m", "t", {"a": 2}, sampling, 1),
        request_key("m", "t", {"a": 1}, SamplingParams(max_tokens=11), 1),
        request_key("m", "t", {"a": 1}, sampling, 2),
    ]
    assert len({base, *variants}) == 6


def test_store_keeps_successes_counts_failures_and_quarantines_at_the_limit(tmp_path):
    store = ResponseStore(tmp_path / "s.sqlite", max_attempts=2)
    store.record(
        [
            GenerationResult("ok", text="hello", prompt_tokens=3, completion_tokens=1),
            GenerationResult("bad", error="HTTP 500"),
        ]
    )
    found = store.get(["ok", "bad", "unknown"])
    assert found["ok"].status == STATUS_OK and found["ok"].text == "hello"
    assert found["bad"].status == STATUS_FAILED and found["bad"].attempts == 1
    assert "unknown" not in found
    store.record([GenerationResult("bad", error="HTTP 503")])
    bad = store.get(["bad"])["bad"]
    assert (bad.status, bad.attempts, bad.last_error) == (STATUS_QUARANTINED, 2, "HTTP 503")
    assert store.release_quarantined() == 1
    store.record([GenerationResult("bad", text="finally")])
    assert store.get(["bad"])["bad"].status == STATUS_OK
    # A later failure never overwrites a finished response.
    store.record([GenerationResult("ok", error="late failure")])
    assert store.get(["ok"])["ok"].text == "hello"
    assert ResponseStore(tmp_path / "s.sqlite").counts() == {STATUS_OK: 2}


def test_heuristic_splits_captions_and_writes_valid_text():
    parts = split_caption("a flat drawing of a vinyl record (recreation, music)")
    assert (parts.style, parts.subject, parts.tags) == (
        "a flat drawing",
        "a vinyl record",
        ("recreation", "music"),
    )
    query = "a piece of clip art showing a bear (animals, mammals)"
    target = "an illustration of a horse (animals, horses)"
    description = describe_from_captions(query, target)
    assert _SHAPE.match(description)
    assert check_description(description, DescriptionLimits()) is None
    kept, rejections = filter_instructions(
        instructions_from_captions(query, target), description, InstructionLimits()
    )
    assert rejections == [] and len(kept) >= 3
    assert all("horse" in text for text in kept)


@pytest.mark.parametrize(
    ("query", "target"),
    [
        (  # ordinary long alt-text captions, a few sentences each (71 and 64 words)
            "A wide photograph of an old red barn standing in a green field at sunset, with "
            "a wooden fence in front and tall grass all around it. Two horses graze near the "
            "fence while a farmer walks toward the open barn door carrying a bucket of feed "
            "for the animals. The sky is orange and purple, and a few birds fly over the roof "
            "of the barn toward the dark line of trees on the far hill behind it.",
            "A detailed pencil sketch of a small stone cottage beside a river in winter, its "
            "roof covered in snow and smoke rising from the chimney into a pale grey sky. A "
            "narrow wooden bridge crosses the frozen river, and bare trees line the far bank "
            "where a fox walks alone across the snow, leaving a line of prints behind it on "
            "the white ground under the trees.",
        ),
        ("word " * 20_000, "an illustration of " + "very " * 5_000 + "long horse (animals)"),
    ],
)
def test_heuristic_text_from_long_captions_stays_inside_the_limits(query, target):
    description = describe_from_captions(query, target)
    assert check_description(description, DescriptionLimits()) is None
    kept, rejections = filter_instructions(
        instructions_from_captions(query, target), description, InstructionLimits()
    )
    assert rejections == [] and len(kept) >= 3


def test_heuristic_reads_the_first_sentence_of_alt_text():
    tail = (
        ". The drawing uses flat colors with thin dark outlines, a plain white background, and "
        "simple shading. It is centered in the frame, with generous margins on every side."
    )
    query = "a flat drawing of a vinyl record (recreation, music)" + tail
    target = "a vector-style drawing of an ice cream cone (food, desserts)" + tail
    description = describe_from_captions(query, target)
    assert "vinyl record as a flat drawing" in description
    assert "outlines" not in description
    instructions = instructions_from_captions(query, target)
    assert all("ice cream cone" in text for text in instructions)
    assert any("food theme" in text for text in instructions)


def test_pair_sample_depends_on_ids_not_on_order_or_company():
    ids = [f"p{i}" for i in range(200)]
    half = PairSample(fraction=0.5).select(ids, seed=0)
    assert 60 < len(half) < 140
    assert PairSample(fraction=0.5).select(list(reversed(ids)), seed=0) == half
    assert PairSample(fraction=0.5).select(ids[:100], seed=0) == {i for i in half if i in ids[:100]}
    assert len(PairSample(max_pairs_per_shard=7).select(ids, seed=0)) == 7


def test_registry_names_every_backend_and_refuses_unknown_ones():
    with pytest.raises(UnknownBackendError, match="known"):
        create_backend(BackendSpec("nope", "m"))
    with pytest.raises(ValueError, match="unknown options"):
        create_backend(BackendSpec("openai_http", "m", options={"base_urls": ["x"], "bogus": 1}))
    with pytest.raises(ValueError, match="GEN_TEST_KEY"):
        create_backend(
            BackendSpec(
                "openai_http", "m", options={"base_urls": ["x"], "api_key_env": "GEN_TEST_KEY"}
            )
        )


def test_retry_after_accepts_seconds_and_http_dates():
    from datetime import UTC, datetime

    now = datetime(2025, 1, 1, 12, 0, 0, tzinfo=UTC)
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 01 Jan 2025 12:00:05 GMT", now=now) == 5.0
    assert parse_retry_after("Wed, 01 Jan 2025 11:00:00 GMT", now=now) == 0.0
    assert parse_retry_after("soon") is None
    assert parse_retry_after(None) is None
