"""Content-addressed reuse of an embedding shard whose inputs did not change.

Re-materializing the corpus (a no-change re-run, a corpus code-version bump) asks every
embedding table for every shard again. A shard whose table was written for exactly the same
inputs would get the same vectors, so its table is kept and the model is not run for it (nor
loaded, when no shard of the step needs it).

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

Left out on purpose: batch size, DataLoader workers, where JPEGs are decoded and the device
(throughput settings, as in the settings hash), and the corpus's other columns (source_uri,
key, sizes): the quarantine rows of a reused shard take `key` and `source_uri` from the
current corpus rows, as a computed shard's do.

The key and the shard's skipped rows (image_id, reason, detail) live in the embedding table's
own Parquet footer, written by the same atomic write as the vectors: the table and its key can
never disagree, and nothing else needs writing or cleaning up. A table is reused only when it
reads back whole, its key matches, every skip it recorded was decided by the content alone
(`CONTENT_SKIP_REASONS`: a missing file or a full memory gets another try), and all embedding
checks pass on it; anything else embeds the shard as before.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass

import polars as pl
import pyarrow.parquet as pq

from megapairs_assets.corpus.images import PREPROCESS_FAILED, ImageLimits
from megapairs_assets.embeddings.compute import (
    NO_CAPTION,
    SkippedRow,
    check_embeddings,
    embedding_arrays,
)
from megapairs_assets.embeddings.encoders import Modality
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.storage import DataPath

# Bumped when what goes into the key changes, so older keys stop matching.
KEY_SCHEME = "embedding-reuse-v1"
REUSE_KEY_FIELD = "megapairs_reuse_key"
SKIPPED_FIELD = "megapairs_skipped"

# Skip reasons decided by the picture's bytes (or the caption) and the limits alone: embedding
# the same input again would skip it again. Any other reason (missing_file, read_error,
# remote_uri, out_of_memory, a reason added later) may pass, so such a shard is embedded again.
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


@dataclass(frozen=True)
class ReusedShard:
    """What a shard's kept table holds, checked; its vectors are not kept in memory."""

    ids: list[str]
    skipped: list[SkippedRow]
    model_id: str
    dim: int
    outcomes: list[CheckOutcome]


def shard_reuse_key(
    code_version: str,
    embedding_asset: str,
    modality: Modality,
    rows: pl.DataFrame,
    limits: ImageLimits,
) -> str | None:
    """The reuse key of one shard's corpus `rows` (see the module docstring), or None when the
    rows cannot vouch for their content (no `content_hash`, or one is null; no `caption`)."""
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
    digest = hashlib.sha256(json.dumps(header, sort_keys=True).encode())
    # One JSON array per row: unambiguous whatever characters ids or captions hold.
    for row in content.sort(content.columns).iter_rows():
        digest.update(json.dumps(row, ensure_ascii=False).encode())
        digest.update(b"\n")
    return digest.hexdigest()


def stored_metadata(reuse_key: str | None, skipped: list[SkippedRow]) -> dict[str, str]:
    """The footer entries that let a later run reuse a table (`write_embedding_table`)."""
    if reuse_key is None:
        return {}
    return {
        REUSE_KEY_FIELD: reuse_key,
        SKIPPED_FIELD: json.dumps([list(row) for row in skipped], ensure_ascii=False),
    }


def reusable_shard(path: DataPath, reuse_key: str, rows: pl.DataFrame) -> ReusedShard:
    """The shard's existing table at `path`, if it was written for `reuse_key` and passes every
    embedding check against `rows`; raises `NotReusable` saying why not otherwise.

    Only the footer is read until the key matches, so a changed shard costs one small read.
    """
    try:
        with path.open("rb") as handle:
            parquet = pq.ParquetFile(handle)
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
        raise NotReusable(f"the table is unreadable ({type(error).__name__}: {error})") from error
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
