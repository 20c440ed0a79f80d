"""One `mmret_clip_checkpoint` partition as plain work: read every triplet shard, then train.

The checkpoint depends on all of the triplets (one model learns from every shard), so the
step reads each complete `triplets` shard with the version it read, turns image ids into the
corpus's image locations (the original files; the triplets' own paths are relative to the
export folder, which training does not need) and hands the rows to `train_on_triplets`.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import polars as pl

from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions
from megapairs_assets.training.config import TrainingConfig, check_config_name, resolve_config
from megapairs_assets.training.data import TripletDataError, read_triplets, resolve_image_paths
from megapairs_assets.training.names import ASSET_NAME, TRIPLETS_ASSET
from megapairs_assets.training.train import train_on_triplets

_ID_COLUMNS = ("query_id", "target_id", "hard_negative_ids")


def train_config(
    config_name: str,
    config: TrainingConfig,
    layout: DataLayout,
    catalog: LineageCatalog,
    *,
    heldout_fraction: float,
    heldout_max_queries: int | None = None,
    image_root: Path | None = None,
    log: Callable[[str], None] | None = None,
) -> StepResult:
    """Train the checkpoint of one named config on every complete triplet shard."""
    check_config_name(config_name)
    resolve_config(config)  # settings fail before any data is read
    triplets, versions = read_triplet_shards(layout, catalog, log)
    image_hashes: dict[str, str] = {}
    if image_root is not None:
        triplets = resolve_image_paths(triplets, image_root)
    elif all(column in triplets.columns for column in _ID_COLUMNS):
        triplets = with_corpus_locations(triplets, catalog)
        image_hashes = corpus_content_hashes(triplets, catalog)
    return train_on_triplets(
        config_name,
        config,
        triplets,
        layout,
        input_versions=versions,
        heldout_fraction=heldout_fraction,
        heldout_max_queries=heldout_max_queries,
        log=log,
        image_hashes=image_hashes,
    )


def read_triplet_shards(
    layout: DataLayout, catalog: LineageCatalog, log: Callable[[str], None] | None = None
) -> tuple[pl.DataFrame, dict[str, str]]:
    """Every current triplets shard that passed its blocking checks (see
    `LineageCatalog.partitions_to_combine`: retired and failing shards are left out) and
    {"triplets/<shard>": materialization id} read."""
    shards, held_back = catalog.partitions_to_combine(TRIPLETS_ASSET)
    for shard, checks in held_back.items():
        if log is not None:
            log(
                f"{TRIPLETS_ASSET}[{shard}] left out: it failed blocking checks ({checks}); "
                "re-materialize it clean to train on it"
            )
    if not shards:
        held = f" ({len(held_back)} held back by failing blocking checks)" if held_back else ""
        raise TripletDataError(
            f"no complete `{TRIPLETS_ASSET}` shard to train {ASSET_NAME} on{held}; materialize "
            "the triplets first"
        )
    paths = [layout.shard_table(TRIPLETS_ASSET, shard) for shard in shards]
    frame, read = read_with_versions(
        catalog, TRIPLETS_ASSET, shards, lambda: read_triplets([p for p in paths if p.is_file()])
    )
    return frame, {f"{TRIPLETS_ASSET}/{shard}": version for shard, version in read.items()}


def with_corpus_locations(triplets: pl.DataFrame, catalog: LineageCatalog) -> pl.DataFrame:
    """q_img / t_img / hns from the image ids, as the corpus's `source_uri`s.

    An id the catalog does not know becomes null: a missing query or target quarantines its
    row with a reason, a missing hard negative is left out (the query image, hns[0], never is
    without the row being quarantined).
    """
    from megapairs_assets.corpus.step import image_uris

    ids = set(triplets["query_id"]) | set(triplets["target_id"])
    ids |= set(triplets["hard_negative_ids"].explode().drop_nulls())
    uris = image_uris(catalog, sorted(i for i in ids if i is not None))
    lookup = pl.DataFrame(
        {"image_id": list(uris), "uri": list(uris.values())},
        schema={"image_id": pl.String, "uri": pl.String},
    )

    def mapped(column: str) -> pl.Expr:
        return pl.col(column).replace_strict(
            lookup["image_id"], lookup["uri"], default=None, return_dtype=pl.String
        )

    return triplets.with_columns(
        mapped("query_id").alias("q_img"),
        mapped("target_id").alias("t_img"),
        pl.col("hard_negative_ids")
        .list.eval(
            pl.element().replace_strict(
                lookup["image_id"], lookup["uri"], default=None, return_dtype=pl.String
            )
        )
        .alias("hns"),
    ).with_columns(
        # A negative the catalog lost is dropped, but a lost query image keeps its null slot
        # so the row fails the hns[0] == q_img rule and is quarantined, not silently changed.
        pl.when(pl.col("hns").list.first().is_null())
        .then(pl.col("hns"))
        .otherwise(pl.col("hns").list.drop_nulls())
        .alias("hns")
    )


def corpus_content_hashes(triplets: pl.DataFrame, catalog: LineageCatalog) -> dict[str, str]:
    """uri -> the corpus's content hash (sha256 of the original bytes) of the triplets' images,
    from the catalog, so the run's fingerprint needs no image read (`training.content`)."""
    from megapairs_assets.corpus.step import content_hashes, image_uris

    ids = set(triplets["query_id"]) | set(triplets["target_id"])
    ids |= set(triplets["hard_negative_ids"].explode().drop_nulls())
    known = sorted(i for i in ids if i is not None)
    uris = image_uris(catalog, known)
    hashes = content_hashes(catalog, known)
    by_id = dict(zip(hashes["image_id"], hashes["content_hash"], strict=True))
    return {uri: by_id[image_id] for image_id, uri in uris.items() if by_id.get(image_id)}
