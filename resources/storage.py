"""Storage and lineage catalog resources: the data root and the DuckDB catalog inside it."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import dagster as dg
from pydantic import Field, field_validator

from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog

# Option names that carry secrets (`key`, `secret`, `token`, `account_key`, `password`, ...):
# credentials come from the filesystem's own environment lookup (AWS_ACCESS_KEY_ID,
# GOOGLE_APPLICATION_CREDENTIALS, a pod's service account), never from run config, which
# Dagster stores and shows in its UI.
_SECRET_OPTION = re.compile(
    r"(secret|token|password|credential|access_key|(^|_)key$)", re.IGNORECASE
)


def _secret_option_names(options: Mapping[str, Any], prefix: str = "") -> list[str]:
    """Names of options, nested ones (`client_kwargs.aws_access_key_id`) included, that look
    like credentials."""
    found = []
    for name, value in options.items():
        if _SECRET_OPTION.search(str(name)):
            found.append(f"{prefix}{name}")
        if isinstance(value, Mapping):
            found += _secret_option_names(value, f"{prefix}{name}.")
    return found


class StorageResource(dg.ConfigurableResource):
    """The data root (`$MEGAPAIRS_HOME`); every path under it comes from `DataLayout`.

    `data_root` moves the tables (`data/`) elsewhere: a shared folder or an fsspec URL such as
    `s3://bucket/prefix`; the models, the lineage catalog file and the Dagster instance stay
    under `home`. `endpoint_url` (an S3-compatible server: MinIO, Ceph, a test server) and
    `storage_options` (other settings of the URL's fsspec filesystem) never hold credentials.
    """

    home: str
    profile: str = "demo"
    data_root: str | None = Field(
        default=None,
        description="Where tables live when not under home: a folder, or s3://bucket/prefix "
        "(any fsspec URL)",
    )
    endpoint_url: str | None = Field(
        default=None, description="Object store endpoint, for S3-compatible servers"
    )
    storage_options: dict[str, Any] = Field(
        default_factory=dict,
        description="Extra fsspec filesystem settings for data_root (no credentials)",
    )

    @field_validator("storage_options")
    @classmethod
    def _no_credentials(cls, options: dict[str, Any]) -> dict[str, Any]:
        secret = sorted(_secret_option_names(options))
        if secret:
            raise ValueError(
                f"storage_options {secret} look like credentials: set them in the environment "
                "(AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, GOOGLE_APPLICATION_CREDENTIALS, ...) "
                "so they never land in run config"
            )
        return options

    def filesystem_options(self) -> dict[str, Any]:
        """The fsspec options of `data_root` (the endpoint included)."""
        options = dict(self.storage_options)
        if self.endpoint_url:
            options["endpoint_url"] = self.endpoint_url
        return options

    def layout(self) -> DataLayout:
        return DataLayout(
            Path(self.home), data_root=self.data_root, storage_options=self.filesystem_options()
        )


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
