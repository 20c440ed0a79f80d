"""A rule-based generator that writes descriptions and instructions from the two captions.

No model: it splits each caption into a style ("a flat drawing"), a subject ("a guitar") and
trailing tags ("(music, instruments)"), then fills fixed sentence patterns. It exists so the
demo's training stage has volume beyond the few pairs a CPU model can write in the time
budget; every row it makes is labelled `heuristic` and the dataset card counts them apart.
It goes through the same interface, cache, parser and filters as a model, so its output is
judged by the same rules. Long captions are cut to their first clause and a few words, so a
description or an instruction built from them stays inside the filters' length limits.

Its text becomes training data, so the articles are chosen per word: "an illustration", "a
food theme", and a plural tag takes none ("on the theme of animals", never "a animals").
"""

from __future__ import annotations

import json
import re
import time
from collections.abc import Sequence
from dataclasses import dataclass

from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    register_backend,
)
from megapairs_assets.lib.words import plural

HEURISTIC_BACKEND = "heuristic"
# v2: long captions are cut (v1 copied them whole and its descriptions failed the word limit).
HEURISTIC_MODEL_ID = "caption-heuristic-v2"
_TAGS = re.compile(r"\(([^()]*)\)\s*$")
_SPLITTERS = (" showing ", " depicting ", " with ", " of ")
_ARTICLE = re.compile(r"^(?:a|an|the)\s+", re.IGNORECASE)
_CLAUSE_END = re.compile(r"[.;:!?](?:\s|$)")
# Words kept of a caption part: a description carries two subjects and two styles in about 30
# words of its own (DescriptionLimits allows 150). An instruction carries one subject and three
# or more words of its own: at most 8 subject words keep it under 25 words, and under the copy
# rule (80% of an instruction's words in one run of the description is a copy).
_STYLE_WORDS, _SUBJECT_WORDS, _INSTRUCTION_SUBJECT_WORDS = 8, 25, 8
# Words whose spelling misleads the a/an rule: a vowel letter sounding as a consonant ("a
# unicorn", "a one-line drawing") or a silent h ("an hour").
_CONSONANT_SOUND_STARTS = ("uni", "use", "usu", "uti", "ure", "euro", "eu", "one", "once")
_VOWEL_SOUND_STARTS = ("hour", "honest", "honour", "honor", "heir")
# Plurals not ending in s, and words ending in s that are not plurals ("electronics").
_IRREGULAR_PLURALS = frozenset({"people", "children", "men", "women", "mice", "geese", "feet"})
_SINGULAR_S_ENDINGS = ("ss", "us", "is", "ics", "news")
# Nouns with no plural: "both clip art", not "both clip arts".
_UNCOUNTABLE = frozenset({"art", "artwork", "clipart", "line art", "pixel art"})


@dataclass(frozen=True)
class CaptionParts:
    """A caption split into style, subject and tags (each possibly empty)."""

    style: str
    subject: str
    tags: tuple[str, ...]


def split_caption(caption: str) -> CaptionParts:
    """Split "a flat drawing of a vinyl record (recreation, music)" into its parts."""
    text = " ".join(caption.split())
    tags: tuple[str, ...] = ()
    match = _TAGS.search(text)
    if match:
        tags = tuple(t.strip() for t in match.group(1).split(",") if t.strip())
        text = text[: match.start()].strip()
    for splitter in _SPLITTERS:
        head, found, tail = text.partition(splitter)
        if found and head and tail:
            return CaptionParts(style=head.strip(), subject=tail.strip(), tags=tags)
    return CaptionParts(style="", subject=text, tags=tags)


def _brief(phrase: str, max_words: int) -> str:
    """The phrase's first clause, at most `max_words` words (whole words, no dangling comma)."""
    first = _CLAUSE_END.split(phrase, maxsplit=1)[0].strip()
    words = first.split()
    if len(words) <= max_words:
        return first
    return " ".join(words[:max_words]).rstrip(",;:-")


def _bare(phrase: str) -> str:
    return _ARTICLE.sub("", phrase).strip()


def indefinite_article(phrase: str) -> str:
    """The article, a or an, for the first word of `phrase` (by its sound, as spelt)."""
    word = phrase.strip().lower()
    if word.startswith(_VOWEL_SOUND_STARTS):
        return "an"
    if word.startswith(_CONSONANT_SOUND_STARTS):
        return "a"
    return "an" if word[:1] in "aeiou" and word[:1] else "a"


def with_article(phrase: str) -> str:
    """`phrase` after "a" or "an" ("an illustration", "a flat drawing")."""
    return f"{indefinite_article(phrase)} {phrase}"


def is_plural(phrase: str) -> bool:
    """Whether a tag names several things ("animals", "signs and symbols") rather than one
    subject ("food", "electronics"); decides whether it may follow "a" or "an"."""
    words = phrase.strip().lower().split()
    if not words:
        return False
    if " and " in f" {phrase.lower()} ":
        return True
    last = words[-1]
    if last in _IRREGULAR_PLURALS:
        return True
    return last.endswith("s") and not last.endswith(_SINGULAR_S_ENDINGS)


def plural_phrase(phrase: str) -> str:
    """The plural of a noun phrase: its head noun (before any "of") made plural ("flat
    drawings", "pieces of clip art"); an uncountable noun stays as it is ("clip art")."""
    head, of, rest = phrase.partition(" of ")
    if not head.split() or head.lower() in _UNCOUNTABLE or head.lower().split()[-1:] == ["art"]:
        return phrase
    *before, noun = head.split()
    return " ".join([*before, plural(2, noun).split(" ", 1)[1]]) + (of + rest if of else "")


def _theme_phrase(theme: str) -> str:
    """`on a food theme`, `on an education theme`, `on the theme of animals`."""
    if is_plural(theme):
        return f"on the theme of {theme}"
    return f"on {with_article(theme)} theme"


def _join(words: Sequence[str]) -> str:
    if len(words) <= 1:
        return "".join(words)
    return ", ".join(words[:-1]) + " and " + words[-1]


def _caption_parts(caption: str) -> CaptionParts:
    """The parts of a caption's first clause (alt text often goes on for sentences), each cut
    to a few words."""
    parts = split_caption(_CLAUSE_END.split(" ".join(caption.split()), maxsplit=1)[0])
    return CaptionParts(
        style=_brief(parts.style, _STYLE_WORDS),
        subject=_brief(parts.subject, _SUBJECT_WORDS),
        tags=tuple(_brief(tag, 3) for tag in parts.tags),
    )


def describe_from_captions(query_caption: str, target_caption: str) -> str:
    """A description in the paper's shape (common points; source differences; target's)."""
    query, target = _caption_parts(query_caption), _caption_parts(target_caption)
    shared_tags = [t for t in query.tags if t in target.tags][:3]
    if shared_tags:
        common = f"the theme of {_join(shared_tags)}"
    elif query.subject and _bare(query.subject) == _bare(target.subject):
        common = f"the same subject, {_bare(target.subject)}"
    else:
        common = "a general visual resemblance in their content"
    if query.style and _bare(query.style) == _bare(target.style):
        common += f" and are both {plural_phrase(_bare(target.style))}"
    query_style = f" as {query.style}" if query.style else ""
    target_style = f" as {target.style}" if target.style else ""
    return (
        f"Both images share {common}; however, the source image shows "
        f"{query.subject or 'its own content'}{query_style}, whereas the target image shows "
        f"{target.subject or 'different content'}{target_style}."
    )


def instructions_from_captions(query_caption: str, target_caption: str) -> list[str]:
    """Three to four short queries that lead from the query image to the target image."""
    query, target = _caption_parts(query_caption), _caption_parts(target_caption)
    subject = _brief(target.subject or target_caption, _INSTRUCTION_SUBJECT_WORDS)
    same_subject = _bare(query.subject) == _bare(target.subject)
    queries: list[str] = []
    if same_subject and target.style:
        queries += [
            f"this drawn as {target.style}",
            f"the same subject rendered as {target.style}",
            f"{with_article(_bare(target.style))} version of this",
        ]
    else:
        queries += [
            f"the same kind of picture but showing {subject}",
            f"{subject} instead of this",
        ]
        theme = target.tags[0] if target.tags else ""
        queries.append(
            f"something similar {_theme_phrase(theme)} featuring {subject}"
            if theme
            else f"something similar featuring {subject}"
        )
        if target.style and _bare(target.style) != _bare(query.style):
            queries.append(f"{subject}, in {_bare(target.style)} style")
    return queries


@register_backend(HEURISTIC_BACKEND)
class HeuristicBackend:
    """Caption templates as a backend: step `describe` writes a description, `instruct` a list.

    Reads `query_caption` and `target_caption` from each request's `inputs`.
    """

    accepts_images = False

    def __init__(self, spec: BackendSpec) -> None:
        self.name = HEURISTIC_BACKEND
        self.model_id = spec.model_id or HEURISTIC_MODEL_ID

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback) -> None:
        for request in requests:
            started = time.perf_counter()
            query_caption = request.inputs.get("query_caption")
            target_caption = request.inputs.get("target_caption")
            if not query_caption or not target_caption:
                on_result(
                    [
                        GenerationResult(
                            key=request.key,
                            error="heuristic needs both captions; one is missing",
                            model_id=self.model_id,
                        )
                    ]
                )
                continue
            if request.step == "describe":
                text = describe_from_captions(query_caption, target_caption)
            else:
                text = json.dumps(instructions_from_captions(query_caption, target_caption))
            on_result(
                [
                    GenerationResult(
                        key=request.key,
                        text=text,
                        finish_reason="stop",
                        latency_s=time.perf_counter() - started,
                        model_id=self.model_id,
                    )
                ]
            )

    def close(self) -> None:
        return None
