"""The CLI's Dagster instance retries once a run whose process died (the daemon does it), also in
a home whose dagster.yaml an earlier version wrote."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.cli.instance import DAGSTER_YAML, EARLIER_DAGSTER_YAMLS, prepare_dagster_home


@pytest.mark.parametrize("earlier", range(len(EARLIER_DAGSTER_YAMLS)))
def test_every_earlier_config_is_upgraded_to_one_that_retries_runs(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, earlier: int
) -> None:
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    (tmp_path / "dagster").mkdir()
    (tmp_path / "dagster" / "dagster.yaml").write_text(EARLIER_DAGSTER_YAMLS[earlier])
    dagster_home = prepare_dagster_home(tmp_path)
    assert (dagster_home / "dagster.yaml").read_text() == DAGSTER_YAML
    with dg.DagsterInstance.from_config(str(dagster_home)) as instance:
        assert instance.run_retries_enabled
        assert instance.run_retries_max_retries == 1
        # A step's own failure (a failed check, a missing table) fails again at once: not retried.
        assert not instance.run_retries_retry_on_asset_or_op_failure
