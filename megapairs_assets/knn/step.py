"""KNN graphs as plain work: one index over a defined corpus, then one shard's queries at a time.

The corpus a graph searches is an explicit, recorded set: the corpus source's current shards
(not whatever happens to sit in the data root, nor every partition ever registered). Its
version (a hash of each shard's embedding materialization id) goes into lineage, and a graph
over a corpus with missing embedding tables fails the blocking check `knn_corpus_complete`
unless the user allows a partial corpus explicitly, in which case metadata and lineage say so.

A shard whose inputs did not change keeps its graph (knn/reuse.py): `plan_knn_step` decides
that from footers alone, before any index is built, and a step whose shards all keep their
graphs builds none and reads no vector.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from megapairs_assets.embeddings.compute import read_embedding_table
from megapairs_assets.embeddings.sources import SimilaritySource
from megapairs_assets.knn.reuse import (
    DamagedTable,
    NoTable,
    NotReusable,
    TableFooter,
    corpus_content_key,
    knn_reuse_key,
    read_footer,
    reusable_graph,
    stored_metadata,
    stored_reuse_key,
)
from megapairs_assets.knn.search import (
    KNN_SCHEMA,
    IndexSpec,
    build_index,
    check_knn,
    describe_backend,
    index_build_identity,
    search_neighbors,
)
from megapairs_assets.lib.preview import histogram_markdown, percentile_table
from megapairs_assets.lib.progress import Progress
from megapairs_assets.lib.quality import CheckOutcome
from megapairs_assets.lib.step import StepResult
from megapairs_assets.lib.storage import DataLayout, DataPath, read_parquet, write_parquet_atomic
from megapairs_assets.lineage.catalog import LineageCatalog, read_with_versions

if TYPE_CHECKING:  # faiss is imported only where a faiss index is built (not on torch-only hosts)
    import faiss

    from megapairs_assets.knn.torch_search import TorchFlatIndex

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


@dataclass(frozen=True)
class CorpusState:
    """Which embedding tables make up a graph's corpus, known from their footers alone.

    corpus_shards: the corpus source's current shards, in the order the index holds them.
    versions: shard -> materialization id of the embedding table read (shards with a table
        and a complete catalog record; the others are `missing_shards`).
    footers: shard -> that table's footer (its digest stands for its content in reuse keys).
    """

    source: SimilaritySource
    corpus_shards: list[str]
    versions: dict[str, str]
    footers: dict[str, TableFooter]

    @property
    def missing_shards(self) -> list[str]:
        """Corpus shards without a usable embedding table (not searched)."""
        return sorted(set(self.corpus_shards) - set(self.versions))

    @property
    def corpus_size(self) -> int:
        """Vectors the index holds: the rows of every table in the corpus."""
        return sum(footer.rows for footer in self.footers.values())

    @property
    def corpus_version(self) -> str:
        """A short hash naming exactly which embedding materializations were searched."""
        text = "\n".join(f"{shard}={self.versions[shard]}" for shard in sorted(self.versions))
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    @property
    def keyless_shards(self) -> list[str]:
        """Corpus shards whose embedding table has no reuse key of its own."""
        return [s for s, footer in self.footers.items() if footer.embedding_reuse_key is None]

    @cached_property
    def content_key(self) -> str | None:
        """The digest of the whole corpus (knn/reuse.py), computed once per state."""
        return corpus_content_key(self.corpus_shards, self.footers)

    def reuse_key(self, shard: str, spec: IndexSpec, code_version: str | None) -> str | None:
        """The reuse key of `shard`'s graph over this corpus (knn/reuse.py); None when there
        is none: no code version, a shard outside the corpus, or a table without a key."""
        if code_version is None or shard not in self.versions or self.content_key is None:
            return None
        build = index_build_identity(spec, self.corpus_size)
        return knn_reuse_key(code_version, self.source.knn_asset, shard, self.content_key, build)


def read_corpus_state(
    source: SimilaritySource,
    corpus_shards: list[str],
    layout: DataLayout,
    catalog: LineageCatalog,
) -> CorpusState:
    """The corpus `build_corpus_index` would index, from the tables' footers (no vector read)."""
    asset = source.embedding_asset

    def read() -> dict[str, TableFooter]:
        footers = {}
        for shard in corpus_shards:
            try:
                footers[shard] = read_footer(layout.shard_table(asset, shard))
            except FileNotFoundError:
                continue
        return footers

    footers, versions = read_with_versions(catalog, asset, corpus_shards, read)
    return _corpus_state(source, corpus_shards, footers, versions, layout)


def _corpus_state(
    source: SimilaritySource,
    corpus_shards: list[str],
    footers: dict[str, TableFooter],
    versions: dict[str, str],
    layout: DataLayout,
) -> CorpusState:
    # A table on disk without a complete catalog record is not part of the corpus.
    used = [shard for shard in corpus_shards if shard in footers and shard in versions]
    if not used:
        asset = source.embedding_asset
        raise FileNotFoundError(
            f"no {asset} tables for the corpus shards {corpus_shards[:5]}... under "
            f"{layout.data_dir / asset}: materialize {asset} first"
        )
    return CorpusState(
        source=source,
        corpus_shards=list(corpus_shards),
        versions={shard: versions[shard] for shard in used},
        footers={shard: footers[shard] for shard in used},
    )


@dataclass
class CorpusIndex:
    """One index over the embedding tables of a defined set of corpus shards."""

    state: CorpusState
    ids: np.ndarray
    vectors: np.ndarray
    index: faiss.Index | TorchFlatIndex | None  # None: the tables hold no vectors
    spec: IndexSpec
    position: dict[str, int] = field(default_factory=dict)

    @property
    def source(self) -> SimilaritySource:
        """The similarity source whose embedding table is indexed."""
        return self.state.source

    @property
    def corpus_shards(self) -> list[str]:
        """The corpus source's shards the index was asked to hold."""
        return self.state.corpus_shards

    @property
    def versions(self) -> dict[str, str]:
        """Shard -> materialization id of each embedding table indexed."""
        return self.state.versions

    @property
    def missing_shards(self) -> list[str]:
        """Corpus shards without a usable embedding table (not searched)."""
        return self.state.missing_shards

    @property
    def corpus_version(self) -> str:
        """A short hash naming exactly which embedding materializations were searched."""
        return self.state.corpus_version


def build_corpus_index(
    source: SimilaritySource,
    corpus_shards: list[str],
    spec: IndexSpec,
    layout: DataLayout,
    catalog: LineageCatalog,
) -> CorpusIndex:
    """Load the corpus shards' embeddings (recording the versions and footers read) and build
    the index."""
    asset = source.embedding_asset

    def read() -> tuple[dict[str, TableFooter], dict[str, tuple[np.ndarray, np.ndarray]]]:
        footers, tables = {}, {}
        for shard in corpus_shards:
            path = layout.shard_table(asset, shard)
            if path.exists():
                # The footer of the very table read: the reuse keys name what was indexed.
                footers[shard] = read_footer(path)
                tables[shard] = read_embedding_table(path)
        return footers, tables

    (footers, tables), versions = read_with_versions(catalog, asset, corpus_shards, read)
    state = _corpus_state(source, corpus_shards, footers, versions, layout)
    used = list(state.versions)
    corpus_ids = np.concatenate([tables[shard][0] for shard in used])
    corpus_vectors = np.concatenate([tables[shard][1] for shard in used])
    return CorpusIndex(
        state=state,
        ids=corpus_ids,
        vectors=corpus_vectors,
        # Tables that hold no rows (a corpus without captions has no caption vectors) leave
        # nothing to index: every shard's graph is then empty, not a failed step.
        index=build_index(corpus_vectors, spec) if len(corpus_ids) else None,
        spec=spec,
        position={image_id: i for i, image_id in enumerate(corpus_ids.tolist())},
    )


@dataclass(frozen=True)
class KnnRun:
    """What every shard of one KNN step shares.

    corpus_shards: the corpus source's current shards (the corpus every shard searches).
    code_version: the stage's settings-aware code version (what Dagster shows); with it each
        graph records its reuse key (knn/reuse.py) and an unchanged shard keeps its graph.
        None: no key is written and nothing is reused.
    reuse_unchanged: False searches every shard again (the keys are still written).
    """

    source: SimilaritySource
    corpus_shards: list[str]
    spec: IndexSpec
    k: int
    allow_partial_corpus: bool = False
    code_version: str | None = None
    reuse_unchanged: bool = True


class KnnStep:
    """One KNN step's per-shard work (`shard -> StepResult`), made by `plan_knn_step`.

    Shards planned for reuse keep their graphs; the corpus index is built only when a shard
    must be searched: up front when the plan says so (a build that fails then fails the step
    before any shard is recorded), else on the first planned shard whose graph turns out not
    to stand after all.
    """

    def __init__(
        self,
        run: KnnRun,
        layout: DataLayout,
        catalog: LineageCatalog,
        log: Callable[[str], None],
        state: CorpusState | None,
        planned_reuse: set[str],
        warn: Callable[[str], None] | None = None,
    ) -> None:
        self.run = run
        self.layout = layout
        self.catalog = catalog
        self.log = log
        # A damaged kept table is a warning; a table that is merely out of date is routine.
        self.warn = warn or log
        self.planned_reuse = planned_reuse
        self._state = state
        self._corpus: CorpusIndex | None = None

    @property
    def index_built(self) -> bool:
        """Whether the corpus index was built (False: every shard kept its graph)."""
        return self._corpus is not None

    @property
    def state(self) -> CorpusState:
        """The corpus as last read: the built index's, else the plan's footers."""
        if self._corpus is not None:
            return self._corpus.state
        if self._state is None:
            raise RuntimeError("the KNN step has neither a corpus state nor an index")
        return self._state

    def corpus_index(self) -> CorpusIndex:
        """The corpus index, built now if it was not yet."""
        if self._corpus is None:
            run = self.run
            corpus = build_corpus_index(
                run.source, run.corpus_shards, run.spec, self.layout, self.catalog
            )
            self.log(
                f"{run.spec.kind} index over {len(corpus.ids)} vectors of "
                f"{len(corpus.versions)} shards"
                + (f"; missing: {corpus.missing_shards}" if corpus.missing_shards else "")
            )
            self._corpus = corpus
        return self._corpus

    def __call__(self, shard: str) -> StepResult:
        run = self.run
        if shard in self.planned_reuse:
            # The newest corpus read decides: after a build, the tables the index holds.
            state = self.state
            key = state.reuse_key(shard, run.spec, run.code_version)
            try:
                if key is None:
                    raise NotReusable("the corpus tables cannot vouch for their content")
                path = self.layout.shard_table(run.source.knn_asset, shard)
                neighbors, outcomes = reusable_graph(path, key, run.k)
            except NotReusable as why:
                report = self.warn if isinstance(why, DamagedTable) else self.log
                report(f"{run.source.knn_asset}[{shard}]: searching it: {why}")
            else:
                self.log(f"{run.source.knn_asset}[{shard}]: inputs unchanged, table reused")
                return _describe(
                    shard,
                    state,
                    run.spec,
                    run.k,
                    run.allow_partial_corpus,
                    path,
                    neighbors,
                    queries=state.footers[shard].rows,
                    outcomes=outcomes,
                    reused=True,
                )
        return knn_shard(
            shard,
            self.corpus_index(),
            run.k,
            self.layout,
            run.allow_partial_corpus,
            self.log,
            code_version=run.code_version,
        )


def plan_knn_step(
    shards: Sequence[str],
    run: KnnRun,
    layout: DataLayout,
    catalog: LineageCatalog,
    log: Callable[[str], None] = print,
    warn: Callable[[str], None] | None = None,
) -> KnnStep:
    """Decide which of `shards` keep their graphs, from footers only (each corpus table's and
    each shard's graph's), and build the corpus index now unless every shard keeps its graph.
    """
    state: CorpusState | None = None
    planned: set[str] = set()
    if run.code_version is not None and run.reuse_unchanged:
        state = read_corpus_state(run.source, run.corpus_shards, layout, catalog)
        if state.keyless_shards:
            log(
                f"{run.source.knn_asset}: searching every shard: {len(state.keyless_shards)} "
                f"{run.source.embedding_asset} tables have no reuse key (written before reuse "
                f"existed, e.g. {state.keyless_shards[0]}); re-materialize them to write one"
            )
        for shard in shards:
            key = state.reuse_key(shard, run.spec, run.code_version)
            if key is None:
                continue  # keyless tables (logged above), or outside the corpus: fails below
            try:
                stored = stored_reuse_key(layout.shard_table(run.source.knn_asset, shard))
            except NoTable:
                continue
            except NotReusable as why:
                report = (warn or log) if isinstance(why, DamagedTable) else log
                report(f"{run.source.knn_asset}[{shard}]: searching it: {why}")
                continue
            if stored == key:
                planned.add(shard)
            else:
                log(
                    f"{run.source.knn_asset}[{shard}]: searching it: its inputs or settings changed"
                )
    step = KnnStep(run, layout, catalog, log, state, planned, warn)
    if len(planned) < len(shards):
        step.corpus_index()
    return step


def knn_shard(
    shard: str,
    corpus: CorpusIndex,
    k: int,
    layout: DataLayout,
    allow_partial_corpus: bool = False,
    log: Callable[[str], None] = print,
    code_version: str | None = None,
) -> StepResult:
    """The k nearest corpus images of each image of `shard` (self excluded).

    code_version: the stage's settings-aware code version; given, the graph's footer records
    its reuse key (knn/reuse.py) so a later run with the same inputs keeps it.
    """
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
    metadata = stored_metadata(corpus.state.reuse_key(shard, corpus.spec, code_version))
    # The key goes into the graph's own footer, in the same atomic write as its rows.
    write_parquet_atomic(neighbors, path, metadata=metadata)
    return _describe(
        shard,
        corpus.state,
        corpus.spec,
        k,
        allow_partial_corpus,
        path,
        neighbors,
        queries=len(rows),
        outcomes=check_knn(neighbors, k),
        reused=False,
    )


def _describe(
    shard: str,
    state: CorpusState,
    spec: IndexSpec,
    k: int,
    allow_partial_corpus: bool,
    path: DataPath,
    neighbors: pl.DataFrame,
    queries: int,
    outcomes: list[CheckOutcome],
    reused: bool,
) -> StepResult:
    """One shard's StepResult, the same for a searched and a kept graph."""
    config: dict[str, Any] = {
        "k": k,
        "index": spec.__dict__,
        "backend": describe_backend(spec),
        "corpus_size": state.corpus_size,
        "corpus_shards": len(state.corpus_shards),
        "corpus_version": state.corpus_version,
        "missing_shards": state.missing_shards,
        "allow_partial_corpus": allow_partial_corpus,
    }
    return StepResult(
        partition=shard,
        outputs={"knn": path},
        # One row per (query, neighbour): "neighbours" says what a row is.
        row_counts={"queries": queries, "neighbours": neighbors.height},
        row_count_key="neighbours",
        config=config,
        input_versions={
            f"{state.source.embedding_asset}/{s}": v for s, v in state.versions.items()
        },
        outcomes=[*outcomes, corpus_complete_outcome(state, allow_partial_corpus)],
        metadata={
            "corpus_size": state.corpus_size,
            "corpus_version": state.corpus_version,
            "missing_corpus_shards": ", ".join(state.missing_shards) or "none",
            "neighbours_per_query": k,
            "reused": reused,
        },
        markdown={
            # What mining's score band cuts: the shape of every neighbour's cosine similarity.
            "score_histogram": histogram_markdown(neighbors["score"], label="cosine score"),
            "score_percentiles": percentile_table(neighbors["score"]),
        },
        preview=neighbors.head(10),
    )


def corpus_complete_outcome(
    corpus: CorpusState | CorpusIndex, allow_partial_corpus: bool
) -> CheckOutcome:
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
