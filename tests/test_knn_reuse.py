"""A KNN shard whose inputs did not change keeps its graph; the corpus index is not even built.

Embedding tables are written as the embedding step writes them (`write_embedding_table` with
the step's footer: its reuse key over the shard's (image_id, content_hash) and skipped rows)
and recorded in a real lineage catalog; the KNN step then runs through `plan_knn_step` and
`run_recorded`, as the asset runs it. Index builds and embedding reads are counted. What is
proved: a no-change re-run builds no index and reads no vector; any change to any corpus shard
(another shard's vectors too), to the corpus set, to k or the index searches every shard
again; a damaged, keyless or failing graph is searched again; a reused shard records what a
searched one records; and the asset wiring does it through Dagster.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest

import megapairs_assets.knn.step as knn_step
from megapairs_assets.corpus.images import ImageLimits
from megapairs_assets.embeddings.compute import read_embedding_table, write_embedding_table
from megapairs_assets.embeddings.reuse import shard_reuse_key
from megapairs_assets.embeddings.reuse import stored_metadata as embedding_footer
from megapairs_assets.embeddings.sources import source_named
from megapairs_assets.knn.reuse import REUSE_KEY_FIELD, read_footer
from megapairs_assets.knn.search import IndexSpec, index_build_identity
from megapairs_assets.knn.step import KnnRun, plan_knn_step
from megapairs_assets.lib.step import StepResult, content_version, run_recorded
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.lineage.catalog import LineageCatalog, MaterializationRecord, utc_now

SOURCE = source_named("clip_image")
SHARDS = ["00000", "00001", "00002"]
ROWS_PER_SHARD = 24
DIM = 16
K = 5
EMBEDDING_VERSION = "embeddings-v1+s.aaaaaaaaaaaa"
KNN_VERSION = "knn-v2+s.bbbbbbbbbbbb"
FLAT = IndexSpec(backend="faiss")


class Corpus:
    """Embedding tables of a few shards, on disk and in the catalog, editable shard by shard."""

    def __init__(self, root: Path) -> None:
        self.layout = DataLayout(root / "home")
        self.catalog = LineageCatalog(self.layout.catalog_path)
        self.seeds = {shard: number for number, shard in enumerate(SHARDS)}
        for shard in SHARDS:
            self.embed(shard)

    def embed(self, shard: str, seed: int | None = None, *, keep_key: bool = False) -> None:
        """(Re-)write a shard's table as the embedding step would. A new `seed` is new
        pictures (new content hashes, so a new key) unless `keep_key`: the same inputs
        embedded into other vectors (another batch size, a non-deterministic GPU kernel)."""
        if seed is not None and not keep_key:
            self.seeds[shard] = seed
        vector_seed = seed if seed is not None else self.seeds[shard]
        ids = [f"{shard}/{i:03d}" for i in range(ROWS_PER_SHARD)]
        rows = pl.DataFrame(
            {"image_id": ids, "content_hash": [f"{self.seeds[shard]}-{i}" for i in ids]}
        )
        key = shard_reuse_key(
            EMBEDDING_VERSION, SOURCE.embedding_asset, "image", rows, ImageLimits()
        )
        rng = np.random.default_rng(vector_seed)
        vectors = rng.standard_normal((ROWS_PER_SHARD, DIM)).astype(np.float32)
        vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
        path = self.layout.shard_table(SOURCE.embedding_asset, shard)
        write_embedding_table(path, ids, vectors, "fake:image", metadata=embedding_footer(key, []))
        self.record(shard)

    def record(self, shard: str) -> None:
        """A new complete materialization of the shard's table (a reused one records one too)."""
        self.catalog.record(
            MaterializationRecord(SOURCE.embedding_asset, shard, "r", "v", "demo", utc_now(), 0)
        )

    def graph(self, shard: str) -> Path:
        return self.layout.shard_table(SOURCE.knn_asset, shard)


class Counts:
    """How often the KNN step built an index and read embedding vectors."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.builds = 0
        self.embedding_reads = 0
        build, read = knn_step.build_index, knn_step.read_embedding_table

        def counting_build(*args, **kwargs):
            self.builds += 1
            return build(*args, **kwargs)

        def counting_read(*args, **kwargs):
            self.embedding_reads += 1
            return read(*args, **kwargs)

        monkeypatch.setattr(knn_step, "build_index", counting_build)
        monkeypatch.setattr(knn_step, "read_embedding_table", counting_read)

    def reset(self) -> None:
        self.builds = self.embedding_reads = 0


@pytest.fixture
def corpus(tmp_path: Path) -> Corpus:
    return Corpus(tmp_path)


@pytest.fixture
def counts(monkeypatch: pytest.MonkeyPatch) -> Counts:
    return Counts(monkeypatch)


def _run(
    corpus: Corpus,
    *,
    corpus_shards: list[str] = SHARDS,
    spec: IndexSpec = FLAT,
    k: int = K,
    code_version: str | None = KNN_VERSION,
    reuse_unchanged: bool = True,
    allow_partial_corpus: bool = False,
    log: Callable[[str], None] | None = None,
    warn: Callable[[str], None] | None = None,
    run_id: str = "run",
) -> list[StepResult]:
    """One KNN step over every shard, each recorded in the catalog as the asset records it."""
    run = KnnRun(
        SOURCE,
        corpus_shards,
        spec,
        k,
        allow_partial_corpus=allow_partial_corpus,
        code_version=code_version,
        reuse_unchanged=reuse_unchanged,
    )
    logged = log or (lambda _: None)
    step = plan_knn_step(SHARDS, run, corpus.layout, corpus.catalog, logged, warn)
    return [
        run_recorded(
            step,
            shard,
            asset=SOURCE.knn_asset,
            code_version=code_version or "none",
            run_id=run_id,
            profile="demo",
            catalog=corpus.catalog,
        )
        for shard in SHARDS
    ]


def _reused(results: list[StepResult]) -> list[bool]:
    return [bool(r.metadata["reused"]) for r in results]


def _comparable(result: StepResult) -> dict:
    """Everything a shard reports except how it got there."""
    return {
        "partition": result.partition,
        "outputs": result.outputs,
        "row_counts": result.row_counts,
        "config": result.config,
        "model_ids": result.model_ids,
        "input_versions": result.input_versions,
        "outcomes": result.outcomes,
        "metadata": {k: v for k, v in result.metadata.items() if k != "reused"},
        "markdown": result.markdown,
        "preview": result.preview.to_dicts() if result.preview is not None else None,
    }


def test_an_unchanged_rerun_builds_no_index_and_reads_no_vector(
    corpus: Corpus, counts: Counts
) -> None:
    first = _run(corpus)
    assert _reused(first) == [False, False, False]
    assert counts.builds == 1 and counts.embedding_reads == 3 + 3  # the index, then each query
    files = {shard: corpus.graph(shard).read_bytes() for shard in SHARDS}
    assert all(REUSE_KEY_FIELD in read_footer(corpus.graph(s)).metadata for s in SHARDS)

    # The embedding step ran again and kept every table: new materializations, same bytes.
    for shard in SHARDS:
        corpus.record(shard)
    counts.reset()
    logged: list[str] = []
    second = _run(corpus, log=logged.append)

    assert _reused(second) == [True, True, True]
    assert counts.builds == 0 and counts.embedding_reads == 0
    assert {shard: corpus.graph(shard).read_bytes() for shard in SHARDS} == files
    assert f"{SOURCE.knn_asset}[00001]: inputs unchanged, table reused" in logged
    assert not any("index over" in line for line in logged)
    assert all(o.passed for r in second for o in r.outcomes)
    # The reused shard names the embedding materializations current now, as a search would.
    current = corpus.catalog.latest_materialization_ids(SOURCE.embedding_asset, SHARDS)
    assert second[0].input_versions == {f"{SOURCE.embedding_asset}/{s}": current[s] for s in SHARDS}

    counts.reset()
    forced = _run(corpus, reuse_unchanged=False)
    assert _reused(forced) == [False, False, False] and counts.builds == 1
    assert [_comparable(r) for r in second] == [_comparable(r) for r in forced]
    # Searching again wrote the same bytes (key included): nothing downstream turns stale.
    assert {shard: corpus.graph(shard).read_bytes() for shard in SHARDS} == files


@pytest.mark.parametrize(
    "change",
    ["new_pictures", "same_inputs_other_vectors", "shard_left", "shard_missing", "k", "ivf"],
)
def test_any_change_to_the_corpus_or_settings_searches_every_shard(
    corpus: Corpus, counts: Counts, change: str
) -> None:
    _run(corpus)
    options: dict = {}
    if change == "new_pictures":  # another shard than the queries of 00000 and 00001
        corpus.embed("00002", seed=42)
    elif change == "same_inputs_other_vectors":  # the embedding key alone would not see it
        corpus.embed("00002", seed=43, keep_key=True)
    elif change == "shard_left":  # the corpus source no longer lists 00002 (graphs of 00000/1)
        options = {"corpus_shards": SHARDS[:2]}
    elif change == "shard_missing":  # a new shard is listed, its embeddings are not there yet
        options = {"corpus_shards": [*SHARDS, "00003"], "allow_partial_corpus": True}
    elif change == "k":  # settings are in the code version
        options = {"k": K + 1, "code_version": "knn-v2+s.cccccccccccc"}
    else:
        options = {"spec": IndexSpec(kind="ivf", nlist=2, nprobe=2)}
    counts.reset()
    if change == "shard_left":
        run = KnnRun(SOURCE, SHARDS[:2], FLAT, K, code_version=KNN_VERSION)
        step = plan_knn_step(SHARDS[:2], run, corpus.layout, corpus.catalog, lambda _: None)
        results = [step(shard) for shard in SHARDS[:2]]
        searched = pl.concat([pl.read_parquet(r.outputs["knn"]) for r in results])
        assert not searched["neighbor_id"].str.starts_with("00002/").any()
    else:
        results = _run(corpus, **options)
    assert not any(_reused(results))
    assert counts.builds == 1
    # And once searched again, the next unchanged run keeps them all.
    if change != "shard_left":
        counts.reset()
        assert all(_reused(_run(corpus, **options))) and counts.builds == 0


def test_a_changed_neighbour_shard_changes_the_graphs_it_feeds(corpus: Corpus) -> None:
    """The point of keying on the whole corpus: shard 00000's own table did not change, but
    its neighbours now come from 00002's new vectors."""
    before = pl.read_parquet(_run(corpus)[0].outputs["knn"])
    corpus.embed("00002", seed=42)
    results = _run(corpus)
    after = pl.read_parquet(results[0].outputs["knn"])
    assert not results[0].metadata["reused"]
    assert not before.equals(after)  # the same query shard, other neighbours or scores
    fresh_ids, _ = read_embedding_table(corpus.layout.shard_table(SOURCE.embedding_asset, "00002"))
    assert set(after["neighbor_id"]) <= {
        *(f"{s}/{i:03d}" for s in SHARDS[:2] for i in range(ROWS_PER_SHARD)),
        *fresh_ids.tolist(),
    }


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: len(path.read_bytes()) // 2])


def _garbage(path: Path) -> None:
    path.write_bytes(b"PAR1 garbage")


def _keyless(path: Path) -> None:
    pl.read_parquet(path).write_parquet(path)  # as written before reuse existed


def _rewritten_with(frame_change: Callable[[pl.DataFrame], pl.DataFrame]) -> Callable:
    def damage(path: Path) -> None:
        metadata = read_footer(path).metadata
        frame_change(pl.read_parquet(path)).write_parquet(path, metadata=dict(metadata))

    return damage


@pytest.mark.parametrize(
    ("damage", "why"),
    [
        (_truncate, "unreadable"),
        (_garbage, "unreadable"),
        (_keyless, "no reuse key"),
        (_rewritten_with(lambda f: f.reverse()), "fails knn_rows_sorted"),
        (_rewritten_with(lambda f: f.drop("score")), "not the KNN schema"),
    ],
    ids=["truncated", "garbage", "no-key", "failing-check", "wrong-columns"],
)
def test_a_graph_that_cannot_stand_is_searched_again(
    corpus: Corpus, counts: Counts, damage: Callable[[Path], None], why: str
) -> None:
    first = _run(corpus)
    damage(corpus.graph("00001"))
    counts.reset()
    logged: list[str] = []
    warned: list[str] = []
    results = _run(corpus, log=logged.append, warn=warned.append)
    assert _reused(results) == [True, False, True]
    assert counts.builds == 1
    # A damaged graph is a warning in the run log; an out-of-date one is an info line.
    damaged = why == "unreadable"
    assert any(
        line.startswith(f"{SOURCE.knn_asset}[00001]: searching it:") and why in line
        for line in (warned if damaged else logged)
    ), (logged, warned)
    assert damaged == bool(warned), warned
    assert _comparable(results[1]) == _comparable(first[1])
    assert REUSE_KEY_FIELD in read_footer(corpus.graph("00001")).metadata


def test_a_graph_damaged_after_the_plan_is_searched_then(corpus: Corpus, counts: Counts) -> None:
    _run(corpus)
    run = KnnRun(SOURCE, SHARDS, FLAT, K, code_version=KNN_VERSION)
    counts.reset()
    step = plan_knn_step(SHARDS, run, corpus.layout, corpus.catalog, lambda _: None)
    assert step.planned_reuse == set(SHARDS) and not step.index_built
    _garbage(corpus.graph("00002"))  # between the plan and the shard's turn
    results = [step(shard) for shard in SHARDS]
    assert _reused(results) == [True, True, False] and counts.builds == 1
    assert all(o.passed for r in results for o in r.outcomes)


def test_tables_that_cannot_vouch_for_their_content_are_never_reused(corpus: Corpus) -> None:
    # An embedding table without its own key (written before reuse existed).
    _run(corpus)
    path = corpus.layout.shard_table(SOURCE.embedding_asset, "00001")
    ids, vectors = read_embedding_table(path)
    write_embedding_table(path, list(ids), vectors, "fake:image")
    corpus.record("00001")
    assert not any(_reused(_run(corpus)))
    logged: list[str] = []
    assert not any(_reused(_run(corpus, log=logged.append)))
    assert REUSE_KEY_FIELD not in read_footer(corpus.graph("00000")).metadata
    assert any("1 clip_image_embeddings tables have no reuse key" in line for line in logged)

    # A run without a code version writes no key, so nothing after it is reused either.
    corpus.embed("00001")
    _run(corpus, code_version=None)
    assert REUSE_KEY_FIELD not in read_footer(corpus.graph("00000")).metadata
    assert not any(_reused(_run(corpus)))


def test_a_reused_shard_records_what_a_searched_one_records(corpus: Corpus) -> None:
    def records(run_id: str) -> list[dict]:
        columns = "config, model_ids, input_versions, row_counts, output_paths, failed_checks"
        return corpus.catalog.query(
            f"SELECT partition, status, {columns} FROM materializations WHERE run_id = ? "
            "ORDER BY partition",
            [run_id],
        ).to_dicts()

    # A partial corpus, so the corpus check's outcome and the missing shard are recorded too.
    options = {"corpus_shards": [*SHARDS, "00009"], "allow_partial_corpus": True}
    searched = _run(corpus, run_id="first", **options)
    reused = _run(corpus, run_id="second", **options)
    again = _run(corpus, run_id="third", reuse_unchanged=False, **options)
    assert _reused(reused) == [True, True, True] and not any(_reused(again))
    assert len(records("first")) == 3
    assert records("first") == records("second") == records("third")
    assert [_comparable(r) for r in reused] == [_comparable(r) for r in searched]
    assert [content_version(r) for r in reused] == [content_version(r) for r in searched]
    (complete,) = [o for o in reused[0].outcomes if o.name == "knn_corpus_complete"]
    assert complete.passed and "00009" in complete.detail
    # Refused without the switch, for a reused shard as for a searched one.
    refused = _run(corpus, corpus_shards=[*SHARDS, "00009"])
    assert all(_reused(refused))  # the switch decides the check, not the graph
    (outcome,) = [o for o in refused[0].outcomes if o.name == "knn_corpus_complete"]
    assert not outcome.passed


def test_an_approximate_graph_is_reused_only_for_the_same_index_build(
    corpus: Corpus, counts: Counts
) -> None:
    ivf = IndexSpec(kind="ivf", nprobe=1, backend="faiss")  # nlist from the corpus size
    first = _run(corpus, spec=ivf)
    # The build is deterministic (a seeded training sample drawn by row position, faiss'
    # seeded k-means): searching again gives the very graph a reuse would keep.
    counts.reset()
    again = _run(corpus, spec=ivf, reuse_unchanged=False)
    assert counts.builds == 1
    for a, b in zip(first, again, strict=True):
        assert pl.read_parquet(a.outputs["knn"]).equals(pl.read_parquet(b.outputs["knn"]))
    assert all(_reused(_run(corpus, spec=ivf)))

    # What beyond the settings decides an IVF build is in the key; exact search has none of it.
    n = ROWS_PER_SHARD * len(SHARDS)
    assert index_build_identity(ivf, n) != index_build_identity(ivf, n + 40 * 39)  # nlist
    assert index_build_identity(ivf, n)["train_sample_seed"] == 0
    on_gpu = IndexSpec(kind="ivf", nprobe=1, backend="faiss", use_gpu=True)
    assert index_build_identity(on_gpu, n) != index_build_identity(ivf, n)
    flat_cpu, flat_gpu = IndexSpec(backend="faiss"), IndexSpec(backend="torch")
    assert index_build_identity(flat_cpu, n) == index_build_identity(flat_gpu, n)


def test_the_corpus_digest_comes_from_footers(corpus: Corpus) -> None:
    path = corpus.layout.shard_table(SOURCE.embedding_asset, "00000")
    footer = read_footer(path)
    assert footer.rows == ROWS_PER_SHARD == pq.read_metadata(path).num_rows
    assert footer.embedding_reuse_key is not None
    assert read_footer(path) == footer  # stable
    corpus.embed("00000")  # the same inputs and vectors written again: the same bytes
    assert read_footer(path) == footer
    corpus.embed("00000", seed=77, keep_key=True)
    assert read_footer(path).digest != footer.digest
    assert read_footer(path).embedding_reuse_key == footer.embedding_reuse_key


def test_the_asset_keeps_unchanged_graphs_without_building_an_index(
    tmp_path: Path, counts: Counts
) -> None:
    import dagster as dg
    import image_factory as factory
    from conftest import run_shards

    from megapairs_assets.knn.assets import knn_assets
    from resources.corpus import CorpusSourceResource
    from resources.knn_index import FaissIndexResource
    from resources.profiles import build_resources

    corpus = Corpus(tmp_path)  # embedding tables under tmp_path/home
    listed = tmp_path / "corpus"
    for shard in SHARDS:  # the corpus source lists these shards (their images are not read)
        factory.write_wds_shard(listed / f"{shard}.tar", factory.good_items(1))
        # ...and they were ingested (the KNN corpus is the listed shards with a corpus table).
        corpus.catalog.record(
            MaterializationRecord("image_corpus", shard, "r", "v", "demo", utc_now(), 0)
        )
    profile = build_resources("demo", corpus.layout.home)
    defs = dg.Definitions(
        assets=[next(a for a in knn_assets if a.key.to_user_string() == SOURCE.knn_asset)],
        resources={
            "storage": profile["storage"],
            "catalog": profile["catalog"],
            "corpus_source": CorpusSourceResource(kind="webdataset", path=str(listed)),
            "knn_index": FaissIndexResource(k=K, backend="faiss", use_gpu="no"),
        },
    )
    instance = dg.DagsterInstance.ephemeral()

    def reused(result: dg.ExecuteInProcessResult) -> list[bool]:
        """Each shard's `reused`, from its last materialization (a range run records each
        partition twice: the range's event, then the partition's own data version)."""
        assert result.success
        events = result.asset_materializations_for_node(SOURCE.knn_asset)
        # A range's partitions are recorded twice; the second (own) event carries their figures.
        last = {e.partition: e.metadata["reused"].value for e in events if "reused" in e.metadata}
        return [last[shard] for shard in SHARDS]

    first = run_shards(defs, instance, SHARDS, job_name="__ASSET_JOB")
    assert reused(first) == [False, False, False] and counts.builds == 1
    counts.reset()
    second = run_shards(defs, instance, SHARDS, job_name="__ASSET_JOB")
    assert reused(second) == [True, True, True]
    assert counts.builds == 0 and counts.embedding_reads == 0
    messages = [event.message or "" for event in instance.all_logs(second.run_id)]
    assert any(f"{SOURCE.knn_asset}[00001]: inputs unchanged, table reused" in m for m in messages)
    assert any("the index was not built" in m for m in messages)

    corpus.embed("00002", seed=42)  # a neighbour shard's pictures changed
    counts.reset()
    third = run_shards(defs, instance, SHARDS, job_name="__ASSET_JOB")
    assert reused(third) == [False, False, False] and counts.builds == 1

    # The resource's switch forces a search of every shard.
    assert FaissIndexResource(k=K).reuse_unchanged is True  # the default
    forced = dg.Definitions(
        assets=defs.assets,
        resources={
            **defs.resources,
            "knn_index": FaissIndexResource(
                k=K, backend="faiss", use_gpu="no", reuse_unchanged=False
            ),
        },
    )
    counts.reset()
    fourth = run_shards(forced, instance, SHARDS, job_name="__ASSET_JOB")
    assert reused(fourth) == [False, False, False] and counts.builds == 1
    messages = [event.message or "" for event in instance.all_logs(fourth.run_id)]
    assert any("reuse_unchanged is off" in m for m in messages)
