"""The `paper` profile's own Definitions run corpus -> embeddings -> KNN -> pairs on a CPU.

This is the GPU benchmark `benchmarks/paper_profile_assets.py` at tiny shapes: the paper
profile's resources with only the corpus and the encoders' weights swapped (random, local), so
a change that breaks the paper profile's wiring fails here, not on a lent GPU machine.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from benchmarks import paper_profile_assets


def test_the_paper_profile_materializes_the_mining_half(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OUT", str(tmp_path / "out"))
    (tmp_path / "out").mkdir()
    # The benchmark sets these for its own process; monkeypatch puts them back afterwards.
    for variable in ("DAGSTER_HOME", "MEGAPAIRS_HOME"):
        monkeypatch.setenv(variable, str(tmp_path / "unused"))
    monkeypatch.setenv("MEGAPAIRS_SENSORS", "off")
    assert paper_profile_assets.main(["--smoke", "--scratch", str(tmp_path)]) == 0
    record = json.loads((tmp_path / "out" / "paper_profile_assets_smoke.json").read_text())
    for run in ("up_to_knn", "mining"):
        assert record[run]["success"], record[run]["failed_steps"]
        assert record[run]["checks_failed"] == []
        assert record[run]["checks_run"] > 0
    rows = record["rows"]
    assert rows["image_corpus"] == paper_profile_assets.SMOKE["images"]
    for name in paper_profile_assets.UP_TO_KNN[1:4]:
        assert rows[name] == rows["image_corpus"]
    assert rows["mined_image_pairs"] > 0
    assert set(record["up_to_knn"]["step_seconds"]) == set(paper_profile_assets.UP_TO_KNN)
