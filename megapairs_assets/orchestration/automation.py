"""Declarative automation of the shard assets that never carries bad data past a blocking check.

`AutomationCondition.eager()` alone requests a partition whenever its upstream partition
updated, including when that upstream materialization failed a blocking check (Dagster records
the materialization, then fails the step). Dagster's own `all_deps_blocking_checks_passed()`
reads the latest evaluation of each check for the whole asset, and our checks cover a step's
shards together, so a later passing shard would unblock an earlier failing one. Here every
partition's materialization names the blocking checks that failed on that partition
(`failing_blocking_checks`, written by shard_step), and `BlockingChecksFailed` reads it per
partition: automation refreshes every healthy shard and holds back exactly the failing ones
until they are re-materialized clean.

`eager()` also waits while a direct dependency is in progress, but not while a dependency's own
upstream is: when the CLIP graph of a shard lands a tick before the DINOv2 embeddings of the same
run finish, `eager()` alone mines the shard at once and again once the DINOv2 graph follows, and
the first mining reads a graph about to be rewritten. `upstream_in_progress` looks further up.
Nor does `eager()` wait when a dependency's latest run failed: the CLIP and DINOv2 graphs landing
would start a mining run that must fail on the caption graph's failed partition.

A custom condition runs in the code server: the automation sensor sets `use_user_code_server`.
"""

from __future__ import annotations

from collections.abc import Iterable

import dagster as dg

FAILING_BLOCKING_CHECKS_KEY = "failing_blocking_checks"
NO_FAILURE = "none"


def partitions_failing_blocking_checks(
    instance: dg.DagsterInstance, asset_key: dg.AssetKey, partitions: Iterable[str]
) -> set[str]:
    """The partitions among `partitions` whose latest materialization failed a blocking check."""
    latest = instance.get_latest_storage_id_by_partition(
        asset_key, dg.DagsterEventType.ASSET_MATERIALIZATION, set(partitions)
    )
    if not latest:
        return set()
    records = instance.fetch_materializations(
        dg.AssetRecordsFilter(asset_key=asset_key, storage_ids=list(latest.values())),
        limit=len(latest),
    ).records
    failing = set()
    for record in records:
        value = record.asset_materialization.metadata.get(FAILING_BLOCKING_CHECKS_KEY)
        if value is not None and value.value not in ("", NO_FAILURE):
            failing.add(record.partition_key)
    return failing


class BlockingChecksFailed(dg.AutomationCondition):
    """True for the partitions whose latest materialization failed one of its blocking checks."""

    @property
    def name(self) -> str:
        return "blocking_checks_failed"

    @property
    def description(self) -> str:
        return "Latest materialization of this partition failed a blocking check"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        candidate = context.candidate_subset
        key = context.key
        if candidate.is_empty or candidate.partitions_def is None:
            return dg.AutomationResult(context, context.get_empty_subset())
        assert isinstance(key, dg.AssetKey)
        failing = partitions_failing_blocking_checks(
            context.asset_graph_view.instance, key, candidate.expensively_compute_partition_keys()
        )
        return dg.AutomationResult(
            context, candidate.compute_intersection_with_partition_keys(failing)
        )


# How far up `upstream_in_progress` looks. Two levels cover every fan-in of the graph: the KNN
# graphs into mining (one level above them, the embeddings), and pairs, descriptions and
# instructions into triplets.
UPSTREAM_IN_PROGRESS_LEVELS = 2


def upstream_in_progress(levels: int = UPSTREAM_IN_PROGRESS_LEVELS) -> dg.AutomationCondition:
    """True while a dependency, or (for `levels` > 1) one of its own upstream assets up to that
    many levels above, has a run in progress for a partition this one reads."""
    condition = dg.AutomationCondition.in_progress()
    for _ in range(levels - 1):
        condition = dg.AutomationCondition.in_progress() | dg.AutomationCondition.any_deps_match(
            condition
        )
    return dg.AutomationCondition.any_deps_match(condition).with_label(
        f"upstream in progress (up to {levels} levels)"
    )


def downstream_automation() -> dg.AutomationCondition:
    """Eager refresh of a shard partition whose upstream is new or changed, unless an upstream
    partition it reads failed a blocking check or upstream work for it is still running."""
    return (
        dg.AutomationCondition.eager()
        & ~upstream_in_progress()
        & ~dg.AutomationCondition.any_deps_match(BlockingChecksFailed())
        # A partition whose upstream's latest run failed would read a table the catalog no
        # longer trusts (the step refuses it): wait until that upstream is materialized again.
        & ~dg.AutomationCondition.any_deps_match(dg.AutomationCondition.execution_failed())
    ).with_label(
        "eager, after upstream runs finish, unless an upstream partition failed its run or a check"
    )


class InputRequestedThisTick(dg.AutomationCondition):
    """True for every candidate partition when a partition of one of its parents is requested
    in this tick. Dagster's `will_be_requested` only counts parents that can run in the same run,
    which a parent under an `AllPartitionMapping` cannot."""

    @property
    def name(self) -> str:
        return "input_requested_this_tick"

    @property
    def description(self) -> str:
        return "An input partition is requested in this tick"

    def evaluate(self, context: dg.AutomationContext) -> dg.AutomationResult:
        candidate = context.candidate_subset
        key = context.key
        assert isinstance(key, dg.AssetKey)
        for parent in context.asset_graph.get(key).parent_keys:
            requested = context.request_subsets_by_key.get(parent)
            if requested is not None and not requested.is_empty:
                return dg.AutomationResult(context, candidate)
        return dg.AutomationResult(context, context.get_empty_subset())


def corpus_wide_automation() -> dg.AutomationCondition:
    """`downstream_automation` for an asset whose every partition reads every upstream partition
    (the KNN graphs): also wait while an input partition is requested in this tick. Released in
    the tick that requests its own input again, it would share one request with that input, and
    Dagster's backfill of such a request (an `AllPartitionMapping` with a partition of its own
    parent) fails at once ("Unable to determine root partitions"), losing both."""
    return (downstream_automation() & ~InputRequestedThisTick()).with_label(
        "eager over the whole corpus, after its inputs settle"
    )
