"""`megapairs eval` through the `megapairs` entry point (configuration errors: exit 2)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from test_evaluation_loaders import write_fashioniq

from megapairs_assets.cli.main import main
from megapairs_assets.demo.models import DEMO_CLIP_MODEL


def _run(argv: list[str]) -> int:
    return main(argv)


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MEGAPAIRS_PROFILE", "demo")
    return tmp_path / "home"


def test_eval_prints_the_table_and_shares_the_gallery_cache(
    home: Path, tmp_path: Path, demo_models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_fashioniq(tmp_path / "fiq")
    retriever = f"{DEMO_CLIP_MODEL}@{demo_models_dir / (DEMO_CLIP_MODEL + '.pt')}"
    argv = ["eval", "--retriever", retriever, "--benchmark", "fashioniq-val"]
    argv += ["--root", str(tmp_path / "fiq"), "--device", "cpu", "--num-workers", "0"]
    assert _run(argv) == 0
    out = capsys.readouterr().out
    assert out.startswith("**fashioniq-val** · retriever `megapairs-tiny-clip__")
    assert "| split | R@10 | R@50 | queries |" in out
    for split in ("dress", "shirt", "toptee", "mean"):
        assert f"| {split} |" in out
    cached = list((home / "benchmark_gallery_cache").glob("*/fashioniq-*/*/meta.json"))
    assert len(cached) == 3  # one gallery per category, reusable by the asset


def test_eval_reports_bad_input_in_one_line(
    home: Path, tmp_path: Path, demo_models_dir: Path, capsys: pytest.CaptureFixture
) -> None:
    write_fashioniq(tmp_path / "fiq")
    path = tmp_path / "fiq/captions/cap.toptee.val.json"
    path.write_text(json.dumps([{"candidate": "x"}], indent=2))
    checkpoint = demo_models_dir / f"{DEMO_CLIP_MODEL}.pt"
    argv = ["eval", "--retriever", f"{DEMO_CLIP_MODEL}@{checkpoint}", "--device", "cpu"]
    assert _run([*argv, "--benchmark", "fashioniq-val", "--root", str(tmp_path / "fiq")]) == 1
    assert "cap.toptee.val.json:2: entry 0: missing key 'target'" in capsys.readouterr().err
    # Configuration errors are the entry point's one `configuration error:` line, exit 2.
    assert _run([*argv, "--benchmark", "heldout", "--root", str(tmp_path)]) == 2
    assert "configuration error: --root does not apply to heldout" in capsys.readouterr().err
    assert _run(["eval", "--retriever", "no-such-clip@openai", "--benchmark", "genecis"]) == 2
    assert "no model named 'no-such-clip'" in capsys.readouterr().err
    missing = str(tmp_path / "no-such-checkpoint")
    assert _run(["eval", "--retriever", missing, "--benchmark", "heldout"]) == 2
    assert f"no checkpoint directory at {missing}" in capsys.readouterr().err
