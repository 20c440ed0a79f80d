"""Content-addressed reuse of an embedding shard's table: whole, or row by row.

Re-materializing the corpus (a no-change re-run, a corpus code-version bump) asks every
embedding table for every shard again. A shard whose table was written for exactly the same
inputs would get the same vectors, so its table is kept and the model is not run for it (nor
loaded, when no shard of the step needs it). A shard where a few images were added, replaced
or removed keeps the vectors of its unchanged rows and embeds only the rest (`RowReuse`).

What decides a shard's vectors, and so goes into its reuse key (`shard_reuse_key`):

- the stage's settings-aware code version: the stage version (bumped when embedding code
  changes its output) plus the hash of the encoder's backend, model, pretrained weights, dim
  and the dtype (`embedding_settings` in embeddings/assets.py), exactly what Dagster's code
  version says, run-config overrides included;
- which table it is (the embedding asset) and the encoder's modality;
- image sources: each row's (image_id, content_hash), sorted by image_id. The hash is the
  sha256 of the original file's bytes, so the same bytes under a new URI (a moved or re-listed
  corpus) reuse the table and a different picture under the same key does not. Also every
  `ImageLimits` field but the caption length: the limits decide which images are refused
  (quarantined) instead of embedded;
- the caption source: each row's (image_id, caption, caption_issue), sorted by image_id. The
  caption is the input; `caption_issue` only words the quarantine detail of an uncaptioned row,
  but that detail is part of what the shard reports.

Everything in the key but the rows is the shard's *settings key* (`ShardKeys.settings_key`);
a digest of one row's input (its content_hash, or its caption and caption_issue) is that row's
*input digest*.

Left out on purpose: batch size, DataLoader workers, where JPEGs are decoded and the device
(throughput settings, as in the settings hash), and the corpus's other columns (source_uri,
key, sizes): the quarantine rows of a reused shard take `key` and `source_uri` from the
current corpus rows, as a computed shard's do.

Where it is kept: the key, the settings key, the shard's skipped rows (image_id, reason,
detail) and their input digests live in the embedding table's own Parquet footer, and each
embedded row's input digest in the table's `input_digest` column, all written by the same
atomic write as the vectors: the table and what it was computed from can never disagree, and
nothing else needs writing or cleaning up. Row digests are a column, not footer entries, so
the footer (which the KNN step reads for every shard of the corpus) stays small.

When a table stands (`reuse_plan`):

- whole: it reads back whole, its key matches, every skip it recorded was decided by the
  content alone (`CONTENT_SKIP_REASONS`: a missing file or a full memory gets another try),
  and all embedding checks pass on it. Nothing is written.
- row by row, otherwise: it reads back whole, records per-row inputs, and was written under
  the same settings key. A current row keeps the old vector when the old table holds the same
  image_id with the same input digest and a finite unit vector, and keeps its old skip when
  that skip was a content skip of the same input; every other row (new, changed, transiently
  skipped, a bad old vector) is embedded. The step writes the merged table, in the shard's
  current row order, with the new keys; its checks run on the merged table.

Anything else (no table, an unreadable one, other settings, a table written before per-row
inputs were recorded) embeds the whole shard, as before. "Reads back whole" includes every
page's checksum (tables are written with one per page, lib/storage.py): a flipped bit or a
damaged page makes the table unreadable, and the reason logged names the file.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass

import numpy as np
import polars as pl
import pyarrow.parquet as pq

from megapairs_assets.corpus.images import PREPROCESS_FAILED, ImageLimits
from megapairs_assets.embeddings.compute import (
    INPUT_DIGEST_COLUMN,
    NO_CAPTION,
    UNIT_NORM_TOLERANCE,
    EmbeddingResult,
    SkippedRow,
    check_embeddings,
    embedding_arrays,
)
from megapairs_assets.embeddings.encoders import Modality
from megapairs_assets.lib.errors import first_line
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.storage import DataPath

# Bumped when what goes into the key changes, so older keys stop matching.
KEY_SCHEME = "embedding-reuse-v1"
REUSE_KEY_FIELD = "megapairs_reuse_key"
SKIPPED_FIELD = "megapairs_skipped"
SETTINGS_KEY_FIELD = "megapairs_settings_key"
SKIPPED_INPUTS_FIELD = "megapairs_skipped_inputs"
# Hex characters kept of a row's sha256 input digest: 128 bits, no collision within a shard.
ROW_DIGEST_CHARS = 32

# Skip reasons decided by the picture's bytes (or the caption) and the limits alone: embedding
# the same input again would skip it again. Any other reason (missing_file, read_error,
# remote_uri, out_of_memory, a reason added later) may pass, so such a row is embedded again.
CONTENT_SKIP_REASONS = frozenset(
    {
        "decode_error",
        "too_small",
        "too_large",
        "extreme_aspect_ratio",
        "non_finite_pixels",
        PREPROCESS_FAILED,
        NO_CAPTION,
    }
)

# ImageLimits fields that embedding images never reads (captions are cleaned by the corpus).
_LIMITS_NOT_FOR_IMAGES = ("max_caption_chars",)


class NotReusable(Exception):
    """The shard's existing table cannot stand for this run; the message says why."""


class NoTable(NotReusable):
    """The shard has no table yet (nothing worth logging)."""


class DamagedTable(NotReusable):
    """The shard's table cannot be read back (a page fails its checksum or does not decode,
    the file is cut short): worth a warning; the message names the file."""


@dataclass(frozen=True)
class ShardKeys:
    """What a shard's table records of its inputs, so a later run can reuse it.

    table_key: the whole shard's reuse key (`shard_reuse_key`).
    settings_key: the same key without the rows: code version, table, modality, limits.
    row_inputs: image_id -> that row's input digest (`row_input_digest`).
    """

    table_key: str
    settings_key: str
    row_inputs: Mapping[str, str]


@dataclass(frozen=True)
class ReusedShard:
    """What a shard's kept table holds, checked; its vectors are not kept in memory."""

    ids: list[str]
    skipped: list[SkippedRow]
    model_id: str
    dim: int
    outcomes: list[CheckOutcome]


@dataclass(frozen=True)
class RowReuse:
    """A changed shard's rows whose old outcome still stands, and the rows left to embed.

    kept_ids / kept_vectors: current rows whose old vector is kept (float16, aligned).
    carried_skips: current rows whose old content skip is kept.
    to_embed: the current corpus rows to embed, in the shard's order.
    why: why the whole table could not be kept (for the log).
    """

    model_id: str
    dim: int
    kept_ids: list[str]
    kept_vectors: np.ndarray
    carried_skips: list[SkippedRow]
    to_embed: pl.DataFrame
    why: str

    @property
    def reused_rows(self) -> int:
        """Corpus rows whose vector or skip comes from the old table."""
        return len(self.kept_ids) + len(self.carried_skips)


def shard_reuse_key(
    code_version: str,
    embedding_asset: str,
    modality: Modality,
    rows: pl.DataFrame,
    limits: ImageLimits,
) -> str | None:
    """The reuse key of one shard's corpus `rows` (see the module docstring), or None when the
    rows cannot vouch for their content (no `content_hash`, or one is null; no `caption`)."""
    keys = shard_keys(code_version, embedding_asset, modality, rows, limits)
    return None if keys is None else keys.table_key


def shard_keys(
    code_version: str,
    embedding_asset: str,
    modality: Modality,
    rows: pl.DataFrame,
    limits: ImageLimits,
) -> ShardKeys | None:
    """The shard's whole key, settings key and row input digests (see the module docstring);
    None when the rows cannot vouch for their content, as for `shard_reuse_key`."""
    header: dict[str, object] = {
        "scheme": KEY_SCHEME,
        "code_version": code_version,
        "table": embedding_asset,
        "modality": modality,
    }
    if modality == "image":
        if "content_hash" not in rows.columns or rows["content_hash"].null_count():
            return None
        content = rows.select("image_id", pl.col("content_hash").cast(pl.String))
        header["limits"] = {
            name: value
            for name, value in asdict(limits).items()
            if name not in _LIMITS_NOT_FOR_IMAGES
        }
    else:
        if "caption" not in rows.columns:
            return None
        issue = rows["caption_issue"] if "caption_issue" in rows.columns else None
        content = rows.select(
            "image_id",
            pl.col("caption").cast(pl.String),
            (issue if issue is not None else pl.lit(None)).cast(pl.String).alias("caption_issue"),
        )
    header_json = json.dumps(header, sort_keys=True).encode()
    digest = hashlib.sha256(header_json)
    # One JSON array per row: unambiguous whatever characters ids or captions hold.
    for row in content.sort(content.columns).iter_rows():
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    row_inputs = {str(row[0]): row_input_digest(row[1:]) for row in content.iter_rows()}
    return ShardKeys(digest.hexdigest(), hashlib.sha256(header_json).hexdigest(), row_inputs)


def row_input_digest(values: Sequence[object]) -> str:
    """The digest of one row's input (its content_hash; or its caption and caption_issue)."""
    encoded = json.dumps(list(values), ensure_ascii=False).encode()
    return hashlib.sha256(encoded).hexdigest()[:ROW_DIGEST_CHARS]


def stored_metadata(reuse_key: str | None, skipped: list[SkippedRow]) -> dict[str, str]:
    """The footer entries that let a later run reuse a table whole (`write_embedding_table`).

    A table written with these alone is not reusable row by row; `shard_metadata` adds that.
    """
    if reuse_key is None:
        return {}
    return {
        REUSE_KEY_FIELD: reuse_key,
        SKIPPED_FIELD: json.dumps([list(row) for row in skipped], ensure_ascii=False),
    }


def shard_metadata(keys: ShardKeys | None, skipped: list[SkippedRow]) -> dict[str, str]:
    """The footer entries of a table written for `keys`: its whole key and skipped rows, plus
    the settings key and the skipped rows' input digests for reuse row by row. The embedded
    rows' digests go in the table's `input_digest` column (`input_digests`)."""
    if keys is None:
        return {}
    skipped_inputs = {image_id: keys.row_inputs[image_id] for image_id, _, _ in skipped}
    return {
        **stored_metadata(keys.table_key, skipped),
        SETTINGS_KEY_FIELD: keys.settings_key,
        SKIPPED_INPUTS_FIELD: json.dumps(skipped_inputs, ensure_ascii=False),
    }


def input_digests(keys: ShardKeys | None, ids: Sequence[str]) -> list[str] | None:
    """The `input_digest` column for a table of `ids` written for `keys` (None: no keys)."""
    return None if keys is None else [keys.row_inputs[image_id] for image_id in ids]


def reusable_shard(path: DataPath, reuse_key: str, rows: pl.DataFrame) -> ReusedShard:
    """The shard's existing table at `path`, if it was written for `reuse_key` and passes every
    embedding check against `rows`; raises `NotReusable` saying why not otherwise.

    Only the footer is read until the key matches, so a changed shard costs one small read.
    """
    try:
        with path.open("rb") as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            footer = parquet.schema_arrow.metadata or {}
            stored_key = footer.get(REUSE_KEY_FIELD.encode())
            if stored_key is None:
                raise NotReusable("the table has no reuse key (written before reuse existed)")
            if stored_key.decode() != reuse_key:
                raise NotReusable("its inputs or settings changed")
            table = parquet.read(columns=["image_id", "embedding"])
        ids, vectors = embedding_arrays(table)
        skipped = _stored_skipped(footer.get(SKIPPED_FIELD.encode()))
        model_id = footer[b"model_id"].decode()
    except FileNotFoundError:
        raise NoTable("no table yet") from None
    except NotReusable:
        raise
    except Exception as error:  # a damaged table is embedded again, never a failed step
        raise unreadable(path, error) from error
    transient = sorted({reason for _, reason, _ in skipped} - CONTENT_SKIP_REASONS)
    if transient:
        raise NotReusable(f"it skipped rows for reasons that may pass ({', '.join(transient)})")
    skipped_ids = {image_id for image_id, _, _ in skipped}
    expected = [i for i in rows["image_id"].to_list() if i not in skipped_ids]
    outcomes = check_embeddings(list(ids), vectors, expected)
    failing = [o.name for o in outcomes if not o.passed]
    if failing:
        raise NotReusable(f"the table fails {', '.join(failing)}")
    return ReusedShard(
        ids=[str(i) for i in ids],
        skipped=skipped,
        model_id=model_id,
        dim=int(vectors.shape[1]),
        outcomes=outcomes,
    )


def unreadable(path: DataPath, error: BaseException) -> DamagedTable:
    """Why a table that cannot be read back is not reused: the file and what is wrong."""
    return DamagedTable(f"the table {path} is damaged or unreadable ({first_line(error)})")


def reuse_plan(path: DataPath, keys: ShardKeys, rows: pl.DataFrame) -> ReusedShard | RowReuse:
    """What of the shard's existing table at `path` can stand for this run's `rows`: all of it
    (`reusable_shard`), or the rows whose inputs did not change (`reusable_rows`). Raises
    `NoTable` when there is none, `NotReusable` saying why when nothing can be kept."""
    try:
        return reusable_shard(path, keys.table_key, rows)
    except (NoTable, DamagedTable):  # a damaged file is not trusted for any row either
        raise
    except NotReusable as whole:
        try:
            return reusable_rows(path, keys, rows, why=str(whole))
        except NotReusable as per_row:
            if str(per_row) == str(whole):
                raise
            kind = DamagedTable if isinstance(per_row, DamagedTable) else NotReusable
            raise kind(f"{whole}; no row can be reused: {per_row}") from per_row


def reusable_rows(path: DataPath, keys: ShardKeys, rows: pl.DataFrame, why: str = "") -> RowReuse:
    """The rows of the table at `path` that still stand for the current `rows` (see the module
    docstring), and the rows left to embed; raises `NotReusable` when the table was written
    under other settings, before per-row inputs were recorded, or cannot be read."""
    try:
        with path.open("rb") as handle:
            parquet = pq.ParquetFile(handle, page_checksum_verification=True)
            footer = parquet.schema_arrow.metadata or {}
            stored_settings = footer.get(SETTINGS_KEY_FIELD.encode())
            if stored_settings is None or INPUT_DIGEST_COLUMN not in parquet.schema_arrow.names:
                raise NotReusable("the table records no per-row inputs (written before them)")
            if stored_settings.decode() != keys.settings_key:
                raise NotReusable("its settings changed (model, dtype, limits or code version)")
            table = parquet.read(columns=["image_id", "embedding", INPUT_DIGEST_COLUMN])
        ids, vectors = embedding_arrays(table)
        digests = table.column(INPUT_DIGEST_COLUMN).to_pylist()
        skipped = _stored_skipped(footer.get(SKIPPED_FIELD.encode()))
        skipped_inputs = _stored_skipped_inputs(footer.get(SKIPPED_INPUTS_FIELD.encode()))
        model_id = footer[b"model_id"].decode()
    except FileNotFoundError:
        raise NoTable("no table yet") from None
    except NotReusable:
        raise
    except Exception as error:  # a damaged table is embedded again, never a failed step
        raise unreadable(path, error) from error
    old_ids = [str(i) for i in ids]
    skipped_ids = [image_id for image_id, _, _ in skipped]
    if len(set(old_ids)) != len(old_ids) or set(old_ids) & set(skipped_ids):
        raise NotReusable("the table holds an image id twice")
    if any(digest is None for digest in digests):
        raise NotReusable("the table records no per-row inputs (written before them)")
    if rows["image_id"].n_unique() != rows.height:
        raise NotReusable("the shard's corpus rows repeat an image id")

    # An old vector stands only if it would pass the checks (finite, unit norm).
    values = vectors.astype(np.float32)
    usable = np.isfinite(values).all(axis=1)
    norms = np.linalg.norm(np.where(np.isfinite(values), values, 0.0), axis=1)
    usable &= np.abs(norms - 1.0) <= UNIT_NORM_TOLERANCE
    old_rows = {
        image_id: index
        for index, (image_id, digest) in enumerate(zip(old_ids, digests, strict=True))
        if usable[index] and digest == keys.row_inputs.get(image_id)
    }
    old_skips = {
        image_id: (image_id, reason, detail)
        for image_id, reason, detail in skipped
        if reason in CONTENT_SKIP_REASONS
        and skipped_inputs.get(image_id) is not None
        and skipped_inputs.get(image_id) == keys.row_inputs.get(image_id)
    }
    kept_ids: list[str] = []
    kept_rows: list[int] = []
    carried: list[SkippedRow] = []
    pending: list[bool] = []
    for image_id in rows["image_id"].to_list():
        if image_id in old_rows:
            kept_ids.append(image_id)
            kept_rows.append(old_rows[image_id])
        elif image_id in old_skips:
            carried.append(old_skips[image_id])
        pending.append(image_id not in old_rows and image_id not in old_skips)
    return RowReuse(
        model_id=model_id,
        dim=int(vectors.shape[1]),
        kept_ids=kept_ids,
        kept_vectors=vectors[kept_rows],
        carried_skips=carried,
        to_embed=rows.filter(pl.Series(pending, dtype=pl.Boolean)),
        why=why,
    )


def merge_rows(
    rows: pl.DataFrame, reuse: RowReuse, computed: EmbeddingResult | None
) -> tuple[list[str], np.ndarray, list[SkippedRow]]:
    """The shard's table after a per-row reuse: (ids, float16 vectors, skipped rows), the kept
    and the newly computed ones together in the order of the shard's `rows`, as a full embed
    would list them."""
    position = {image_id: index for index, image_id in enumerate(rows["image_id"].to_list())}
    ids = [*reuse.kept_ids, *(computed.ids if computed else [])]
    parts = [np.asarray(reuse.kept_vectors, dtype=np.float16).reshape(-1, reuse.dim)]
    if computed is not None:
        if computed.vectors.ndim != 2 or computed.vectors.shape[1] != reuse.dim:
            raise RuntimeError(
                f"the old table's vectors have {reuse.dim} dimensions but the model gave "
                f"shape {computed.vectors.shape}, under the same settings key"
            )
        parts.append(np.asarray(computed.vectors, dtype=np.float16))
    vectors = np.concatenate(parts)
    order = np.argsort(np.array([position[i] for i in ids], dtype=np.int64), kind="stable")
    skipped = sorted(
        [*reuse.carried_skips, *(computed.skipped if computed else [])],
        key=lambda row: position[row[0]],
    )
    return [ids[i] for i in order], vectors[order], skipped


def _stored_skipped(raw: bytes | None) -> list[SkippedRow]:
    if raw is None:
        raise ValueError("the table's skipped rows are not recorded")
    rows = json.loads(raw)
    if not isinstance(rows, list) or not all(
        isinstance(row, list) and len(row) == 3 and all(isinstance(v, str) for v in row)
        for row in rows
    ):
        raise ValueError("the table's skipped rows are malformed")
    return [(image_id, reason, detail) for image_id, reason, detail in rows]


def _stored_skipped_inputs(raw: bytes | None) -> dict[str, str]:
    if raw is None:
        raise NotReusable("the table records no per-row inputs (written before them)")
    inputs = json.loads(raw)
    if not isinstance(inputs, dict) or not all(
        isinstance(key, str) and isinstance(value, str) for key, value in inputs.items()
    ):
        raise ValueError("the table's skipped rows' inputs are malformed")
    return inputs
