"""Building the demo models says one line about them, not a warning and progress bars."""

from __future__ import annotations

import hashlib
import logging
from pathlib import Path

import pytest
from transformers.utils import logging as transformers_logging

from megapairs_assets.demo.models import DEMO_MODELS_NOTE, ensure_demo_models


def file_hashes(folder: Path) -> dict[str, str]:
    return {
        str(path.relative_to(folder)): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file() and not path.name.startswith(".")
    }


def test_build_prints_the_note_once_without_warning_or_bars(
    tmp_path: Path,
    demo_models_dir: Path,
    capfd: pytest.CaptureFixture[str],
    caplog: pytest.LogCaptureFixture,
) -> None:
    capfd.readouterr()  # drop what the session fixture printed
    assert transformers_logging.is_progress_bar_enabled()
    with caplog.at_level(logging.INFO):
        ensure_demo_models(tmp_path)
        logging.getLogger().warning("other warnings still pass")
    out, err = capfd.readouterr()
    printed = out + err
    assert printed.count(DEMO_MODELS_NOTE) == 1
    assert "untrained by design" in DEMO_MODELS_NOTE
    assert "No pretrained weights" not in printed + caplog.text
    assert "Writing model shards" not in printed
    assert "other warnings still pass" in caplog.text  # only open_clip's warning is dropped
    assert transformers_logging.is_progress_bar_enabled()  # the setting is put back
    # Same bytes as the session's build: quieting the libraries changed no weight.
    # The shared models folder may also hold other stages' models (the demo LLM's cache).
    shared = {k: v for k, v in file_hashes(demo_models_dir).items() if not k.startswith("smollm2")}
    assert file_hashes(tmp_path) == shared
    assert "megapairs-tiny-clip.pt" in file_hashes(tmp_path)

    ensure_demo_models(tmp_path)  # already built: says nothing
    out, err = capfd.readouterr()
    assert DEMO_MODELS_NOTE not in out + err
