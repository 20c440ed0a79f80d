"""What a user watching a step sees: progress over the model's calls, not over instant ones.

A demo-like shard sends a few pairs to a model and fills the rest with the caption heuristic
(thousands of answers per second). One bar over both showed "1/473 pairs, 0.0 pairs/s, ETA
8:31:31" for a step that finished two minutes later; a re-run's cache hits inflated the rate
the same way. The model's calls now report their own progress.
"""

from __future__ import annotations

import re
from dataclasses import replace

from fault_server import ChatServer
from generation_fixtures import http_settings, make_world

from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.settings import PairSample

_LINE = re.compile(r"^(?P<label>.+): (?P<done>\d+)/(?P<total>\d+) requests .*?, (?P<rate>[\d.]+) ")


def _progress(lines: list[str]) -> dict[str, tuple[int, int, float]]:
    """label -> (done, total, rate) of the last progress line of each label."""
    found = {}
    for line in lines:
        if match := _LINE.match(line):
            found[match["label"]] = (int(match["done"]), int(match["total"]), float(match["rate"]))
    return found


def test_model_progress_counts_model_calls_and_the_cache_is_said_once(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(24,), images_per_shard=24)
    with ChatServer(latency_s=0.3) as server:
        settings = replace(
            http_settings(server.base_url, max_in_flight=1),
            model_sample=PairSample(fraction=1.0, max_pairs_per_shard=3),
            heuristic_fill=True,
        )
        lines: list[str] = []
        first = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, log=lines.append
        )
        assert first.metadata["model_calls"] == 3 and first.metadata["heuristic_requests"] > 10
        progress = _progress(lines)
        done, total, rate = progress["describe 00000 (model)"]
        assert (done, total) == (3, 3)
        # Three calls of 0.3 s one at a time: about 3 per second, not the heuristic's pace.
        assert rate < 4.0, lines
        heuristic = first.metadata["heuristic_requests"]
        assert progress["describe 00000 (heuristic)"][:2] == (heuristic, heuristic)

        lines.clear()
        again = describe_pairs_for_shard(
            "00000", world.layout, world.catalog, settings, log=lines.append
        )
    assert again.metadata["model_calls"] == 0
    cached = "describe 00000 (model): 3 of 3 requests answered from an earlier run's cache"
    assert cached in "\n".join(lines)
    assert "describe 00000 (model)" not in _progress(lines)  # nothing to send: no bar
