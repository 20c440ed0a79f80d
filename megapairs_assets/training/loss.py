"""MMRet's training loss: InfoNCE of fused queries over images, with mined hard negatives.

Layout of one batch (built by `training.data`): each query row brings K = 1 + n images, slot 0
its positive (the target image), slot 1 its query image (hns[0]) and slots 2.. its other hard
negatives. Every query is scored against every image of the (global) batch: the positives of
the other queries are the in-batch negatives, and every query's own hard negatives, its query
image first, are negatives too (method.md §7; without the query image a retriever learns to
return the query).

Two masks keep the softmax honest: padding (a row with fewer hard negatives than K - 1, or an
image that failed to decode) is never a candidate, and a copy of a query's own positive
elsewhere in the batch (the same image is often a target of several queries) is not counted as
its negative. Any other image that fills several slots of the batch (a hard negative of two
rows, another query's target that is also this query's hard negative) counts once per slot in
the softmax, as every in-batch contrastive trainer does; the paper does not say otherwise.

Under DDP, candidates are gathered from every device with gradients flowing back to their
owner, and each device scores its own queries against all of them: the idea of open_clip's
`ClipLoss` with `local_loss` + `gather_with_grad`, which needs one (local x global) logits
block per device instead of (global x global).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

Gather = Callable[[torch.Tensor], torch.Tensor]
"""Concatenate a per-device tensor over devices along dim 0 (identity on one device)."""

POSITIVE_SLOT = 0
QUERY_IMAGE_SLOT = 1


def positive_indices(batch_size: int, images_per_query: int, offset_rows: int = 0) -> torch.Tensor:
    """Index of each local query's positive in the flattened (global) candidate list.

    `offset_rows` is the number of query rows held by earlier devices.
    """
    rows = torch.arange(batch_size) + offset_rows
    return rows * images_per_query + POSITIVE_SLOT


def allowed_candidates(
    candidate_keys: torch.Tensor, candidate_valid: torch.Tensor, positive_index: torch.Tensor
) -> torch.Tensor:
    """(queries, candidates) mask of the images each query is scored against.

    candidate_keys: (C,) int64 identity of each candidate image (equal keys = same image).
    candidate_valid: (C,) bool, False for padding and images that failed to load.
    positive_index: (Q,) index of each query's positive among the C candidates.
    """
    positive_keys = candidate_keys[positive_index]
    copies_of_positive = candidate_keys.unsqueeze(0) == positive_keys.unsqueeze(1)
    allowed = candidate_valid.unsqueeze(0) & ~copies_of_positive
    allowed[torch.arange(positive_index.numel()), positive_index] = True
    return allowed


def fused_infonce(
    queries: torch.Tensor,
    candidates: torch.Tensor,
    positive_index: torch.Tensor,
    allowed: torch.Tensor,
    temperature: float,
    query_weight: torch.Tensor,
    total_weight: torch.Tensor | float,
    world_size: int = 1,
) -> torch.Tensor:
    """InfoNCE of unit-norm `queries` (Q, D) against unit-norm `candidates` (C, D).

    `query_weight` (Q,) is 1 for a usable query and 0 for one whose positive or query image
    failed to load. The loss is the weighted sum over local queries divided by the weight of all
    queries on all devices (`total_weight`), times `world_size`: DDP averages gradients over
    devices, so the result is the gradient of the mean loss over the global batch, however the
    usable queries are spread.
    """
    logits = queries.float() @ candidates.float().T / temperature
    logits = logits.masked_fill(~allowed, float("-inf"))
    per_query = F.cross_entropy(logits, positive_index, reduction="none")
    # A zero-weight query may have an all-masked or non-finite row; keep it out of the sum.
    per_query = torch.where(query_weight > 0, per_query, torch.zeros_like(per_query))
    total = torch.as_tensor(total_weight, dtype=per_query.dtype, device=per_query.device)
    return (per_query * query_weight).sum() / total.clamp(min=1.0) * world_size
