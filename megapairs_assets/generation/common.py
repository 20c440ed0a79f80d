"""Pieces the generation stages share: asset names, image lookups, quarantine rows, stats."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import polars as pl

from megapairs_assets.corpus.step import IMAGE_LINEAGE
from megapairs_assets.generation.backends.base import BackendSpec
from megapairs_assets.generation.parsing import REASON_REQUEST_FAILED, REASON_REQUEST_QUARANTINED
from megapairs_assets.generation.runner import RunStats
from megapairs_assets.generation.store import STATUS_OK, STATUS_QUARANTINED, StoredResponse
from megapairs_assets.lib.storage import DataLayout, DataPath, data_root_path, read_parquet
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions

if TYPE_CHECKING:
    from megapairs_assets.generation.settings import GenerationSettings

PAIRS_ASSET = "mined_image_pairs"
DESCRIPTIONS_ASSET = "pair_descriptions"
INSTRUCTIONS_ASSET = "pair_instructions"
TRIPLETS_ASSET = "triplets"
EXPORT_ASSET = "triplet_export"
EXPORT_DIRNAME = "triplet_export"

QUARANTINE_SCHEMA = pl.Schema(
    {
        "stage": pl.String,
        "shard": pl.String,
        "key": pl.String,
        "source_uri": pl.String,
        "reason": pl.String,
        "detail": pl.String,
    }
)
"""Rows of the catalog's quarantine_log a generation stage adds (key = pair id)."""

IMAGE_COLUMNS = pl.Schema(
    {
        "image_id": pl.String,
        "source_uri": pl.String,
        "caption": pl.String,
        "content_hash": pl.String,
    }
)
PROVENANCE_COLUMNS = ("generator", "model_id", "template_id", "template_hash", "request_key")
"""What every generated row must name: who made it, from which prompt, by which request."""

GENERATED_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "pair_id": "the mined pair this row is about (mined_image_pairs.pair_id)",
    "query_id": "image_id of the pair's query image",
    "target_id": "image_id of the pair's target image",
    "generator": "who wrote the text, for people: the model's label (', caption-based' when it "
    "saw captions instead of pixels) or 'heuristic (caption templates)'",
    "model_id": "the configured model id (the one request keys and lineage use)",
    "served_model": "the model that answered, as the backend reported it: an OpenAI-compatible "
    "server's `model` field (a server asked under another name, `served_model`, says which); "
    "for a local backend or the heuristic, its model id",
    "backend": "how the model was called: vllm, openai_http (an OpenAI-compatible server), "
    "transformers or heuristic",
    "template_id": "id of the prompt template used (generation/prompts/)",
    "template_hash": "hash of the template's full content: a changed prompt is a new request",
    "seed": "sampling seed of the request (keyed per pair, so a re-run asks the same)",
    "sampling": "the sampling parameters sent, as JSON",
    "request_key": "sha256 over model, template, inputs, sampling and seed: the key of the "
    "response cache, so a re-run calls no model for this row",
    "prompt_tokens": "tokens in the prompt, as the model reported (0 for the heuristic)",
    "completion_tokens": "tokens generated, as the model reported (0 for the heuristic)",
}
"""Columns shared by the description and instruction tables (each adds its own)."""
_SAFE_PATH_PART = re.compile(r"[^A-Za-z0-9._-]")
_DETAIL_CHARS = 500


class GenerationStepError(RuntimeError):
    """A generation step cannot produce a trustworthy partition (backend down, bad config)."""


@dataclass
class QuarantineLog:
    """Collects one stage's rejections for one shard."""

    stage: str
    shard: str
    rows: list[dict[str, str | None]] = field(default_factory=list)

    def add(self, key: str, source_uri: str | None, reason: str, detail: str) -> None:
        self.rows.append(
            {
                "stage": self.stage,
                "shard": self.shard,
                "key": key,
                "source_uri": source_uri,
                "reason": reason,
                "detail": detail[:_DETAIL_CHARS],
            }
        )

    def frame(self) -> pl.DataFrame:
        return pl.DataFrame(self.rows, schema=QUARANTINE_SCHEMA)

    def answered(
        self,
        key: str,
        source_uri: str | None,
        response: StoredResponse | None,
        request_key: str,
        max_attempts: int,
    ) -> StoredResponse | None:
        """The response if the model answered; else None, after quarantining the row with why
        (failed, or given up on after `max_attempts`)."""
        if response is not None and response.status == STATUS_OK:
            return response
        if response is None:
            reason, attempts, error = REASON_REQUEST_FAILED, 0, "no response"
        else:
            reason = (
                REASON_REQUEST_QUARANTINED
                if response.status == STATUS_QUARANTINED
                else REASON_REQUEST_FAILED
            )
            attempts, error = response.attempts, response.last_error
        detail = f"attempt {attempts}/{max_attempts}: {error} (request {request_key[:16]})"
        if reason == REASON_REQUEST_QUARANTINED:
            # Put first: the detail column is cut at _DETAIL_CHARS, and a long error would hide it.
            detail = "not sent again until a run sets retry_quarantined; " + detail
        self.add(key, source_uri, reason, detail)
        return None

    def reason_counts(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for row in self.rows:
            counts[str(row["reason"])] = counts.get(str(row["reason"]), 0) + 1
        return dict(sorted(counts.items()))


def lookup_images(catalog: LineageCatalog, image_ids: Iterable[str]) -> dict[str, dict[str, Any]]:
    """image_id -> {image_id, source_uri, caption, content_hash} from the catalog's image rows.

    Pairs reach across shards (KNN is corpus-wide), so one pair shard's images can come from
    any corpus shard; the catalog answers for all of them in one read. Ids it does not know
    are absent from the answer.
    """
    ids = sorted(set(image_ids))
    if not ids:
        return {}
    rows = catalog.rows_for_ids(IMAGE_LINEAGE.name, "image_id", ids)
    return {row["image_id"]: row for row in rows.select(list(IMAGE_COLUMNS)).iter_rows(named=True)}


def read_shard_table(
    catalog: LineageCatalog, layout: DataLayout, asset: str, shard: str
) -> tuple[pl.DataFrame, dict[str, str]]:
    """An upstream shard table and {"asset/shard": materialization id} of exactly what was read.

    Refuses a partition never materialized (NotMaterializedError) and a table whose newest
    materialization did not complete (IncompleteCommitError).
    """
    path = layout.shard_table(asset, shard)
    frame, versions = read_with_versions(
        catalog, asset, [shard], lambda: read_parquet(path), required=True
    )
    return frame, {f"{asset}/{p}": v for p, v in versions.items()}


def image_relpath(image_id: str) -> str:
    """Where an image sits inside an export folder: `images/<shard>/<key>.jpg`.

    Characters outside [A-Za-z0-9._-] become `_`; a part that had to change gets a short hash
    of the original so two different ids never share a file. A part longer than
    MAX_EXPORT_PART_CHARS is cut and ends with that hash, so every file name fits a file system
    (255 bytes) with room for the temporary name it is written under.
    """
    shard, _, key = image_id.partition("/")
    return f"images/{_safe_part(shard)}/{_safe_part(key or shard)}.jpg"


# The longest shard or key part of an exported image's path: ASCII only, so characters are
# bytes; with ".jpg" and a temporary file's suffix far below the 255-byte name limit.
MAX_EXPORT_PART_CHARS = 100


def _safe_part(text: str) -> str:
    import hashlib

    digest = hashlib.blake2b(text.encode(errors="surrogatepass"), digest_size=4).hexdigest()
    cleaned = _SAFE_PATH_PART.sub("_", text).strip(".") or "_"
    # Unchanged for every part that fit before the cap: exported paths stay where they were.
    safe = cleaned if cleaned == text else f"{cleaned}-{digest}"
    if len(safe) > MAX_EXPORT_PART_CHARS:
        safe = f"{cleaned[: MAX_EXPORT_PART_CHARS - len(digest) - 1]}-{digest}"
    return safe


def export_dir(layout: DataLayout, configured: str | None) -> DataPath:
    """The release folder: the configured one (a local path or an fsspec URL, which gets the
    data root's storage options), else `<data root>/data/triplet_export`."""
    if configured:
        return data_root_path(configured, layout.storage_options)
    return layout.data_dir / EXPORT_DIRNAME


def generator_name(spec: BackendSpec, input_mode: str | None) -> str:
    """What a row names as its generator: the model's label, plus how it saw the pair."""
    name = spec.display_name
    if input_mode == "captions" and spec.backend != "heuristic":
        name += ", caption-based"
    return name


def sampling_json(sampling: Mapping[str, Any]) -> str:
    return json.dumps(dict(sampling), sort_keys=True)


def raise_if_step_calls_failing(
    stats: RunStats, settings: GenerationSettings, step: str, shard: str, spec: BackendSpec
) -> None:
    """`raise_if_backend_failing` with the step's settings, its error ending with the setting
    that holds the servers' URLs (or key), as the checks before a step name it: "connection
    refused" alone does not say where the URL came from."""
    from megapairs_assets.generation.backends.openai_http import failed_calls_fix

    try:
        raise_if_backend_failing(
            stats,
            settings.max_failure_fraction,
            step,
            shard,
            spec,
            settings.stopped_probe_timeout_s,
        )
    except GenerationStepError as error:
        fix = failed_calls_fix(spec, settings.server_setting_names.get(step, {}), stats.last_error)
        if fix is None:
            raise
        raise GenerationStepError(f"{error}; to fix: {fix}") from None


def raise_if_backend_failing(
    stats: RunStats,
    max_failure_fraction: float,
    step: str,
    shard: str,
    spec: BackendSpec | None = None,
    probe_timeout_s: float = 5.0,
) -> None:
    """Fail the step when the model calls of this run mostly failed, or when any failed and a
    server of `spec` no longer answers at all (it went away mid-step: the calls left after it
    did all fail, however few they were). Finished responses are kept either way; the error
    quotes the last failure, which names the server it came from.

    "No longer answers" is asked only after a failed call: each server of `spec` gets
    `probe_timeout_s` seconds (the `stopped_probe_timeout_s` setting) to list its models; a
    refused connection or no answer in that time counts as gone.
    """
    if not stats.calls or not stats.failed:
        return
    last_error = (stats.last_error or "unknown")[:_DETAIL_CHARS]
    resume = "finished responses are cached, so a re-run resumes once the backend is healthy"
    if stats.failed / stats.calls > max_failure_fraction:
        raise GenerationStepError(
            f"{step} {shard}: {stats.failed} of {stats.calls} model calls failed (more than "
            f"{max_failure_fraction:.0%}); last error: {last_error}; {resume}"
        )
    gone = [problem.base_url for problem in _unreachable_servers(spec, probe_timeout_s)]
    if gone:
        raise GenerationStepError(
            f"{step} {shard}: {', '.join(gone)} stopped answering during the step: "
            f"{stats.failed} of {stats.calls} model calls failed; last error: {last_error}; "
            f"{resume}"
        )


def _unreachable_servers(spec: BackendSpec | None, timeout_s: float) -> list[Any]:
    """The `openai_http` servers of `spec` that refuse connections, or do not answer within
    `timeout_s`, now ([] for other backends)."""
    if spec is None:
        return []
    from megapairs_assets.generation.backends.openai_http import probe_servers

    return [problem for problem in probe_servers(spec, timeout_s) if problem.kind == "unreachable"]


def lacking_provenance(table: pl.DataFrame) -> list[str]:
    """The pair ids of rows that leave a provenance column empty."""
    lacking = table.filter(pl.any_horizontal(pl.col(c).is_null() for c in PROVENANCE_COLUMNS))
    return lacking["pair_id"].to_list()


def counts_by(table: pl.DataFrame, column: str) -> dict[str, int]:
    """Rows per value of a column, as a plain dict (for metadata)."""
    if table.is_empty():
        return {}
    counts = table.group_by(column).len().sort(column)
    return dict(zip(counts[column].to_list(), counts["len"].to_list(), strict=True))
