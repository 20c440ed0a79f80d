"""Dagster resources: devices, models, index, storage and catalog, built per profile.

Import what you need from its module (`resources.profiles`, `resources.environment`, ...):
this package imports nothing itself, so light commands do not load the model code.
"""
