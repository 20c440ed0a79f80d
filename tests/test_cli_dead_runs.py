"""A run killed in the middle of a step must not block its pool for every later run."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

import dagster as dg

from megapairs_assets.cli.instance import DAGSTER_YAML, release_dead_runs

# A step in pool `gpu` that sleeps, run in process the way `megapairs demo` and
# `dagster asset materialize` run steps.
SLEEPER = """
import sys, time
import dagster as dg

@dg.asset(pool="gpu")
def slow():
    time.sleep(float(sys.argv[1]))

dg.materialize([slow], instance=dg.DagsterInstance.get())
"""


def _instance(home: Path) -> dg.DagsterInstance:
    return dg.DagsterInstance.from_config(str(home))


def test_a_killed_run_is_marked_failed_and_its_pool_slot_freed(tmp_path: Path, monkeypatch) -> None:
    home = tmp_path / "dagster"
    home.mkdir()
    (home / "dagster.yaml").write_text(DAGSTER_YAML)  # the CLI's instance: one step per pool
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    instance = _instance(home)

    alive = subprocess.Popen([sys.executable, str(script), "60"])
    try:
        deadline = time.monotonic() + 60
        while not instance.event_log_storage.get_concurrency_run_ids():
            assert time.monotonic() < deadline, "the step never claimed its slot"
            time.sleep(0.2)
        (run_id,) = instance.event_log_storage.get_concurrency_run_ids()
        assert release_dead_runs(instance, log=lambda _: None) == []  # alive: left alone
        alive.kill()
        alive.wait()
    finally:
        alive.kill()

    messages: list[str] = []
    assert release_dead_runs(instance, log=messages.append) == [run_id]
    assert instance.get_run_by_id(run_id).status == dg.DagsterRunStatus.FAILURE
    assert not instance.event_log_storage.get_concurrency_run_ids()
    assert "process is gone" in messages[0]
    # The pool takes the next run's step at once.
    finished = subprocess.run([sys.executable, str(script), "0"], timeout=120, check=False)
    assert finished.returncode == 0


def test_unblock_releases_a_killed_run_from_the_command_line(
    tmp_path: Path, monkeypatch, capsys
) -> None:
    from megapairs_assets.cli.main import main

    home = tmp_path / "home" / "dagster"
    home.mkdir(parents=True)
    (home / "dagster.yaml").write_text(DAGSTER_YAML)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("DAGSTER_HOME", str(home))
    monkeypatch.delenv("MEGAPAIRS_DEPLOYMENT", raising=False)
    script = tmp_path / "sleeper.py"
    script.write_text(SLEEPER)
    instance = _instance(home)
    sleeper = subprocess.Popen([sys.executable, str(script), "60"])
    deadline = time.monotonic() + 60
    while not instance.event_log_storage.get_concurrency_run_ids():
        assert time.monotonic() < deadline, "the step never claimed its slot"
        time.sleep(0.2)
    sleeper.kill()
    sleeper.wait()
    assert main(["unblock"]) == 0
    out = capsys.readouterr().out
    assert "process is gone" in out and out.rstrip().endswith(f"1 runs released ({home})")
    assert not instance.event_log_storage.get_concurrency_run_ids()
