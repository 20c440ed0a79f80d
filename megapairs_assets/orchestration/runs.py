"""Runs of this machine: launching one run over many shards, and releasing killed ones.

A run executed in process (`dagster job execute`, `dagster asset materialize`, `megapairs
demo`) that is killed keeps its status `STARTED`: Dagster marks a run failed only from the
process that ran it, or from the daemon's run monitoring for runs its launcher started. Such a
run then blocks two things for good: the pool slots its steps claimed (with one step per pool,
every later step of that pool waits for it: "Step blocked by limit for pool gpu"), and, through
the partitions it targets staying "in progress", the declarative automation of those
partitions. `release_dead_runs` marks such runs failed and frees their slots; the CLI calls it
before it starts work, and `megapairs_executor` calls it before every run it executes, so
re-running the command that was killed just works.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import dagster as dg

from megapairs_assets.lib.processes import process_alive

# Dagster exposes no public constant for the partition-range tags a ranged run carries; these
# are the tag names its backfills and `dagster asset materialize --partition-range` set.
PARTITION_RANGE_START_TAG = "dagster/asset_partition_range_start"
PARTITION_RANGE_END_TAG = "dagster/asset_partition_range_end"

# Statuses of a run that is still working, as far as the run storage knows.
_UNFINISHED = (
    dg.DagsterRunStatus.STARTED,
    dg.DagsterRunStatus.STARTING,
    dg.DagsterRunStatus.CANCELING,
)
DEAD_RUN_MESSAGE = "its process is gone (killed); megapairs marked it failed and freed its slots"


def shard_range_tags(shards: list[str]) -> dict[str, str]:
    """Tags that make one run cover shards[0]..shards[-1] (in partition-set order)."""
    return {PARTITION_RANGE_START_TAG: shards[0], PARTITION_RANGE_END_TAG: shards[-1]}


def release_dead_runs(instance: Any, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the runs on this machine whose process is gone, and free their pool slots.

    Looked at: runs holding pool slots, and runs still `STARTED` or `CANCELING`. A run is taken
    as dead only when every process that wrote its events is gone here (a run with no such
    event yet, one just launched, is left alone). A finished run still holding slots (no daemon
    freed them) has them freed. Only meaningful where the runs ran on this machine (the
    embedded deployment). Returns the run ids released.
    """
    storage = instance.event_log_storage
    holding_slots = set(storage.get_concurrency_run_ids())
    started = {
        run.run_id
        for run in instance.get_runs(
            filters=dg.RunsFilter(
                statuses=[dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.CANCELING]
            )
        )
    }
    released = []
    for run_id in sorted(holding_slots | started):
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status not in _UNFINISHED:
            storage.free_concurrency_slots_for_run(run_id)  # finished, yet still holding slots
            continue
        pids = _run_pids(instance, run_id)
        if run_id not in holding_slots and not pids:
            continue  # nothing says which process runs it yet
        if any(process_alive(pid, seen_at) for pid, seen_at in pids.items()):
            continue
        if run is not None:
            instance.report_run_failed(run, DEAD_RUN_MESSAGE)
        if run_id in holding_slots:
            storage.free_concurrency_slots_for_run(run_id)
        released.append(run_id)
        slots = "pool slots freed" if run_id in holding_slots else "it held no pool slot"
        log(f"run {run_id[:8]}: its process is gone (killed); marked failed, {slots}")
    return released


def run_has_ended(instance: Any, run_id: str) -> bool:
    """True when the instance knows the run and it has finished (success, failure, canceled).

    An unknown run (another instance's, a benchmark's plain call) is not taken as ended."""
    run = instance.get_run_by_id(run_id)
    return run is not None and run.is_finished


def _run_pids(instance: Any, run_id: str) -> dict[int, float]:
    """The ids of the processes that wrote the run's events (run worker, step processes), each
    with the time of its last event (a process started after it reused the id)."""
    pids: dict[int, float] = {}
    for entry in instance.all_logs(run_id):
        if entry.dagster_event is not None and entry.dagster_event.pid is not None:
            pid = entry.dagster_event.pid
            pids[pid] = max(pids.get(pid, 0.0), entry.timestamp)
    return pids


def _release_then_execute(init_context: dg.InitExecutorContext) -> Any:
    from resources.cluster import ClusterSettings

    if ClusterSettings.from_env().deployment == "embedded":  # process ids of this machine
        release_dead_runs(init_context.instance, log=lambda _: None)
    create = dg.multi_or_in_process_executor.executor_creation_fn
    assert create is not None
    return create(init_context)


megapairs_executor = dg.ExecutorDefinition(
    name="megapairs_executor",
    config_schema=dg.multi_or_in_process_executor.config_schema,
    requirements=dg.multi_or_in_process_executor.get_requirements,
    executor_creation_fn=_release_then_execute,
    description="Dagster's default executor (multiprocess, or in_process by config), which "
    "first releases this machine's runs whose process was killed (marked failed, pool slots "
    "freed), so re-running a killed command never waits on the dead run's slot.",
)


def run_executor(step_executor: str) -> dg.ExecutorDefinition:
    """The executor every job runs on (`ClusterSettings.step_executor`).

    `k8s`: dagster-k8s's `k8s_job_executor`, one pod per step built from the step's
    `dagster-k8s/config` tag (its GPU request, node selector and tolerations; see
    orchestration/k8s.py) with the run launcher's namespace, image and volumes. K8sRunLauncher
    alone reads run tags only: with a process executor every step would run inside the run pod,
    which asks for no GPU. `process`: `megapairs_executor`.
    """
    if step_executor == "k8s":
        from dagster_k8s import k8s_job_executor  # the `cluster` extra

        return k8s_job_executor
    return megapairs_executor
