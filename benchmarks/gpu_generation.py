"""GPU benchmark: the `transformers` generation backend on a random model shaped like Llama-3-8B.

    python -m benchmarks.gpu_generation [--batch-sizes 16,64,128] [--prompt-tokens 512]
                                        [--new-tokens 128] [--cpu-smoke]

A LlamaForCausalLM with Llama-3-8B's shape (hidden 4096, 32 layers, 32 query / 8 key-value
heads, MLP 14336, vocabulary 128256; ~8.0B parameters) is built in bf16 with random weights on
the GPU (nothing is downloaded) with a word-level tokenizer of the same vocabulary. Requests go
through `TransformersBackend.generate` exactly as the pipeline sends them: chat messages, the
chat template, left padding, batches of `batch_size`, greedy decoding to a fixed output length
(`min_new_tokens = max_new_tokens`, so every sequence writes `--new-tokens` tokens).

Per batch size it reports generated tokens/s, the time a prompt-only pass takes (prefill,
measured with one new token) and decode tokens/s with prefill taken out, against two
ceilings of the card: memory (each decode step reads every weight and the KV cache once;
bandwidth measured on the spot with a device copy) and compute (2 FLOP per parameter per token
at the dense bf16 peak). Decode at these batch sizes is memory-bound: the ratio to the memory
ceiling is the figure to read.

`--cpu-smoke` runs the same code on a tiny model on the CPU (a test of the script, not a
figure). Writes $OUT/gpu_generation.json (or benchmarks/results/).
"""

from __future__ import annotations

import argparse
import time
from typing import Any

from benchmarks.gpu_common import Suite, dense_peak_tflops, environment, gpu_name, log, output_path

LLAMA3_8B = {
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "num_key_value_heads": 8,
    "vocab_size": 128256,
    "max_position_embeddings": 8192,
    "rope_theta": 500000.0,
}
SMOKE = {
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 1000,
    "max_position_embeddings": 1024,
    "rope_theta": 10000.0,
}


def word_tokenizer(vocab_size: int) -> Any:
    """A word-level tokenizer over `vocab_size` ids (w0, w1, ...) with a ChatML-style template."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<s>", "</s>", "<|im_start|>", "<|im_end|>", "<unk>"]
    vocab = {token: i for i, token in enumerate(specials)}
    vocab.update({f"w{i}": i for i in range(len(specials), vocab_size)})
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    template = (
        "{% for m in messages %}<|im_start|> {{ m['role'] }} {{ m['content'] }} <|im_end|> "
        "{% endfor %}{% if add_generation_prompt %}<|im_start|> assistant {% endif %}"
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=core,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        chat_template=template,
        model_input_names=["input_ids", "attention_mask"],
    )


def measure_bandwidth_gbs(device: Any) -> float | None:
    """Device memory bandwidth from a large copy (bytes read + written per second)."""
    import torch

    if device.type != "cuda":
        return None
    source = torch.empty(2 * 2**30, dtype=torch.uint8, device=device)
    target = torch.empty_like(source)
    target.copy_(source)
    torch.cuda.synchronize(device)
    started = time.perf_counter()
    for _ in range(10):
        target.copy_(source)
    torch.cuda.synchronize(device)
    elapsed = time.perf_counter() - started
    del source, target
    return 10 * 2 * 2 * 2**30 / elapsed / 1e9


def generation_section(record: dict[str, Any], args: argparse.Namespace) -> None:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from megapairs_assets.generation.backends.base import (
        BackendSpec,
        GenerationRequest,
        SamplingParams,
    )
    from megapairs_assets.generation.backends.transformers_local import TransformersBackend

    smoke = args.cpu_smoke
    device = torch.device("cpu" if smoke else "cuda")
    dtype = torch.float32 if smoke else torch.bfloat16
    shape = SMOKE if smoke else LLAMA3_8B
    tokenizer = word_tokenizer(shape["vocab_size"])
    config = LlamaConfig(
        **shape,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        tie_word_embeddings=False,
    )
    started = time.perf_counter()
    torch.manual_seed(0)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with device:
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    params = sum(p.numel() for p in model.parameters())
    weight_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    record.update(
        {
            "device": gpu_name() or "cpu",
            "shape": shape,
            "parameters": params,
            "weight_gib": round(weight_bytes / 2**30, 2),
            "build_s": round(time.perf_counter() - started, 1),
            "prompt_tokens": args.prompt_tokens,
            "new_tokens": args.new_tokens,
        }
    )
    bandwidth = measure_bandwidth_gbs(device)
    peak_tflops = dense_peak_tflops(gpu_name())
    record["measured_bandwidth_gbs"] = round(bandwidth, 1) if bandwidth else None
    record["dense_bf16_peak_tflops"] = peak_tflops
    log(f"model: {params / 1e9:.2f}B parameters, {weight_bytes / 2**30:.1f} GiB; bw {bandwidth}")

    spec = BackendSpec("transformers", "random-llama3-8b-shape", options={"model_path": "-"})
    head_dim = shape["hidden_size"] // shape["num_attention_heads"]
    kv_bytes_per_token = (
        2
        * shape["num_hidden_layers"]
        * shape["num_key_value_heads"]
        * head_dim
        * (2 if not smoke else 4)
    )
    per_batch = []
    for batch_size in args.batch_sizes:
        backend = TransformersBackend.from_loaded(spec, model, tokenizer, device=str(device))
        backend.options.batch_size = batch_size
        requests = [
            GenerationRequest(
                key=f"b{batch_size}-{i}",
                step="instruct",
                messages=[
                    {
                        "role": "user",
                        "content": " ".join(
                            f"w{6 + (i * 7919 + j) % (shape['vocab_size'] - 6)}"
                            for j in range(args.prompt_tokens)
                        ),
                    }
                ],
                sampling=SamplingParams(max_tokens=args.new_tokens),
                seed=i,
            )
            for i in range(batch_size * args.batches)
        ]

        def run(
            new_tokens: int, requests: list[Any] = requests, backend: Any = backend
        ) -> tuple[float, list[Any]]:
            model.generation_config.min_new_tokens = new_tokens
            sized = [
                GenerationRequest(r.key, r.step, r.messages, SamplingParams(new_tokens), r.seed)
                for r in requests
            ]
            results: list[Any] = []
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            begun = time.perf_counter()
            backend.generate(sized, results.extend)
            if device.type == "cuda":
                torch.cuda.synchronize(device)
            return time.perf_counter() - begun, results

        run(2)  # warm-up: kernels, allocator
        prefill_s, _ = run(1)
        total_s, results = run(args.new_tokens)
        errors = [r.error for r in results if r.error]
        generated = sum(r.completion_tokens for r in results)
        decode_s = max(total_s - prefill_s, 1e-9)
        decode_tokens = generated - len(results)
        steps = args.batches * (args.new_tokens - 1)
        context = args.prompt_tokens + args.new_tokens // 2
        step_bytes = weight_bytes + batch_size * context * kv_bytes_per_token
        memory_ceiling = batch_size * bandwidth * 1e9 / step_bytes if bandwidth else None
        compute_ceiling = peak_tflops * 1e12 / (2 * params) if peak_tflops else None
        row = {
            "batch_size": batch_size,
            "requests": len(results),
            "errors": errors[:3],
            "generated_tokens": generated,
            "total_s": round(total_s, 3),
            "prefill_s": round(prefill_s, 3),
            "tokens_per_s": round(generated / total_s, 1),
            "decode_tokens_per_s": round(decode_tokens / decode_s, 1),
            "decode_step_ms": round(1000 * decode_s / max(steps, 1), 2),
            "memory_ceiling_tokens_per_s": round(memory_ceiling, 1) if memory_ceiling else None,
            "compute_ceiling_tokens_per_s": round(compute_ceiling, 1) if compute_ceiling else None,
        }
        if memory_ceiling:
            row["decode_ratio_to_memory_ceiling"] = round(
                decode_tokens / decode_s / min(memory_ceiling, compute_ceiling or memory_ceiling),
                3,
            )
        log(f"batch {batch_size}: {row}")
        per_batch.append(row)
        record["per_batch"] = per_batch


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--cpu-smoke", action="store_true", help="tiny model on the CPU")
    parser.add_argument("--batch-sizes", default="16,64,128")
    parser.add_argument("--batches", type=int, default=2, help="batches per measurement")
    parser.add_argument("--prompt-tokens", type=int, default=512)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--budget-s", type=float, default=540)
    args = parser.parse_args(argv)
    if args.cpu_smoke:
        args.batch_sizes, args.prompt_tokens, args.new_tokens, args.batches = "2,4", 16, 6, 1
    args.batch_sizes = [int(b) for b in str(args.batch_sizes).split(",")]
    suite = Suite(output_path("gpu_generation", args.cpu_smoke), budget_s=args.budget_s)
    suite.results["benchmark"] = "gpu_generation"
    if not args.cpu_smoke:  # importing every optional package costs seconds on a CPU box
        suite.results["environment"] = environment()
    with suite.section("transformers_backend_llama3_8b_shape", 0) as record:
        if record is not None:
            generation_section(record, args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
