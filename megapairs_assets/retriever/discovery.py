"""Finding trained checkpoints on disk, so each becomes a retriever that can be scored.

The training stage writes, per named config, an open_clip export under
`<data>/mmret_clip_checkpoint/<config>/open_clip/` (`open_clip_config.json` plus weights).
`discover_checkpoints` lists every complete export below a root: a folder holding both the
config and a weights file. A folder still being written (config or weights missing) is not
listed until it is complete.
"""

from __future__ import annotations

from pathlib import Path

from megapairs_assets.retriever.model import (
    LOCAL_DIR_PREFIX,
    OPEN_CLIP_CONFIG,
    WEIGHT_SUFFIXES,
    RetrieverSpec,
)

# Deep enough for <root>/<config>/open_clip/, shallow enough to stay cheap on a big data root.
_MAX_DEPTH = 3


def discover_checkpoints(root: Path) -> dict[str, RetrieverSpec]:
    """retriever_id -> spec of every complete open_clip export below `root` (sorted by id)."""
    found: dict[str, RetrieverSpec] = {}
    if not root.is_dir():
        return found
    for folder in _folders(root, _MAX_DEPTH):
        if (folder / OPEN_CLIP_CONFIG).is_file() and _has_weights(folder):
            spec = RetrieverSpec(f"{LOCAL_DIR_PREFIX}{folder.resolve()}")
            found.setdefault(spec.retriever_id, spec)
    return dict(sorted(found.items()))


def _folders(root: Path, depth: int) -> list[Path]:
    folders = [root]
    frontier = [root]
    for _ in range(depth):
        frontier = [
            child
            for parent in frontier
            for child in sorted(parent.iterdir())
            if child.is_dir() and not child.name.startswith(".")
        ]
        folders += frontier
    return folders


def _has_weights(folder: Path) -> bool:
    return any(any(folder.glob(f"*{suffix}")) for suffix in WEIGHT_SUFFIXES)
