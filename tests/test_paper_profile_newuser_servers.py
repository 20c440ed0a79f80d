"""A new user points the `paper` profile at their vLLM servers (or forgets to).

`check_generation_servers` asks each OpenAI-compatible server for its model list before any
work, so a server that is down, a URL without `/v1`, a model served under another name or a
missing key is one message naming the variable to set, not a generation step that fails after
the whole mining half. The servers here are real HTTP servers on 127.0.0.1 answering
`GET /v1/models` the way vLLM does.
"""

from __future__ import annotations

import json
import socket
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest

from megapairs_assets.generation.settings import PAPER_DESCRIBE_MODEL, PAPER_INSTRUCT_MODEL
from megapairs_assets.lib.errors import ConfigurationError
from resources.profiles import (
    GENERATION_VARIABLES,
    VLLM_API_KEY_VARIABLE,
    build_resources,
    check_generation_servers,
)

DESCRIBE_URLS, DESCRIBE_MODEL = GENERATION_VARIABLES["describe"]
INSTRUCT_URLS, INSTRUCT_MODEL = GENERATION_VARIABLES["instruct"]


class ModelServer:
    """`GET /v1/models` listing `served`; 401 without the bearer `api_key` when one is set."""

    def __init__(self, served: list[str], api_key: str | None = None) -> None:
        owner = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:
                if owner.api_key and self.headers.get("Authorization") != f"Bearer {owner.api_key}":
                    self.send_response(401)
                    self.end_headers()
                    return
                if self.path != "/v1/models":
                    self.send_response(404)
                    self.end_headers()
                    return
                body = json.dumps({"object": "list", "data": [{"id": m} for m in owner.served]})
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.end_headers()
                self.wfile.write(body.encode())

            def log_message(self, *args: object) -> None:
                pass

        self.served, self.api_key = served, api_key
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def servers() -> Iterator[list[ModelServer]]:
    started: list[ModelServer] = []
    yield started
    for server in started:
        server.close()


@pytest.fixture
def paper_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    for variable in (
        DESCRIBE_URLS, DESCRIBE_MODEL, INSTRUCT_URLS, INSTRUCT_MODEL, VLLM_API_KEY_VARIABLE,
        "MEGAPAIRS_VLLM_BASE_URLS", "MEGAPAIRS_DEPLOYMENT",
    ):  # fmt: skip
        monkeypatch.delenv(variable, raising=False)
    monkeypatch.setenv("MEGAPAIRS_HOME", str(tmp_path / "home"))
    return tmp_path / "home"


def _closed_port_url() -> str:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


def _problems(home: Path) -> dict[str, str]:
    with pytest.raises(ConfigurationError) as error:
        check_generation_servers(build_resources("paper", home)["generation"], timeout_s=3)
    lines = str(error.value).splitlines()[1:]
    return {line.split()[0]: line for line in lines}


def test_servers_that_are_down_are_named_with_their_variable(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(DESCRIBE_URLS, _closed_port_url())
    monkeypatch.setenv(INSTRUCT_URLS, _closed_port_url())
    problems = _problems(paper_env)
    assert "not reachable" in problems["describe"] and DESCRIBE_URLS in problems["describe"]
    assert "not reachable" in problems["instruct"] and INSTRUCT_URLS in problems["instruct"]


def test_a_url_without_v1_and_a_model_served_under_another_name(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch, servers: list[ModelServer]
) -> None:
    # `vllm serve /models/InternVL2-26B` serves the model under its path.
    server = ModelServer(["/models/InternVL2-26B", "/models/llama3"])
    servers.append(server)
    monkeypatch.setenv(DESCRIBE_URLS, server.url)
    monkeypatch.setenv(INSTRUCT_URLS, server.url.removesuffix("/v1"))
    problems = _problems(paper_env)
    assert "/models/InternVL2-26B" in problems["describe"]
    assert DESCRIBE_MODEL in problems["describe"]
    assert f"--served-model-name {PAPER_DESCRIBE_MODEL}" in problems["describe"]
    assert "HTTP 404" in problems["instruct"] and "ending /v1" in problems["instruct"]
    # Naming the served models fixes it; rows keep the hub ids (request keys add the served name).
    monkeypatch.setenv(DESCRIBE_MODEL, "/models/InternVL2-26B")
    monkeypatch.setenv(INSTRUCT_MODEL, "/models/llama3")
    monkeypatch.setenv(INSTRUCT_URLS, server.url)
    generation = build_resources("paper", paper_env)["generation"]
    check_generation_servers(generation, timeout_s=3, image_check_timeout_s=3)
    settings = generation.settings()
    assert settings.describe.backend.model_id == PAPER_DESCRIBE_MODEL
    assert settings.describe.backend.options["served_model"] == "/models/InternVL2-26B"
    assert settings.instruct.backend.model_id == PAPER_INSTRUCT_MODEL


def test_a_server_behind_a_key_wants_the_key_variable(
    paper_env: Path, monkeypatch: pytest.MonkeyPatch, servers: list[ModelServer]
) -> None:
    server = ModelServer([PAPER_DESCRIBE_MODEL, PAPER_INSTRUCT_MODEL], api_key="s3cret")
    servers.append(server)
    monkeypatch.setenv("MEGAPAIRS_VLLM_BASE_URLS", server.url)  # one endpoint, both models
    problems = _problems(paper_env)
    assert "HTTP 401" in problems["describe"] and VLLM_API_KEY_VARIABLE in problems["describe"]
    monkeypatch.setenv(VLLM_API_KEY_VARIABLE, "s3cret")
    generation = build_resources("paper", paper_env)["generation"]
    check_generation_servers(generation, timeout_s=3, image_check_timeout_s=3)
    # The key itself never enters the configuration, only the variable's name.
    assert "s3cret" not in json.dumps(generation.model_dump(mode="json"))
    assert generation.settings().describe.backend.options["api_key_env"] == VLLM_API_KEY_VARIABLE


def test_the_demo_profile_has_no_servers_to_check(paper_env: Path) -> None:
    check_generation_servers(build_resources("demo", paper_env)["generation"], timeout_s=1)
