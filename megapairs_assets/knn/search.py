"""Nearest-neighbour search over one embedding table, as a long polars frame.

Embeddings arrive L2-normalised (float16 to halve memory), so inner product is cosine. Exact
search ("flat") is the default: the paper's 20M x 768 float16 table fits one H100, and exact
results make the (0.8, 0.96) similarity band mean what it says. "ivf" and "hnsw" trade recall
for speed on CPU-only hosts.

Two backends run the search (`IndexSpec.backend`):
- faiss: the index types, training and batched search are faiss's own; this module only
  chooses them, feeds them float32 one batch at a time (faiss' CPU kernels take float32, and a
  full float32 copy of a 20M-row table would double the memory);
- torch: exact search on a GPU through torch (`megapairs_assets.knn.torch_search`), for
  machines whose faiss has no GPU support (faiss-gpu wheels exist for one CUDA version only).
`auto` picks faiss on a GPU when faiss can use one, else torch when CUDA is visible, else faiss
on the CPU. Both give the same rows, scores (float32 dot products of the stored float16 values)
and checks; their (labels, scores) matrices become rows with vectorised numpy/polars.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Iterator
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import polars as pl

from megapairs_assets.lib.progress import ProgressCallback
from megapairs_assets.lib.quality import CheckOutcome, outcome

if TYPE_CHECKING:
    import faiss

    from megapairs_assets.knn.torch_search import TorchFlatIndex

IndexKind = Literal["flat", "ivf", "hnsw"]
Backend = Literal["auto", "faiss", "torch"]

KNN_SCHEMA = pl.Schema(
    {
        "query_id": pl.String,
        "rank": pl.Int16,
        "neighbor_id": pl.String,
        "score": pl.Float32,
    }
)
"""One row per (query, neighbour): rank is 0-based (best first), score is cosine similarity."""
KNN_COLUMN_DESCRIPTIONS: dict[str, str] = {
    "query_id": "image_id of the query image (every image of the shard is a query)",
    "rank": "0-based position among the query's neighbours, best first (the query itself is "
    "left out)",
    "neighbor_id": "image_id of the neighbour, from any shard of the current corpus",
    "score": "cosine similarity of query and neighbour in this source's embedding space",
}

# faiss' k-means warns below 39 training points per centroid; it advises up to 256, but 100
# trains nearly as well while keeping the float32 training copy a fraction of the corpus.
_MIN_TRAIN_POINTS_PER_LIST = 39
_TRAIN_POINTS_PER_LIST = 100
_TRAIN_SAMPLE_SEED = 0
# Rows converted to float32 per add() call: bounds the transient copy to ~130 MB at d=512.
_ADD_BATCH_ROWS = 65_536
# faiss GPU k-selection handles at most this many results per query.
_GPU_MAX_K = 2048
# k+1 results are fetched and ranks are stored as int16.
_MAX_K = np.iinfo(np.int16).max
# A cosine score may exceed 1 by float16/float32 rounding, never by more.
_SCORE_BOUND = 1.001


@dataclass(frozen=True)
class IndexSpec:
    """Which faiss index to build and how to search it.

    kind: "flat" is exact inner product; "ivf" and "hnsw" are approximate.
    nlist: ivf lists; None picks about 4*sqrt(N), lowered so each list trains on >= 39 points.
    nprobe: ivf lists visited per query.
    hnsw_m / ef_search / ef_construction: HNSW graph degree and beam widths.
    use_gpu / gpu_device: put the faiss index on that GPU (needs faiss built with GPU support;
        flat and ivf only). Flat then stores float16 on the GPU: 20M x 768 needs ~31 GB. The
        torch backend uses the same gpu_device.
    query_batch_size: queries per search call (and per progress report).
    backend: "faiss", "torch" (exact, flat only; on the GPU when CUDA is visible, else the
        CPU) or "auto": for flat, faiss on a GPU when faiss can use one or use_gpu is set,
        else torch when CUDA is visible, else faiss on the CPU; ivf and hnsw use faiss.
    torch_block_bytes: the torch backend's bound on one score block (and its re-scoring
        buffer); None = a share of the device's free memory.
    """

    kind: IndexKind = "flat"
    nlist: int | None = None
    nprobe: int = 32
    hnsw_m: int = 32
    ef_search: int = 128
    ef_construction: int = 200
    use_gpu: bool = False
    gpu_device: int = 0
    query_batch_size: int = 16384
    backend: Backend = "auto"
    torch_block_bytes: int | None = None


def _faiss() -> Any:
    """The faiss module, imported on first use: a GPU machine may have torch but no faiss."""
    try:
        return importlib.import_module("faiss")
    except ImportError as exc:
        raise RuntimeError(
            "faiss is not installed; install faiss-cpu (or faiss-gpu-cu12), or use "
            "IndexSpec(backend='torch') for exact search with torch"
        ) from exc


def faiss_has_gpu() -> bool:
    """True when the installed faiss was built with GPU support and sees at least one GPU."""
    try:
        faiss = importlib.import_module("faiss")
    except ImportError:
        return False
    return hasattr(faiss, "StandardGpuResources") and faiss.get_num_gpus() > 0


def resolve_backend(spec: IndexSpec) -> IndexSpec:
    """`spec` with `backend` decided ("faiss" or "torch") and `use_gpu` set to match.

    "auto" for flat: faiss on the GPU when faiss can use one (or `use_gpu` asks for it), else
    torch when CUDA is visible, else faiss on the CPU. ivf and hnsw are faiss-only, so "auto"
    keeps faiss for them and "torch" is refused.
    """
    if spec.backend not in ("auto", "faiss", "torch"):
        raise ValueError(f"unknown KNN backend {spec.backend!r}; expected auto, faiss or torch")
    if spec.backend == "torch":
        if spec.kind != "flat":
            raise ValueError(f"the torch backend does exact search only; kind={spec.kind!r}")
        return replace(spec, use_gpu=False)
    # use_gpu=True asks for faiss on the GPU explicitly: build_index then fails clearly if
    # faiss cannot use one, rather than quietly running elsewhere.
    if spec.backend == "faiss" or spec.kind != "flat" or spec.use_gpu:
        return replace(spec, backend="faiss")
    if faiss_has_gpu():
        return replace(spec, backend="faiss", use_gpu=True)
    import torch

    if torch.cuda.is_available():
        return replace(spec, backend="torch", use_gpu=False)
    return replace(spec, backend="faiss", use_gpu=False)


def describe_backend(spec: IndexSpec) -> str:
    """What a search under `spec` runs on here, e.g. "torch (cuda:0)" or "faiss (CPU)"."""
    resolved = resolve_backend(spec)
    if resolved.backend == "torch":
        from megapairs_assets.knn.torch_search import default_torch_device

        return f"torch ({default_torch_device(spec.gpu_device)})"
    return "faiss (GPU)" if resolved.use_gpu else "faiss (CPU)"


def default_nlist(n_vectors: int) -> int:
    """IVF list count for a corpus: about 4*sqrt(N), but every list trains on >= 39 points."""
    by_size = round(4 * math.sqrt(n_vectors))
    by_training = n_vectors // _MIN_TRAIN_POINTS_PER_LIST
    return max(1, min(by_size, by_training))


def build_index(vectors: np.ndarray, spec: IndexSpec) -> faiss.Index | TorchFlatIndex:
    """Build (and for ivf, train) an inner-product index holding `vectors` in row order.

    `vectors` is (N, d) float16 or float32, L2-normalised. The id of a row is its position,
    which `search_neighbors` maps back to the caller's ids. The backend follows
    `resolve_backend(spec)`: a faiss index, or a `TorchFlatIndex` on the torch device. Raises
    RuntimeError when `spec.use_gpu` is set but faiss cannot use a GPU here.
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, d) array, got shape {vectors.shape}")
    spec = resolve_backend(spec)
    if spec.backend == "torch":
        from megapairs_assets.knn.torch_search import build_torch_index, default_torch_device

        return build_torch_index(vectors, default_torch_device(spec.gpu_device))
    faiss = _faiss()
    n_vectors, dim = vectors.shape
    if spec.use_gpu:
        index = _empty_gpu_index(dim, n_vectors, spec)
    else:
        index = faiss.index_factory(
            dim, _factory_string(spec, n_vectors), faiss.METRIC_INNER_PRODUCT
        )
        if spec.kind == "flat":
            _reserve_flat_storage(index, n_vectors)
        if spec.kind == "hnsw":
            # efConstruction must be set before the first add: it shapes the graph being built.
            index.hnsw.efConstruction = spec.ef_construction
    if not index.is_trained:
        index.train(_training_sample(vectors, index_nlist(spec, n_vectors)))
    for batch in _float32_batches(vectors, _ADD_BATCH_ROWS):
        index.add(batch)
    return index


def index_nlist(spec: IndexSpec, n_vectors: int) -> int:
    """The IVF list count `build_index` uses for a corpus of `n_vectors` under `spec`."""
    return spec.nlist if spec.nlist is not None else default_nlist(n_vectors)


def index_build_identity(spec: IndexSpec, n_vectors: int) -> dict[str, Any]:
    """What, beyond the vectors (in their order) and the configured settings, decides the index
    `build_index` makes under `spec` for a corpus of `n_vectors`: a KNN shard's reuse key
    includes it, so a kept graph always names the index build that produced it.

    Exact search ("flat") gives the same neighbours on any backend, so nothing. An IVF index
    depends on its list count as resolved for this corpus, its training sample (a fixed seed
    and size, drawn by row position), faiss' k-means (seeded inside faiss, so its version) and
    where it trains (GPU k-means differs from CPU). An HNSW graph depends on its construction
    beam and faiss' build. Search-time parameters (nprobe, ef_search) and k are in the stage's
    settings already.
    """
    if spec.kind == "flat":
        return {"kind": "flat"}
    faiss_version = str(getattr(_faiss(), "__version__", "unknown"))
    if spec.kind == "ivf":
        return {
            "kind": "ivf",
            "nlist": index_nlist(spec, n_vectors),
            "train_points_per_list": _TRAIN_POINTS_PER_LIST,
            "train_sample_seed": _TRAIN_SAMPLE_SEED,
            "on_gpu": resolve_backend(spec).use_gpu,
            "faiss": faiss_version,
        }
    if spec.kind == "hnsw":
        return {"kind": "hnsw", "ef_construction": spec.ef_construction, "faiss": faiss_version}
    raise ValueError(f"unknown index kind {spec.kind!r}; expected flat, ivf or hnsw")


def search_neighbors(
    index: faiss.Index | TorchFlatIndex,
    corpus_ids: np.ndarray,
    query_vectors: np.ndarray,
    query_ids: np.ndarray,
    k: int,
    spec: IndexSpec,
    on_progress: ProgressCallback | None = None,
) -> pl.DataFrame:
    """Find each query's `k` nearest corpus rows, excluding the query itself.

    `corpus_ids[i]` names faiss id i of `index`; `query_vectors` (Q, d) are searched in
    batches of `spec.query_batch_size` (float16 is converted per batch). The query is excluded
    by id: k+1 neighbours are searched and the row naming the query dropped, or the worst one
    when the query is not among them (a query outside the corpus, or one whose exact
    duplicates filled the list). Missing results (faiss id -1,
    possible with ivf/hnsw or k >= N) are dropped, so a query can have fewer than k rows.

    With the torch backend (`index` from `build_index` under it) the query's own row is
    excluded inside the search, so k rows come back whenever the corpus has k others.

    Returns a frame with `KNN_SCHEMA`, sorted by query_id then rank. `on_progress` receives
    the number of queries finished after each batch.
    """
    if not 1 <= k < _MAX_K:
        raise ValueError(f"k must be in 1..{_MAX_K - 1} (ranks are int16), got {k}")
    if len(query_ids) != query_vectors.shape[0]:
        raise ValueError(f"{len(query_ids)} query ids for {query_vectors.shape[0]} query vectors")
    if len(corpus_ids) != index.ntotal:
        raise ValueError(f"{len(corpus_ids)} corpus ids for an index of {index.ntotal} vectors")
    # The index says which backend runs the search; the spec adds the faiss settings.
    on_torch = _is_torch_index(index)
    spec = resolve_backend(spec)
    if not on_torch and spec.backend == "torch":
        spec = replace(spec, backend="faiss", use_gpu=False)
    if spec.use_gpu and k + 1 > _GPU_MAX_K:
        raise ValueError(f"faiss on GPU returns at most {_GPU_MAX_K} results; k={k} is too large")
    if not on_torch:
        _apply_search_params(index, spec)

    corpus_id_series = pl.Series("neighbor_id", corpus_ids, dtype=pl.String)
    query_id_series = pl.Series("query_id", query_ids, dtype=pl.String)
    query_order = _sorted_order(query_id_series)
    query_corpus_rows = _corpus_rows_of(query_id_series, corpus_id_series)

    batches: list[pl.DataFrame] = []
    for start in range(0, len(query_order), spec.query_batch_size):
        batch_queries = query_order[start : start + spec.query_batch_size]
        self_rows = query_corpus_rows[batch_queries]
        if on_torch:
            from megapairs_assets.knn.torch_search import search_torch_index

            scores, labels = search_torch_index(
                index,
                query_vectors[batch_queries],
                k,
                exclude_rows=self_rows,
                block_budget_bytes=spec.torch_block_bytes,
            )
            keep = labels >= 0
        else:
            scores, labels = index.search(_as_float32(query_vectors[batch_queries]), k + 1)
            keep = _keep_mask(labels, self_rows)
        batches.append(
            _rows_frame(batch_queries, labels, scores, keep, query_id_series, corpus_id_series)
        )
        if on_progress is not None:
            on_progress(len(batch_queries))
    if not batches:
        return KNN_SCHEMA.to_frame()
    return pl.concat(batches, rechunk=False)


def check_knn(neighbors: pl.DataFrame, k: int) -> list[CheckOutcome]:
    """Validate a neighbour table: no self rows, ranks 0..n-1, sorted scores, valid cosines.

    Also checks that rows are stored in (query_id, rank) order, which `search_neighbors`
    promises and readers that stream one query's rows at a time rely on.
    """
    return [
        _check_no_self(neighbors),
        _check_ranks_contiguous(neighbors),
        _check_scores_non_increasing(neighbors),
        _check_score_range(neighbors),
        _check_at_most_k(neighbors, k),
        _check_row_order(neighbors),
    ]


# --- index construction ---------------------------------------------------------------------


def _factory_string(spec: IndexSpec, n_vectors: int) -> str:
    if spec.kind == "flat":
        return "Flat"
    if spec.kind == "ivf":
        return f"IVF{_validated_nlist(spec, n_vectors)},Flat"
    if spec.kind == "hnsw":
        return f"HNSW{spec.hnsw_m},Flat"
    raise ValueError(f"unknown index kind {spec.kind!r}; expected flat, ivf or hnsw")


def _validated_nlist(spec: IndexSpec, n_vectors: int) -> int:
    nlist = index_nlist(spec, n_vectors)
    if not 1 <= nlist <= n_vectors:
        raise ValueError(f"ivf needs 1 <= nlist <= N; got nlist={nlist} for N={n_vectors}")
    return nlist


def _training_sample(vectors: np.ndarray, nlist: int) -> np.ndarray:
    """A float32 training sample of about 100 points per list, drawn with a fixed seed."""
    n_vectors = vectors.shape[0]
    n_train = min(n_vectors, nlist * _TRAIN_POINTS_PER_LIST)
    if n_train == n_vectors:
        return _as_float32(vectors)
    rng = np.random.default_rng(_TRAIN_SAMPLE_SEED)
    rows = np.sort(rng.choice(n_vectors, size=n_train, replace=False))
    return _as_float32(vectors[rows])


def _reserve_flat_storage(index: faiss.Index, n_vectors: int) -> None:
    """Give a CPU IndexFlat room for all vectors before the batched adds.

    IndexFlat has no reserve(); left alone, its storage vector grows by reallocation and copy
    as batches arrive, which made the build ~1.7x slower at 1M x 512 here. Growing it once
    and shrinking it back keeps the capacity (std::vector never shrinks on resize).
    """
    storage_bytes = n_vectors * index.code_size
    index.codes.resize(storage_bytes)
    index.codes.resize(0)


def _float32_batches(vectors: np.ndarray, batch_rows: int) -> Iterator[np.ndarray]:
    """Consecutive row batches as C-contiguous float32, converted into one reused buffer.

    Reusing the buffer matters: a fresh 128 MB array per batch is page-faulted in anew each
    time, which costs more than the conversion itself. Each batch is only valid until the
    next one is produced.
    """
    n_vectors = vectors.shape[0]
    if vectors.dtype == np.float32 and vectors.flags.c_contiguous:
        for start in range(0, n_vectors, batch_rows):
            yield vectors[start : start + batch_rows]
        return
    buffer = np.empty((min(batch_rows, n_vectors), vectors.shape[1]), dtype=np.float32)
    for start in range(0, n_vectors, batch_rows):
        chunk = vectors[start : start + batch_rows]
        batch = buffer[: chunk.shape[0]]
        batch[...] = chunk
        yield batch


def _as_float32(vectors: np.ndarray) -> np.ndarray:
    # A no-op for float32 C-contiguous input; otherwise one batch-sized copy.
    return np.ascontiguousarray(vectors, dtype=np.float32)


def _require_gpu(spec: IndexSpec) -> None:
    faiss = _faiss()
    if not hasattr(faiss, "StandardGpuResources"):
        raise RuntimeError(
            "IndexSpec(use_gpu=True) but the installed faiss has no GPU support (faiss-cpu). "
            "Install the 'gpu' extra (faiss-gpu-cu12) instead of faiss-cpu, or set use_gpu=False."
        )
    n_gpus = faiss.get_num_gpus()
    if not 0 <= spec.gpu_device < n_gpus:
        raise RuntimeError(
            f"IndexSpec(use_gpu=True, gpu_device={spec.gpu_device}) but faiss sees {n_gpus} "
            "GPU(s); check CUDA_VISIBLE_DEVICES and the driver, or set use_gpu=False."
        )
    if spec.kind == "hnsw":
        raise ValueError("faiss has no GPU HNSW index; use kind='flat' or 'ivf' with use_gpu")


def _empty_gpu_index(dim: int, n_vectors: int, spec: IndexSpec) -> faiss.Index:
    """An empty index on the GPU with room reserved for `n_vectors`.

    Flat stores float16 there, so a 20M x 768 table takes ~31 GB of one card; IVF lists stay
    float32 on the GPU. Reserving up front keeps batched adds from reallocating (and briefly
    doubling) device memory.
    """
    _require_gpu(spec)
    faiss = _faiss()
    resources = faiss.StandardGpuResources()
    if spec.kind == "flat":
        # Built on the GPU directly: cloning a CPU IndexFlat would need the whole table as
        # float32 in host memory first.
        config = faiss.GpuIndexFlatConfig()
        config.device = spec.gpu_device
        config.useFloat16 = True
        index = faiss.GpuIndexFlatIP(resources, dim, config)
        index.reserveMemory(n_vectors)
    else:
        cpu_index = faiss.index_factory(
            dim, _factory_string(spec, n_vectors), faiss.METRIC_INNER_PRODUCT
        )
        options = faiss.GpuClonerOptions()
        options.reserveVecs = n_vectors
        # Cloned untrained so k-means training runs on the GPU too.
        index = faiss.index_cpu_to_gpu(resources, spec.gpu_device, cpu_index, options)
    # The index keeps a raw pointer to its resources; keep the Python object alive with it.
    index.referenced_objects = [resources]
    return index


def _apply_search_params(index: faiss.Index, spec: IndexSpec) -> None:
    if spec.kind == "flat":
        return
    faiss = _faiss()
    params = faiss.GpuParameterSpace() if spec.use_gpu else faiss.ParameterSpace()
    if spec.kind == "ivf":
        params.set_index_parameter(index, "nprobe", spec.nprobe)
    elif spec.kind == "hnsw":
        params.set_index_parameter(index, "efSearch", spec.ef_search)


# --- turning faiss results into rows --------------------------------------------------------


def _sorted_order(ids: pl.Series) -> np.ndarray:
    """Positions of `ids` in sorted order, so batches come out already sorted by query_id."""
    if ids.is_sorted():
        return np.arange(len(ids), dtype=np.int64)
    return ids.arg_sort().to_numpy().astype(np.int64, copy=False)


def _corpus_rows_of(query_ids: pl.Series, corpus_ids: pl.Series) -> np.ndarray:
    """For each query, the faiss id of the corpus row with the same id (-1 if none).

    Comparing integers per batch is much cheaper than comparing id strings.
    """
    if query_ids.len() == corpus_ids.len() and query_ids.equals(corpus_ids, check_names=False):
        return np.arange(query_ids.len(), dtype=np.int64)
    corpus = pl.DataFrame({"id": corpus_ids, "row": np.arange(corpus_ids.len(), dtype=np.int64)})
    matched = (
        pl.DataFrame({"id": query_ids})
        .join(corpus, on="id", how="left", maintain_order="left")
        .get_column("row")
        .fill_null(-1)
    )
    if matched.len() != query_ids.len():
        raise ValueError("corpus ids must be unique: some query id matches several corpus rows")
    return matched.to_numpy().astype(np.int64, copy=False)


def _keep_mask(labels: np.ndarray, self_rows: np.ndarray) -> np.ndarray:
    """Which of the k+1 results to keep: found, not the query, and at most k per query."""
    is_self = labels == self_rows[:, None]
    keep = (labels >= 0) & ~is_self
    # Without the query among the results, drop the worst one so k remain.
    keep[:, -1] &= is_self.any(axis=1)
    return keep


def _is_torch_index(index: Any) -> bool:
    from megapairs_assets.knn.torch_search import TorchFlatIndex

    return isinstance(index, TorchFlatIndex)


def _rows_frame(
    batch_queries: np.ndarray,
    labels: np.ndarray,
    scores: np.ndarray,
    keep: np.ndarray,
    query_ids: pl.Series,
    corpus_ids: pl.Series,
) -> pl.DataFrame:
    # Kept results stay in the search's best-first order, so rank = how many were kept before.
    ranks = np.cumsum(keep, axis=1, dtype=np.int16) - 1
    query_rows = np.broadcast_to(batch_queries[:, None], labels.shape)[keep]
    return pl.DataFrame(
        {
            "query_id": query_ids.gather(query_rows),
            "rank": pl.Series(ranks[keep], dtype=pl.Int16),
            "neighbor_id": corpus_ids.gather(labels[keep]),
            "score": pl.Series(scores[keep], dtype=pl.Float32),
        },
        schema=KNN_SCHEMA,
    )


# --- checks ---------------------------------------------------------------------------------


def _frame_outcome(name: str, bad: pl.DataFrame, what: str) -> CheckOutcome:
    """Like `outcome`, but counts all offending rows while formatting only a few examples."""
    if bad.height == 0:
        return outcome(name, [], what)
    examples = tuple(
        " ".join(f"{column}={value}" for column, value in row.items())
        for row in bad.head(5).iter_rows(named=True)
    )
    return CheckOutcome(
        name=name,
        passed=False,
        detail=f"{bad.height} rows violate: {what}",
        failing_rows=bad.height,
        examples=examples,
    )


def _check_no_self(neighbors: pl.DataFrame) -> CheckOutcome:
    bad = neighbors.filter(pl.col("neighbor_id") == pl.col("query_id"))
    return _frame_outcome("knn_no_self_neighbors", bad, "a query is never its own neighbour")


def _check_ranks_contiguous(neighbors: pl.DataFrame) -> CheckOutcome:
    per_query = neighbors.group_by("query_id").agg(
        rows=pl.len(),
        min_rank=pl.col("rank").min(),
        max_rank=pl.col("rank").max(),
        distinct_ranks=pl.col("rank").n_unique(),
    )
    bad = per_query.filter(
        (pl.col("min_rank") != 0)
        | (pl.col("max_rank").cast(pl.Int64) != pl.col("rows") - 1)
        | (pl.col("distinct_ranks") != pl.col("rows"))
    ).sort("query_id")
    return _frame_outcome("knn_ranks_contiguous", bad, "each query's ranks are 0..n-1")


def _check_scores_non_increasing(neighbors: pl.DataFrame) -> CheckOutcome:
    same_query = pl.col("query_id") == pl.col("query_id").shift(1)
    bad = (
        neighbors.sort("query_id", "rank")
        .with_columns(previous_score=pl.col("score").shift(1))
        .filter(same_query & (pl.col("score") > pl.col("previous_score")))
    )
    return _frame_outcome(
        "knn_scores_non_increasing", bad, "scores never rise with rank within a query"
    )


def _check_score_range(neighbors: pl.DataFrame) -> CheckOutcome:
    in_range = pl.col("score").is_between(-_SCORE_BOUND, _SCORE_BOUND)
    bad = neighbors.filter(~in_range | pl.col("score").is_nan())
    return _frame_outcome(
        "knn_scores_are_cosines", bad, f"scores lie in [-{_SCORE_BOUND}, {_SCORE_BOUND}]"
    )


def _check_at_most_k(neighbors: pl.DataFrame, k: int) -> CheckOutcome:
    bad = neighbors.group_by("query_id").len("rows").filter(pl.col("rows") > k).sort("query_id")
    return _frame_outcome("knn_at_most_k_per_query", bad, f"at most k={k} neighbours per query")


def _check_row_order(neighbors: pl.DataFrame) -> CheckOutcome:
    previous_query = pl.col("query_id").shift(1)
    bad = (
        neighbors.select("query_id", "rank")
        .with_row_index("row")
        .filter(
            (pl.col("query_id") < previous_query)
            | ((pl.col("query_id") == previous_query) & (pl.col("rank") <= pl.col("rank").shift(1)))
        )
    )
    return _frame_outcome("knn_rows_sorted", bad, "rows are stored by query_id, then rank")
