"""Plain shared code: no Dagster imports (storage layout, atomic writes, checks, progress)."""
