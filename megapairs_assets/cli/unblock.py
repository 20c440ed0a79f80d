"""`megapairs unblock`: release the runs of this machine whose process was killed.

A killed in-process run (`dagster asset materialize`, `dagster job execute`, a demo stopped
with SIGKILL) stays `STARTED` for good: it keeps its pool slot, so every later step of that
pool waits for it, and its partitions stay "in progress", so declarative automation skips
them. `megapairs demo`, `megapairs ui` and every run of a job on the `megapairs_executor`
release such runs when they start; this does only that, for runs launched another way.
"""

from __future__ import annotations

import argparse


def register(subparsers: argparse._SubParsersAction) -> argparse.ArgumentParser:
    unblock = subparsers.add_parser(
        "unblock",
        help="mark runs whose process was killed as failed and free their pool slots",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    unblock.set_defaults(func=cmd_unblock)
    return unblock


def cmd_unblock(args: argparse.Namespace) -> int:
    import dagster as dg

    from megapairs_assets.cli.instance import prepare_dagster_home, release_dead_runs
    from megapairs_assets.lib.errors import ConfigurationError
    from megapairs_assets.lib.storage import default_home
    from resources.cluster import ClusterSettings

    if ClusterSettings.from_env().deployment != "embedded":
        raise ConfigurationError(
            "unblock reads process ids, which only mean something on the machine that ran the "
            "steps (the embedded deployment); on a cluster, Dagster's run monitoring does this"
        )
    dagster_home = prepare_dagster_home(default_home())
    released = release_dead_runs(dg.DagsterInstance.get())
    print(f"{len(released)} runs released ({dagster_home})")
    return 0
