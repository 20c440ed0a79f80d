"""The openai_http backend under faults, and a real process kill mid-partition, then resume."""

from __future__ import annotations

import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world, with_template

from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    SamplingParams,
)
from megapairs_assets.generation.backends.openai_http import OpenAIHttpBackend
from megapairs_assets.generation.common import GenerationStepError
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.store import store_path

REPO_ROOT = Path(__file__).resolve().parents[1]


def _request(key: str, text: str) -> GenerationRequest:
    return GenerationRequest(
        key=key,
        step="describe",
        messages=[{"role": "user", "content": text}],
        sampling=SamplingParams(max_tokens=20),
        seed=1,
    )


def _backend(server: ChatServer, **options) -> OpenAIHttpBackend:
    spec = BackendSpec(
        "openai_http",
        "test-model",
        options={
            "base_urls": [server.base_url],
            "max_in_flight": 8,
            "request_timeout_s": 0.5,
            "max_retries": 3,
            "backoff_initial_s": 0.01,
            "backoff_max_s": 0.05,
            **options,
        },
    )
    return OpenAIHttpBackend(spec)


def _generate(backend: OpenAIHttpBackend, requests: list[GenerationRequest]) -> dict:
    results = {}
    backend.generate(requests, lambda batch: results.update({r.key: r for r in batch}))
    return results


def test_transient_faults_are_retried_and_retry_after_is_honoured():
    faults = {
        "M429": ["429:1"],
        "MDATE": ["429-date:2"],
        "M500": ["500", "503"],
        "MSTALL": ["stall:3"],
        "MRESET": ["reset", "reset"],
        "MGARBAGE": ["garbage", "nochoices"],
    }
    with ChatServer(faults=faults) as server:
        backend = _backend(server)
        results = _generate(backend, [_request(marker, f"hello {marker}") for marker in faults])
    assert all(r.error is None and r.text for r in results.values()), results
    assert backend.retries == 9  # one per scripted fault
    # Each retry of a 429 waited what the server asked, not the 0.05 s backoff cap.
    by_tag: dict[str, list] = {}
    for served in server.served:
        by_tag.setdefault(served.tag, []).append(served)
    waits = sorted(
        seq[1].at - seq[0].at for seq in by_tag.values() if seq[0].fault.startswith("429")
    )
    assert waits[0] >= 0.9 and waits[1] >= 0.9  # "1" and an HTTP date about 1-2 s ahead


def test_persistent_failures_give_up_and_client_errors_are_not_retried():
    faults = {"MDOWN": ["500"] * 10, "MBAD": ["400"] * 10}
    with ChatServer(faults=faults) as server:
        backend = _backend(server)
        results = _generate(backend, [_request(m, f"hi {m}") for m in (*faults, "MFINE")])
        seen = {s.fault: 0 for s in server.served}
        for served in server.served:
            seen[served.fault] += 1
    assert results["MFINE"].error is None
    assert (
        "gave up after 4 tries" in results["MDOWN"].error and "HTTP 500" in results["MDOWN"].error
    )
    assert "HTTP 400" in results["MBAD"].error
    assert seen == {"500": 4, "400": 1, "ok": 1}


def test_replicas_share_the_load_and_a_dead_replica_is_retried_elsewhere():
    with ChatServer() as one, ChatServer() as two:
        dead = "http://127.0.0.1:9/v1"  # discard port: connection refused
        backend = _backend(one, base_urls=[one.base_url, two.base_url, dead])
        results = _generate(backend, [_request(f"k{i}", f"text {i}") for i in range(30)])
    assert all(r.error is None for r in results.values())
    assert one.count() >= 10 and two.count() >= 10


def test_failed_requests_are_retried_on_later_runs_then_quarantined(tmp_path):
    captions = {"00000/000000001": "a drawing of a MDOWN teapot (objects, food)"}
    world = make_world(tmp_path, pairs_per_shard=(6,), caption_of=captions)
    with ChatServer(faults={"MDOWN": ["500"] * 100}) as server:
        settings = with_template(
            http_settings(server.base_url, max_retries=1), "describe", "describe_captions"
        )
        settings = replace(settings, max_attempts=3, max_failure_fraction=1.0)
        pairs = pl.read_parquet(world.layout.shard_table("mined_image_pairs", "00000"))
        doomed = pairs.filter(
            (pl.col("query_id") == "00000/000000001") | (pl.col("target_id") == "00000/000000001")
        ).height
        assert doomed >= 1
        reasons = []
        for _ in range(4):
            result = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
            log = result.rows["quarantine_log"]
            reasons.append(sorted(set(log["reason"])))
            assert log.height == doomed
            assert result.row_count == pairs.height - doomed
        sends = server.count("500")
    # The third failed attempt reaches the limit: quarantined then, and never sent again.
    assert reasons == [["request_failed"]] * 2 + [["request_quarantined"]] * 2
    assert sends == doomed * 3 * 2  # 3 runs x (1 try + 1 retry); the 4th run sends nothing
    assert "attempt 3/3" in log["detail"][0] and "HTTP 500" in log["detail"][0]


def test_a_down_backend_fails_the_step_loudly_after_keeping_what_finished(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(4,))
    settings = http_settings("http://127.0.0.1:9/v1", max_retries=1)
    with pytest.raises(GenerationStepError, match="4 of 4 model calls failed") as raised:
        describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
    # Why, and which server, without opening the response store.
    assert (
        "last error: gave up after 2 tries: connection to http://127.0.0.1:9/v1/chat/completions:"
        " ConnectError: [Errno 111] Connection refused;" in str(raised.value)
    )


def test_a_failing_step_quotes_the_servers_answer(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(3,))
    with ChatServer(faults={"Compare the two images": ["400"] * 100}) as server:
        settings = http_settings(server.base_url)
        with pytest.raises(GenerationStepError) as raised:
            describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
    message = str(raised.value)
    assert "3 of 3 model calls failed" in message
    assert f"last error: HTTP 400 from {server.base_url}/chat/completions" in message


_CHILD = textwrap.dedent(
    """
    import sys
    from dataclasses import replace
    from generation_fixtures import http_settings
    from megapairs_assets.generation.describe import describe_pairs_for_shard
    from megapairs_assets.lib.storage import DataLayout
    from megapairs_assets.lineage.catalog import LineageCatalog

    home, url = sys.argv[1], sys.argv[2]
    layout = DataLayout(__import__("pathlib").Path(home))
    settings = replace(http_settings(url, max_in_flight=2), flush_every=1)
    describe_pairs_for_shard("00000", layout, LineageCatalog(layout.catalog_path), settings)
    print("finished unexpectedly")
    """
)


def _stored_texts(path: Path) -> list[str]:
    if not path.exists():
        return []
    with sqlite3.connect(path, timeout=30) as con:
        try:
            rows = con.execute("SELECT text FROM responses WHERE status = 'ok'").fetchall()
        except sqlite3.OperationalError:  # polled between the file's creation and its schema
            return []
        return [row[0] for row in rows]


def test_a_killed_run_resumes_without_repeating_a_finished_request(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(40,), images_per_shard=12)
    total = pl.read_parquet(world.layout.shard_table("mined_image_pairs", "00000")).height
    store = store_path(world.layout, "00000", "describe")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO_ROOT), str(REPO_ROOT / "tests")])}
    with ChatServer(latency_s=0.1) as server:
        child = subprocess.Popen(
            [sys.executable, "-c", _CHILD, str(world.home), server.base_url],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        deadline = time.monotonic() + 120
        while len(_stored_texts(store)) < 10:
            assert child.poll() is None, child.stdout.read()
            assert time.monotonic() < deadline, "the child never got going"
            time.sleep(0.05)
        os.kill(child.pid, signal.SIGKILL)
        child.wait()
        assert child.returncode == -signal.SIGKILL
        persisted = _stored_texts(store)
        assert 10 <= len(persisted) < total
        persisted_tags = {text.rsplit("[", 1)[1].rstrip("].") for text in persisted}
        served_before = server.count()

        result = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, http_settings(server.base_url)
        )
        resumed_tags = [s.tag for s in server.served[served_before:]]
    assert result.row_count == total
    assert result.metadata["model_cache_hits"] == len(persisted)
    assert result.metadata["model_calls"] == total - len(persisted) == len(resumed_tags)
    assert persisted_tags.isdisjoint(resumed_tags)
