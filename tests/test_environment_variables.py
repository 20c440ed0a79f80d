"""Every MEGAPAIRS_* variable the code reads is known, and a misspelt one is named by the CLI."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from megapairs_assets.cli.main import main as megapairs
from resources.environment import BENCHMARK_ROOT_VARIABLES, KNOWN_VARIABLES, unknown_variables

REPO = Path(__file__).resolve().parents[1]
NAME = re.compile(r"MEGAPAIRS_[A-Z0-9_]*[A-Z0-9]")


def _names_in_code() -> set[str]:
    names: set[str] = set()
    for folder in ("megapairs_assets", "resources", "jobs"):
        for path in (REPO / folder).rglob("*.py"):
            names |= set(NAME.findall(path.read_text(encoding="utf-8")))
    return names


def test_the_known_variables_are_exactly_the_ones_the_code_reads() -> None:
    # The benchmark roots are built from their names (f"MEGAPAIRS_{name.upper()}_ROOT").
    assert _names_in_code() | set(BENCHMARK_ROOT_VARIABLES) == set(KNOWN_VARIABLES)


def test_a_misspelt_variable_gets_the_closest_known_name() -> None:
    env = {"MEGAPAIRS_PROFLE": "paper", "MEGAPAIRS_HOME": "/x", "MEGAPAIRS_ZZZ": "1", "HOME": "/"}
    assert unknown_variables(env) == [
        ("MEGAPAIRS_PROFLE", "MEGAPAIRS_PROFILE"),
        ("MEGAPAIRS_ZZZ", None),
    ]


def test_the_cli_warns_about_a_misspelt_variable(
    home: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_DATA_ROTO", "s3://bucket/data")
    assert megapairs(["config", "storage"]) == 0
    assert (
        "megapairs: warning: MEGAPAIRS_DATA_ROTO is not a megapairs setting; did you mean "
        "MEGAPAIRS_DATA_ROOT?" in capsys.readouterr().err
    )
