"""Shared fixtures: demo models built once per test session, fresh data roots, graph runs."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.demo.models import ensure_demo_models
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from megapairs_assets.orchestration.runs import shard_range_tags


@pytest.fixture(autouse=True)
def _dagster_home_per_test():
    """Each test starts with the DAGSTER_HOME it was given: a CLI command sets it for its own
    process (`prepare_dagster_home`), and one test's home must not become the next one's
    instance (the CLI refuses an instance that belongs to another home)."""
    before = os.environ.get("DAGSTER_HOME")
    yield
    if before is None:
        os.environ.pop("DAGSTER_HOME", None)
    else:
        os.environ["DAGSTER_HOME"] = before


@pytest.fixture(scope="session")
def demo_models_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    models_dir = tmp_path_factory.mktemp("demo-models")
    ensure_demo_models(models_dir)
    return models_dir


def make_home(root: Path, models_dir: Path) -> Path:
    """A fresh data root that reuses the session's demo models (built once, read only)."""
    home = root / "home"
    home.mkdir(parents=True)
    (home / "models").symlink_to(models_dir, target_is_directory=True)
    return home


def run_shards(
    defs: dg.Definitions,
    instance: dg.DagsterInstance,
    shards: Sequence[str],
    job_name: str = "mining_half",
) -> dg.ExecuteInProcessResult:
    """Register the shards and materialize them in one run, as `megapairs demo` does."""
    known = set(instance.get_dynamic_partitions(SHARD_PARTITIONS_NAME))
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, [s for s in shards if s not in known])
    return defs.resolve_job_def(job_name).execute_in_process(
        instance=instance,
        tags=shard_range_tags(list(shards)),
        raise_on_error=False,
    )


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """$MEGAPAIRS_HOME for a CLI test: a fresh folder, the demo profile, the embedded
    deployment (a test module may define its own `home`)."""
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.delenv("MEGAPAIRS_DEPLOYMENT", raising=False)
    return tmp_path / "home"
