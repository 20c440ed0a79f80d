"""`megapairs config`: the profile's resource settings as run config that Dagster accepts and
that reproduces the profile exactly (Dagster replaces a resource's whole config)."""

from __future__ import annotations

from pathlib import Path

import dagster as dg
import pytest
import yaml

from megapairs_assets.cli.main import main
from megapairs_assets.definitions import build_definitions


def test_printed_config_is_valid_run_config_that_keeps_every_profile_value(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    assert main(["config", "generation", "training"]) == 0
    run_config = yaml.safe_load(capsys.readouterr().out)
    assert set(run_config["resources"]) == {"generation", "training"}
    generation = run_config["resources"]["generation"]["config"]
    # Values the demo profile sets away from the class defaults survive the round trip.
    assert generation["heuristic_fill"] is True
    assert generation["model_pairs_per_shard"] == 2
    assert generation["describe_template"] == "describe_captions"

    defs = build_definitions("demo", tmp_path / "home")
    for job_name, resource in (("generate", "generation"), ("train", "training")):
        wanted = {"resources": {resource: run_config["resources"][resource]}}
        validated = dg.validate_run_config(defs.resolve_job_def(job_name), wanted)
        assert validated["resources"][resource]["config"] == wanted["resources"][resource]["config"]
    profile = defs.resources["generation"]
    edited = type(profile)(**{**generation, "licence": "CC-BY-4.0"})
    assert edited.settings().export.licence == "CC-BY-4.0"
    assert edited.settings().model_sample == profile.settings().model_sample


def test_an_unknown_resource_lists_the_names(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    assert main(["config", "genration"]) == 2
    err = capsys.readouterr().err
    assert "no resource named genration" in err and "generation" in err
