"""Dagster resources: devices, models, index, storage and catalog, built per profile."""

from resources.profiles import PROFILE_NAMES, SOURCES, build_resources, profile_from_env

__all__ = ["PROFILE_NAMES", "SOURCES", "build_resources", "profile_from_env"]
