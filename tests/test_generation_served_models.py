"""A user runs the paper's generation against their own OpenAI-compatible servers.

Found running `transformers serve` with stand-in models:
- answers cached for one served model were reused after `MEGAPAIRS_VLLM_DESCRIBE_MODEL` named
  another (the request key held the hub id only), so a rehearsal's answers would have leaked
  into the real run through the mirrored cache;
- a picture check that got no answer in time let a text-only model through, with one warning;
- "18 of 19 model calls failed ... Connection refused" did not name the setting holding the URL;
- against a dying server the step printed nothing for minutes.
"""

from __future__ import annotations

import hashlib
import json
import socket
from dataclasses import replace
from types import SimpleNamespace

import dagster as dg
import polars as pl
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world

from megapairs_assets.generation.assets import describe_settings, generation_assets
from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    SamplingParams,
    request_key,
)
from megapairs_assets.generation.backends.openai_http import OpenAIHttpBackend
from megapairs_assets.generation.common import GenerationStepError
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.generation.runner import run_requests
from megapairs_assets.generation.store import ResponseStore
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.storage import LineageCatalogResource, StorageResource

SHARD = "00000"


def _describe(world, settings, **kwargs):
    return describe_pairs_for_shard(SHARD, world.layout, world.catalog, settings, **kwargs)


def _table(world) -> pl.DataFrame:
    return pl.read_parquet(world.layout.shard_table("pair_descriptions", SHARD))


# -- 1. the served model decides reuse --------------------------------------------------------


def test_another_served_model_is_asked_again_and_a_moved_server_is_not(tmp_path, monkeypatch):
    world = make_world(tmp_path, pairs_per_shard=(4,))
    with ChatServer() as server, ChatServer() as elsewhere:
        rehearsal = _describe(world, http_settings(server.base_url, served_model="stand-in"))
        assert rehearsal.metadata["model_calls"] == 4

        real = _describe(world, http_settings(server.base_url, served_model="real-model"))
        assert real.metadata["model_calls"] == 4 and real.metadata["model_cache_hits"] == 0
        table = _table(world)
        assert set(table["served_model"]) == {"real-model"}  # no stand-in row left
        assert set(table["model_id"]) == {"test-model@fault-server"}

        # The same served model on another server, with an API key: every answer reused.
        monkeypatch.setenv("SERVED_TEST_KEY", "secret")
        moved = http_settings(
            elsewhere.base_url, served_model="real-model", api_key_env="SERVED_TEST_KEY"
        )
        again = _describe(world, moved)
        assert again.metadata["model_cache_hits"] == 4 and again.metadata["model_calls"] == 0
        assert elsewhere.count() == 0
    assert _table(world)["request_key"].to_list() == table["request_key"].to_list()


def test_a_key_without_a_served_name_is_what_it_always_was():
    sampling = SamplingParams(max_tokens=10)
    payload = {
        "model_id": "org/model",
        "template_hash": "t",
        "inputs": {"a": 1},
        "sampling": sampling.as_dict(),
        "seed": 3,
    }
    canonical = json.dumps(payload, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    earlier = hashlib.sha256(canonical.encode()).hexdigest()  # keys in existing caches
    assert request_key("org/model", "t", {"a": 1}, sampling, 3) == earlier
    assert request_key("org/model", "t", {"a": 1}, sampling, 3, "org/model") == earlier
    assert request_key("org/model", "t", {"a": 1}, sampling, 3, "/models/x") != earlier
    # Only a name other than the model id counts as a served name.
    assert BackendSpec("openai_http", "m", options={"served_model": "m"}).served_model is None
    assert BackendSpec("openai_http", "m", options={"served_model": " x "}).served_model == "x"
    assert BackendSpec("openai_http", "m", options={"base_urls": ["u"]}).served_model is None


def test_the_served_model_enters_the_settings_version_only_when_set():
    def settings_of(**options) -> dict:
        generation = GenerationResource.from_settings(http_settings("http://h/v1", **options))
        return describe_settings(SimpleNamespace(generation=generation))

    unnamed = settings_of(served_model=None)
    assert "served_model" not in unnamed
    assert settings_of(served_model="a")["served_model"] == "a"
    assert settings_of(served_model="a") != settings_of(served_model="b")
    assert settings_of(served_model=None, base_urls=["http://other/v1"]) == unnamed


# -- 2. the picture check is conclusive --------------------------------------------------------


def test_a_server_still_starting_is_asked_again_within_the_check_time():
    from megapairs_assets.generation.backends.openai_http import probe_image_input

    # A server still loading answers 503 at first (then counts the picture's tokens).
    with ChatServer(faults={"What colour": ["503", "503"]}) as starting:
        assert probe_image_input(starting.base_url, "test-model", timeout_s=10) is None
        assert starting.count("503") == 2
    with ChatServer(faults={"What colour": ["503"] * 20}) as broken:
        deferred = probe_image_input(broken.base_url, "test-model", timeout_s=1)
    assert deferred is not None and deferred.kind == "image_check_deferred"
    assert "HTTP 503" in deferred.detail


def _materialize(world, generation: GenerationResource) -> tuple[dg.ExecuteInProcessResult, list]:
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, [SHARD])
    result = dg.materialize(
        generation_assets[:1],
        instance=instance,
        partition_key=SHARD,
        resources={
            "generation": generation,
            "storage": StorageResource(home=str(world.home), profile="test"),
            "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
        },
        raise_on_error=False,
    )
    warnings = [
        entry.user_message
        for entry in instance.all_logs(result.run_id)
        if entry.level in ("WARNING", 30)
    ]
    return result, warnings


def test_a_check_without_an_answer_in_time_is_made_on_the_first_answer(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(2,))
    # The probe's text-only request gets no answer in time (a model loading on a CPU).
    with ChatServer(faults={"What colour": ["stall:3"]}) as server:
        generation = GenerationResource.from_settings(http_settings(server.base_url))
        generation = GenerationResource(**{**generation.model_dump(), "image_check_timeout_s": 0.5})
        result, warnings = _materialize(world, generation)
        calls = server.count()
    assert result.success
    assert any("checks it on the server's first answer instead" in w for w in warnings)
    # The two descriptions, the stalled probe and one text-only twin of the first answer.
    assert calls == 4
    assert _table(world).height == 2


# -- 3. failed calls name the setting ----------------------------------------------------------


def _closed_port_url() -> str:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def test_refused_connections_name_the_setting_that_holds_the_url(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(2,))
    settings = replace(
        http_settings(_closed_port_url(), max_retries=0),
        server_setting_names={"describe": {"base_urls": "MY_DESCRIBE_URLS"}},
    )
    with pytest.raises(GenerationStepError) as raised:
        _describe(world, settings)
    message = str(raised.value)
    assert "2 of 2 model calls failed" in message and "Connection refused" in message
    assert message.endswith("to fix: start the server, or set MY_DESCRIBE_URLS to its URL")
    # The resource carries the names into the plain settings the step reads.
    resource = GenerationResource.from_settings(settings)
    assert resource.settings().server_setting_names == settings.server_setting_names

    with pytest.raises(GenerationStepError, match="set the backend's base_urls option to"):
        _describe(world, replace(settings, server_setting_names={}))


# -- 4. a silent wait says what it waits on ----------------------------------------------------


def _requests(count: int) -> list[GenerationRequest]:
    return [
        GenerationRequest(
            key=f"k{i}",
            step="describe",
            messages=({"role": "user", "content": f"SLOW {i}"},),
            sampling=SamplingParams(max_tokens=8),
            seed=i,
        )
        for i in range(count)
    ]


def test_a_wait_without_answers_is_logged_with_the_server_and_timeout(tmp_path):
    lines: list[str] = []
    with ChatServer(faults={"SLOW": ["stall:1.5"] * 2}) as server:
        backend = OpenAIHttpBackend(http_settings(server.base_url).describe.backend)
        _, stats = run_requests(
            _requests(2),
            backend,
            ResponseStore(tmp_path / "slow.sqlite"),
            label="describe 00000 (model)",
            log=lines.append,
            heartbeat_s=0.4,
        )
        assert stats.succeeded == 2
        waiting = [line for line in lines if "waiting on" in line]
        assert waiting, lines
        assert waiting[0].startswith(
            f"describe 00000 (model): waiting on 2 requests to {server.base_url} for "
        )
        assert waiting[0].endswith("(timeout 5 s each)")

        lines.clear()  # answers that come quickly: no such line
        run_requests(
            _requests(2)[:1],
            backend,
            ResponseStore(tmp_path / "fast.sqlite"),
            label="describe 00000 (model)",
            log=lines.append,
            heartbeat_s=0.4,
        )
    assert not [line for line in lines if "waiting on" in line]


# -- the repeated-description signal ----------------------------------------------------------

_SAME_TEXT = (
    "Both images show a calm outdoor scene with soft light; the first is brighter and the "
    "second has more detail in the background."
)


def test_one_description_for_most_pairs_is_a_warning_and_a_figure(tmp_path):
    world = make_world(tmp_path, pairs_per_shard=(5,))
    warnings: list[str] = []
    with ChatServer(responder=lambda body: _SAME_TEXT) as same:
        result = _describe(world, http_settings(same.base_url), warn=warnings.append)
    assert result.row_count == 5  # a warning, not a rejection
    assert result.metadata["model_descriptions_top_share"] == 1.0
    (warning,) = warnings
    assert "5 of 5 model descriptions are the same text" in warning
    # ... and the `descriptions_varied` warning check (non-blocking) fails on the asset page.
    (varied_check,) = [o for o in result.outcomes if o.name == "descriptions_varied"]
    assert not varied_check.passed and varied_check.failing_rows == 5

    other = make_world(tmp_path / "varied", pairs_per_shard=(5,))
    warnings.clear()
    with ChatServer() as varied:  # tagged answers: one per request
        result = _describe(other, http_settings(varied.base_url), warn=warnings.append)
    assert result.metadata["model_descriptions_top_share"] == 0.2
    assert warnings == []
    assert [o.passed for o in result.outcomes if o.name == "descriptions_varied"] == [True]
