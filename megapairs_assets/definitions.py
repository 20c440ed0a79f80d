"""The Dagster code location: every asset, check, job, sensor and resource of the profile.

`MEGAPAIRS_PROFILE` (default `demo`) picks the resources; `MEGAPAIRS_HOME` the data root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dagster as dg

from jobs import all_jobs
from megapairs_assets.corpus.assets import image_corpus, new_shards_sensor
from megapairs_assets.embeddings.assets import embedding_assets
from megapairs_assets.knn.assets import knn_assets
from megapairs_assets.mining.assets import mined_image_pairs
from megapairs_assets.storage import default_home
from resources.profiles import build_resources, profile_from_env

ALL_ASSETS = [image_corpus, *embedding_assets, *knn_assets, mined_image_pairs]


def build_definitions(
    profile: str | None = None,
    home: Path | None = None,
    resource_overrides: dict[str, Any] | None = None,
) -> dg.Definitions:
    """Definitions for a profile and data root (defaults from the environment).

    `resource_overrides` replaces individual resources (tests point the corpus elsewhere).
    """
    resources = build_resources(profile or profile_from_env(), home or default_home())
    return dg.Definitions(
        assets=ALL_ASSETS,
        jobs=all_jobs,
        sensors=[new_shards_sensor],
        resources={**resources, **(resource_overrides or {})},
    )


defs = build_definitions()
