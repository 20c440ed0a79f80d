"""Backends on real local models and servers: transformers (tiny text and vision-language models
built offline), openai_http against `transformers serve`, and the vLLM worker protocol."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
from dataclasses import replace
from pathlib import Path

import httpx2
import pytest
from generation_fixtures import build_tiny_llm, build_tiny_vlm, make_world

from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    ImageInput,
    SamplingParams,
    create_backend,
)
from megapairs_assets.generation.describe import describe_pairs_for_shard
from megapairs_assets.generation.settings import GenerationSettings, PairSample, StepSettings
from megapairs_assets.generation.store import ResponseStore, store_path


@pytest.fixture(scope="module")
def models_root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.getbasetemp() / "generation-tiny-models"


def _transformers_settings(model_dir: Path, kind: str, template: str) -> GenerationSettings:
    spec = BackendSpec(
        "transformers",
        f"tiny-{kind}",
        options={"model_path": str(model_dir), "kind": kind, "batch_size": 4, "device": "cpu"},
    )
    return GenerationSettings(
        describe=StepSettings(spec, template, SamplingParams(max_tokens=12)),
        instruct=StepSettings(spec, "instructions", SamplingParams(max_tokens=12)),
        model_sample=PairSample(fraction=1.0),
        max_failure_fraction=0.0,
    )


class CountingFactory:
    """Wraps backend creation to count how often a model backend is built."""

    def __init__(self) -> None:
        self.built = 0

    def __call__(self, spec: BackendSpec):
        self.built += 1
        return create_backend(spec)


@pytest.mark.parametrize(
    ("kind", "template"),
    [("causal_lm", "describe_captions"), ("image_text_to_text", "describe_images")],
)
def test_transformers_backend_end_to_end_on_tiny_local_models(
    tmp_path, models_root, kind, template
):
    models_root.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_llm(models_root) if kind == "causal_lm" else build_tiny_vlm(models_root)
    world = make_world(tmp_path, pairs_per_shard=(6,))
    settings = _transformers_settings(model_dir, kind, template)
    factory = CountingFactory()
    first = describe_pairs_for_shard(
        "00000", world.layout, world.catalog, settings, backend_factory=factory
    )
    assert factory.built == 1
    assert first.metadata["model_calls"] == 6 and first.metadata["model_failed"] == 0
    # Random weights write nonsense: each pair is a row or a quarantine row with a reason.
    log = first.rows["quarantine_log"]
    assert first.row_count + log.height == 6
    # (nonsense in no language is also `wrong_language`)
    nonsense = {"description_too_short", "description_empty", "output_truncated", "wrong_language"}
    assert set(log["reason"]) <= nonsense
    stored = ResponseStore(store_path(world.layout, "00000", "describe")).get(
        [k for k in _keys(world)]
    )
    assert len(stored) == 6
    assert all(r.prompt_tokens > 20 and 0 < r.completion_tokens <= 12 for r in stored.values())
    second = describe_pairs_for_shard(
        "00000", world.layout, world.catalog, settings, backend_factory=factory
    )
    assert factory.built == 1  # nothing to generate: the model is never even built
    assert second.metadata["model_calls"] == 0 and second.metadata["model_cache_hits"] == 6
    # The full breakdown is one table (model, heuristic, all), not dozens of loose numbers:
    # a row per figure, so it stays four columns wide.
    table = second.markdown["requests"].splitlines()
    assert [cell.strip() for cell in table[0].split("|")[1:-1]] == [
        "figure",
        "model",
        "heuristic",
        "all",
    ]
    figures = [line.split("|")[1].strip() for line in table[2:]]
    assert "cache_hits" in figures and "retries" in figures
    # A dozen plotted figures plus model_retries, rows_by_served_model (provenance) and
    # model_descriptions_top_share (a model that writes one text for every pair).
    assert len(second.metadata) <= 15


def _keys(world) -> list[str]:
    import sqlite3

    path = store_path(world.layout, "00000", "describe")
    with sqlite3.connect(path) as con:
        return [row[0] for row in con.execute("SELECT key FROM responses")]


def test_a_text_model_refuses_image_requests_without_loading(tmp_path, models_root):
    models_root.mkdir(parents=True, exist_ok=True)
    backend = create_backend(
        BackendSpec(
            "transformers", "tiny", options={"model_path": str(build_tiny_llm(models_root))}
        )
    )
    image = tmp_path / "x.png"
    from PIL import Image

    Image.new("RGB", (20, 20)).save(image)
    request = GenerationRequest(
        key="k",
        step="describe",
        messages=[{"role": "user", "content": [{"type": "image", "ref": "query"}]}],
        sampling=SamplingParams(max_tokens=4),
        seed=0,
        images={"query": ImageInput(str(image))},
    )
    results = []
    backend.generate([request], results.extend)
    assert results[0].error == "model takes no image input"
    assert backend._model is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_openai_http_against_a_real_transformers_serve(tmp_path, models_root):
    """`transformers serve` (transformers' own FastAPI server) on a tiny model built here."""
    pytest.importorskip("openai", reason="transformers serve needs its [serving] extra")
    models_root.mkdir(parents=True, exist_ok=True)
    model_dir = build_tiny_llm(models_root)
    executable = Path(sys.executable).with_name("transformers")
    if not executable.exists():
        executable = Path(shutil.which("transformers") or "transformers")
    port = _free_port()
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    server = subprocess.Popen(
        [
            str(executable),
            "serve",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--device",
            "cpu",
            str(model_dir),
        ],
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
            time.sleep(0.5)
        options = {
            "base_urls": [f"http://127.0.0.1:{port}/v1"],
            "max_in_flight": 2,
            "request_timeout_s": 60,
            "max_retries": 1,
            "served_model": str(model_dir),
        }
        backend = create_backend(BackendSpec("openai_http", "tiny-llm", options=options))
        requests = [
            GenerationRequest(
                key=f"k{i}",
                step="describe",
                messages=[
                    {"role": "system", "content": "be brief"},
                    {"role": "user", "content": f"describe pair {i}"},
                ],
                sampling=SamplingParams(max_tokens=8),
                seed=i,
            )
            for i in range(3)
        ]
        results = {}
        backend.generate(requests, lambda batch: results.update({r.key: r for r in batch}))
        assert all(r.error is None for r in results.values()), results
        assert all(r.prompt_tokens > 5 and 0 < r.completion_tokens <= 8 for r in results.values())
        # The server refuses another model name with a 400: reported at once, never retried.
        wrong = create_backend(
            BackendSpec("openai_http", "x", options={**options, "served_model": "other"})
        )
        refused = []
        wrong.generate(requests[:1], refused.extend)
        assert "HTTP 400" in refused[0].error and wrong.retries == 0
    finally:
        server.terminate()
        server.wait(timeout=30)


_FAKE_VLLM = textwrap.dedent(
    '''
    """Stand-in for vllm with the documented LLM.chat / SamplingParams surface (test only)."""
    from dataclasses import dataclass

    @dataclass
    class SamplingParams:
        max_tokens: int
        temperature: float
        top_p: float
        seed: int

    class _Completion:
        def __init__(self, text, n):
            self.text, self.token_ids, self.finish_reason = text, list(range(n)), "stop"

    class _Output:
        def __init__(self, text, prompt):
            self.outputs = [_Completion(text, 3)]
            self.prompt_token_ids = list(range(len(prompt)))

    class LLM:
        def __init__(self, model, **kwargs):
            assert kwargs["limit_mm_per_prompt"] == {"image": 2}, kwargs
            self.model = model

        def chat(self, messages, sampling_params=None, use_tqdm=True):
            single = isinstance(messages[0], dict)
            conversations = [messages] if single else messages
            params = sampling_params if isinstance(sampling_params, list) else [sampling_params]
            outputs = []
            for conversation, p in zip(conversations, params * len(conversations)):
                parts = [q for m in conversation if not isinstance(m["content"], str)
                         for q in m["content"]]
                images = [q for q in parts if q["type"] == "image_url"]
                if any("BOOM" in str(m["content"]) for m in conversation):
                    raise RuntimeError("engine refused this prompt")
                assert all(q["image_url"]["url"].startswith("data:image/jpeg;base64,")
                           for q in images)
                outputs.append(_Output(f"{len(images)} images, seed {p.seed}", str(conversation)))
            return outputs
    '''
)


def test_vllm_backend_streams_requests_through_its_worker_process(tmp_path, monkeypatch):
    fake = tmp_path / "fake_vllm" / "vllm"
    fake.mkdir(parents=True)
    (fake / "__init__.py").write_text(_FAKE_VLLM)
    monkeypatch.setenv("PYTHONPATH", str(fake.parent))
    image = tmp_path / "a.png"
    from PIL import Image

    Image.new("RGB", (30, 20), (9, 9, 9)).save(image)
    spec = BackendSpec(
        "vllm", "fake", options={"python": sys.executable, "model_path": "m", "chunk_size": 2}
    )
    backend = create_backend(spec)

    def request(key: str, text: str, seed: int) -> GenerationRequest:
        return GenerationRequest(
            key=key,
            step="describe",
            messages=[
                {
                    "role": "user",
                    "content": [
                        {"type": "text", "text": text},
                        {"type": "image", "ref": "query"},
                        {"type": "image", "ref": "target"},
                    ],
                }
            ],
            sampling=SamplingParams(max_tokens=5),
            seed=seed,
            images={"query": ImageInput(str(image)), "target": ImageInput(str(image))},
        )

    requests = [
        request("a", "fine", 1),
        request("b", "BOOM", 2),
        request("c", "fine", 3),
        request("d", "fine", 4),
        replace(
            request("e", "x", 5),
            images={
                "query": ImageInput(str(tmp_path / "missing.png")),
                "target": ImageInput(str(image)),
            },
        ),
    ]
    batches = []
    backend.generate(requests, batches.append)
    results = {r.key: r for batch in batches for r in batch}
    assert results["a"].text == "2 images, seed 1" and results["d"].text == "2 images, seed 4"
    assert results["a"].completion_tokens == 3 and results["a"].prompt_tokens > 0
    assert "engine refused" in results["b"].error
    assert results["e"].error.startswith("image: missing_file")
    assert len(batches) >= 3  # results are handed over as the worker writes them


def test_gpu_generation_benchmark_runs_its_cpu_smoke(tmp_path, monkeypatch):
    """The GPU script's --cpu-smoke: same code path, tiny Llama on the CPU, fixed output length."""
    import json

    from benchmarks import gpu_generation

    monkeypatch.setenv("OUT", str(tmp_path))
    assert gpu_generation.main(["--cpu-smoke"]) == 0
    record = json.loads((tmp_path / "gpu_generation_smoke.json").read_text())
    section = record["sections"]["transformers_backend_llama3_8b_shape"]
    assert section["status"] == "ok", section
    for row in section["per_batch"]:
        assert row["errors"] == []
        assert row["generated_tokens"] == row["requests"] * 6  # every sequence to full length


def test_shared_backends_are_built_once_per_spec():
    from megapairs_assets.generation.backends import close_shared_backends, shared_backend

    spec = BackendSpec("heuristic", "h")
    first = shared_backend(spec)
    assert shared_backend(BackendSpec("heuristic", "h")) is first
    assert shared_backend(BackendSpec("heuristic", "other")) is not first
    close_shared_backends()
    assert shared_backend(spec) is not first
