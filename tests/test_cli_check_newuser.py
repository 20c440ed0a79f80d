"""`megapairs check` as a new user meets it: mistakes in the arguments are one-line usage errors
(exit 2) before any model loads, the JUnit report is what CI readers expect, and a corpus with a
corrupt image says which input it lost. One real (corpus_only) sample run; the rest are plain
function calls or runs that stop at their first check."""

from __future__ import annotations

import os
from pathlib import Path
from xml.etree import ElementTree

import pytest
from image_factory import good_jpeg_bytes, truncated_jpeg_bytes

from megapairs_assets.cli.check import (
    EXIT_CHECK_FAILED,
    EXIT_OK,
    EXIT_USAGE,
    CheckRow,
    report,
    resolve_selection,
)
from megapairs_assets.cli.main import main
from megapairs_assets.lib.errors import ConfigurationError
from megapairs_assets.lineage.catalog import LineageCatalog


def test_a_misspelt_job_or_asset_gets_a_did_you_mean() -> None:
    with pytest.raises(ConfigurationError, match="did you mean 'mining_half'") as error:
        resolve_selection("minig_half", existing=False)
    assert "assets:" not in str(error.value)  # a sample takes jobs only
    with pytest.raises(ConfigurationError, match="did you mean 'mined_image_pairs'") as error:
        resolve_selection("minedimage_pairs", existing=True)
    assert "unknown job or asset" in str(error.value)


def test_an_asset_name_selects_that_asset_for_existing_and_names_a_job_for_a_sample() -> None:
    assert resolve_selection("mined_image_pairs", existing=True) == {"mined_image_pairs"}
    with pytest.raises(ConfigurationError, match="use --select mining_half"):
        resolve_selection("mined_image_pairs", existing=False)


def test_a_sample_refuses_a_job_whose_inputs_it_would_not_make() -> None:
    # generate reads the mined pairs: the sample's empty home has none.
    with pytest.raises(ConfigurationError, match=r"reads mined_image_pairs.*mine_and_generate"):
        resolve_selection("generate", existing=False)
    with pytest.raises(ConfigurationError, match="no job samples that"):
        resolve_selection("train", existing=False)
    assert "mined_image_pairs" in resolve_selection("mining_half", existing=False)
    assert "pair_descriptions" in resolve_selection("generate", existing=True)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["check", "--existing", "--shards", "3"], "--corpus and --shards choose"),
        (["check", "--select", "generate"], "use --select mine_and_generate"),
        (["check", "--existing", "--select", "nope"], "unknown job or asset 'nope'"),
    ],
    ids=["existing-with-shards", "sample-of-generate", "unknown-select"],
)
def test_argument_mistakes_are_usage_errors(argv: list[str], message: str, capsys) -> None:
    assert main(argv) == EXIT_USAGE
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


def test_an_unwritable_home_or_report_path_is_a_usage_error_before_any_work(
    tmp_path: Path, capsys
) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    # A path through a file cannot be created even by root (as CI containers often run).
    assert main(["check", "--home", str(blocker / "home")]) == EXIT_USAGE
    err = capsys.readouterr().err
    assert f"--home {blocker / 'home'}: cannot write in" in err and "Traceback" not in err
    assert main(["check", "--junit-xml", str(blocker / "out.xml")]) == EXIT_USAGE
    assert "--junit-xml" in capsys.readouterr().err
    assert main(["check", "--junit-xml", str(tmp_path)]) == EXIT_USAGE
    assert "is a folder; give a file path" in capsys.readouterr().err


def test_existing_on_a_home_with_nothing_materialized_is_not_a_pass(tmp_path: Path, capsys) -> None:
    home = tmp_path / "home"
    (home / "data").mkdir(parents=True)
    assert main(["check", "--existing", "--home", str(home)]) == EXIT_USAGE
    assert "no lineage catalog at" in capsys.readouterr().err
    assert sorted(p.name for p in home.iterdir()) == ["data"]  # read-only: no catalog created
    LineageCatalog(home / "catalog.duckdb").current_partitions("image_corpus")  # an empty one
    assert main(["check", "--existing", "--home", str(home)]) == EXIT_USAGE
    assert "nothing to check" in capsys.readouterr().err


def test_existing_reads_a_copy_of_a_catalog_it_cannot_lock(tmp_path: Path, monkeypatch) -> None:
    """A read-only mount of a production home: the catalog's lock file cannot be opened there,
    so the check reads a private copy (root ignores permissions, so the fault is simulated)."""
    from contextlib import ExitStack

    from megapairs_assets.cli import check

    catalog = LineageCatalog(tmp_path / "home" / "catalog.duckdb")
    assert catalog.current_partitions("image_corpus") == []
    before = sorted(p.name for p in catalog.path.parent.iterdir())
    real_access = os.access
    monkeypatch.setattr(
        check.os,
        "access",
        lambda path, mode: real_access(path, mode) and not str(path).startswith(str(tmp_path)),
    )
    with ExitStack() as stack:
        copy = check.existing_catalog(catalog, stack)
        assert copy.path != catalog.path and copy.current_partitions("image_corpus") == []
    assert not copy.path.exists()  # removed with the stack
    assert sorted(p.name for p in catalog.path.parent.iterdir()) == before


def test_results_print_even_when_the_junit_report_cannot_be_written(tmp_path: Path, capsys) -> None:
    rows = [CheckRow("pairs", "in_band", "00000", False, True, "1 pair out of band")]
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    assert report(rows, junit_xml=blocker / "out.xml") == EXIT_CHECK_FAILED
    captured = capsys.readouterr()
    assert "pairs  in_band  00000  FAIL  1 pair out of band" in captured.out
    assert "could not write" in captured.err
    # Passing checks with no report for the CI to read is not a pass.
    ok = [CheckRow("pairs", "in_band", "00000", True, True, "")]
    assert report(ok, junit_xml=blocker / "out.xml") == EXIT_USAGE


def test_junit_report_carries_the_counts_ci_readers_expect(tmp_path: Path) -> None:
    rows = [
        CheckRow("image_corpus", "corpus_ids_unique", "a", True, True, ""),
        CheckRow("image_corpus", "content_unique", "a", False, False, "1 repeat"),
        CheckRow("mined_image_pairs", "no_self_pairs", "a", False, True, "2 self pairs"),
        CheckRow("mined_image_pairs", "no_self_pairs", "b", True, True, ""),
    ]
    path = tmp_path / "junit.xml"
    report(rows, junit_xml=path, run_error="run r1 failed")
    root = ElementTree.parse(path).getroot()
    suites = root.findall("testsuite")
    cases = list(root.iter("testcase"))
    assert root.tag == "testsuites"
    assert int(root.get("tests")) == len(cases) == sum(int(s.get("tests")) for s in suites) == 5
    assert int(root.get("failures")) == 1 and int(root.get("errors")) == 1
    assert all(case.get("time") == "0" for case in cases)
    assert all(suite.get("skipped") == "0" and suite.get("time") for suite in suites)
    failed = [c for c in cases if c.find("failure") is not None]
    assert [(c.get("classname"), c.get("name")) for c in failed] == [
        ("mined_image_pairs", "no_self_pairs[a]")
    ]


def test_a_corpus_sample_with_a_corrupt_image_passes_and_names_the_lost_input(
    tmp_path: Path, capsys
) -> None:
    """The one real sample run: corpus_only over a folder of images, one of them truncated
    (corpus_only builds and loads no model, so this takes a few seconds)."""
    corpus = tmp_path / "photos"
    for shard, seeds in (("a", (0, 1, 2)), ("b", (3, 4))):
        (corpus / shard).mkdir(parents=True)
        for seed in seeds:
            (corpus / shard / f"img{seed}.jpg").write_bytes(good_jpeg_bytes(seed))
    (corpus / "a" / "broken.jpg").write_bytes(truncated_jpeg_bytes())
    junit = tmp_path / "reports" / "checks.xml"
    argv = ["check", "--select", "corpus_only", "--corpus", str(corpus), "--quiet"]
    assert main([*argv, "--home", str(tmp_path / "home"), "--junit-xml", str(junit)]) == EXIT_OK
    out = capsys.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "image_corpus corpus_rows_complete 2/2 partitions pass" in lines  # the broken one: out
    lost = [line.split() for line in out.splitlines() if "broken.jpg" in line]
    assert len(lost) == 1 and lost[0][:2] == ["image_corpus[a]", "decode_error"]
    names = {case.get("name") for case in ElementTree.parse(junit).getroot().iter("testcase")}
    assert {"corpus_rows_complete[a]", "corpus_rows_complete[b]"} <= names
    assert not (tmp_path / "home" / "models").exists()  # no model was built for corpus_only


def test_a_sample_never_writes_into_a_home_that_holds_pipeline_data(tmp_path: Path, capsys) -> None:
    """`--home` names the data for --existing; a sample pointed at a real home is refused
    rather than mixing its tables into that data. A sample's own home is reused freely."""
    from megapairs_assets.cli.check import claim_sample_home

    real = tmp_path / "real"
    (real / "data").mkdir(parents=True)
    assert main(["check", "--home", str(real)]) == EXIT_USAGE
    assert f"use --existing --home {real}" in capsys.readouterr().err
    assert sorted(p.name for p in real.iterdir()) == ["data"]
    sample = tmp_path / "sample"
    sample.mkdir()
    claim_sample_home(sample)
    (sample / "data").mkdir()
    claim_sample_home(sample)  # its own earlier sample: fine
