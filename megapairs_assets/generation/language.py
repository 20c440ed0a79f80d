"""Is a model's answer in the language the prompt asked for? (quarantine reason `wrong_language`)

Multilingual models drift: InternVL2 sometimes describes a pair in Chinese, small models switch
to French or Spanish mid-task. Such text passes every length and wording filter and would end
up as an instruction no English retriever can learn from. `language_rejection` judges one
cleaned text with two rules, both deterministic (same text, same answer; the identifier's
float32 sums could differ in the last bits between CPUs, which matters only at the threshold):

1. Script: when the target language is written in the Latin alphabet and more than half of the
   text's letters are not Latin (Han, kana, Hangul, Cyrillic, Arabic...), the text is in
   another language, however short.
2. Identifier: otherwise, a text of at least `min_words` words is given to py3langid (a naive
   Bayes classifier over byte n-grams, shipped with its model; BSD-3, numpy only). The text is
   rejected when the target language gets less than `1 - min_confidence` of the probability.

Measured: no English text rejected among 130 SmolLM2-135M descriptions and 382 instructions
(the demo's and a larger sample of its answers), 10,726 caption-heuristic texts, the demo
corpus captions, the shipped demonstrations and 90 hand-written English queries full of
loanwords ("Paella in a pan", "a samurai helmet in gold": lowest English probability 0.025 at
4+ words); 40 of 41 hand-written French, German, Spanish, Italian, Portuguese, Dutch, Chinese,
Japanese, Russian and Korean texts caught (the one missed: a 6-word French query at 0.011).
About 0.03-0.15 ms a text once loaded. Limits:
- texts under `min_words` words are judged by script only: two-word queries of loanwords
  ("Safari jeep", "Déjà vu poster") fool the identifier, so a short French query passes;
- a Latin-script language close to the target can pass in a short text near the threshold;
- targets written in other scripts get rule 2 only, and languages written without spaces
  (Chinese, Japanese, Thai) rarely reach `min_words`, so for them the check is mostly off;
- the identifier's model is loaded once per process (0.6-2.4 s here) on the first text judged.
"""

from __future__ import annotations

import re
import threading
import unicodedata
from dataclasses import dataclass
from typing import Any

from megapairs_assets.lib.errors import ConfigurationError

REASON_WRONG_LANGUAGE = "wrong_language"
DEFAULT_LANGUAGE = "en"
_CODE = re.compile(r"^[a-z]{2,3}$")
_WORD = re.compile(r"\w+")
# Languages written in the Latin alphabet (ISO 639 codes py3langid knows): for these, a text
# mostly in another script is in another language whatever its length (rule 1).
# fmt: off
LATIN_SCRIPT_LANGUAGES = frozenset({
    "af", "an", "az", "bcl", "br", "bs", "ca", "cs", "cy", "da", "de", "en",
    "eo", "es", "et", "eu", "ext", "fi", "fo", "fr", "fy", "ga", "gd", "gl",
    "hr", "ht", "hu", "id", "is", "it", "jv", "la", "lb", "lij", "lt", "ltg",
    "lv", "mg", "ms", "mt", "nl", "nn", "no", "oc", "pcm", "pl", "pt", "qu",
    "ro", "rw", "sk", "sl", "so", "sq", "sv", "sw", "tk", "tl", "tr", "uz",
    "vec", "vi", "vo", "wa", "xh", "yo", "zu",
})
# fmt: on


@dataclass(frozen=True)
class LanguageCheck:
    """What language generated text must be in.

    target: ISO 639-1 code ("en", "fr", "zh"...); "" turns the check off.
    min_confidence: a text is rejected when the identifier gives the target less than
        `1 - min_confidence` of the probability (0.99: it is 99% sure of another language).
    min_words: shorter texts are judged by their script only (see the module docstring).
    """

    target: str = DEFAULT_LANGUAGE
    min_confidence: float = 0.99
    min_words: int = 4

    def __post_init__(self) -> None:
        if self.target and not _CODE.match(self.target):
            raise ValueError(
                f"answer language must be an ISO 639 code such as 'en' (or '' for no check), "
                f"got {self.target!r}"
            )
        if not 0.5 <= self.min_confidence < 1.0:
            raise ValueError(
                f"answer language min_confidence must be in [0.5, 1), got {self.min_confidence}"
            )
        if self.min_words < 1:
            raise ValueError(f"answer language min_words must be >= 1, got {self.min_words}")

    @property
    def enabled(self) -> bool:
        return bool(self.target)


def language_rejection(text: str, check: LanguageCheck | None) -> str | None:
    """None when `text` may be in the target language (or the check is off); else why it is
    not, for the quarantine row's detail."""
    if check is None or not check.enabled:
        return None
    letters = [char for char in text if char.isalpha()]
    if not letters:
        return None
    if check.target in LATIN_SCRIPT_LANGUAGES:
        scripts = [_script(char) for char in letters]
        other = len(letters) - scripts.count("LATIN")
        if other * 2 > len(letters):
            main = max(set(scripts) - {"LATIN"}, key=scripts.count)
            return (
                f"{other} of {len(letters)} letters are not Latin (mostly {main}); "
                f"{check.target!r} is written in the Latin alphabet"
            )
    if len(_WORD.findall(text)) < check.min_words:
        return None
    ranked = _identifier(check.target).rank(text)
    target_share = next((share for code, share in ranked if code == check.target), 0.0)
    if target_share < 1.0 - check.min_confidence:
        best, best_share = ranked[0]
        return (
            f"language identifier: {best!r} {best_share:.2f}, {check.target!r} "
            f"{target_share:.4f} (below {1.0 - check.min_confidence:.2g})"
        )
    return None


def require_known_language(check: LanguageCheck) -> None:
    """Raise ConfigurationError now when the identifier does not know the target language
    (loads the identifier: call it only before real work, not for a fully cached step)."""
    if check.enabled:
        _identifier(check.target)


def _script(char: str) -> str:
    """The script of a letter, as the first word of its Unicode name (LATIN, CJK, HIRAGANA,
    CYRILLIC...); letters without a name count as their own script."""
    return unicodedata.name(char, "UNNAMED").split(" ", 1)[0]


_LOCK = threading.Lock()
_IDENTIFIER: Any = None


def _identifier(target: str) -> Any:
    """py3langid's identifier with normalised probabilities, loaded once per process; a target
    it does not know is a configuration error (it could never be found)."""
    global _IDENTIFIER
    with _LOCK:
        if _IDENTIFIER is None:
            from py3langid.langid import MODEL_FILE, LanguageIdentifier

            _IDENTIFIER = LanguageIdentifier.from_model_file(MODEL_FILE, norm_probs=True)
    if target not in _IDENTIFIER.nb_classes:
        known = ", ".join(sorted(set(_IDENTIFIER.nb_classes)))
        raise ConfigurationError(
            f"answer language {target!r} is not one the language identifier knows ({known}); "
            "set answer_language to one of them, or to '' for no check"
        )
    return _IDENTIFIER
