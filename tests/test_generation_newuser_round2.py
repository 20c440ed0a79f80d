"""Second round of a tester's findings against a real `transformers serve` server.

1. Retries were invisible: a killed server showed only a slow progress line, and a server that
   stayed down 30 s of silence before "gave up after 7 tries". Each retry is now told on the
   warning log (the first of each kind in full, then summed up), and counted in the step's
   figures.
2. The progress line counted failed requests as done ("6/6 requests (100%)" before "2 of 6
   model calls failed"), and a slow server's rate read "0.0 requests/s".
3. Heuristic instructions read "on a animals theme": this text is training data.
4. A server asked for another model (`served_model`) wrote rows that named the configured model
   only: rows now also record the model the server says answered.
"""

from __future__ import annotations

import json
import socket
from dataclasses import replace

import fault_server
import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world, record_step

from megapairs_assets.generation.backends.base import RetryEvent
from megapairs_assets.generation.backends.heuristic import (
    describe_from_captions,
    indefinite_article,
    instructions_from_captions,
    is_plural,
)
from megapairs_assets.generation.common import DESCRIPTIONS_ASSET, GenerationStepError
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.instruct import write_instructions_for_shard
from megapairs_assets.generation.runner import RetryLog
from megapairs_assets.lib import progress as progress_module
from megapairs_assets.lib.progress import Progress

# -- 1. retries are told and counted ----------------------------------------------------------


def test_retries_are_warned_with_try_wait_kind_and_url_and_counted(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(6,), images_per_shard=8)
    # The first three tries the server sees fail (two 503s, then a reset connection); every
    # request still gets its answer on a later try.
    with ChatServer(faults={"": ["503", "503", "reset"]}) as server:
        settings = http_settings(server.base_url, max_in_flight=1)
        info: list[str] = []
        warnings: list[str] = []
        result = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, log=info.append, warn=warnings.append
        )
    assert result.row_counts["descriptions"] == 6
    assert result.metadata["model_retries"] == 3
    assert "retries" in result.markdown["requests"]
    url = f"{server.base_url}/chat/completions"
    # One full line per kind of error: the 503's and the connection's, each naming the try,
    # the wait and the URL; the second 503 is summed up when the run ends.
    # One request at a time: its first two tries get 503s, its third a reset connection.
    full = [line for line in warnings if ": retrying: try " in line]
    assert len(full) == 2, warnings
    assert "try 1/7 failed (HTTP 503), next in 0.0" in full[0] and url in full[0], warnings
    assert "try 3/7 failed (connection), next in 0.0" in full[1] and url in full[1], warnings
    summary = [line for line in warnings if "1 more retry in the last" in line]
    assert len(summary) == 1 and "HTTP 503: 1" in summary[0] and "try 2/7" in summary[0]
    assert all(line.startswith("describe 00000 (model): ") for line in warnings)
    assert not any("retr" in line for line in info)  # warnings go to the warning log


def test_a_server_that_stays_down_is_warned_about_before_the_step_gives_up(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(2,), images_per_shard=4)
    with socket.socket() as sock:  # a port nothing listens on
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    settings = http_settings(f"http://127.0.0.1:{port}/v1", max_in_flight=2, max_retries=2)
    warnings: list[str] = []
    with pytest.raises(GenerationStepError, match="gave up after 3 tries"):
        describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, warn=warnings.append
        )
    assert warnings, "no line while the retries waited"
    assert "retrying: try 1/3 failed (connection)" in warnings[0]
    assert f"127.0.0.1:{port}" in warnings[0] and "Connection refused" in warnings[0]


def _event(kind: str, attempt: int = 1) -> RetryEvent:
    return RetryEvent(attempt, 7, 0.5, kind, f"{kind} from http://h:1/v1/chat/completions", "")


def test_the_retry_log_sums_up_instead_of_a_line_per_retry():
    lines: list[str] = []
    retry_log = RetryLog("instruct 00000 (model)", lines.append, every_s=3600.0)
    for _ in range(500):  # many requests in flight hit the same restart
        retry_log(_event("connection"))
    retry_log(_event("HTTP 503", attempt=2))
    assert len(lines) == 2  # the first of each kind, in full
    assert "try 2/7 failed (HTTP 503), next in 0.50 s" in lines[1]
    retry_log.close()
    assert len(lines) == 3 and "499 more retries in the last" in lines[2]
    assert "connection: 499" in lines[2]
    assert retry_log.count == 501

    lines.clear()
    often = RetryLog("x", lines.append, every_s=0.0)
    for _ in range(4):
        often(_event("timeout"))
    assert len(lines) == 4  # with no interval, every later retry is its own summary


# -- 2. failures and slow rates in the progress line -------------------------------------------


def test_progress_shows_failed_requests_and_keeps_other_lines_unchanged():
    lines: list[str] = []
    with Progress(6, "instruct 00000 (model)", "requests", log=lines.append, bar=False) as done:
        done.update(4)
        done.update(2, failed=2)
    assert "6/6 requests (100%), 2 failed, " in lines[-1]
    lines.clear()
    with Progress(3, "embed", "images", log=lines.append, bar=False) as done:
        done.update(3)
    assert "failed" not in lines[-1] and "3/3 images (100%), " in lines[-1]


def test_a_slow_rate_is_not_shown_as_zero(monkeypatch):
    now = [1000.0]
    monkeypatch.setattr(progress_module.time, "perf_counter", lambda: now[0])
    lines: list[str] = []
    with Progress(2, "instruct 00000 (model)", "requests", log=lines.append, bar=False) as done:
        now[0] += 35.0
        done.update(1)
    assert "0.0 requests/s" not in lines[-1]
    assert "0.029 requests/s, one every 35 s" in lines[-1], lines
    fast = Progress(10, "knn", "rows", bar=False)
    now[0] += 2.0
    fast.update(5)
    assert "2.5 rows/s, elapsed" in fast.line()


def test_the_step_progress_line_counts_failed_calls(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(6,), images_per_shard=8)
    # A 400 is not retried: the last two requests fail, the server stays up.
    with ChatServer(faults={"": ["ok"] * 4 + ["400", "400"]}) as server:
        settings = replace(
            http_settings(server.base_url, max_in_flight=1), max_failure_fraction=1.0
        )
        lines: list[str] = []
        result = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, log=lines.append
        )
    assert result.metadata["model_failed"] == 2
    progress = [line for line in lines if " requests (" in line]
    assert "6/6 requests (100%), 2 failed, " in progress[-1], lines


# -- 3. articles in the caption heuristic's text ------------------------------------------------


@pytest.mark.parametrize(
    ("tag", "phrase"),
    [
        ("animals", "on the theme of animals"),
        ("signs and symbols", "on the theme of signs and symbols"),
        ("people", "on the theme of people"),
        ("food", "on a food theme"),
        ("education", "on an education theme"),
        ("office", "on an office theme"),
        ("electronics", "on an electronics theme"),
        ("universe", "on a universe theme"),
    ],
)
def test_heuristic_theme_takes_the_right_article(tag, phrase):
    queries = instructions_from_captions(
        "a flat drawing of a cat (music)", f"a flat drawing of a bear ({tag})"
    )
    assert any(phrase in query for query in queries), queries
    assert not any(f"a {tag} theme" in query for query in queries if phrase not in query)


def test_heuristic_styles_take_the_right_article_and_plural():
    queries = instructions_from_captions(
        "a flat drawing of a bear (animals)", "an illustration of a bear (animals)"
    )
    assert "an illustration version of this" in queries
    description = describe_from_captions(
        "a piece of clip art showing a bear (animals)", "a piece of clip art showing a bear"
    )
    assert "are both pieces of clip art;" in description
    assert "are both clip art;" in describe_from_captions(
        "clip art of an owl (animals)", "clip art of an owl (animals)"
    )
    assert [indefinite_article(w) for w in ("owl", "hour", "unicorn", "bear")] == [
        "an",
        "an",
        "a",
        "a",
    ]
    assert not is_plural("glass") and is_plural("mammals")


# -- 4. rows record the model that answered ----------------------------------------------------


def test_rows_record_the_model_the_server_says_answered(tmp_path, monkeypatch):
    world = make_world(tmp_path, pairs_per_shard=(3,), images_per_shard=6)
    real = fault_server._completion

    def reports_its_own_model(body, text, usage=True):
        # As `transformers serve` does: it answers with the model it loaded, whatever was asked.
        answer = json.loads(real(body, text, usage))
        answer["model"] = "/models/Other-7B"
        return json.dumps(answer).encode()

    with ChatServer() as server:
        settings = http_settings(server.base_url, served_model="/other/model")
        described = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
        record_step(world.catalog, DESCRIPTIONS_ASSET, described)
        monkeypatch.setattr(fault_server, "_completion", reports_its_own_model)
        instructed = write_instructions_for_shard("00000", world.layout, world.catalog, settings)
    descriptions = pl.read_parquet(described.outputs["descriptions"])
    instructions = pl.read_parquet(instructed.outputs["instructions"])
    configured = settings.describe.backend.model_id
    # The configured id stays (request keys and lineage use it); the server's word is beside it.
    assert set(descriptions["model_id"]) == {configured}
    assert set(descriptions["served_model"]) == {"/other/model"}  # echoed by this server
    assert set(instructions["model_id"]) == {configured}
    assert set(instructions["served_model"]) == {"/models/Other-7B"}
    assert instructed.metadata["rows_by_served_model"] == {"/models/Other-7B": 3}


def test_triplets_lineage_and_the_card_say_which_model_the_server_answered_as(
    tmp_path, monkeypatch
):
    from megapairs_assets.generation.common import INSTRUCTIONS_ASSET, TRIPLETS_ASSET
    from megapairs_assets.generation.export import _shard_figures, render_card
    from megapairs_assets.generation.triplets import build_triplets_for_shard
    from megapairs_assets.lineage.report import lineage_report

    world = make_world(tmp_path, pairs_per_shard=(3,), images_per_shard=6)
    real = fault_server._completion

    def reports_its_own_model(body, text, usage=True):
        answer = json.loads(real(body, text, usage))
        answer["model"] = "/models/Other-7B"
        return json.dumps(answer).encode()

    with ChatServer() as server:
        settings = http_settings(server.base_url)
        described = describe_pairs_for_shard("00000", world.layout, world.catalog, settings)
        record_step(world.catalog, DESCRIPTIONS_ASSET, described)
        monkeypatch.setattr(fault_server, "_completion", reports_its_own_model)
        instructed = write_instructions_for_shard("00000", world.layout, world.catalog, settings)
        record_step(world.catalog, INSTRUCTIONS_ASSET, instructed)
    built = build_triplets_for_shard("00000", world.layout, world.catalog, settings)
    record_step(world.catalog, TRIPLETS_ASSET, built)
    configured = settings.describe.backend.model_id

    lineage = world.catalog.query("SELECT * FROM triplet_lineage")
    assert lineage.height == 3
    # The description server answered as the model asked for (by its name, without our
    # `@label`); the instruction one named another model.
    assert set(lineage["description_served_model"]) == {configured.partition("@")[0]}
    assert set(lineage["instruction_served_model"]) == {"/models/Other-7B"}

    report = lineage_report(world.catalog, lineage["triplet_id"][0])
    assert report is not None
    description_line = next(line for line in report.splitlines() if "description:" in line)
    instruction_line = next(line for line in report.splitlines() if "instructions:" in line)
    assert "served as" not in description_line
    assert f"{configured}; served as /models/Other-7B" in instruction_line

    exported = pl.read_parquet(built.outputs["triplets"])
    figures = _shard_figures("00000", exported, settings, world.catalog, {})
    assert figures["served_as"] == {f"{configured} -> /models/Other-7B": 3}
    card = render_card([figures], settings)
    assert f"| {configured} -> /models/Other-7B | 3 |" in card
    # A card whose servers all answered as asked has no such section.
    assert "answered as another model" not in render_card([{**figures, "served_as": {}}], settings)
