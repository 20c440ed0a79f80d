"""Mining (query image, target image) pairs with hard negatives from heterogeneous KNN tables.

This is the paper's step 3 (docs/method.md §3): every similarity source proposes neighbours of a
query; a neighbour becomes a target only when its score sits strictly inside the source's band
(too low = unrelated, too high = near duplicate). Targets found by several sources are merged
into one pair. Each pair's hard negatives are the query image itself (always first: without it
a retriever learns to return the query) followed by other targets of the same query.

Choices the paper leaves open, and what we do:
- The band is per source (`MiningParams.bands`); the paper's (0.8, 0.96) is `PAPER_BAND`.
- Each source contributes its `targets_per_source` best in-band neighbours per query.
- A query's negative pool is the set of its own targets (all sources, deduplicated), i.e. the
  paper's "target_j, j != i". It is shuffled per query by a keyed hash, so a pair's negatives
  are reproducible from (seed, query id, candidate id) alone, whatever the partitioning.
- Queries are subsampled by a keyed hash of their id (`query_fraction`), again per id.
- Exact copies: given each image's content hash (sha256 of its file bytes), an image is never
  a target of a query with the same bytes, whichever source found it, and never a hard negative
  of a pair whose query or target has its bytes. A copy is dropped before the per-source cut,
  like the query itself, so the query keeps its best *other* neighbours. Queries and pairs with
  no copy among their candidates come out exactly as without hashes.

Hashes come from hashlib.blake2b (stable across library versions and machines); polars' own
hash is not promised to be stable, so nothing persisted depends on it.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import numpy as np
import polars as pl
import pyarrow as pa

from megapairs_assets.lib.quality import CheckOutcome, outcome

DEFAULT_SOURCES: tuple[str, ...] = ("clip_image", "dino_image", "caption_text")
PAPER_BAND: tuple[float, float] = (0.8, 0.96)

_PAIR_ID_SEPARATOR = "\x1f"
_U64_MASK = (1 << 64) - 1
# Distinct salts keep the query sample and the negative order statistically independent
# even though both are keyed by the same seed and query id.
_SAMPLE_SALT = np.uint64(0x5EED_5A4D_1E00_0001)
_NEGATIVE_SALT = np.uint64(0x5EED_4E60_0000_0002)


@dataclass(frozen=True)
class MiningParams:
    """How pairs are mined; validated on construction so a bad config fails before any work.

    `bands` maps each similarity source, in canonical order, to the open interval of scores
    kept as targets. `hard_negatives` counts the query image too, so 5 means the query plus
    up to 4 mined negatives, as in the released MegaPairs data.
    """

    bands: dict[str, tuple[float, float]]
    targets_per_source: int = 3
    hard_negatives: int = 5
    seed: int = 0
    query_fraction: float = 1.0

    def __post_init__(self) -> None:
        for source, (low, high) in self.bands.items():
            if not -1.0 <= low < high <= 1.0:
                raise ValueError(
                    f"band for source {source!r} must satisfy -1 <= low < high <= 1, "
                    f"got ({low}, {high})"
                )
        if self.targets_per_source < 1:
            raise ValueError(f"targets_per_source must be >= 1, got {self.targets_per_source}")
        if self.hard_negatives < 1:
            raise ValueError(
                f"hard_negatives must be >= 1 (the query image), got {self.hard_negatives}"
            )
        if not 0.0 < self.query_fraction <= 1.0:
            raise ValueError(f"query_fraction must be in (0, 1], got {self.query_fraction}")

    @property
    def sources(self) -> tuple[str, ...]:
        """Sources in canonical order (the order of `bands`)."""
        return tuple(self.bands)


def score_column(source: str) -> str:
    """Name of the column holding `source`'s similarity for a pair."""
    return f"score_{source}"


def pairs_schema(sources: Sequence[str]) -> dict[str, pl.DataType]:
    """Column names and dtypes of the mined-pairs table for the given sources, in order."""
    return {
        "pair_id": pl.String(),
        "query_id": pl.String(),
        "target_id": pl.String(),
        "sources": pl.List(pl.String()),
        **{score_column(source): pl.Float32() for source in sources},
        "best_rank": pl.Int16(),
        "hard_negative_ids": pl.List(pl.String()),
    }


PAIRS_SCHEMA: dict[str, pl.DataType] = pairs_schema(DEFAULT_SOURCES)


def pairs_column_descriptions(sources: Sequence[str]) -> dict[str, str]:
    """What each column of the mined-pairs table means (shown beside its schema in the UI)."""
    return {
        "pair_id": "stable id of the (query, target) pair: blake2b of the two image ids",
        "query_id": "image_id of the query image",
        "target_id": "image_id of the target image (a neighbour inside some source's band)",
        "sources": "the similarity sources that proposed this target, in canonical order",
        **{
            score_column(source): f"{source} cosine similarity of query and target; null when "
            f"{source} did not propose the target"
            for source in sources
        },
        "best_rank": "the best 0-based KNN rank of the target among the proposing sources",
        "hard_negative_ids": "the query image first, then other targets of the same query in a "
        "keyed-random order (never the target, never a copy of query or target)",
    }


PAIRS_COLUMN_DESCRIPTIONS = pairs_column_descriptions(DEFAULT_SOURCES)


def pair_id_for(query_id: str, target_id: str) -> str:
    """Stable id of a (query, target) pair: first 16 hex chars of blake2b(query \\x1f target)."""
    payload = f"{query_id}{_PAIR_ID_SEPARATOR}{target_id}".encode()
    return hashlib.blake2b(payload).hexdigest()[:16]


def knn_image_ids(neighbors: Mapping[str, pl.DataFrame]) -> list[str]:
    """Every query and neighbour id of the KNN tables, sorted: the ids to look hashes up for."""
    columns = [
        frame[column].cast(pl.String)
        for frame in neighbors.values()
        for column in ("query_id", "neighbor_id")
    ]
    if not columns:
        return []
    return pl.concat(columns).unique().sort().to_list()


def keep_current_images(
    neighbors: Mapping[str, pl.DataFrame], current_ids: set[str]
) -> tuple[dict[str, pl.DataFrame], int]:
    """The KNN rows whose query and neighbour are both images of the current corpus, and how
    many rows were dropped.

    A graph built before a shard was retired (or before a shard's corpus table was rebuilt with
    fewer images) still lists images that are gone; mining them would make pairs nobody can
    trace or load. Dropping them keeps the rest of the graph usable until it is rebuilt.
    """
    allowed = pl.Series(sorted(current_ids), dtype=pl.String).implode()
    kept: dict[str, pl.DataFrame] = {}
    dropped = 0
    for source, frame in neighbors.items():
        inside = frame.filter(
            pl.col("query_id").cast(pl.String).is_in(allowed)
            & pl.col("neighbor_id").cast(pl.String).is_in(allowed)
        )
        dropped += frame.height - inside.height
        kept[source] = inside
    return kept, dropped


def mine_pairs(
    neighbors: Mapping[str, pl.DataFrame],
    params: MiningParams,
    content_hashes: pl.DataFrame | None = None,
) -> pl.DataFrame:
    """Turn per-source KNN tables into deduplicated pairs with hard negatives.

    `neighbors` maps a source name to a long KNN frame (query_id, rank, neighbor_id, score).
    A source named in `params.bands` but absent here contributes nothing; a source here but
    absent from the bands is an error, because silently ignoring a whole model is worse.
    `content_hashes` (image_id, content_hash), for the ids of `knn_image_ids(neighbors)`, keeps
    byte-identical images apart: a copy of the query is never a target, and a pair's negatives
    never have its query's or its target's bytes. Ids without a hash count as unique.
    Output follows `pairs_schema(params.sources)`, sorted by (query_id, target_id); it is
    identical for any row order of the inputs and any split of the queries across calls.
    """
    unknown = sorted(set(neighbors) - set(params.bands))
    if unknown:
        raise ValueError(f"sources {unknown} have KNN tables but no band in MiningParams.bands")
    copies = _copies(content_hashes)
    if params.query_fraction < 1.0:
        # Sampled before the band filter, so unsampled queries cost no work at all. The sample
        # is per id (a keyed hash), so a query's pairs are the same as without sampling.
        neighbors = _sampled_queries(neighbors, params)

    per_source_targets = [
        _best_in_band_targets(neighbors[source], index, params.bands[source], params, copies)
        for index, source in enumerate(params.sources)
        if source in neighbors and neighbors[source].height > 0
    ]
    if not per_source_targets:
        return _empty_pairs(params.sources)
    # The in-memory engine ran the windowed top-k about twice as fast as the streaming one
    # (polars 2.1), and one partition's KNN tables fit in memory by construction.
    targets = pl.concat(per_source_targets).collect(engine="in-memory")
    if targets.height == 0:
        return _empty_pairs(params.sources)

    ids = _IdTable.from_targets(targets)
    coded = ids.encode(targets)

    pairs = _merge_sources(coded, params.sources)
    return _with_ids_and_negatives(pairs, ids, params, ids.content_groups(copies))


def _with_ids_and_negatives(
    pairs: pl.DataFrame, ids: _IdTable, params: MiningParams, content_groups: np.ndarray | None
) -> pl.DataFrame:
    """Decode the merged pairs back to string ids and add pair ids and hard negatives."""
    query_codes = pairs["query_code"].to_numpy()
    target_codes = pairs["target_code"].to_numpy()
    negative_offsets, negative_codes = _hard_negative_codes(
        query_codes, target_codes, ids.hashes, params, content_groups
    )
    query_ids = ids.decode(query_codes)
    target_ids = ids.decode(target_codes)
    return pairs.select(
        pl.Series("pair_id", _pair_ids(query_ids, target_ids), dtype=pl.String),
        pl.Series("query_id", query_ids),
        pl.Series("target_id", target_ids),
        "sources",
        *[score_column(source) for source in params.sources],
        "best_rank",
        _list_column("hard_negative_ids", negative_offsets, ids.decode(negative_codes)),
    )


def _empty_pairs(sources: Sequence[str]) -> pl.DataFrame:
    return pl.DataFrame(schema=pairs_schema(sources))


def _band_literals(band: tuple[float, float]) -> tuple[pl.Expr, pl.Expr]:
    # Scores are stored as float32; comparing against float32 bounds makes a score written as
    # exactly 0.8 sit *on* the edge (and be excluded) instead of a hair above it.
    low, high = band
    return pl.lit(low, dtype=pl.Float32), pl.lit(high, dtype=pl.Float32)


def _copies(content_hashes: pl.DataFrame | None) -> pl.DataFrame | None:
    """(image_id, content_hash) of the ids whose bytes another id shares; None when none do."""
    if content_hashes is None:
        return None
    missing = {"image_id", "content_hash"} - set(content_hashes.columns)
    if missing:
        raise ValueError(f"content_hashes lacks columns {sorted(missing)}")
    known = (
        content_hashes.select(
            pl.col("image_id").cast(pl.String), pl.col("content_hash").cast(pl.String)
        )
        .drop_nulls()
        .unique()
    )
    conflicting = known.filter(pl.col("image_id").is_duplicated())["image_id"].unique().sort()
    if conflicting.len():
        raise ValueError(
            f"content_hashes gives several hashes for ids {conflicting.head(5).to_list()}"
        )
    copies = known.filter(pl.col("content_hash").is_duplicated()).sort("image_id")
    return copies if copies.height else None


def _copy_pairs(copies: pl.DataFrame) -> pl.LazyFrame:
    """Every ordered (query_id, target_id) of two different ids with the same bytes."""
    return (
        copies.lazy()
        .join(copies.lazy(), on="content_hash", suffix="_other")
        .filter(pl.col("image_id") != pl.col("image_id_other"))
        .select(pl.col("image_id").alias("query_id"), pl.col("image_id_other").alias("target_id"))
    )


def _best_in_band_targets(
    knn: pl.DataFrame,
    source_index: int,
    band: tuple[float, float],
    params: MiningParams,
    copies: pl.DataFrame | None = None,
) -> pl.LazyFrame:
    """One source's in-band neighbours other than the query and its copies, best few per query."""
    low, high = _band_literals(band)
    in_band = (
        knn.lazy()
        .select(
            pl.col("query_id").cast(pl.String),
            pl.col("neighbor_id").cast(pl.String).alias("target_id"),
            pl.col("score").cast(pl.Float32),
            pl.col("rank").cast(pl.Int16),
        )
        .filter((pl.col("score") > low) & (pl.col("score") < high))
        .filter(pl.col("query_id") != pl.col("target_id"))
    )
    if copies is not None:
        # The copy table is tiny (only ids whose bytes repeat), so this anti join is cheap.
        in_band = in_band.join(_copy_pairs(copies), on=["query_id", "target_id"], how="anti")
    # Sorting on every key (not trusting input order) is what makes ties and shuffled
    # inputs resolve identically; the dedup guards against a KNN table listing a pair twice.
    return (
        in_band.sort(
            "query_id",
            "score",
            "rank",
            "target_id",
            descending=[False, True, False, False],
        )
        .filter(pl.col("target_id").is_first_distinct().over("query_id"))
        .filter(pl.int_range(pl.len()).over("query_id") < params.targets_per_source)
        .with_columns(pl.lit(source_index, dtype=pl.UInt8).alias("source_index"))
    )


def _sampled_queries(
    neighbors: Mapping[str, pl.DataFrame], params: MiningParams
) -> dict[str, pl.DataFrame]:
    """Each KNN table cut to the queries in the `query_fraction` sample."""
    frames = [frame["query_id"] for frame in neighbors.values() if frame.height]
    if not frames:
        return dict(neighbors)
    queries = pl.concat(frames).unique()
    keys = _mix64(_seed_word(params.seed, _SAMPLE_SALT) ^ _stable_id_hashes(queries))
    unit_interval = (keys >> np.uint64(11)).astype(np.float64) * 2.0**-53
    kept = queries.filter(pl.Series(unit_interval < params.query_fraction)).implode()
    return {
        source: frame.filter(pl.col("query_id").is_in(kept)) for source, frame in neighbors.items()
    }


def _stable_id_hashes(ids: pl.Series) -> np.ndarray:
    """64-bit blake2b of each id; call on unique ids only, it is a Python-level loop."""
    digests = b"".join(
        hashlib.blake2b(identifier.encode(), digest_size=8).digest() for identifier in ids.to_list()
    )
    return np.frombuffer(digests, dtype="<u8").astype(np.uint64)


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64 finaliser: spreads every input bit over the whole word."""
    with np.errstate(over="ignore"):
        mixed = values + np.uint64(0x9E3779B97F4A7C15)
        mixed = (mixed ^ (mixed >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        mixed = (mixed ^ (mixed >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return mixed ^ (mixed >> np.uint64(31))


def _seed_word(seed: int, salt: np.uint64) -> np.uint64:
    return _mix64(np.array([seed & _U64_MASK], dtype=np.uint64) ^ salt)[0]


@dataclass(frozen=True)
class _IdTable:
    """Every id of a mining run, sorted, so that an id's code (its index) orders like the id.

    Working on integer codes instead of strings makes the merge, the sorts and the negative
    selection cheap; each unique id is hashed with blake2b exactly once.
    """

    ids: pl.Series
    hashes: np.ndarray

    @classmethod
    def from_targets(cls, targets: pl.DataFrame) -> _IdTable:
        unique_ids = pl.concat([targets["query_id"], targets["target_id"]]).unique().sort()
        return cls(ids=unique_ids, hashes=_stable_id_hashes(unique_ids))

    def encode(self, targets: pl.DataFrame) -> pl.DataFrame:
        """Replace query_id/target_id by their codes."""
        return targets.select(
            self.ids.search_sorted(targets["query_id"]).cast(pl.UInt32).alias("query_code"),
            self.ids.search_sorted(targets["target_id"]).cast(pl.UInt32).alias("target_code"),
            "source_index",
            "score",
            "rank",
        )

    def decode(self, codes: np.ndarray) -> pl.Series:
        return self.ids.gather(codes)

    def content_groups(self, copies: pl.DataFrame | None) -> np.ndarray | None:
        """Per code: a label shared exactly by codes with the same bytes; None if all differ.

        A code's label is its own code unless its bytes repeat among these ids, in which case
        it is the smallest code with those bytes.
        """
        if copies is None:
            return None
        present = copies.filter(pl.col("image_id").is_in(self.ids.implode()))
        if present.height == 0:
            return None
        codes = self.ids.search_sorted(present["image_id"]).cast(pl.Int64)
        groups = present.select("content_hash", codes.alias("code")).with_columns(
            pl.col("code").min().over("content_hash").alias("group")
        )
        labels = np.arange(self.ids.len(), dtype=np.int64)
        labels[groups["code"].to_numpy()] = groups["group"].to_numpy()
        return labels


def _merge_sources(coded: pl.DataFrame, sources: Sequence[str]) -> pl.DataFrame:
    """One row per (query, target), sorted: each source's score (null if missed), best rank."""
    pair_keys = (coded["query_code"].to_numpy().astype(np.uint64) << np.uint64(32)) | coded[
        "target_code"
    ].to_numpy().astype(np.uint64)
    unique_keys, pair_of_row = np.unique(pair_keys, return_inverse=True)
    source_of_row = coded["source_index"].to_numpy()
    score_of_row = coded["score"].to_numpy()
    rank_of_row = coded["rank"].to_numpy()

    scores = np.full((len(sources), len(unique_keys)), np.nan, dtype=np.float32)
    best_rank = np.full(len(unique_keys), np.iinfo(np.int16).max, dtype=np.int16)
    # Each source lists a pair at most once (deduplicated upstream), so plain fancy
    # assignment per source is safe; the loop is over sources, not rows.
    for source_index in range(len(sources)):
        from_source = source_of_row == source_index
        pair_rows = pair_of_row[from_source]
        scores[source_index, pair_rows] = score_of_row[from_source]
        best_rank[pair_rows] = np.minimum(best_rank[pair_rows], rank_of_row[from_source])

    found = ~np.isnan(scores.T)
    source_offsets = np.r_[0, np.cumsum(found.sum(axis=1))].astype(np.int64)
    source_names = pl.Series(list(sources), dtype=pl.String)
    found_source_indices = np.broadcast_to(np.arange(len(sources)), found.shape)[found]
    return pl.DataFrame(
        [
            pl.Series("query_code", (unique_keys >> np.uint64(32)).astype(np.uint32)),
            pl.Series("target_code", (unique_keys & np.uint64(0xFFFFFFFF)).astype(np.uint32)),
            _list_column("sources", source_offsets, source_names.gather(found_source_indices)),
            *[
                pl.Series(score_column(name), scores[index]).fill_nan(None)
                for index, name in enumerate(sources)
            ],
            pl.Series("best_rank", best_rank, dtype=pl.Int16),
        ]
    )


def _hard_negative_codes(
    query_codes: np.ndarray,
    target_codes: np.ndarray,
    id_hashes: np.ndarray,
    params: MiningParams,
    content_groups: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per pair: the query, then the first other targets of its query in keyed-hash order.

    Rows must be sorted by (query, target). Returns list offsets and the flat codes, ready
    to become a list column. A query's pool is its own targets; each pair skips itself and,
    given `content_groups`, every pool entry with the same bytes as its target.
    """
    row_count = len(query_codes)
    query_keys = _mix64(_seed_word(params.seed, _NEGATIVE_SALT) ^ id_hashes[query_codes])
    negative_keys = _mix64(query_keys ^ id_hashes[target_codes])
    # lexsort is stable, so equal keys (a 64-bit hash collision) fall back to target order.
    pool_order = np.lexsort((negative_keys, query_codes))

    starts_query = np.r_[True, query_codes[1:] != query_codes[:-1]]
    group_starts = np.flatnonzero(starts_query)
    group_of_row = np.cumsum(starts_query) - 1
    pool_start = group_starts[group_of_row]
    pool_size = np.diff(np.r_[group_starts, row_count])[group_of_row]
    pool_position = np.empty(row_count, dtype=np.int64)
    pool_position[pool_order] = np.arange(row_count)
    pool_position -= pool_start

    # Slot j of a pair's mined negatives is pool entry j, or j + 1 once past its own target.
    slots = np.arange(params.hard_negatives - 1)[None, :]
    pool_index = slots + (slots >= pool_position[:, None])
    is_present = pool_index < pool_size[:, None]
    pool_rows = pool_order[pool_start[:, None] + np.minimum(pool_index, pool_size[:, None] - 1)]

    codes = np.hstack([query_codes[:, None], target_codes[pool_rows]])
    keep = np.hstack([np.ones((row_count, 1), dtype=bool), is_present])
    if content_groups is not None:
        pool = (pool_order, pool_start, pool_size)
        _skip_copies_of_targets(codes, keep, query_codes, target_codes, pool, content_groups)
    offsets = np.r_[0, np.cumsum(keep.sum(axis=1))].astype(np.int64)
    return offsets, codes[keep]


def _skip_copies_of_targets(
    codes: np.ndarray,
    keep: np.ndarray,
    query_codes: np.ndarray,
    target_codes: np.ndarray,
    pool: tuple[np.ndarray, np.ndarray, np.ndarray],
    content_groups: np.ndarray,
) -> None:
    """Redo, in place, the negatives of pairs whose pool holds a copy of their target.

    Only pairs sharing (query, bytes of the target) with another pair are touched: there the
    pool is walked in the same keyed order, leaving out every entry with the target's bytes.
    Such pairs are rare (exact copies among one query's targets), hence the plain loop.
    `pool` is (pool_order, pool_start, pool_size) as built by `_hard_negative_codes`.
    """
    pool_order, pool_start, pool_size = pool
    target_groups = content_groups[target_codes]
    keys = (query_codes.astype(np.uint64) << np.uint64(32)) | target_groups.astype(np.uint64)
    _, key_of_row, key_counts = np.unique(keys, return_inverse=True, return_counts=True)
    slot_count = codes.shape[1] - 1
    for row in np.flatnonzero(key_counts[key_of_row] > 1):
        start = pool_start[row]
        candidates = target_codes[pool_order[start : start + pool_size[row]]]
        chosen = candidates[content_groups[candidates] != target_groups[row]][:slot_count]
        codes[row, 1 : 1 + len(chosen)] = chosen
        keep[row, 1:] = np.arange(slot_count) < len(chosen)


def _list_column(name: str, offsets: np.ndarray, values: pl.Series) -> pl.Series:
    """Build a list column from flat values and row offsets without a per-row loop."""
    lists = pa.LargeListArray.from_arrays(pa.array(offsets, type=pa.int64()), values.to_arrow())
    return pl.Series(name, lists)


def _pair_ids(query_ids: pl.Series, target_ids: pl.Series) -> list[str]:
    """`pair_id_for` over many pairs, hashing the joined strings built by polars."""
    joined = query_ids + _PAIR_ID_SEPARATOR + target_ids
    return [hashlib.blake2b(payload.encode()).hexdigest()[:16] for payload in joined.to_list()]


IDENTICAL_CONTENT_CHECK = "no_identical_content_pairs"
IDENTICAL_CONTENT_CHECK_DESCRIPTION = (
    "No pair's target or mined hard negative has the same bytes (content hash) as its query, "
    "no negative has its target's bytes, and every image of a pair has a known hash"
)


def check_pairs(
    pairs: pl.DataFrame, params: MiningParams, content_hashes: pl.DataFrame | None = None
) -> list[CheckOutcome]:
    """Validate a mined-pairs table; each outcome lists a few offending `query->target` rows.

    Given `content_hashes` (image_id, content_hash), also runs `check_no_identical_content`.
    """
    labelled = _labelled(pairs)
    return [
        _check_in_band(labelled, params),
        _check_rows(
            labelled,
            "negatives_start_with_query",
            (pl.col("hard_negative_ids").list.first() != pl.col("query_id")).fill_null(True),
            "hard_negative_ids[0] is the query image",
        ),
        _check_rows(
            labelled,
            "target_not_in_negatives",
            pl.col("hard_negative_ids").list.contains(pl.col("target_id")).fill_null(False),
            "a pair's target never appears among its hard negatives",
        ),
        _check_no_duplicates(labelled),
        _check_rows(
            labelled,
            "no_self_pairs",
            pl.col("query_id") == pl.col("target_id"),
            "target differs from query",
        ),
        *([] if content_hashes is None else [check_no_identical_content(pairs, content_hashes)]),
    ]


def check_no_identical_content(pairs: pl.DataFrame, content_hashes: pl.DataFrame) -> CheckOutcome:
    """Fail every pair holding two copies of the same bytes where they must differ.

    Compared: query with target, query with each mined negative (the query image itself, first
    in the list, is not mined), target with each negative. An id missing from `content_hashes`
    fails too: a pair that cannot be verified must not pass a blocking check.
    """
    hashes = content_hashes.select(
        pl.col("image_id").cast(pl.String), pl.col("content_hash").cast(pl.String)
    ).unique(subset="image_id", keep="first")
    involved = pl.concat(
        [pairs["query_id"], pairs["target_id"], pairs["hard_negative_ids"].explode()]
    ).drop_nulls()
    # Only a pair holding an id whose bytes repeat, or an id with no hash, can fail; looking at
    # those alone keeps the check cheap on a large table.
    suspects = pl.concat(
        [
            hashes.filter(pl.col("content_hash").is_duplicated())["image_id"],
            involved.filter(~involved.is_in(hashes["image_id"].implode())),
        ]
    ).implode()
    labelled = _labelled(pairs).filter(
        pl.col("query_id").is_in(suspects)
        | pl.col("target_id").is_in(suspects)
        | pl.col("hard_negative_ids").list.eval(pl.element().is_in(suspects)).list.any()
    )
    mined = (
        labelled.select(
            "_label", "query_id", "target_id", pl.col("hard_negative_ids").list.slice(1)
        )
        .explode("hard_negative_ids")
        .drop_nulls("hard_negative_ids")
    )
    negative = pl.col("hard_negative_ids")
    comparisons = pl.concat(
        [
            _comparison(labelled, "query_id", "target_id", pl.lit("target has the query's bytes")),
            _comparison(
                mined,
                "query_id",
                "hard_negative_ids",
                pl.format("negative {} has the query's bytes", negative),
            ),
            _comparison(
                mined,
                "target_id",
                "hard_negative_ids",
                pl.format("negative {} has the target's bytes", negative),
            ),
        ]
    )
    compared = comparisons.join(
        hashes.rename({"image_id": "a", "content_hash": "hash_a"}), on="a", how="left"
    ).join(hashes.rename({"image_id": "b", "content_hash": "hash_b"}), on="b", how="left")
    unknown = pl.when(pl.col("hash_a").is_null()).then(pl.col("a")).otherwise(pl.col("b"))
    problems = (
        compared.filter(
            pl.col("hash_a").is_null()
            | pl.col("hash_b").is_null()
            | (pl.col("hash_a") == pl.col("hash_b"))
        )
        .with_columns(
            pl.when(pl.col("hash_a").is_null() | pl.col("hash_b").is_null())
            .then(pl.format("no content hash for {}", unknown))
            .otherwise(pl.col("what"))
            .alias("what")
        )
        .unique(subset=["_label", "what"])
        .sort("_label", "what")
        .group_by("_label", maintain_order=True)
        .agg(pl.col("what").str.join("; "))
    )
    failing = [f"{label}: {what}" for label, what in problems.iter_rows()]
    return outcome(IDENTICAL_CONTENT_CHECK, failing, IDENTICAL_CONTENT_CHECK_DESCRIPTION)


def _comparison(frame: pl.DataFrame, left: str, right: str, what: pl.Expr) -> pl.DataFrame:
    """Rows (_label, a, b, what): two ids of a pair that must not share bytes, and why."""
    return frame.select(
        "_label", pl.col(left).alias("a"), pl.col(right).alias("b"), what.alias("what")
    )


def _labelled(pairs: pl.DataFrame) -> pl.DataFrame:
    return pairs.with_columns(
        (pl.col("query_id") + pl.lit("->") + pl.col("target_id")).alias("_label")
    )


def _failing_labels(labelled: pl.DataFrame, is_bad: pl.Expr) -> list[str]:
    return labelled.filter(is_bad)["_label"].to_list()


def _check_rows(labelled: pl.DataFrame, name: str, is_bad: pl.Expr, what: str) -> CheckOutcome:
    return outcome(name, _failing_labels(labelled, is_bad), what)


def _check_in_band(labelled: pl.DataFrame, params: MiningParams) -> CheckOutcome:
    missing = [s for s in params.sources if score_column(s) not in labelled.columns]
    if missing:
        return outcome(
            "pairs_in_band",
            [f"missing column {score_column(s)}" for s in missing],
            "every source has a score column",
        )
    out_of_band = pl.lit(False)
    for source, band in params.bands.items():
        low, high = _band_literals(band)
        score = pl.col(score_column(source)).cast(pl.Float32)
        outside = score.is_not_null() & ~((score > low) & (score < high))
        out_of_band = out_of_band | outside
    return _check_rows(
        labelled, "pairs_in_band", out_of_band, "every non-null score lies strictly in its band"
    )


def _check_no_duplicates(labelled: pl.DataFrame) -> CheckOutcome:
    duplicated = (
        pl.struct("query_id", "target_id").is_duplicated() | pl.col("pair_id").is_duplicated()
    )
    return _check_rows(
        labelled, "no_duplicate_pairs", duplicated, "(query_id, target_id) and pair_id are unique"
    )


def band_positions(neighbors: Mapping[str, pl.DataFrame], params: MiningParams) -> pl.DataFrame:
    """Per source of `params`: its KNN neighbours (the query itself left out) that scored below,
    inside and above its band.

    Why a source found few or no pairs: a corpus whose captions repeat fills a query's k
    caption neighbours with exact copies of its caption (cosine 1, above any band), so that
    source yields nothing however large the corpus grows.
    """
    rows = []
    for source in params.sources:
        knn = neighbors.get(source)
        low, high = _band_literals(params.bands[source])
        counts = {"below": 0, "inside": 0, "above": 0}
        if knn is not None and knn.height:
            score = pl.col("score").cast(pl.Float32)
            counts = (
                knn.lazy()
                .filter(pl.col("query_id").cast(pl.String) != pl.col("neighbor_id").cast(pl.String))
                .select(
                    (score <= low).sum().alias("below"),
                    ((score > low) & (score < high)).sum().alias("inside"),
                    (score >= high).sum().alias("above"),
                )
                .collect()
                .row(0, named=True)
            )
        rows.append(
            {
                "source": source,
                "band": f"({params.bands[source][0]}, {params.bands[source][1]})",
                "neighbours": sum(counts.values()),
                **{name: int(count) for name, count in counts.items()},
            }
        )
    return pl.DataFrame(
        rows,
        schema={
            "source": pl.String,
            "band": pl.String,
            "neighbours": pl.Int64,
            "below": pl.Int64,
            "inside": pl.Int64,
            "above": pl.Int64,
        },
    )


def empty_source_notes(positions: pl.DataFrame, pairs: pl.DataFrame) -> list[str]:
    """One sentence per source that had neighbours but gave no pair, saying where its scores
    fell; empty when every source with neighbours gave pairs."""
    notes = []
    for row in positions.iter_rows(named=True):
        column = score_column(row["source"])
        found = pairs.height - pairs[column].null_count() if column in pairs.columns else 0
        if found or not row["neighbours"]:
            continue
        hint = (
            "near or exact duplicates (e.g. repeated captions) fill its k nearest; a larger "
            "KNN k reaches the neighbours past them"
            if row["above"] >= row["below"]
            else "its scores run lower than the band: check the band against the score "
            "percentiles of its KNN graph"
        )
        notes.append(
            f"{row['source']} gave no pairs: of its {row['neighbours']} neighbours, "
            f"{row['above']} scored at or above its band {row['band']} and {row['below']} at "
            f"or below it; {hint}"
        )
    return notes


def summarize_pairs(pairs: pl.DataFrame, sources: Sequence[str]) -> dict[str, int | float]:
    """Headline numbers for a mined-pairs table (materialization metadata).

    `mean_negatives_per_pair` counts the query image; `mean_mined_negatives_per_pair` does not.
    """
    total = pairs.height
    negatives_per_pair = pairs["hard_negative_ids"].list.len()
    summary: dict[str, int | float] = {
        "pairs": total,
        "queries": pairs["query_id"].n_unique(),
    }
    for source in sources:
        column = score_column(source)
        found = total - pairs[column].null_count() if column in pairs.columns else 0
        summary[f"pairs_from_{source}"] = int(found)
    summary["pairs_from_2plus_sources"] = int((pairs["sources"].list.len() >= 2).sum())
    mean_negatives = float(negatives_per_pair.mean()) if total else 0.0
    summary["mean_negatives_per_pair"] = mean_negatives
    summary["mean_mined_negatives_per_pair"] = max(mean_negatives - 1.0, 0.0) if total else 0.0
    return summary
