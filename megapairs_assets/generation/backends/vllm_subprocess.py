"""In-process vLLM on one GPU machine, through a worker in vLLM's own environment.

vLLM pins its own torch and CUDA, so it is never imported here. This backend starts
`python -m megapairs_assets.generation.vllm_worker` with the Python of an environment where
vLLM is installed (`python` option), streams requests to its stdin from a writer thread (images
encoded lazily, so memory stays flat for any shard size) and reads results from its stdout as
each chunk finishes, handing them to the runner, which persists them. If the worker dies, the
requests it had not answered come back as errors and are retried on a later run.
"""

from __future__ import annotations

import contextlib
import json
import os
import shlex
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from megapairs_assets.corpus.images import ImageRejected
from megapairs_assets.generation.backends.base import (
    BackendSpec,
    GenerationRequest,
    GenerationResult,
    ResultCallback,
    register_backend,
)
from megapairs_assets.generation.backends.images import openai_messages

VLLM_BACKEND = "vllm"
WORKER_MODULE = "megapairs_assets.generation.vllm_worker"
_REPO_ROOT = Path(__file__).resolve().parents[3]


@dataclass
class VllmOptions:
    """Options of the `vllm` backend (BackendSpec.options).

    python: the vLLM environment's interpreter (a path, or a command line such as
      "conda run -n vllm python"). model_path: what `LLM(model=...)` loads.
    engine_args: extra `LLM(...)` keyword arguments (tensor_parallel_size, max_model_len,
      gpu_memory_utilization, trust_remote_code, dtype...).
    """

    python: str
    model_path: str
    chunk_size: int = 256
    image_side_px: int | None = 448
    max_images: int = 2
    engine_args: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_mapping(cls, options: Mapping[str, Any]) -> VllmOptions:
        known = set(cls.__dataclass_fields__)
        unknown = sorted(set(options) - known)
        if unknown:
            raise ValueError(f"vllm: unknown options {unknown}; known: {sorted(known)}")
        return cls(**dict(options))


@register_backend(VLLM_BACKEND)
class VllmSubprocessBackend:
    """vLLM's offline `LLM.chat` in a worker process (see the module docstring)."""

    name = VLLM_BACKEND
    accepts_images = True

    def __init__(self, spec: BackendSpec) -> None:
        self.model_id = spec.model_id
        self.options = VllmOptions.from_mapping(spec.options)

    def command(self) -> list[str]:
        """The worker's command line."""
        options = self.options
        return [
            *shlex.split(options.python),
            "-m",
            WORKER_MODULE,
            "--model",
            options.model_path,
            "--chunk-size",
            str(options.chunk_size),
            "--max-images",
            str(options.max_images),
            "--engine-args",
            json.dumps(options.engine_args),
        ]

    def generate(self, requests: Sequence[GenerationRequest], on_result: ResultCallback) -> None:
        if not requests:
            return
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (str(_REPO_ROOT), env.get("PYTHONPATH", "")) if p
        )
        started = time.perf_counter()
        pending = {request.key: request for request in requests}
        unsendable: list[GenerationResult] = []
        with subprocess.Popen(
            self.command(),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
            bufsize=1,
        ) as worker:
            writer = threading.Thread(
                target=self._write_requests,
                args=(worker, requests, unsendable),
                name="vllm-request-writer",
                daemon=True,
            )
            writer.start()
            assert worker.stdout is not None
            for line in worker.stdout:
                if not line.strip():
                    continue
                try:
                    payload = json.loads(line)
                except ValueError:
                    continue  # a stray print from a library; results are always JSON
                key = payload.get("key")
                if key not in pending:
                    continue
                pending.pop(key)
                on_result([self._result(payload, started, len(requests))])
            writer.join()
            return_code = worker.wait()
        for result in unsendable:
            pending.pop(result.key, None)
        lost = [
            GenerationResult(
                key=key,
                error=f"vLLM worker exited with code {return_code} before answering",
                model_id=self.model_id,
            )
            for key in pending
        ]
        if unsendable or lost:
            on_result([*unsendable, *lost])

    def _write_requests(
        self,
        worker: subprocess.Popen[str],
        requests: Sequence[GenerationRequest],
        unsendable: list[GenerationResult],
    ) -> None:
        assert worker.stdin is not None
        try:
            for request in requests:
                try:
                    messages = openai_messages(
                        request.messages, request.images, self.options.image_side_px
                    )
                except ImageRejected as error:
                    unsendable.append(
                        GenerationResult(
                            key=request.key, error=f"image: {error}", model_id=self.model_id
                        )
                    )
                    continue
                line = {
                    "key": request.key,
                    "messages": messages,
                    "sampling": request.sampling.as_dict(),
                    "seed": request.seed,
                }
                worker.stdin.write(json.dumps(line, ensure_ascii=False) + "\n")
        except BrokenPipeError:
            pass  # the worker died; its unanswered requests are reported as errors
        finally:
            with contextlib.suppress(BrokenPipeError):
                worker.stdin.close()

    def _result(self, payload: Mapping[str, Any], started: float, count: int) -> GenerationResult:
        latency = (time.perf_counter() - started) / max(count, 1)
        if payload.get("error"):
            return GenerationResult(
                key=payload["key"], error=str(payload["error"]), model_id=self.model_id
            )
        return GenerationResult(
            key=payload["key"],
            text=payload.get("text") or "",
            prompt_tokens=int(payload.get("prompt_tokens") or 0),
            completion_tokens=int(payload.get("completion_tokens") or 0),
            finish_reason=payload.get("finish_reason"),
            latency_s=latency,
            model_id=self.model_id,
        )

    def close(self) -> None:
        return None
