"""`megapairs demo` options that must fail fast and clearly (no graph run here)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.cli.demo import FAISS_HINT
from megapairs_assets.cli.main import main as megapairs


def test_an_interrupted_run_is_told_apart_from_a_failed_one() -> None:
    from dagster._core.errors import DagsterExecutionInterruptedError

    from megapairs_assets.cli.demo import was_interrupted

    @dg.op
    def interrupted() -> None:
        raise DagsterExecutionInterruptedError()  # what Dagster raises in a step on Ctrl-C

    @dg.op
    def broken() -> None:
        raise RuntimeError("a bug")

    def run(op) -> dg.ExecuteInProcessResult:
        job = dg.GraphDefinition(name=f"{op.name}_job", node_defs=[op]).to_job()
        return job.execute_in_process(raise_on_error=False)

    assert was_interrupted(run(interrupted))
    assert not was_interrupted(run(broken))


def test_the_summary_lists_failed_warning_checks() -> None:
    from megapairs_assets.cli.summary import check_lines

    specs = [dg.AssetCheckSpec(name, asset="table") for name in ("rows_ok", "unique")]

    @dg.asset(check_specs=specs)
    def table() -> dg.MaterializeResult:
        return dg.MaterializeResult(
            check_results=[
                dg.AssetCheckResult(check_name="rows_ok", passed=True),
                dg.AssetCheckResult(
                    check_name="unique",
                    passed=False,
                    severity=dg.AssetCheckSeverity.WARN,
                    metadata={"failing_partitions": "s1, s2"},
                    description="key 'c' of shard s2 repeats key 'a' of shard s1 " + "x" * 400,
                ),
            ]
        )

    lines = check_lines([dg.materialize([table])])
    assert lines[:2] == [
        "  checks:      1 passed, 0 failed, 1 warning",
        "    warn: table unique [s1, s2]",
    ]
    # The check's own description follows, shortened to one readable line.
    assert lines[2].startswith("      key 'c' of shard s2 repeats key 'a' of shard s1")
    assert lines[2].endswith(" ...") and len(lines[2]) <= 306


def test_demo_with_a_corpus_that_does_not_exist_says_so(tmp_path: Path, capsys) -> None:
    assert megapairs(["demo", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_demo_without_faiss_prints_the_install_line(monkeypatch, capsys) -> None:
    real_import = builtins.__import__

    def no_faiss(name, *args, **kwargs):
        if name == "faiss":
            raise ImportError("No module named 'faiss'")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "faiss", raising=False)
    monkeypatch.setattr(builtins, "__import__", no_faiss)
    assert megapairs(["demo"]) == 2
    err = capsys.readouterr().err
    assert err.strip() == FAISS_HINT
    assert ".[cpu,dev]" in err


def test_demo_on_an_empty_folder_is_a_configuration_error(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    from conftest import make_home

    (tmp_path / "empty").mkdir()
    home = make_home(tmp_path, demo_models_dir)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    assert megapairs(["demo", "--corpus", str(tmp_path / "empty"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "configuration error:" in err and "is empty" in err
    assert "Traceback" not in err
    # The corpus is looked at before the model preflight: one line, not a list of settings.
    assert "to fix before this run can start" not in err
    assert [line for line in err.splitlines() if "configuration error" in line] == [err.strip()]


def test_demo_on_images_without_captions_says_why_nothing_is_trained(
    tmp_path: Path, demo_models_dir: Path, monkeypatch: pytest.MonkeyPatch, capsys
) -> None:
    # A plain folder of pictures: the demo's text-only describe step has nothing to read, so
    # every pair is quarantined; the demo stops before training and names the fix.
    from conftest import make_home
    from image_factory import good_jpeg_bytes

    corpus = tmp_path / "pictures"
    corpus.mkdir()
    for seed in range(24):
        (corpus / f"picture{seed:02d}.jpg").write_bytes(good_jpeg_bytes(seed))
    home = make_home(tmp_path, demo_models_dir)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(home))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    monkeypatch.setenv("DAGSTER_HOME", str(home / "dagster"))
    assert megapairs(["demo", "--corpus", str(corpus), "--quiet"]) == 1
    captured = capsys.readouterr()
    assert "no triplets to train on" in captured.err
    assert "missing_caption (pair_descriptions)" in captured.err
    assert "give each image a caption" in captured.err
    assert "train: MMRet-CLIP" not in captured.out  # no training run was started
    assert "Traceback" not in captured.err
