"""Caches that a crash or a bad disk damaged: set aside or swept, never a failed step.

What is proved: a generation response store cut short (`database disk image is malformed`)
is moved aside as `<name>.corrupt-<time>` with a warning naming both files, an empty store
takes its place and the request is answered again; a damaged store found mid-run is handled
the same way, as is a damaged shared mirror; and the staging folders a killed demo-model build
left are swept by the next build, while a live build's folder stays.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from megapairs_assets.demo import models as demo_models
from megapairs_assets.generation.backends.base import GenerationResult
from megapairs_assets.generation.store import STATUS_OK, ResponseStore, is_corrupt, open_store
from megapairs_assets.lib.processes import machine_tag
from megapairs_assets.lib.storage import DataLayout


def _answers(count: int, text: str = "an answer") -> list[GenerationResult]:
    return [
        GenerationResult(key=f"k{i}", text=f"{text} {'x' * 400}", model_id="m")
        for i in range(count)
    ]


def _filled_store(path: Path, count: int = 300) -> None:
    ResponseStore(path).record(_answers(count))
    with sqlite3.connect(path) as con:  # fold the WAL in, as a finished run leaves it
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")


def test_a_store_cut_short_is_set_aside_and_asked_again(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "home")
    path = layout.home / "cache" / "generation" / "00000" / "describe.sqlite"
    path.parent.mkdir(parents=True)
    _filled_store(path)
    os.truncate(path, path.stat().st_size // 2)  # the chaos run's damage
    warnings: list[str] = []

    store = open_store(layout, "00000", "describe", max_attempts=3, log=warnings.append)

    aside = [
        p
        for p in path.parent.iterdir()
        if re.fullmatch(r"describe\.sqlite\.corrupt-\d{8}T\d{6}Z", p.name)
    ]
    assert len(aside) == 1 and aside[0].stat().st_size > 0  # kept for a look, not deleted
    assert len(warnings) == 1 and str(path) in warnings[0] and str(aside[0]) in warnings[0]
    assert "malformed" in warnings[0]
    assert store.get(["k0"]) == {}  # nothing cached any more: the model is asked again
    store.record(_answers(1, "asked again"))
    assert store.get(["k0"])["k0"].text.startswith("asked again")
    assert store.counts() == {STATUS_OK: 1}
    # A second open finds a sound store: nothing more is moved.
    open_store(layout, "00000", "describe", max_attempts=3, log=warnings.append)
    assert len(warnings) == 1


def test_damage_found_mid_run_sets_the_store_aside_too(tmp_path: Path) -> None:
    path = tmp_path / "describe.sqlite"
    warnings: list[str] = []
    store = ResponseStore(path, log=warnings.append)
    store.record(_answers(300))
    with sqlite3.connect(path) as con:
        con.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    # Overwrite the middle pages with garbage while the store is open (a disk fault).
    size = path.stat().st_size
    with open(path, "r+b") as handle:
        handle.seek(size // 3)
        handle.write(os.urandom(size // 3))

    assert store.get([f"k{i}" for i in range(300)]) == {}
    assert len(warnings) == 1 and str(path) in warnings[0]
    store.record(_answers(2))  # the run goes on, into the new store
    assert store.counts() == {STATUS_OK: 2}


def test_a_damaged_shared_mirror_is_not_merged(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "home", data_root=str(tmp_path / "shared"))
    first = open_store(layout, "00000", "describe", max_attempts=3)
    first.record(_answers(50))
    first.mirror_now()
    mirror = tmp_path / "shared" / "data" / "cache" / "generation" / "00000" / "describe.sqlite"
    assert mirror.exists()
    os.truncate(mirror, mirror.stat().st_size // 2)
    elsewhere = DataLayout(tmp_path / "pod-2", data_root=str(tmp_path / "shared"))
    warnings: list[str] = []

    store = open_store(elsewhere, "00000", "describe", max_attempts=3, log=warnings.append)

    assert store.get(["k0"]) == {}
    assert len(warnings) == 1 and str(mirror) in warnings[0] and "not merged" in warnings[0]


def test_a_busy_store_is_not_mistaken_for_a_damaged_one(tmp_path: Path) -> None:
    path = tmp_path / "describe.sqlite"
    ResponseStore(path).record(_answers(1))
    holder = sqlite3.connect(path)
    holder.execute("BEGIN EXCLUSIVE")
    try:
        other = sqlite3.connect(path, timeout=0)
        with pytest.raises(sqlite3.OperationalError, match="locked") as raised:
            other.execute("BEGIN IMMEDIATE")  # a writer: WAL readers are never blocked
        other.close()
    finally:
        holder.rollback()
        holder.close()
    assert not is_corrupt(raised.value)  # a busy store waits or fails; it is never moved
    assert is_corrupt(sqlite3.DatabaseError("database disk image is malformed"))


def _current_demo_models(models_dir: Path) -> None:
    """Stand-ins for a finished build, so `ensure_demo_models` builds nothing."""
    models_dir.mkdir(parents=True, exist_ok=True)
    (models_dir / f"{demo_models.DEMO_CLIP_MODEL}.pt").write_bytes(b"weights")
    (models_dir / demo_models.DEMO_DINOV2_DIRNAME).mkdir()
    marker = {"build_version": demo_models.DEMO_MODELS_BUILD_VERSION}
    (models_dir / "demo-models.json").write_text(json.dumps(marker))


def test_a_killed_builds_staging_folders_are_swept(tmp_path: Path) -> None:
    models_dir = tmp_path / "models"
    _current_demo_models(models_dir)
    pid = os.getpid()
    digits = len(str(pid))
    dead = next(p for p in range(10 ** (digits - 1), 10**digits) if not _running(p))
    killed = models_dir / f".building-{machine_tag()}-{dead}-abc123"
    live = models_dir / f".building-{machine_tag()}-{pid}-def456"
    old_release = models_dir / ".building-k3j4h5"  # before staging names said who builds
    young_release = models_dir / ".building-z9y8x7"
    for folder in (killed, live, old_release, young_release):
        (folder / demo_models.DEMO_DINOV2_DIRNAME).mkdir(parents=True)
        (folder / "half.pt").write_bytes(b"half a model")
    an_hour_ago = time.time() - 3600
    os.utime(old_release, (an_hour_ago, an_hour_ago))

    demo_models.ensure_demo_models(models_dir)

    left = sorted(p.name for p in models_dir.iterdir() if p.name.startswith(".building-"))
    assert left == sorted([live.name, young_release.name])
    shutil.rmtree(live)


def _running(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
