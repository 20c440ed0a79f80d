"""Parsing and filtering model output: nasty answers recovered, every rejection with a reason."""

from __future__ import annotations

import pytest

from megapairs_assets.generation.parsing import (
    REASON_BEYOND_MAX,
    REASON_COPIES_DESCRIPTION,
    REASON_DESCRIPTION_LONG,
    REASON_DESCRIPTION_SHORT,
    REASON_DUPLICATE,
    REASON_EMPTY_INSTRUCTION,
    REASON_EMPTY_OUTPUT,
    REASON_NAMES_IMAGE,
    REASON_NO_LIST,
    REASON_TOO_LONG,
    REASON_TRUNCATED,
    DescriptionLimits,
    InstructionLimits,
    check_description,
    clean_description,
    filter_instructions,
    parse_instruction_list,
)

DESCRIPTION = (
    "Both images show a red car on a road; however, the source image has it parked in daylight, "
    "whereas the target image shows it racing at night with its headlights on."
)


@pytest.mark.parametrize(
    ("text", "expected", "how"),
    [
        ('["a", "b c", "d"]', ("a", "b c", "d"), "json"),
        (
            'Sure! Here are some queries:\n["the same car at night", "this with lights on"]\nHope '
            "this helps [1].",
            ("the same car at night", "this with lights on"),
            "json",
        ),
        (
            '```json\n[\n  "the same car at night",\n  "this, racing"\n]\n```',
            ("the same car at night", "this, racing"),
            "json",
        ),
        (
            '["the same car at night", "this with its lights on", "similar car rac',
            ("the same car at night", "this with its lights on"),
            "json_truncated",
        ),
        (
            "Queries:\n1. the same car at night\n2) this with lights on\n- similar car racing",
            ("the same car at night", "this with lights on", "similar car racing"),
            "numbered",
        ),
        ("['the dog\\'s twin', 'this in snow']", ("the dog's twin", "this in snow"), "python_list"),
        ('{"instructions": ["one query", "two query"]}', ("one query", "two query"), "json"),
        ('[{"query": "the same at night"}, {"text": "this racing"}]', None, "json"),
        ('["with \\"escaped\\" quotes", "and unicode caf\\u00e9"]', None, "json"),
    ],
)
def test_lists_recovered_from_nasty_answers(text, expected, how):
    parsed = parse_instruction_list(text)
    assert parsed.reason is None
    assert parsed.how == how
    if expected is not None:
        assert parsed.items == expected
    else:
        assert len(parsed.items) == 2


@pytest.mark.parametrize(
    ("text", "reason"),
    [
        (None, REASON_EMPTY_OUTPUT),
        ("   \n ", REASON_EMPTY_OUTPUT),
        ("I cannot help with that request.", REASON_NO_LIST),
        ("[]", REASON_NO_LIST),
        ("[1, 2, 3]", REASON_NO_LIST),
    ],
)
def test_answers_without_a_list_are_rejected_with_a_reason(text, reason):
    parsed = parse_instruction_list(text)
    assert parsed.items == ()
    assert parsed.reason == reason


def test_filters_reject_each_bad_instruction_with_its_reason():
    items = [
        "the same car at night.",
        '  "The same car at NIGHT"  ',
        "",
        "the target image but at night",
        "like image 2 with lights",
        "the first picture, racing",
        " ".join(["word"] * 30),
        "the source image has it parked in daylight",
        "whereas the target image shows it racing at night with its headlights on",
        "this with headlights glowing",
        "similar car speeding after sunset",
    ]
    kept, rejections = filter_instructions(items, DESCRIPTION, InstructionLimits())
    assert kept == [
        "the same car at night",
        "this with headlights glowing",
        "similar car speeding after sunset",
    ]
    reasons = [r.reason for r in rejections]
    assert reasons == [
        REASON_DUPLICATE,
        REASON_EMPTY_INSTRUCTION,
        REASON_NAMES_IMAGE,
        REASON_NAMES_IMAGE,
        REASON_NAMES_IMAGE,
        REASON_TOO_LONG,
        REASON_NAMES_IMAGE,
        REASON_NAMES_IMAGE,
    ]
    assert all(r.detail for r in rejections)


def test_copying_the_description_is_rejected_even_without_naming_an_image():
    description = "Both images share a wooden table; however one has candles and tulips on it."
    kept, rejections = filter_instructions(
        ["however one has candles and tulips on it", "the same table with candles"],
        description,
        InstructionLimits(),
    )
    assert kept == ["the same table with candles"]
    assert [r.reason for r in rejections] == [REASON_COPIES_DESCRIPTION]


def test_valid_instructions_beyond_the_maximum_are_rejected_not_silently_dropped():
    items = [f"the same thing with {n} extra hats" for n in range(7)]
    kept, rejections = filter_instructions(
        items, DESCRIPTION, InstructionLimits(max_instructions=5)
    )
    assert len(kept) == 5
    assert [r.reason for r in rejections] == [REASON_BEYOND_MAX, REASON_BEYOND_MAX]


def test_description_checks_and_cleaning():
    limits = DescriptionLimits(min_words=12, max_words=40)
    assert check_description(DESCRIPTION, limits) is None
    assert check_description("Both show a car.", limits).reason == REASON_DESCRIPTION_SHORT
    assert (
        check_description(DESCRIPTION + " " + DESCRIPTION, limits).reason == REASON_DESCRIPTION_LONG
    )
    cut = DESCRIPTION[:-40]
    assert check_description(cut, limits, finish_reason="length").reason == REASON_TRUNCATED
    # A finished sentence at the limit is fine; the same text stopped naturally too.
    assert check_description(DESCRIPTION, limits, finish_reason="length") is None
    assert check_description(cut, limits, finish_reason="stop") is None
    chatty = f'Sure, here is the comparison:\n"{DESCRIPTION}"'
    assert clean_description(chatty) == DESCRIPTION
    assert clean_description(f"```\n{DESCRIPTION}\n```") == DESCRIPTION
