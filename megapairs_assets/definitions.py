"""The Dagster code location: every stage's assets, checks and sensors, the jobs, the resources.

`MEGAPAIRS_PROFILE` (default `demo`) picks the resources; `MEGAPAIRS_HOME` the data root.
Each stage folder contributes its assets; this file only merges them.
"""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import dagster as dg

from jobs import all_jobs
from megapairs_assets.corpus.assets import STAGE as CORPUS_STAGE
from megapairs_assets.corpus.assets import build_shards_sensor, image_corpus
from megapairs_assets.embeddings.assets import embedding_assets, embedding_stages
from megapairs_assets.evaluation.assets import STAGE as SCORES_STAGE
from megapairs_assets.evaluation.assets import (
    benchmark_scores,
    build_checkpoint_sensor,
    build_rescore_sensor,
)
from megapairs_assets.generation.assets import generation_assets, generation_stages
from megapairs_assets.knn.assets import knn_assets, knn_stages
from megapairs_assets.lib.storage import default_home
from megapairs_assets.mining.assets import STAGE as MINING_STAGE
from megapairs_assets.mining.assets import mined_image_pairs
from megapairs_assets.orchestration.partitions import shard_asset_names
from megapairs_assets.orchestration.runs import run_executor
from megapairs_assets.orchestration.settings_version import with_settings_versions
from megapairs_assets.training.assets import STAGE as CHECKPOINT_STAGE
from megapairs_assets.training.assets import build_training_configs_sensor, mmret_clip_checkpoint
from resources.cluster import ClusterSettings
from resources.environment import SensorSettings, profile_from_env, sensor_settings
from resources.profiles import build_resources

# The automation sensor evaluates our custom condition in the code server, a parameter Dagster
# 1.13 marks beta; the warning, printed on every load, says nothing a user can act on.
warnings.filterwarnings("ignore", message=".*use_user_code_server.*is currently in beta")

MINING_HALF = [image_corpus, *embedding_assets, *knn_assets, mined_image_pairs]
ALL_ASSETS = [*MINING_HALF, *generation_assets, mmret_clip_checkpoint, benchmark_scores]
SHARD_STAGES = [CORPUS_STAGE, *embedding_stages, *knn_stages, MINING_STAGE, *generation_stages]
# Every stage whose code version carries the settings that shape its output.
SETTINGS_STAGES = [*SHARD_STAGES, CHECKPOINT_STAGE, SCORES_STAGE]


def _status(running: bool) -> dg.DefaultSensorStatus:
    return dg.DefaultSensorStatus.RUNNING if running else dg.DefaultSensorStatus.STOPPED


def build_sensors(settings: SensorSettings) -> list[dg.SensorDefinition]:
    """The shard, training-config and retriever sensors and the declarative-automation sensor,
    on or off as the profile says."""
    return [
        build_shards_sensor(_status(settings.shards_sensor_running), shard_asset_names(ALL_ASSETS)),
        build_training_configs_sensor(_status(settings.shards_sensor_running)),
        build_checkpoint_sensor(_status(settings.scoring_sensors_running)),
        build_rescore_sensor(_status(settings.scoring_sensors_running)),
        dg.AutomationConditionSensorDefinition(
            "megapairs_automation",
            target=dg.AssetSelection.all(),
            default_status=_status(settings.automation_running),
            # Our condition reads each partition's blocking-check outcome (a custom condition,
            # orchestration/automation.py), which Dagster evaluates in the code server only.
            use_user_code_server=True,
            description="Refreshes downstream partitions whose upstream is new or changed "
            "(each asset's automation condition shows on its page).",
        ),
    ]


def build_definitions(
    profile: str | None = None,
    home: Path | None = None,
    resource_overrides: dict[str, Any] | None = None,
) -> dg.Definitions:
    """Definitions for a profile and data root (defaults from the environment).

    `resource_overrides` replaces individual resources (tests point the corpus elsewhere).
    """
    profile = profile or profile_from_env()
    resources = {**build_resources(profile, home or default_home()), **(resource_overrides or {})}
    # Each shard stage's code version carries the settings that shape its output, so a changed
    # setting shows as "code version changed" on exactly the assets that read it.
    settings_by_asset = {
        stage.asset_name: (stage.code_version, stage.settings)
        for stage in SETTINGS_STAGES
        if stage.settings is not None
    }
    return dg.Definitions(
        assets=with_settings_versions(ALL_ASSETS, resources, settings_by_asset),
        jobs=all_jobs,
        sensors=build_sensors(sensor_settings(profile)),
        resources=resources,
        # One pod per step on a cluster; embedded, Dagster's default executor after releasing
        # this machine's killed runs (runs.py).
        executor=run_executor(ClusterSettings.from_env().step_executor),
    )


defs = build_definitions()
