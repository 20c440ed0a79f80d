"""On the cluster deployment the CLI refuses a Dagster instance that is not on PostgreSQL."""

from __future__ import annotations

from pathlib import Path

import pytest

from megapairs_assets.cli.instance import prepare_dagster_home
from megapairs_assets.cli.main import main
from megapairs_assets.lib.errors import ConfigurationError

POSTGRES_YAML = "storage:\n  postgres:\n    postgres_url:\n      env: MEGAPAIRS_POSTGRES_URL\n"


@pytest.fixture
def cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    monkeypatch.setenv("MEGAPAIRS_DEPLOYMENT", "cluster")
    monkeypatch.setenv("MEGAPAIRS_POSTGRES_URL", "postgresql+psycopg2://unused")
    monkeypatch.setenv("MEGAPAIRS_LINEAGE_CATALOG", "ducklake:postgres:dbname=unused")
    monkeypatch.setenv("MEGAPAIRS_LINEAGE_DATA_PATH", str(tmp_path / "lake"))
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return tmp_path


def test_no_dagster_home_on_the_cluster_is_refused_before_anything_is_written(
    cluster: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(ConfigurationError, match="not on PostgreSQL"):
        prepare_dagster_home(cluster / "home")
    assert not (cluster / "home" / "dagster").exists()  # no private SQLite instance made
    assert main(["sync"]) == 2
    assert "set DAGSTER_HOME to a folder holding deployment/dagster.yaml" in capsys.readouterr().err


def test_a_postgres_dagster_yaml_is_accepted_and_left_as_it_is(
    cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_dir = cluster / "instance"
    instance_dir.mkdir()
    (instance_dir / "dagster.yaml").write_text(POSTGRES_YAML)
    monkeypatch.setenv("DAGSTER_HOME", str(instance_dir))
    assert prepare_dagster_home(cluster / "home") == instance_dir
    assert (instance_dir / "dagster.yaml").read_text() == POSTGRES_YAML
    (instance_dir / "dagster.yaml").write_text("storage:\n  sqlite:\n    base_dir: x\n")
    with pytest.raises(ConfigurationError, match="not on PostgreSQL"):
        prepare_dagster_home(cluster / "home")


def test_the_helm_charts_run_storage_form_counts_as_postgres(
    cluster: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    instance_dir = cluster / "chart"
    instance_dir.mkdir()
    (instance_dir / "dagster.yaml").write_text(
        "run_storage:\n  module: dagster_postgres.run_storage\n  class: PostgresRunStorage\n"
        "  config:\n    postgres_db:\n      hostname: db\n"
    )
    monkeypatch.setenv("DAGSTER_HOME", str(instance_dir))
    assert prepare_dagster_home(cluster / "home") == instance_dir
