"""vLLM worker: runs in vLLM's own environment, never imported by the project's environment.

    <vllm env>/bin/python -m megapairs_assets.generation.vllm_worker --model PATH [options]

vLLM pins its own torch and CUDA, so it cannot share the project's virtual environment. The
`vllm` backend (`backends/vllm_subprocess.py`) starts this module with that environment's
Python and the repository root on PYTHONPATH; this file imports only the standard library and
vLLM. Protocol, one JSON object per line:

- stdin: requests `{"key", "messages", "sampling": {"max_tokens", "temperature", "top_p"},
  "seed"}`; `messages` are OpenAI chat messages, images as `image_url` parts (data URLs).
- stdout: results `{"key", "text", "prompt_tokens", "completion_tokens", "finish_reason"}` or
  `{"key", "error"}`, written and flushed after each chunk of `--chunk-size` requests, so the
  parent persists finished work while the rest runs. Logs go to stderr.

The engine follows vLLM's documented offline chat API: `LLM(model=..., limit_mm_per_prompt=
{"image": N})`, then `LLM.chat(conversations, sampling_params)` with one `SamplingParams(
max_tokens, temperature, top_p, seed)` per conversation.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterator
from typing import Any


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", required=True, help="local model folder or id in the cache")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--max-images", type=int, default=2, help="images per prompt")
    parser.add_argument("--engine-args", default="{}", help="JSON object of extra LLM(...) args")
    return parser.parse_args(argv)


def read_chunks(stream: Any, chunk_size: int) -> Iterator[list[dict[str, Any]]]:
    """Requests from a JSON Lines stream, grouped into chunks."""
    chunk: list[dict[str, Any]] = []
    for line in stream:
        if not line.strip():
            continue
        chunk.append(json.loads(line))
        if len(chunk) >= chunk_size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk


def emit(result: dict[str, Any]) -> None:
    sys.stdout.write(json.dumps(result, ensure_ascii=False) + "\n")


def result_of(key: str, output: Any) -> dict[str, Any]:
    """One vLLM RequestOutput as a protocol result."""
    completion = output.outputs[0]
    return {
        "key": key,
        "text": completion.text,
        "prompt_tokens": len(output.prompt_token_ids or []),
        "completion_tokens": len(completion.token_ids or []),
        "finish_reason": completion.finish_reason,
    }


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    from vllm import LLM, SamplingParams  # only available in vLLM's environment

    engine_args = json.loads(args.engine_args)
    engine_args.setdefault("limit_mm_per_prompt", {"image": args.max_images})
    llm = LLM(model=args.model, **engine_args)

    def params_of(request: dict[str, Any]) -> Any:
        sampling = request["sampling"]
        return SamplingParams(
            max_tokens=int(sampling["max_tokens"]),
            temperature=float(sampling["temperature"]),
            top_p=float(sampling["top_p"]),
            seed=int(request["seed"]),
        )

    for chunk in read_chunks(sys.stdin, args.chunk_size):
        try:
            outputs = llm.chat(
                [r["messages"] for r in chunk],
                sampling_params=[params_of(r) for r in chunk],
                use_tqdm=False,
            )
            for request, output in zip(chunk, outputs, strict=True):
                emit(result_of(request["key"], output))
        except Exception as chunk_error:  # isolate the request that broke the chunk
            print(f"chunk failed ({chunk_error}); retrying one by one", file=sys.stderr)
            for request in chunk:
                try:
                    output = llm.chat(
                        request["messages"], sampling_params=params_of(request), use_tqdm=False
                    )[0]
                    emit(result_of(request["key"], output))
                except Exception as error:
                    emit({"key": request["key"], "error": f"{type(error).__name__}: {error}"})
        sys.stdout.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
