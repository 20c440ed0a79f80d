"""The light half of the profile switch: which profile and deployment the environment picks.

Every `megapairs` command checks these first (`check_environment`), and `megapairs lineage`
needs only them, the storage layout and the catalog. They live apart from `profiles.py`, whose
resources import the model code (torch, open_clip, faiss), so those commands start in about a
second instead of three. Import them from here.
"""

from __future__ import annotations

import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from megapairs_assets.lib.errors import ConfigurationError, DataRootError
from megapairs_assets.lib.storage import data_root_path
from megapairs_assets.lineage.catalog import LineageCatalog
from resources.cluster import ClusterSettings
from resources.storage import StorageResource

PROFILE_NAMES = ("demo", "paper")
DEFAULT_PROFILE = "demo"

# Every MEGAPAIRS_* variable the code reads (the README says what each does). One set but not
# listed is almost always a typo that would silently leave a default in place (a misspelt
# MEGAPAIRS_PROFILE runs the demo), so the CLI names it; tests/test_environment_variables.py
# keeps this list equal to the names in the code.
BENCHMARK_ROOT_VARIABLES = tuple(
    f"MEGAPAIRS_{name}_ROOT" for name in ("CIRCO", "CIRR", "FASHIONIQ", "GENECIS")
)
KNOWN_VARIABLES = frozenset(
    {
        "MEGAPAIRS_HOME",
        "MEGAPAIRS_PROFILE",
        "MEGAPAIRS_SENSORS",
        "MEGAPAIRS_CORPUS",
        "MEGAPAIRS_DATA_ROOT",
        "MEGAPAIRS_STORAGE_ENDPOINT_URL",
        "MEGAPAIRS_DEPLOYMENT",
        "MEGAPAIRS_STEP_EXECUTOR",
        "MEGAPAIRS_POSTGRES_URL",
        "MEGAPAIRS_LINEAGE_CATALOG",
        "MEGAPAIRS_LINEAGE_DATA_PATH",
        "MEGAPAIRS_DUCKDB_EXTENSION_DIR",
        "MEGAPAIRS_GPU_NODE_SELECTOR",
        "MEGAPAIRS_GPU_TOLERATIONS",
        "MEGAPAIRS_CLIP_WEIGHTS",
        "MEGAPAIRS_DINOV2_MODEL",
        "MEGAPAIRS_VIT_B16_WEIGHTS",
        "MEGAPAIRS_VIT_L14_WEIGHTS",
        "MEGAPAIRS_TRAIN_DEVICES",
        "MEGAPAIRS_VLLM_BASE_URLS",
        "MEGAPAIRS_VLLM_DESCRIBE_URLS",
        "MEGAPAIRS_VLLM_INSTRUCT_URLS",
        "MEGAPAIRS_VLLM_DESCRIBE_MODEL",
        "MEGAPAIRS_VLLM_INSTRUCT_MODEL",
        "MEGAPAIRS_VLLM_API_KEY",
        *BENCHMARK_ROOT_VARIABLES,
    }
)


class ProfileError(ConfigurationError):
    """An unknown profile name or a profile that cannot be built."""


@dataclass(frozen=True)
class SensorSettings:
    """Which sensors start running in a fresh Dagster instance (a user can flip them in the UI).

    shards_sensor_running: `new_shards_sensor` registers new shards and retires removed ones;
        `training_configs_sensor` registers the training resource's named configs.
    scoring_sensors_running: `new_retrievers_sensor` and `rescore_trained_checkpoints` score
        new and re-trained retrievers.
    automation_running: `megapairs_automation` refreshes stale downstream partitions.
    The shard sensor starts running and automation starts off in both profiles (a refresh of
    every KNN partition after any embedding change is a choice to make, not a default); the
    environment variable `MEGAPAIRS_SENSORS=on|off` overrides both.
    """

    shards_sensor_running: bool
    automation_running: bool
    scoring_sensors_running: bool = True


_SENSOR_DEFAULTS = {
    "demo": SensorSettings(shards_sensor_running=True, automation_running=False),
    "paper": SensorSettings(shards_sensor_running=True, automation_running=False),
}


def sensor_settings(profile: str) -> SensorSettings:
    """The profile's sensor defaults, or both on/off from `MEGAPAIRS_SENSORS`."""
    override = os.environ.get("MEGAPAIRS_SENSORS", "").strip().lower()
    if override in ("on", "off"):
        return SensorSettings(override == "on", override == "on", override == "on")
    if override:
        raise ProfileError(f"MEGAPAIRS_SENSORS must be 'on' or 'off', got {override!r}")
    return _SENSOR_DEFAULTS.get(profile, _SENSOR_DEFAULTS["demo"])


def profile_from_env() -> str:
    return os.environ.get("MEGAPAIRS_PROFILE", DEFAULT_PROFILE)


def check_environment() -> str:
    """Check every MEGAPAIRS_* choice the environment makes (profile, sensors, deployment and
    its engines, home and data root folders) and return the profile; ProfileError /
    ClusterConfigError / DataRootError say what to change. The CLI calls this first, so every
    subcommand refuses a bad setting the same way."""
    profile = profile_from_env()
    if profile not in PROFILE_NAMES:
        raise ProfileError(
            f"unknown profile {profile!r}: "
            f"set MEGAPAIRS_PROFILE to one of {', '.join(PROFILE_NAMES)}"
        )
    sensor_settings(profile)
    ClusterSettings.from_env()
    check_folder_settings()
    return profile


# `scheme://` at the start of a setting: a URL (fsspec), not a local path.
_URL_SCHEME = re.compile(r"([A-Za-z][A-Za-z0-9+.-]*)://")


def check_folder_settings(env: Mapping[str, str] | None = None) -> None:
    """Refuse (DataRootError) a MEGAPAIRS_HOME, or a local MEGAPAIRS_DATA_ROOT, that exists
    and is not a folder: every table and the catalog would otherwise fail later, or a command
    would report an empty home. Cheap: one stat each, nothing created, no network (a remote
    data root is left to its filesystem)."""
    env = os.environ if env is None else env
    for name in ("MEGAPAIRS_HOME", "MEGAPAIRS_DATA_ROOT"):
        text = env.get(name) or ""
        scheme = _URL_SCHEME.match(text)
        if not text or (scheme and scheme.group(1).lower() not in ("file", "local")):
            continue
        path = data_root_path(text)
        if path.exists() and not path.is_dir():
            raise DataRootError(
                f"{name}={text} is a file, not a folder: point {name} at a folder "
                "(a missing one is created)"
            )


def storage_resource(home: Path, profile: str) -> StorageResource:
    """Where tables live: under `home`, or on object storage (any fsspec URL) when
    `MEGAPAIRS_DATA_ROOT` says so; credentials come from the environment."""
    return StorageResource(
        home=str(home),
        profile=profile,
        data_root=os.environ.get("MEGAPAIRS_DATA_ROOT") or None,
        endpoint_url=os.environ.get("MEGAPAIRS_STORAGE_ENDPOINT_URL") or None,
    )


def lineage_catalog(home: Path) -> LineageCatalog:
    """The lineage catalog of this deployment (the DuckDB file, or DuckLake on a cluster)."""
    return ClusterSettings.from_env().catalog_resource(home).catalog()


def unknown_variables(env: Mapping[str, str] | None = None) -> list[tuple[str, str | None]]:
    """The MEGAPAIRS_* variables set in `env` that no code reads, each with the known name it
    most resembles (None when none is close), sorted."""
    env = os.environ if env is None else env
    unknown = sorted(n for n in env if n.startswith("MEGAPAIRS_") and n not in KNOWN_VARIABLES)
    return [
        (name, next(iter(difflib.get_close_matches(name, KNOWN_VARIABLES, n=1, cutoff=0.8)), None))
        for name in unknown
    ]
