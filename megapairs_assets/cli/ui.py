"""`megapairs ui`: the Dagster UI on this project's workspace, run by this environment's Python.

The command never looks `dagster` up on `PATH`: a venv used as `.venv/bin/megapairs` usually has
no `bin` on `PATH`, and another environment's `dagster` there would serve a different version of
the code. Both candidates run as `python -m ...` with `sys.executable`, the interpreter running
this command, so the UI, the code server and the daemon all come from this environment.

Dagster 1.13 marks `dagster dev` as superseded by `dg dev` (it prints a SupersessionWarning), so
`dg dev` (package `dagster-dg-cli`) is used when it is installed. Given an explicit workspace
file, `dg dev` starts the same webserver and daemon as `dagster dev`; without dagster-dg-cli the
command falls back to `dagster dev` and says how to get the recommended one.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 3000
WORKSPACE_FILE = Path(__file__).resolve().parents[2] / "workspace.yaml"
# `python -m` targets of the two CLIs; dagster_dg_cli has no top-level __main__.
_DG_MODULE = "dagster_dg_cli.cli"
_DAGSTER_MODULE = "dagster"


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

    dagster_home = prepare_dagster_home(default_home())
    if ClusterSettings.from_env().deployment == "embedded":  # runs of this machine only
        release_dead_runs(dg.DagsterInstance.get())
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


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    """Add the `ui` subcommand to the `megapairs` parser."""
    ui = subparsers.add_parser("ui", help="open the Dagster UI on this workspace (dg dev)")
    ui.add_argument(
        "--host", default=DEFAULT_HOST, help=f"address the UI listens on (default {DEFAULT_HOST})"
    )
    ui.add_argument(
        "--port", type=int, default=DEFAULT_PORT, help=f"port of the UI (default {DEFAULT_PORT})"
    )
    ui.set_defaults(func=cmd_ui)
    return ui
