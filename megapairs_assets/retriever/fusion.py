"""MMRet's query embedding: the raw image and text projections summed, then L2-normalised.

One place for the rule, used by training (the loss) and evaluation (the queries) alike:
MMRet-CLIP ("score fusion", method.md §7) adds the *un-normalised* projected vectors; image-only
or text-only inputs use their own normalised projection.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def fuse_query(image_projection: torch.Tensor, text_projection: torch.Tensor) -> torch.Tensor:
    """L2-normalise(image projection + text projection), row-wise; inputs are raw projections."""
    if image_projection.shape != text_projection.shape:
        raise ValueError(
            f"image and text projections differ in shape: {tuple(image_projection.shape)} vs "
            f"{tuple(text_projection.shape)}"
        )
    fused = image_projection.float() + text_projection.float()
    return F.normalize(fused, dim=-1)


def normalize(projection: torch.Tensor) -> torch.Tensor:
    """A single-modality embedding: its normalised projection (in float32)."""
    return F.normalize(projection.float(), dim=-1)
