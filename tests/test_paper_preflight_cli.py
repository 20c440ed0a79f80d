"""`megapairs demo` and `megapairs check` switched to the paper profile on a fresh machine:
`--profile paper` is accepted, and every missing setting of the phases asked for is listed in
one configuration error (exit 2) before any work."""

from __future__ import annotations

import os
import socket
from pathlib import Path

import pytest

from megapairs_assets.cli.main import PROFILE_CHOICES
from megapairs_assets.cli.main import main as megapairs
from resources.environment import PROFILE_NAMES
from resources.profiles import (
    CLIP_WEIGHTS_VARIABLE,
    CORPUS_VARIABLE,
    DINOV2_MODEL_VARIABLE,
    GENERATION_VARIABLES,
    TRAIN_DEVICES_VARIABLE,
    VIT_B16_WEIGHTS_VARIABLE,
    VIT_L14_WEIGHTS_VARIABLE,
)

DESCRIBE_URLS, INSTRUCT_URLS = (GENERATION_VARIABLES[step][0] for step in GENERATION_VARIABLES)


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


@pytest.fixture
def fresh_machine(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """No paper variable set, nothing in any weights cache, servers that are not running."""
    import huggingface_hub.constants

    from megapairs_assets.lib import open_clip_weights

    for name in (
        "MEGAPAIRS_PROFILE", "MEGAPAIRS_DEPLOYMENT", "MEGAPAIRS_DATA_ROOT", CORPUS_VARIABLE,
        CLIP_WEIGHTS_VARIABLE, DINOV2_MODEL_VARIABLE, VIT_B16_WEIGHTS_VARIABLE,
        VIT_L14_WEIGHTS_VARIABLE, TRAIN_DEVICES_VARIABLE, "MEGAPAIRS_VLLM_BASE_URLS",
    ):  # fmt: skip
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf-cache"))
    monkeypatch.setattr(open_clip_weights, "OPEN_CLIP_URL_CACHE", tmp_path / "clip-cache")
    monkeypatch.setenv(DESCRIBE_URLS, _closed_port_url())
    monkeypatch.setenv(INSTRUCT_URLS, _closed_port_url())
    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    return home


def _problems(err: str) -> dict[str, str]:
    """The `- <what>: <problem>` items of a check_ready error (with their indented
    continuation lines), by what."""
    items: list[str] = []
    for line in err.splitlines():
        if line.startswith("- "):
            items.append(line[2:])
        elif line.startswith("  ") and items:
            items[-1] += "\n" + line
    return {item.split(":")[0]: item for item in items}


def test_the_cli_offers_exactly_the_profiles() -> None:
    assert PROFILE_CHOICES == PROFILE_NAMES
    with pytest.raises(SystemExit) as usage:
        megapairs(["demo", "--profile", "papr"])
    assert usage.value.code == 2


def test_demo_profile_paper_lists_what_the_mining_half_needs_at_once(
    fresh_machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert megapairs(["demo", "--profile", "paper", "--until", "mine", "--quiet"]) == 2
    captured = capsys.readouterr()
    assert "megapairs: profile 'paper'" in captured.out
    assert "the paper profile's corpus, weights, servers and devices" in captured.out
    assert "demo profile's" not in captured.out
    assert "megapairs demo: configuration error: 4 settings to fix" in captured.err
    problems = _problems(captured.err)
    assert set(problems) == {
        "corpus_source", "clip_image_encoder", "dino_image_encoder", "caption_text_encoder",
    }  # fmt: skip
    assert CORPUS_VARIABLE in problems["corpus_source"]
    assert CLIP_WEIGHTS_VARIABLE in problems["clip_image_encoder"]
    assert DINOV2_MODEL_VARIABLE in problems["dino_image_encoder"]
    assert "Traceback" not in captured.err
    assert not any((fresh_machine / "data").iterdir())  # nothing ran: no table written
    assert "MEGAPAIRS_PROFILE" not in os.environ  # --profile held for that command only


def test_demo_until_evaluate_adds_servers_training_and_the_base_model(
    fresh_machine: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert megapairs(["demo", "--profile", "paper", "--quiet"]) == 2
    problems = _problems(capsys.readouterr().err)
    assert "not reachable" in problems["generation"]
    assert DESCRIBE_URLS in problems["generation"] and INSTRUCT_URLS in problems["generation"]
    assert VIT_B16_WEIGHTS_VARIABLE in problems["training config 'mmret-base'"]
    assert VIT_L14_WEIGHTS_VARIABLE in problems["training config 'mmret-large'"]
    assert VIT_B16_WEIGHTS_VARIABLE in problems["evaluation base model"]
    assert len(problems) == 4 + 4


def test_check_profile_paper_checks_the_servers_only_for_a_job_that_generates(
    fresh_machine: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")  # --profile wins over the environment
    assert megapairs(["check", "--profile", "paper"]) == 2
    mining = capsys.readouterr().err
    assert "megapairs check: configuration error:" in mining
    assert "generation" not in _problems(mining) and CORPUS_VARIABLE in mining
    assert megapairs(["check", "--profile", "paper", "--select", "mine_and_generate"]) == 2
    generating = _problems(capsys.readouterr().err)
    assert "not reachable" in generating["generation"]
    assert os.environ["MEGAPAIRS_PROFILE"] == "demo"


def test_the_demo_profile_says_it_builds_its_models(
    fresh_machine: Path,
    tmp_path: Path,
    demo_models_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from conftest import make_home

    monkeypatch.setenv("MEGAPAIRS_HOME", str(make_home(tmp_path / "demo", demo_models_dir)))
    (tmp_path / "empty").mkdir()
    assert megapairs(["demo", "--corpus", str(tmp_path / "empty"), "--until", "mine"]) == 2
    captured = capsys.readouterr()
    assert "building the demo profile's small models on first use" in captured.out
    # The demo profile looks at the corpus first: one line, no list, before any model is built.
    assert "is empty" in captured.err and "setting" not in captured.err


def test_every_subcommand_takes_the_profile_option() -> None:
    from megapairs_assets.cli.main import build_parser

    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # argparse keeps no public map
    assert {"demo", "check", "ui", "config", "lineage", "unblock", "eval"} <= set(commands)
    for name in commands:
        assert parser.parse_args([name, "--profile", "paper", *_required(name)]).profile == "paper"


def _required(command: str) -> list[str]:
    """The arguments a subcommand cannot parse without."""
    required = {
        "eval": ["--retriever", "x", "--benchmark", "heldout"],
        "lineage": ["some-id"],
        "search": ["--retriever", "x"],
    }
    return required.get(command, [])
