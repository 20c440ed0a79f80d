"""`megapairs status`: where every asset of the home stands, partition by partition.

Reads the lineage catalog (the newest record of each partition) and the Dagster instance's
partition sets (registered shards, training configs; for `benchmark_scores` every registered
retriever x benchmark), and prints per asset how many partitions are complete, failed a
blocking check, read an input re-materialized since, failed, are pending (running, or left by a
killed step), are missing (registered, never materialized) or retired, and how many inputs it
quarantined; then each partition that needs attention.

A run can fail before its step writes any record of a partition (a step that breaks before
its per-partition work, a step skipped because an upstream step failed): Dagster's own record
of each partition's latest attempt says so, and such a partition counts as failed, with its run
and error, even where the catalog still holds an earlier complete version. A partition a run is
materializing now counts as pending; one whose run was killed, as failed. A pending record
says whether a step is writing it now or a killed one left it (its step lock tells).

A home with nothing registered says so (and how to start) instead of calling it complete. A
Dagster instance that cannot be opened (a read-only copy of a home) leaves the partition sets
and runs out: the counts then come from the catalog alone, and the last line says so.
`--json` prints the same as JSON. Exit code 0 either way (1 when there is no catalog yet).
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from megapairs_assets.lib.words import shortened

# At most this many partitions per asset have their run looked up one by one (one query
# each); the others of a failed range are counted the same way, with the reason of the
# first ones.
_RUNS_LOOKED_UP_PER_ASSET = 50
_ERROR_CHARS = 160
# The last line of `format_status` when nothing needs attention.
ALL_CLEAR = "every expected partition is complete and passed its blocking checks"


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    parser = subparsers.add_parser(
        "status",
        help="each asset's partitions: complete, failing checks, failed, pending, missing",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--json", action="store_true", help="print JSON")
    parser.set_defaults(func=cmd_status)
    return parser


@dataclass(frozen=True)
class Attempt:
    """Dagster's latest attempt at one partition that did not materialize it (yet)."""

    state: str  # "failed" (the run failed, or was killed) or "running"
    reason: str  # what happened, in words, naming the run
    run_id: str | None = None


def cmd_status(args: argparse.Namespace) -> int:
    from megapairs_assets.cli.lineage import existing_catalog
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.lib.errors import first_line
    from megapairs_assets.lib.storage import default_home
    from megapairs_assets.lineage.status import asset_status, format_status, partition_states
    from resources.environment import profile_from_env

    home = default_home()
    catalog = existing_catalog(home)
    if catalog is None:
        return 1
    # Importing the definitions also declares every stage's catalog tables.
    defs = build_definitions(profile_from_env(), home)
    graph = defs.resolve_asset_graph()
    instance, unavailable = _open_instance(home)
    assets = [key.to_user_string() for key in graph.toposorted_asset_keys]
    expected: dict[str, list[str]] = {}
    attempts: dict[str, dict[str, Attempt]] = {}
    if instance is not None:
        # Scores are expected only on the benchmarks this home can score (their folders set,
        # and the held-out split), as the demo and the retriever sensors score them.
        scored = set(defs.resources["evaluation"].configured_benchmarks())
        try:
            expected = expected_partitions(instance, graph, scored)
            attempts = unfinished_attempts(instance, graph, expected)
        except Exception as error:  # an instance that opens but cannot be read or updated
            unavailable = _unavailable_line(Path(instance.root_directory), first_line(error))
            instance, expected, attempts = None, {}, {}
    report = asset_status(catalog, assets, expected)
    states = partition_states(catalog)
    apply_attempts(report, states, attempts)
    explain_pending(report, states, catalog)
    nothing = instance is not None and not any(expected.values()) and not states.height
    if args.json:
        print(json.dumps([s.as_dict() for s in report], indent=2, default=str))
        return 0
    print(f"megapairs status: {home} (catalog {catalog.location})\n")
    if nothing:
        print(nothing_registered_text(instance))
        return 0
    if instance is not None and not any(expected.values()):
        # Records, but no partition set: a new instance beside an old catalog.
        first = report[0]
        first.problems.append(
            f"no shard or training config is registered in the Dagster instance "
            f"({instance.root_directory}), yet the lineage catalog holds {states.height} "
            "partition records: is DAGSTER_HOME another instance's? `megapairs sync` (or "
            "`megapairs demo`) registers the corpus's shards again"
        )
    text = format_status(report)
    if unavailable and text.endswith(ALL_CLEAR):
        # Without the partition sets, "every expected partition" is not known.
        text = (
            text.removesuffix(ALL_CLEAR)
            + "no partition the lineage catalog records needs attention"
        )
    print(text)
    print(
        "\ninputs changed: complete partitions that read an input re-materialized since "
        "(Dagster's UI says whether its content changed); `megapairs lineage 'asset[partition]'` "
        "shows one partition's chain"
    )
    if unavailable:
        print(f"\n{unavailable}")
    return 0


def _open_instance(home: Path) -> tuple[Any, str | None]:
    """The home's Dagster instance, or None and one line saying why it could not be opened
    (its SQLite storage on a read-only file system cannot be opened, not even to read)."""
    import dagster as dg

    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.lib.errors import ConfigurationError, first_line

    try:
        dagster_home = prepare_dagster_home(home)
    except ConfigurationError:
        raise  # a cluster instance set up wrong: the user must fix it
    except OSError as error:
        dagster_home = home / "dagster"
        return None, _unavailable_line(dagster_home, first_line(error))
    try:
        return dg.DagsterInstance.get(), None
    except Exception as error:  # any storage error: the report goes on without the instance
        return None, _unavailable_line(dagster_home, first_line(error))


def _unavailable_line(dagster_home: Path, reason: str) -> str:
    return (
        f"megapairs status: the Dagster instance at {dagster_home} could not be opened "
        f"({reason[:_ERROR_CHARS]}; a read-only home?), so the counts above come from the "
        "lineage catalog alone: registered partitions never materialized, and runs that failed "
        "before recording a partition, are not shown"
    )


def expected_partitions(
    instance: Any, graph: Any, scored_benchmarks: set[str]
) -> dict[str, list[str]]:
    """asset -> the partitions Dagster's partition sets say it should have (see module)."""
    import dagster as dg

    from megapairs_assets.evaluation.assets import BENCHMARK_DIMENSION

    expected = {}
    for key in graph.toposorted_asset_keys:
        partitions = graph.get(key).partitions_def
        if partitions is None:
            continue
        # Dagster's own list: a dynamic set's registered keys; a multi-partitioned asset's
        # product of its dimensions' keys (benchmark_scores: retrievers x benchmarks), each
        # as the string the catalog records.
        keys = partitions.get_partition_keys(dynamic_partitions_store=instance)
        expected[key.to_user_string()] = [
            str(partition)
            for partition in keys
            if not isinstance(partition, dg.MultiPartitionKey)
            or partition.keys_by_dimension.get(BENCHMARK_DIMENSION, "") in scored_benchmarks
            or BENCHMARK_DIMENSION not in partition.keys_by_dimension
        ]
    return expected


def unfinished_attempts(
    instance: Any, graph: Any, expected: Mapping[str, Sequence[str]]
) -> dict[str, dict[str, Attempt]]:
    """asset -> partition -> its latest Dagster attempt, where that attempt failed (the run
    failed or was killed, also before the step wrote anything, or the step was skipped for an
    upstream failure) or is still running; partitions whose latest attempt materialized them
    are left out."""
    from dagster import AssetPartitionStatus

    runs = _RunReasons(instance)
    attempts: dict[str, dict[str, Attempt]] = {}
    for key in graph.toposorted_asset_keys:
        name = key.to_user_string()
        node = graph.get(key)
        wanted = expected.get(name)
        if node.partitions_def is None or not wanted:
            continue
        statuses = instance.get_status_by_partition(key, list(wanted), node.partitions_def) or {}
        unfinished = [
            (partition, status)
            for partition, status in statuses.items()
            if status in (AssetPartitionStatus.FAILED, AssetPartitionStatus.IN_PROGRESS)
        ]
        found: dict[str, Attempt] = {}
        fallback: Attempt | None = None
        for index, (partition, status) in enumerate(unfinished):
            running = status == AssetPartitionStatus.IN_PROGRESS
            if index < _RUNS_LOOKED_UP_PER_ASSET:
                planned = instance.get_latest_planned_materialization_info(key, partition)
                run_id = planned.run_id if planned is not None else None
                fallback = runs.attempt(run_id, name, running)
                found[partition] = fallback
            else:
                found[partition] = fallback or Attempt("running" if running else "failed", "")
        if found:
            attempts[name] = found
    return attempts


class _RunReasons:
    """What happened to each run, in words, looked up once per run."""

    def __init__(self, instance: Any) -> None:
        self.instance = instance
        self._failures: dict[str, dict[str, str]] = {}
        self._alive: dict[str, bool] = {}

    def attempt(self, run_id: str | None, asset: str, running: bool) -> Attempt:
        if run_id is None:
            return Attempt("running" if running else "failed", "its latest run is unknown")
        run = self.instance.get_run_by_id(run_id)
        short = run_id[:8]
        if running:
            if run is not None and self.run_alive(run_id):
                return Attempt("running", f"run {short} is materializing it now")
            return Attempt(
                "failed",
                f"run {short} was killed before it materialized it (marked started, its "
                "process is gone; the next `megapairs demo` marks it failed)",
            )
        failures = self._step_failures(run_id)
        step = asset.replace("/", "__")
        if step in failures:
            return Attempt("failed", f"run {short} failed: {failures[step]}", run_id)
        if failures:
            first, error = next(iter(failures.items()))
            reason = f"run {short} failed before it (step {first} failed: {error})"
            return Attempt("failed", reason, run_id)
        status = run.status.value.lower() if run is not None else "unknown"
        return Attempt("failed", f"run {short} ended ({status}) without materializing it", run_id)

    def _step_failures(self, run_id: str) -> dict[str, str]:
        """step key -> the first line of its innermost error, for each failed step."""
        import dagster as dg

        if run_id not in self._failures:
            failures: dict[str, str] = {}
            for entry in self.instance.all_logs(run_id, of_type=dg.DagsterEventType.STEP_FAILURE):
                event = entry.dagster_event
                error = event.step_failure_data.error if event is not None else None
                while error is not None and error.cause is not None:
                    error = error.cause  # Dagster wraps the step's own error
                text = error.message.strip().splitlines()[0] if error is not None else "failed"
                failures.setdefault(event.step_key or "?", shortened(text, _ERROR_CHARS))
            self._failures[run_id] = failures
        return self._failures[run_id]

    def run_alive(self, run_id: str) -> bool:
        """Whether a process that wrote the run's events still runs here (a run killed with
        its process keeps the status STARTED until something marks it failed)."""
        from megapairs_assets.lib.processes import process_alive

        if run_id not in self._alive:
            pids: dict[int, float] = {}
            for entry in self.instance.all_logs(run_id):
                if entry.dagster_event is not None and entry.dagster_event.pid is not None:
                    pid = entry.dagster_event.pid
                    pids[pid] = max(pids.get(pid, 0.0), entry.timestamp)
            # No event with a process yet: just launched, so alive.
            self._alive[run_id] = not pids or any(
                process_alive(pid, seen) for pid, seen in pids.items()
            )
        return self._alive[run_id]


def apply_attempts(
    report: Sequence[Any], states: Any, attempts: Mapping[str, Mapping[str, Attempt]]
) -> None:
    """Fold Dagster's unfinished attempts into the catalog's counts (see module).

    A failed attempt turns a partition the catalog holds complete (an earlier version) or has
    no record of into a failed one, its line naming the run and error; one the catalog
    already records failed or pending keeps the catalog's own line. A running attempt turns a
    missing partition into a pending one; a complete one stays complete while it runs."""
    by_asset = {status.asset: status for status in report}
    for asset, partitions in attempts.items():
        status = by_asset.get(asset)
        if status is None:
            continue
        rows = states.filter(states["asset"] == asset)
        recorded = {row["partition"]: row for row in rows.iter_rows(named=True) if row["partition"]}
        for partition, attempt in partitions.items():
            row = recorded.get(partition)
            state = row["status"] if row is not None else "missing"
            if state in ("failed", "pending", "retired"):
                continue
            target = f"{asset}[{partition}]"
            if attempt.state == "running":
                if state == "missing":
                    status.missing -= 1
                    status.pending += 1
                    _replace_problem(status, target, f"{target}: {attempt.reason}")
                continue
            status.failed += 1
            if state == "missing":
                status.missing -= 1
                line = f"{target}: {attempt.reason}"
            else:
                status.complete -= 1
                status.failing_checks -= 1 if row["failed_checks"] else 0
                status.inputs_changed -= 1 if row["inputs_changed"] else 0
                if attempt.run_id is not None and row.get("run_id") == attempt.run_id:
                    # The step recorded its table, then the run failed (a blocking check, a
                    # later partition of its range): the table is that run's, not an earlier one.
                    line = (
                        f"{target}: {attempt.reason}; the table on disk is the one this run "
                        "wrote before failing: re-materialize it once the cause is fixed"
                    )
                else:
                    line = (
                        f"{target}: {attempt.reason}; its table is still the earlier one "
                        f"(materialized {row['started_at']})"
                    )
            _replace_problem(status, target, line)


def explain_pending(report: Sequence[Any], states: Any, catalog: Any) -> None:
    """Say of each pending partition whether a step of this machine is writing it now or it
    was left by one that ended without completing it (killed): the partition's step lock
    tells (file catalog only; on DuckLake the catalog's own line stays)."""
    if catalog.path is None:
        return
    by_asset = {status.asset: status for status in report}
    pending = states.filter(states["status"] == "pending")
    for row in pending.iter_rows(named=True):
        status = by_asset.get(row["asset"])
        if status is None or not row["partition"]:
            continue
        target = f"{row['asset']}[{row['partition']}]"
        if not any(problem.startswith(f"{target}: ") for problem in status.problems):
            continue  # not counted (no longer in the asset's partition set)
        if catalog.being_written(row["asset"], row["partition"]):
            line = f"{target}: being written now (pending since {row['started_at']})"
        else:
            line = (
                f"{target}: left pending since {row['started_at']} by a step that ended without "
                "completing it (killed?): re-materialize it"
            )
        _replace_problem(status, target, line)


def _replace_problem(status: Any, target: str, line: str) -> None:
    """Put `line` in place of the partition's own problem line (each starts '<target>: ')."""
    prefix = f"{target}: "
    kept = [problem for problem in status.problems if not problem.startswith(prefix)]
    status.problems[:] = [*kept, line]


def nothing_registered_text(instance: Any) -> str:
    """What `status` says of a home with no partition and no record: how to start, and the
    newest run if one started (a run killed before it registered anything)."""
    import dagster as dg

    lines = [
        "nothing is registered in this home yet: no shard or training config is in Dagster's "
        "partition sets and the lineage catalog holds no record, so nothing is complete either.",
        "Start with `megapairs demo` (the bundled corpus; `--corpus PATH` for your images), "
        "or `megapairs sync` to register your corpus's shards without running anything.",
    ]
    runs = instance.get_runs(limit=1)
    if runs:
        run = runs[0]
        state = _RUN_STATE_WORDS.get(run.status.value, run.status.value.lower())
        if run.status in (dg.DagsterRunStatus.STARTED, dg.DagsterRunStatus.STARTING):
            alive = _RunReasons(instance).run_alive(run.run_id)
            state = (
                "is still running" if alive else "was killed (marked started, its process is gone)"
            )
        lines.append(f"The newest run, {run.run_id[:8]} ({run.job_name}), {state}.")
    return "\n".join(lines)


_RUN_STATE_WORDS = {
    "FAILURE": "failed",
    "SUCCESS": "succeeded",
    "CANCELED": "was canceled",
    "CANCELING": "is being canceled",
    "QUEUED": "is queued",
    "NOT_STARTED": "has not started",
}
