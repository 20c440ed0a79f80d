"""The code location loads, and the asset graph's shape changes only on purpose.

`tests/snapshots/asset_graph.json` records every asset's key, group, deps, partitioning,
checks (and whether they block), pool and code version. An accidental change to the graph
shows up as a diff in review; to accept an intended change, run
`MEGAPAIRS_UPDATE_SNAPSHOTS=1 pytest tests/test_definitions.py` and commit the file.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import dagster as dg
import pytest

from megapairs_assets.definitions import build_definitions
from resources.environment import PROFILE_NAMES, ProfileError
from resources.profiles import build_resources

SNAPSHOT = Path(__file__).parent / "snapshots" / "asset_graph.json"
MINING_HALF = {
    "image_corpus",
    "clip_image_embeddings",
    "dino_image_embeddings",
    "caption_text_embeddings",
    "clip_image_knn",
    "dino_image_knn",
    "caption_text_knn",
    "mined_image_pairs",
}


def _graph_snapshot(defs: dg.Definitions) -> dict[str, object]:
    graph = defs.resolve_asset_graph()
    snapshot: dict[str, object] = {}
    for key in sorted(graph.get_all_asset_keys(), key=lambda k: k.to_user_string()):
        node = graph.get(key)
        checks = [
            {"name": spec.name, "blocking": spec.blocking}
            for spec in sorted(node.assets_def.check_specs, key=lambda s: s.name)
            if spec.asset_key == key
        ]
        snapshot[key.to_user_string()] = {
            "group": node.group_name,
            "deps": sorted(k.to_user_string() for k in node.parent_keys),
            "partitions": type(node.partitions_def).__name__ if node.partitions_def else None,
            "checks": checks,
            "pool": sorted(node.pools or []),
            "code_version": node.code_version,
            "backfill_policy": str(node.backfill_policy),
            "kinds": sorted(node.kinds),
        }
    return snapshot


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_definitions_load_for_every_profile(profile: str, tmp_path: Path) -> None:
    defs = build_definitions(profile, tmp_path)
    graph = defs.resolve_asset_graph()
    assert {k.to_user_string() for k in graph.get_all_asset_keys()} >= MINING_HALF
    # resolve_* raise on a missing name; what is worth asserting is what they point at.
    job_assets = defs.resolve_job_def("mining_half").asset_layer.selected_asset_keys
    assert {k.to_user_string() for k in job_assets} >= MINING_HALF
    sensor = defs.resolve_sensor_def("new_shards_sensor")
    # The corpus of new shards; the KNN graphs again after shards leave the corpus.
    assert sensor.asset_selection.resolve(graph) == {
        dg.AssetKey(name)
        for name in ("image_corpus", "clip_image_knn", "dino_image_knn", "caption_text_knn")
    }


def test_workspace_module_exposes_defs() -> None:
    import megapairs_assets.definitions as module

    assert isinstance(module.defs, dg.Definitions)


def test_asset_graph_matches_snapshot(tmp_path: Path) -> None:
    current = _graph_snapshot(build_definitions("demo", tmp_path))
    if os.environ.get("MEGAPAIRS_UPDATE_SNAPSHOTS"):
        SNAPSHOT.write_text(json.dumps(current, indent=2, sort_keys=True) + "\n")
    assert SNAPSHOT.exists(), "no snapshot: run with MEGAPAIRS_UPDATE_SNAPSHOTS=1 and commit it"
    assert current == json.loads(SNAPSHOT.read_text())


def test_gpu_assets_share_the_gpu_pool(tmp_path: Path) -> None:
    snapshot = _graph_snapshot(build_definitions("demo", tmp_path))
    for name, node in snapshot.items():
        loads_a_model = name in ("mmret_clip_checkpoint", "benchmark_scores")
        if name.endswith("_embeddings") or name.endswith("_knn") or loads_a_model:
            assert node["pool"] == ["gpu"], name


def test_unknown_profile_names_the_choices(tmp_path: Path) -> None:
    with pytest.raises(ProfileError, match="demo, paper"):
        build_resources("papr", tmp_path)


@pytest.mark.parametrize("profile", PROFILE_NAMES)
def test_dagster_loads_the_code_location_for_every_profile(profile: str, tmp_path: Path) -> None:
    # `dg check defs` goes further than building Definitions: it snapshots every resource's
    # config with its defaults, where a null inside a config map once broke the paper profile.
    import os
    import subprocess
    import sys

    dagster_home = tmp_path / "dagster"
    dagster_home.mkdir()
    (dagster_home / "dagster.yaml").write_text("telemetry:\n  enabled: false\n")
    env = {
        **os.environ,
        "DAGSTER_HOME": str(dagster_home),
        "MEGAPAIRS_PROFILE": profile,
        "MEGAPAIRS_HOME": str(tmp_path / "home"),
    }
    dg_cli = Path(sys.executable).parent / "dg"
    done = subprocess.run(
        [str(dg_cli), "check", "defs"],
        cwd=Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    assert "All definitions loaded successfully" in done.stdout + done.stderr


def test_every_job_releases_killed_runs_before_it_executes() -> None:
    """The jobs run on megapairs_executor, so re-running a killed command never waits on the
    dead run's pool slot (tests/test_reliability_rerun_runs.py exercises the executor)."""
    from megapairs_assets.definitions import build_definitions
    from megapairs_assets.orchestration.runs import megapairs_executor

    defs = build_definitions()
    for job_name in ("mining_half", "generate", "train", "evaluate"):
        assert defs.resolve_job_def(job_name).executor_def is megapairs_executor, job_name
