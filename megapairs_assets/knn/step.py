"""KNN graphs as plain work: one index over a defined corpus, then one shard's queries at a time.

The corpus a graph searches is an explicit, recorded set: the corpus source's current shards
(not whatever happens to sit in the data root, nor every partition ever registered). Its
version (a hash of each shard's embedding materialization id) goes into lineage, and a graph
over a corpus with missing embedding tables fails the blocking check `knn_corpus_complete`
unless the user allows a partial corpus explicitly, in which case metadata and lineage say so.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from megapairs_assets.embeddings.compute import read_embedding_table
from megapairs_assets.embeddings.sources import SimilaritySource
from megapairs_assets.knn.search import (
    KNN_SCHEMA,
    IndexSpec,
    build_index,
    check_knn,
    describe_backend,
    search_neighbors,
)
from megapairs_assets.lib.preview import percentile_table
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.step import StepResult

if TYPE_CHECKING:  # faiss is imported only where a faiss index is built (not on torch-only hosts)
    import faiss

    from megapairs_assets.knn.torch_search import TorchFlatIndex
from megapairs_assets.lib.storage import DataLayout, read_parquet, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions

KNN_CHECKS = {
    "knn_no_self_neighbors": "A query is never its own neighbour",
    "knn_ranks_contiguous": "Each query's ranks are 0..n-1",
    "knn_scores_non_increasing": "Scores never rise with rank within a query",
    "knn_scores_are_cosines": "Scores lie in [-1, 1] (unit vectors)",
    "knn_at_most_k_per_query": "At most k neighbours per query",
    "knn_rows_sorted": "Rows are stored by query_id, then rank",
    "knn_corpus_complete": "Every shard of the corpus has an embedding table (else the graph "
    "misses neighbours), unless a partial corpus was allowed explicitly",
}


@dataclass
class CorpusIndex:
    """One index over the embedding tables of a defined set of corpus shards."""

    source: SimilaritySource
    corpus_shards: list[str]
    ids: np.ndarray
    vectors: np.ndarray
    index: faiss.Index | TorchFlatIndex | None  # None: the tables hold no vectors
    spec: IndexSpec
    versions: dict[str, str]
    missing_shards: list[str] = field(default_factory=list)
    position: dict[str, int] = field(default_factory=dict)

    @property
    def corpus_version(self) -> str:
        """A short hash naming exactly which embedding materializations were searched."""
        text = "\n".join(f"{shard}={self.versions[shard]}" for shard in sorted(self.versions))
        return hashlib.sha256(text.encode()).hexdigest()[:16]


def build_corpus_index(
    source: SimilaritySource,
    corpus_shards: list[str],
    spec: IndexSpec,
    layout: DataLayout,
    catalog: LineageCatalog,
) -> CorpusIndex:
    """Load the corpus shards' embeddings (recording the versions read) and build the index."""
    asset = source.embedding_asset

    def read() -> tuple[list[str], list[np.ndarray], list[np.ndarray]]:
        used, ids, vectors = [], [], []
        for shard in corpus_shards:
            path = layout.shard_table(asset, shard)
            if path.exists():
                shard_ids, shard_vectors = read_embedding_table(path)
                used.append(shard)
                ids.append(shard_ids)
                vectors.append(shard_vectors)
        return used, ids, vectors

    (used, ids, vectors), versions = read_with_versions(catalog, asset, corpus_shards, read)
    # A table on disk without a complete catalog record is not part of the corpus.
    keep = [i for i, shard in enumerate(used) if shard in versions]
    used = [used[i] for i in keep]
    if not used:
        raise FileNotFoundError(
            f"no {asset} tables for the corpus shards {corpus_shards[:5]}... under "
            f"{layout.data_dir / asset}: materialize {asset} first"
        )
    corpus_ids = np.concatenate([ids[i] for i in keep])
    corpus_vectors = np.concatenate([vectors[i] for i in keep])
    return CorpusIndex(
        source=source,
        corpus_shards=list(corpus_shards),
        ids=corpus_ids,
        vectors=corpus_vectors,
        # Tables that hold no rows (a corpus without captions has no caption vectors) leave
        # nothing to index: every shard's graph is then empty, not a failed step.
        index=build_index(corpus_vectors, spec) if len(corpus_ids) else None,
        spec=spec,
        versions={shard: versions[shard] for shard in used},
        missing_shards=sorted(set(corpus_shards) - set(used)),
        position={image_id: i for i, image_id in enumerate(corpus_ids.tolist())},
    )


def knn_shard(
    shard: str,
    corpus: CorpusIndex,
    k: int,
    layout: DataLayout,
    allow_partial_corpus: bool = False,
    log: Callable[[str], None] = print,
) -> StepResult:
    """The k nearest corpus images of each image of `shard` (self excluded)."""
    asset_name = corpus.source.knn_asset
    if shard not in corpus.versions:
        raise ValueError(
            f"{asset_name}[{shard}]: shard {shard} has no {corpus.source.embedding_asset} "
            f"table in the corpus set (corpus shards: {len(corpus.corpus_shards)}); materialize "
            "it first, or check that the shard is still in the corpus source"
        )
    shard_ids, _ = read_embedding_table(layout.shard_table(corpus.source.embedding_asset, shard))
    rows = np.fromiter((corpus.position[i] for i in shard_ids.tolist()), dtype=np.int64)
    if corpus.index is None:
        log(f"{asset_name}[{shard}]: the corpus has no {corpus.source.embedding_asset} rows")
        neighbors = pl.DataFrame(schema=KNN_SCHEMA)
    else:
        with Progress(len(rows), f"{asset_name}[{shard}]", "queries", log=log) as progress:
            neighbors = search_neighbors(
                corpus.index,
                corpus.ids,
                corpus.vectors[rows],
                corpus.ids[rows],
                k,
                corpus.spec,
                on_progress=progress.update,
            )
    path = layout.shard_table(asset_name, shard)
    write_parquet_atomic(neighbors, path)
    outcomes = check_knn(neighbors, k)
    outcomes.append(corpus_complete_outcome(corpus, allow_partial_corpus))
    config: dict[str, Any] = {
        "k": k,
        "index": corpus.spec.__dict__,
        "backend": describe_backend(corpus.spec),
        "corpus_size": len(corpus.ids),
        "corpus_shards": len(corpus.corpus_shards),
        "corpus_version": corpus.corpus_version,
        "missing_shards": corpus.missing_shards,
        "allow_partial_corpus": allow_partial_corpus,
    }
    return StepResult(
        partition=shard,
        outputs={"knn": path},
        row_counts={"queries": len(rows), "edges": neighbors.height},
        row_count_key="edges",
        config=config,
        input_versions={
            f"{corpus.source.embedding_asset}/{s}": v for s, v in corpus.versions.items()
        },
        outcomes=outcomes,
        metadata={
            "corpus_size": len(corpus.ids),
            "corpus_version": corpus.corpus_version,
            "missing_corpus_shards": ", ".join(corpus.missing_shards) or "none",
            "k": k,
        },
        markdown={"score_percentiles": percentile_table(neighbors["score"])},
        preview=neighbors.head(10),
    )


def corpus_complete_outcome(corpus: CorpusIndex, allow_partial_corpus: bool) -> CheckOutcome:
    """Blocking unless allowed: a graph over part of the corpus misses neighbours silently."""
    name = "knn_corpus_complete"
    if not corpus.missing_shards:
        return CheckOutcome(name, True, f"ok: all {len(corpus.corpus_shards)} corpus shards")
    listed = ", ".join(corpus.missing_shards[:10])
    if allow_partial_corpus:
        return CheckOutcome(
            name,
            True,
            f"partial corpus allowed by config: {len(corpus.missing_shards)} shards without "
            f"embeddings were not searched ({listed})",
        )
    return CheckOutcome(
        name,
        False,
        f"{len(corpus.missing_shards)} of {len(corpus.corpus_shards)} corpus shards have no "
        f"{corpus.source.embedding_asset} table ({listed}); materialize them, or set "
        "allow_partial_corpus",
        failing_rows=len(corpus.missing_shards),
        examples=tuple(corpus.missing_shards[:5]),
    )


def read_knn_tables(
    sources: list[SimilaritySource], shard: str, layout: DataLayout, catalog: LineageCatalog
) -> tuple[dict[str, pl.DataFrame], dict[str, str]]:
    """Each source's KNN table for one shard, with the versions read (keyed "asset/shard")."""
    tables, versions = {}, {}
    for source in sources:
        frame, read = read_with_versions(
            catalog,
            source.knn_asset,
            [shard],
            lambda source=source: read_parquet(layout.shard_table(source.knn_asset, shard)),
            required=True,
        )
        tables[source.name] = frame
        versions[f"{source.knn_asset}/{shard}"] = read.get(shard, "unknown")
    return tables, versions


def recheck_knn_shard(
    source: SimilaritySource, shard: str, layout: DataLayout, catalog: LineageCatalog
) -> list[CheckOutcome]:
    """The KNN checks on the shard's table as it is on disk, with the k it was built with."""
    from megapairs_assets.corpus.step import latest_config

    k = int(latest_config(catalog, source.knn_asset, shard).get("k", 0)) or None
    neighbors = read_parquet(layout.shard_table(source.knn_asset, shard))
    if k is None:  # no record: the widest rank on disk is the most the check can assume
        k = int(neighbors["rank"].max() or 0) + 1
    return check_knn(neighbors, k)
