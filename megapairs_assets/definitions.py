"""The Dagster code location: every stage's assets, checks and sensors, the jobs, the resources.

`MEGAPAIRS_PROFILE` (default `demo`) picks the resources; `MEGAPAIRS_HOME` the data root.
Each stage folder contributes its assets; this file only merges them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from jobs import all_jobs
from megapairs_assets.corpus.assets import build_shards_sensor, image_corpus
from megapairs_assets.embeddings.assets import embedding_assets
from megapairs_assets.evaluation.assets import (
    benchmark_scores,
    build_checkpoint_sensor,
    build_rescore_sensor,
)
from megapairs_assets.generation.assets import generation_assets
from megapairs_assets.knn.assets import knn_assets
from megapairs_assets.lib.storage import default_home
from megapairs_assets.mining.assets import mined_image_pairs
from megapairs_assets.orchestration.partitions import shard_asset_names
from megapairs_assets.orchestration.runs import run_executor
from megapairs_assets.training.assets import build_training_configs_sensor, mmret_clip_checkpoint
from resources.cluster import ClusterSettings
from resources.profiles import SensorSettings, build_resources, profile_from_env, sensor_settings

MINING_HALF = [image_corpus, *embedding_assets, *knn_assets, mined_image_pairs]
ALL_ASSETS = [*MINING_HALF, *generation_assets, mmret_clip_checkpoint, benchmark_scores]


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
    resources = build_resources(profile, home or default_home())
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=all_jobs,
        sensors=build_sensors(sensor_settings(profile)),
        resources={**resources, **(resource_overrides or {})},
        # One pod per step on a cluster; embedded, Dagster's default executor after releasing
        # this machine's killed runs (runs.py).
        executor=run_executor(ClusterSettings.from_env().step_executor),
    )


defs = build_definitions()
