"""Answers in another language are quarantined as `wrong_language`.

Multilingual models drift into another language (InternVL2 sometimes describes a pair in
Chinese); such text passed every length and wording filter. Descriptions and instructions from
a model are now checked against the settings' answer_language (default English; '' is off).
"""

from __future__ import annotations

import json
from dataclasses import replace

import pytest
from fault_server import ChatServer, canned_answer
from generation_fixtures import STEPS, http_settings, make_world, run_all, with_template

from megapairs_assets.generation.language import (
    LanguageCheck,
    language_rejection,
    require_known_language,
)
from megapairs_assets.generation.parsing import (
    DescriptionLimits,
    InstructionLimits,
    check_description,
    filter_instructions,
)
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.lib.errors import ConfigurationError

ENGLISH = LanguageCheck()
# English that a language identifier finds hard: loanwords, names, few function words.
ENGLISH_TEXTS = [
    "Both images share a cartoon style; however, the source image shows a penguin on ice, "
    "whereas the target image shows a brown bear holding a fish.",
    "the same café interior at night",
    "a samurai helmet in gold",
    "Paella in a pan",
    "Same pizza but margherita",
    "similar jack-o-lantern",
    "this chihuahua but with a sombrero",
    "Déjà vu poster",
    "Safari jeep",
    "the same 猫 sign in the snow",  # one foreign word in an English query
]
FOREIGN_TEXTS = [
    "两张图片都有卡通风格；然而，源图片显示一只企鹅，而目标图片显示一只熊。",
    "同样的猫",  # short, but not in the Latin alphabet at all
    "同じ車、でも赤い",
    "Та же машина, но красная",
    "Trouvez le même hibou mais assis sur une branche",
    "Finde die gleiche Eule, aber auf einem Ast",
    "Encuentra el mismo búho pero sentado en una rama",
    "Les deux images partagent un style de dessin animé; cependant, l'image source montre un "
    "pingouin, tandis que l'image cible montre un ours brun.",
]


@pytest.mark.parametrize("text", ENGLISH_TEXTS)
def test_english_is_kept(text):
    assert language_rejection(text, ENGLISH) is None


@pytest.mark.parametrize("text", FOREIGN_TEXTS)
def test_other_languages_are_caught(text):
    assert language_rejection(text, ENGLISH) is not None


def test_the_reasons_say_why_and_the_check_can_be_turned_off():
    script = language_rejection("两张图片都有卡通风格；然而，源图片显示一只企鹅。", ENGLISH)
    assert "not Latin (mostly CJK)" in script
    identified = language_rejection("Trouvez le même hibou mais assis sur une branche", ENGLISH)
    assert identified.startswith("language identifier: 'fr'")
    # Too short to judge in the same alphabet: a documented limit, not a false reject.
    assert language_rejection("Même hibou", ENGLISH) is None
    off = LanguageCheck(target="")
    assert language_rejection("两张图片都有卡通风格", off) is None
    # Another target: English is then the wrong language.
    assert language_rejection(ENGLISH_TEXTS[0], LanguageCheck(target="fr")) is not None


def test_language_settings_are_validated():
    for bad in ({"target": "english"}, {"min_confidence": 1.0}, {"min_words": 0}):
        with pytest.raises(ValueError):
            LanguageCheck(**bad)
    with pytest.raises(ConfigurationError, match="'xx' is not one the language identifier knows"):
        require_known_language(LanguageCheck(target="xx"))
    require_known_language(LanguageCheck(target=""))  # off: nothing to load or check


def test_filters_reject_with_the_reason_and_keep_the_rest():
    limits = InstructionLimits()
    kept, rejections = filter_instructions(
        [
            "the same owl on a branch",
            "Finde die gleiche Eule, aber auf einem Ast",
            "找到同样的猫，但是在雪地里",
        ],
        "a description",
        limits,
        ENGLISH,
    )
    assert kept == ["the same owl on a branch"]
    assert [r.reason for r in rejections] == ["wrong_language", "wrong_language"]
    # Without a check (the caption heuristic's rows) nothing is judged on language.
    kept, _ = filter_instructions(["Finde die gleiche Eule, aber auf einem Ast"], "", limits)
    assert kept == ["Finde die gleiche Eule, aber auf einem Ast"]
    rejection = check_description(FOREIGN_TEXTS[-1], DescriptionLimits(), "stop", ENGLISH)
    assert rejection is not None and rejection.reason == "wrong_language"


ZH_DESCRIPTION = (
    "两张图片都展示了一只卡通动物。不同之处在于，第一张图片中的动物站在冰上，而第二张图片中的动物"
    "拿着一条鱼，背景是一条河。"
)
TEAPOT_DESCRIPTION = (
    "Both images share a teapot drawn in a simple style; however, the source image shows it "
    "on a plain background, whereas the target image shows it next to a cup."
)
DE_INSTRUCTIONS = [
    "Finde die gleiche Kanne, aber aus Glas",
    "Diese Kanne mit einem blauen Hintergrund",
    "Eine ähnliche Kanne auf einem Holztisch",
]


def _drifting(body: dict) -> str:
    """A model that drifts: Chinese descriptions for owl pairs, German queries for teapots."""
    messages = json.dumps(body.get("messages"), ensure_ascii=False)
    last = json.dumps(body["messages"][-1], ensure_ascii=False)
    if "JSON list" in messages:
        return json.dumps(DE_INSTRUCTIONS) if "teapot" in last else canned_answer(body)
    if "owl" in last:
        return ZH_DESCRIPTION
    if "teapot" in last:
        return TEAPOT_DESCRIPTION
    return canned_answer(body)


def test_a_drifting_model_is_quarantined_end_to_end(tmp_path):
    world = make_world(tmp_path / "on", pairs_per_shard=(12,))
    with ChatServer(responder=_drifting) as server:
        settings = with_template(http_settings(server.base_url), "describe", "describe_captions")
        results = run_all(world, settings, "00000", steps=STEPS[:2])
    described, instructed = results["pair_descriptions"], results["pair_instructions"]
    wrong = described.rows["quarantine_log"].filter(reason="wrong_language")
    assert wrong.height >= 1 and "not Latin (mostly CJK)" in wrong["detail"][0]
    assert described.row_count == described.metadata["pairs"] - wrong.height
    # The kept descriptions are English, so only the teapot pairs' queries drift.
    log = instructed.rows["quarantine_log"]
    drifted = log.filter(reason="wrong_language")
    assert drifted.height >= 3 and set(drifted["detail"].str.extract(r"'([^']+)'$")) <= set(
        DE_INSTRUCTIONS
    )
    assert set(log["reason"]) == {"wrong_language", "too_few_instructions"}

    # With the check off, the same answers are kept (the user asked for no language check).
    off = replace(settings, answer_language=LanguageCheck(target=""))
    world_off = make_world(tmp_path / "off", pairs_per_shard=(12,))
    with ChatServer(responder=_drifting) as server:
        off = replace(
            off,
            describe=replace(off.describe, backend=_at(off.describe.backend, server.base_url)),
            instruct=replace(off.instruct, backend=_at(off.instruct.backend, server.base_url)),
        )
        results = run_all(world_off, off, "00000", steps=STEPS[:2])
    reasons = {
        reason
        for result in results.values()
        for reason in result.rows["quarantine_log"]["reason"].to_list()
    }
    # Word counts still apply: the Chinese answer is "too short" (few spaces), not judged on
    # language; the German queries pass.
    assert "wrong_language" not in reasons and "description_too_short" in reasons
    kept = results["pair_instructions"].metadata["instructions"]
    assert kept == instructed.metadata["instructions"] + drifted.height


def _at(spec, base_url):
    return replace(spec, options={**spec.options, "base_urls": [base_url]})


def test_the_resource_carries_and_checks_the_language_setting():
    settings = replace(http_settings("http://127.0.0.1:9/v1"), answer_language=LanguageCheck("fr"))
    resource = GenerationResource.from_settings(settings)
    assert resource.answer_language == "fr"
    assert resource.settings().answer_language == LanguageCheck("fr")
    bad = GenerationResource(**{**resource.model_dump(), "answer_language": "French"})
    with pytest.raises(ValueError, match="ISO 639 code"):
        bad.settings()
    # A code the identifier does not know fails before any request is sent.
    unknown = GenerationResource(**{**resource.model_dump(), "answer_language": "xx"})
    with ChatServer() as server:
        spec = _at(unknown.settings().describe.backend, server.base_url)
        unknown = GenerationResource.from_settings(
            replace(unknown.settings(), describe=replace(unknown.settings().describe, backend=spec))
        )
        with pytest.raises(ConfigurationError, match="answer language 'xx'"):
            unknown.backend_factory("describe")(spec)
        assert server.count() == 0
