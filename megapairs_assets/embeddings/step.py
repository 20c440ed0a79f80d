"""One shard of one embedding table, as plain work (the three tables share this one path)."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import polars as pl
import torch

from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.corpus.step import ASSET_NAME as CORPUS_ASSET
from megapairs_assets.embeddings.compute import (
    EmbeddingResult,
    SkippedRow,
    check_embeddings,
    embed_row_groups,
    write_embedding_table,
)
from megapairs_assets.embeddings.encoders import LoadedEncoder, Modality
from megapairs_assets.embeddings.reuse import (
    DamagedTable,
    NoTable,
    NotReusable,
    ReusedShard,
    RowReuse,
    ShardKeys,
    input_digests,
    merge_rows,
    reuse_plan,
    shard_keys,
    shard_metadata,
)
from megapairs_assets.embeddings.sources import SimilaritySource
from megapairs_assets.lib.preview import markdown_table
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, DataPath, read_parquet
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions

# Corpus rows per input stream (see `embed_shards`): about ten img2dataset shards, so the
# pipeline's start-up is paid once per ten, and the rows' metadata stays a few hundred MB at most.
STREAM_WINDOW_ROWS = 100_000

EMBEDDING_CHECKS = {
    "embeddings_finite": "No NaN or infinite values",
    "embeddings_unit_norm": "Every vector is L2-normalised (within float16 tolerance)",
    "embeddings_cover_inputs": "One row per valid input, no extra or duplicate ids",
}


@dataclass
class LazyEncoder:
    """An encoder loaded on first use: a step whose shards are all reused never loads it."""

    modality: Modality
    load: Callable[[], LoadedEncoder]
    _loaded: LoadedEncoder | None = field(default=None, init=False, repr=False)

    @property
    def loaded(self) -> bool:
        """Whether the model has been loaded."""
        return self._loaded is not None

    def get(self) -> LoadedEncoder:
        """The model, loaded now if it was not yet."""
        if self._loaded is None:
            self._loaded = self.load()
        return self._loaded


@dataclass(frozen=True)
class EmbeddingRun:
    """What every shard of one embedding step shares: the model and its settings.

    encoder: the model, or a `LazyEncoder` loaded only when a shard must be embedded.
    code_version: the stage's settings-aware code version (what Dagster shows); with it, each
        table records its shard's reuse keys (`embeddings.reuse`): an unchanged shard keeps
        its table, a changed one keeps its unchanged rows' vectors and embeds the rest. None:
        no key is written and nothing is reused.
    reuse_unchanged: False embeds every row of every shard again (the keys are still written).
    weights_digest: the sha256 of the encoder's weights (`encoders.weights_digest`), part of
        every shard's reuse keys: other weights at the same path (which the code version, keyed
        by the file name, does not see) never reuse a table. None: the keys hold no digest.
    """

    source: SimilaritySource
    encoder: LoadedEncoder | LazyEncoder
    batch_size: int
    num_workers: int | None
    device: torch.device
    dtype: torch.dtype
    limits: ImageLimits
    image_decode: str = "auto"
    code_version: str | None = None
    reuse_unchanged: bool = True
    weights_digest: str | None = None

    @property
    def modality(self) -> Modality:
        """What the encoder embeds, known without loading it."""
        return self.encoder.modality

    def loaded_encoder(self) -> LoadedEncoder:
        """The model, loading it now when it is lazy and not loaded yet."""
        if isinstance(self.encoder, LazyEncoder):
            return self.encoder.get()
        return self.encoder


def embed_shard(
    shard: str,
    run: EmbeddingRun,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> StepResult:
    """Embed one shard's valid images (or captions) and write its table."""
    (result,) = embed_shards([shard], run, layout, catalog, log, warn=warn)
    return result


def embed_shards(
    shards: Sequence[str],
    run: EmbeddingRun,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
    window_rows: int = STREAM_WINDOW_ROWS,
    warn: Callable[[str], None] | None = None,
) -> Iterator[StepResult]:
    """`embed_shard` for each of `shards`, in order, through one input pipeline per window.

    Shards are taken in windows of about `window_rows` corpus rows (at least one shard): the
    window's rows go through `embed_row_groups` as one stream, so decode workers, reader threads
    and the device queue do not start again for each shard, and each shard's table is written
    as soon as its last row is done. A window bounds the corpus rows held in memory. `warn`
    (default `log`) reports a damaged table found where one was kept.
    """
    warn = warn or log
    window: list[tuple[str, pl.DataFrame, dict[str, str]]] = []
    for index, shard in enumerate(shards):
        try:
            rows, versions = read_with_versions(
                catalog,
                CORPUS_ASSET,
                [shard],
                lambda shard=shard: read_parquet(layout.corpus_images(shard)),
                required=True,
            )
        except Exception:
            # The shards before it are embedded and handed out first; the error then surfaces
            # when this shard is asked for, so it fails this shard, not the first of its window.
            if window:
                yield from _embed_window(window, run, layout, log, warn)
            raise
        window.append((shard, rows, versions))
        if sum(rows.height for _, rows, _ in window) >= window_rows or index == len(shards) - 1:
            yield from _embed_window(window, run, layout, log, warn)
            window = []


def _embed_window(
    window: list[tuple[str, pl.DataFrame, dict[str, str]]],
    run: EmbeddingRun,
    layout: DataLayout,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> Iterator[StepResult]:
    asset_name = run.source.embedding_asset
    keys = {shard: _shard_keys(rows, run) for shard, rows, _ in window}
    # Decided before anything is embedded, so a window whose shards are all unchanged (or
    # changed only by removals) never needs the model; a reused shard's vectors are checked
    # here and not kept, a partly reused shard keeps only its unchanged rows' vectors.
    plans = {
        shard: _reuse_plan(shard, rows, keys[shard], run, layout, log, warn)
        for shard, rows, _ in window
    }
    # The rows the model must see: a whole shard, or a changed shard's new and changed rows.
    to_embed: list[tuple[str, pl.DataFrame]] = []
    for shard, rows, _ in window:
        plan = plans[shard]
        if plan is None:
            to_embed.append((shard, rows))
        elif isinstance(plan, RowReuse) and plan.to_embed.height:
            to_embed.append((shard, plan.to_embed))
    results: Iterator[tuple[str, EmbeddingResult]] = iter(())
    progress: Any = nullcontext()
    if to_embed:
        encoder = run.loaded_encoder()  # before the progress clock starts, as before
        shards = [shard for shard, _ in to_embed]
        label = shards[0] if len(shards) == 1 else f"{shards[0]}..{shards[-1]}"
        progress = Progress(
            sum(rows.height for _, rows in to_embed),
            f"{asset_name}[{label}]",
            "captions" if run.modality == "text" else "images",
            log=log,
        )
        results = embed_row_groups(
            to_embed,
            encoder,
            run.limits,
            run.batch_size,
            run.num_workers,
            run.device,
            on_progress=progress.update,
            image_decode=run.image_decode,
        )
    embedding = {shard for shard, _ in to_embed}
    with progress:
        for shard, rows, versions in window:
            plan = plans.pop(shard)
            if isinstance(plan, ReusedShard):
                log(f"{asset_name}[{shard}]: inputs unchanged, table reused")
                yield _reused_result(shard, rows, versions, plan, run, layout)
                continue
            result = None
            if shard in embedding:
                embedded_shard, result = next(results)
                if embedded_shard != shard:  # embed_row_groups keeps the given order
                    raise RuntimeError(f"embedded {embedded_shard!r} where {shard!r} was expected")
            yield _shard_result(shard, rows, versions, result, plan, run, layout, keys[shard])
        # The stream to its end, so its loader and workers finish, as a for loop over it would.
        for extra, _ in results:
            raise RuntimeError(f"embedded {extra!r}, which this window does not hold")


def _shard_keys(rows: pl.DataFrame, run: EmbeddingRun) -> ShardKeys | None:
    if run.code_version is None:
        return None
    version = run.code_version
    if run.weights_digest:
        version += f"+w.{run.weights_digest}"
    return shard_keys(version, run.source.embedding_asset, run.modality, rows, run.limits)


def _reuse_plan(
    shard: str,
    rows: pl.DataFrame,
    keys: ShardKeys | None,
    run: EmbeddingRun,
    layout: DataLayout,
    log: Callable[[str], None],
    warn: Callable[[str], None],
) -> ReusedShard | RowReuse | None:
    """What of the shard's existing table stands for this run: all of it, its unchanged rows,
    or nothing (None: embed every row)."""
    if keys is None or not run.reuse_unchanged:
        return None
    asset_name = run.source.embedding_asset
    try:
        plan = reuse_plan(layout.shard_table(asset_name, shard), keys, rows)
    except NoTable:
        return None
    except NotReusable as why:
        # A damaged table is a warning (a disk or a copy went wrong); an out-of-date one is
        # routine.
        report = warn if isinstance(why, DamagedTable) else log
        report(f"{asset_name}[{shard}]: embedding it: {why}")
        return None
    if isinstance(plan, RowReuse):
        log(
            f"{asset_name}[{shard}]: {plan.why}; keeping {plan.reused_rows} unchanged rows, "
            f"embedding {plan.to_embed.height} of {rows.height}"
        )
    return plan


def _shard_result(
    shard: str,
    rows: pl.DataFrame,
    versions: dict[str, str],
    result: EmbeddingResult | None,
    plan: RowReuse | None,
    run: EmbeddingRun,
    layout: DataLayout,
    keys: ShardKeys | None,
) -> StepResult:
    """Write one shard's table (with its reuse keys) and describe it.

    `result` holds the rows embedded now (None: none were); `plan` the rows kept from the old
    table (None: every row was embedded now).
    """
    if plan is None:
        if result is None:
            raise RuntimeError(f"shard {shard!r} was neither embedded nor reused")
        ids, vectors, skipped_rows = result.ids, result.vectors, result.skipped
    else:
        ids, vectors, skipped_rows = merge_rows(rows, plan, result)
    # The model's id without loading it: a shard whose rows all stand needs no model, and the
    # old table was written under the same settings key (so by the same model).
    model_id = run.loaded_encoder().model_id if result is not None else plan.model_id
    path = layout.shard_table(run.source.embedding_asset, shard)
    write_embedding_table(
        path,
        ids,
        vectors,
        model_id,
        metadata=shard_metadata(keys, skipped_rows),
        input_digests=input_digests(keys, ids),
    )
    skipped = _skipped_frame(skipped_rows)
    expected = rows.filter(~pl.col("image_id").is_in(skipped["image_id"].implode()))
    outcomes = check_embeddings(ids, vectors, expected["image_id"].to_list())
    reused_rows = 0 if plan is None else plan.reused_rows
    metadata: dict[str, Any] = {
        "vector_dim": int(vectors.shape[1]),
        "reused": False,
        "rows_reused": reused_rows,
        "rows_computed": rows.height - reused_rows,
    }
    if result is not None:
        metadata["items_per_s"] = round(result.items_per_s, 1)
    return _describe(
        shard,
        rows,
        versions,
        run,
        path,
        embedded=len(ids),
        skipped=skipped,
        model_id=model_id,
        outcomes=outcomes,
        metadata=metadata,
    )


def _reused_result(
    shard: str,
    rows: pl.DataFrame,
    versions: dict[str, str],
    kept: ReusedShard,
    run: EmbeddingRun,
    layout: DataLayout,
) -> StepResult:
    """Describe a kept table exactly as if it had just been written (nothing is written)."""
    return _describe(
        shard,
        rows,
        versions,
        run,
        layout.shard_table(run.source.embedding_asset, shard),
        embedded=len(kept.ids),
        skipped=_skipped_frame(kept.skipped),
        model_id=kept.model_id,
        outcomes=kept.outcomes,
        metadata={
            "vector_dim": kept.dim,
            "reused": True,
            "rows_reused": rows.height,
            "rows_computed": 0,
        },
        row_count_label="reused",
    )


def _describe(
    shard: str,
    rows: pl.DataFrame,
    versions: dict[str, str],
    run: EmbeddingRun,
    path: DataPath,
    embedded: int,
    skipped: pl.DataFrame,
    model_id: str,
    outcomes: list[CheckOutcome],
    metadata: dict[str, Any],
    row_count_label: str | None = None,
) -> StepResult:
    """One shard's StepResult, the same for a computed and a reused table (whose log line
    says "reused" where a computed one says "embedded")."""
    asset_name = run.source.embedding_asset
    return StepResult(
        partition=shard,
        outputs={"embeddings": path},
        row_counts={"embedded": embedded, "skipped": skipped.height},
        row_count_key="embedded",
        row_count_label=row_count_label,
        config={
            "batch_size": run.batch_size,
            "dtype": str(run.dtype),
            "device": str(run.device),
        },
        model_ids={run.source.name: model_id},
        input_versions={f"{CORPUS_ASSET}/{p}": v for p, v in versions.items()},
        rows={"quarantine_log": _skipped_rows(skipped, rows, asset_name, shard)},
        outcomes=outcomes,
        metadata={"model_id": model_id, **metadata},
        markdown={"skipped_by_reason": _reason_counts(skipped)} if skipped.height else {},
        preview=skipped.head(10) if skipped.height else None,
    )


def _reason_counts(skipped: pl.DataFrame) -> str:
    """Skipped rows per reason, most frequent first (a short table the UI shows inline)."""
    counts = skipped.group_by("reason").len().sort(["len", "reason"], descending=[True, False])
    return markdown_table(counts.rename({"len": "rows"}))


def _skipped_frame(skipped: list[SkippedRow]) -> pl.DataFrame:
    return pl.DataFrame(
        skipped,
        schema={"image_id": pl.String, "reason": pl.String, "detail": pl.String},
        orient="row",
    )


def _skipped_rows(
    skipped: pl.DataFrame, rows: pl.DataFrame, stage: str, shard: str
) -> pl.DataFrame:
    joined = skipped.join(rows.select("image_id", "key", "source_uri"), on="image_id", how="left")
    return joined.select(
        pl.lit(stage).alias("stage"),
        pl.lit(shard).alias("shard"),
        "key",
        "source_uri",
        "reason",
        "detail",
    )


def recheck_embedding_shard(
    source: SimilaritySource, shard: str, layout: DataLayout, catalog: LineageCatalog
) -> list:
    """The embedding checks on the shard's table as it is on disk (read-only)."""
    from megapairs_assets.embeddings.compute import read_embedding_table

    ids, vectors = read_embedding_table(layout.shard_table(source.embedding_asset, shard))
    corpus_ids = read_parquet(layout.corpus_images(shard), columns=["image_id", "source_uri"])
    skipped = catalog.query(
        "SELECT source_uri FROM quarantine_log WHERE stage = ? AND shard = ?",
        [source.embedding_asset, shard],
    )
    expected = corpus_ids.filter(~pl.col("source_uri").is_in(skipped["source_uri"].implode()))
    return check_embeddings(list(ids), vectors, expected["image_id"].to_list())
