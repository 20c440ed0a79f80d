"""The user-facing docs agree with the code a new user would type against: every `megapairs`
subcommand and flag the docs (and the CLI's own messages) name exists in the parser, every
`python -m benchmarks.X --flag` names a real script and flag, every MEGAPAIRS_* variable is one
the code reads, every repository path in backticks exists, and every README section a message
points to is there. Text checks only (the parser is built, no model or Dagster run is started)."""

from __future__ import annotations

import argparse
import re
import shlex
from datetime import datetime
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOCS = [
    ROOT / "README.md",
    ROOT / "deployment" / "README.md",
    ROOT / "benchmarks" / "README.md",
    *sorted((ROOT / "docs").rglob("*.*")),
]
CODE_DIRS = ("megapairs_assets", "resources", "jobs")
# `megapairs SUB ...` as typed (also `.venv/bin/megapairs SUB`), not `kubectl -n megapairs ...`
# nor names such as megapairs-env or megapairs_home.
MEGAPAIRS_COMMAND = re.compile(r"(?<![\w=-])(?<!-n )megapairs ([a-z]+)\b([^`#|;)\n]*)")
# In code, only what a message or docstring quotes as a command: `megapairs eval --root`.
QUOTED_COMMAND = re.compile(r"`(?:\.venv/bin/)?megapairs ([a-z]+)\b([^`\n]*)`")
BENCHMARK_COMMAND = re.compile(r"python -m benchmarks\.(\w+)([^`#|;)\n]*)")
VARIABLE = re.compile(r"\bMEGAPAIRS_[A-Z0-9_]*[A-Z0-9]\b")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9-]*)")
REPO_PATH = re.compile(
    r"`((?:megapairs_assets|resources|jobs|benchmarks|deployment|docs|tests|scripts)/[^`\s]*)`"
)
# (README, "Bad input"), README "Changing a setting for one run", (README, 'Checks')
README_SECTION = re.compile(r"README,? ((?:[\"'][^\"'\n]+[\"'](?: and |, )?)+)")


def _code_text() -> str:
    return "\n".join(
        path.read_text() for folder in CODE_DIRS for path in (ROOT / folder).rglob("*.py")
    )


def _code_spans(text: str) -> list[str]:
    """Fenced blocks (continuation lines joined) and inline code spans of a Markdown file."""
    spans = [block.replace("\\\n", " ") for block in re.findall(r"```[a-z]*\n(.*?)```", text, re.S)]
    prose = re.sub(r"```.*?```", "", text, flags=re.S)
    spans += [span.replace("\n", " ") for span in re.findall(r"`([^`]+)`", prose)]
    return spans


def _subcommand_options() -> dict[str, set[str]]:
    from megapairs_assets.cli.main import build_parser

    parser = build_parser()
    (subparsers,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {
        name: {option for action in sub._actions for option in action.option_strings}
        for name, sub in subparsers.choices.items()
    }


@pytest.fixture(scope="module")
def options() -> dict[str, set[str]]:
    return _subcommand_options()


def _megapairs_mentions() -> list[tuple[str, str, str]]:
    """(where, subcommand, rest of the command line) for each `megapairs SUB` in the docs' code
    and in the CLI's and stages' own strings (messages that tell the user what to run)."""
    found = []
    for path in DOCS:
        if path.suffix in (".md", ".yml", ".yaml"):
            text = path.read_text()
            spans = _code_spans(text) if path.suffix == ".md" else [text]
            for span in spans:
                for match in MEGAPAIRS_COMMAND.finditer(span):
                    found.append((str(path.relative_to(ROOT)), match.group(1), match.group(2)))
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for match in QUOTED_COMMAND.finditer(path.read_text()):
                found.append((str(path.relative_to(ROOT)), match.group(1), match.group(2)))
    return found


def test_every_megapairs_command_and_flag_in_the_docs_exists(
    options: dict[str, set[str]],
) -> None:
    mentions = _megapairs_mentions()
    assert len({sub for _, sub, _ in mentions}) >= 6  # the scan found the commands at all
    wrong = []
    for where, sub, rest in mentions:
        if sub not in options:
            wrong.append(f"{where}: megapairs {sub} (no such subcommand)")
            continue
        wrong += [
            f"{where}: megapairs {sub} {flag}"
            for flag in FLAG.findall(rest)
            if flag not in options[sub]
        ]
    assert not wrong, "\n".join(wrong)


def test_every_benchmark_command_in_the_docs_names_a_script_and_its_flags() -> None:
    bench = ROOT / "benchmarks"
    wrong, seen = [], 0
    for path in DOCS:
        for span in _code_spans(path.read_text()) if path.suffix == ".md" else []:
            for match in BENCHMARK_COMMAND.finditer(span):
                seen += 1
                module, rest = match.groups()
                script = bench / f"{module}.py"
                if not script.is_file():
                    wrong.append(f"{path.relative_to(ROOT)}: benchmarks/{module}.py does not exist")
                    continue
                source = script.read_text()
                wrong += [
                    f"{path.relative_to(ROOT)}: python -m benchmarks.{module} {flag}"
                    for flag in FLAG.findall(rest)
                    if f'"{flag}"' not in source
                ]
    assert seen >= 10
    assert not wrong, "\n".join(wrong)


def test_every_variable_the_docs_name_is_read_by_the_code() -> None:
    code = _code_text()
    named = {
        (str(path.relative_to(ROOT)), name)
        for path in DOCS
        if path.is_file()
        for name in VARIABLE.findall(path.read_text())
    }
    # Names the code builds, e.g. f"MEGAPAIRS_{name.upper()}_ROOT" for each benchmark name.
    templates = re.findall(r"MEGAPAIRS_\{[^}]+\}(_[A-Z0-9_]+)", code)

    def built(name: str) -> bool:
        return any(
            name.endswith(suffix) and f'"{name[len("MEGAPAIRS_") : -len(suffix)].lower()}"' in code
            for suffix in templates
        )

    missing = sorted(
        f"{where}: {name}" for where, name in named if name not in code and not built(name)
    )
    assert not missing, "\n".join(missing)


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = []
    for path in DOCS:
        text = path.read_text()
        candidates = REPO_PATH.findall(text)
        if path.parent.name == "benchmarks":  # its `results/x.json` are benchmarks/results/
            candidates += [f"benchmarks/{p}" for p in re.findall(r"\b(results/[\w.*-]+)", text)]
        for relative in candidates:
            relative = relative.rstrip(".,;:)")
            if any(mark in relative for mark in "<>{}$"):
                continue  # a placeholder, not a path
            if not (list(ROOT.glob(relative)) if "*" in relative else (ROOT / relative).exists()):
                missing.append(f"{path.relative_to(ROOT)}: {relative}")
    assert not missing, "\n".join(missing)


def test_every_readme_section_a_message_points_to_exists() -> None:
    readme = (ROOT / "README.md").read_text()
    titles = set(re.findall(r"^#+ (.+?)\s*$", readme, re.M))
    titles |= {re.sub(r"\s*\(.*\)$", "", title) for title in titles}  # "Mining (method.md §3)"
    titles |= set(re.findall(r"\*\*([^*]+?)\.?\*\*", readme))  # bold run-in labels: **Checks**
    cited = []
    for folder in CODE_DIRS:
        for path in (ROOT / folder).rglob("*.py"):
            for match in README_SECTION.finditer(path.read_text()):
                for name in re.findall(r"[\"']([^\"']+)[\"']", match.group(1)):
                    cited.append((str(path.relative_to(ROOT)), name))
    assert cited  # messages do point into the README
    missing = [f"{where}: README section {name!r}" for where, name in cited if name not in titles]
    assert not missing, "\n".join(missing)


def test_check_refuses_an_empty_sample_as_a_usage_error(capsys: pytest.CaptureFixture) -> None:
    from megapairs_assets.cli.main import main

    with pytest.raises(SystemExit) as exit_info:
        main(["check", "--shards", "0"])
    assert exit_info.value.code == 2
    assert "--shards: must be at least 1" in capsys.readouterr().err


def test_the_demo_summary_says_how_to_score_the_checkpoint(tmp_path: Path) -> None:
    from megapairs_assets.cli.summary import training_lines
    from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord

    catalog = LineageCatalog(tmp_path / "catalog.duckdb")
    export = tmp_path / "data" / "mmret_clip_checkpoint" / "demo" / "open_clip"
    catalog.record(
        MaterializationRecord(
            asset="mmret_clip_checkpoint",
            partition="demo",
            run_id="r",
            code_version="v",
            profile="demo",
            started_at=datetime(2026, 1, 1),
            duration_s=1.5,
            row_counts={"steps": 60},
            output_paths={"open_clip_dir": str(export)},
        )
    )
    lines = training_lines(catalog)
    assert lines[0].strip() == "checkpoint:  config 'demo', steps 60 in 1.5 s"
    (command,) = [line for line in lines if "megapairs eval" in line]
    argv = command.split("score it:", 1)[1].split()
    # The printed command is one the parser accepts, with the export folder as the retriever.
    assert argv[:2] == ["megapairs", "eval"]
    from megapairs_assets.cli.main import build_parser

    parsed = build_parser().parse_args(argv[1:])
    assert parsed.retriever == str(export) and parsed.benchmark == "heldout"
    (search,) = [line for line in lines if "megapairs search" in line]
    search_argv = shlex.split(search.split("use it:", 1)[1])
    parsed = build_parser().parse_args(search_argv[1:])
    assert parsed.retriever == str(export)
