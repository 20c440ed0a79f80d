"""Response stores follow the tables to other machines: a fresh pod does not ask twice.

On a cluster each step may run in a new pod with an empty home; the answers it paid for are
mirrored beside the tables (here a shared folder; the S3 loop test checks the bucket keys).
"""

from __future__ import annotations

from pathlib import Path

from megapairs_assets.generation.backends.base import GenerationResult
from megapairs_assets.generation.store import (
    STATUS_FAILED,
    STATUS_OK,
    ResponseStore,
    open_store,
    store_path,
)
from megapairs_assets.lib.storage import DataLayout


def _pod(tmp_path: Path, name: str) -> DataLayout:
    """A machine with its own home and the shared data root every machine sees."""
    return DataLayout(tmp_path / name, data_root=str(tmp_path / "shared"))


def _ok(key: str, text: str) -> GenerationResult:
    return GenerationResult(key=key, text=text, model_id="m")


def _failed(key: str) -> GenerationResult:
    return GenerationResult(key=key, error="HTTP 503", model_id="m")


def test_a_fresh_machine_finds_the_answers_another_one_paid_for(tmp_path: Path) -> None:
    first = open_store(_pod(tmp_path, "pod-1"), "00000", "describe", max_attempts=3)
    first.record([_ok("a", "alpha"), _ok("b", "beta"), _failed("c")])
    first.mirror_now()
    mirror = tmp_path / "shared/data/cache/generation/00000/describe.sqlite"
    assert mirror.is_file()

    second = open_store(_pod(tmp_path, "pod-2"), "00000", "describe", max_attempts=3)
    assert second.path != first.path and second.path.is_file()
    found = second.get(["a", "b", "c", "d"])
    assert {key: row.text for key, row in found.items() if row.status == STATUS_OK} == {
        "a": "alpha",
        "b": "beta",
    }
    assert found["c"].status == STATUS_FAILED and found["c"].attempts == 1
    assert "d" not in found


def test_an_answer_in_the_mirror_wins_over_a_local_failure(tmp_path: Path) -> None:
    stale = open_store(_pod(tmp_path, "pod-1"), "00000", "instruct", max_attempts=3)
    stale.record([_failed("k"), _ok("local-only", "kept")])
    elsewhere = open_store(_pod(tmp_path, "pod-2"), "00000", "instruct", max_attempts=3)
    elsewhere.record([_ok("k", "answered")])
    elsewhere.mirror_now()

    reopened = open_store(_pod(tmp_path, "pod-1"), "00000", "instruct", max_attempts=3)
    found = reopened.get(["k", "local-only"])
    assert (found["k"].status, found["k"].text) == (STATUS_OK, "answered")
    assert found["local-only"].text == "kept"  # a merge, not a replacement


def test_uploads_follow_the_interval_while_requests_settle(tmp_path: Path) -> None:
    layout = _pod(tmp_path, "pod-1")
    mirror = layout.shared_cache_file("generation", "00001", "describe.sqlite")
    assert mirror is not None
    throttled = ResponseStore(store_path(layout, "00001", "describe"), 3, mirror, 3600.0)
    throttled.record([_ok("a", "alpha")])
    assert not mirror.exists()  # not due yet: a large store is not re-uploaded per flush
    eager = ResponseStore(store_path(layout, "00001", "describe"), 3, mirror, 0.0)
    eager.record([_ok("b", "beta")])
    assert mirror.is_file()


def test_tables_under_the_home_need_no_mirror(tmp_path: Path) -> None:
    layout = DataLayout(tmp_path / "home")
    assert layout.shared_cache_file("generation", "00000", "describe.sqlite") is None
    store = open_store(layout, "00000", "describe", max_attempts=3)
    store.record([_ok("a", "alpha")])
    store.mirror_now()  # no-op
    assert not (tmp_path / "home/data/cache").exists()


def test_a_store_reopened_in_the_same_process_does_not_download_again(
    tmp_path: Path, monkeypatch
) -> None:
    merges: list[object] = []
    original = ResponseStore._merge_mirror
    monkeypatch.setattr(
        ResponseStore,
        "_merge_mirror",
        lambda self, mirror: (merges.append(mirror), original(self, mirror))[1],
    )
    layout = _pod(tmp_path, "pod-1")
    first = open_store(layout, "00003", "describe", max_attempts=3)
    first.record([_ok("a", "alpha")])
    first.mirror_now()
    open_store(layout, "00003", "describe", max_attempts=3)  # prefetch, then the step
    assert merges == []  # the mirror holds this process's own upload
    elsewhere = open_store(_pod(tmp_path, "pod-2"), "00003", "describe", max_attempts=3)
    assert len(merges) == 1  # another machine's first open takes the mirror in
    elsewhere.record([_ok("b", "beta")])
    elsewhere.mirror_now()
    reopened = open_store(layout, "00003", "describe", max_attempts=3)
    assert len(merges) == 2 and reopened.get(["b"])["b"].text == "beta"  # a newer upload
