"""Under the paper profile too, `demo --corpus X` makes X the home's corpus for every later
process (`sync`, the UI's sensors), unless MEGAPAIRS_CORPUS names another one."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from megapairs_assets.cli.main import main
from megapairs_assets.demo import DEMO_CORPUS_DIR
from resources.corpus import CHOSEN_CORPUS_FILE, CorpusSourceResource, record_chosen_corpus
from resources.profiles import CORPUS_VARIABLE, paper_corpus_source


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    home = tmp_path / "home"
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.delenv(CORPUS_VARIABLE, raising=False)
    monkeypatch.delenv("DAGSTER_HOME", raising=False)
    return home


def test_the_paper_profile_reads_the_corpus_the_home_chose(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert paper_corpus_source().path == str(home / "corpus")  # nothing chosen yet
    corpus = shutil.copytree(DEMO_CORPUS_DIR, tmp_path / "photos")
    record_chosen_corpus(home, CorpusSourceResource(kind="webdataset", path=str(corpus)))
    chosen = paper_corpus_source()
    assert (chosen.path, chosen.kind) == (str(corpus), "webdataset")
    assert chosen.setting_hint and CORPUS_VARIABLE in chosen.setting_hint
    # The variable, when set, is what the user asks for now.
    monkeypatch.setenv(CORPUS_VARIABLE, str(tmp_path / "other"))
    assert paper_corpus_source().path == str(tmp_path / "other")


def test_demo_refuses_a_corpus_the_variable_contradicts(
    home: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    corpus = shutil.copytree(DEMO_CORPUS_DIR, tmp_path / "photos")
    monkeypatch.setenv(CORPUS_VARIABLE, str(tmp_path / "other"))
    assert main(["demo", "--profile", "paper", "--corpus", str(corpus), "--until", "mine"]) == 2
    err = capsys.readouterr().err
    assert f"--corpus {corpus}" in err and CORPUS_VARIABLE in err
    assert not (home / CHOSEN_CORPUS_FILE).exists()
