"""`megapairs check`'s output says only what a user can act on: no notice about the bundled
corpus's own licence and provenance files, no file named inside a throwaway home, the images a
cross-shard duplicate warning is about, nothing but warnings with --quiet, and an empty corpus
refused before any model is built."""

from __future__ import annotations

import os
import re
import signal
import time
from pathlib import Path
from xml.etree import ElementTree

import dagster as dg
import image_factory as factory
import polars as pl
import pytest

from megapairs_assets.cli.check import (
    EXIT_CHECK_FAILED,
    EXIT_INTERRUPTED,
    EXIT_OK,
    EXIT_USAGE,
    SAMPLE_HAS_IMAGES,
    UNREAD_LINES,
)
from megapairs_assets.cli.main import main
from megapairs_assets.corpus.sources import SourceSpec, scan_source
from megapairs_assets.corpus.table import (
    BUNDLED_CORPUS_COMPANIONS,
    check_cross_shard_duplicates,
    source_report_table,
    unexpected_unread,
    unread_summary,
)
from megapairs_assets.demo import DEMO_CORPUS_DIR
from megapairs_assets.demo.models import DEMO_MODELS_NOTE


def test_the_bundled_corpus_licence_and_provenance_files_are_not_news(tmp_path: Path) -> None:
    spec = SourceSpec(kind="webdataset", path=str(DEMO_CORPUS_DIR))
    report = source_report_table(scan_source(spec).unread)
    # Still in the source report (no shard reads them) ...
    assert sorted(Path(uri).name for uri in report["source_uri"]) == sorted(
        BUNDLED_CORPUS_COMPANIONS
    )
    # ... but not reported as unread for the bundled corpus itself,
    assert unexpected_unread(report).is_empty()
    link = tmp_path / "demo-link"  # however the folder is named
    link.symlink_to(DEMO_CORPUS_DIR, target_is_directory=True)
    assert unexpected_unread(source_report_table(scan_source(spec).unread)).is_empty()
    linked = source_report_table(scan_source(SourceSpec("webdataset", str(link))).unread)
    assert linked.height == 2 and unexpected_unread(linked).is_empty()
    # while the same files beside a user's shards are.
    user = tmp_path / "corpus"
    factory.write_wds_shard(user / "00000.tar", [("a", factory.good_jpeg_bytes(1), "x")])
    for name in BUNDLED_CORPUS_COMPANIONS:
        (user / name).write_text("{}\n")
    user_report = source_report_table(scan_source(SourceSpec("webdataset", str(user))).unread)
    assert unexpected_unread(user_report).height == len(BUNDLED_CORPUS_COMPANIONS)


def test_the_unread_summary_names_the_entries_themselves() -> None:
    report = pl.DataFrame(
        {
            "reason": ["unsupported_file"] * 5,
            "detail": [f"n{i}.md is not a .tar shard" for i in range(5)],
        }
    )
    text = unread_summary(report, first=3)
    assert text.startswith("5 entries of the corpus source are not read by any shard: ")
    assert "n0.md is not a .tar shard (unsupported_file)" in text and "n2.md" in text
    assert "n3.md" not in text and text.endswith("and 2 more")
    assert unread_summary(report.head(1)).startswith("1 entry of the corpus source is not read")


def test_a_cross_shard_copy_is_named_by_shard_and_key() -> None:
    images = pl.DataFrame({"image_id": ["00001/c", "00001/d"], "content_hash": ["h1" * 32, "h2"]})
    others = pl.DataFrame({"image_id": ["00000/a"], "content_hash": ["h1" * 32]})
    result = check_cross_shard_duplicates(images, others)
    assert not result.passed and result.failing_rows == 1
    assert "key 'c' of shard 00001 has the same bytes (sha256 h1h1h1h1h1h1...)" in result.detail
    assert result.detail.endswith("as key 'a' of shard 00000")
    assert result.examples == ("00001/c = 00000/a",)  # the metadata's examples, unchanged
    assert check_cross_shard_duplicates(images, others.head(0)).passed
    # Only the copy in the later shard is flagged, whichever shard ran first.
    earlier = pl.DataFrame({"image_id": ["00000/a"], "content_hash": ["h1" * 32]})
    later = pl.DataFrame({"image_id": ["00001/c"], "content_hash": ["h1" * 32]})
    assert check_cross_shard_duplicates(earlier, later).passed
    assert not check_cross_shard_duplicates(later, earlier).passed


def test_a_sample_names_unread_entries_and_duplicates_and_no_file_of_its_throwaway_home(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    """One real corpus_only sample (no model is built) over a user's tar shards: an image in
    both shards, and more stray files beside them than the check lists."""
    corpus = tmp_path / "corpus"
    shared = factory.good_jpeg_bytes(5)
    factory.write_wds_shard(
        corpus / "00000.tar", [("a", shared, "x"), ("b", factory.good_jpeg_bytes(6), "y")]
    )
    factory.write_wds_shard(
        corpus / "00001.tar", [("c", shared, "x"), ("d", factory.good_jpeg_bytes(7), "z")]
    )
    strays = [f"notes{i:02d}.md" for i in range(UNREAD_LINES + 2)]
    for name in strays:
        (corpus / name).write_text("not an image")
    argv = ["check", "--select", "corpus_only", "--corpus", str(corpus), "--quiet"]
    assert main(argv) == EXIT_OK  # a duplicate is a warning, stray files are no failure
    out, err = capfd.readouterr()
    home = re.search(r" in (\S+)\n", out).group(1)
    assert not Path(home).exists()  # the throwaway home is gone ...
    later = out[out.index("\n") :] + err
    assert home not in later  # ... and nothing after the first line points into it
    # The duplicate warning names both images.
    warn = [line for line in out.splitlines() if " 00001  warn " in line]
    assert len(warn) == 1 and "corpus_content_unique_across_shards" in warn[0]
    assert "key 'c' of shard 00001" in warn[0] and "key 'a' of shard 00000" in warn[0]
    # The unread entries: the first few in Dagster's warning, the first UNREAD_LINES listed at
    # the end with their reasons, then how to keep the rest.
    assert "12 entries of the corpus source are not read by any shard: notes00.md" in err
    listed = [line.split() for line in out.splitlines() if ".md is not a .tar shard" in line]
    assert [Path(fields[1]).name for fields in listed] == strays[:UNREAD_LINES]
    assert all(fields[0] == "unsupported_file" for fields in listed)
    assert "... and 2 more (--home DIR keeps the full list in a source report)" in out


def test_a_sample_of_the_bundled_corpus_says_nothing_about_unread_files(
    monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    assert main(["check", "--select", "corpus_only", "--shards", "1", "--quiet"]) == EXIT_OK
    out, err = capfd.readouterr()
    assert "not read" not in out + err
    assert "corpus entries no shard reads" not in out
    assert "image_corpus  corpus_rows_complete" in out


def test_an_empty_corpus_is_one_configuration_error_before_any_model_is_built(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    empty, home = tmp_path / "empty", tmp_path / "home"
    empty.mkdir()
    assert main(["check", "--corpus", str(empty), "--home", str(home)]) == EXIT_USAGE
    out, err = capfd.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("megapairs check: configuration error: ")
    assert str(empty) in lines[0] and "is empty" in lines[0]
    assert DEMO_MODELS_NOTE not in out + err
    assert not (home / "models").exists()  # no model was built (nor loaded)


class _Stop(Exception):
    """Raised where the test has seen what it needs, so no run starts."""


def test_quiet_builds_the_demo_models_without_their_note(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """The preflight of a mining sample builds the demo models in the sample's home (for real);
    the run itself is stopped before it starts."""

    def stop(*args: object, **kwargs: object) -> None:
        raise _Stop

    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.setattr(dg.DagsterInstance, "ephemeral", staticmethod(stop))
    home = tmp_path / "home"
    with pytest.raises(_Stop):
        main(["check", "--home", str(home), "--shards", "1", "--quiet"])
    out, err = capfd.readouterr()
    assert (home / "models" / "demo-models.json").exists()  # built in this call
    assert DEMO_MODELS_NOTE not in out + err
    assert "untrained" not in out + err


def test_a_sample_whose_every_input_is_corrupt_is_not_a_pass(
    tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    corpus = tmp_path / "corpus"
    for shard in ("a", "b"):
        (corpus / shard).mkdir(parents=True)
        (corpus / shard / "bad.jpg").write_bytes(factory.truncated_jpeg_bytes())
    junit = tmp_path / "junit.xml"
    argv = ["check", "--select", "corpus_only", "--corpus", str(corpus), "--quiet"]
    assert main([*argv, "--junit-xml", str(junit)]) == EXIT_CHECK_FAILED
    out = capfd.readouterr().out
    lines = [" ".join(line.split()) for line in out.splitlines()]
    assert "image_corpus corpus_rows_complete 2/2 partitions pass" in lines  # vacuously
    failed = [line for line in lines if line.startswith(f"image_corpus {SAMPLE_HAS_IMAGES} - FAIL")]
    assert len(failed) == 1 and "none of the 2 sampled shards holds an accepted image" in failed[0]
    assert sum("decode_error" in line for line in lines) == 2  # the lost inputs, listed
    failures = [f.text for f in ElementTree.parse(junit).getroot().iter("failure")]
    assert len(failures) == 1 and failures[0].startswith("none of the 2 sampled shards")


@pytest.fixture
def own_tmp(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """The temporary folder `tempfile` hands out (a throwaway home's parent), empty at first."""
    import tempfile

    folder = tmp_path / "tmp"
    folder.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(folder))
    return folder


def test_sigterm_before_the_run_removes_the_throwaway_home(
    own_tmp: Path, monkeypatch: pytest.MonkeyPatch, capfd: pytest.CaptureFixture[str]
) -> None:
    """A cancelled CI job gets SIGTERM, which Python's default answers by dying on the spot; the
    check turns it into an interrupt, so its home in the temporary folder is removed."""
    import resources.profiles

    seen: list[Path] = []

    def terminated_during_preflight(*args: object, **kwargs: object) -> None:
        seen.extend(own_tmp.iterdir())
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(5)  # the handler raises before this ends
        raise AssertionError("SIGTERM did not interrupt the check")

    monkeypatch.setattr(resources.profiles, "check_ready", terminated_during_preflight)
    handler = signal.getsignal(signal.SIGTERM)
    assert main(["check", "--select", "corpus_only"]) == EXIT_INTERRUPTED
    assert [p.name.startswith("megapairs-check-") for p in seen] == [True]
    assert list(own_tmp.iterdir()) == []
    assert "megapairs check: interrupted" in capfd.readouterr().err
    assert signal.getsignal(signal.SIGTERM) is handler  # put back


def test_ctrl_c_during_the_run_prints_no_partial_results(
    own_tmp: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capfd: pytest.CaptureFixture[str],
) -> None:
    """Ctrl-C while a step runs: Dagster ends the run as failed; the check says it was
    interrupted instead of printing the checks that happened to run as a result."""
    import megapairs_assets.corpus.assets as corpus_assets

    def interrupted(*args: object, **kwargs: object) -> None:
        os.kill(os.getpid(), signal.SIGINT)
        time.sleep(5)
        raise AssertionError("SIGINT did not interrupt the step")

    monkeypatch.setattr(corpus_assets, "build_corpus_shard", interrupted)
    corpus = tmp_path / "corpus"
    factory.write_wds_shard(corpus / "00000.tar", [("a", factory.good_jpeg_bytes(1), "x")])
    junit = tmp_path / "junit.xml"
    argv = ["check", "--select", "corpus_only", "--corpus", str(corpus), "--junit-xml", str(junit)]
    assert main(argv) == EXIT_INTERRUPTED
    out, err = capfd.readouterr()
    assert "check results" not in out and "megapairs check: interrupted" in err
    assert not junit.exists() and list(own_tmp.iterdir()) == []
