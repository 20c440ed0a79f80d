"""The Dagster instance the CLI uses: `$DAGSTER_HOME`, else `<data root>/dagster`."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Telemetry and the first-visit dialog off (this runs offline); one step at a time per pool
# by default, so a backfill of non-adjacent shards (several runs) never loads two models on
# one GPU at once. Raise a pool's limit to its number of GPUs:
# `dagster instance concurrency set gpu N`.
DAGSTER_YAML = """telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""


def prepare_dagster_home(home: Path) -> Path:
    """Use `$DAGSTER_HOME` if set, else `<home>/dagster`, so the UI later shows the same runs."""
    dagster_home = Path(os.environ.get("DAGSTER_HOME") or home / "dagster")
    dagster_home.mkdir(parents=True, exist_ok=True)
    config = dagster_home / "dagster.yaml"
    if not config.exists():
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


def release_dead_runs(instance: Any, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed the runs on this machine whose process is gone, and free their pool slots.

    A run executed in process (`megapairs demo`, `dagster asset materialize`) that is killed
    keeps its status `STARTED` and the pool slot its step claimed; with the CLI's limit of one
    step per pool, every later step of that pool then waits forever. Dagster's run monitoring
    frees slots only for runs that reached a final status, and only under its daemon, so the
    CLI does this before it starts work. Only runs holding slots are looked at, and a run is
    taken as dead only when the process that wrote its events no longer exists here. Returns
    the run ids released.
    """
    from dagster import DagsterRunStatus

    released = []
    for run_id in sorted(instance.event_log_storage.get_concurrency_run_ids()):
        run = instance.get_run_by_id(run_id)
        if run is not None and run.status not in (
            DagsterRunStatus.STARTED,
            DagsterRunStatus.STARTING,
            DagsterRunStatus.CANCELING,
        ):
            # Finished, yet still holding slots (no daemon freed them).
            instance.event_log_storage.free_concurrency_slots_for_run(run_id)
            continue
        pids = {
            entry.dagster_event.pid
            for entry in instance.all_logs(run_id)
            if entry.dagster_event is not None and entry.dagster_event.pid is not None
        }
        if any(_process_alive(pid) for pid in pids):
            continue
        if run is not None:
            instance.report_run_failed(
                run, "its process is gone (killed); megapairs freed its pool slots"
            )
        instance.event_log_storage.free_concurrency_slots_for_run(run_id)
        released.append(run_id)
        log(f"run {run_id[:8]}: its process is gone (killed); marked failed, pool slots freed")
    return released


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)  # signal 0: an existence check, nothing is sent
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True
