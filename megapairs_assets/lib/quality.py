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


def merged_detail(outcomes_by_partition: list[tuple[str, CheckOutcome]]) -> str:
    """One sentence for a check over several partitions, naming each failing partition once.

    When every failure was built by `outcome()` for the same rule, the rule is said once:
    `5 rows violate in 2 partitions (00001: 3, 00003: 2): <what>`. Other failures are listed
    per partition (`[00001] <detail>; ...`). All passed: the first detail (`ok: <what>`).
    """
    if not outcomes_by_partition:
        return "no partitions checked"
    failing = [(p, o) for p, o in outcomes_by_partition if not o.passed]
    if not failing:
        return outcomes_by_partition[0][1].detail
    rules = {o.detail.split(": ", 1)[-1] for _, o in failing}
    shared_rule = rules.pop() if len(rules) == 1 else None
    if shared_rule is None or any(
        o.detail != violation_detail(o.failing_rows, shared_rule) for _, o in failing
    ):
        return "; ".join(f"[{p}] {o.detail}" for p, o in failing)
    total = sum(o.failing_rows for _, o in failing)
    rows = violation_detail(total, shared_rule).split(": ", 1)[0]
    if len(failing) == 1:
        return f"{rows} in partition {failing[0][0]}: {shared_rule}"
    counts = ", ".join(f"{p}: {o.failing_rows:,}" for p, o in failing)
    return f"{rows} in {len(failing)} partitions ({counts}): {shared_rule}"
