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
    """The lineage catalog: a DuckDB file (default `$MEGAPAIRS_HOME/catalog.duckdb`), or a
    DuckLake URL (`ducklake:postgres:...`) with the `data_path` its Parquet files go to."""

    path: str
    lock_timeout_s: float = 300.0
    data_path: str | None = None

    def catalog(self) -> LineageCatalog:
        return LineageCatalog(
            self.path, lock_timeout_s=self.lock_timeout_s, data_path=self.data_path
        )
