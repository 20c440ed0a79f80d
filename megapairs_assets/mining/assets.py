"""Dagster wiring of the mined image pairs (method.md §3)."""

from typing import Any

import dagster as dg

from megapairs_assets.embeddings.sources import SOURCES
from megapairs_assets.mining.pairs import PAIRS_COLUMN_DESCRIPTIONS
from megapairs_assets.mining.step import ASSET_NAME, PAIR_CHECKS, mine_shard
from megapairs_assets.orchestration.partitions import DOWNSTREAM_AUTOMATION, shard_asset_options
from megapairs_assets.orchestration.settings_version import fields
from megapairs_assets.orchestration.shard_step import Stage, materialize_partitions
from resources.mining import MiningResource
from resources.storage import LineageCatalogResource, StorageResource


def mining_settings(resources: Any) -> dict[str, Any]:
    """Every mining setting decides which pairs are mined (a field added later counts too)."""
    return fields(resources.mining, type(resources.mining).model_fields)


STAGE = Stage(
    ASSET_NAME,
    "mining-v1",
    PAIR_CHECKS,
    settings=mining_settings,
    columns=PAIRS_COLUMN_DESCRIPTIONS,
)


@dg.asset(
    name=ASSET_NAME,
    deps=[source.knn_asset for source in SOURCES],
    kinds={"polars", "parquet"},
    automation_condition=DOWNSTREAM_AUTOMATION,
    check_specs=STAGE.check_specs(),
    **shard_asset_options("pairs", STAGE.code_version),
)
def mined_image_pairs(
    context: dg.AssetExecutionContext,
    mining: MiningResource,
    storage: StorageResource,
    catalog: LineageCatalogResource,
) -> dg.MaterializeResult:
    """(query image, target image) pairs with hard negatives, mined from the three KNN graphs.

    A neighbour is a target when its score lies inside its source's band; a pair found by
    several sources is one row listing them all. Hard negatives are the other targets of the
    same query, the query image itself always first. Deterministic for a seed.
    """
    layout, lineage, params = storage.layout(), catalog.catalog(), mining.params()
    return materialize_partitions(
        context,
        STAGE,
        lambda shard: mine_shard(shard, params, layout, lineage, context.log.info),
        lineage,
        storage.profile,
    )
