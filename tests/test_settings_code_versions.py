"""A setting that changes the checkpoints or the scores shows as a changed code version."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from megapairs_assets.definitions import build_definitions

SCORES = dg.AssetKey("benchmark_scores")
CHECKPOINT = dg.AssetKey("mmret_clip_checkpoint")


def _version(
    home: Path, key: dg.AssetKey, training: dict | None = None, **evaluation_changes: object
) -> str | None:
    base = build_definitions("demo", home)
    overrides = {}
    if evaluation_changes:
        evaluation = base.resources["evaluation"]
        fields = {**evaluation.model_dump(), **evaluation_changes}
        overrides["evaluation"] = type(evaluation)(**fields)
    if training:
        resource = base.resources["training"]
        (name, config), *_ = resource.configs.items()
        changed = type(config)(**{**config.model_dump(), **training})
        overrides["training"] = resource.model_copy(
            update={"configs": {**resource.configs, name: changed}}
        )
    defs = build_definitions("demo", home, overrides)
    return defs.resolve_assets_def(key).code_versions_by_key[key]


def _scores_version(home: Path, **evaluation_changes: object) -> str | None:
    return _version(home, SCORES, **evaluation_changes)


def test_the_held_out_split_and_precision_change_the_scores_code_version(tmp_path: Path) -> None:
    plain = _scores_version(tmp_path)
    assert plain is not None and plain.startswith("benchmark-scores-v2+s.")
    assert _scores_version(tmp_path, heldout_fraction=0.25) != plain
    assert _scores_version(tmp_path, precision="bfloat16") != plain
    # How the scores are computed in batches is not what they are.
    assert _scores_version(tmp_path, batch_size=7) == plain


def test_the_recipe_and_the_held_out_split_change_the_checkpoint_code_version(
    tmp_path: Path,
) -> None:
    plain = _version(tmp_path, CHECKPOINT)
    assert plain is not None and plain.startswith("mmret-clip-v2+s.")
    assert _version(tmp_path, CHECKPOINT, training={"max_steps": 7}) != plain
    assert _version(tmp_path, CHECKPOINT, training={"learning_rate": 1e-3}) != plain
    assert _version(tmp_path, CHECKPOINT, heldout_fraction=0.25) != plain
    # Where and how fast it trains is not what it learns.
    assert _version(tmp_path, CHECKPOINT, training={"num_workers": 0}) == plain
