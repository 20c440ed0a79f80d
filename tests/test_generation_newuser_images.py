"""A user points the image-reading description template at their own server.

`transformers serve` with a text-only model answers chat requests that carry pictures without
an error: it drops the image parts, and the model then "describes" two pictures it never saw
(rows said input_mode "images" and were not marked caption-based). Before a describe step's
first uncached request, the resource now asks each server whether its model reads images.
"""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import dagster as dg
import httpx2
import pytest
from fault_server import ChatServer
from generation_fixtures import build_tiny_llm, http_settings, make_world, with_template

from megapairs_assets.generation.assets import generation_assets
from megapairs_assets.generation.backends.base import SamplingParams
from megapairs_assets.generation.backends.openai_http import probe_image_input
from megapairs_assets.generation.resource import GenerationResource
from megapairs_assets.generation.store import ResponseStore, store_path
from megapairs_assets.lib.storage import DataLayout
from megapairs_assets.orchestration.partitions import SHARD_PARTITIONS_NAME
from resources.storage import LineageCatalogResource, StorageResource


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def text_only_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """`transformers serve` on 127.0.0.1 with a tiny text-only Llama built here (offline):
    (base URL, served model name)."""
    pytest.importorskip("fastapi", reason="transformers serve needs its [serving] extra")
    model_dir = build_tiny_llm(tmp_path_factory.mktemp("models"))
    executable = Path(sys.executable).with_name("transformers")
    if not executable.exists():
        executable = Path(shutil.which("transformers") or "transformers")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    command = [str(executable), "serve", "--host", "127.0.0.1", "--port", str(port)]
    server = subprocess.Popen(
        [*command, "--device", "cpu", str(model_dir)],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            assert server.poll() is None, server.stderr.read()
            try:
                if httpx2.get(f"http://127.0.0.1:{port}/health", timeout=1).status_code == 200:
                    break
            except httpx2.HTTPError:
                pass
            assert time.monotonic() < deadline, "transformers serve did not come up"
            time.sleep(0.3)
        yield f"http://127.0.0.1:{port}/v1", str(model_dir)
    finally:
        server.terminate()
        server.wait(timeout=30)


def _materialize(tmp_path: Path, generation: GenerationResource) -> dg.ExecuteInProcessResult:
    world = make_world(tmp_path, pairs_per_shard=(2,))
    instance = dg.DagsterInstance.ephemeral()
    instance.add_dynamic_partitions(SHARD_PARTITIONS_NAME, ["00000"])
    return dg.materialize(
        generation_assets[:1],
        instance=instance,
        partition_key="00000",
        resources={
            "generation": generation,
            "storage": StorageResource(home=str(world.home), profile="test"),
            "catalog": LineageCatalogResource(path=str(world.layout.catalog_path)),
        },
        raise_on_error=False,
    )


def test_a_text_only_server_is_refused_for_the_image_template(tmp_path, text_only_server):
    base_url, served = text_only_server
    settings = http_settings(base_url, served_model=served, request_timeout_s=60)
    assert settings.describe.template == "describe_images"
    generation = GenerationResource.from_settings(settings)

    result = _materialize(tmp_path / "images", generation)

    assert not result.success
    failure = next(e for e in result.all_events if e.is_failure)
    message = str(failure.event_specific_data.error)
    assert "generation servers not ready" in message
    assert "drops images" in message and base_url in message
    assert "describe_template to describe_captions" in message
    table = tmp_path / "images" / "home" / "data" / "pair_descriptions" / "00000.parquet"
    assert not table.exists()  # nothing described from pictures the model never saw

    # The same server is fine for the caption-based template: it sends no pictures.
    captions = GenerationResource.from_settings(
        with_template(settings, "describe", "describe_captions")
    )
    assert captions.image_input_problems("describe", timeout_s=30) == []
    assert captions.image_input_problems("instruct", timeout_s=30) == []


def test_a_server_that_reads_or_refuses_images_is_told_apart(text_only_server):
    base_url, served = text_only_server
    dropped = probe_image_input(base_url, served, timeout_s=30)
    assert dropped is not None and dropped.kind == "no_images"
    # The fault server counts the picture's part in its prompt tokens, as a vision model does.
    with ChatServer() as reads:
        assert probe_image_input(reads.base_url, "test-model", timeout_s=5) is None
        assert reads.count() == 2  # one text-only and one picture request, one token each
    with ChatServer(faults={"image_url": ["400"]}) as refuses:
        refused = probe_image_input(refuses.base_url, "test-model", timeout_s=5)
    assert refused is not None and "refused a request with an image (HTTP 400" in refused.detail
    # A server that cannot answer at all is not judged here (the model-list probe reports it):
    # the check says it could not be made then, and is made on the step's first answer.
    with ChatServer(faults={"": ["500"] * 10}) as broken:
        unchecked = probe_image_input(broken.base_url, "test-model", timeout_s=1)
    assert unchecked is not None and unchecked.kind == "image_check_deferred"
    assert "text-only request failed (HTTP 500" in unchecked.detail


def test_a_text_only_model_unchecked_in_time_is_stopped_on_its_first_answer(
    tmp_path, text_only_server
):
    # A check with no answer in time (a server loading its model on a CPU) let this model
    # through with a warning, and every description came from no picture at all.
    base_url, served = text_only_server
    settings = http_settings(base_url, served_model=served, request_timeout_s=60)
    # Short answers: what is judged is the prompt's token count, not the text.
    settings = replace(settings, describe=replace(settings.describe, sampling=SamplingParams(8)))
    generation = GenerationResource(
        **{
            **GenerationResource.from_settings(settings).model_dump(),
            "image_check_timeout_s": 0.001,
        }
    )

    result = _materialize(tmp_path / "late", generation)

    assert not result.success
    failure = next(e for e in result.all_events if e.is_failure)
    message = str(failure.event_specific_data.error)
    assert "generation servers not ready" in message
    assert "drops images: a request with its pictures (the step's first answer)" in message
    assert base_url in message and "describe_template to describe_captions" in message
    home = tmp_path / "late" / "home"
    assert not (home / "data" / "pair_descriptions" / "00000.parquet").exists()
    # No answer the model gave without seeing the pictures is cached for a later run.
    store = ResponseStore(store_path(DataLayout(home), "00000", "describe"))
    assert store.counts().get("ok", 0) == 0
