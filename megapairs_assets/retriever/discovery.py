"""Finding trained checkpoints on disk, so each becomes a retriever that can be scored.

The training stage writes, per named config, an open_clip export under
`<data>/mmret_clip_checkpoint/<config>/open_clip/` (`open_clip_config.json` plus weights).
`discover_checkpoints` lists every complete export below a root: a folder holding both the
config and a weights file. A folder still being written (config or weights missing) is not
listed until it is complete.

With the data root on an object store, `discover_remote_checkpoints` lists the exports there
and mirrors them to a local cache folder (under `home`), from which open_clip loads them.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from megapairs_assets.lib.storage import DataPath
from megapairs_assets.retriever.model import (
    LOCAL_DIR_PREFIX,
    OPEN_CLIP_CONFIG,
    WEIGHT_SUFFIXES,
    RetrieverSpec,
)

# Deep enough for <root>/<config>/open_clip/, shallow enough to stay cheap on a big data root.
_MAX_DEPTH = 3
# Beside a local copy of an export: what was fetched ({file: [size, ETag]}), so unchanged
# files are not fetched again.
_MANIFEST = ".remote.json"


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


def discover_remote_checkpoints(
    root: DataPath, cache_root: Path, *, download_weights: bool
) -> dict[str, RetrieverSpec]:
    """Complete exports under an object-store `root`, as specs of local copies in `cache_root`.

    open_clip loads an export from a local folder only, so each export found (config plus
    weights, at most `_MAX_DEPTH` folders down) is mirrored to the same relative folder under
    `cache_root`. Its small config is always copied (the retriever id is read from it);
    `download_weights` copies the weights too, so the spec loads (the scoring step asks for
    them; a sensor listing retrievers does not, so a tick never moves gigabytes). Only files
    whose size or ETag changed since the last copy are fetched, each into place atomically
    (weights before the config, the order training publishes them in); copies of exports
    that left the store are removed.
    """
    fs, base = root.fs, root.path.rstrip("/")
    try:
        listed = fs.find(base, maxdepth=_MAX_DEPTH + 1, detail=True)
    except FileNotFoundError:
        listed = {}
    by_folder: dict[str, dict[str, dict[str, Any]]] = {}
    for key, info in listed.items():
        folder, _, name = key.removeprefix(f"{base}/").rpartition("/")
        if info.get("type", "file") == "file" and not name.startswith("."):
            by_folder.setdefault(folder, {})[name] = info
    found: dict[str, RetrieverSpec] = {}
    kept: set[Path] = set()
    for folder, files in sorted(by_folder.items()):
        weights = [n for n in files if n.endswith(WEIGHT_SUFFIXES)]
        if not folder or OPEN_CLIP_CONFIG not in files or not weights:
            continue
        local = cache_root / folder
        wanted = [*(weights if download_weights else []), OPEN_CLIP_CONFIG]
        _mirror(fs, f"{base}/{folder}", local, {n: files[n] for n in wanted})
        kept.add(local)
        spec = RetrieverSpec(f"{LOCAL_DIR_PREFIX}{local.resolve()}")
        found.setdefault(spec.retriever_id, spec)
    _remove_stale_copies(cache_root, kept)
    return dict(sorted(found.items()))


def _mirror(fs: Any, remote: str, local: Path, files: dict[str, dict[str, Any]]) -> None:
    """Fetch the files whose (size, ETag) differ from the local manifest, config last."""
    manifest_path = local / _MANIFEST
    try:
        manifest = json.loads(manifest_path.read_text())
    except (OSError, ValueError):
        manifest = {}
    changed = False
    for name in sorted(files, key=lambda n: n == OPEN_CLIP_CONFIG):
        info = files[name]
        version = [int(info.get("size") or 0), str(info.get("ETag") or info.get("etag") or "")]
        if manifest.get(name) == version and (local / name).is_file():
            continue
        local.mkdir(parents=True, exist_ok=True)
        tmp = local / f".{name}.tmp-{uuid.uuid4().hex[:8]}"
        try:
            fs.get_file(f"{remote}/{name}", str(tmp))
            os.replace(tmp, local / name)
        finally:
            tmp.unlink(missing_ok=True)
        manifest[name] = version
        changed = True
    if changed:
        tmp = local / f".{_MANIFEST}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
        os.replace(tmp, manifest_path)


def _remove_stale_copies(cache_root: Path, kept: set[Path]) -> None:
    if not cache_root.is_dir():
        return
    for manifest in list(cache_root.rglob(_MANIFEST)):  # listed before removing
        if manifest.parent not in kept:
            shutil.rmtree(manifest.parent, ignore_errors=True)
