"""Reading model output: the instruction list inside chatter, and the filters (method.md §4-5).

Models rarely answer with a clean JSON list: they add a preamble, wrap the list in a Markdown
fence, number the items, or run out of tokens mid-list. `parse_instruction_list` recovers the
items from all of these. `filter_instructions` and `check_description` then apply the rules;
every rejected item gets a short reason code (the `REASON_*` constants) that lands in the
quarantine table, so nothing is dropped silently. Both take an optional `LanguageCheck`
(language.py): a model's answer in another language is `wrong_language`.
"""

from __future__ import annotations

import ast
import difflib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass

from megapairs_assets.generation.language import (
    REASON_WRONG_LANGUAGE,
    LanguageCheck,
    language_rejection,
)

# Rejection reasons (quarantine_log.reason). Request-level failures come from the runner.
REASON_EMPTY_OUTPUT = "empty_output"
REASON_NO_LIST = "no_list_found"
REASON_EMPTY_INSTRUCTION = "empty_instruction"
REASON_DUPLICATE = "duplicate_instruction"
REASON_TOO_LONG = "instruction_too_long"
REASON_TOO_SHORT = "instruction_too_short"
REASON_NAMES_IMAGE = "names_image_position"
REASON_COPIES_DESCRIPTION = "copies_description"
REASON_BEYOND_MAX = "beyond_max_instructions"
REASON_TOO_FEW = "too_few_instructions"
REASON_DESCRIPTION_EMPTY = "description_empty"
REASON_DESCRIPTION_SHORT = "description_too_short"
REASON_DESCRIPTION_LONG = "description_too_long"
REASON_TRUNCATED = "output_truncated"
REASON_REQUEST_FAILED = "request_failed"
REASON_REQUEST_QUARANTINED = "request_quarantined"
REASON_MISSING_IMAGE = "missing_image"
REASON_MISSING_CAPTION = "missing_caption"
REASON_NO_DESCRIPTION = "no_description"

# "the source image", "target picture", "first photo", "image 1", "image #2", "image one"...
_NAMES_IMAGE = re.compile(
    r"\b(?:source|target|first|second|1st|2nd)\s+(?:image|picture|photo|pic)s?\b"
    r"|\b(?:image|picture|photo|pic)\s*(?:#\s*|no\.?\s*)?(?:1|2|one|two)\b",
    re.IGNORECASE,
)
_FENCE = re.compile(r"```[a-zA-Z0-9_-]*\s*\n?(.*?)(?:```|$)", re.DOTALL)
_LIST_ITEM = re.compile(r"^\s*(?:\(?\d{1,2}[.):]|[-*•·])\s+(.+?)\s*$")
_DOUBLE_QUOTED = re.compile(r'"((?:[^"\\\n]|\\.)*)"')
_WORD = re.compile(r"[\w']+")
_ITEM_KEYS = ("instruction", "query", "text", "q")
_LEAD_IN = re.compile(
    r"^\s*(?:sure|certainly|okay|ok|of course|here(?:'s| is| are)|answer|description)\b"
    r"[^\n]*:\s*\n",
    re.IGNORECASE,
)
_SENTENCE_END = (".", "!", "?", '"', "'", ")")
_STRONG = re.compile(r"(\*\*|__)(\S(?:.*?\S)?)\1")
_EMPHASIS = re.compile(r"(?<![\w*])([*_])(\S(?:.*?\S)?)\1(?![\w*])")
# "Query 2:", "Instruction #1 -", "Search query:" before an item's text.
_ITEM_LABEL = re.compile(
    r"^(?:search\s+)?(?:query|instruction|q)\s*#?\s*\d{0,2}\s*[:\-–]\s+", re.IGNORECASE
)


@dataclass(frozen=True)
class ParsedList:
    """Items recovered from an answer and how (`json`, `json_object`, `json_truncated`,
    `python_list`, `numbered`), or a `reason` when nothing list-like was found."""

    items: tuple[str, ...]
    how: str | None
    reason: str | None = None


def parse_instruction_list(text: str | None) -> ParsedList:
    """Recover the list of instructions from raw model output.

    Tried in order, on the first fenced block if there is one, else on the whole text:
    a JSON list (first `[` that decodes), a Python-literal list, a truncated JSON list (the
    complete string literals after the last unmatched `[`), numbered or bulleted lines.
    """
    if text is None or not text.strip():
        return ParsedList((), None, REASON_EMPTY_OUTPUT)
    fenced = _FENCE.search(text)
    body = fenced.group(1) if fenced and fenced.group(1).strip() else text
    for parse in (_json_list, _python_list, _truncated_json_list, _line_list):
        found = parse(body)
        if found is not None and found.items:
            return found
    if body is not text:  # the fence held something else; the list may sit outside it
        for parse in (_json_list, _python_list, _truncated_json_list, _line_list):
            found = parse(text)
            if found is not None and found.items:
                return found
    return ParsedList((), None, REASON_NO_LIST)


def drop_cut_item(
    parsed: ParsedList, text: str | None, finish_reason: str | None
) -> tuple[ParsedList, Rejection | None]:
    """A numbered or bulleted list whose last item runs to the end of an answer that the token
    limit stopped (`finish_reason == "length"`) loses that item: it was cut mid-way ("3. Find
    the same owl but"). JSON lists need no such care: a cut string literal is never read.

    Returns the list to use and the rejection of the dropped item, if any.
    """
    if finish_reason != "length" or parsed.how != "numbered" or not parsed.items or not text:
        return parsed, None
    last_line = text.rstrip().splitlines()[-1]
    match = _LIST_ITEM.match(last_line)
    if match is None or match.group(1) != parsed.items[-1]:
        return parsed, None  # the answer went on after the list: its last item is whole
    cut = parsed.items[-1]
    rejection = Rejection(cut, REASON_TRUNCATED, "stopped by the token limit inside this item")
    return ParsedList(parsed.items[:-1], parsed.how, parsed.reason), rejection


def _coerce_items(values: Sequence[object]) -> tuple[str, ...]:
    items = []
    for value in values:
        if isinstance(value, str):
            items.append(value)
        elif isinstance(value, dict):
            for key in _ITEM_KEYS:
                if isinstance(value.get(key), str):
                    items.append(value[key])
                    break
        elif isinstance(value, int | float):
            continue  # stray numbers ("1", "2") are list numbering, not queries
    return tuple(items)


def _json_list(body: str) -> ParsedList | None:
    decoder = json.JSONDecoder()
    for match in re.finditer(r"\[", body):
        try:
            value, _ = decoder.raw_decode(body, match.start())
        except ValueError:
            continue
        if isinstance(value, list):
            items = _coerce_items(value)
            if items:
                return ParsedList(items, "json")
        elif isinstance(value, dict):
            continue
    # {"instructions": [...]} style answers, and {"query1": "...", "query2": "..."}: an object
    # of strings only, one query per key (what SmolLM2-135M answers)
    for match in re.finditer(r"\{", body):
        try:
            value, _ = decoder.raw_decode(body, match.start())
        except ValueError:
            continue
        if isinstance(value, dict):
            for inner in value.values():
                if isinstance(inner, list) and _coerce_items(inner):
                    return ParsedList(_coerce_items(inner), "json")
            if value and all(isinstance(inner, str) for inner in value.values()):
                return ParsedList(tuple(value.values()), "json_object")
    return None


def _python_list(body: str) -> ParsedList | None:
    for match in re.finditer(r"\[[^\[\]]*\]", body, re.DOTALL):
        try:
            value = ast.literal_eval(match.group(0))
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            continue
        if isinstance(value, list | tuple) and _coerce_items(list(value)):
            return ParsedList(_coerce_items(list(value)), "python_list")
    return None


def _truncated_json_list(body: str) -> ParsedList | None:
    start = body.rfind("[")
    if start < 0 or "]" in body[start:]:
        return None
    items = []
    for match in _DOUBLE_QUOTED.finditer(body[start:]):
        try:
            items.append(json.loads(f'"{match.group(1)}"'))
        except ValueError:
            continue
    return ParsedList(tuple(items), "json_truncated") if items else None


def _line_list(body: str) -> ParsedList | None:
    items = [m.group(1) for line in body.splitlines() if (m := _LIST_ITEM.match(line))]
    return ParsedList(tuple(items), "numbered") if items else None


# -- cleaning and filters -----------------------------------------------------------------


def clean_instruction(text: str) -> str:
    """Collapse whitespace; drop Markdown emphasis, a leading "Query 2:" label, wrapping quotes
    and a trailing period or comma (small models often answer in Markdown)."""
    cleaned = strip_markdown_emphasis(" ".join(text.split()))
    for _ in range(2):
        cleaned = cleaned.strip().strip("\"'`“”‘’").strip()
        cleaned = _ITEM_LABEL.sub("", cleaned, count=1)
    return cleaned.rstrip(".,;").strip()


def strip_markdown_emphasis(text: str) -> str:
    """`**bold**`, `__bold__`, `*italic*` and `_italic_` become their plain words (an
    underscore inside a word, as in snake_case, stays)."""
    text = _STRONG.sub(r"\2", text)
    return _EMPHASIS.sub(r"\2", text)


def _words(text: str) -> list[str]:
    return [w.lower() for w in _WORD.findall(text)]


def normalised(text: str) -> str:
    """Lower-case words joined by single spaces: what duplicates are compared on."""
    return " ".join(_words(text))


@dataclass(frozen=True)
class InstructionLimits:
    """Bounds an instruction must meet. Words are counted as runs of letters/digits."""

    min_words: int = 2
    max_words: int = 25
    max_chars: int = 200
    min_instructions: int = 3
    max_instructions: int = 5
    # An instruction of at least `copy_min_words` words that lies (for `copy_coverage` of its
    # words) in one contiguous run of the description copies a clause instead of querying;
    # shorter overlaps are normal (the query names what the target shows).
    copy_min_words: int = 8
    copy_coverage: float = 0.8
    # ...and an answer this similar to the whole description is a copy at any length.
    copy_similarity: float = 0.85


@dataclass(frozen=True)
class Rejection:
    """One rejected item: the text, a reason code, and a human-readable detail."""

    text: str
    reason: str
    detail: str


def filter_instructions(
    items: Sequence[str],
    description: str,
    limits: InstructionLimits,
    language: LanguageCheck | None = None,
) -> tuple[list[str], list[Rejection]]:
    """Apply the instruction rules; returns (kept in order, rejections with reasons).

    At most `limits.max_instructions` are kept; later valid ones are rejected as
    `beyond_max_instructions`. Fewer than `min_instructions` is judged by the caller, which
    rejects the pair as a whole (`too_few_instructions`). With `language`, an instruction in
    another language is rejected as `wrong_language` (model answers; the caption heuristic
    writes from templates and is not checked).
    """
    kept: list[str] = []
    seen: set[str] = set()
    rejections: list[Rejection] = []
    # One matcher per description: its index of the description's words is built once.
    matcher = difflib.SequenceMatcher(None, autojunk=False)
    matcher.set_seq2(_words(description))
    for raw in items:
        text = clean_instruction(raw)
        key = normalised(text)
        reason, detail = _instruction_problem(text, matcher, limits, language)
        if reason is None and key in seen:
            reason, detail = REASON_DUPLICATE, "repeats an earlier instruction of the pair"
        if reason is None and len(kept) >= limits.max_instructions:
            reason, detail = REASON_BEYOND_MAX, f"more than {limits.max_instructions} valid"
        if reason is not None:
            rejections.append(Rejection(text=text or raw, reason=reason, detail=detail))
            continue
        kept.append(text)
        seen.add(key)
    return kept, rejections


def _instruction_problem(
    text: str,
    description: difflib.SequenceMatcher,
    limits: InstructionLimits,
    language: LanguageCheck | None,
) -> tuple[str | None, str]:
    words = _words(text)
    if not words:
        return REASON_EMPTY_INSTRUCTION, "nothing left after cleaning"
    # Before the word counts: they mean little in a language written without spaces.
    if (wrong := language_rejection(text, language)) is not None:
        return REASON_WRONG_LANGUAGE, wrong
    if len(words) > limits.max_words or len(text) > limits.max_chars:
        return REASON_TOO_LONG, f"{len(words)} words / {len(text)} chars"
    if len(words) < limits.min_words:
        return REASON_TOO_SHORT, f"{len(words)} words"
    named = _NAMES_IMAGE.search(text)
    if named:
        return REASON_NAMES_IMAGE, f"names an image by position: {named.group(0)!r}"
    if _copies(words, description, limits):
        return REASON_COPIES_DESCRIPTION, "repeats the description instead of querying"
    return None, ""


def _copies(
    words: list[str], description: difflib.SequenceMatcher, limits: InstructionLimits
) -> bool:
    description_words = description.b
    if not description_words:
        return False
    description.set_seq1(words)
    matcher = description
    if len(words) >= limits.copy_min_words:
        block = matcher.find_longest_match(0, len(words), 0, len(description_words))
        if block.size >= limits.copy_coverage * len(words):
            return True
    # The length-only bound first: a short query next to a long description never gets close.
    return (
        matcher.real_quick_ratio() >= limits.copy_similarity
        and matcher.ratio() >= limits.copy_similarity
    )


@dataclass(frozen=True)
class DescriptionLimits:
    """Sensible length bounds for a pair description, in words."""

    min_words: int = 12
    max_words: int = 150


def clean_description(text: str | None) -> str:
    """Strip fences, a lead-in line ("Sure, here is ...:"), wrapping quotes and extra space."""
    if not text:
        return ""
    body = text
    fenced = _FENCE.search(body)
    if fenced and fenced.group(1).strip():
        body = fenced.group(1)
    body = strip_markdown_emphasis(_LEAD_IN.sub("", body, count=1))
    return " ".join(body.split()).strip().strip("\"'“”").strip()


def check_description(
    text: str,
    limits: DescriptionLimits,
    finish_reason: str | None = None,
    language: LanguageCheck | None = None,
) -> Rejection | None:
    """None when a cleaned description is acceptable, else why not.

    An answer cut by the token limit (`finish_reason == "length"`) that does not end a
    sentence is rejected as truncated: a half description makes a wrong instruction. With
    `language`, a description in another language is rejected as `wrong_language`.
    """
    words = _words(text)
    if not words:
        return Rejection(text, REASON_DESCRIPTION_EMPTY, "no words")
    # Before the word counts: they mean little in a language written without spaces.
    if (wrong := language_rejection(text, language)) is not None:
        return Rejection(text, REASON_WRONG_LANGUAGE, wrong)
    if len(words) < limits.min_words:
        return Rejection(text, REASON_DESCRIPTION_SHORT, f"{len(words)} < {limits.min_words} words")
    if len(words) > limits.max_words:
        return Rejection(text, REASON_DESCRIPTION_LONG, f"{len(words)} > {limits.max_words} words")
    if finish_reason == "length" and not text.rstrip().endswith(_SENTENCE_END):
        return Rejection(text, REASON_TRUNCATED, "stopped by the token limit mid-sentence")
    return None


def names_image_position(text: str) -> bool:
    """Whether a text refers to an image by position ("the target image", "image 2")."""
    return _NAMES_IMAGE.search(text) is not None
