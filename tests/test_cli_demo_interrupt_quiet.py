"""Ctrl-C during `megapairs demo` prints what the user needs, not Dagster's tracebacks.

A real failure still prints its stack; an interrupt's errors print as one line each; the
processes that copy a step's output to the terminal do not die (with a traceback) on Ctrl-C.
"""

import os
import selectors
import signal
import subprocess
import sys
import time
from pathlib import Path

import dagster as dg
import image_factory as factory
import psutil
import pytest
from conftest import make_home

from megapairs_assets.cli.demo import RESUME_HINT, was_interrupted
from megapairs_assets.cli.instance import DAGSTER_YAML, EARLIER_DAGSTER_YAMLS, prepare_dagster_home
from megapairs_assets.orchestration.console import (
    InterruptQuietComputeLogManager,
    interrupt_quiet_console_logger,
    interrupts_survive_finalizers,
    is_interrupt,
)

LINUX = sys.platform.startswith("linux")


def _error_info(error: BaseException) -> object:
    from dagster._utils.error import serializable_error_info_from_exc_info

    try:
        raise error
    except BaseException:
        return serializable_error_info_from_exc_info(sys.exc_info())


def test_an_interrupt_counts_anywhere_in_the_error_chain() -> None:
    from dagster._core.errors import DagsterExecutionInterruptedError

    def query_interrupted() -> None:  # a library turning the interrupt into its own error
        try:
            raise DagsterExecutionInterruptedError()
        except BaseException as interrupt:
            raise RuntimeError("Query interrupted") from interrupt

    try:
        query_interrupted()
    except RuntimeError as wrapped:
        assert is_interrupt(_error_info(wrapped))
    assert is_interrupt(_error_info(KeyboardInterrupt()))
    assert not is_interrupt(_error_info(ValueError("a real bug")))
    assert not is_interrupt(None)


@dg.asset
def pressed_ctrl_c(context: dg.AssetExecutionContext) -> None:
    context.log.info("working on step 3 of 8")
    try:
        os.kill(os.getpid(), signal.SIGINT)  # as the terminal does; Dagster's handler raises
        time.sleep(5)
    except BaseException as interrupt:  # as training's stop does: say where its state is
        interrupt.args = ("stopped at step 3 of 8; saved /x/last.ckpt",)
        raise


@dg.asset
def real_bug() -> None:
    raise ValueError("a real bug in the step")


def _run(asset: dg.AssetsDefinition, capsys: pytest.CaptureFixture[str]) -> tuple[bool, str]:
    job = dg.define_asset_job("job", selection=[asset])
    defs = dg.Definitions(
        assets=[asset], jobs=[job], loggers={"console": interrupt_quiet_console_logger}
    )
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("job").execute_in_process(
            instance=instance,
            raise_on_error=False,
            run_config={"loggers": {"console": {"config": {"log_level": "INFO"}}}},
        )
    assert not result.success
    return was_interrupted(result), capsys.readouterr().err


def test_an_interrupted_run_prints_its_errors_without_their_stack(capsys) -> None:
    interrupted, printed = _run(pressed_ctrl_c, capsys)
    assert interrupted
    assert "working on step 3 of 8" in printed
    failures = [line for line in printed.splitlines() if "_FAILURE" in line]
    assert [line.split(" - ")[-2] for line in failures] == ["STEP_FAILURE", "RUN_FAILURE"]
    assert all(line.endswith(". (interrupted)") for line in failures), printed
    assert "Stack Trace" not in printed and "Traceback" not in printed, printed
    assert len(printed.splitlines()) < 20, printed


def test_a_real_failure_still_prints_its_stack(capsys) -> None:
    interrupted, printed = _run(real_bug, capsys)
    assert not interrupted
    assert "STEP_FAILURE" in printed and "(interrupted)" not in printed
    assert "Stack Trace" in printed
    assert "ValueError: a real bug in the step" in printed
    assert "test_cli_demo_interrupt_quiet.py" in printed  # the user's own frame is shown


class _PressesCtrlCWhileCollected:
    """A finalizer that is running when Ctrl-C arrives (as garbage collection during a model
    load can be): Dagster's handler raises inside it, where Python can only print the error."""

    def __del__(self) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        deadline = time.monotonic() + 2
        while time.monotonic() < deadline:  # the handler raises in here
            pass


@dg.asset
def interrupted_in_a_finalizer() -> None:
    _PressesCtrlCWhileCollected()  # collected at once
    time.sleep(3)  # the step goes on unless the interrupt is sent again


def test_a_ctrl_c_that_lands_in_a_finalizer_still_stops_the_run(capsys) -> None:
    with interrupts_survive_finalizers():
        interrupted, printed = _run(interrupted_in_a_finalizer, capsys)
    assert interrupted, printed
    assert "Exception ignored" not in printed and "Traceback" not in printed, printed


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
def test_without_the_hook_python_swallows_that_ctrl_c() -> None:
    """Why the hook exists: the same step succeeds when nothing sends the interrupt again."""
    job = dg.define_asset_job("job", selection=[interrupted_in_a_finalizer])
    defs = dg.Definitions(assets=[interrupted_in_a_finalizer], jobs=[job])
    with dg.DagsterInstance.ephemeral() as instance:
        result = defs.resolve_job_def("job").execute_in_process(
            instance=instance, raise_on_error=False
        )
    assert result.success


def test_prepare_dagster_home_upgrades_only_a_config_it_wrote(tmp_path, monkeypatch) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    ours, theirs = tmp_path / "ours", tmp_path / "theirs"
    (ours / "dagster").mkdir(parents=True)
    (ours / "dagster" / "dagster.yaml").write_text(EARLIER_DAGSTER_YAMLS[0])
    (theirs / "dagster").mkdir(parents=True)
    (theirs / "dagster" / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    assert (prepare_dagster_home(ours) / "dagster.yaml").read_text() == DAGSTER_YAML
    monkeypatch.delenv("DAGSTER_HOME")
    kept = prepare_dagster_home(theirs) / "dagster.yaml"
    assert kept.read_text() == "telemetry:\n  enabled: false\n"


@dg.asset
def prints_and_reports_its_copiers() -> dg.MaterializeResult:
    print("captured marker line", flush=True)
    copiers = psutil.Process().children()
    return dg.MaterializeResult(
        metadata={
            "copiers": [" ".join(child.cmdline()[:2]) for child in copiers],
            "sigint_blocked": [_sigint_blocked(child.pid) for child in copiers],
            "here_blocked": _sigint_blocked(os.getpid()),
        }
    )


def _sigint_blocked(pid: int) -> bool:
    """Whether a process (its main thread) blocks SIGINT, from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("SigBlk:"):
            return bool(int(line.split()[1], 16) & (1 << (signal.SIGINT - 1)))
    raise AssertionError(f"no SigBlk in /proc/{pid}/status")


@pytest.mark.skipif(not LINUX, reason="reads /proc; Dagster tails with a poller on Windows")
def test_the_cli_instance_captures_output_with_copiers_that_ignore_ctrl_c(
    tmp_path, monkeypatch
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    dagster_home = prepare_dagster_home(tmp_path)  # sets DAGSTER_HOME; monkeypatch restores
    with dg.DagsterInstance.get() as instance:
        manager = instance.compute_log_manager
        assert isinstance(manager, InterruptQuietComputeLogManager)
        result = dg.materialize([prints_and_reports_its_copiers], instance=instance)
        [materialization] = result.asset_materializations_for_node("prints_and_reports_its_copiers")
        metadata = {key: value.value for key, value in materialization.metadata.items()}
        # The UI still gets the step's output, in Dagster's default place.
        [capture] = [
            event for event in result.all_events if event.event_type_value == "LOGS_CAPTURED"
        ]
        log_key = manager.build_log_key_for_run(result.run_id, capture.event_specific_data.file_key)
        captured = manager.get_log_data(log_key).stdout.decode()
    assert "captured marker line" in captured
    assert manager.get_captured_local_path(log_key, "out").startswith(str(dagster_home / "storage"))
    # One `tail` and one watcher per stream, all with SIGINT blocked; the step itself not.
    # Only the copiers: a pytest worker may hold other children of its own (a test's server).
    copiers = [
        (command, blocked)
        for command, blocked in zip(metadata["copiers"], metadata["sigint_blocked"], strict=True)
        if command.startswith("tail") or "watch_orphans" in command
    ]
    assert sum(command.startswith("tail") for command, _ in copiers) == 2, copiers
    assert sum("watch_orphans" in command for command, _ in copiers) == 2, copiers
    assert all(blocked for _, blocked in copiers), copiers
    assert not metadata["here_blocked"]


# --- a real Ctrl-C to `megapairs demo`, as a terminal sends it (to the whole process group) ---


def _demo(home: Path, corpus: Path) -> subprocess.Popen[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("DAGSTER_HOME", "MEGAPAIRS_PROFILE")}
    env.update(MEGAPAIRS_HOME=str(home), PYTHONUNBUFFERED="1")
    argv = ["demo", "--until", "mine", "--corpus", str(corpus)]
    return subprocess.Popen(
        [sys.executable, "-m", "megapairs_assets.cli", *argv],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # its own process group: the test's terminal stands in for it
    )


def _read_until(process: subprocess.Popen[str], marker: str | None, timeout_s: float) -> str:
    """The process's output up to the first line containing `marker` (None: to the end)."""
    assert process.stdout is not None
    selector = selectors.DefaultSelector()
    selector.register(process.stdout, selectors.EVENT_READ)
    lines: list[str] = []
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not selector.select(timeout=deadline - time.monotonic()):
            break
        line = process.stdout.readline()
        if not line:
            return "".join(lines)
        lines.append(line)
        if marker is not None and marker in line:
            return "".join(lines)
    os.killpg(process.pid, signal.SIGKILL)
    raise AssertionError(f"timed out waiting for {marker!r}; output so far:\n{''.join(lines)}")


@pytest.mark.skipif(not LINUX, reason="a process group and SIGINT as a POSIX terminal sends it")
def test_ctrl_c_during_the_demo_prints_no_traceback_and_a_rerun_finishes(
    tmp_path: Path, demo_models_dir: Path
) -> None:
    corpus = tmp_path / "corpus"
    for index, shard in enumerate(("00000", "00001")):
        factory.write_wds_shard(corpus / f"{shard}.tar", factory.good_items(6, 10 * index))
    home = make_home(tmp_path, demo_models_dir)

    demo = _demo(home, corpus)
    try:
        before = _read_until(demo, "image_corpus", timeout_s=90)  # inside the run's first step
        os.killpg(demo.pid, signal.SIGINT)
        after = _read_until(demo, None, timeout_s=60)
        assert demo.wait(timeout=30) == 130, before + after
    finally:
        if demo.poll() is None:
            os.killpg(demo.pid, signal.SIGKILL)
    printed = before + after
    assert RESUME_HINT in printed, printed
    assert "Traceback" not in printed and "Stack Trace" not in printed, printed
    assert "KeyboardInterrupt" not in printed, printed

    rerun = _demo(home, corpus)
    resumed = _read_until(rerun, None, timeout_s=90)
    assert rerun.wait(timeout=30) == 0, resumed
    assert "2 shards" in resumed and "Traceback" not in resumed
