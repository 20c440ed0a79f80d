"""Plain-Python outcome of a data-quality check, turned into a Dagster asset check at the edge.

Every stage's validators (corpus ids unique, embeddings unit norm, KNN sorted, pairs in band...)
return `CheckOutcome`s so they can be unit-tested without Dagster.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class CheckOutcome:
    """Result of one named check over one table.

    `failing_rows` counts the offending rows; `examples` holds a few of them (ids or short
    descriptions) so a person can see what went wrong without opening the table.
    """

    name: str
    passed: bool
    detail: str
    failing_rows: int = 0
    examples: tuple[str, ...] = field(default_factory=tuple)


def violation_detail(failing_rows: int, what: str) -> str:
    """`1 row violates: <what>` / `3 rows violate: <what>`: the detail of a failed check."""
    rows = "1 row violates" if failing_rows == 1 else f"{failing_rows:,} rows violate"
    return f"{rows}: {what}"


def outcome(name: str, failing: list[str], what: str) -> CheckOutcome:
    """Build an outcome from the list of offending rows (empty list = passed)."""
    if not failing:
        return CheckOutcome(name=name, passed=True, detail=f"ok: {what}")
    return CheckOutcome(
        name=name,
        passed=False,
        detail=violation_detail(len(failing), what),
        failing_rows=len(failing),
        examples=tuple(str(x) for x in failing[:5]),
    )
