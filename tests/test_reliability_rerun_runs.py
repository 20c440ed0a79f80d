"""A killed run never blocks the instance: re-running the killed command just works.

A run executed in process (`dagster job execute`) and killed with SIGKILL keeps its status
`STARTED` and the pool slot its step held. The next run's step of that pool then waited forever
("Step blocked by limit for pool gpu") until someone ran `megapairs unblock`, and a killed run
that held no slot stayed "in progress" for good (which also stops declarative automation of
its partitions). `megapairs_executor` releases such runs before it executes a run.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import pytest
from test_reliability_rerun_storage import stop

from megapairs_assets.cli.instance import DAGSTER_YAML
from megapairs_assets.orchestration.runs import release_dead_runs

# One job, run the way `dagster job execute` runs it (the job's own executor, in process), with
# an asset in pool `gpu` that writes its pid and sleeps for argv[1] seconds.
_JOB_SCRIPT = """
import os, sys, time
from pathlib import Path
import dagster as dg
from megapairs_assets.orchestration.runs import megapairs_executor

@dg.asset(pool=sys.argv[3] or None)
def slow():
    Path(sys.argv[2]).write_text(str(os.getpid()))
    time.sleep(float(sys.argv[1]))

def job():
    return dg.Definitions(
        assets=[slow],
        jobs=[dg.define_asset_job("slow_job", selection=[slow])],
        executor=megapairs_executor,
    ).resolve_job_def("slow_job")

if __name__ == "__main__":
    result = dg.execute_job(
        dg.reconstructable(job),
        instance=dg.DagsterInstance.get(),
        run_config={"execution": {"config": {"in_process": {}}}},
    )
    sys.exit(0 if result.success else 1)
"""


@pytest.fixture
def dagster_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)  # the CLI's instance: one step per pool
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("MEGAPAIRS_DEPLOYMENT", raising=False)
    return home


def _run(tmp_path: Path, sleep_s: float, pool: str, marker: Path) -> subprocess.Popen:
    script = tmp_path / "slow_job.py"
    script.write_text(_JOB_SCRIPT)
    return subprocess.Popen(
        ["timeout", "-s", "KILL", "240", sys.executable, str(script), str(sleep_s), marker, pool]
    )


def _kill_when_running(process: subprocess.Popen, marker: Path, timeout_s: float = 180) -> None:
    deadline = time.monotonic() + timeout_s
    while not marker.exists():
        assert process.poll() is None, "the run ended before its step started"
        assert time.monotonic() < deadline, "the step never started"
        time.sleep(0.1)
    os.kill(int(marker.read_text()), signal.SIGKILL)  # the run's process, inside its step
    process.wait(timeout=60)


def _statuses(home: Path) -> list[dg.DagsterRunStatus]:
    instance = dg.DagsterInstance.from_config(str(home))
    return [run.status for run in reversed(instance.get_runs())]


def test_rerunning_a_killed_command_does_not_wait_for_the_dead_runs_slot(
    tmp_path: Path, dagster_home: Path
) -> None:
    killed = _run(tmp_path, 120, "gpu", tmp_path / "first")
    try:
        _kill_when_running(killed, tmp_path / "first")
    finally:
        stop(killed)
    instance = dg.DagsterInstance.from_config(str(dagster_home))
    assert instance.event_log_storage.get_concurrency_run_ids(), "the dead run holds no slot"

    again = _run(tmp_path, 0, "gpu", tmp_path / "second")
    try:
        assert again.wait(timeout=180) == 0  # before: blocked by the dead run's slot forever
    finally:
        stop(again)
    assert _statuses(dagster_home) == [dg.DagsterRunStatus.FAILURE, dg.DagsterRunStatus.SUCCESS]
    assert not instance.event_log_storage.get_concurrency_run_ids()


def test_a_killed_run_without_a_pool_slot_is_no_longer_in_progress(
    tmp_path: Path, dagster_home: Path
) -> None:
    live = _run(tmp_path, 120, "", tmp_path / "live")
    deadline = time.monotonic() + 180
    while not (tmp_path / "live").exists():
        assert live.poll() is None and time.monotonic() < deadline, "the live run never started"
        time.sleep(0.1)
    try:
        instance = dg.DagsterInstance.from_config(str(dagster_home))
        assert release_dead_runs(instance, log=lambda _: None) == []  # alive: left alone
        _kill_when_running(live, tmp_path / "live")
    finally:
        stop(live)
    (run,) = instance.get_runs()
    assert run.status == dg.DagsterRunStatus.STARTED  # what Dagster leaves after a SIGKILL
    messages: list[str] = []
    assert release_dead_runs(instance, log=messages.append) == [run.run_id]
    assert instance.get_run_by_id(run.run_id).status == dg.DagsterRunStatus.FAILURE
    assert "held no pool slot" in messages[0]
    assert release_dead_runs(instance, log=messages.append) == []  # once only
