"""The corpus's per-file caches see a rewritten file even when its size and mtime are kept
(`cp -p`, `rsync -a`), as in a long-lived process such as the code server running sensors."""

from __future__ import annotations

import json
import os
from pathlib import Path

from megapairs_assets.corpus.sources import SourceSpec, list_manifest_rows


def _write_manifest(path: Path, caption: str) -> None:
    path.write_text(json.dumps({"path": "a.jpg", "caption": caption}) + "\n")


def test_a_manifest_rewritten_with_its_old_size_and_mtime_is_read_again(tmp_path: Path) -> None:
    (tmp_path / "a.jpg").write_bytes(b"not read here")
    manifest = tmp_path / "manifest.jsonl"
    _write_manifest(manifest, "a red bike")
    spec = SourceSpec(kind="manifest", path=str(manifest))
    assert [e.caption for e in list_manifest_rows(spec).entries] == ["a red bike"]
    before = manifest.stat()
    _write_manifest(manifest, "a tan bike")  # same length
    os.utime(manifest, ns=(before.st_atime_ns, before.st_mtime_ns))  # what cp -p / rsync -a do
    assert manifest.stat().st_size == before.st_size
    assert manifest.stat().st_mtime_ns == before.st_mtime_ns
    assert [e.caption for e in list_manifest_rows(spec).entries] == ["a tan bike"]
