"""Reading the benchmarks' JSON annotation files with errors that name the file and line.

A syntax error reports the line the JSON decoder stopped at. A structural error (a missing
key, a wrong type) reports the line where the offending entry starts: the entry's character
offset is found by walking the top-level list (or a list under a top-level key) with the
decoder's `raw_decode`, only when an error needs it.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

_DECODER = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


class BenchmarkFilesMissing(Exception):
    """A benchmark's files are not where the configured root says: the benchmark is skipped."""

    def __init__(self, path: Path, what: str) -> None:
        super().__init__(f"{what} not found at {path}")
        self.path = path
        self.what = what


class BenchmarkFormatError(ValueError):
    """An annotation file that exists but does not have the official format."""

    def __init__(self, path: Path, line: int | None, message: str) -> None:
        where = f"{path}:{line}" if line is not None else str(path)
        super().__init__(f"{where}: {message}")
        self.path = path
        self.line = line


@dataclass(frozen=True)
class JsonDocument:
    """A parsed JSON file plus its text, kept to locate entries when reporting errors."""

    path: Path
    text: str
    value: Any

    def entry_line(self, index: int, under_key: str | None = None) -> int | None:
        """1-based line where entry `index` of the top-level list (or of `value[under_key]`)
        starts; None when it cannot be located."""
        try:
            start = 0 if under_key is None else _value_offset(self.text, under_key)
            offset = _list_entry_offset(self.text, start, index)
        except (ValueError, IndexError):
            return None
        return self.text.count("\n", 0, offset) + 1

    def key_line(self, key: str) -> int | None:
        """1-based line of top-level object key `key`; None when it cannot be located."""
        try:
            offset = _key_offset(self.text, key)
        except (ValueError, IndexError):
            return None
        return self.text.count("\n", 0, offset) + 1

    def error(
        self, message: str, index: int | None = None, under_key: str | None = None
    ) -> BenchmarkFormatError:
        """A format error naming this file and, when `index` is given, that entry's line."""
        line = self.entry_line(index, under_key) if index is not None else None
        entry = f"entry {index}: " if index is not None else ""
        return BenchmarkFormatError(self.path, line, entry + message)


def read_json(path: Path, what: str) -> JsonDocument:
    """Parse `path`; a missing file raises BenchmarkFilesMissing, bad JSON a format error."""
    if not path.is_file():
        raise BenchmarkFilesMissing(path, what)
    try:
        # utf-8-sig: a file re-saved by an editor that adds a byte-order mark still reads.
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as error:
        raise BenchmarkFormatError(path, None, f"not UTF-8 text ({error})") from error
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        # The decoder computes the line and column of the character where it failed.
        raise BenchmarkFormatError(
            path, error.lineno, f"invalid JSON at column {error.colno}: {error.msg}"
        ) from error
    return JsonDocument(path=path, text=text, value=value)


def require_list(document: JsonDocument, what: str) -> list[Any]:
    """The document's top-level value as a list, or a format error."""
    if not isinstance(document.value, list):
        raise BenchmarkFormatError(
            document.path, 1, f"expected a JSON list of {what}, got {type(document.value).__name__}"
        )
    return document.value


def require_field(
    document: JsonDocument,
    entry: Any,
    index: int,
    name: str,
    kind: type | tuple[type, ...],
    under_key: str | None = None,
    type_hint: str = "",
) -> Any:
    """`entry[name]`, checked to be of `kind`; otherwise a format error naming entry and line
    (and, for a value of the wrong type, ending with `type_hint` when given)."""
    if not isinstance(entry, dict):
        raise document.error(f"expected an object, got {type(entry).__name__}", index, under_key)
    if name not in entry:
        raise document.error(f"missing key {name!r}", index, under_key)
    value = entry[name]
    # bool is an int in Python; an id or count given as true/false is still malformed.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _kinds(kind)):
        expected = " or ".join(k.__name__ for k in _kinds(kind))
        hint = f" ({type_hint})" if type_hint else ""
        raise document.error(
            f"key {name!r} should be {expected}, got {type(value).__name__}{hint}",
            index,
            under_key,
        )
    return value


def _kinds(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


# --- locating entries in the text ----------------------------------------------------------


def _skip_whitespace(text: str, offset: int) -> int:
    while offset < len(text) and text[offset] in _WHITESPACE:
        offset += 1
    return offset


def _expect(text: str, offset: int, char: str) -> int:
    offset = _skip_whitespace(text, offset)
    if offset >= len(text) or text[offset] != char:
        raise ValueError(f"expected {char!r} at offset {offset}")
    return offset + 1


def _list_entry_offset(text: str, start: int, index: int) -> int:
    """Character offset of entry `index` of the list that begins at/after `start`."""
    offset = _expect(text, start, "[")
    for _ in range(index):
        _, end = _DECODER.raw_decode(text, _skip_whitespace(text, offset))
        offset = _expect(text, end, ",")
    return _skip_whitespace(text, offset)


def _key_offset(text: str, key: str) -> int:
    """Character offset where top-level object key `key` starts."""
    offset = _expect(text, 0, "{")
    while True:
        key_start = _skip_whitespace(text, offset)
        name, end = _DECODER.raw_decode(text, key_start)
        if name == key:
            return key_start
        offset = _expect(text, end, ":")
        _, end = _DECODER.raw_decode(text, _skip_whitespace(text, offset))
        offset = _expect(text, end, ",")


def _value_offset(text: str, key: str) -> int:
    """Character offset of the value of top-level object key `key`."""
    _, end = _DECODER.raw_decode(text, _key_offset(text, key))
    return _skip_whitespace(text, _expect(text, end, ":"))
