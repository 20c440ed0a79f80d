"""`megapairs demo` options that must fail fast and clearly (no graph run here)."""

from __future__ import annotations

import builtins
import sys
from pathlib import Path

import pytest

from megapairs_assets.cli.demo import FAISS_HINT, corpus_kind
from megapairs_assets.cli.main import main as megapairs


def test_corpus_kind_is_read_from_what_the_path_holds(tmp_path: Path) -> None:
    shards = tmp_path / "shards"
    shards.mkdir()
    (shards / "00000.tar").write_bytes(b"")
    folders = tmp_path / "folders"
    (folders / "a").mkdir(parents=True)
    manifest = tmp_path / "manifest.jsonl"
    manifest.write_text("{}\n")
    assert corpus_kind(shards) == "webdataset"
    assert corpus_kind(folders) == "folder"
    assert corpus_kind(manifest) == "manifest"
    with pytest.raises(ValueError, match=r"expected a folder of \.tar shards"):
        corpus_kind(tmp_path / "missing")


def test_demo_with_a_corpus_that_does_not_exist_says_so(tmp_path: Path, capsys) -> None:
    assert megapairs(["demo", "--corpus", str(tmp_path / "nowhere")]) == 2
    assert "--corpus" in capsys.readouterr().err


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
    assert '.[cpu,dev]' in err


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
