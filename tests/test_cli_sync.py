"""`megapairs sync`: the two partition sensors' work, once, without a daemon."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.cli.main import main
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from megapairs_assets.training.assets import TRAINING_CONFIG_PARTITIONS_NAME

DEMO_SHARDS = ["00000", "00001", "00002", "00003", "00004"]


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    monkeypatch.delenv("MEGAPAIRS_CORPUS", raising=False)
    return home


def _partitions(name: str) -> list[str]:
    return sorted(dg.DagsterInstance.get().get_dynamic_partitions(name))


def test_sync_registers_new_and_removes_gone_partitions(home: Path, capsys) -> None:
    assert main(["sync"]) == 0  # a fresh home: creates the instance, registers everything
    assert _partitions(SHARD_PARTITIONS_NAME) == DEMO_SHARDS
    assert _partitions(TRAINING_CONFIG_PARTITIONS_NAME) == ["demo"]
    out = capsys.readouterr().out
    assert "5 new shards are registered: 00000, 00001" in out
    assert "new training configs are registered: demo" in out

    instance = dg.DagsterInstance.get()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["old-shard"])
    instance.add_dynamic_partitions(TRAINING_CONFIG_PARTITIONS_NAME, ["removed-config"])
    assert main(["sync", "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "1 shard left the corpus and would be retired: old-shard" in out
    assert "removed-config" in out
    assert "old-shard" in _partitions(SHARD_PARTITIONS_NAME)  # a dry run changes nothing

    assert main(["sync"]) == 0
    assert _partitions(SHARD_PARTITIONS_NAME) == DEMO_SHARDS
    assert _partitions(TRAINING_CONFIG_PARTITIONS_NAME) == ["demo"]
    assert "KNN graphs still list images of the retired ones" in capsys.readouterr().out
    assert main(["sync"]) == 0
    assert "nothing to change" in capsys.readouterr().out


def test_sync_with_a_bad_corpus_is_a_configuration_error(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    monkeypatch.setenv("MEGAPAIRS_CORPUS", str(tmp_path / "nowhere"))  # read by the paper profile
    assert main(["sync", "--profile", "paper"]) == 2
    err = capsys.readouterr().err
    assert "megapairs sync: configuration error:" in err and "does not exist" in err
