"""A process id seen again later may be another process: what a killed writer or run left
behind is still recognised as abandoned when its id was reused (Linux /proc start times)."""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

import pytest

from megapairs_assets.lib.processes import process_alive, process_start_time
from megapairs_assets.lib.storage import sweep_abandoned_temporaries, temporary_name

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="reads /proc")


def test_this_process_started_before_now_and_after_boot() -> None:
    started = process_start_time(os.getpid())
    assert started is not None
    assert time.time() - 7 * 24 * 3600 < started <= time.time()
    assert process_start_time(2**22 + 12345) is None  # beyond pid_max: no such process


def test_an_id_taken_by_a_process_started_after_it_was_seen_counts_as_gone() -> None:
    started = process_start_time(os.getpid())
    assert started is not None
    assert process_alive(os.getpid())
    assert process_alive(os.getpid(), seen_at=time.time())
    # Seen an hour before this process started: that was another process with this id.
    assert not process_alive(os.getpid(), seen_at=started - 3600)


def test_a_temporary_file_older_than_its_ids_current_process_is_swept(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from megapairs_assets.lib import processes

    table = tmp_path / temporary_name("table.parquet")
    table.write_bytes(b"half written")
    assert sweep_abandoned_temporaries(tmp_path) == []  # its writer (this process) is alive
    # As if this id now belonged to a process started after the file was last changed.
    monkeypatch.setattr(processes, "process_start_time", lambda pid: time.time() + 3600)
    assert sweep_abandoned_temporaries(tmp_path) == [table]
    assert not table.exists()
