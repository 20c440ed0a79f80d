"""`megapairs ui`: the Dagster UI on this project's workspace, run by this environment's Python.

The command never looks `dagster` up on `PATH`: a venv used as `.venv/bin/megapairs` usually has
no `bin` on `PATH`, and another environment's `dagster` there would serve a different version of
the code. Both candidates run as `python -m ...` with `sys.executable`, the interpreter running
this command, so the UI, the code server and the daemon all come from this environment.

Dagster 1.13 marks `dagster dev` as superseded by `dg dev` (it prints a SupersessionWarning), so
`dg dev` (package `dagster-dg-cli`) is used when it is installed. Given an explicit workspace
file, `dg dev` starts the same webserver and daemon as `dagster dev`; without dagster-dg-cli the
command falls back to `dagster dev` and says how to get the recommended one.

Before starting, the command refuses (exit 2, one `configuration error:` line) a port already
in use on the host, and a Dagster instance another `megapairs ui` already serves: `dg dev` runs
a daemon, and two daemons on one instance would each run the sensors and launch runs twice. The
second check is a lock file in the instance folder, held by the Dagster process itself (the fd
survives the exec) until it exits. A daemon started another way (`dagster dev`, a cluster's
dagster-daemon) is seen only by its heartbeats, which Dagster writes every 30 s and never
removes; a recent one stops the command on a cluster deployment (whose daemon runs for good)
and is a warning on the embedded one (it may be the UI stopped a moment ago).
"""

from __future__ import annotations

import argparse
import errno
import fcntl
import importlib.util
import os
import socket
import sys
import time
from pathlib import Path
from typing import IO, Any

from megapairs_assets.lib.errors import ConfigurationError

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
WORKSPACE_FILE = Path(__file__).resolve().parents[2] / "workspace.yaml"
# `python -m` targets of the two CLIs; dagster_dg_cli has no top-level __main__.
_DG_MODULE = "dagster_dg_cli.cli"
_DAGSTER_MODULE = "dagster"
# In the Dagster instance folder: held (flock) by the `megapairs ui` process serving it.
UI_LOCK_NAME = ".megapairs-ui.lock"
# A live daemon writes a heartbeat every 30 s (dagster's DEFAULT_HEARTBEAT_INTERVAL_SECONDS);
# one younger than two intervals means a daemon is, or was a moment ago, running.
RECENT_HEARTBEAT_S = 60.0


class UiStartError(ConfigurationError):
    """The UI cannot start as asked: its port is taken, or the instance is already served."""


def check_port_free(host: str, port: int) -> None:
    """Bind `host:port` as the webserver would, then let go; UiStartError when that fails
    (already in use, not permitted, an address this machine does not have)."""
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as error:
        raise UiStartError(
            f"cannot listen on host {host!r}: {error.strerror}; check --host"
        ) from None
    for family, kind, proto, _, address in addresses:
        with socket.socket(family, kind, proto) as probe:
            # As uvicorn does: a port whose last connection is in TIME_WAIT still counts as free.
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            try:
                probe.bind(address)
            except OSError as error:
                if error.errno == errno.EADDRINUSE:
                    raise UiStartError(
                        f"port {port} on {host} is already in use (another `megapairs ui`, or "
                        f"another server): pick a free one with --port, e.g. --port {port + 1}"
                    ) from None
                raise UiStartError(
                    f"cannot listen on {host}:{port} ({error.strerror}); "
                    "pick another --port or --host"
                ) from None


def hold_ui_lock(dagster_home: Path, port: int) -> IO[str]:
    """Take the instance's UI lock (kept open and inheritable, so the exec'd Dagster process
    holds it until it exits); UiStartError naming the holder when another UI has it."""
    lock = open(dagster_home / UI_LOCK_NAME, "a+")  # noqa: SIM115 (held past this function)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        lock.seek(0)
        holder = lock.read().strip() or "another process"
        lock.close()
        raise UiStartError(
            f"another `megapairs ui` ({holder}) already serves the Dagster instance "
            f"{dagster_home}: open that one, or stop it first (its daemon runs the sensors; two "
            "daemons on one instance would launch every run twice)"
        ) from None
    lock.seek(0)
    lock.truncate()
    lock.write(f"pid {os.getpid()}, port {port}")
    lock.flush()
    os.set_inheritable(lock.fileno(), True)
    return lock


def recent_daemon_heartbeat(instance: Any, now_s: float | None = None) -> tuple[str, float] | None:
    """The daemon type and age in seconds of the instance's newest daemon heartbeat, when it is
    younger than RECENT_HEARTBEAT_S; else None."""
    now_s = time.time() if now_s is None else now_s
    beats = instance.get_daemon_heartbeats()
    if not beats:
        return None
    daemon_type, beat = max(beats.items(), key=lambda item: item[1].timestamp)
    age_s = max(0.0, now_s - beat.timestamp)
    return (daemon_type, age_s) if age_s < RECENT_HEARTBEAT_S else None


def dagster_dev_command(
    workspace: Path, host: str, port: int, python: str | None = None
) -> list[str]:
    """The argv that serves `workspace` on host:port: `dg dev` if installed, else `dagster dev`.

    `python` defaults to `sys.executable`; the first element of the result is that interpreter.
    """
    python = python or sys.executable
    module = _DG_MODULE if importlib.util.find_spec("dagster_dg_cli") else _DAGSTER_MODULE
    return [python, "-m", module, "dev", "-w", str(workspace), "-h", host, "-p", str(port)]


def cmd_ui(args: argparse.Namespace) -> int:
    """Replace this process with the environment's Dagster dev server on the workspace.

    Shares the demo's Dagster instance (`$DAGSTER_HOME`, else `$MEGAPAIRS_HOME/dagster`).
    """
    from megapairs_assets.cli.instance import prepare_dagster_home
    from megapairs_assets.lib.storage import default_home

    if not WORKSPACE_FILE.is_file():
        print(f"no workspace file at {WORKSPACE_FILE}: run from a clone", file=sys.stderr)
        return 1
    import dagster as dg

    from megapairs_assets.cli.instance import release_dead_runs
    from resources.cluster import ClusterSettings

    check_port_free(args.host, args.port)
    dagster_home = prepare_dagster_home(default_home())
    # Bound to a name so it stays open up to the exec; the Dagster process then holds it.
    ui_lock = hold_ui_lock(dagster_home, args.port)  # noqa: F841
    instance = dg.DagsterInstance.get()
    embedded = ClusterSettings.from_env().deployment == "embedded"
    recent = recent_daemon_heartbeat(instance)
    if recent is not None:
        daemon_type, age_s = recent
        seen = (
            f"a Dagster daemon ({daemon_type}) wrote a heartbeat to the instance {dagster_home} "
            f"{age_s:.0f} s ago"
        )
        if not embedded:
            # A cluster's daemon runs all the time: a second one would run sensors twice.
            raise UiStartError(
                f"{seen}: this deployment already runs a daemon; use its Dagster UI, not "
                "`megapairs ui` (whose `dg dev` would start a second daemon); if that daemon "
                f"was a UI stopped a moment ago, try again in {RECENT_HEARTBEAT_S - age_s:.0f} s"
            )
        print(
            f"megapairs ui: warning: {seen}: fine if it was a UI stopped a moment ago; if a "
            "`dagster dev` or dagster-daemon still runs on this instance, stop it or this UI "
            "(two daemons would launch runs twice)",
            file=sys.stderr,
        )
    if embedded:  # runs of this machine only
        release_dead_runs(instance)
    command = dagster_dev_command(WORKSPACE_FILE, args.host, args.port)
    if command[2] == _DAGSTER_MODULE:
        print(
            "megapairs: dagster-dg-cli is not installed, using `dagster dev` "
            "(`pip install dagster-dg-cli` to use `dg dev`, which Dagster recommends)",
            file=sys.stderr,
        )
    print(
        f"megapairs: Dagster UI on http://{args.host}:{args.port} "
        f"(instance {dagster_home}); Ctrl-C stops it",
        flush=True,
    )
    # exec, not a child: Ctrl-C and signals reach Dagster's own shutdown handling directly.
    os.execv(command[0], command)
    return 0  # not reached


def _port(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a port number: {text!r}") from None
    if not 1 <= value <= 65535:
        raise argparse.ArgumentTypeError(f"a port is 1..65535, got {value}")
    return value


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `ui` subcommand to the `megapairs` parser."""
    ui = subparsers.add_parser(
        "ui",
        help="open the Dagster UI on this workspace (dg dev)",
        description="Serve the Dagster UI and daemon (this environment's `dg dev`) on the home's "
        "instance ($DAGSTER_HOME, else $MEGAPAIRS_HOME/dagster): the demo's runs, partitions, "
        "checks and metadata, and the sensors that keep them current.",
    )
    ui.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address the UI listens on (default {DEFAULT_HOST})"
    )
    ui.add_argument(
        "--port", type=_port, default=DEFAULT_PORT, help=f"port of the UI (default {DEFAULT_PORT})"
    )
    ui.set_defaults(func=cmd_ui)
    return ui
