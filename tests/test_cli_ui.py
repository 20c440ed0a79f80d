"""`megapairs ui` serves the UI with this environment's Dagster, whatever PATH holds."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import dagster

from megapairs_assets.cli.ui import WORKSPACE_FILE, dagster_dev_command

VENV_BIN = Path(sys.executable).parent
# Sensors and automation would otherwise launch runs while the server is up; a paused run queue
# keeps the test to starting and stopping the UI.
PAUSED_INSTANCE_YAML = "telemetry:\n  enabled: false\nrun_queue:\n  max_concurrent_runs: 0\n"
STARTUP_TIMEOUT_S = 120.0


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _server_info(port: int) -> dict | None:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/server_info", timeout=2) as reply:
            return json.loads(reply.read())
    except OSError:
        return None


def _stop_group(process: subprocess.Popen) -> None:
    """SIGTERM the server's process group, then SIGKILL whatever outlives a short grace."""
    for sig, grace_s in ((signal.SIGTERM, 8.0), (signal.SIGKILL, 5.0)):
        try:
            os.killpg(process.pid, sig)
        except ProcessLookupError:
            return
        try:
            process.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            continue
        # The leader exited; its children (code server, daemon) may not have.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        return


def _decoy_bin(folder: Path, marker: Path) -> Path:
    """A PATH entry whose `dagster` and `dg` only leave a marker, to catch a PATH lookup."""
    folder.mkdir()
    for name in ("dagster", "dg"):
        script = folder / name
        script.write_text(f"#!/bin/sh\necho {name} >> '{marker}'\nexit 3\n")
        script.chmod(0o755)
    return folder


def test_command_uses_this_interpreter_and_the_recommended_cli() -> None:
    command = dagster_dev_command(WORKSPACE_FILE, "127.0.0.1", 3123)
    assert command[:2] == [sys.executable, "-m"]
    assert command[3:] == ["dev", "-w", str(WORKSPACE_FILE), "-h", "127.0.0.1", "-p", "3123"]
    try:
        import dagster_dg_cli  # noqa: F401
    except ImportError:
        assert command[2] == "dagster"
    else:
        assert command[2] == "dagster_dg_cli.cli"


def test_ui_from_venv_not_on_path_reaches_the_server(tmp_path: Path) -> None:
    home = tmp_path / "home"
    (home / "dagster").mkdir(parents=True)
    (home / "dagster" / "dagster.yaml").write_text(PAUSED_INSTANCE_YAML)
    marker = tmp_path / "decoy-called"
    decoy = _decoy_bin(tmp_path / "decoy-bin", marker)
    path = os.pathsep.join([str(decoy), "/usr/bin", "/bin"])
    assert str(VENV_BIN) not in path.split(os.pathsep)
    env = {
        key: value
        for key, value in os.environ.items()
        if key not in ("DAGSTER_HOME", "MEGAPAIRS_PROFILE", "VIRTUAL_ENV", "PYTHONPATH")
    }
    env.update(PATH=path, MEGAPAIRS_HOME=str(home))
    port = _free_port()
    log_path = tmp_path / "ui.log"
    with log_path.open("w") as log:
        process = subprocess.Popen(
            [str(VENV_BIN / "megapairs"), "ui", "--port", str(port)],
            cwd=tmp_path,
            env=env,
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,  # its own process group, so the test can stop all of it
        )
    try:
        deadline = time.monotonic() + STARTUP_TIMEOUT_S
        info = None
        while info is None and time.monotonic() < deadline and process.poll() is None:
            time.sleep(0.5)
            info = _server_info(port)
        output = log_path.read_text()
        assert info is not None, f"UI never answered (exit {process.poll()}):\n{output[-3000:]}"
    finally:
        _stop_group(process)
    assert info["dagster_version"] == dagster.__version__
    assert not marker.exists(), "a dagster/dg found on PATH was run"
    assert "SupersessionWarning" not in output or "dagster-dg-cli is not installed" in output
