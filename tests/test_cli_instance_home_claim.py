"""A Dagster instance belongs to one megapairs home: another home's exported DAGSTER_HOME is
refused before anything is registered or retired in it."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.cli.instance import HOME_MARKER, prepare_dagster_home
from megapairs_assets.cli.main import main
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME


def _home(path: Path) -> Path:
    """A data root as a run leaves it (its lineage catalog exists)."""
    path.mkdir(parents=True)
    DataLayout(path).catalog_path.touch()
    return path


@pytest.fixture(autouse=True)
def _clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    # prepare_dagster_home sets DAGSTER_HOME for the process: restored after each test.
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    monkeypatch.delenv("MEGAPAIRS_CORPUS", raising=False)
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")


def test_another_homes_instance_is_refused_naming_both(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _home(tmp_path / "first"), _home(tmp_path / "second")
    assert prepare_dagster_home(first) == first / "dagster"
    assert (first / "dagster" / HOME_MARKER).read_text().strip() == str(first.resolve())
    monkeypatch.setenv("DAGSTER_HOME", str(first / "dagster"))  # exported for the first home
    with pytest.raises(ConfigurationError) as refused:
        prepare_dagster_home(second)
    message = str(refused.value)
    assert str(first.resolve()) in message and str(second.resolve() / "dagster") in message
    assert "Unset DAGSTER_HOME" in message
    # The home's own instance folder, named explicitly, is fine.
    monkeypatch.setenv("DAGSTER_HOME", str(second / "dagster"))
    assert prepare_dagster_home(second) == second / "dagster"


def test_an_unmarked_instance_inside_another_home_is_that_homes(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _home(tmp_path / "first"), _home(tmp_path / "second")
    (first / "dagster").mkdir()  # an instance from before homes were marked
    monkeypatch.setenv("DAGSTER_HOME", str(first / "dagster"))
    with pytest.raises(ConfigurationError, match="instance of the megapairs home"):
        prepare_dagster_home(second)
    assert not (first / "dagster" / HOME_MARKER).exists()  # nothing claimed


def test_a_shared_instance_folder_is_claimed_by_its_first_home(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    first, second = _home(tmp_path / "first"), _home(tmp_path / "second")
    shared = tmp_path / "dagster_home"
    monkeypatch.setenv("DAGSTER_HOME", str(shared))
    assert prepare_dagster_home(first) == shared
    with pytest.raises(ConfigurationError):
        prepare_dagster_home(second)


def test_a_moved_home_keeps_its_own_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    home = _home(tmp_path / "before")
    prepare_dagster_home(home)
    monkeypatch.delenv("DAGSTER_HOME")  # a later command, in a new process
    moved = home.rename(tmp_path / "after")
    assert prepare_dagster_home(moved) == moved / "dagster"
    assert (moved / "dagster" / HOME_MARKER).read_text().strip() == str(moved.resolve())


def test_sync_on_another_home_changes_nothing_in_the_first_homes_instance(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    first = tmp_path / "first"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(first))
    assert main(["sync"]) == 0  # registers the demo shards in the first home's instance
    registered = sorted(dg.DagsterInstance.get().get_dynamic_partitions(SHARD_PARTITIONS_NAME))
    assert registered
    capsys.readouterr()

    monkeypatch.setenv("DAGSTER_HOME", str(first / "dagster"))  # left exported
    monkeypatch.setenv("MEGAPAIRS_HOME", str(_home(tmp_path / "second")))
    assert main(["sync"]) == 2
    assert "Unset DAGSTER_HOME" in capsys.readouterr().err
    monkeypatch.setenv("DAGSTER_HOME", str(first / "dagster"))
    after = sorted(dg.DagsterInstance.get().get_dynamic_partitions(SHARD_PARTITIONS_NAME))
    assert after == registered
