"""Prompt templates, the few-shot demonstration pool, and per-request choices (method.md §4-5).

Templates (`prompts/*.toml`) and the pool of 50 demonstrations (`prompts/instruction_demos.jsonl`)
are versioned data files. Each is identified by its id and a content hash; both are recorded on
every generated row and enter every request key, so editing a template re-calls exactly the step
that uses it.

Per-request choices (WORD_NUM, which demonstrations, the sampling seed) are drawn from a keyed
hash of (seed, step, pair id) and nothing else: a pair gets the same prompt whichever shard,
run or batch it is processed in.
"""

from __future__ import annotations

import hashlib
import json
import re
import string
import tomllib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import numpy as np

from megapairs_assets.lib.errors import ConfigurationError

PROMPTS_DIR = Path(__file__).resolve().parent / "prompts"
DEFAULT_DEMO_POOL = "instruction_demos.jsonl"
WORD_NUM_RANGE = (60, 100)  # method.md §4: uniform per request, bounds included
DEMO_POOL_SIZE = 50

# The placeholders each formatted field of a step's template may use: the values that step's
# message builder (`describe_messages`, `instruction_messages`) fills in. Anything else is a
# typo that would otherwise surface as a bare KeyError once the step builds its requests.
TEMPLATE_PLACEHOLDERS: dict[str, dict[str, frozenset[str]]] = {
    "describe": {"user_parts": frozenset({"word_num", "query_caption", "target_caption"})},
    "instruct": {
        "system": frozenset({"min_instructions", "max_instructions"}),
        "demo_user": frozenset({"description"}),
        "user": frozenset({"description"}),
    },
}
# The placeholders a step's template must use, or the model never sees the pair it writes
# about: every request of a shard would then ask the same question.
REQUIRED_PLACEHOLDERS: dict[tuple[str, str], dict[str, frozenset[str]]] = {
    ("describe", "captions"): {"user_parts": frozenset({"query_caption", "target_caption"})},
    ("instruct", "text"): {
        "demo_user": frozenset({"description"}),
        "user": frozenset({"description"}),
    },
}
# An instruction template may leave these out: the method's values (method.md §5) apply.
INSTRUCTION_COUNT_DEFAULTS = {"demos_per_request": 5, "min_instructions": 3, "max_instructions": 5}
_FIELD_NAME_END = re.compile(r"[.\[]")

# A chat message in the OpenAI shape. Image parts are kept symbolic until a backend renders
# them: {"type": "image", "ref": "query" | "target"}; every backend decides how to send pixels.
ChatMessage = dict[str, Any]


def content_hash(payload: Any) -> str:
    """sha256 hex digest of a JSON-serialisable value in canonical form (sorted keys)."""
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


def combined_hash(*hashes: str) -> str:
    """One hash standing for several (e.g. the instruction template and the demo pool)."""
    return hashlib.sha256("\x1f".join(hashes).encode()).hexdigest()


@dataclass(frozen=True)
class PromptTemplate:
    """One versioned prompt template loaded from `prompts/<name>.toml`."""

    id: str
    version: int
    step: str
    input_mode: str  # "images", "captions" or "text"
    fields: Mapping[str, Any]
    hash: str

    @property
    def ref(self) -> str:
        """Short human reference, `id@v<version>#<hash prefix>`."""
        return f"{self.id}@v{self.version}#{self.hash[:12]}"

    def instruction_count(self, name: str) -> int:
        """`demos_per_request`, `min_instructions` or `max_instructions` of an instruction
        template (checked when loaded), or its default."""
        return int(self.fields.get(name, INSTRUCTION_COUNT_DEFAULTS[name]))

    def field(self, name: str) -> Any:
        if name not in self.fields:
            raise KeyError(f"template {self.id!r} has no field {name!r}")
        return self.fields[name]


class TemplateError(ConfigurationError):
    """A template or demo pool file is malformed."""


@cache
def _load_template_cached(path: Path, mtime_ns: int) -> PromptTemplate:
    try:
        raw = tomllib.loads(path.read_text(encoding="utf-8"))
    except (OSError, tomllib.TOMLDecodeError) as error:
        raise TemplateError(f"cannot read template {path}: {error}") from error
    for required in ("id", "version", "step", "input_mode"):
        if required not in raw:
            raise TemplateError(f"template {path} lacks {required!r}")
    if raw["input_mode"] not in ("images", "captions", "text"):
        raise TemplateError(f"template {path}: unknown input_mode {raw['input_mode']!r}")
    _check_placeholders(path, raw)
    _check_pair_is_shown(path, raw)
    if raw["step"] == "instruct":
        _check_instruction_counts(path, raw)
    return PromptTemplate(
        id=str(raw["id"]),
        version=int(raw["version"]),
        step=str(raw["step"]),
        input_mode=str(raw["input_mode"]),
        fields=raw,
        hash=content_hash(raw),
    )


def _check_placeholders(path: Path, raw: Mapping[str, Any]) -> None:
    """Refuse a template whose formatted text names a placeholder its step does not fill in
    (or whose braces do not parse); `{{` and `}}` stay literal braces."""
    step = raw["step"]
    if step not in TEMPLATE_PLACEHOLDERS:
        raise TemplateError(
            f"template {path}: unknown step {step!r}; known: {', '.join(TEMPLATE_PLACEHOLDERS)}"
        )
    for field_name, allowed in TEMPLATE_PLACEHOLDERS[step].items():
        unknown: set[str] = set()
        for text in _formatted_texts(path, raw, field_name):
            try:
                unknown |= _placeholders(text) - allowed
            except ValueError as error:
                raise TemplateError(
                    f"template {path}: {field_name}: {error} (write {{{{ and }}}} for literal "
                    "braces)"
                ) from error
        if unknown:
            named = ", ".join(f"{{{name}}}" for name in sorted(unknown))
            allows = ", ".join(f"{{{name}}}" for name in sorted(allowed))
            raise TemplateError(
                f"template {path}: unknown placeholder(s) {named} in {field_name}; the {step} "
                f"step allows {allows} (write {{{{ and }}}} for literal braces)"
            )


def _check_pair_is_shown(path: Path, raw: Mapping[str, Any]) -> None:
    """Refuse a template that never shows the model the pair: a caption template without both
    captions, an image template without both pictures, an instruction template without the
    description (`REQUIRED_PLACEHOLDERS`)."""
    step, mode = raw["step"], raw["input_mode"]
    for field_name, required in REQUIRED_PLACEHOLDERS.get((step, mode), {}).items():
        used: set[str] = set()
        for text in _formatted_texts(path, raw, field_name):
            used |= _placeholders(text)
        if missing := required - used:
            named = ", ".join(f"{{{name}}}" for name in sorted(missing))
            raise TemplateError(
                f"template {path}: {field_name} never uses {named}; without it the model does "
                f"not see what it writes about (step {step!r}, input_mode {mode!r})"
            )
    if (step, mode) == ("describe", "images"):
        parts = raw.get("user_parts") or []
        shown = {part.get("image") for part in parts if isinstance(part, dict)}
        if missing_images := {"query", "target"} - shown:
            named = " and ".join(f'{{ image = "{ref}" }}' for ref in sorted(missing_images))
            raise TemplateError(
                f"template {path}: user_parts lacks {named}: an images template shows the model "
                'both pictures (or use input_mode "captions" with {query_caption} and '
                "{target_caption})"
            )


def _check_instruction_counts(path: Path, raw: Mapping[str, Any]) -> None:
    """An instruction template's numbers (each optional, see `INSTRUCTION_COUNT_DEFAULTS`):
    whole, at least 1, min_instructions <= max_instructions."""
    counts = {}
    for name, default in INSTRUCTION_COUNT_DEFAULTS.items():
        value = raw.get(name, default)
        # bool is an int to Python, never a count to a person
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise TemplateError(
                f"template {path}: {name} must be a whole number >= 1, got {value!r}"
            )
        counts[name] = value
    if counts["min_instructions"] > counts["max_instructions"]:
        raise TemplateError(
            f"template {path}: min_instructions ({counts['min_instructions']}) is above "
            f"max_instructions ({counts['max_instructions']}): no answer could pass"
        )


def _formatted_texts(path: Path, raw: Mapping[str, Any], field_name: str) -> list[str]:
    """The strings of a template field that get `.format`ted (a user_parts list holds them in
    its text parts)."""
    if field_name not in raw:
        raise TemplateError(f"template {path} lacks {field_name!r}")
    value = raw[field_name]
    if field_name != "user_parts":
        return [str(value)]
    if not isinstance(value, list):
        raise TemplateError(f"template {path}: user_parts must be a list of tables")
    return [str(part["text"]) for part in value if isinstance(part, dict) and "text" in part]


def _placeholders(text: str) -> set[str]:
    """The names `str.format` looks up in text (`{a.b}` and `{a[0]}` name `a`; `{}` names "")."""
    names: set[str] = set()
    for _, field_name, format_spec, _ in string.Formatter().parse(text):
        if field_name is None:
            continue
        names.add(_FIELD_NAME_END.split(field_name, maxsplit=1)[0])
        if format_spec:
            names |= _placeholders(format_spec)  # `{x:{width}}` looks up `width` too
    return names


def load_template(name_or_path: str | Path) -> PromptTemplate:
    """Load a template by file stem (`describe_images`) or path; cached until the file changes."""
    path = _resolve(name_or_path, ".toml")
    return _load_template_cached(path, path.stat().st_mtime_ns)


def _resolve(name_or_path: str | Path, suffix: str) -> Path:
    candidate = Path(name_or_path)
    if candidate.suffix != suffix:
        candidate = PROMPTS_DIR / f"{name_or_path}{suffix}"
    if not candidate.is_file():
        raise TemplateError(
            f"no prompt file {candidate} (a name is looked up in {PROMPTS_DIR}; give a path "
            f"ending {suffix} for a file elsewhere)"
        )
    return candidate.resolve()


@dataclass(frozen=True)
class Demonstration:
    """One few-shot example: a pair description and the queries written for it."""

    id: str
    description: str
    instructions: tuple[str, ...]


@dataclass(frozen=True)
class DemoPool:
    """The shipped pool of demonstrations, with a content hash over all of it."""

    demos: tuple[Demonstration, ...]
    hash: str

    def by_id(self, demo_id: str) -> Demonstration:
        for demo in self.demos:
            if demo.id == demo_id:
                return demo
        raise KeyError(demo_id)


@cache
def _load_pool_cached(path: Path, mtime_ns: int) -> DemoPool:
    demos = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            demo = Demonstration(
                id=str(row["id"]),
                description=str(row["description"]),
                instructions=tuple(str(x) for x in row["instructions"]),
            )
        except (ValueError, KeyError, TypeError) as error:
            raise TemplateError(f"{path}:{line_number}: bad demonstration: {error}") from error
        demos.append(demo)
    ids = [demo.id for demo in demos]
    if len(set(ids)) != len(ids):
        raise TemplateError(f"{path}: demonstration ids repeat")
    payload = [[d.id, d.description, list(d.instructions)] for d in demos]
    return DemoPool(demos=tuple(demos), hash=content_hash(payload))


def load_demo_pool(name_or_path: str | Path = DEFAULT_DEMO_POOL) -> DemoPool:
    """Load the demonstration pool (JSON Lines: id, description, instructions)."""
    candidate = Path(name_or_path)
    path = candidate if candidate.is_file() else PROMPTS_DIR / str(name_or_path)
    if not path.is_file():
        raise TemplateError(f"no demonstration pool {path}")
    path = path.resolve()
    return _load_pool_cached(path, path.stat().st_mtime_ns)


# -- per-request choices ------------------------------------------------------------------


def keyed_u64(seed: int, *parts: str) -> int:
    """A stable 64-bit number from (seed, parts): blake2b, identical on every machine."""
    payload = "\x1f".join([str(seed), *parts]).encode()
    return int.from_bytes(hashlib.blake2b(payload, digest_size=8).digest(), "little")


def word_num_for(seed: int, pair_id: str, bounds: tuple[int, int] = WORD_NUM_RANGE) -> int:
    """WORD_NUM of a pair's description request: uniform over `bounds` (both included)."""
    low, high = bounds
    if not 0 < low <= high:
        raise ValueError(f"WORD_NUM bounds must satisfy 0 < low <= high, got {bounds}")
    return low + keyed_u64(seed, "word_num", pair_id) % (high - low + 1)


def demo_ids_for(seed: int, pair_id: str, pool: DemoPool, count: int) -> tuple[str, ...]:
    """`count` demonstrations for a pair's instruction request (see `demo_ids_for_pairs`)."""
    return demo_ids_for_pairs(seed, [pair_id], pool, count)[0]


def demo_ids_for_pairs(
    seed: int, pair_ids: Sequence[str], pool: DemoPool, count: int
) -> list[tuple[str, ...]]:
    """Per pair, a keyed-random sample of `count` demonstration ids without replacement.

    Every (pair, demo) gets a rank from splitmix64 over (a keyed hash of the pair id) xor (a
    keyed hash of the demo id); a pair's sample is its `count` lowest-ranked demos, in rank
    order. It depends only on (seed, pair id, demo ids), and is vectorised over pairs because
    a shard has hundreds of thousands of them.
    """
    if not 0 < count <= len(pool.demos):
        raise ValueError(f"cannot draw {count} demonstrations from a pool of {len(pool.demos)}")
    if not pair_ids:
        return []
    pair_keys = np.array([keyed_u64(seed, "demo", pid) for pid in pair_ids], dtype=np.uint64)
    demo_keys = np.array([keyed_u64(seed, "demo-id", d.id) for d in pool.demos], dtype=np.uint64)
    ranks = _mix64(pair_keys[:, None] ^ demo_keys[None, :])
    chosen = np.argsort(ranks, axis=1, kind="stable")[:, :count]
    ids = np.array([demo.id for demo in pool.demos], dtype=object)
    return [tuple(row) for row in ids[chosen].tolist()]


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser on uint64 arrays (wrapping arithmetic is intended)."""
    with np.errstate(over="ignore"):
        mixed = values + np.uint64(0x9E3779B97F4A7C15)
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return mixed ^ (mixed >> np.uint64(31))


def request_seed_for(seed: int, step: str, pair_id: str) -> int:
    """The sampling seed sent with a pair's request (fits a signed 32-bit int)."""
    return keyed_u64(seed, "sampling", step, pair_id) % (2**31 - 1)


# -- messages -----------------------------------------------------------------------------


def describe_messages(
    template: PromptTemplate,
    word_num: int,
    query_caption: str | None = None,
    target_caption: str | None = None,
) -> list[ChatMessage]:
    """Chat messages of a description request (image parts symbolic, see `ChatMessage`)."""
    values = {
        "word_num": word_num,
        "query_caption": query_caption or "(no caption)",
        "target_caption": target_caption or "(no caption)",
    }
    parts: list[dict[str, Any]] = []
    for part in template.field("user_parts"):
        if "text" in part:
            parts.append({"type": "text", "text": str(part["text"]).format_map(values)})
        elif "image" in part:
            if part["image"] not in ("query", "target"):
                raise TemplateError(f"template {template.id}: unknown image {part['image']!r}")
            parts.append({"type": "image", "ref": part["image"]})
        else:
            raise TemplateError(f"template {template.id}: a user part needs text or image")
    messages: list[ChatMessage] = []
    if template.fields.get("system"):
        messages.append({"role": "system", "content": str(template.field("system"))})
    if all(part["type"] == "text" for part in parts):
        # Text-only models (and their chat templates) expect plain string content.
        messages.append({"role": "user", "content": "\n".join(p["text"] for p in parts)})
    else:
        messages.append({"role": "user", "content": parts})
    return messages


def instruction_messages(
    template: PromptTemplate, description: str, demos: Sequence[Demonstration]
) -> list[ChatMessage]:
    """Chat messages of an instruction request: rules, demonstrations as turns, the description."""
    values = {
        "min_instructions": template.instruction_count("min_instructions"),
        "max_instructions": template.instruction_count("max_instructions"),
    }
    messages: list[ChatMessage] = [
        {"role": "system", "content": str(template.field("system")).format_map(values)}
    ]
    for demo in demos:
        messages.append(
            {
                "role": "user",
                "content": str(template.field("demo_user")).format(description=demo.description),
            }
        )
        messages.append(
            {
                "role": "assistant",
                "content": json.dumps(list(demo.instructions), ensure_ascii=False),
            }
        )
    messages.append(
        {"role": "user", "content": str(template.field("user")).format(description=description)}
    )
    return messages
