"""Turn one shard's raw records into the corpus table and the quarantine table.

Every record ends up in exactly one of the two tables. The corpus table holds facts about each
accepted image (never pixels); the quarantine table says, for every rejected item, which rule
it broke, so a person can decide whether to fix the source or accept the loss.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import polars as pl

from megapairs_assets.corpus.images import (
    ImageLimits,
    ImageRejected,
    clean_caption,
    content_hash,
    stable_detail,
    validate_image,
)
from megapairs_assets.corpus.sources import (
    RawRecord,
    ShardReadError,
    SourceListings,
    SourceSpec,
    scan_source,
)
from megapairs_assets.corpus.uris import split_tar_member
from megapairs_assets.lib.progress import ProgressCallback
from megapairs_assets.lib.quality import CheckOutcome, outcome
from megapairs_assets.lib.storage import DataLayout, write_parquet_atomic

CORPUS_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "image_id": "corpus-wide unique, stable id: '<shard>/<key>'",
    "shard": "id of the source shard the image came from",
    "key": "the source's own key for the item (tar member stem, file stem, manifest key)",
    "source_uri": "where the bytes live: a path, or '<tar path>#<member name>'",
    "caption": "cleaned caption; null when the source had none or it was empty",
    "caption_truncated": "true when the caption was cut to the configured maximum length",
    "caption_issue": "null, or why the caption is missing or was decoded by a guess: "
    "'caption_missing: ...' (the source gave none), 'caption_empty: ...' (blank text), "
    "'bad_caption_file: ...' (sidecar not JSON), 'bad_caption_value: ...' (caption not text), "
    "'caption_not_utf8: ...' (decoded as Windows-1252); the image itself is fine",
    "width": "width of the original image in pixels",
    "height": "height of the original image in pixels",
    "original_mode": "PIL colour mode of the original file (RGB, CMYK, I;16, ...)",
    "content_hash": "sha256 hex digest of the original file bytes",
}
CORPUS_SCHEMA = pl.Schema(
    {
        "image_id": pl.String,
        "shard": pl.String,
        "key": pl.String,
        "source_uri": pl.String,
        "caption": pl.String,
        "caption_truncated": pl.Boolean,
        "caption_issue": pl.String,
        "width": pl.Int32,
        "height": pl.Int32,
        "original_mode": pl.String,
        "content_hash": pl.String,
    }
)
"""Accepted images of a shard, one row each, sorted by `image_id`; see the descriptions."""

QUARANTINE_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "shard": f"id of the source shard; {'_source'!r} for entries no shard reads",
    "key": "the item's source key; null when the problem concerns the whole shard or a file",
    "source_uri": "where the item (or the shard, or the unread file) lives",
    "reason": "short code: decode_error, too_small, too_large, extreme_aspect_ratio, "
    "non_finite_pixels, out_of_memory, missing_file, not_a_file, read_error, remote_uri, "
    "missing_image, duplicate_key, duplicate_content, truncated_shard, not_a_tar, "
    "unsupported_member, unsupported_file, unsafe_shard_id, bad_manifest_line, "
    "bad_manifest_value, unreadable_manifest, ...",
    "detail": "human-readable explanation (no memory addresses: reproducible byte for byte)",
}
QUARANTINE_SCHEMA = pl.Schema(
    {
        "shard": pl.String,
        "key": pl.String,
        "source_uri": pl.String,
        "reason": pl.String,
        "detail": pl.String,
    }
)
"""Rejected items of a shard, in source order; see the descriptions."""

SOURCE_REPORT_SHARD = "_source"
"""`shard` of the source report's rows: never a shard id (those start with a letter or digit)."""

# Nullable by design; `caption_issue` is also absent from tables written before it existed.
_OPTIONAL_COLUMNS = ("caption", "caption_issue")
_REQUIRED_COLUMNS = [name for name in CORPUS_SCHEMA if name not in _OPTIONAL_COLUMNS]


def build_shard_table(
    shard_id: str,
    records: Iterable[RawRecord],
    limits: ImageLimits,
    on_progress: ProgressCallback | None = None,
) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Validate every record of one shard; return (images, quarantine) frames.

    Each image is decoded once (JPEGs at reduced scale) to prove it is usable, then its pixels
    are dropped. A key seen
    again after it was accepted is quarantined as `duplicate_key`, identical bytes seen again
    as `duplicate_content`; records the source could not read keep the source's reason code.
    A bad record never raises; only `ShardReadError` from iterating `records` escapes.
    """
    builder = _ShardTableBuilder(shard_id=shard_id, limits=limits)
    for record in records:
        try:
            builder.admit(record)
        except Exception as exc:
            builder.quarantine(record, "unexpected_error", f"{type(exc).__name__}: {exc}")
        if on_progress is not None:
            on_progress(1)
    return builder.frames()


def shard_error_table(shard_id: str, uri: str, error: ShardReadError) -> pl.DataFrame:
    """The single quarantine row for a shard that could not be read at all."""
    row = {"shard": shard_id, "key": None, "source_uri": uri, "reason": error.reason}
    return pl.DataFrame([{**row, "detail": stable_detail(error.detail)}], schema=QUARANTINE_SCHEMA)


def source_report_table(unread: Iterable[RawRecord]) -> pl.DataFrame:
    """The source report: one quarantine-shaped row per entry that no shard reads.

    `unread` is `scan_source(spec).unread`; rows keep its order and carry `shard` =
    SOURCE_REPORT_SHARD, so they can sit beside the shards' rows in the lineage catalog.
    """
    builder = _ShardTableBuilder(shard_id=SOURCE_REPORT_SHARD, limits=ImageLimits())
    for record in unread:
        builder.quarantine(record, *_split_error(record.error or "source_error: not read"))
    return builder.frames()[1]


def write_source_report(
    spec: SourceSpec, layout: DataLayout, listings: SourceListings | None = None
) -> pl.DataFrame:
    """Scan the source and write its report (`layout.corpus_source_report()`) atomically.

    Returns the report: one row per entry no shard reads (see `source_report_table`), empty
    when every entry is read. Idempotent; cheap next to reading a shard (a folder listing, or
    the manifest's shard column). `listings`: the run's shared folder listings, so its shards
    reuse the top folder's listing made here (`SourceListings`).
    """
    report = source_report_table(scan_source(spec, listings).unread)
    write_parquet_atomic(report, layout.corpus_source_report())
    return report


BUNDLED_CORPUS_COMPANIONS: dict[str, str] = {
    "LICENSE-openclipart.txt": "the licence of its images",
    "manifest.jsonl": "where each image came from (not a corpus manifest)",
}
"""Files that sit beside the bundled demo corpus's shards on purpose (file name -> what it is):
the source report still lists them (no shard reads them), but they are no news to a user, so
`unexpected_unread` leaves them out of the warnings and of `megapairs check`'s output."""


def unexpected_unread(report: pl.DataFrame) -> pl.DataFrame:
    """The rows of a source report (`source_report_table`) worth telling a user about: all of
    them, less the bundled demo corpus's own `BUNDLED_CORPUS_COMPANIONS` (matched by their real
    path, however the corpus folder was named)."""
    from megapairs_assets.demo import DEMO_CORPUS_DIR

    if report.is_empty():
        return report
    companions = {str((DEMO_CORPUS_DIR / name).resolve()) for name in BUNDLED_CORPUS_COMPANIONS}
    # Only rows with a companion's file name are resolved (a stat each), however long the report.
    candidates = report.filter(
        (pl.col("reason") == "unsupported_file")
        & pl.col("source_uri").str.split("/").list.last().is_in(list(BUNDLED_CORPUS_COMPANIONS))
    )
    bundled = [uri for uri in candidates["source_uri"] if str(Path(uri).resolve()) in companions]
    return report.filter(~pl.col("source_uri").is_in(bundled)) if bundled else report


def unread_summary(report: pl.DataFrame, first: int = 3) -> str:
    """`N entries of the corpus source are not read by any shard: <detail> (<reason>); ...`,
    naming the first `first` entries with their reasons (and how many more there are), so the
    sentence alone says what was left out."""
    rows = report.head(first).iter_rows(named=True)
    named = "; ".join(f"{row['detail']} ({row['reason']})" for row in rows)
    more = f"; and {report.height - first} more" if report.height > first else ""
    entries = "1 entry" if report.height == 1 else f"{report.height} entries"
    verb = "is" if report.height == 1 else "are"
    return f"{entries} of the corpus source {verb} not read by any shard: {named}{more}"


def check_corpus(
    images: pl.DataFrame, min_side_px: int = ImageLimits().min_side_px
) -> list[CheckOutcome]:
    """Two checks over a corpus table, named as the corpus asset declares them.

    `corpus_ids_unique`: every image_id appears once. `corpus_rows_complete`: every column of
    `CORPUS_SCHEMA` is there (`caption_issue` may be absent from older tables), required values
    are not null, and both sides are at least
    `min_side_px`. Failing examples name the image_id (or the row number when it is null).
    """
    missing = [name for name in CORPUS_SCHEMA if name not in images.columns]
    missing = [name for name in missing if name != "caption_issue"]
    if missing:
        return [
            outcome("corpus_ids_unique", [], "image_id is unique (not checked: columns missing)"),
            outcome(
                "corpus_rows_complete",
                [f"missing column {name}" for name in missing],
                f"columns {', '.join(CORPUS_SCHEMA)} are present",
            ),
        ]
    labelled = images.with_row_index("__row").with_columns(
        pl.coalesce(pl.col("image_id"), pl.format("row {}", pl.col("__row"))).alias("__label")
    )
    duplicated = labelled.filter(pl.col("image_id").is_duplicated())
    incomplete = labelled.filter(
        pl.any_horizontal(pl.col(_REQUIRED_COLUMNS).is_null())
        | (pl.col("width") < min_side_px)
        | (pl.col("height") < min_side_px)
    )
    return [
        outcome("corpus_ids_unique", duplicated["__label"].to_list(), "image_id is unique"),
        outcome(
            "corpus_rows_complete",
            incomplete["__label"].to_list(),
            f"{', '.join(_REQUIRED_COLUMNS)} are filled and both sides are >= {min_side_px} px",
        ),
    ]


# Rows are gathered as Python dicts this many at a time, then moved into a polars frame, which
# holds them in about a tenth of the memory (~0.2 KiB instead of ~2 KiB a row): a shard's
# memory then grows by its compact table and duplicate indexes only, never by its pictures.
_ROWS_PER_CHUNK = 1024


@dataclass
class _RowChunks:
    """Table rows in arrival order: the latest as dicts, the rest as compact frames."""

    schema: pl.Schema
    frames: list[pl.DataFrame] = field(default_factory=list)
    pending: list[dict[str, Any]] = field(default_factory=list)

    def append(self, row: dict[str, Any]) -> None:
        self.pending.append(row)
        if len(self.pending) >= _ROWS_PER_CHUNK:
            self.frames.append(pl.DataFrame(self.pending, schema=self.schema))
            self.pending = []

    def frame(self) -> pl.DataFrame:
        """Every row as one frame, in arrival order (one contiguous chunk, as one
        `pl.DataFrame(rows)` would be, so the Parquet written from it is the same)."""
        last = pl.DataFrame(self.pending, schema=self.schema)
        return pl.concat([*self.frames, last], how="vertical").rechunk()


CAPTION_MISSING = "caption_missing"
CAPTION_EMPTY = "caption_empty"


def _absent_caption_issue(raw_caption: str | None, cleaned: str | None) -> str | None:
    """Why a kept image has no caption when the source reported no problem: it gave none (no
    `.txt`/`.caption` sidecar, no `caption` in the `.json` or manifest row), or the text was
    blank. Both leave `caption` null; the issue tells the user which one happened."""
    if cleaned is not None:
        return None
    if raw_caption is None:
        return f"{CAPTION_MISSING}: the source has no caption for this image"
    return f"{CAPTION_EMPTY}: the caption is empty or only whitespace / control characters"


@dataclass
class _ShardTableBuilder:
    shard_id: str
    limits: ImageLimits
    kept: _RowChunks = field(default_factory=lambda: _RowChunks(CORPUS_SCHEMA))
    quarantined: _RowChunks = field(default_factory=lambda: _RowChunks(QUARANTINE_SCHEMA))
    # What the duplicate rules need of each kept image, and no more: its key's file name (for
    # duplicate_key's detail) and its sha256 digest (32 bytes, not 64 hex characters).
    kept_file_by_key: dict[str, str] = field(default_factory=dict)
    kept_key_by_digest: dict[bytes, str] = field(default_factory=dict)

    def admit(self, record: RawRecord) -> None:
        if record.error is not None:
            self.quarantine(record, *_split_error(record.error))
            return
        if not record.key:
            self.quarantine(record, "missing_key", "the source gave this item no key")
            return
        image_id = f"{self.shard_id}/{record.key}"
        # Only accepted keys count, so a later good copy can replace an earlier broken one.
        kept_file = self.kept_file_by_key.get(record.key)
        if kept_file is not None:
            # Naming the kept file shows why two files share a key (`k.jpg` + `k.png` in a
            # tar, `a.1.jpg` + `a.2.jpg` under webdataset's first-dot rule, copies).
            self.quarantine(
                record, "duplicate_key", f"key already taken by {image_id} ({kept_file})"
            )
            return
        if record.data is None:
            self.quarantine(record, "read_error", "the source returned no bytes")
            return
        # Hashing is far cheaper than decoding, so exact copies are caught first; the digest
        # is handed to validation, so each image's bytes are hashed once.
        digest = content_hash(record.data)
        kept_key = self.kept_key_by_digest.get(bytes.fromhex(digest))
        if kept_key is not None:
            kept_id = f"{self.shard_id}/{kept_key}"
            self.quarantine(record, "duplicate_content", f"same bytes as {kept_id}")
            return
        try:
            decoded = validate_image(record.data, self.limits, known_hash=digest)
        except ImageRejected as exc:
            self.quarantine(record, exc.reason, exc.detail)
            return
        caption, caption_truncated = clean_caption(record.caption, self.limits)
        caption_issue = record.caption_issue or _absent_caption_issue(record.caption, caption)
        self.kept_file_by_key[record.key] = _file_name(record.uri)
        self.kept_key_by_digest[bytes.fromhex(digest)] = record.key
        self.kept.append(
            {
                "image_id": image_id,
                "shard": self.shard_id,
                "key": record.key,
                "source_uri": record.uri,
                "caption": caption,
                "caption_truncated": caption_truncated,
                "caption_issue": caption_issue,
                "width": decoded.width,
                "height": decoded.height,
                "original_mode": decoded.original_mode,
                "content_hash": decoded.content_hash,
            }
        )

    def quarantine(self, record: RawRecord, reason: str, detail: str) -> None:
        self.quarantined.append(
            {
                "shard": self.shard_id,
                "key": record.key or None,
                "source_uri": record.uri,
                "reason": reason,
                "detail": stable_detail(detail),
            }
        )

    def frames(self) -> tuple[pl.DataFrame, pl.DataFrame]:
        # Kept image ids are unique (a repeated key is quarantined), so the order is total.
        images = self.kept.frame().sort("image_id").rechunk()
        return images, self.quarantined.frame()


def _file_name(uri: str) -> str:
    """The last part of a source uri: a tar member's name, or a path's file name."""
    parts = split_tar_member(uri)
    return parts[1] if parts is not None else uri.rsplit("/", 1)[-1]


def _split_error(error: str) -> tuple[str, str]:
    reason, separator, detail = error.partition(":")
    if not separator or not reason or " " in reason.strip():
        return "source_error", error
    return reason.strip(), detail.strip()


def check_cross_shard_duplicates(images: pl.DataFrame, other_shards: pl.DataFrame) -> CheckOutcome:
    """`corpus_content_unique_across_shards`: no image of this shard has the exact bytes
    (sha256) of an image registered from a shard whose id sorts before this one's.

    Only the later copy is flagged, as `duplicate_key` keeps the first file within a shard: the
    result then does not depend on the order in which shards ran (the first shard of a first
    run sees no other shard; a re-run sees them all), so two runs over the same corpus agree.

    `other_shards` holds `image_id` and `content_hash` of the rest of the corpus (the lineage
    catalog's image rows). Within a shard such copies are quarantined as `duplicate_content`;
    across shards both are kept (shards are processed independently and in parallel), so this
    check reports them. The near-duplicate end of each mining band keeps them from becoming
    pairs.
    """
    shard_of = pl.col("image_id").str.split("/").list.first()  # an image_id is <shard>/<key>
    joined = (
        images.select("image_id", "content_hash")
        .join(
            other_shards.select(pl.col("image_id").alias("other_id"), "content_hash"),
            on="content_hash",
        )
        .filter(pl.col("other_id").str.split("/").list.first() < shard_of)
        .sort("image_id", "other_id")
    )
    examples = [f"{row[0]} = {row[1]}" for row in joined.select("image_id", "other_id").rows()]
    rule = "no image repeats the exact bytes of an image in another shard"
    result = outcome("corpus_content_unique_across_shards", examples, rule)
    if result.passed:
        return result
    # The detail is what `megapairs check` and the check's description show: name the copies
    # by shard and key (an image_id is '<shard>/<key>'; a shard id never holds a '/').
    shown = "; ".join(
        f"{_shard_and_key(image_id)} has the same bytes (sha256 {digest[:12]}...) as "
        f"{_shard_and_key(other_id)}"
        for image_id, other_id, digest in joined.head(_DUPLICATES_NAMED)
        .select("image_id", "other_id", "content_hash")
        .rows()
    )
    more = joined.height - _DUPLICATES_NAMED
    shown += f"; and {more} more" if more > 0 else ""
    return replace(result, detail=f"{result.detail}: {shown}")


def _shard_and_key(image_id: str) -> str:
    """`key k of shard s` for the image_id `s/k`."""
    shard, _, key = image_id.partition("/")
    return f"key {key!r} of shard {shard}"


_DUPLICATES_NAMED = 3
"""How many cross-shard copies a failed `corpus_content_unique_across_shards` names."""
