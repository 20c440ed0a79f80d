"""Storage and lineage catalog resources: the data root and the DuckDB catalog inside it."""

from __future__ import annotations

from pathlib import Path

import dagster as dg

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog


class StorageResource(dg.ConfigurableResource):
    """The data root (`$MEGAPAIRS_HOME`); every path under it comes from `DataLayout`."""

    home: str
    profile: str = "demo"

    def layout(self) -> DataLayout:
        return DataLayout(Path(self.home))


class LineageCatalogResource(dg.ConfigurableResource):
    """The DuckDB lineage catalog (default `$MEGAPAIRS_HOME/catalog.duckdb`)."""

    path: str
    lock_timeout_s: float = 300.0

    def catalog(self) -> LineageCatalog:
        return LineageCatalog(Path(self.path), lock_timeout_s=self.lock_timeout_s)
