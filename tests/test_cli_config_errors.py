"""A setting the user got wrong ends the CLI with one clear line and exit code 2, no traceback."""

from __future__ import annotations

from pathlib import Path

import pytest

from megapairs_assets.cli.main import main
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lib.storage import data_root_path


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MEGAPAIRS_PROFILE", "bogus", "unknown profile 'bogus'"),
        ("MEGAPAIRS_DEPLOYMENT", "cloud", "MEGAPAIRS_DEPLOYMENT must be one of"),
        ("MEGAPAIRS_SENSORS", "maybe", "MEGAPAIRS_SENSORS must be 'on' or 'off'"),
        ("MEGAPAIRS_DATA_ROOT", "nosuchfs://bucket/prefix", "cannot open the data root"),
    ],
)
def test_a_bad_setting_is_one_line_and_exit_2(
    variable: str,
    value: str,
    message: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(variable, value)
    assert main(["demo", "--until", "mine", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "megapairs demo: configuration error:" in err
    assert message in err
    assert "Traceback" not in err
    # Nothing ran: no tables were written.
    assert not (tmp_path / "home" / "data").exists()


def test_an_unknown_data_root_filesystem_is_a_configuration_error() -> None:
    with pytest.raises(ConfigurationError, match="nosuchfs"):
        data_root_path("nosuchfs://bucket/prefix")


@pytest.mark.parametrize(
    "argv",
    [
        ["ui"],
        ["lineage", "00000/000000001"],
        ["check", "--existing"],
        ["eval", "--retriever", "base", "--benchmark", "heldout"],
    ],
    ids=lambda argv: argv[0],
)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("MEGAPAIRS_PROFILE", "nonsense"),
        ("MEGAPAIRS_SENSORS", "maybe"),
        ("MEGAPAIRS_DEPLOYMENT", "foo"),
    ],
)
def test_every_subcommand_refuses_a_bad_setting_before_it_starts(
    argv: list[str],
    variable: str,
    value: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv(variable, value)
    assert main(argv) == 2  # `ui` never reaches its exec of the Dagster server
    err = capsys.readouterr().err
    assert f"megapairs {argv[0]}: configuration error:" in err and variable.split("_")[1] in err
    assert "Traceback" not in err


@pytest.mark.parametrize("target", ["a_file", "a_file/below"])
def test_a_data_root_that_cannot_hold_files_is_a_configuration_error(
    target: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    (tmp_path / "a_file").write_text("not a folder")
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEGAPAIRS_DATA_ROOT", str(tmp_path / target))
    assert main(["demo", "--until", "mine", "--quiet"]) == 2
    err = capsys.readouterr().err
    if target == "a_file":  # refused by the environment check, before any folder is made
        assert "configuration error: MEGAPAIRS_DATA_ROOT=" in err and "not a folder" in err
    else:
        assert "configuration error: the data root's data folder" in err
        assert "cannot hold files" in err
    assert "Traceback" not in err


def test_a_reader_that_goes_away_ends_the_command_without_a_traceback(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    lineage_cli = importlib.import_module("megapairs_assets.cli.lineage")
    cli_main = importlib.import_module("megapairs_assets.cli.main")

    def output_to_a_closed_pipe(args) -> int:
        raise BrokenPipeError(32, "Broken pipe")  # what print() raises under `| head`

    redirected: list[int] = []
    monkeypatch.setattr(lineage_cli, "cmd_lineage", output_to_a_closed_pipe)
    monkeypatch.setattr(cli_main.os, "dup2", lambda source, target: redirected.append(target))
    monkeypatch.setattr(cli_main.sys.stdout, "fileno", lambda: 1, raising=False)
    assert main(["lineage", "anything"]) == 1
    assert redirected == [1]  # stdout now points at /dev/null for the final flush
    assert "Traceback" not in capsys.readouterr().err
