"""Small wording helpers for messages people read (no dagster import)."""

from __future__ import annotations

_VOWELS = frozenset("aeiou")


def plural(count: int, noun: str, plural_noun: str | None = None) -> str:
    """`count` followed by `noun`, singular for exactly one: "1 shard", "2 shards", "0 entries".

    plural_noun: the plural when English does not make it regularly (e.g. "indices"); else
    a consonant + y becomes "ies", a word ending in s, x, z, ch or sh takes "es", the rest "s".
    """
    if count == 1:
        return f"1 {noun}"
    if plural_noun is None:
        if noun.endswith("y") and noun[-2:-1] not in _VOWELS:
            plural_noun = noun[:-1] + "ies"
        elif noun.endswith(("s", "x", "z", "ch", "sh")):
            plural_noun = noun + "es"
        else:
            plural_noun = noun + "s"
    return f"{count} {plural_noun}"


def is_or_are(count: int) -> str:
    """The verb that agrees with `count` things: "is" for exactly one, else "are"."""
    return "is" if count == 1 else "are"


def shortened(text: str, max_chars: int) -> str:
    """`text` cut to `max_chars`, ending in "…" when it was cut (so a cut reads as one)."""
    return text if len(text) <= max_chars else text[: max_chars - 1].rstrip() + "…"
