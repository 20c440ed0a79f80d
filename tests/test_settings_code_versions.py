"""A setting that changes the scores shows as a changed code version on `benchmark_scores`."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from megapairs_assets.definitions import build_definitions

SCORES = dg.AssetKey("benchmark_scores")


def _scores_version(home: Path, **evaluation_changes: object) -> str | None:
    base = build_definitions("demo", home)
    overrides = {}
    if evaluation_changes:
        evaluation = base.resources["evaluation"]
        fields = {**evaluation.model_dump(), **evaluation_changes}
        overrides["evaluation"] = type(evaluation)(**fields)
    defs = build_definitions("demo", home, overrides)
    return defs.resolve_assets_def(SCORES).code_versions_by_key[SCORES]


def test_the_held_out_split_and_precision_change_the_scores_code_version(tmp_path: Path) -> None:
    plain = _scores_version(tmp_path)
    assert plain is not None and plain.startswith("benchmark-scores-v2+s.")
    assert _scores_version(tmp_path, heldout_fraction=0.25) != plain
    assert _scores_version(tmp_path, precision="bfloat16") != plain
    # How the scores are computed in batches is not what they are.
    assert _scores_version(tmp_path, batch_size=7) == plain
