"""Where the image corpus comes from and which images are accepted."""

from __future__ import annotations

from typing import Literal

import dagster as dg
from pydantic import Field

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.sources import SourceSpec, list_shards


class CorpusSourceResource(dg.ConfigurableResource):
    """The corpus: img2dataset webdataset shards, a folder of images, or a manifest.

    A shard is the unit of partitioning, retry and backfill (see megapairs_assets.corpus.sources).
    """

    kind: Literal["webdataset", "folder", "manifest"] = Field(
        description="webdataset: folder of *.tar shards; folder: one subfolder per shard; "
        "manifest: parquet/jsonl with path|url, caption[, key][, shard]"
    )
    path: str = Field(description="The tar folder, image folder or manifest file")
    shard_size: int = Field(
        default=1000, description="Manifest rows per shard without a shard column"
    )
    min_side_px: int = Field(default=16, description="Smaller images are quarantined (too_small)")
    max_pixels: int = Field(
        default=178_956_970, description="Larger images are quarantined before decoding (too_large)"
    )
    max_caption_chars: int = Field(default=1000, description="Longer captions are truncated")
    max_aspect_ratio: float | None = Field(
        default=20.0,
        description="Longer/shorter side above this is quarantined from the header "
        "(extreme_aspect_ratio); None turns the bound off",
    )
    only_shards: list[str] | None = Field(
        default=None,
        description="Restrict the corpus to these shards (a fixed sample, e.g. for CI checks); "
        "None = every shard the source lists",
    )

    def spec(self) -> SourceSpec:
        return SourceSpec(kind=self.kind, path=self.path, shard_size=self.shard_size)

    def shard_ids(self) -> list[str]:
        """The corpus: the source's current shards (restricted to `only_shards` if set)."""
        shards = list_shards(self.spec())
        if self.only_shards is None:
            return shards
        wanted = set(self.only_shards)
        return [shard for shard in shards if shard in wanted]

    def limits(self) -> ImageLimits:
        return ImageLimits(
            min_side_px=self.min_side_px,
            max_pixels=self.max_pixels,
            max_caption_chars=self.max_caption_chars,
            max_aspect_ratio=self.max_aspect_ratio,
        )
