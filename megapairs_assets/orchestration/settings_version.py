"""The settings that shape an asset's output, folded into its Dagster code version.

Dagster marks a partition stale when its asset's code version differs from the one its last
materialization recorded, or when an upstream data version changed; resource settings are not
part of either on their own. So a changed KNN `k`, mining band, prompt template or generation
model would leave every table looking up to date. Each shard stage therefore names the settings
that change what it writes (`Stage.settings`, read from the resources), and the code location
publishes `<stage version>+s.<hash of those settings>` as the asset's code version, with the
settings themselves in the asset's definition metadata (`settings`). After a change, exactly
the assets that read the setting show "code version changed", their dependants show stale
upstream, and "Materialize stale and missing" (or the automation sensor) redoes them.

Only settings that change the output count: batch sizes, workers, timeouts, GPU placement and
server URLs do not, so tuning throughput never marks a table stale. Settings are read as
configured ("auto" stays "auto"), never as resolved on this machine, so the webserver, the
daemon and a GPU run worker compute the same version.

A run that overrides a setting through run config (README "Changing a setting for one run")
records the code location's version like any other run; its materializations carry the run's
own `settings_version` in their metadata, and the step logs a warning when it differs.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from pathlib import PurePath
from types import SimpleNamespace
from typing import Any

import dagster as dg

# resources (attribute access: a step's `context.resources`, or the Definitions' resources as
# a namespace) -> the settings that shape the asset's output, JSON-serialisable.
SettingsOf = Callable[[Any], Mapping[str, Any]]

SETTINGS_METADATA_KEY = "settings"
SETTINGS_VERSION_KEY = "settings_version"


def settings_hash(settings: Mapping[str, Any]) -> str:
    """A short, stable hash of a settings mapping (key order does not matter)."""
    canonical = json.dumps(settings, sort_keys=True, separators=(",", ":"), default=str)
    return hashlib.sha256(canonical.encode()).hexdigest()[:12]


def settings_code_version(stage_version: str, settings: Mapping[str, Any]) -> str:
    """The code version Dagster sees: the stage's own version plus its settings' hash."""
    return f"{stage_version}+s.{settings_hash(settings)}" if settings else stage_version


def with_settings_versions(
    assets: Iterable[dg.AssetsDefinition],
    resources: Mapping[str, Any],
    settings_by_asset: Mapping[str, tuple[str, SettingsOf]],
) -> list[dg.AssetsDefinition]:
    """`assets` with each listed asset's code version and `settings` metadata set from
    `resources` (the Definitions' resources, after overrides).

    settings_by_asset: asset name -> (stage code version, settings function). Assets not listed
    are returned unchanged.
    """
    namespace = SimpleNamespace(**resources)
    versioned = []
    for asset in assets:
        entry = settings_by_asset.get(asset.key.to_user_string())
        if entry is None:
            versioned.append(asset)
            continue
        stage_version, settings_of = entry
        settings = dict(settings_of(namespace))
        code_version = settings_code_version(stage_version, settings)

        def replace(spec: dg.AssetSpec, settings=settings, code_version=code_version):
            return spec.replace_attributes(
                code_version=code_version,
                metadata={
                    **spec.metadata,
                    SETTINGS_METADATA_KEY: dg.MetadataValue.json(settings),
                    SETTINGS_VERSION_KEY: settings_hash(settings),
                },
            )

        versioned.append(asset.map_asset_specs(replace))
    return versioned


def fields(resource: Any, names: Iterable[str]) -> dict[str, Any]:
    """The named configured fields of a resource, as plain JSON values (nested config too)."""
    values = {}
    for name in names:
        value = getattr(resource, name)
        values[name] = value.model_dump() if hasattr(value, "model_dump") else value
    return values


# File and folder names that libraries give every model's weights alike (transformers,
# open_clip, sentence-transformers packages): alone they would make two models look the same.
_GENERIC_WEIGHT_NAMES = {
    "model",
    "models",
    "weights",
    "checkpoint",
    "model.safetensors",
    "pytorch_model.bin",
    "open_clip_pytorch_model.bin",
    "open_clip_model.safetensors",
}


def weights_label(model: str) -> str:
    """A model id or weights path as the code version counts it: its last part, with the
    folder above when that part is a name every model's weights share (`.../minilm/model`)."""
    path = PurePath(model)
    if path.name.lower() in _GENERIC_WEIGHT_NAMES and path.parent.name:
        return f"{path.parent.name}/{path.name}"
    return path.name
