"""The user's server goes away in the middle of a shard.

`transformers serve` killed while a describe step ran: the calls after the kill failed, but
fewer than half of the shard's, so the step succeeded with those pairs quarantined as
request_failed, and the shard was recorded as done with rows missing. The step now fails,
saying which server stopped answering; the re-run with the server back asks only for the rest.
"""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import threading
import time
from dataclasses import replace
from pathlib import Path

from fault_server import ChatServer
from generation_fixtures import http_settings, make_world

from megapairs_assets.generation.common import GenerationStepError
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.store import store_path

FAULT_SERVER = Path(__file__).with_name("fault_server.py")


def _answered(store: Path) -> int:
    if not store.exists():
        return 0
    try:
        with sqlite3.connect(store) as con:
            query = "SELECT count(*) FROM responses WHERE status = 'ok'"
            return con.execute(query).fetchone()[0]
    except sqlite3.OperationalError:  # the file exists, its table not yet (or it is locked)
        return 0


def test_a_server_gone_mid_shard_fails_the_step_and_the_rerun_resumes(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(30,), images_per_shard=30)
    server = subprocess.Popen(
        [sys.executable, str(FAULT_SERVER), "--latency-s", "0.05"],
        stdout=subprocess.PIPE,
        text=True,
    )
    port = int(server.stdout.readline().split()[1])
    # However many calls fail, the share alone never fails the step here: only the server's
    # disappearance can.
    settings = replace(
        http_settings(f"http://127.0.0.1:{port}/v1", max_in_flight=1, max_retries=2),
        max_failure_fraction=1.0,
    )
    store = store_path(world.layout, "00000", "describe")
    outcome: dict[str, object] = {}

    def describe() -> None:
        try:
            outcome["result"] = describe_pairs_for_shard(
                "00000", world.layout, world.catalog, settings
            )
        except GenerationStepError as error:
            outcome["error"] = error

    worker = threading.Thread(target=describe)
    worker.start()
    try:
        deadline = time.monotonic() + 60
        while _answered(store) == 0:  # the first answers are committed (about a second in)
            assert time.monotonic() < deadline and worker.is_alive()
            time.sleep(0.01)
        os.kill(server.pid, signal.SIGKILL)  # as a crash or `kill -9` does
    finally:
        server.kill()
        server.wait()
        worker.join(timeout=60)
    answered = _answered(store)
    assert 0 < answered < 30

    assert "result" not in outcome, "the shard was recorded with pairs missing"
    message = str(outcome["error"])
    assert f"http://127.0.0.1:{port}/v1 stopped answering during the step" in message
    assert f"{30 - answered} of 30 model calls failed" in message
    assert "Connection refused" in message and "a re-run resumes" in message

    with ChatServer(port=port) as back:
        result = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
        calls = back.count()
    assert result.row_count == 30 and result.rows["quarantine_log"].is_empty()
    assert result.metadata["model_cache_hits"] == answered
    assert result.metadata["model_calls"] == calls == 30 - answered


def test_a_quarantined_request_says_how_to_send_it_again(tmp_path):
    captions = {"00000/000000001": "a drawing of a REFUSED teapot (objects, food)"}
    world = make_world(tmp_path, pairs_per_shard=(6,), caption_of=captions)
    with ChatServer(faults={"REFUSED": ["400"] * 4}) as server:
        settings = replace(
            http_settings(server.base_url),
            describe=replace(http_settings(server.base_url).describe, template="describe_captions"),
            max_attempts=1,
            max_failure_fraction=1.0,
        )
        first = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
        log = first.rows["quarantine_log"]
        assert set(log["reason"]) == {"request_quarantined"}
        assert all(
            d.startswith("not sent again until a run sets retry_quarantined") for d in log["detail"]
        )
        assert "HTTP 400" in log["detail"][0]
        # The user fixes what the server refused, then asks once with retry_quarantined.
        server.faults.clear()
        again = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, replace(settings, retry_quarantined=True)
        )
    assert again.rows["quarantine_log"].is_empty()
    assert again.metadata["model_calls"] == log.height and again.row_count == 6
