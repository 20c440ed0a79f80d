"""The Dagster instance the CLI uses: `$DAGSTER_HOME`, else `<data root>/dagster`."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

# Telemetry and the first-visit dialog off (this runs offline); one step at a time per pool
# by default, so a backfill of non-adjacent shards (several runs) never loads two models on
# one GPU at once. Raise a pool's limit to its number of GPUs:
# `dagster instance concurrency set gpu N`. Steps' output is captured as by Dagster's default
# (same files, shown by the UI), by a manager whose copy to the terminal survives Ctrl-C
# without tracebacks (megapairs_assets/orchestration/console.py). A run that failed outside its
# steps (its process died) is retried once by the daemon (`megapairs ui`), as on the cluster:
# declarative automation does not request a partition again after its run failed. A step's own
# failure is not retried: a failed check or a missing table fails the same way seconds later,
# and the retry's materializations would count as "handled" for automation.
_OFFLINE_ONE_STEP_PER_POOL = """telemetry:
  enabled: false
nux:
  enabled: false
concurrency:
  pools:
    default_limit: 1
"""
_QUIET_COMPUTE_LOGS = """compute_logs:
  module: megapairs_assets.orchestration.console
  class: InterruptQuietComputeLogManager
"""
_RUN_RETRIES = """run_retries:
  enabled: true
  max_retries: 1
"""
DAGSTER_YAML = (
    _OFFLINE_ONE_STEP_PER_POOL
    + _QUIET_COMPUTE_LOGS
    + _RUN_RETRIES
    + "  retry_on_asset_or_op_failure: false\n"
)

# dagster.yaml files this module wrote before: replaced by DAGSTER_YAML on the next command.
# A file that differs from all of them is the user's own and is left alone.
EARLIER_DAGSTER_YAMLS = (
    _OFFLINE_ONE_STEP_PER_POOL + _QUIET_COMPUTE_LOGS + _RUN_RETRIES,
    _OFFLINE_ONE_STEP_PER_POOL + _QUIET_COMPUTE_LOGS,
    _OFFLINE_ONE_STEP_PER_POOL,
)


def prepare_dagster_home(home: Path) -> Path:
    """Use `$DAGSTER_HOME` if set, else `<home>/dagster`, so the UI later shows the same runs.

    On the cluster deployment the instance must be the shared PostgreSQL one: a `DAGSTER_HOME`
    whose dagster.yaml has no postgres storage (or none set, which would make a private SQLite
    instance here) is a configuration error, before anything is written.
    """
    from megapairs_assets.lib.errors import ConfigurationError
    from resources.cluster import ClusterSettings

    dagster_home = Path(os.environ.get("DAGSTER_HOME") or home / "dagster")
    config = dagster_home / "dagster.yaml"
    if ClusterSettings.from_env().deployment == "cluster" and not _uses_postgres(config):
        raise ConfigurationError(
            f"MEGAPAIRS_DEPLOYMENT=cluster, but the Dagster instance at {dagster_home} is not "
            "on PostgreSQL (no postgres storage in its dagster.yaml): set DAGSTER_HOME to a "
            "folder holding deployment/dagster.yaml, which reads MEGAPAIRS_POSTGRES_URL"
        )
    dagster_home.mkdir(parents=True, exist_ok=True)
    if ClusterSettings.from_env().deployment != "cluster":
        _claim_instance(dagster_home, home)
    if not config.exists() or config.read_text() in EARLIER_DAGSTER_YAMLS:
        config.write_text(DAGSTER_YAML)
    os.environ["DAGSTER_HOME"] = str(dagster_home)
    return dagster_home


# In a Dagster instance folder: the megapairs home (data root) whose instance it is.
HOME_MARKER = "megapairs_home.txt"


def _claim_instance(dagster_home: Path, home: Path) -> None:
    """Refuse a Dagster instance that belongs to another megapairs home; else mark it ours.

    One instance holds one home's shard partitions and runs. An exported `DAGSTER_HOME` left
    from another home would put this home's runs there, and `sync` or the shard sensor would
    retire that home's shards as gone. The instance folder names its home (`HOME_MARKER`); an
    unmarked one inside another megapairs home (`<other home>/dagster`) is that home's. The
    home's own `<home>/dagster` is always its own (also after the home was moved).
    """
    from megapairs_assets.lib.errors import ConfigurationError

    home = home.resolve()
    marker = dagster_home / HOME_MARKER
    try:
        owner = Path(marker.read_text().strip()) if marker.exists() else None
    except OSError:
        owner = None
    if dagster_home.resolve() != (home / "dagster").resolve():
        if owner is None and _is_megapairs_home(dagster_home.resolve().parent):
            owner = dagster_home.resolve().parent
        if owner is not None and owner != home and owner.is_dir():
            raise ConfigurationError(
                f"DAGSTER_HOME={dagster_home} is the Dagster instance of the megapairs home "
                f"{owner}, but this command works on {home}: the two homes' runs and shard "
                "partitions would mix (`sync` and the shard sensor would retire the other "
                f"home's shards). Unset DAGSTER_HOME (megapairs then uses {home / 'dagster'}) "
                f"or set it to {home / 'dagster'}"
            )
    if owner != home:
        with contextlib.suppress(OSError):  # a read-only instance: nothing to claim; reads work
            marker.write_text(f"{home}\n")


def _is_megapairs_home(path: Path) -> bool:
    """Whether `path` is a megapairs data root (it holds a lineage catalog)."""
    from megapairs_assets.lib.storage import DataLayout

    return DataLayout(path).catalog_path.exists()


def _uses_postgres(config: Path) -> bool:
    """Whether the dagster.yaml at `config` puts the instance's runs on PostgreSQL: the
    `storage: postgres:` form (deployment/dagster.yaml) or a `run_storage` whose class is
    dagster-postgres's (the form the Helm chart writes)."""
    import yaml

    try:
        settings = yaml.safe_load(config.read_text()) or {}
    except (OSError, yaml.YAMLError):
        return False
    if not isinstance(settings, dict):
        return False
    storage, run_storage = settings.get("storage"), settings.get("run_storage")
    if isinstance(storage, dict) and "postgres" in storage:
        return True
    if isinstance(run_storage, dict):
        names = f"{run_storage.get('module', '')} {run_storage.get('class', '')}"
        return "postgres" in names.lower()
    return False


def release_dead_runs(instance: Any, log: Callable[[str], None] = print) -> list[str]:
    """Mark failed this machine's runs whose process was killed and free their pool slots (see
    `megapairs_assets.orchestration.runs.release_dead_runs`, which `megapairs_executor` also
    calls before each run). Imported on use: the CLI starts without loading Dagster."""
    from megapairs_assets.orchestration.runs import release_dead_runs as release

    return release(instance, log)
