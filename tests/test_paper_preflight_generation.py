"""The generation resource asks a step's servers for their models before its first request the
response cache cannot answer (UI and Dagster runs get the check the CLI's preflight does).

Servers are real HTTP servers on 127.0.0.1: the fault server of the generation tests (it lists
`test-model`) and a bare one answering only `GET /v1/models` the way vLLM does, or nothing.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import dagster as dg
import pytest
from fault_server import ChatServer
from generation_fixtures import http_settings, make_world

from megapairs_assets.generation.assets import generation_assets
from megapairs_assets.generation.backends.base import BackendSpec
from megapairs_assets.generation.backends.openai_http import (
    ServerSettingNames,
    probe_server,
    probe_servers,
)
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.storage import LineageCatalogResource, StorageResource


class ModelList:
    """`GET /v1/models` lists `served` (None: every GET is a 404); 401 without `api_key`."""

    def __init__(self, served: list[str] | None, api_key: str | None = None) -> None:
        owner = self
        self.served, self.api_key, self.gets = served, api_key, []

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                owner.gets.append(self.path)
                if owner.api_key and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                    self._answer(401, b"")
                elif owner.served is None or self.path != "/v1/models":
                    self._answer(404, b'{"detail":"Not Found"}')
                else:
                    body = {"object": "list", "data": [{"id": m} for m in owner.served]}
                    self._answer(200, json.dumps(body).encode())

            def _answer(self, status: int, body: bytes) -> None:
                self.send_response(status)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, *args: object) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.root = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def model_list() -> Iterator[list[ModelList]]:
    started: list[ModelList] = []
    yield started
    for server in started:
        server.close()


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


# --- the probe (openai_http, no profile knowledge) --------------------------------------------


def test_the_probe_refuses_only_what_is_certain_to_fail(model_list: list[ModelList]) -> None:
    listing = ModelList(["served-a"])
    no_list = ModelList(None)
    keyed = ModelList(["served-a"], api_key="k")
    model_list += [listing, no_list, keyed]

    assert probe_server(f"{listing.root}/v1", "served-a", timeout_s=3) is None
    other = probe_server(f"{listing.root}/v1", "hub/model", timeout_s=3)
    assert other is not None and other.kind == "other_name" and "served-a" in other.detail
    missing_v1 = probe_server(listing.root, "served-a", timeout_s=3)
    assert missing_v1 is not None and missing_v1.kind == "missing_v1"
    assert "HTTP 404" in missing_v1.detail
    # No model list at all (an API without /models): not refused on a guess.
    assert probe_server(f"{no_list.root}/v1", "served-a", timeout_s=3) is None
    assert probe_server(no_list.root, "served-a", timeout_s=3) is None
    refused = probe_server(f"{keyed.root}/v1", "served-a", timeout_s=3)
    assert refused is not None and refused.kind == "key" and "401" in refused.detail
    assert probe_server(f"{keyed.root}/v1", "served-a", {"Authorization": "Bearer k"}, 3) is None
    down = probe_server(_closed_port_url(), "served-a", timeout_s=3)
    assert down is not None and down.kind == "unreachable" and "not reachable" in down.detail
    assert "Errno" in down.detail  # the operating system's reason, not httpx's summary


def test_probe_servers_asks_every_replica_with_the_served_name_and_key(
    model_list: list[ModelList], monkeypatch: pytest.MonkeyPatch
) -> None:
    good, other = ModelList(["served-a"], api_key="k"), ModelList(["served-b"], api_key="k")
    model_list += [good, other]
    monkeypatch.setenv("PREFLIGHT_TEST_KEY", "k")
    options = {
        "base_urls": [f"{good.root}/v1", f"{other.root}/v1"],
        "served_model": "served-a",
        "api_key_env": "PREFLIGHT_TEST_KEY",
    }
    problems = probe_servers(BackendSpec("openai_http", "hub/model-a", options=options), 3)
    assert [(p.base_url, p.kind) for p in problems] == [(f"{other.root}/v1", "other_name")]
    assert probe_servers(BackendSpec("heuristic", "captions"), 3) == []
    names = ServerSettingNames(served_model="MY_MODEL_VARIABLE")
    assert "set MY_MODEL_VARIABLE to the name the server uses" in names.fix(problems[0])
    assert "--served-model-name served-a" in names.fix(problems[0])


# --- the resource, before a step's first request ---------------------------------------------


def _one_shard(tmp_path, generation: GenerationResource, server: ChatServer):
    world = make_world(tmp_path, pairs_per_shard=(3,))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])
    return dg.materialize(
        generation_assets,
        instance=instance,
        partition_key="00000",
        resources={
            "generation": generation,
            "storage": StorageResource(home=str(world.home), profile="test"),
            "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
        },
        raise_on_error=False,
    )


def test_a_model_served_under_another_name_fails_the_step_before_any_request(tmp_path) -> None:
    with ChatServer() as server:  # lists "test-model"
        generation = GenerationResource.from_settings(
            http_settings(server.base_url, served_model="InternVL2-26B"),
            server_setting_names={"describe": {"served_model": "DESCRIBE_MODEL_VARIABLE"}},
        )
        result = _one_shard(tmp_path, generation, server)
        posts = server.count()
    assert not result.success
    assert posts == 0  # no chat request was sent
    failure = next(e for e in result.all_events if e.is_failure)
    message = str(failure.event_specific_data.error)
    assert "generation servers not ready" in message
    assert "serves ['test-model'], not 'InternVL2-26B'" in message
    assert "set DESCRIBE_MODEL_VARIABLE to the name the server uses" in message
    # Each step asks its own servers before its first request: the run stopped at describe.
    assert "instruct (" not in message
    # The instruct step has no variable of its own here: the backend's option is named.
    with ChatServer() as server:
        generation = GenerationResource.from_settings(
            http_settings(server.base_url, served_model="InternVL2-26B")
        )
        (instruct,) = generation.server_problems(("instruct",), timeout_s=3)
    assert "the backend's served_model option" in instruct


def test_the_fault_server_passes_the_probe_and_zero_timeout_skips_it(tmp_path) -> None:
    with ChatServer() as server:
        resource = GenerationResource.from_settings(http_settings(server.base_url))
        assert resource.server_problems(timeout_s=3) == []
        assert server.count() == 0  # the probe is a GET, never a chat request
    down = GenerationResource.from_settings(http_settings(_closed_port_url()))
    assert len(down.server_problems(timeout_s=3)) == 2  # describe and instruct
    fields = {name: getattr(down, name) for name in type(down).model_fields}
    unchecked = GenerationResource(**{**fields, "server_probe_timeout_s": 0})
    unchecked.setup_for_execution(dg.build_init_resource_context())


def test_a_fully_cached_step_runs_with_its_servers_down(tmp_path) -> None:
    """The servers are asked only before a request the response cache cannot answer."""
    world = make_world(tmp_path, pairs_per_shard=(3,))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])

    def materialize(generation: GenerationResource) -> dg.ExecuteInProcessResult:
        return dg.materialize(
            generation_assets,
            instance=instance,
            partition_key="00000",
            resources={
                "generation": generation,
                "storage": StorageResource(home=str(world.home), profile="test"),
                "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
            },
            raise_on_error=False,
        )

    down = GenerationResource.from_settings(http_settings(_closed_port_url()))
    first = materialize(down)  # nothing cached yet: refused before any request
    assert not first.success
    failure = next(e for e in first.all_events if e.is_failure)
    message = str(failure.event_specific_data.error)
    assert "generation servers not ready" in message
    assert "describe (" in message and "instruct (" not in message

    with ChatServer() as server:
        assert materialize(GenerationResource.from_settings(http_settings(server.base_url))).success
    again = materialize(down)  # the same requests, all answered from the cache
    assert again.success, [
        str(e.event_specific_data.error) for e in again.all_events if e.is_failure
    ]
