"""The server checks around a step: the picture check without token counts, and how long a
server that stopped answering mid-step gets before the step calls it gone.

- The picture check compares `usage.prompt_tokens` with and without a picture. A server that
  reports no usage passed the check silently; it now says the check could not be made (a
  warning in the step log), and the step goes on.
- The "stopped answering" probe had a fixed 5 s timeout; it is the `stopped_probe_timeout_s`
  setting now.
"""

from __future__ import annotations

import socket
import time
from dataclasses import replace

import dagster as dg
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world

from megapairs_assets.generation.assets import generation_assets
from megapairs_assets.generation.backends.base import GenerationRequest, SamplingParams
from megapairs_assets.generation.backends.openai_http import OpenAIHttpBackend, probe_image_input
from megapairs_assets.generation.common import GenerationStepError, raise_if_backend_failing
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.generation.runner import RunStats
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.storage import LineageCatalogResource, StorageResource


def test_a_server_without_usage_is_not_judged_on_pictures():
    with ChatServer(usage=False) as server:
        skipped = probe_image_input(server.base_url, "test-model", timeout_s=5)
        generation = GenerationResource.from_settings(http_settings(server.base_url))
        warnings: list[str] = []
        problems = generation.image_input_problems("describe", timeout_s=5, warn=warnings.append)
    assert skipped is not None and skipped.kind == "image_check_skipped"
    assert "carry no usage.prompt_tokens" in skipped.detail
    assert problems == []  # never a refusal on a guess
    (warning,) = warnings
    assert "could not check whether 'test-model' reads pictures" in warning
    assert "the step goes on unchecked" in warning and "describe_captions" in warning


def test_a_server_still_loading_its_model_is_waited_for_or_checked_later():
    # `transformers serve` loads its model on the first request: the check waits for it
    # within its time, and a server still loading after that is checked on its first answer.
    with ChatServer(faults={"What colour": ["stall:1"]}) as loading:
        deferred = probe_image_input(loading.base_url, "test-model", timeout_s=0.3)
    assert deferred is not None and deferred.kind == "image_check_deferred"
    assert "no answer within 0.3 s" in deferred.detail
    assert "longer image_check_timeout_s" in deferred.detail
    with ChatServer(faults={"What colour": ["stall:1"]}) as loading:
        assert probe_image_input(loading.base_url, "test-model", timeout_s=10) is None


def test_the_describe_step_logs_the_skipped_picture_check_and_goes_on(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(2,))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])
    with ChatServer(usage=False) as server:
        result = dg.materialize(
            generation_assets[:1],
            instance=instance,
            partition_key="00000",
            resources={
                "generation": GenerationResource.from_settings(http_settings(server.base_url)),
                "storage": StorageResource(home=str(world.home), profile="test"),
                "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
            },
        )
    assert result.success
    logged = [
        entry.user_message
        for entry in instance.all_logs(result.run_id)
        if entry.level == "WARNING" or entry.level == 30
    ]
    assert any("could not check whether 'test-model' reads pictures" in m for m in logged)


@pytest.fixture
def silent_server():
    """A port that accepts connections (the kernel completes them) and never answers."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen(16)
        yield f"http://127.0.0.1:{sock.getsockname()[1]}/v1"


def test_the_stopped_server_probe_waits_as_long_as_set(silent_server):
    settings = replace(http_settings(silent_server), stopped_probe_timeout_s=0.3)
    resource = GenerationResource.from_settings(settings)
    assert resource.stopped_probe_timeout_s == 0.3
    assert resource.settings().stopped_probe_timeout_s == 0.3
    stats = RunStats(calls=10, failed=1, last_error="timeout")
    started = time.monotonic()
    with pytest.raises(GenerationStepError, match="stopped answering during the step"):
        raise_if_backend_failing(
            stats,
            0.5,
            "describe",
            "00000",
            settings.describe.backend,
            settings.stopped_probe_timeout_s,
        )
    assert time.monotonic() - started < 2.5  # the old fixed timeout took 5 s


def test_the_stopped_server_probe_timeout_is_validated():
    settings = http_settings("http://127.0.0.1:9/v1")
    for bad in (0, -1.0):
        with pytest.raises(ValueError, match="stopped_probe_timeout_s must be > 0"):
            replace(settings, stopped_probe_timeout_s=bad)
        with pytest.raises(Exception, match="stopped_probe_timeout_s"):
            GenerationResource(
                **{
                    **GenerationResource.from_settings(settings).model_dump(),
                    "stopped_probe_timeout_s": bad,
                }
            )


def test_a_timed_out_request_says_which_settings_to_change():
    # A server that answers one request at a time keeps the rest waiting: the error a user
    # reads names the two settings that fix it.
    with ChatServer(faults={"SLOW": ["stall:1"]}) as server:
        spec = http_settings(
            server.base_url, request_timeout_s=0.3, max_retries=0, max_in_flight=8
        ).describe.backend
        request = GenerationRequest(
            key="k",
            step="describe",
            messages=({"role": "user", "content": "SLOW"},),
            sampling=SamplingParams(max_tokens=8),
            seed=0,
        )
        results = []
        OpenAIHttpBackend(spec).generate([request], results.extend)
    (result,) = results
    assert "request_timeout_s=0.3 with up to max_in_flight=8" in result.error
    assert "needs a lower max_in_flight or a longer request_timeout_s" in result.error
