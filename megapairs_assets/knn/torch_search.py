"""Exact inner-product KNN with torch, for GPUs where faiss has no GPU support.

faiss-gpu wheels target one CUDA major version and are too large to ship everywhere; torch runs
on whatever GPU the embeddings were computed on. The search is exact, in three steps per block
of queries:

1. Scores against one block of corpus rows at a time, as one matrix product in float16 (or
   bfloat16) on the tensor cores. The query's own row is set to -inf there (self excluded).
2. A running top-`k + margin` over the corpus blocks. Selecting from a (queries x rows) score
   block with `torch.topk` costs several times the product itself (10.6 s against 2.6 s for
   1M x 1M x 768 on one H100), so each block is cut into groups of `_GROUP` columns, the
   best `k + margin` groups are found by their maxima, and only their members are compared.
   This is exact: a score among the block's best n lies in a group whose maximum is at least
   that score, and at most n groups can have such a maximum. The group maxima are themselves
   selected the same way, so every `topk` runs on a few thousand values. A group is every
   G-th column (G = columns / `_GROUP`): its maximum is then a reduction across rows of a
   (`_GROUP`, G) view, which reads the scores once with coalesced loads.
3. The kept candidates are scored again in float32 from the stored vectors and sorted, so the
   scores equal the CPU path's (faiss computes float32 dot products of the same float16
   values), and the margin covers neighbours whose order the low-precision product swapped.

Memory stays bounded: the score block's size follows a byte budget (by default a share of the
device's free memory). Vectors are expected to be L2-normalised, as every embedding table is,
so float16 scores cannot overflow.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

# Scores per group for the group-maximum pre-selection. 32 cuts the elements topk must scan
# 32-fold per level while the candidates gathered per query (32 x (k + margin)) stay a few
# thousand. Corpus blocks are cut in multiples of _ALIGN rows so two levels always apply.
_GROUP = 32
_ALIGN = _GROUP * _GROUP
# Extra candidates kept before the float32 re-scoring: a float16 score is off by at most
# ~5e-4 near 1, so only neighbours within that of the k-th can change places.
_MIN_MARGIN = 16
# Default score-block budget: this share of free device memory, at most _MAX_BLOCK_BYTES; on
# the CPU a fixed _CPU_BLOCK_BYTES.
_FREE_MEMORY_SHARE = 0.4
_MAX_BLOCK_BYTES = 4 << 30
_CPU_BLOCK_BYTES = 256 << 20
_MAX_QUERY_ROWS = 8192
# Bytes per score beyond the block itself: the group maxima and the gathered candidates.
_SCORE_OVERHEAD = 1.25


@dataclass
class TorchFlatIndex:
    """A corpus held on a torch device for exact search.

    `vectors` (rows padded with zeros to a multiple of the group size) holds the table's
    values exactly (its own dtype, or float32), so re-scoring reads the stored values;
    `compute_dtype` is what the matrix products run in. `ntotal` is the number of real rows,
    as in faiss.
    """

    vectors: torch.Tensor
    ntotal: int
    compute_dtype: torch.dtype

    @property
    def device(self) -> torch.device:
        return self.vectors.device

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])


@dataclass(frozen=True)
class BlockPlan:
    """How a search is cut: queries per block and corpus rows per score block."""

    query_rows: int
    corpus_rows: int
    candidates: int

    def score_block_bytes(self, element_bytes: int) -> int:
        """Bytes of one (query_rows x corpus_rows) score block."""
        return self.query_rows * self.corpus_rows * element_bytes


def default_torch_device(gpu_device: int = 0) -> torch.device:
    """The GPU `gpu_device` when CUDA is visible, else the CPU."""
    return torch.device(f"cuda:{gpu_device}" if torch.cuda.is_available() else "cpu")


def build_torch_index(
    vectors: np.ndarray,
    device: torch.device,
    compute_dtype: torch.dtype | None = None,
) -> TorchFlatIndex:
    """Copy `vectors` (N, d), float16 or float32, to `device` for `search_torch_index`.

    `compute_dtype` defaults to float16 on a GPU (tensor cores; the tables are float16 anyway)
    and float32 on the CPU (where half-precision products are slow).
    """
    if vectors.ndim != 2 or vectors.shape[0] == 0:
        raise ValueError(f"expected a non-empty (N, d) array, got shape {vectors.shape}")
    if vectors.dtype not in (np.float16, np.float32):
        vectors = vectors.astype(np.float32)
    if compute_dtype is None:
        compute_dtype = torch.float16 if device.type == "cuda" else torch.float32
    n_rows, dim = vectors.shape
    padded_rows = math.ceil(n_rows / _ALIGN) * _ALIGN
    # float16 -> float32 is exact, so a float32 product keeps float32 storage: no per-block
    # conversion (slow on CPUs). Otherwise the table's own dtype is kept.
    storage_dtype = torch.float32 if compute_dtype == torch.float32 else _torch_dtype(vectors.dtype)
    storage = torch.zeros((padded_rows, dim), dtype=storage_dtype, device=device)
    # Copied in slices: a 20M-row table never needs a second full copy in host memory.
    step = 1 << 20
    for start in range(0, n_rows, step):
        chunk = torch.from_numpy(np.ascontiguousarray(vectors[start : start + step]))
        storage[start : start + chunk.shape[0]].copy_(chunk, non_blocking=False)
    return TorchFlatIndex(vectors=storage, ntotal=n_rows, compute_dtype=compute_dtype)


def candidates_for(k: int) -> int:
    """Candidates kept per query before the float32 re-scoring: k plus a margin."""
    return k + max(_MIN_MARGIN, k // 2)


def plan_blocks(
    n_queries: int,
    n_corpus_rows: int,
    dim: int,
    candidates: int,
    element_bytes: int,
    budget_bytes: int,
    max_query_rows: int = _MAX_QUERY_ROWS,
) -> BlockPlan:
    """Block sizes whose score block and re-scoring buffer each fit in `budget_bytes`.

    Many queries per block keep the matrix products large; the corpus side then takes what the
    budget leaves, in whole groups. Raises ValueError when even one query against one group
    does not fit.
    """
    if budget_bytes <= 0:
        raise ValueError(f"budget_bytes must be positive, got {budget_bytes}")
    cell_bytes = element_bytes * _SCORE_OVERHEAD
    padded_rows = math.ceil(n_corpus_rows / _ALIGN) * _ALIGN
    # The re-scoring holds (queries, candidates, dim) float32 values.
    rescore_rows = budget_bytes // (candidates * dim * 4)
    query_rows = max(1, min(max(n_queries, 1), max_query_rows, rescore_rows))
    while True:
        corpus_rows = int(budget_bytes // (query_rows * cell_bytes))
        # Whole _ALIGN blocks where the budget allows (two selection levels), else groups.
        unit = _ALIGN if corpus_rows >= 4 * _ALIGN else _GROUP
        corpus_rows = corpus_rows // unit * unit
        if corpus_rows >= min(padded_rows, 2 * _ALIGN) or query_rows == 1:
            break
        query_rows = max(1, query_rows // 2)
    corpus_rows = min(corpus_rows, padded_rows)
    if corpus_rows < _GROUP or rescore_rows < 1:
        raise ValueError(
            f"a KNN block budget of {budget_bytes} bytes cannot hold one query against "
            f"{_GROUP} rows; give the torch backend a larger block budget"
        )
    return BlockPlan(query_rows=query_rows, corpus_rows=corpus_rows, candidates=candidates)


def default_block_budget_bytes(index: TorchFlatIndex) -> int:
    """A share of what the device has free (including torch's cached blocks), capped."""
    if index.device.type != "cuda":
        return _CPU_BLOCK_BYTES
    free_bytes, _ = torch.cuda.mem_get_info(index.device)
    cached_bytes = torch.cuda.memory_reserved(index.device) - torch.cuda.memory_allocated(
        index.device
    )
    return int(min(_MAX_BLOCK_BYTES, _FREE_MEMORY_SHARE * (free_bytes + cached_bytes)))


def search_torch_index(
    index: TorchFlatIndex,
    query_vectors: np.ndarray,
    k: int,
    exclude_rows: np.ndarray | None = None,
    block_budget_bytes: int | None = None,
    on_block: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Each query's `k` best corpus rows by inner product, best first.

    `exclude_rows[i]` is a corpus row query i must not get (itself), or -1. Returns (scores
    float32 (Q, k), rows int64 (Q, k)); where fewer than k rows exist, the tail has row -1 and
    score -inf. Scores are float32 dot products of the stored values. `on_block` receives the
    number of queries finished after each query block.
    """
    n_queries = query_vectors.shape[0]
    if query_vectors.ndim != 2 or query_vectors.shape[1] != index.dim:
        raise ValueError(f"queries of shape {query_vectors.shape} for a {index.dim}-d index")
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if exclude_rows is None:
        exclude_rows = np.full(n_queries, -1, dtype=np.int64)
    if len(exclude_rows) != n_queries:
        raise ValueError(f"{len(exclude_rows)} excluded rows for {n_queries} queries")
    budget = block_budget_bytes or default_block_budget_bytes(index)
    element_bytes = torch.finfo(index.compute_dtype).bits // 8
    plan = plan_blocks(n_queries, index.ntotal, index.dim, candidates_for(k), element_bytes, budget)
    scores_out = np.full((n_queries, k), -np.inf, dtype=np.float32)
    rows_out = np.full((n_queries, k), -1, dtype=np.int64)
    # On a GPU nothing below waits for the device until a block's results are read back, one
    # block late: each query block goes up from pinned memory and its results come down into
    # pinned memory, queued behind the maths, so the device never idles while the host copies
    # (a synchronous copy per block drained the queue: ~7 ms idle per 8192-query block on H200).
    pending: _PendingBlock | None = None
    with torch.inference_mode():
        for start in range(0, n_queries, plan.query_rows):
            stop = min(start + plan.query_rows, n_queries)
            queries = _to_device(query_vectors[start:stop], index.device).float()
            own_rows = np.asarray(exclude_rows[start:stop], dtype=np.int64)
            excluded = _to_device(own_rows, index.device)
            scores, rows = _search_block(index, queries, excluded, k, plan)
            current = _PendingBlock.queue(start, scores, rows)
            if pending is not None:
                pending.collect(scores_out, rows_out, on_block)
            pending = current
        if pending is not None:
            pending.collect(scores_out, rows_out, on_block)
    return scores_out, rows_out


@dataclass
class _PendingBlock:
    """One query block's results on their way to the host."""

    start: int
    scores: torch.Tensor
    rows: torch.Tensor
    done: torch.cuda.Event | None

    @classmethod
    def queue(cls, start: int, scores: torch.Tensor, rows: torch.Tensor) -> _PendingBlock:
        if scores.device.type != "cuda":
            return cls(start, scores, rows, None)
        # non_blocking device-to-host copies land in pinned memory; the event marks their end.
        host_scores = scores.to("cpu", non_blocking=True)
        host_rows = rows.to("cpu", non_blocking=True)
        done = torch.cuda.Event()
        done.record()
        return cls(start, host_scores, host_rows, done)

    def collect(
        self,
        scores_out: np.ndarray,
        rows_out: np.ndarray,
        on_block: Callable[[int], None] | None,
    ) -> None:
        if self.done is not None:
            self.done.synchronize()
        stop = self.start + self.scores.shape[0]
        scores_out[self.start : stop, : self.scores.shape[1]] = self.scores.numpy()
        rows_out[self.start : stop, : self.rows.shape[1]] = self.rows.numpy()
        if on_block is not None:
            on_block(stop - self.start)


def _to_device(values: np.ndarray, device: torch.device) -> torch.Tensor:
    """`values` on `device` in their own dtype; from pinned memory, without waiting, on a GPU."""
    tensor = torch.from_numpy(np.ascontiguousarray(values))
    if device.type != "cuda":
        return tensor.to(device)
    return tensor.pin_memory().to(device, non_blocking=True)


def _search_block(
    index: TorchFlatIndex,
    queries: torch.Tensor,
    excluded: torch.Tensor,
    k: int,
    plan: BlockPlan,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Exact top-k of one query block: low-precision selection, float32 re-scoring."""
    low_precision_queries = queries.to(index.compute_dtype)
    best_scores: torch.Tensor | None = None
    best_rows: torch.Tensor | None = None
    for corpus_start in range(0, index.vectors.shape[0], plan.corpus_rows):
        block = index.vectors[corpus_start : corpus_start + plan.corpus_rows]
        scores = low_precision_queries @ block.to(index.compute_dtype).T
        _mask_invalid(scores, corpus_start, index.ntotal, excluded)
        block_scores, block_rows = _block_top(scores, plan.candidates)
        block_rows += corpus_start
        if best_scores is None or best_rows is None:
            best_scores, best_rows = block_scores, block_rows
            continue
        merged_scores = torch.cat([best_scores, block_scores], dim=1)
        merged_rows = torch.cat([best_rows, block_rows], dim=1)
        best_scores, picked = merged_scores.topk(
            min(plan.candidates, merged_scores.shape[1]), dim=1, sorted=False
        )
        best_rows = merged_rows.gather(1, picked)
    assert best_scores is not None and best_rows is not None
    return _rescore(index, queries, best_scores, best_rows, k)


def _mask_invalid(
    scores: torch.Tensor, corpus_start: int, n_rows: int, excluded: torch.Tensor
) -> None:
    """Set padding columns and each query's own row to -inf, in place, without a host sync."""
    block_rows = scores.shape[1]
    valid = n_rows - corpus_start
    if valid < block_rows:
        scores[:, valid:] = -math.inf
    local = excluded - corpus_start
    inside = (local >= 0) & (local < block_rows)
    column = local.clamp(0, block_rows - 1).unsqueeze(1)
    current = scores.gather(1, column)
    scores.scatter_(1, column, torch.where(inside.unsqueeze(1), -math.inf, current))


def _block_top(scores: torch.Tensor, n_best: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The best `n_best` scores of each row of a score block and their columns (unsorted)."""
    n_queries, n_columns = scores.shape
    n_groups = n_columns // _GROUP
    if n_groups <= n_best or n_columns % _GROUP:
        return scores.topk(min(n_best, n_columns), dim=1, sorted=False)
    # Group g holds columns g, g + G, g + 2G, ... (G = n_groups).
    maxima = scores.view(n_queries, _GROUP, n_groups).amax(dim=1)
    _, groups = _block_top(maxima, n_best)
    offsets = torch.arange(_GROUP, device=scores.device) * n_groups
    columns = (groups.unsqueeze(2) + offsets).view(n_queries, n_best * _GROUP)
    best, position = scores.gather(1, columns).topk(n_best, dim=1, sorted=False)
    return best, columns.gather(1, position)


def _rescore(
    index: TorchFlatIndex,
    queries: torch.Tensor,
    candidate_scores: torch.Tensor,
    candidate_rows: torch.Tensor,
    k: int,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 scores of the candidates from the stored vectors; the best k, sorted."""
    invalid = torch.isneginf(candidate_scores)
    candidates = index.vectors[candidate_rows].float()
    # Multiply-and-sum rather than a batched product, so TF32 settings cannot round it.
    exact = (candidates * queries.unsqueeze(1)).sum(dim=2).masked_fill(invalid, -math.inf)
    top_scores, picked = exact.topk(min(k, exact.shape[1]), dim=1, sorted=True)
    top_rows = candidate_rows.gather(1, picked).masked_fill(torch.isneginf(top_scores), -1)
    return top_scores, top_rows


def _torch_dtype(dtype: np.dtype) -> torch.dtype:
    return torch.float16 if dtype == np.float16 else torch.float32
