"""Pair-mining settings (method.md §3)."""

from __future__ import annotations

import dagster as dg
from pydantic import Field

from megapairs_assets.mining.pairs import MiningParams


class MiningResource(dg.ConfigurableResource):
    """Similarity bands per source, targets per query per source, hard negatives, seed.

    `bands` maps each similarity source (clip_image, dino_image, caption_text) to
    [low, high]: a neighbour becomes a target only if low < score < high. The paper's band is
    (0.8, 0.96); whether it applies to every source is open, so each source has its own.
    `hard_negatives` counts the query image itself, which is always first.
    """

    bands: dict[str, list[float]] = Field(description="source -> [low, high], both exclusive")
    targets_per_source: int = 3
    hard_negatives: int = 5
    seed: int = 0
    query_fraction: float = 1.0

    def params(self) -> MiningParams:
        for source, band in self.bands.items():
            if len(band) != 2:
                raise ValueError(f"band for {source!r} must be [low, high], got {band}")
        return MiningParams(
            bands={source: (band[0], band[1]) for source, band in self.bands.items()},
            targets_per_source=self.targets_per_source,
            hard_negatives=self.hard_negatives,
            seed=self.seed,
            query_fraction=self.query_fraction,
        )

    def setup_for_execution(self, context: dg.InitResourceContext) -> None:
        # Fails before any work on a malformed band (MiningParams validates too, when mining).
        self.params()
