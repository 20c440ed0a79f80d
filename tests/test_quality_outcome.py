"""Check messages read as sentences: `1 row violates`, and a rule said once across partitions."""

from __future__ import annotations

from megapairs_assets.lib.quality import CheckOutcome, merged_detail, outcome, violation_detail

RULE = "target differs from query"


def test_outcome_counts_rows_in_grammatical_english() -> None:
    assert outcome("c", [], RULE).detail == f"ok: {RULE}"
    one = outcome("c", ["q->q"], RULE)
    assert one.detail == f"1 row violates: {RULE}"
    assert (one.passed, one.failing_rows, one.examples) == (False, 1, ("q->q",))
    many = outcome("c", [f"row{i}" for i in range(1234)], RULE)
    assert many.detail == f"1,234 rows violate: {RULE}"
    assert many.failing_rows == 1234 and len(many.examples) == 5
    assert violation_detail(0, RULE) == f"0 rows violate: {RULE}"


def test_merged_detail_says_the_rule_once_and_names_each_partition() -> None:
    passed = outcome("c", [], RULE)
    three = outcome("c", ["a", "b", "c"], RULE)
    two = outcome("c", ["d", "e"], RULE)
    merged = merged_detail([("00000", passed), ("00001", three), ("00003", two)])
    assert merged == f"5 rows violate in 2 partitions (00001: 3, 00003: 2): {RULE}"
    assert merged.count(RULE) == 1
    assert merged_detail([("00000", passed), ("00002", outcome("c", ["x"], RULE))]) == (
        f"1 row violates in partition 00002: {RULE}"
    )
    assert merged_detail([("00000", passed), ("00001", passed)]) == f"ok: {RULE}"
    assert merged_detail([]) == "no partitions checked"


def test_merged_detail_lists_details_it_cannot_merge() -> None:
    custom = CheckOutcome(name="c", passed=False, detail="graph covers 3 of 5 shards")
    other_rule = outcome("c", ["a"], "another rule")
    merged = merged_detail([("00001", custom), ("00002", other_rule)])
    assert merged == "[00001] graph covers 3 of 5 shards; [00002] 1 row violates: another rule"
