"""One (retriever, benchmark) partition of `benchmark_scores`, as plain work.

`score_partition` resolves the retriever (the profile's base model, or a trained checkpoint
found under `<data>/mmret_clip_checkpoint/`; under a data root on an object store it is copied
first to `<home>/cache/mmret_clip_checkpoint/`, as open_clip loads local folders only), scores
the benchmark with cached gallery embeddings (`<home>/benchmark_gallery_cache/`, local disk),
writes the scores table and any server files under
`<data>/benchmark_scores/<retriever id>/<benchmark>/`, and returns a `StepResult` whose catalog
rows are the scores. Dagster is not imported here.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl
import torch

from megapairs_assets.corpus.step import image_uris
from megapairs_assets.evaluation.catalog_rows import (
    SCORES_TABLE,
    STATUS_SCORED,
    STATUS_SKIPPED,
    scores_for,
)
from megapairs_assets.evaluation.gallery_cache import GalleryCache
from megapairs_assets.evaluation.plot import comparison_markdown
from megapairs_assets.evaluation.run import (
    MEAN_SPLIT,
    BenchmarkResult,
    BenchmarkSources,
    EvaluationSettings,
    evaluate_benchmark,
)
from megapairs_assets.generation.common import TRIPLETS_ASSET
from megapairs_assets.lib.quality import CheckOutcome, outcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import (
    DataLayout,
    DataPath,
    is_local,
    read_parquet,
    write_parquet_atomic,
)
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions
from megapairs_assets.retriever.discovery import (
    discover_checkpoints,
    discover_remote_checkpoints,
)
from megapairs_assets.retriever.model import (
    LOCAL_DIR_PREFIX,
    Retriever,
    RetrieverSpec,
    load_retriever_spec,
)

ASSET_NAME = "benchmark_scores"
CHECKPOINT_ASSET = "mmret_clip_checkpoint"
GALLERY_CACHE_DIRNAME = "benchmark_gallery_cache"
CACHE_DIRNAME = "cache"
COMPARED_COLUMNS = ["retriever_id", "benchmark", "split", "metric", "value"]
SCORE_CHECKS = {
    "scores_are_percentages": "Every score is a finite number between 0 and 100",
}
SCORE_WARNINGS = {
    "benchmark_files_present": "Every split of the benchmark was found (else it is skipped)",
}


class RetrieverNotFound(LookupError):
    """A retrievers partition that names neither the base model nor a checkpoint on disk."""


def checkpoint_root(layout: DataLayout) -> DataPath:
    """Where the training stage writes its checkpoints (one folder per named config)."""
    return layout.data_dir / CHECKPOINT_ASSET


def local_checkpoint_root(layout: DataLayout) -> Path:
    """Where checkpoint exports are loaded from: the checkpoint root itself on local disk, else
    its local copy under `<home>/cache/` (see `discover_remote_checkpoints`)."""
    root = checkpoint_root(layout)
    return Path(root) if is_local(root) else layout.home / CACHE_DIRNAME / CHECKPOINT_ASSET


def gallery_cache(layout: DataLayout) -> GalleryCache:
    """The gallery embedding cache: on local disk under the home, like the models.

    It is memory-mapped numpy, and a cache rather than a table: a data root on an object store
    would add a download per read for nothing. Each machine keeps its own.
    """
    return GalleryCache(layout.home / GALLERY_CACHE_DIRNAME)


def output_dir(layout: DataLayout, retriever_id: str, benchmark: str) -> DataPath:
    return layout.asset_dir(ASSET_NAME) / retriever_id / benchmark


def known_retrievers(
    base: RetrieverSpec, layout: DataLayout, *, download: bool = False
) -> dict[str, RetrieverSpec]:
    """retriever_id -> spec: the base model first, then every complete checkpoint export.

    Under a data root on an object store the exports are listed there and mirrored to
    `local_checkpoint_root` (open_clip loads local folders only): their configs always (the ids
    come from them), their weights only with `download` (what scoring needs; a sensor only
    lists). Unchanged files are not fetched again.
    """
    root = checkpoint_root(layout)
    if is_local(root):
        found = discover_checkpoints(Path(root))
    else:
        found = discover_remote_checkpoints(
            root, local_checkpoint_root(layout), download_weights=download
        )
    return {base.retriever_id: base, **found}


def resolve_retriever(retriever_id: str, base: RetrieverSpec, layout: DataLayout) -> RetrieverSpec:
    """The spec behind a retrievers partition key, its weights on local disk; RetrieverNotFound
    names the known ones."""
    known = known_retrievers(base, layout, download=True)
    if retriever_id not in known:
        raise RetrieverNotFound(
            f"retriever {retriever_id!r} is neither the base model ({base.retriever_id}) nor a "
            f"checkpoint under {checkpoint_root(layout)}; known: {', '.join(known)}"
        )
    return known[retriever_id]


@dataclass
class RetrieverPool:
    """Retrievers loaded once per step and reused for every partition it scores."""

    device: torch.device
    dtype: torch.dtype
    loaded: dict[RetrieverSpec, Retriever] = field(default_factory=dict)

    def get(self, spec: RetrieverSpec) -> Retriever:
        if spec not in self.loaded:
            self.loaded[spec] = load_retriever_spec(spec, self.device, self.dtype)
        return self.loaded[spec]


def read_triplets(
    layout: DataLayout, lineage: LineageCatalog
) -> tuple[pl.DataFrame | None, dict[str, str]]:
    """The current shards of the triplets asset (retired ones and ones that failed blocking
    checks left out, as training leaves them out), and the versions read ("triplets/<shard>")."""
    shards, _ = lineage.partitions_to_combine(TRIPLETS_ASSET)
    if not shards:
        return None, {}

    def read() -> pl.DataFrame | None:
        paths = [layout.shard_table(TRIPLETS_ASSET, s) for s in shards]
        frames = [read_parquet(p) for p in paths if p.exists()]  # a Path or an object
        return pl.concat(frames, how="diagonal_relaxed") if frames else None

    frame, versions = read_with_versions(lineage, TRIPLETS_ASSET, shards, read)
    return frame, {f"{TRIPLETS_ASSET}/{s}": v for s, v in versions.items()}


def score_partition(
    partition: str,
    retriever_id: str,
    benchmark: str,
    base: RetrieverSpec,
    sources: Callable[..., BenchmarkSources],
    settings: EvaluationSettings,
    layout: DataLayout,
    lineage: LineageCatalog,
    pool: RetrieverPool,
    config: Mapping[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> StepResult:
    """Score `benchmark` for `retriever_id` (see the module docstring).

    `sources(triplets, locate_images)` builds the benchmark sources from a triplets reader and
    an image locator (both used by "heldout" only); `partition` is the Dagster partition key
    the catalog rows are filed under.
    """
    spec = resolve_retriever(retriever_id, base, layout)
    retriever = pool.get(spec)
    input_versions: dict[str, str] = {}

    def triplets() -> pl.DataFrame | None:
        frame, versions = read_triplets(layout, lineage)
        input_versions.update(versions)
        return frame

    out = output_dir(layout, retriever_id, benchmark)

    def locate(image_ids: list[str]) -> dict[str, str]:
        return image_uris(lineage, image_ids)

    cache = gallery_cache(layout)
    result = evaluate_benchmark(
        retriever,
        benchmark,
        sources(triplets, locate),
        cache,
        out,
        settings,
        log,
        # Drops the cache entries of deleted checkpoints, once the benchmark has loaded.
        before_first_split=lambda: cache.keep_tidy(retriever.retriever_id, spec),
    )
    input_versions.update(_checkpoint_version(spec, layout, lineage))
    rows = result.rows()
    table_path = out / "scores.parquet"
    write_parquet_atomic(rows, table_path)
    submissions = {p.name: p for s in result.splits for p in s.submissions}
    # The catalog holds the other retrievers' latest scores; this one's are not committed yet.
    others = scores_for(lineage, rows["benchmark"][0]).filter(
        pl.col("retriever_id") != retriever_id
    )
    mine = rows.filter(pl.col("status") == STATUS_SCORED).select(COMPARED_COLUMNS)
    compared = pl.concat([others.select(COMPARED_COLUMNS), mine], how="vertical_relaxed")
    return StepResult(
        partition=partition,
        outputs={"scores": table_path, **submissions},
        row_counts={"scores": int((rows["status"] == STATUS_SCORED).sum())},
        row_count_key="scores",
        row_count_label="metric scores",  # the run log's `benchmark_scores[...]: 4 metric scores`
        config={"benchmark": benchmark, **(config or {})},
        model_ids={"retriever": retriever_id, "weights_fingerprint": spec.fingerprint()},
        input_versions=input_versions,
        rows={SCORES_TABLE.name: rows.with_columns(partition=pl.lit(partition))},
        outcomes=check_scores(rows),
        preview=rows.select("split", "metric", "value", "status", "detail"),
        metadata={
            **headline_metadata(result),
            "compared_retrievers": ", ".join(sorted(set(compared["retriever_id"]))),
        },
        markdown={
            "scores": result.table_markdown(),
            "comparison": comparison_markdown(
                compared, f"{benchmark}: retrievers compared", base.retriever_id
            ),
        },
    )


def check_scores(rows: pl.DataFrame) -> list[CheckOutcome]:
    """Scores are finite percentages; every split's files were found."""
    scored = rows.filter(pl.col("status") == STATUS_SCORED)
    bad = [
        f"{r['split']}/{r['metric']}={r['value']}"
        for r in scored.iter_rows(named=True)
        if r["value"] is None or not math.isfinite(r["value"]) or not 0.0 <= r["value"] <= 100.0
    ]
    skipped = rows.filter(pl.col("status") == STATUS_SKIPPED)
    missing = [f"{r['split']}: {r['detail']}" for r in skipped.iter_rows(named=True)]
    return [
        outcome("scores_are_percentages", bad, "scores lie in [0, 100]"),
        outcome("benchmark_files_present", missing, "every split's files were found"),
    ]


def headline_metadata(result: BenchmarkResult) -> dict[str, Any]:
    """Numbers the UI can chart over materializations: the benchmark's headline metrics.

    The headline is the mean row of a multi-split benchmark (FashionIQ, GeneCIS) or the one
    split of the others. A multi-split benchmark with a split skipped has no mean, and so no
    headline numbers: one category's score under the benchmark's name would chart as if it
    were the mean. `gallery_reused` is true when every gallery embedded was read from the
    cache (test splits included; the mean row has no gallery of its own). `queries_left_out`
    counts the queries the benchmark's protocol left out (GeneCIS: galleries of another length
    than the task's most common), `queries_left_out_detail` says where and why.
    """
    scored = result.scored()
    embedded = [s for s in result.splits if s.gallery_reused is not None]
    metadata: dict[str, Any] = {
        "retriever_id": result.retriever_id,
        "benchmark": result.benchmark,
        "splits_scored": sum(s.split != MEAN_SPLIT for s in scored),
        "splits_skipped": sum(s.status == STATUS_SKIPPED for s in result.splits),
        # Queries the protocol left out (GeneCIS's odd gallery lengths), told per split.
        "queries_left_out": sum(s.queries_left_out for s in scored if s.split != MEAN_SPLIT),
        "gallery_reused": bool(embedded) and all(s.gallery_reused for s in embedded),
    }
    means = [s for s in scored if s.split == MEAN_SPLIT]
    headline = means[0] if means else (scored[0] if len(result.splits) == 1 and scored else None)
    left_out = [
        f"{s.split}: {s.detail}" for s in scored if s.queries_left_out and s.split != MEAN_SPLIT
    ]
    if left_out:
        metadata["queries_left_out_detail"] = "\n".join(left_out)
    if headline is not None:
        metadata.update({name: round(value, 4) for name, value in headline.metrics.items()})
        metadata["headline"] = headline.split
    elif scored:
        metadata["headline"] = "none: a split was skipped, so there is no mean over the splits"
    return metadata


def checkpoint_config_name(spec: RetrieverSpec, layout: DataLayout) -> str | None:
    """The training config (the `mmret_clip_checkpoint` partition) whose export `spec` loads,
    or None for a retriever that is not a trained checkpoint of this data root."""
    if not spec.model_name.startswith(LOCAL_DIR_PREFIX):
        return None
    folder = Path(spec.model_name.removeprefix(LOCAL_DIR_PREFIX))
    root = local_checkpoint_root(layout)  # a local copy keeps the relative folders
    try:
        return folder.resolve().relative_to(root.resolve()).parts[0]
    except (ValueError, IndexError):
        return None


def trained_retrievers_by_config(base: RetrieverSpec, layout: DataLayout) -> dict[str, list[str]]:
    """Training config -> the retriever ids of its exports found on disk (base model left out)."""
    by_config: dict[str, list[str]] = {}
    for retriever_id, spec in known_retrievers(base, layout).items():
        config_name = checkpoint_config_name(spec, layout)
        if config_name is not None:
            by_config.setdefault(config_name, []).append(retriever_id)
    return by_config


def _checkpoint_version(
    spec: RetrieverSpec, layout: DataLayout, lineage: LineageCatalog
) -> dict[str, str]:
    """For a trained checkpoint: the training materialization that wrote it."""
    config_name = checkpoint_config_name(spec, layout)
    if config_name is None:
        return {}
    versions = lineage.latest_materialization_ids(CHECKPOINT_ASSET, [config_name])
    return {f"{CHECKPOINT_ASSET}/{p}": v for p, v in versions.items()}
